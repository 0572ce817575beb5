//! Guest RAM with 2 MiB pages on either VMM.
//!
//! Guest RAM is shared memory (vhost-user backends map it), and a memfd gets transparent
//! huge pages only where the node's shmem THP policy allows (distributions leave it at
//! `never`). A tmpfs mounted `huge=always` gets them whatever that policy says
//! (`cocoon_vmm::vstate::ram_file`). Without them every first touch of a 4 KiB guest page
//! is a host page fault: under TCG a QEMU boot on a memfd took ≈ 40 ms longer than the
//! same boot on anonymous memory (which QEMU madvises for THP), and ≈ 20 ms longer than
//! on a huge-page tmpfs (docs/notes.md, fiftieth session). Under hardware KVM the same
//! pages are also what lets the EPT map guest RAM in 2 MiB entries.
//!
//! - cocoon-vmm, jailed as a pod uid, cannot mount: the shim makes the file (a detached
//!   tmpfs of its own) and hands it over.
//! - QEMU takes guest RAM by path (`memory-backend-file`), not by descriptor. Jailed, it
//!   makes its file in a tmpfs `jail-exec --huge-tmpfs` mounts in its jail, gone with the
//!   jail's mount namespace. Unjailed, the shim makes the file as for cocoon-vmm and QEMU
//!   opens it again through `/proc/self/fd`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use cocoon_vmm::vstate::ram_file::huge_tmpfs_file;

use super::HypervisorError;
use crate::config::HugePages;

/// Where a jailed QEMU's guest-RAM tmpfs is mounted in its jail.
pub const JAIL_RAM_DIR: &str = "/guest-ram";

/// A `size`-byte file on a huge-page tmpfs of its own, as `mode` asks: `None` where
/// `mode` is off, or `auto` and the tmpfs cannot be made (logged: the VMM then uses a
/// memfd). `on` makes that an error.
pub fn huge_file(mode: HugePages, size: u64, id: &str) -> Result<Option<File>, HypervisorError> {
    if mode == HugePages::Off {
        return Ok(None);
    }
    match huge_tmpfs_file(size) {
        Ok(file) => Ok(Some(file)),
        Err(e) => {
            let why = format!("{e}: {}", e.source);
            if mode == HugePages::On {
                return Err(HypervisorError::HugePages(why));
            }
            tracing::warn!(
                id,
                "guest RAM: a memfd, huge pages only as the host's shmem THP \
                allows ({why})"
            );
            Ok(None)
        }
    }
}

/// Where a QEMU VM's guest RAM lives.
#[derive(Debug)]
pub enum QemuRam {
    /// A memfd QEMU makes (`vm.huge_pages = "off"`, or no huge-page tmpfs here).
    Memfd,
    /// A file QEMU makes in the huge-page tmpfs its jail mounts at [`JAIL_RAM_DIR`].
    JailTmpfs,
    /// The shim's file on a huge-page tmpfs, inherited by an unjailed QEMU.
    Inherited(File),
}

impl QemuRam {
    /// Chooses guest RAM of `size` bytes for a QEMU that is `jailed` or not, as `mode`
    /// asks. For a jailed QEMU a 2 MiB file tries the tmpfs out here, so that `auto`
    /// can still fall back to a memfd and `on` fails before anything starts.
    pub fn choose(
        mode: HugePages,
        size: u64,
        jailed: bool,
        id: &str,
    ) -> Result<Self, HypervisorError> {
        let probe = if jailed { 2 << 20 } else { size };
        Ok(match huge_file(mode, probe, id)? {
            None => Self::Memfd,
            Some(_) if jailed => Self::JailTmpfs,
            Some(file) => Self::Inherited(file),
        })
    }

    /// QEMU's `-object` for guest RAM of `mem` (QEMU's size syntax, `256M`), id `mem`.
    /// `align=2M`: QEMU maps a file at the alignment of its page size (4 KiB on a
    /// tmpfs), and a huge page can only be mapped at a 2 MiB-aligned address.
    pub fn backend(&self, mem: &str) -> String {
        let file = |path: &str| {
            format!("memory-backend-file,id=mem,size={mem},share=on,mem-path={path},align=2M")
        };
        match self {
            Self::Memfd => format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            Self::JailTmpfs => file(JAIL_RAM_DIR),
            Self::Inherited(f) => file(&format!("/proc/self/fd/{}", f.as_raw_fd())),
        }
    }

    /// The tmpfs `jail-exec` mounts for this RAM, for a jailed QEMU.
    pub fn jail_tmpfs(&self, size: u64) -> Option<(&'static Path, u64)> {
        matches!(self, Self::JailTmpfs).then_some((Path::new(JAIL_RAM_DIR), size))
    }

    /// The descriptor an unjailed QEMU inherits.
    pub fn inherited_fd(&self) -> Option<i32> {
        match self {
            Self::Inherited(f) => Some(f.as_raw_fd()),
            _ => None,
        }
    }

    /// For the logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Memfd => "a memfd",
            Self::JailTmpfs => "a huge-page tmpfs in QEMU's jail",
            Self::Inherited(_) => "a huge-page tmpfs of its own",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_is_a_memfd_whatever_the_host_can_do() {
        let ram = QemuRam::choose(HugePages::Off, 64 << 20, false, "t").unwrap();
        assert!(matches!(ram, QemuRam::Memfd));
        assert_eq!(
            ram.backend("64M"),
            "memory-backend-memfd,id=mem,size=64M,share=on"
        );
        assert_eq!(ram.jail_tmpfs(64 << 20), None);
        assert_eq!(ram.inherited_fd(), None);
    }

    #[test]
    fn a_jailed_qemu_makes_its_file_in_the_jails_tmpfs() {
        let ram = QemuRam::JailTmpfs;
        assert_eq!(
            ram.backend("256M"),
            "memory-backend-file,id=mem,size=256M,share=on,mem-path=/guest-ram,align=2M"
        );
        assert_eq!(
            ram.jail_tmpfs(256 << 20),
            Some((Path::new("/guest-ram"), 256 << 20))
        );
    }

    /// The shim runs as root and the host has tmpfs with THP: both modes that ask for
    /// huge pages get a file, which an unjailed QEMU opens through /proc/self/fd.
    #[test]
    fn an_unjailed_qemu_opens_the_shims_file() {
        if !nix::unistd::geteuid().is_root() && std::env::var_os("CI").is_none() {
            eprintln!("SKIPPED: making a tmpfs needs root");
            return;
        }
        for mode in [HugePages::Auto, HugePages::On] {
            let ram = QemuRam::choose(mode, 8 << 20, false, "t").unwrap();
            let fd = ram.inherited_fd().expect("a file of the shim's");
            assert_eq!(
                ram.backend("8M"),
                format!(
                    "memory-backend-file,id=mem,size=8M,share=on,mem-path=/proc/self/fd/{fd},\
                     align=2M"
                )
            );
            let QemuRam::Inherited(f) = &ram else {
                unreachable!()
            };
            assert_eq!(f.metadata().unwrap().len(), 8 << 20);
            let jailed = QemuRam::choose(mode, 8 << 20, true, "t").unwrap();
            assert!(matches!(jailed, QemuRam::JailTmpfs));
        }
    }
}
