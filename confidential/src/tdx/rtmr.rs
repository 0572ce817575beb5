//! RTMR1 and RTMR2 of a TD booted directly (QEMU's `-kernel`, `-initrd`, `-append`) by
//! TDVF: what the firmware extends into them before the kernel runs, so that a relying
//! party can expect them in a quote (MRTD is `tdvf::Tdvf::mrtd`; RTMR0 also covers
//! QEMU's ACPI tables and the TD HOB, and is not predicted here).
//!
//! TDVF measures a directly booted kernel as an EFI application, by its Authenticode
//! digest (RTMR1, followed by the fixed events of the boot-option call and of
//! ExitBootServices), and the command line it hands the kernel's EFI stub, with
//! ` initrd=initrd` appended, as UTF-16 with its terminator, then the initrd's bytes
//! (RTMR2). Each RTMR starts at zero and is extended as SHA-384(RTMR ‖ event digest).
//!
//! TDVF releases before edk2-stable202505 measure the kernel as QEMU patched its setup
//! header when it loaded it (loader type, heap, command-line pointer and the initrd's
//! place, which depends on the guest's memory); later ones measure the file as it is
//! (`Kernel::Patched` and `Kernel::AsIs`).
//!
//! Checked against virtee/tdx-measure's model of the same events for Debian's kernels
//! (which agrees with EDK2's hashing for them; that model pads an image to 8 bytes and
//! skips trailing data of an unsigned one, EDK2's code does neither, and this follows
//! EDK2); not against a quote from hardware (none here).

use sha2::{Digest, Sha384};

/// An RTMR's value.
pub type Rtmr = [u8; 48];

#[derive(Debug, thiserror::Error)]
pub enum RtmrError {
    #[error("the kernel is not a PE/COFF image (an EFI-stub kernel): {0}")]
    NotPe(&'static str),
    #[error("the kernel has no setup header for QEMU to patch: {0}")]
    NoSetupHeader(&'static str),
    #[error("the initrd is empty: OVMF then passes no initrd and this model does not hold")]
    EmptyInitrd,
    #[error("the kernel's setup header cannot take an initrd of {0} bytes here: {1}")]
    Initrd(usize, &'static str),
}

/// How the firmware measures the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    /// The file as it is (TDVF from edk2-stable202505 on).
    AsIs,
    /// Its setup header as QEMU patches it for a guest of `memory` bytes (older TDVF).
    Patched { memory: u64 },
}

/// RTMR1 of a direct boot of `kernel` with an initrd of `initrd_len` bytes.
pub fn rtmr1(kernel: &[u8], initrd_len: usize, how: Kernel) -> Result<Rtmr, RtmrError> {
    let digest = match how {
        Kernel::AsIs => authenticode_sha384(kernel)?,
        Kernel::Patched { memory } => {
            authenticode_sha384(&qemu_patched(kernel, initrd_len, memory)?)?
        }
    };
    Ok(extend_all(&[
        digest,
        sha384(b"Calling EFI Application from Boot Option"),
        sha384(&[0u8; 4]), // the separator
        sha384(b"Exit Boot Services Invocation"),
        sha384(b"Exit Boot Services Returned with Success"),
    ]))
}

/// RTMR2 of a direct boot with command line `append` and `initrd` (not empty). OVMF
/// widens each byte of the command line QEMU hands it to 16 bits (no UTF-8 decoding).
pub fn rtmr2(append: &str, initrd: &[u8]) -> Result<Rtmr, RtmrError> {
    if initrd.is_empty() {
        return Err(RtmrError::EmptyInitrd);
    }
    let mut line: Vec<u8> = format!("{append} initrd=initrd")
        .bytes()
        .flat_map(|b| u16::from(b).to_le_bytes())
        .collect();
    line.extend([0, 0]);
    Ok(extend_all(&[sha384(&line), sha384(initrd)]))
}

fn sha384(data: &[u8]) -> Rtmr {
    Sha384::digest(data).into()
}

fn extend_all(events: &[Rtmr]) -> Rtmr {
    events.iter().fold([0u8; 48], |mr, event| {
        let mut h = Sha384::new();
        h.update(mr);
        h.update(event);
        h.finalize().into()
    })
}

fn u16_at(d: &[u8], at: usize) -> Result<u16, RtmrError> {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(RtmrError::NotPe("truncated headers"))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, RtmrError> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(RtmrError::NotPe("truncated headers"))
}

/// The Authenticode digest (SHA-384) of a PE/COFF image, as EDK2 measures an EFI image
/// (`MeasurePeImageAndExtend`): the headers without the checksum and the certificate
/// table's directory entry (where the image has one), the sections' raw data in file
/// order, then what follows them short of the certificate table's size.
pub fn authenticode_sha384(pe: &[u8]) -> Result<Rtmr, RtmrError> {
    const SECURITY: usize = 4; // IMAGE_DIRECTORY_ENTRY_SECURITY
    if pe.get(..2) != Some(b"MZ") {
        return Err(RtmrError::NotPe("no MZ header"));
    }
    let nt = u32_at(pe, 0x3c)? as usize;
    if pe.get(nt..nt + 4) != Some(b"PE\0\0") {
        return Err(RtmrError::NotPe("no PE signature"));
    }
    let coff = nt + 4;
    let sections = u16_at(pe, coff + 2)? as usize;
    let optional_len = u16_at(pe, coff + 16)? as usize;
    let optional = coff + 20;
    let (directories, rva_count_at) = match u16_at(pe, optional)? {
        0x10b => (optional + 96, optional + 92),
        0x20b => (optional + 112, optional + 108),
        _ => return Err(RtmrError::NotPe("unknown optional header magic")),
    };
    let has_security = u32_at(pe, rva_count_at)? as usize > SECURITY;
    let checksum = optional + 64;
    let certificates = directories + SECURITY * 8;
    let headers_len = u32_at(pe, optional + 60)? as usize;
    let headers_end = if has_security {
        certificates + 8
    } else {
        checksum + 4
    };
    if headers_end > headers_len || headers_len > pe.len() {
        return Err(RtmrError::NotPe("headers out of order or past the file"));
    }
    let mut h = Sha384::new();
    h.update(&pe[..checksum]);
    if has_security {
        h.update(&pe[checksum + 4..certificates]);
        h.update(&pe[certificates + 8..headers_len]);
    } else {
        h.update(&pe[checksum + 4..headers_len]);
    }
    let mut hashed = headers_len;

    let table = optional + optional_len;
    let mut raw: Vec<(usize, usize)> = Vec::with_capacity(sections);
    for i in 0..sections {
        let s = table + i * 40;
        let (len, at) = (u32_at(pe, s + 16)? as usize, u32_at(pe, s + 20)? as usize);
        if len > 0 {
            raw.push((at, len));
        }
    }
    raw.sort_by_key(|&(at, _)| at);
    for (at, len) in raw {
        let data = at
            .checked_add(len)
            .and_then(|end| pe.get(at..end))
            .ok_or(RtmrError::NotPe("a section runs past the file"))?;
        h.update(data);
        hashed += len;
    }
    if pe.len() > hashed {
        let certificates_len = match has_security {
            true => u32_at(pe, certificates + 4)? as usize,
            false => 0,
        };
        let rest = (pe.len() - hashed)
            .checked_sub(certificates_len)
            .ok_or(RtmrError::NotPe(
                "the certificate table is larger than the file's end",
            ))?;
        h.update(&pe[hashed..hashed + rest]);
    }
    Ok(h.finalize().into())
}

/// The kernel as QEMU's x86 Linux loader patches its setup header for a guest of
/// `memory` bytes with an initrd of `initrd_len` (hw/i386/x86.c, `x86_load_linux`,
/// with the q35 machine's ACPI data size): for a kernel loaded high with boot protocol
/// 2.03 or later, as EFI-stub kernels are. A `vga=` on the command line, which QEMU
/// also writes into the header, is not modelled.
fn qemu_patched(kernel: &[u8], initrd_len: usize, memory: u64) -> Result<Vec<u8>, RtmrError> {
    const ACPI_DATA_SIZE: u32 = 0x28000;
    const REAL_ADDR: u32 = 0x10000;
    const CMDLINE_ADDR: u32 = 0x20000;
    if kernel.len() < 0x1000 {
        return Err(RtmrError::NoSetupHeader("shorter than 4 KiB"));
    }
    if initrd_len == 0 {
        return Err(RtmrError::EmptyInitrd);
    }
    let mut k = kernel.to_vec();
    let protocol = u16::from_le_bytes([k[0x206], k[0x207]]);
    // What an EFI-stub kernel has; older kernels QEMU loads low, which is not modelled.
    if &k[0x202..0x206] != b"HdrS" {
        return Err(RtmrError::NoSetupHeader("no HdrS signature"));
    }
    if protocol < 0x203 || k[0x211] & 0x01 == 0 {
        return Err(RtmrError::NoSetupHeader(
            "boot protocol before 2.03, or not loaded high",
        ));
    }
    k[0x210] = 0xb0; // type_of_loader: QEMU
    k[0x211] |= 0x80; // CAN_USE_HEAP
    let heap_end = (CMDLINE_ADDR - REAL_ADDR - 0x200) as u16;
    k[0x224..0x226].copy_from_slice(&heap_end.to_le_bytes());
    k[0x228..0x22c].copy_from_slice(&CMDLINE_ADDR.to_le_bytes());
    let mut initrd_max =
        if protocol >= 0x20c && u16::from_le_bytes([k[0x236], k[0x237]]) & 0x40 != 0 {
            u32::MAX // XLF_CAN_BE_LOADED_ABOVE_4G
        } else {
            u32::from_le_bytes([k[0x22c], k[0x22d], k[0x22e], k[0x22f]])
        };
    // Memory below 4 GiB, as q35 splits it.
    let lowmem: u64 = if memory < 0xb000_0000 {
        0xb000_0000
    } else {
        0x8000_0000
    };
    let below_4g = memory.min(lowmem) as u32;
    let limit = below_4g
        .checked_sub(ACPI_DATA_SIZE)
        .filter(|&l| l > 0)
        .ok_or(RtmrError::Initrd(
            initrd_len,
            "the guest's memory is no larger than its ACPI data",
        ))?;
    if initrd_max >= limit {
        initrd_max = limit - 1;
    }
    let len = u32::try_from(initrd_len)
        .ok()
        .filter(|&l| l < initrd_max)
        .ok_or(RtmrError::Initrd(
            initrd_len,
            "larger than the room the kernel allows below it",
        ))?;
    let addr = (initrd_max - len) & !4095;
    k[0x218..0x21c].copy_from_slice(&addr.to_le_bytes());
    k[0x21c..0x220].copy_from_slice(&len.to_le_bytes());
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ image: headers, two sections stored out of order, trailing data
    /// and a certificate table.
    fn pe(trailing: &[u8], certificate: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 0x200];
        d[..2].copy_from_slice(b"MZ");
        d[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        d[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        d[coff + 2..coff + 4].copy_from_slice(&2u16.to_le_bytes());
        d[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        d[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        d[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes()); // NumberOfRvaAndSizes
        d[opt + 60..opt + 64].copy_from_slice(&0x200u32.to_le_bytes());
        d[opt + 64..opt + 68].copy_from_slice(&0xdeadbeefu32.to_le_bytes()); // checksum
        let table = opt + 240;
        for (i, (at, len)) in [(0x300u32, 0x100u32), (0x200, 0x100)].iter().enumerate() {
            let s = table + i * 40;
            d[s + 16..s + 20].copy_from_slice(&len.to_le_bytes());
            d[s + 20..s + 24].copy_from_slice(&at.to_le_bytes());
        }
        d.extend((0..0x200u32).map(|i| i as u8));
        d.extend_from_slice(trailing);
        if !certificate.is_empty() {
            let cert = opt + 112 + 32;
            let at = d.len() as u32;
            d[cert..cert + 4].copy_from_slice(&at.to_le_bytes());
            d[cert + 4..cert + 8].copy_from_slice(&(certificate.len() as u32).to_le_bytes());
            d.extend_from_slice(certificate);
        }
        d
    }

    #[test]
    fn authenticode_skips_the_checksum_and_the_certificates() {
        let plain = pe(b"tail", b"");
        let by_hand = {
            let mut h = Sha384::new();
            let (opt, cert) = (0x84 + 20, 0x84 + 20 + 112 + 32);
            h.update(&plain[..opt + 64]);
            h.update(&plain[opt + 68..cert]);
            h.update(&plain[cert + 8..0x200]);
            h.update(&plain[0x200..0x400]); // the sections, in file order
            h.update(b"tail"); // what follows them
            <[u8; 48]>::from(h.finalize())
        };
        assert_eq!(authenticode_sha384(&plain).unwrap(), by_hand);

        // The checksum and a signature do not change the digest; the code does.
        let mut resummed = plain.clone();
        resummed[0x84 + 20 + 64] ^= 0xff;
        assert_eq!(authenticode_sha384(&resummed).unwrap(), by_hand);
        let signed = pe(b"tail", b"a signature ....");
        assert_eq!(authenticode_sha384(&signed).unwrap(), by_hand);
        let mut code = plain.clone();
        code[0x250] ^= 1;
        assert_ne!(authenticode_sha384(&code).unwrap(), by_hand);
    }

    #[test]
    fn what_is_not_a_pe_image_is_named() {
        for (bad, why) in [
            (b"\x7fELF".to_vec(), "no MZ"),
            (pe(b"", b"")[..0x90].to_vec(), "truncated"),
            (
                {
                    let mut d = pe(b"", b"");
                    d[0x80] = b'X';
                    d
                },
                "no PE signature",
            ),
            (
                {
                    let mut d = pe(b"", b"");
                    d[0x84 + 20 + 60..0x84 + 20 + 64].copy_from_slice(&0x10_0000u32.to_le_bytes());
                    d
                },
                "past the file",
            ),
            (
                {
                    let mut d = pe(b"", b"");
                    let s = 0x84 + 20 + 240 + 16;
                    d[s..s + 4].copy_from_slice(&0x1000u32.to_le_bytes());
                    d
                },
                "a section runs past",
            ),
            (
                {
                    let mut d = pe(b"", b"x");
                    let cert = 0x84 + 20 + 112 + 32;
                    d[cert + 4..cert + 8].copy_from_slice(&0x100u32.to_le_bytes());
                    d
                },
                "certificate table is larger",
            ),
        ] {
            let e = authenticode_sha384(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn rtmr2_binds_the_command_line_and_the_initrd() {
        let a = rtmr2("console=hvc0", b"initrd").unwrap();
        assert_ne!(a, rtmr2("console=hvc0 ", b"initrd").unwrap());
        assert_ne!(a, rtmr2("console=hvc0", b"initrD").unwrap());
        assert!(matches!(rtmr2("x", b""), Err(RtmrError::EmptyInitrd)));
        // Each byte widened, as OVMF does: "é" is two characters, not one.
        let wide = extend_all(&[
            sha384(
                &"\u{c3}\u{a9} initrd=initrd\0"
                    .chars()
                    .flat_map(|c| (c as u16).to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
            sha384(b"i"),
        ]);
        assert_eq!(rtmr2("é", b"i").unwrap(), wide);
        let mut line: Vec<u8> = "console=hvc0 initrd=initrd"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        line.extend([0, 0]);
        let first = extend_all(&[sha384(&line)]);
        let mut h = Sha384::new();
        h.update(first);
        h.update(sha384(b"initrd"));
        assert_eq!(a, <[u8; 48]>::from(h.finalize()));
    }

    #[test]
    fn qemus_patch_places_the_initrd_below_the_acpi_data() {
        let mut k = pe(b"", b"");
        k.resize(0x2000, 0);
        k[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        k[0x211] = 0x01; // loaded high
        k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        k[0x202..0x206].copy_from_slice(b"HdrS");
        let p = qemu_patched(&k, 0x10_0000, 2 << 30).unwrap();
        assert_eq!(p[0x210], 0xb0);
        assert_eq!(p[0x211], 0x81);
        let at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        assert_eq!(at(0x228), 0x20000);
        // heap_end_ptr is 16 bits; the extended loader fields after it stay.
        assert_eq!(&p[0x224..0x226], &[0x00, 0xfe]);
        assert_eq!(&p[0x226..0x228], &k[0x226..0x228]);
        // 2 GiB of memory, less the ACPI data, less one, less the initrd, page-aligned.
        assert_eq!(at(0x218), (0x8000_0000 - 0x28000 - 1 - 0x10_0000) & !4095);
        assert_eq!(at(0x21c), 0x10_0000);
        assert!(qemu_patched(&k, 0x7000_0000, 1 << 30).is_err());
        assert!(
            qemu_patched(&k, 1, 0x28000).is_err(),
            "no memory beyond the ACPI data"
        );
        assert!(matches!(
            qemu_patched(&k, 0, 2 << 30),
            Err(RtmrError::EmptyInitrd)
        ));
        let mut no_max = k.clone();
        no_max[0x22c..0x230].fill(0);
        assert!(
            qemu_patched(&no_max, 1, 2 << 30).is_err(),
            "initrd_addr_max 0: no initrd"
        );
        let mut old = k.clone();
        old[0x202] = b'X';
        assert!(matches!(
            qemu_patched(&old, 1, 2 << 30),
            Err(RtmrError::NoSetupHeader(_))
        ));
        // The patch changes what is measured.
        assert_ne!(
            rtmr1(&k, 0x10_0000, Kernel::AsIs).unwrap(),
            rtmr1(&k, 0x10_0000, Kernel::Patched { memory: 2 << 30 }).unwrap()
        );
    }
}
