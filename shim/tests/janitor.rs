//! The pod janitor as the shim binary runs it (`containerd-shim-cocoon-v2 janitor`),
//! confined as it confines itself (capabilities, no_new_privs, its seccomp allow-list),
//! against a real pod's leftovers: a process standing in for the VM, a tmpfs mounted
//! on the share in the pod's own mount namespace (still held, as by a virtiofsd not yet
//! dead), a run directory and a host cgroup. The test plays the shim: it holds
//! the pod's record locked and the janitor's pipe open, then lets go of both as a
//! dying shim's kernel would, or removes the record first as a teardown does.
//!
//! Needs root (mounts, cgroups, the janitor's capabilities): under `CI=true` a missing
//! prerequisite fails the test; elsewhere it says SKIPPED.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_shim::shimv2::podns::PodNs;
use nix::fcntl::{Flock, FlockArg};

fn runnable() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the janitor tests need root (mounts, cgroups, capabilities)"
    );
    eprintln!("SKIPPED: the janitor tests need root (mounts, cgroups, capabilities)");
    false
}

/// A pod's leftovers as a shim makes them, and its record, locked by the test.
struct Pod {
    _root: tempfile::TempDir,
    root: PathBuf,
    vm_id: String,
    run: PathBuf,
    share: PathBuf,
    cgroup: PathBuf,
    vm: Child,
    record: PathBuf,
    lock: Option<Flock<File>>,
    /// The pod's own mount namespace, where its share's mounts are (`podns`); kept
    /// alive through the tests, as a lingering holder (a virtiofsd not yet dead) would.
    ns: PodNs,
}

impl Pod {
    fn new(tag: &str) -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let vm_id = format!("pod-{tag}{:x}", std::process::id());
        let run = root.join(&vm_id);
        let share = root.join("shares").join(&vm_id);
        std::fs::create_dir_all(run.join("jail/dev")).unwrap();
        std::fs::write(run.join("console.log"), "boot").unwrap();
        std::fs::create_dir_all(&share).unwrap();
        let ns = PodNs::new(&[root.join("shares")]).expect("a pod mount namespace");
        let s = share.clone();
        ns.run(move || -> std::io::Result<()> {
            nix::mount::mount(
                Some("tmpfs"),
                &s,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=1m"),
            )?;
            std::fs::create_dir_all(s.join("c1/rootfs"))?;
            std::fs::write(s.join("c1/rootfs/file"), "x")
        })
        .unwrap()
        .expect("mounting a tmpfs on the share, in the pod's namespace");
        let cgroup = host_cgroup(&vm_id);
        let vm = stand_in_vm(&run);
        let record = root.join("pods").join(format!("{vm_id}.json"));
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&record)
            .unwrap();
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
        let text = serde_json::json!({
            "container_id": "",
            "vm_id": vm_id,
            "vm_run_dir": run,
            "share": share,
            "vm_pids": [vm.id()],
            "mounts": { "dir": "", "mounted": [] },
            "host_cgroup": [cgroup],
        });
        std::io::Write::write_all(&mut &*lock, text.to_string().as_bytes()).unwrap();
        Pod {
            _root: dir,
            root,
            vm_id,
            run,
            share,
            cgroup,
            vm,
            record,
            lock: Some(lock),
            ns,
        }
    }

    fn vm_alive(&mut self) -> bool {
        self.vm.try_wait().unwrap().is_none()
    }

    /// Whether the pod's namespace still has a mount on the share, and whether the
    /// file in it is there.
    fn share_in_ns(&self) -> (bool, bool) {
        let share = self.share.clone();
        self.ns
            .run(move || {
                let table = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
                let point = share.to_string_lossy().into_owned();
                let mounted = table.lines().any(|l| l.split(' ').nth(4) == Some(&point));
                (mounted, share.join("c1/rootfs/file").exists())
            })
            .unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.vm.kill();
        let _ = self.vm.wait();
        let share = self.share.clone();
        let _ = self.ns.run(move || {
            let _ = nix::mount::umount2(&share, nix::mount::MntFlags::MNT_DETACH);
        });
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A cgroup directory for the pod, in the pids hierarchy of a v1 or hybrid host or in
/// the unified one.
fn host_cgroup(vm_id: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    let parent = if v1.join("cgroup.procs").exists() {
        v1
    } else {
        Path::new("/sys/fs/cgroup")
    };
    assert!(
        parent.join("cgroup.procs").exists(),
        "no cgroup hierarchy at {}",
        parent.display()
    );
    let dir = parent.join(format!("cocoon-janitor-test-{vm_id}"));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("making {}: {e}", dir.display()));
    dir
}

/// A process whose command line names the run dir, as a VM's do (the janitor kills only
/// those), once that command line shows.
fn stand_in_vm(run: &Path) -> Child {
    let child = Command::new("sleep")
        .arg0(format!("vm {}", run.display()))
        .arg("100")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mark = run.to_string_lossy().into_owned();
    while !std::fs::read_to_string(format!("/proc/{}/cmdline", child.id()))
        .is_ok_and(|c| c.contains(&mark))
    {
        assert!(Instant::now() < deadline, "the stand-in VM never showed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Starts the janitor as `Janitor::spawn` does: fd 3 its own descriptor of the record,
/// stdin a pipe only the test writes to. Returns it and the pipe's writer.
fn janitor(pod: &Pod) -> (Child, OwnedFd) {
    let copy = File::open(&pod.record).unwrap();
    let (read, watch) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let fd = copy.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_containerd-shim-cocoon-v2"));
    cmd.arg0("cocoon-janitor")
        .arg("janitor")
        .arg(&pod.root)
        .arg(&pod.vm_id)
        .env_clear()
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 between fork and exec is async-signal-safe; `copy` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    (child, watch)
}

/// `/proc/<pid>/status` once the janitor has put its seccomp filter on.
fn confined_status(pid: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.lines().any(|l| l == "Seccomp:\t2") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the janitor never put its seccomp filter on:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the janitor's exit; returns its status and what it logged.
fn finished(mut child: Child) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the janitor did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status, log)
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(":\t")))
        .unwrap_or_else(|| panic!("no {name} in the janitor's status"))
}

#[test]
fn a_confined_janitor_undoes_the_pod_of_a_shim_that_died() {
    if !runnable() {
        return;
    }
    let mut pod = Pod::new("d1ed");
    let (child, watch) = janitor(&pod);
    let status = confined_status(child.id());
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    // KILL, FOWNER, DAC_READ_SEARCH, DAC_OVERRIDE and nothing else (no SYS_ADMIN: the
    // share's mounts are in the pod's own namespace).
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(&status, set), "000000000000002e", "{set}");
    }
    assert_eq!(pod.share_in_ns(), (true, true));
    assert_eq!(field(&status, "CapInh"), "0000000000000000");
    assert!(pod.vm_alive(), "the janitor acted while the shim lived");

    // The shim dies: the kernel drops its lock and closes its end of the pipe.
    drop(pod.lock.take());
    drop(watch);
    let (exit, log) = finished(child);
    assert!(exit.success(), "the janitor failed ({exit}):\n{log}");
    assert!(
        log.contains("undid"),
        "the janitor did not say what it undid:\n{log}"
    );
    let killed = pod.vm.wait().unwrap();
    assert_eq!(
        killed.signal(),
        Some(libc::SIGKILL),
        "the VM was not killed:\n{log}"
    );
    for left in [&pod.share, &pod.run, &pod.cgroup, &pod.record] {
        assert!(!left.exists(), "{} is left:\n{log}", left.display());
    }
    // Removing the share's directory took the mount a live holder of the pod's
    // namespace still had on it, without unmounting anything.
    assert_eq!(pod.share_in_ns(), (false, false), "{log}");
}

#[test]
fn a_janitor_leaves_a_pod_its_shim_tore_down() {
    if !runnable() {
        return;
    }
    let mut pod = Pod::new("d0e5");
    let (child, watch) = janitor(&pod);
    confined_status(child.id());
    // The teardown's end, as `Held::release` does it: the record first, then the watch.
    std::fs::remove_file(&pod.record).unwrap();
    drop(pod.lock.take());
    drop(watch);
    let (exit, log) = finished(child);
    assert!(exit.success(), "the janitor failed ({exit}):\n{log}");
    // What is there now belongs to no dead shim (here: a later pod of the same id).
    assert!(pod.vm_alive(), "the janitor killed a live pod's VM:\n{log}");
    for kept in [&pod.share, &pod.run, &pod.cgroup] {
        assert!(kept.exists(), "{} was removed:\n{log}", kept.display());
    }
    assert_eq!(pod.share_in_ns(), (true, true), "{log}");
}
