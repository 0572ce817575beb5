//! The node's record of each pod VM's host resources, `<run_dir>/pods/<vm id>.json`,
//! held by the shim that runs the pod for as long as it does.
//!
//! The bundle's state file (`persist`) serves containerd's `shim delete`, which runs
//! only for tasks containerd still knows. Once a pod's last container is deleted no
//! bundle names the VM, and a shim killed before its teardown ended (between that
//! Delete and containerd's Shutdown, or during a Shutdown) left the pod's share, run
//! directory and host cgroup behind for good. Its VM's processes die with it
//! (`PR_SET_PDEATHSIG`); what is on disk does not.
//!
//! The shim holds an exclusive `flock` on its pod's record while it runs the pod, and
//! the kernel drops the lock as the shim dies, however it dies: a record nobody holds
//! is a pod nobody will tear down. Each shim sweeps those as it starts serving, and a
//! pod's boot undoes an unheld record of its own id before it makes anything. The lock,
//! not a pid, says who owns a pod: there is no window in which a dead owner looks alive
//! or a recycled pid looks like the owner.
//!
//! The records' directory is the shim's (root, 0700, beside the VMs' run directories):
//! no VM process writes there. The paths undone are derived from the VM id in the
//! record's name, not read from it; only the VM's pids (killed only when their command
//! line names the VM's run dir or share) and its cgroup directories (only under the
//! cgroup root) come from the record.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::persist::{is_vm_process, ContainerState};

/// The records' directory under the shim's run root.
pub const DIR: &str = "pods";
/// A record is a few hundred bytes; one larger than this is not ours.
const MAX_RECORD: u64 = 64 * 1024;

/// A pod's record, locked by the shim running the pod.
pub struct Held {
    file: Flock<File>,
    path: PathBuf,
    /// Bytes written so far: a rewrite pads over them.
    len: usize,
    /// The process that undoes the pod if this shim dies first (`janitor`): dismissed
    /// once the record is gone. Declared after `file`: dropped, the lock goes first.
    janitor: Option<super::janitor::Janitor>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("path", &self.path).finish()
    }
}

impl Held {
    /// Takes the record of `vm_id` for this shim. An unheld record of the same id is a
    /// dead shim's pod: what it names is undone first. A record held by another process
    /// (a sweep under way, the teardown of an earlier pod of this id) is waited for,
    /// up to `wait`.
    pub fn take(run_root: &Path, vm_id: &str, wait: Duration) -> std::io::Result<Held> {
        let path = records_dir(run_root)?.join(format!("{vm_id}.json"));
        let until = Instant::now() + wait;
        loop {
            let file = open(&path, true)?;
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, Errno::EWOULDBLOCK)) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "{} is still held by another process after {wait:?}",
                            path.display()
                        ),
                    ))
                }
                Err((_, e)) => return Err(e.into()),
            };
            // A sweep that held it may have removed it: lock the file that is there now.
            if !still_linked(&file, &path) {
                continue;
            }
            if file.metadata()?.len() > 0 {
                tracing::warn!(
                    vm = vm_id,
                    "a dead shim's pod of this id left things behind: undoing them"
                );
                undo(run_root, vm_id, &file);
            }
            return Ok(Held {
                file,
                path,
                len: 0,
                janitor: None,
            });
        }
    }

    /// Records `st` (the pod's VM: pids, cgroup directories). In place, in one write,
    /// padded over what was there: the lock is on this file (a rename would leave it
    /// behind), and a shim killed at any point must leave a record that parses.
    pub fn write(&mut self, st: &ContainerState) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(st)?;
        if text.len() < self.len {
            text.resize(self.len, b' ');
        }
        self.file.write_all_at(&text, 0)?;
        self.len = text.len();
        Ok(())
    }

    /// A descriptor of this very record, of its own (unlocked: the lock stays this
    /// one's), for the janitor: a path opened later might name the record of a new pod
    /// of the same id.
    pub fn watch_copy(&self) -> std::io::Result<File> {
        use std::os::fd::AsRawFd;
        File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Has `janitor` undo the pod should this shim die before `release`.
    pub fn watched_by(&mut self, janitor: super::janitor::Janitor) {
        self.janitor = Some(janitor);
    }

    /// The pid of the pod's janitor, if it has one.
    pub fn janitor_pid(&self) -> Option<u32> {
        self.janitor.as_ref().map(|j| j.pid())
    }

    /// The pod is gone, all of it: so is its record, and then its janitor's watch.
    pub fn release(mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
        if let Some(j) = self.janitor.take() {
            j.dismiss();
        }
    }
}

/// What a janitor found once its shim let go of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterOwner {
    /// The record is gone: the shim tore its pod down.
    Released,
    /// The record was still there and nobody held it: the shim died first. Its pod is
    /// undone.
    Undone,
    /// Someone still held it after the wait (a sweep under way): theirs to finish.
    StillHeld,
}

/// `record` (a `Held::watch_copy`, made while its shim held it) once that shim let go of
/// the janitor: released if its file is gone; else, once unheld (the dying shim's
/// descriptors close within `wait`), a dead shim's pod, undone like a sweep would.
pub fn undo_if_abandoned(run_root: &Path, vm_id: &str, record: File, wait: Duration) -> AfterOwner {
    let path = run_root.join(DIR).join(format!("{vm_id}.json"));
    if !still_linked(&record, &path) {
        return AfterOwner::Released;
    }
    let until = Instant::now() + wait;
    let mut file = record;
    let locked = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => break f,
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < until => {
                file = f;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return AfterOwner::StillHeld,
        }
    };
    if !still_linked(&locked, &path) {
        return AfterOwner::Released;
    }
    undo(run_root, vm_id, &locked);
    let _ = std::fs::remove_file(&path);
    AfterOwner::Undone
}

/// Undoes what each record nobody holds names: pods whose shim died before its
/// teardown ended. Returns their VM ids.
pub fn sweep(run_root: &Path) -> Vec<String> {
    let dir = run_root.join(DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(vm_id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !is_vm_id(vm_id) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = open(&path, false) else {
            continue;
        };
        // Held: a live shim's pod, or another sweep's.
        let Ok(file) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if !still_linked(&file, &path) {
            continue;
        }
        undo(run_root, vm_id, &file);
        let _ = std::fs::remove_file(&path);
        swept.push(vm_id.to_string());
    }
    swept
}

/// Kills what is left of a VM's processes (`pids`, those that are provably its), waits
/// for them (bounded), then removes its share, run directory and cgroup directories.
pub fn undo_vm(run_dir: &Path, share: &Path, pids: &[u32], cgroups: &[PathBuf]) {
    use nix::sys::signal::{kill, Signal};
    let marks = [run_dir, share];
    for pid in pids {
        if is_vm_process(*pid, &marks) {
            let _ = kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
    // SIGKILL (ours, or PR_SET_PDEATHSIG's when the shim died) takes a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| is_vm_process(*p, &marks)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !share.as_os_str().is_empty() {
        super::share::remove(share, None);
    }
    if !run_dir.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(run_dir);
    }
    crate::hostcgroup::remove_dirs(cgroups);
}

/// Undoes the pod of an unheld record. A record that does not parse (empty: its shim
/// died before the first write) still names the run dir and share, by its VM id.
fn undo(run_root: &Path, vm_id: &str, file: &File) {
    let mut text = Vec::new();
    let _ = file.take(MAX_RECORD).read_to_end(&mut text);
    let st: ContainerState = serde_json::from_slice(&text).unwrap_or_default();
    let (pids, cgroups) = if st.vm_id == vm_id {
        (st.vm_pids, st.host_cgroup)
    } else {
        Default::default()
    };
    undo_vm(
        &run_root.join(vm_id),
        &run_root.join("shares").join(vm_id),
        &pids,
        &cgroups,
    );
}

/// `pod-` and hex, as `sandbox::vm_id` makes them: a name that cannot climb out.
pub fn is_vm_id(s: &str) -> bool {
    s.strip_prefix("pod-")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn records_dir(run_root: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = run_root.join(DIR);
    std::fs::create_dir_all(run_root)?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if !std::fs::symlink_metadata(&dir)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    Ok(dir)
}

fn open(path: &Path, create: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Whether `file` is still the one at `path` (not removed by whoever held it before).
fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's leftovers on disk: its run dir and share.
    fn pod_dirs(root: &Path, vm_id: &str) -> (PathBuf, PathBuf) {
        let (run, share) = (root.join(vm_id), root.join("shares").join(vm_id));
        std::fs::create_dir_all(run.join("jail")).unwrap();
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(run.join("console.log"), "x").unwrap();
        (run, share)
    }

    fn record(vm_id: &str, pids: Vec<u32>) -> ContainerState {
        ContainerState {
            vm_id: vm_id.into(),
            vm_pids: pids,
            ..Default::default()
        }
    }

    #[test]
    fn a_held_record_is_left_and_an_unheld_ones_pod_undone() {
        let d = tempfile::tempdir().unwrap();
        let vm_id = "pod-0123abcd";
        let (run, share) = pod_dirs(d.path(), vm_id);
        let mut vm = crate::shimv2::persist::stand_in_vm(&run);
        let mut held = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        held.write(&record(vm_id, vec![vm.id()])).unwrap();

        assert!(sweep(d.path()).is_empty(), "a held record was swept");
        assert!(run.is_dir() && share.is_dir());
        assert!(is_vm_process(vm.id(), &[run.as_path()]));

        // The shim dies: the kernel drops its lock.
        drop(held);
        assert_eq!(sweep(d.path()), vec![vm_id.to_string()]);
        assert!(
            !vm.wait().unwrap().success(),
            "the VM process was not killed"
        );
        assert!(!run.exists(), "the run dir stayed");
        assert!(!share.exists(), "the share stayed");
        assert!(!d.path().join(DIR).join(format!("{vm_id}.json")).exists());
        assert!(sweep(d.path()).is_empty());
    }

    #[test]
    fn a_released_record_is_gone_and_a_rewrite_that_shrinks_still_parses() {
        let d = tempfile::tempdir().unwrap();
        let vm_id = "pod-42";
        let mut held = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        held.write(&record(vm_id, vec![111111, 222222, 333333]))
            .unwrap();
        held.write(&record(vm_id, vec![1])).unwrap();
        let text = std::fs::read(&held.path).unwrap();
        let st: ContainerState = serde_json::from_slice(&text).unwrap();
        assert_eq!(st.vm_pids, vec![1]);
        let path = held.path.clone();
        held.release();
        assert!(!path.exists());
    }

    #[test]
    fn taking_a_dead_shims_record_undoes_its_pod_first() {
        let d = tempfile::tempdir().unwrap();
        let vm_id = "pod-beef";
        let mut old = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        old.write(&record(vm_id, vec![])).unwrap();
        let (run, share) = pod_dirs(d.path(), vm_id);
        // Another live shim holds it: the take waits, then gives up naming the file.
        let e = Held::take(d.path(), vm_id, Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains(vm_id), "{e}");
        assert!(run.is_dir());

        drop(old);
        let new = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        assert!(
            !run.exists() && !share.exists(),
            "the dead pod's dirs stayed"
        );
        assert!(
            sweep(d.path()).is_empty(),
            "the new owner's record was swept"
        );
        new.release();
    }

    #[test]
    fn a_record_that_does_not_parse_still_names_its_pods_dirs() {
        let d = tempfile::tempdir().unwrap();
        let vm_id = "pod-cafe";
        let (run, share) = pod_dirs(d.path(), vm_id);
        drop(Held::take(d.path(), vm_id, Duration::ZERO).unwrap());
        // And names that are not a VM id are not ours to act on.
        std::fs::write(d.path().join(DIR).join("..json"), "{}").unwrap();
        assert_eq!(sweep(d.path()), vec![vm_id.to_string()]);
        assert!(!run.exists() && !share.exists());
        assert!(d.path().join(DIR).join("..json").exists());
    }

    #[test]
    fn a_janitor_undoes_its_pod_only_if_the_shim_died_holding_it() {
        let d = tempfile::tempdir().unwrap();
        let vm_id = "pod-d00d";
        let (run, share) = pod_dirs(d.path(), vm_id);

        // The teardown came first: nothing is undone (a later pod may have the dirs).
        let held = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        let watched = held.watch_copy().unwrap();
        held.release();
        let after = undo_if_abandoned(d.path(), vm_id, watched, Duration::ZERO);
        assert_eq!(after, AfterOwner::Released);
        assert!(run.is_dir() && share.is_dir());

        // Nor when a new pod of the same id took a new record meanwhile, unheld for a
        // moment: the watch is of the old one.
        let held = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        let watched = held.watch_copy().unwrap();
        held.release();
        let next = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        drop(next);
        let after = undo_if_abandoned(d.path(), vm_id, watched, Duration::ZERO);
        assert_eq!(after, AfterOwner::Released);
        assert!(run.is_dir() && share.is_dir());

        let mut vm = crate::shimv2::persist::stand_in_vm(&run);
        let mut held = Held::take(d.path(), vm_id, Duration::ZERO).unwrap();
        held.write(&record(vm_id, vec![vm.id()])).unwrap();
        // Held past the wait (a live owner, a sweep): not the janitor's.
        let watched = held.watch_copy().unwrap();
        let after = undo_if_abandoned(d.path(), vm_id, watched, Duration::from_millis(60));
        assert_eq!(after, AfterOwner::StillHeld);
        assert!(run.is_dir() && is_vm_process(vm.id(), &[run.as_path()]));

        // The shim dies holding it, a moment after the watch ended.
        let watched = held.watch_copy().unwrap();
        let dying = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let after = undo_if_abandoned(d.path(), vm_id, watched, Duration::from_secs(5));
        dying.join().unwrap();
        assert_eq!(after, AfterOwner::Undone);
        assert!(
            !vm.wait().unwrap().success(),
            "the VM process was not killed"
        );
        assert!(!run.exists() && !share.exists(), "the pod's dirs stayed");
        assert!(!d.path().join(DIR).join(format!("{vm_id}.json")).exists());
    }
}
