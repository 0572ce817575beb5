//! A user namespace of the pod's own, for virtiofsd: it runs as root of that namespace
//! only, and sees the pod's files through idmapped mounts made with the same mapping.
//!
//! virtiofsd serves files of every owner (the guest's root owns most of a rootfs), so it
//! needs `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_FOWNER` and `CAP_SETUID` over them. As
//! root of a namespace that maps ids `0..count` to the host range `base..base + count`,
//! it has those capabilities only over inodes whose owners are in that range, and it is
//! host uid `base` everywhere else: it cannot signal or trace another host process,
//! load a module, or touch a host file that is not in the pod's share. Every mount of
//! the share (its read-only structure, each rootfs, each volume) is idmapped with the
//! same mapping, so a file owned by uid `n` on disk shows as `base + n` there, that is
//! as `n` in virtiofsd's namespace: the guest sees the owners it wrote, and what the
//! guest writes as `n` lands on disk as `n`. A file whose owner is `count` or more shows
//! as the overflow id (65534) and cannot be chowned or written through the share.
//!
//! A container with a user namespace of its own (`ctr run --uidmap 0:100000:65536`) runs
//! over a rootfs whose files containerd gave host ids beyond that range (100000 and up).
//! The guest must see those owners as they are, so that the container's root (guest
//! uid 100000, as under runc) owns its rootfs: such a pod's namespace maps each of
//! those host ranges as well, as itself inside, onto a further range of the pod's own
//! outside (`Extent`). The first container of the pod names them; a later one that
//! needs others is refused.
//!
//! The namespace is made once per pod by a throwaway child (a process cannot write its
//! own namespace's mapping to ids it does not hold): the shim, root on the host, writes
//! the maps, keeps a descriptor of the namespace and lets the child go.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

use super::identity::PodIdentity;
use super::HypervisorError;

/// The ids each pod's namespace maps: the 16-bit range most images keep to.
pub const IDS_PER_POD: u32 = 65_536;

/// One pod's user namespace: ids `0..count` inside are `host_base..` outside, and
/// each of `extra` maps a range of its own.
#[derive(Debug)]
pub struct PodUserns {
    fd: OwnedFd,
    pub host_base: u32,
    pub count: u32,
    pub extra: Vec<Extent>,
    /// The pod's hold on its ranges, when they were allocated here.
    _ranges: Vec<PodIdentity>,
}

/// Ids `inside..inside + count` of a namespace are `outside..` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

impl PodUserns {
    /// Takes a range of ids no other live pod holds (one of `ranges` ranges of
    /// `IDS_PER_POD` from `id_base`, held through `lock_file` as `identity` holds uids)
    /// and makes the namespace that maps it; plus one more range for each of `also`
    /// (a start and a count of at most `IDS_PER_POD` ids, beyond the first range's ids),
    /// which the namespace maps as themselves inside.
    pub fn for_pod(
        lock_file: &std::path::Path,
        id_base: u32,
        ranges: u32,
        seed: &str,
        also: &[(u32, u32)],
    ) -> Result<Self, HypervisorError> {
        let mut held = Vec::new();
        let mut outside = Vec::new();
        for i in 0..=also.len() {
            let (range, base) =
                Self::take_range(lock_file, id_base, ranges, &format!("{seed}/{i}"))?;
            held.push(range);
            outside.push(base);
        }
        let extra: Vec<Extent> = also
            .iter()
            .zip(&outside[1..])
            .map(|(&(inside, count), &outside)| Extent {
                inside,
                outside,
                count,
            })
            .collect();
        let mut ns =
            Self::create_with(outside[0], IDS_PER_POD, &extra).map_err(HypervisorError::Userns)?;
        ns._ranges = held;
        Ok(ns)
    }

    fn take_range(
        lock_file: &std::path::Path,
        id_base: u32,
        ranges: u32,
        seed: &str,
    ) -> Result<(PodIdentity, u32), HypervisorError> {
        use super::identity::IdentityError;
        let range = super::identity::allocate(lock_file, 0, ranges, seed).map_err(|e| match e {
            IdentityError::Exhausted { count, .. } => {
                HypervisorError::Userns(std::io::Error::other(format!(
                    "all {count} share id ranges are held by live pods; widen [jail] share_ranges"
                )))
            }
            e => e.into(),
        })?;
        let host_base = u64::from(id_base) + u64::from(range.uid) * u64::from(IDS_PER_POD);
        let host_base = u32::try_from(host_base).map_err(|_| {
            HypervisorError::Userns(std::io::Error::other(format!(
                "range {} from {id_base} passes 2^32",
                range.uid
            )))
        })?;
        Ok((range, host_base))
    }

    /// Whether the namespace maps the host ids `start..start + count` (of a container's
    /// own user namespace) as themselves.
    pub fn covers(&self, start: u32, count: u32) -> bool {
        let extent = Extent {
            inside: 0,
            outside: start,
            count,
        };
        count == 0 || compose(&[extent], &self.extents().collect::<Vec<_>>()).is_ok()
    }

    /// Creates the namespace. Needs `CAP_SETUID` and `CAP_SETGID` on the host (root).
    pub fn create(host_base: u32, count: u32) -> std::io::Result<Self> {
        Self::create_with(host_base, count, &[])
    }

    /// A namespace of `IDS_PER_POD` ids from `host_base` plus `extra`, for tests.
    #[cfg(test)]
    pub fn create_for_test(host_base: u32, extra: &[Extent]) -> std::io::Result<Self> {
        Self::create_with(host_base, IDS_PER_POD, extra)
    }

    /// Creates the namespace with `extra` extents beside `0..count`.
    fn create_with(host_base: u32, count: u32, extra: &[Extent]) -> std::io::Result<Self> {
        let first = Extent {
            inside: 0,
            outside: host_base,
            count,
        };
        let all: Vec<Extent> = std::iter::once(first)
            .chain(extra.iter().copied())
            .collect();
        // The jail's namespace never maps the host's root.
        if all.iter().any(|e| e.outside == 0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a pod's share namespace may not map host root",
            ));
        }
        Ok(Self {
            fd: mapped_namespace(&all, &all)?,
            host_base,
            count,
            extra: extra.to_vec(),
            _ranges: Vec::new(),
        })
    }

    /// Every extent of the namespace's mapping, its first range first.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        std::iter::once(Extent {
            inside: 0,
            outside: self.host_base,
            count: self.count,
        })
        .chain(self.extra.iter().copied())
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Idmaps the detached mount `tree` (from `open_tree(OPEN_TREE_CLONE)`), and the
    /// mounts below it when `recursive`, with this namespace's mapping. Fails on a
    /// filesystem that does not support idmapped mounts, or a mount already idmapped.
    ///
    /// Not every filesystem can be idmapped (overlayfs, NFS, CIFS, procfs: `EINVAL`);
    /// the error then names the filesystem and the ways out.
    pub fn idmap(&self, tree: BorrowedFd<'_>, recursive: bool) -> std::io::Result<()> {
        idmap_with(self.fd(), tree, recursive).map_err(jail_hint)
    }

    /// A container's id mapping (`inside` its ids, `outside` the host ids it names)
    /// followed by this namespace's: for each container id, the host id this namespace
    /// shows as the one the container's mapping names. An idmapped mount made with the
    /// result shows a file the container's id `n` owns on disk as what virtiofsd, in
    /// this namespace, serves as the container mapping's id for `n`. Fails naming
    /// the first host id the namespace does not map.
    pub fn compose(&self, container: &[Extent]) -> Result<Vec<Extent>, String> {
        compose(container, &self.extents().collect::<Vec<_>>())
    }

    /// Makes `cmd`'s child root of this namespace before it executes: it joins the
    /// namespace, drops every supplementary group and takes uid and gid 0 there (host
    /// `host_base`), with the namespace's full capability set and none on the host, in
    /// IPC and UTS namespaces of its own (virtiofsd makes its own mount, PID and network
    /// namespaces). Its limits are set first, while it can still raise them: `nofile`
    /// descriptors (capped at the hard limit where the host's root may not raise it),
    /// `NPROC` processes and threads of its uid, no core dumps. The parent-death signal,
    /// which a change of credentials clears, is set again.
    pub fn enter_as_root(&self, cmd: &mut tokio::process::Command, nofile: u64) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (setrlimit, getrlimit, setns, unshare, setgroups,
        // setresgid, setresuid, prctl); the descriptor outlives the spawn (the caller
        // borrows self).
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                let mut lim = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                // Without CAP_SYS_RESOURCE (some sandboxed hosts) the hard limit is
                // what there is.
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0
                    && (libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || {
                        lim.rlim_cur = lim.rlim_max.min(nofile);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0
                    })
                {
                    return fail();
                }
                for (resource, n) in [(libc::RLIMIT_NPROC, NPROC), (libc::RLIMIT_CORE, 0)] {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return fail();
                    }
                }
                if libc::setns(fd, libc::CLONE_NEWUSER) != 0
                    || libc::unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) != 0
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(0, 0, 0) != 0
                    || libc::setresuid(0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
    }
}

/// An idmap refused for the filesystem, with the ways out of the jail that needs it.
pub fn jail_hint(e: std::io::Error) -> std::io::Error {
    if e.kind() != std::io::ErrorKind::Unsupported {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        format!(
            "{e}: the pod's virtiofsd runs jailed in a user namespace ([jail] virtiofsd = \
             true) and sees only idmapped mounts; keep the path on ext4, xfs, btrfs or \
             tmpfs (from Linux 6.3), or run the pod under a handler whose config turns \
             that jail off"
        ),
    )
}

/// `first` followed by `then`: each extent of `first` maps its ids onto ids `then`
/// maps further, split where `then`'s extents split.
pub fn compose(first: &[Extent], then: &[Extent]) -> Result<Vec<Extent>, String> {
    let mut out = Vec::new();
    for e in first {
        let end = u64::from(e.outside) + u64::from(e.count);
        let mut at = u64::from(e.outside);
        while at < end {
            let Some(t) = then.iter().find(|t| {
                u64::from(t.inside) <= at && at < u64::from(t.inside) + u64::from(t.count)
            }) else {
                return Err(format!(
                    "host id {at} (of ids {}..{end}) is not one the pod's share maps",
                    e.outside
                ));
            };
            let n = end.min(u64::from(t.inside) + u64::from(t.count)) - at;
            // Within u32: every value is inside one of the two extents.
            out.push(Extent {
                inside: (u64::from(e.inside) + at - u64::from(e.outside)) as u32,
                outside: (u64::from(t.outside) + at - u64::from(t.inside)) as u32,
                count: n as u32,
            });
            at += n;
        }
    }
    Ok(out)
}

/// A new user namespace with these uid and gid mappings (no more than the kernel's
/// 340 lines each), made by a throwaway child; a descriptor of it. Needs
/// `CAP_SETUID` and `CAP_SETGID` on the host (root).
pub fn mapped_namespace(uids: &[Extent], gids: &[Extent]) -> std::io::Result<OwnedFd> {
    let text = |extents: &[Extent]| -> std::io::Result<String> {
        let mut lines = String::new();
        for e in extents {
            let wraps = |x: u32| x.checked_add(e.count).is_none();
            if e.count == 0 || wraps(e.outside) || wraps(e.inside) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the id range {} + {} is empty or wraps", e.outside, e.count),
                ));
            }
            lines.push_str(&format!("{} {} {}\n", e.inside, e.outside, e.count));
        }
        if extents.is_empty() || extents.len() > 340 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} id mappings (1 to 340 may be given)", extents.len()),
            ));
        }
        Ok(lines)
    };
    let (uid_lines, gid_lines) = (text(uids)?, text(gids)?);
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the child calls only async-signal-safe functions (close, unshare,
    // write, read, _exit) and touches no memory the parent's other threads change.
    match unsafe { fork() }? {
        // SAFETY: in the forked child: raw syscalls on descriptors it owns, then
        // _exit; nothing that allocates or takes a lock.
        ForkResult::Child => unsafe {
            libc::close(ready_r.as_raw_fd());
            libc::close(hold_w.as_raw_fd());
            let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
            // Until the parent has the namespace and closes its end.
            let mut b = 0u8;
            libc::read(hold_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        },
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(hold_r);
            let made = map_child(child.as_raw(), ready_r, &uid_lines, &gid_lines);
            // The child reads end-of-file and exits.
            drop(hold_w);
            let _ = waitpid(child, None);
            made
        }
    }
}

fn map_child(pid: i32, ready: OwnedFd, uids: &str, gids: &str) -> std::io::Result<OwnedFd> {
    let mut ok = [0u8];
    std::fs::File::from(ready).read_exact(&mut ok)?;
    if ok[0] != 1 {
        return Err(std::io::Error::other(
            "the kernel refused a new user namespace (user.max_user_namespaces, or a \
             sandbox that forbids them)",
        ));
    }
    for (map, lines) in [("uid_map", uids), ("gid_map", gids)] {
        // One write: the kernel takes a map whole or not at all.
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/{map}"))?
            .write_all(lines.as_bytes())
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("{map} {:?}: {e}", lines.trim_end()))
            })?;
    }
    Ok(std::fs::File::open(format!("/proc/{pid}/ns/user"))?.into())
}

/// Idmaps the detached mount `tree` (from `open_tree(OPEN_TREE_CLONE)`), and the
/// mounts below it when `recursive`, with the mapping of the user namespace `userns`.
/// Fails on a filesystem that does not support idmapped mounts (the error then names
/// the filesystem and the ways out), or a mount already idmapped.
pub fn idmap_with(
    userns: BorrowedFd<'_>,
    tree: BorrowedFd<'_>,
    recursive: bool,
) -> std::io::Result<()> {
    set_attr(tree, libc::MOUNT_ATTR_IDMAP, userns.as_raw_fd(), recursive).map_err(|e| {
        if e.raw_os_error() != Some(libc::EINVAL) {
            return e;
        }
        let below = if recursive {
            " (or a mount beneath it)"
        } else {
            ""
        };
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "its filesystem{below} cannot be idmapped ({})",
                filesystem_name(tree)
            ),
        )
    })
}

/// The kind of filesystem `fd` is on, by `fstatfs`'s magic number.
fn filesystem_name(fd: BorrowedFd<'_>) -> String {
    let Ok(st) = nix::sys::statfs::fstatfs(fd) else {
        return "unknown filesystem".into();
    };
    let magic = st.filesystem_type().0 as u64;
    let name = match magic {
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0xff53_4d42 => "cifs",
        0xfe53_4d42 => "smb2",
        0x6573_5546 => "fuse",
        0x0102_1997 => "9p",
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x7363_6673 => "securityfs",
        _ => return format!("filesystem magic {magic:#x}"),
    };
    name.into()
}

/// Processes and threads the namespace's root may have (its host uid is the pod's
/// own): virtiofsd needs a few per queue.
pub const NPROC: u64 = 512;

/// `mount_setattr(2)` on the detached mount `tree`: sets `attr` (with the user
/// namespace `userns` for `MOUNT_ATTR_IDMAP`), below it too when `recursive`.
pub fn set_attr(
    tree: BorrowedFd<'_>,
    attr: u64,
    userns: i32,
    recursive: bool,
) -> std::io::Result<()> {
    mount_setattr(tree, attr, 0, userns, recursive)
}

/// `mount_setattr(2)` on the detached mount `tree`: sets `attr` and the propagation type
/// `propagation` (`MS_PRIVATE` and the like; 0 leaves it), below it too when `recursive`.
pub fn mount_setattr(
    tree: BorrowedFd<'_>,
    attr: u64,
    propagation: u64,
    userns: i32,
    recursive: bool,
) -> std::io::Result<()> {
    let a = libc::mount_attr {
        attr_set: attr,
        attr_clr: 0,
        propagation,
        userns_fd: if userns >= 0 { userns as u64 } else { 0 },
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr reads `a` (of the size passed) and the empty path; both
    // outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &a as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(inside: u32, outside: u32, count: u32) -> Extent {
        Extent {
            inside,
            outside,
            count,
        }
    }

    /// A container's mapping followed by a jailed pod's: split where the pod's extents
    /// split; an id the pod does not map is named.
    #[test]
    fn mappings_compose_across_extents() {
        let pod = [e(0, 1_000_000, 65_536), e(196_608, 2_000_000, 65_536)];
        assert_eq!(
            compose(&[e(0, 196_608, 65_536)], &pod),
            Ok(vec![e(0, 2_000_000, 65_536)])
        );
        // critest's 0:1000:100000 with the part above the first range mapped as
        // another extent.
        let pod = [e(0, 1_000_000, 65_536), e(65_536, 3_000_000, 35_464)];
        assert_eq!(
            compose(&[e(0, 1000, 100_000)], &pod),
            Ok(vec![e(0, 1_001_000, 64_536), e(64_536, 3_000_000, 35_464)])
        );
        let err = compose(&[e(0, 1000, 100_001)], &pod).unwrap_err();
        assert!(err.contains("host id 101000"), "{err}");
    }

    fn root_or_fail(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        cocoon_nested::testing::missing(what, "a user namespace's mapping needs root");
        false
    }

    #[test]
    fn the_namespace_maps_the_range_it_was_given() {
        if !root_or_fail("userns") {
            return;
        }
        let ns = PodUserns::create(1_500_000_000, IDS_PER_POD).unwrap();
        let path = format!("/proc/self/fd/{}", ns.fd().as_raw_fd());
        let link = std::fs::read_link(&path).unwrap();
        assert!(link.to_string_lossy().starts_with("user:["), "{link:?}");
        assert_ne!(
            link,
            std::fs::read_link("/proc/self/ns/user").unwrap(),
            "a new namespace, not ours"
        );
    }

    /// A pod whose first container has a user namespace of its own maps that
    /// container's host ids as themselves, and no others beyond its own range.
    #[test]
    fn extra_extents_map_a_containers_host_ids() {
        if !root_or_fail("userns") {
            return;
        }
        let extra = [Extent {
            inside: 100_000,
            outside: 1_500_131_072,
            count: IDS_PER_POD,
        }];
        let ns = PodUserns::create_with(1_500_065_536, IDS_PER_POD, &extra).unwrap();
        assert!(ns.covers(0, IDS_PER_POD));
        assert!(ns.covers(100_000, IDS_PER_POD));
        assert!(ns.covers(120_000, 10));
        assert!(!ns.covers(100_000, IDS_PER_POD + 1));
        assert!(!ns.covers(200_000, 1));
        assert!(!ns.covers(65_000, 1_000));
        // A range longer than one extent, split into touching ones.
        let split = [
            Extent {
                inside: 200_000,
                outside: 1_500_196_608,
                count: IDS_PER_POD,
            },
            Extent {
                inside: 265_536,
                outside: 1_500_262_144,
                count: 34_464,
            },
        ];
        let long = PodUserns::create_with(1_500_065_536, IDS_PER_POD, &split).unwrap();
        assert!(long.covers(200_000, 100_000));
        assert!(!long.covers(200_000, 100_001));
        // Overlapping extents are the kernel's to refuse, and the error says so.
        let twice = [extra[0], extra[0]];
        assert!(PodUserns::create_with(1_500_065_536, IDS_PER_POD, &twice).is_err());
    }

    /// A child that entered is root of the namespace and the range's first id on the
    /// host, with every capability there and none on the host.
    #[tokio::test]
    async fn a_child_enters_as_root_of_the_namespace_only() {
        if !root_or_fail("userns") {
            return;
        }
        let ns = PodUserns::create(1_500_065_536, IDS_PER_POD).unwrap();
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args(["-c", "id -u; id -g; id -G; grep -E '^(Uid|CapEff)' /proc/self/status; cat /proc/self/uid_map; sleep 0.5"]);
        ns.enter_as_root(&mut cmd, 4096);
        cmd.stdout(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        // Seen from the host, while it runs.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let out = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..3], ["0", "0", "0"], "{text}");
        assert!(text.contains("CapEff:\t000001ffffffffff"), "{text}");
        assert!(text.contains("1500065536"), "{text}");
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uid.split_whitespace().nth(1),
            Some("1500065536"),
            "{status}"
        );
    }

    #[test]
    fn a_range_with_root_or_wrapping_is_refused() {
        assert!(PodUserns::create(0, 10).is_err());
        assert!(PodUserns::create(u32::MAX - 5, 10).is_err());
        assert!(PodUserns::create(100, 0).is_err());
    }
}
