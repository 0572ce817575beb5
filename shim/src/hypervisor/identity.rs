//! An unprivileged uid (and gid of the same number) for one pod's jailed VMM, unique
//! among the pods alive on this host, so one pod's QEMU can neither signal nor read
//! another's.
//!
//! Uniqueness without state that could leak: every uid of the configured range is one
//! byte of a single lock file, and a pod holds the byte of its uid with an open file
//! description lock (`F_OFD_SETLK`) for as long as its `Vm` lives. The kernel drops the
//! lock when the descriptor closes, also when the shim is killed, so nothing needs
//! cleaning up and a uid is free again the moment its pod is gone (its QEMU dies with
//! the shim through the parent-death signal).

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::Path;

/// A uid held for one pod; released when dropped.
#[derive(Debug)]
pub struct PodIdentity {
    pub uid: u32,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Failed to open the uid lock file {0}")]
    LockFile(String, #[source] std::io::Error),
    #[error("All {count} uids from {base} are held by live pods; widen [jail] uid_count")]
    Exhausted { base: u32, count: u32 },
    #[error("The uid range {base} + {count} is empty or passes the largest uid")]
    Range { base: u32, count: u32 },
}

/// Takes a uid in `base..base + count` not held by any other pod, trying first the one
/// `seed` (the pod id) hashes to.
pub fn allocate(
    lock_file: &Path,
    base: u32,
    count: u32,
    seed: &str,
) -> Result<PodIdentity, IdentityError> {
    if count == 0 || base.checked_add(count).is_none_or(|end| end == u32::MAX) {
        return Err(IdentityError::Range { base, count });
    }
    let lock_err = |e| IdentityError::LockFile(lock_file.display().to_string(), e);
    if let Some(dir) = lock_file.parent() {
        std::fs::create_dir_all(dir).map_err(lock_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_file)
        .map_err(lock_err)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    let first = (h.finish() % u64::from(count)) as u32;
    for i in 0..count {
        let slot = (first + i) % count;
        if try_lock_byte(&file, slot).map_err(lock_err)? {
            return Ok(PodIdentity {
                uid: base + slot,
                _lock: file,
            });
        }
    }
    Err(IdentityError::Exhausted { base, count })
}

/// Write-locks byte `n` of `file` for this open file description; false when another
/// holds it.
fn try_lock_byte(file: &File, n: u32) -> std::io::Result<bool> {
    // SAFETY: flock is plain data; zeroed is a valid starting value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = libc::off_t::from(n);
    fl.l_len = 1;
    // SAFETY: a valid descriptor and a pointer to an initialised flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_pods_never_share_a_uid_and_a_dropped_one_is_free_again() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("uids.lock");
        // Same seed: the second must move on to the next free uid.
        let a = allocate(&lock, 5000, 3, "pod").unwrap();
        let b = allocate(&lock, 5000, 3, "pod").unwrap();
        let c = allocate(&lock, 5000, 3, "other").unwrap();
        let mut uids = [a.uid, b.uid, c.uid];
        uids.sort();
        assert_eq!(uids, [5000, 5001, 5002]);
        let err = allocate(&lock, 5000, 3, "x").unwrap_err();
        assert!(matches!(err, IdentityError::Exhausted { .. }), "{err}");
        let freed = b.uid;
        drop(b);
        assert_eq!(allocate(&lock, 5000, 3, "x").unwrap().uid, freed);
    }

    #[test]
    fn a_range_past_the_largest_uid_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("uids.lock");
        assert!(matches!(
            allocate(&lock, u32::MAX - 1, 2, "p"),
            Err(IdentityError::Range { .. })
        ));
        assert!(matches!(
            allocate(&lock, 10, 0, "p"),
            Err(IdentityError::Range { .. })
        ));
    }
}
