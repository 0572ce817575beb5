//! The jail a pod's VMM (QEMU and its vsock backend, or cocoon-vmm) runs in (`[jail]
//! enabled`): the `cocoon-vmm jail-exec` command line that starts each, and the files
//! and sockets the pod's uid must reach.
//!
//! What QEMU keeps, all at their own paths: `/usr` read-only (QEMU, its libraries,
//! firmware and option ROMs), the links of a merged-/usr host (`/lib` → `usr/lib`),
//! `/etc/ld.so.cache`, the guest kernel and initrd read-only, the directory of its
//! vhost-user sockets, and `/dev/null`, `/dev/zero`, `/dev/urandom` (plus `/dev/kvm`
//! under KVM). Its stdout (the console) and stderr (its messages), both pipes, and the tap are
//! descriptors it inherits. Nothing else of the host exists for it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::identity::PodIdentity;
use super::HypervisorError;

/// Per-pod limits QEMU runs under. No `fsize`: guest RAM is a file QEMU sizes with
/// `ftruncate` (a memfd, or one in the jail's `/guest-ram` tmpfs), which that limit
/// counts (SIGXFSZ at boot). That tmpfs bounds it instead: the guest's RAM and two
/// inodes. QEMU writes no other file; its console and its messages are pipes the shim
/// copies, bounded.
pub const LIMITS: &[&str] = &["nofile=4096", "nproc=512", "core=0"];

/// Directories a merged-/usr host has as links into `/usr`, or as directories otherwise.
const SYSTEM_DIRS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Device nodes QEMU may open (glib and QEMU read random bytes; `-nodefaults` still
/// opens `/dev/null` in places).
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

/// What a jailed pod process (QEMU, the vsock backend) needs from the host.
#[derive(Debug)]
pub struct PodJail<'a> {
    /// The program, at its own path in the jail.
    pub program: &'a Path,
    /// Files and directories it reads (the guest kernel and initrd, socket directories
    /// it connects in).
    pub read_only: Vec<&'a Path>,
    /// Directories it makes sockets in.
    pub writable: Vec<&'a Path>,
    pub identity: &'a PodIdentity,
    pub kvm: bool,
    /// A huge-page tmpfs of the jail's own at this path, with room for this many bytes
    /// of guest RAM (QEMU's `memory-backend-file` makes its file there).
    pub huge_tmpfs: Option<(&'a Path, u64)>,
}

/// Canonical form of a file QEMU is given by path: the jail binds the file itself, so
/// no link may be left in its name.
pub fn canonical(what: &'static str, path: &Path) -> Result<PathBuf, HypervisorError> {
    std::fs::canonicalize(path).map_err(|source| HypervisorError::MissingImage {
        what,
        path: path.into(),
        source,
    })
}

/// A file the pod uid reads must be readable by others: it owns nothing on the host.
pub fn readable_by_others(
    what: &'static str,
    path: &Path,
    uid: u32,
) -> Result<(), HypervisorError> {
    let meta = std::fs::metadata(path).map_err(|source| HypervisorError::MissingImage {
        what,
        path: path.into(),
        source,
    })?;
    if meta.permissions().mode() & 0o004 == 0 {
        return Err(HypervisorError::Jail(format!(
            "the jailed QEMU runs as uid {uid} and cannot read the guest {what} {} (mode {:o}); \
             make it world-readable or set [jail] enabled = false",
            path.display(),
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

/// The group that may open `/dev/kvm`, for a jailed QEMU under KVM.
fn kvm_group(uid: u32) -> Result<u32, HypervisorError> {
    let meta = std::fs::metadata("/dev/kvm")
        .map_err(|e| HypervisorError::NoKvm(format!("/dev/kvm: {e}")))?;
    if meta.mode() & 0o060 == 0o060 && meta.gid() != 0 {
        return Ok(meta.gid());
    }
    Err(HypervisorError::Jail(format!(
        "/dev/kvm is mode {:o} group {}: the jailed QEMU (uid {uid}) could not open it; give \
         it a kvm group with read-write access or set [jail] enabled = false",
        meta.mode() & 0o7777,
        meta.gid()
    )))
}

/// Makes the socket directory (`root:<pod gid>`, 0750) of the pod's vhost-user sockets,
/// which root makes (the shim for the vsock backend and a virtiofsd in a user
/// namespace, virtiofsd itself otherwise) and the pod's uid connects to. No process of
/// the pod can write it, and the shim never connects through it (its own socket to the
/// vsock backend is a listener it made in the root-owned run directory).
pub fn make_socket_dir(dir: &Path, identity: &PodIdentity) -> Result<(), HypervisorError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(dir)
        .map_err(|e| HypervisorError::RunDir(dir.into(), e))?;
    std::os::unix::fs::lchown(dir, None, Some(identity.uid))
        .map_err(|e| HypervisorError::RunDir(dir.into(), e))?;
    // The mode again: mkdir applied the umask.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| HypervisorError::RunDir(dir.into(), e))
}

/// A socket listening at `path` (in the root-owned run directory) for a jailed VMM or
/// backend to accept the shim's connections on (vsock, QMP, cocoon-vmm's API): it
/// inherits the descriptor, so the shim never connects through a path the pod's
/// processes can change.
pub fn unix_listener(path: &Path) -> Result<std::os::unix::net::UnixListener, HypervisorError> {
    std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| HypervisorError::RunDir(path.into(), e))
}

/// Hands a backend's socket to the pod uid, which connects to it (connecting needs
/// write access to the socket). The directory is root's: nobody else can have put a
/// link there, and `lchown` would not follow one anyway.
pub fn give_socket(socket: &Path, identity: &PodIdentity) -> Result<(), HypervisorError> {
    std::os::unix::fs::lchown(socket, Some(identity.uid), Some(identity.uid))
        .map_err(|e| HypervisorError::RunDir(socket.into(), e))
}

impl PodJail<'_> {
    /// `cocoon-vmm jail-exec …  -- <program>`: the program's arguments follow.
    pub fn command_prefix(&self) -> Result<Vec<std::ffi::OsString>, HypervisorError> {
        let uid = self.identity.uid;
        let mut a: Vec<std::ffi::OsString> = vec!["jail-exec".into()];
        let mut keep = |flag: &str, p: &Path| {
            a.push(flag.into());
            a.push(p.into());
        };
        keep("--keep-exec", Path::new("/usr"));
        if !self.program.starts_with("/usr/") {
            keep("--keep-exec", self.program);
        }
        for d in SYSTEM_DIRS {
            let d = Path::new(d);
            match std::fs::read_link(d) {
                Ok(target) => {
                    a.push("--link".into());
                    a.push(format!("{}={}", d.display(), target.display()).into());
                }
                Err(_) if d.is_dir() => {
                    a.push("--keep-exec".into());
                    a.push(d.into());
                }
                Err(_) => {}
            }
        }
        let ld_cache = Path::new("/etc/ld.so.cache");
        if ld_cache.is_file() {
            a.extend(["--keep-ro".into(), ld_cache.into()]);
        }
        for p in &self.read_only {
            a.extend(["--keep-ro".into(), (*p).into()]);
        }
        for p in &self.writable {
            a.extend(["--keep-rw".into(), (*p).into()]);
        }
        for d in DEVICES {
            a.extend(["--keep-dev".into(), (*d).into()]);
        }
        a.extend(["--uid".into(), uid.to_string().into()]);
        a.extend(["--gid".into(), uid.to_string().into()]);
        if self.kvm {
            let group = kvm_group(uid)?;
            a.extend(["--keep-dev".into(), "/dev/kvm".into()]);
            a.extend(["--groups".into(), group.to_string().into()]);
        }
        for l in LIMITS {
            a.extend(["--limit".into(), (*l).into()]);
        }
        if let Some((path, size)) = self.huge_tmpfs {
            a.push("--huge-tmpfs".into());
            a.push(format!("{}={size}", path.display()).into());
        }
        // PID 1 of a PID namespace of its own: no host process to signal or look at.
        a.push("--pid-ns".into());
        a.push("--".into());
        a.push(self.program.into());
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_keeps_only_what_qemu_needs() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinuz");
        let initrd = d.path().join("initrd");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let identity = super::super::identity::allocate(&d.path().join("l"), 7000, 4, "p").unwrap();
        let j = PodJail {
            program: Path::new("/usr/bin/qemu-system-x86_64"),
            read_only: vec![&kernel, &initrd],
            writable: vec![d.path()],
            identity: &identity,
            kvm: false,
            huge_tmpfs: Some((Path::new("/guest-ram"), 256 << 20)),
        };
        let a: Vec<String> = j
            .command_prefix()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            a.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(a[0], "jail-exec");
        assert_eq!(after("--keep-exec")[0], "/usr");
        let ro = after("--keep-ro");
        for p in [&kernel, &initrd] {
            assert!(ro.contains(&p.to_str().unwrap()), "{a:?}");
        }
        assert_eq!(after("--uid"), [identity.uid.to_string()]);
        assert_eq!(after("--gid"), [identity.uid.to_string()]);
        assert!(after("--groups").is_empty() && !a.iter().any(|s| s == "/dev/kvm"));
        assert_eq!(
            &a[a.len() - 3..],
            ["--pid-ns", "--", "/usr/bin/qemu-system-x86_64"]
        );

        assert_eq!(after("--keep-rw"), [d.path().to_str().unwrap()]);
        assert_eq!(after("--huge-tmpfs"), ["/guest-ram=268435456"]);

        // A kernel only root can read is a clear error, before anything starts.
        readable_by_others("kernel", &kernel, identity.uid).unwrap();
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = readable_by_others("kernel", &kernel, identity.uid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel") && err.contains("600"), "{err}");
    }
}
