//! The file behind guest RAM, and how it gets huge pages.
//!
//! Guest RAM must be a shared file (vhost-user backends such as virtiofsd map the same
//! pages), and shared memory gets transparent huge pages only where the host's shmem
//! policy allows it: a memfd lives on the kernel's internal tmpfs, governed by
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled`, which distributions leave at
//! `never`. Without huge pages every first touch of a 4 KiB guest page is a (nested) page
//! fault; under nested virtualization that made a Linux boot 1.7× slower (docs/notes.md).
//!
//! A tmpfs mounted with `huge=always` gets huge pages whatever `shmem_enabled` says (only
//! its `deny` overrides a mount). So where the process may mount (CAP_SYS_ADMIN), guest
//! RAM is an unlinked file on a tmpfs of its own: made with the new mount API
//! (`fsopen`/`fsmount`) as a *detached* mount, never attached to any directory, so no
//! mount namespace changes, nothing is left to unmount, and the filesystem goes away with
//! the last descriptor of its one file. Its size limit is the guest's RAM.
//!
//! Why not hugetlbfs (Firecracker's and Kata's option): it needs huge pages reserved on
//! the node ahead of time, which a runtime cannot assume; THP on a tmpfs needs nothing and
//! falls back to 4 KiB pages where memory is fragmented.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// Whether guest RAM is put on a huge-page tmpfs of its own: `auto` makes one where
/// this process may (else a memfd), `on` fails the boot without one, `off` is a memfd
/// that never asks for huge pages.
pub type HugePages = crate::choice::AutoOnOff;

/// A failed step of making the huge-page tmpfs file.
#[derive(Debug, thiserror::Error)]
#[error("Failed to make guest RAM's huge-page tmpfs: {step}")]
pub struct HugeTmpfsError {
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

const HUGE_PAGE: u64 = 2 << 20;

// The new mount API's constants (linux/mount.h); the libc crate has the syscall numbers.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

fn owned(ret: libc::c_long, step: &'static str) -> Result<OwnedFd, HugeTmpfsError> {
    owned_status(ret, step)?;
    // SAFETY: a descriptor the kernel just returned to us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// The options of a guest-RAM tmpfs for `size` bytes of RAM, as `(key, value)`: huge
/// pages always, room for whole huge pages only (a 2 MiB folio is only allocated if all
/// of it fits the limit), the root and one file, the root's mode 0700. Used for the
/// detached mount of [`huge_tmpfs_file`] and for the one `jail-exec --huge-tmpfs` mounts
/// in a jailed QEMU's root.
pub fn huge_tmpfs_options(size: u64) -> [(&'static str, String); 4] {
    [
        ("huge", "always".into()),
        // Whole huge pages, saturating: a size that would wrap stays the last whole
        // page, never 0 (tmpfs's "no limit").
        (
            "size",
            (size.div_ceil(HUGE_PAGE).min(u64::MAX / HUGE_PAGE) * HUGE_PAGE).to_string(),
        ),
        ("nr_inodes", "2".into()),
        ("mode", "0700".into()),
    ]
}

/// An unlinked, `size`-byte file on a detached tmpfs of its own mounted `huge=always`
/// (see the module docs). Needs CAP_SYS_ADMIN.
pub fn huge_tmpfs_file(size: u64) -> Result<File, HugeTmpfsError> {
    use std::os::fd::AsRawFd;
    // SAFETY: fsopen with a NUL-terminated name and valid flags; checked by `owned`.
    let fs = owned(
        unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) },
        "fsopen(tmpfs)",
    )?;
    for (key, value) in huge_tmpfs_options(size) {
        let step = match key {
            "huge" => "set huge=always",
            "size" => "set its size",
            "nr_inodes" => "set nr_inodes",
            "mode" => "set its mode",
            _ => "set a mount option",
        };
        let key = std::ffi::CString::new(key).expect("a constant without NUL");
        let value = std::ffi::CString::new(value).expect("digits and words have no NUL");
        // SAFETY: fsconfig on our fs context with NUL-terminated key and value.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        owned_status(r, step)?;
    }
    // SAFETY: as above, with no key or value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    owned_status(r, "create the tmpfs")?;
    // SAFETY: fsmount of our configured context; checked by `owned`.
    let mnt = owned(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            )
        },
        "fsmount",
    )?;
    // SAFETY: openat relative to the detached mount's root, with a NUL-terminated path.
    let file = owned(
        unsafe {
            libc::openat(
                mnt.as_raw_fd(),
                c".".as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        }
        .into(),
        "open an unlinked file on it",
    )?;
    let file = File::from(file);
    file.set_len(size).map_err(|source| HugeTmpfsError {
        step: "size the file",
        source,
    })?;
    Ok(file)
}

fn owned_status(ret: libc::c_long, step: &'static str) -> Result<(), HugeTmpfsError> {
    if ret < 0 {
        return Err(HugeTmpfsError {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
