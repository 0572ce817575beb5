//! The guest's random number generator, reseeded with the host's bytes.
//!
//! A VM restored from a template (`[vm] templates`) starts with the template's kernel
//! CRNG state: every clone of one template would draw the same "random" stream until
//! the kernel next reseeds on its own (up to a minute). CreateSandbox, the first call
//! that precedes any container, carries fresh bytes from the host's CSPRNG; the agent
//! mixes them into the input pool (a write to /dev/urandom, which never credits
//! entropy) and forces the CRNG to reseed from it at once (RNDRESEEDCRNG). Done for
//! every pod: for a booted one it only adds bytes. Mixed in, never credited, so a host
//! that is not trusted (confidential mode) cannot weaken the guest's randomness with
//! bytes of its choosing: the pool keeps what it had.

use std::io::Write;
use std::os::fd::AsRawFd;

/// At most this much of the host's bytes is taken (the request says how many).
pub const MAX_BYTES: usize = 256;

/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (CAP_SYS_ADMIN).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    #[error("{0} bytes of host entropy; at most {MAX_BYTES} are taken")]
    TooMany(usize),
    #[error("cannot write to /dev/urandom")]
    Write(#[source] std::io::Error),
    #[error("cannot reseed the CRNG (RNDRESEEDCRNG)")]
    Ioctl(#[source] std::io::Error),
}

/// Checks the host's bytes: none (nothing to do) or at most [`MAX_BYTES`].
pub fn check(bytes: &[u8]) -> Result<bool, ReseedError> {
    match bytes.len() {
        0 => Ok(false),
        n if n > MAX_BYTES => Err(ReseedError::TooMany(n)),
        _ => Ok(true),
    }
}

/// Mixes `bytes` into the kernel's pool and reseeds the CRNG from it.
pub fn reseed(bytes: &[u8]) -> Result<(), ReseedError> {
    if !check(bytes)? {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(ReseedError::Write)?;
    f.write_all(bytes).map_err(ReseedError::Write)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(ReseedError::Ioctl(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_bytes_are_bounded() {
        assert!(!check(&[]).unwrap());
        assert!(check(&[7; 32]).unwrap());
        assert!(check(&[7; MAX_BYTES]).unwrap());
        assert!(matches!(
            check(&[7; MAX_BYTES + 1]),
            Err(ReseedError::TooMany(257))
        ));
    }

    /// With CAP_SYS_ADMIN (the agent has it, in the guest) the reseed goes through;
    /// without, the ioctl is refused and said so.
    #[test]
    fn reseeding_needs_cap_sys_admin_and_says_so() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap();
        let r = reseed(&[1; 32]);
        const CAP_SYS_ADMIN: u32 = 21;
        if cap_eff & (1 << CAP_SYS_ADMIN) != 0 {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert!(matches!(e, ReseedError::Ioctl(_)), "{e}");
        }
    }
}
