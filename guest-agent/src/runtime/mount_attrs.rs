//! Recursive mount attributes, the OCI options runc takes as `rro`, `rnosuid`,
//! `rnoexec` and the like: applied to a mount and to everything mounted below it, with
//! `mount_setattr(2)` and `AT_RECURSIVE`, once the mount is made.
//!
//! containerd 2's CRI asks for a volume Kubernetes wants read-only all the way down
//! (`recursiveReadOnly: Enabled`) with `rro` and no `ro` at all; Docker and nerdctl send
//! it too. Taken as plain mount data, as it was, such a volume came out writable.

use std::path::Path;

use super::{Context, RuntimeError};

/// `MOUNT_ATTR_*` bits to set and to clear on a mount and its submounts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecursiveAttrs {
    pub set: u64,
    pub clear: u64,
}

/// Each option, the bit it names, and whether it clears it (`rrw`) or sets it (`rro`).
const FLAGS: &[(&str, u64, bool)] = &[
    ("rro", libc::MOUNT_ATTR_RDONLY, false),
    ("rrw", libc::MOUNT_ATTR_RDONLY, true),
    ("rnosuid", libc::MOUNT_ATTR_NOSUID, false),
    ("rsuid", libc::MOUNT_ATTR_NOSUID, true),
    ("rnodev", libc::MOUNT_ATTR_NODEV, false),
    ("rdev", libc::MOUNT_ATTR_NODEV, true),
    ("rnoexec", libc::MOUNT_ATTR_NOEXEC, false),
    ("rexec", libc::MOUNT_ATTR_NOEXEC, true),
    ("rnodiratime", libc::MOUNT_ATTR_NODIRATIME, false),
    ("rdiratime", libc::MOUNT_ATTR_NODIRATIME, true),
    ("rnosymfollow", libc::MOUNT_ATTR_NOSYMFOLLOW, false),
    ("rsymfollow", libc::MOUNT_ATTR_NOSYMFOLLOW, true),
];

/// The access-time options: one of three settings, which `mount_setattr` takes only
/// with the whole `MOUNT_ATTR__ATIME` field in `attr_clr`. "atime" and "nostrictatime"
/// are the default (relatime); "norelatime" is strictatime.
const ATIME: &[(&str, u64)] = &[
    ("rrelatime", libc::MOUNT_ATTR_RELATIME),
    ("ratime", libc::MOUNT_ATTR_RELATIME),
    ("rnostrictatime", libc::MOUNT_ATTR_RELATIME),
    ("rnoatime", libc::MOUNT_ATTR_NOATIME),
    ("rstrictatime", libc::MOUNT_ATTR_STRICTATIME),
    ("rnorelatime", libc::MOUNT_ATTR_STRICTATIME),
];

impl RecursiveAttrs {
    /// Takes `opt` if it is a recursive attribute (a later one wins over an earlier
    /// one for the same bit); false if it is not one.
    pub fn take(&mut self, opt: &str) -> bool {
        if let Some(&(_, bit, clears)) = FLAGS.iter().find(|(name, ..)| *name == opt) {
            if clears {
                self.set &= !bit;
                self.clear |= bit;
            } else {
                self.set |= bit;
                self.clear &= !bit;
            }
            return true;
        }
        if let Some(&(_, setting)) = ATIME.iter().find(|(name, _)| *name == opt) {
            self.set = (self.set & !libc::MOUNT_ATTR__ATIME) | setting;
            self.clear |= libc::MOUNT_ATTR__ATIME;
            return true;
        }
        false
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clear == 0
    }

    /// Applies them to the mount on `dest` and everything below it.
    pub fn apply(&self, dest: &Path) -> Result<(), RuntimeError> {
        if self.is_empty() {
            return Ok(());
        }
        let attr = libc::mount_attr {
            attr_set: self.set,
            attr_clr: self.clear,
            propagation: 0,
            userns_fd: 0,
        };
        let path = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes())
            .map_err(|_| RuntimeError::Invalid(format!("mount point {dest:?} holds a NUL")))?;
        // SAFETY: mount_setattr reads the path and `attr` (of the size passed); both
        // outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).ctx(|| {
                format!(
                    "cannot set recursive mount attributes on {dest:?} (set {:#x}, clear {:#x})",
                    self.set, self.clear
                )
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(opts: &[&str]) -> RecursiveAttrs {
        let mut a = RecursiveAttrs::default();
        for o in opts {
            assert!(a.take(o), "{o}");
        }
        a
    }

    #[test]
    fn each_option_sets_or_clears_its_bit_and_the_last_one_wins() {
        assert_eq!(attrs(&["rro"]).set, libc::MOUNT_ATTR_RDONLY);
        let a = attrs(&["rro", "rrw"]);
        assert_eq!((a.set, a.clear), (0, libc::MOUNT_ATTR_RDONLY));
        let a = attrs(&["rnoexec", "rnosuid", "rnodev"]);
        assert_eq!(
            a.set,
            libc::MOUNT_ATTR_NOEXEC | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV
        );
        assert!(!RecursiveAttrs::default().take("ro"));
        assert!(!RecursiveAttrs::default().take("rbind"));
        assert!(RecursiveAttrs::default().is_empty());
    }

    #[test]
    fn an_access_time_setting_clears_the_whole_field() {
        let a = attrs(&["rstrictatime", "rnoatime"]);
        assert_eq!(a.set, libc::MOUNT_ATTR_NOATIME);
        assert_eq!(a.clear, libc::MOUNT_ATTR__ATIME);
        let a = attrs(&["rnoatime", "rrelatime", "rnodiratime"]);
        assert_eq!(
            a.set,
            libc::MOUNT_ATTR_RELATIME | libc::MOUNT_ATTR_NODIRATIME
        );
    }
}
