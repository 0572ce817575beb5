//! A pod's own mount namespace, where its share's mounts live.
//!
//! Under runc a volume's bind lives in the container's mount namespace, so the node
//! can `rmdir` a directory inside the volume that had a mount (Linux then detaches the
//! container's copy). A Cocoon pod's mounts used to live in the node's namespace, in
//! the share virtiofsd exports, where that directory stayed a mount point of the
//! node's own: the `rmdir` failed with EBUSY while the pod ran, and a shim killed
//! before its teardown left its mounts in the node's table.
//!
//! Now each pod's share is mounted in a namespace of the pod's own, held by one thread
//! of the shim (the mount calls run there, in order) and by the pod's virtiofsd, which
//! starts in it. The node sees the share's directories and none of its mounts. What a
//! mount is made of is still taken in the node's namespace, where paths mean what
//! containerd and kubelet meant: a volume's source is cloned there into a detached
//! tree (`open_tree`), the rootfs is mounted there and cloned, and only the attaching
//! (`move_mount`, which needs the target's namespace) and the unmounting happen in the
//! pod's. When the shim and virtiofsd are gone, so is the namespace with every mount
//! in it, however they ended.
//!
//! The namespace starts as a private copy of the node's (nothing propagates in or out),
//! from which every mount is detached but `/`, the mounts on the way to the paths it is
//! told to keep (the shares directory, the virtiofsd binary) and to the system's
//! libraries (virtiofsd is exec'd there), and `/proc`: it holds no copy of a node mount
//! that the node would later unmount (a copy would keep its filesystem busy for the
//! pod's life).
//!
//! A rootfs is mounted by containerd's mount code, which takes paths: `in_scratch_ns`
//! runs it in a throwaway copy of the node's namespace (a slave, so paths mean what they
//! mean on the node and nothing mounted there reaches the node), from which only a
//! detached clone leaves. A shim killed meanwhile leaves nothing in the node's table.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

type Job = Box<dyn FnOnce() + Send>;

/// The pod's mount namespace and the thread that works in it.
pub struct PodNs {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    ns: OwnedFd,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for PodNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodNs(fd {})", self.ns.as_raw_fd())
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the pod's mount namespace thread is gone")
}

impl PodNs {
    /// Makes the namespace; the paths of `keep` (the shares directory, the virtiofsd
    /// binary), those of `SYSTEM` and the mounts on the way to them stay reachable
    /// there. Blocks for a moment per node mount (run it off the async workers).
    pub fn new(keep: &[PathBuf]) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<OwnedFd>>(1);
        // As the mount table spells them (`/var/run` is a link to `/run` on Debian).
        let keep: Vec<PathBuf> = keep
            .iter()
            .map(PathBuf::as_path)
            .chain(SYSTEM.iter().map(Path::new))
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
            .collect();
        let thread = std::thread::Builder::new()
            .name("pod-mount-ns".into())
            .spawn(move || {
                let entered = enter(&keep);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    // A panicking job fails its caller (its reply is dropped), not the
                    // pod's later mounts.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        let ns = match ready_rx.recv() {
            Ok(r) => r,
            Err(_) => Err(gone()),
        };
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            ns,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `f` in the namespace and returns what it returned.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::io::Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.as_ref()
                .ok_or_else(gone)?
                .send(job)
                .map_err(|_| gone())?;
        }
        rx.recv().map_err(|_| gone())
    }

    /// Attaches the detached mount `tree` on the mount point `target` (an `O_PATH`
    /// descriptor of a directory or file in this namespace).
    pub fn attach(&self, tree: OwnedFd, target: OwnedFd) -> std::io::Result<()> {
        self.run(move || super::share::attach(&tree, &target))?
    }

    /// The namespace (an nsfs descriptor), for a child to `setns` into before its exec.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ns.as_fd()
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        // The thread ends with its queue; what is still mounted goes with the namespace
        // once its other holders (virtiofsd) are gone too.
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Never the thread waiting for itself (a job that held the last handle).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Attaches the detached `tree` on `target` in `ns` when there is one, else here.
pub fn attach_in(ns: Option<&PodNs>, tree: OwnedFd, target: OwnedFd) -> std::io::Result<()> {
    match ns {
        Some(ns) => ns.attach(tree, target),
        None => super::share::attach(&tree, &target),
    }
}

/// Runs `f` in `ns` when there is one, else here (in the caller's namespace).
pub fn in_ns<R: Send + 'static>(
    ns: Option<&PodNs>,
    f: impl FnOnce() -> std::io::Result<R> + Send + 'static,
) -> std::io::Result<R> {
    match ns {
        Some(ns) => ns.run(f)?,
        None => f(),
    }
}

/// What a program exec'd in the namespace (virtiofsd) needs: its loader, libraries and
/// the loader's cache, wherever the host mounts them (`/usr` on a partition of its own).
const SYSTEM: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
];

/// Whether `point` must stay mounted in the pod's namespace: `/`, a mount on the way to
/// a path of `keep`, or `/proc` (a thread reaches descriptors through it, and virtiofsd
/// mounts its own proc, which a user namespace allows only where one is visible).
fn kept(point: &Path, keep: &[PathBuf]) -> bool {
    keep.iter().any(|k| k.starts_with(point)) || point.starts_with("/proc")
}

/// Runs `f` on a thread of its own, in a throwaway copy of the caller's mount
/// namespace whose mounts are slaves of the caller's: paths resolve there as here,
/// and what `f` mounts reaches no other namespace and goes when `f` returns (but
/// what it clones detached, with `open_tree`).
pub fn in_scratch_ns<R: Send>(f: impl FnOnce() -> R + Send) -> std::io::Result<R> {
    std::thread::scope(|scope| {
        let t = std::thread::Builder::new()
            .name("scratch-mount-ns".into())
            .spawn_scoped(scope, move || {
                unshare_mounts(MsFlags::MS_SLAVE)?;
                Ok(f())
            })?;
        t.join()
            .map_err(|_| std::io::Error::other("a scratch mount job panicked"))?
    })
}

/// Moves the calling thread into a copy of its mount namespace whose mounts all get
/// `propagation` (private: nothing in or out; slave: the original's changes come in).
fn unshare_mounts(propagation: MsFlags) -> std::io::Result<()> {
    // CLONE_FS too: a thread sharing its root and cwd with others cannot change mount
    // namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| std::io::Error::other(format!("unshare a mount namespace: {e}")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | propagation,
        None::<&str>,
    )
    .map_err(|e| std::io::Error::other(format!("set the new namespace's propagation: {e}")))
}

/// The calling thread's part of `PodNs::new`: a namespace of its own, private, with
/// only what the pod needs still mounted. Returns the namespace's descriptor.
fn enter(keep: &[PathBuf]) -> std::io::Result<OwnedFd> {
    unshare_mounts(MsFlags::MS_PRIVATE)?;
    let table = std::fs::read("/proc/thread-self/mountinfo")?;
    let mut points: Vec<PathBuf> = super::propagation::table::parse(&table)
        .into_iter()
        .map(|m| m.point)
        .filter(|p| !kept(p, keep))
        .collect();
    // Outermost first: a detached mount takes what is below it along.
    points.sort_by_key(|p| p.components().count());
    for p in points {
        match umount2(&p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => tracing::debug!("pod mount namespace: cannot detach {}: {e}", p.display()),
        }
    }
    Ok(nix::fcntl::open(
        "/proc/thread-self/ns/mnt",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_or_skip() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        cocoon_nested::testing::missing("pod mount namespace", "mounting needs root");
        false
    }

    fn mount_points(table: &[u8]) -> Vec<PathBuf> {
        super::super::propagation::table::parse(table)
            .into_iter()
            .map(|m| m.point)
            .collect()
    }

    #[test]
    fn what_is_kept() {
        let keep = &[
            PathBuf::from("/run/cocoon/shares"),
            PathBuf::from("/usr/lib"),
        ];
        for p in [
            "/",
            "/run",
            "/run/cocoon/shares",
            "/proc",
            "/proc/sys/fs/binfmt_misc",
        ] {
            assert!(kept(Path::new(p), keep), "{p}");
        }
        for p in [
            "/run/user/0",
            "/var/lib/kubelet/pods/x",
            "/run/cocoon/shares/p.host",
            "/sys",
        ] {
            assert!(!kept(Path::new(p), keep), "{p}");
        }
    }

    /// A mount made in the namespace is not the node's; one the node makes later does
    /// not reach it; the namespace holds only what it keeps.
    #[test]
    fn the_namespace_is_the_pods_own() {
        if !root_or_skip() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let keep = t.path().join("shares");
        std::fs::create_dir_all(keep.join("a")).unwrap();
        let ns = PodNs::new(std::slice::from_ref(&keep)).unwrap();
        let a = keep.join("a");
        let a2 = a.clone();
        ns.run(move || {
            mount(
                Some("tmpfs"),
                &a2,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
        })
        .unwrap()
        .unwrap();
        let node = std::fs::read("/proc/self/mountinfo").unwrap();
        assert!(
            !mount_points(&node).contains(&a),
            "the node sees the pod's mount"
        );
        let pods = ns
            .run(|| std::fs::read("/proc/thread-self/mountinfo"))
            .unwrap()
            .unwrap();
        let pods = mount_points(&pods);
        assert!(pods.contains(&a), "{pods:?}");
        for p in &pods {
            assert!(
                kept(p, std::slice::from_ref(&keep)) || p.starts_with(&keep) || {
                    // What the system's paths keep.
                    SYSTEM
                        .iter()
                        .any(|s| std::fs::canonicalize(s).is_ok_and(|s| s.starts_with(p)))
                },
                "{} is held",
                p.display()
            );
        }
        // The node can remove the directory the pod has a mount on.
        std::fs::remove_dir(&a).unwrap();
        drop(ns);
    }

    /// What a scratch job mounts never shows in the caller's table; what it clones
    /// detached outlives it.
    #[test]
    fn a_scratch_mount_leaves_only_its_clone() {
        if !root_or_skip() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let stage = t.path().join("stage");
        std::fs::create_dir(&stage).unwrap();
        let s = stage.clone();
        let clone = in_scratch_ns(move || -> std::io::Result<OwnedFd> {
            mount(
                Some("tmpfs"),
                &s,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )?;
            std::fs::write(s.join("f"), "staged")?;
            let node = std::fs::read("/proc/self/mountinfo")?;
            assert!(
                !mount_points(&node).contains(&s),
                "the process's table has the scratch mount"
            );
            super::super::share::open_tree(&s, false)
        })
        .unwrap()
        .unwrap();
        let node = std::fs::read("/proc/self/mountinfo").unwrap();
        assert!(!mount_points(&node).contains(&stage));
        assert!(!stage.join("f").exists(), "the stage kept the mount");
        let f = nix::fcntl::openat(
            &clone,
            "f",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(f), &mut text).unwrap();
        assert_eq!(text, "staged");
    }

    #[test]
    fn a_panicking_job_fails_alone() {
        if !root_or_skip() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let ns = PodNs::new(&[t.path().to_path_buf()]).unwrap();
        assert!(ns.run(|| panic!("a job's own bug")).is_err());
        assert_eq!(ns.run(|| 7).unwrap(), 7);
    }
}
