//! The legacy SEV-SNP guest device (`/dev/sev-guest`, `SNP_GET_REPORT`), for guest
//! kernels without configfs-tsm (before 6.7). Cocoon's own kernel has configfs-tsm; this
//! is the fallback when it is missing and the device is there. The response is the
//! firmware's MSG_REPORT_RSP: status, report size, 24 reserved bytes, the report.
//!
//! Untested on hardware (none here): the request layout follows
//! `include/uapi/linux/sev-guest.h`; the response parsing is unit-tested.

use std::os::fd::AsRawFd;
use std::path::Path;

pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";
const REPORT_SIZE: usize = 0x4a0;
const RESPONSE_SIZE: usize = 4000;

/// `struct snp_report_req`.
#[repr(C)]
struct ReportReq {
    user_data: [u8; 64],
    vmpl: u32,
    rsvd: [u8; 28],
}

/// `struct snp_guest_request_ioctl`.
#[repr(C)]
struct GuestRequest {
    msg_version: u8,
    req_data: u64,
    resp_data: u64,
    exitinfo2: u64,
}

/// `SNP_GET_REPORT`: `_IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
const SNP_GET_REPORT: u64 =
    (3 << 30) | ((std::mem::size_of::<GuestRequest>() as u64) << 16) | ((b'S' as u64) << 8);

/// A report at VMPL 0 carrying `report_data`, from the device at `dev`.
pub fn report(dev: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, String> {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let req = ReportReq {
        user_data: *report_data,
        vmpl: 0,
        rsvd: [0; 28],
    };
    let mut resp = vec![0u8; RESPONSE_SIZE];
    let mut ioctl = GuestRequest {
        msg_version: 1,
        req_data: &req as *const ReportReq as u64,
        resp_data: resp.as_mut_ptr() as u64,
        exitinfo2: 0,
    };
    // SAFETY: the request and response buffers outlive the call and have the sizes the
    // ioctl's structures say.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            SNP_GET_REPORT as _,
            &mut ioctl as *mut GuestRequest,
        )
    };
    if rc < 0 {
        return Err(format!(
            "SNP_GET_REPORT on {}: {} (firmware error {:#x}, VMM error {:#x})",
            dev.display(),
            std::io::Error::last_os_error(),
            ioctl.exitinfo2 & 0xffff_ffff,
            ioctl.exitinfo2 >> 32
        ));
    }
    parse_response(&resp)
}

/// The report in a MSG_REPORT_RSP, checked: status 0, the size a report has.
pub fn parse_response(resp: &[u8]) -> Result<Vec<u8>, String> {
    let word = |at: usize| {
        resp.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let (Some(status), Some(size)) = (word(0), word(4)) else {
        return Err(format!("the response is {} bytes", resp.len()));
    };
    if status != 0 {
        return Err(format!(
            "the firmware refused the report request (status {status:#x})"
        ));
    }
    if size as usize != REPORT_SIZE {
        return Err(format!(
            "the firmware says the report is {size} bytes, not {REPORT_SIZE}"
        ));
    }
    resp.get(32..32 + REPORT_SIZE)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            format!(
                "the response is {} bytes, too short for its report",
                resp.len()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_matches_the_uapi() {
        assert_eq!(std::mem::size_of::<ReportReq>(), 96);
        assert_eq!(std::mem::size_of::<GuestRequest>(), 32);
        assert_eq!(SNP_GET_REPORT, 0xc020_5300);
    }

    #[test]
    fn responses_are_checked() {
        let mut r = vec![0u8; RESPONSE_SIZE];
        r[4..8].copy_from_slice(&(REPORT_SIZE as u32).to_le_bytes());
        r[32] = 0xaa;
        let report = parse_response(&r).unwrap();
        assert_eq!((report.len(), report[0]), (REPORT_SIZE, 0xaa));
        let mut refused = r.clone();
        refused[0] = 0x16;
        assert!(parse_response(&refused)
            .unwrap_err()
            .contains("status 0x16"));
        let mut odd = r.clone();
        odd[4..8].copy_from_slice(&5000u32.to_le_bytes());
        assert!(parse_response(&odd).unwrap_err().contains("5000 bytes"));
        assert!(parse_response(&r[..100]).unwrap_err().contains("too short"));
        assert!(parse_response(&[]).is_err());
    }

    #[test]
    fn no_device_is_a_clear_error() {
        let e = report(Path::new("/nonexistent/sev-guest"), &[0; 64]).unwrap_err();
        assert!(e.contains("/nonexistent/sev-guest"), "{e}");
    }
}
