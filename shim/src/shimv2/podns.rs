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
//! from which every mount is detached but `/`, the mounts on the way to the shares
//! directory, and `/proc`: it holds no copy of a node mount that the node would later
//! unmount (a copy would keep its filesystem busy for the pod's life).

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
    /// Makes the namespace; `keep` (the shares directory) and the mounts on the way to
    /// it stay reachable there.
    pub fn new(keep: &Path) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<OwnedFd>>(1);
        let keep = keep.to_path_buf();
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

/// Whether `point` must stay mounted in the pod's namespace: `/`, a mount on the way to
/// `keep`, or `/proc` (a thread reaches descriptors through it, and virtiofsd mounts
/// its own proc, which a user namespace allows only where one is visible).
fn kept(point: &Path, keep: &Path) -> bool {
    keep.starts_with(point) || point.starts_with("/proc")
}

/// The calling thread's part of `PodNs::new`: a namespace of its own, private, with
/// only what the pod needs still mounted. Returns the namespace's descriptor.
fn enter(keep: &Path) -> std::io::Result<OwnedFd> {
    // CLONE_FS first: a thread sharing its root and cwd with others cannot change
    // mount namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| std::io::Error::other(format!("unshare a mount namespace: {e}")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| std::io::Error::other(format!("make the pod's mounts private: {e}")))?;
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
        let keep = Path::new("/run/cocoon/shares");
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
        let ns = PodNs::new(&keep).unwrap();
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
                kept(p, &keep) || p.starts_with(&keep),
                "{} is held",
                p.display()
            );
        }
        // The node can remove the directory the pod has a mount on.
        std::fs::remove_dir(&a).unwrap();
        drop(ns);
    }

    #[test]
    fn a_panicking_job_fails_alone() {
        if !root_or_skip() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let ns = PodNs::new(t.path()).unwrap();
        assert!(ns.run(|| panic!("a job's own bug")).is_err());
        assert_eq!(ns.run(|| 7).unwrap(), 7);
    }
}
