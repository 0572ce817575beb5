//! VM templates for cocoon-vmm (`[vm] templates`, issue #12): the first pod of a shape
//! boots a template VM until its agent prints its ready line, before any host
//! connection, then cocoon-vmm saves it (`cocoon_vmm::vstate::snapshot`); later pods of
//! that shape are restored from the saved VM instead of booting a kernel.
//!
//! A template lives in `<run_dir>/+templates/<key>/` (a name no VM id can take), keyed
//! by everything the saved guest has already seen: the VMM binary, kernel and initramfs
//! (path, size, modification time), the command line, memory, vCPUs and the share's tag
//! (read by the guest's virtio-fs driver at probe) and whether it has a NIC. It is made
//! once under a lock, in a
//! scratch directory renamed into place when complete, so a pod never sees half a
//! template and a crash leaves only scratch to clean.
//!
//! The template VM runs Cocoon's own image only, from boot to the ready line (no
//! container, no host connection, no pod data: its virtiofsd serves an empty
//! directory), so it runs unjailed, with cocoon-vmm's seccomp filter; its processes
//! are gone before the first pod is restored. What is per pod in a restored guest is
//! set by the shim as for a booted one: its clock (CreateSandbox steps it), hostname
//! and DNS, its interface's name, addresses and MAC (the agent trades the template's
//! for the pod's); the vsock socket, virtio-fs backend and tap are the pod's own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::HypervisorError;

/// The directory of all templates under the run dir.
pub const DIR: &str = "+templates";
/// The MAC of a template's NIC (cocoon-vmm's default for the first): a restored
/// guest's interface has it until the sandbox set-up gives it the pod's.
pub const TEMPLATE_MAC: &str = "02:43:43:00:00:00";
const CONSOLE: &str = "console.log";
const VMM_LOG: &str = "vmm.log";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";

/// What a template is made of; two pods with equal keys can share one.
pub struct Shape<'a> {
    pub vmm: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub fs_tag: Option<&'a str>,
    /// A virtio-net device (on a tap of the template's own while it boots).
    pub net: bool,
    /// A virtio-mem region of this size (MiB; 0: none), none of it plugged.
    pub hotplug_mib: u32,
    /// Empty disk slots.
    pub block_slots: u8,
}

impl Shape<'_> {
    /// The key: a hash of [`Shape::describe`].
    pub fn key(&self) -> Result<String, HypervisorError> {
        Ok(hex(&Sha256::digest(self.describe()?.as_bytes())[..16]))
    }

    /// The shape as text, files by path, size and modification time (one
    /// `<what>=<path>:<size>:<mtime>` line each, which [`still_usable`] checks again
    /// once the shape is recorded beside a template).
    pub fn describe(&self) -> Result<String, HypervisorError> {
        let mut text = String::new();
        for (what, p) in [
            ("vmm", self.vmm),
            ("kernel", self.kernel),
            ("initrd", self.initrd),
        ] {
            let stamp = file_stamp(p).map_err(|e| template_err(what, p, e))?;
            text += &format!("{what}={}:{stamp}\n", p.display());
        }
        text += &format!(
            "cmdline={}\nmemory={}\nvcpus={}\nfs={:?}\nnet={}\nformat=1\n",
            self.cmdline, self.memory_mib, self.vcpus, self.fs_tag, self.net
        );
        // Only where there is one: the keys of templates without stay as they were.
        if self.hotplug_mib > 0 {
            text += &format!("hotplug={}\n", self.hotplug_mib);
        }
        if self.block_slots > 0 {
            text += &format!("block_slots={}\n", self.block_slots);
        }
        Ok(text)
    }
}

/// A file's size and modification time, as a template's shape records them.
fn file_stamp(p: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(p)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Ok(format!("{}:{}", meta.len(), mtime.as_nanos()))
}

/// The record of what a template was made from, beside its saved VM.
const SHAPE_FILE: &str = "shape.txt";

/// Whether a pod can still be restored from the template in `dir`: it has a shape
/// record and every file in it (VMM, kernel, initramfs) is still the one it was made
/// from, by path, size and modification time.
fn still_usable(dir: &Path) -> bool {
    let shape = std::fs::read_to_string(dir.join(SHAPE_FILE)).unwrap_or_default();
    !shape.is_empty()
        && shape.lines().all(|l| {
            let Some((what, rest)) = l.split_once('=') else {
                return true;
            };
            if !matches!(what, "vmm" | "kernel" | "initrd") {
                return true;
            }
            // `<path>:<size>:<mtime>`; the path itself may hold colons.
            let mut parts = rest.rsplitn(3, ':');
            let (Some(mtime), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                return false;
            };
            file_stamp(Path::new(path)).is_ok_and(|s| s == format!("{size}:{mtime}"))
        })
}

/// A template in a store, as `cocoon templates` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    /// Disk space its files take (the memory file is sparse).
    pub disk_bytes: u64,
    /// Whether a pod can still be restored from it (else [`prune_stale`] removes it).
    pub usable: bool,
}

/// The templates in `store` (its `+templates` directory), by key; none if it does
/// not exist. Scratch and lock files are left out.
pub fn list(store: &Path) -> Vec<Listed> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(store) else {
        return Vec::new();
    };
    let mut out: Vec<Listed> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let key = e.file_name().to_str()?.to_string();
            if key.contains('.') {
                return None;
            }
            let disk_bytes = std::fs::read_dir(e.path())
                .map(|files| {
                    files
                        .flatten()
                        .filter_map(|f| f.metadata().ok())
                        .filter(|m| m.is_file())
                        .map(|m| m.blocks() * 512)
                        .sum()
                })
                .unwrap_or(0);
            Some(Listed {
                usable: still_usable(&e.path()),
                key,
                disk_bytes,
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Removes every template in `store` (but `keep`, if named) that no pod can use
/// again: one made from a VMM binary, kernel or initramfs that has changed or
/// gone since (a new key never names it), or one without a shape record. Each
/// new image or binary makes a new template (≈64 MiB), so without this the store
/// only grows. Pods already running from a removed template keep their own RAM
/// and are not affected. Returns the keys removed.
pub fn prune_stale(store: &Path, keep: Option<&str>) -> Vec<String> {
    let mut removed = Vec::new();
    for t in list(store) {
        if t.usable || Some(t.key.as_str()) == keep {
            continue;
        }
        match std::fs::remove_dir_all(store.join(&t.key)) {
            Ok(()) => {
                let _ = std::fs::remove_file(store.join(format!("{}.lock", t.key)));
                removed.push(t.key);
            }
            Err(err) => tracing::warn!(key = t.key, "cannot remove a stale VM template: {err}"),
        }
    }
    removed
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn template_err(what: &str, path: &Path, e: std::io::Error) -> HypervisorError {
    HypervisorError::Template(format!("{what} {}: {e}", path.display()))
}

/// Where templates are made and found.
pub struct Store {
    pub dir: PathBuf,
    pub virtiofsd: PathBuf,
    pub boot_timeout: Duration,
}

impl Store {
    /// The saved VM for `shape`, made now if there is none (the caller's pod waits
    /// for one boot). Returns its directory, for `cocoon-vmm run --restore`.
    pub async fn get_or_make(&self, shape: &Shape<'_>) -> Result<PathBuf, HypervisorError> {
        let key = shape.key()?;
        let dir = self.dir.join(&key);
        if dir.join("vm.json").is_file() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| template_err("directory", &self.dir, e))?;
        // One maker per key; the others wait here, then find it made.
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| template_err("lock", &lock_path, e))?;
        let lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
        })
        .await
        .map_err(|e| HypervisorError::Template(format!("lock task: {e}")))?
        .map_err(|e| template_err("lock", &lock_path, e.into()))?;
        if dir.join("vm.json").is_file() {
            return Ok(dir);
        }
        let scratch = self.dir.join(format!("{key}.making"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir(&scratch).map_err(|e| template_err("scratch", &scratch, e))?;
        let made = self.make(shape, &key, &scratch).await;
        let result = made.and_then(|()| {
            let record = scratch.join("snapshot").join(SHAPE_FILE);
            std::fs::write(&record, shape.describe()?)
                .map_err(|e| template_err("shape record", &record, e))?;
            std::fs::rename(scratch.join("snapshot"), &dir)
                .map_err(|e| template_err("directory", &dir, e))
        });
        let _ = std::fs::remove_dir_all(&scratch);
        drop(lock);
        result.map(|()| {
            tracing::info!(key, "VM template made");
            // A new template usually means a new image or binary: the old ones'
            // files are gone or changed, and no key will name them again.
            let removed = prune_stale(&self.dir, Some(&key));
            if !removed.is_empty() {
                tracing::info!(?removed, "stale VM templates removed");
            }
            dir
        })
    }

    /// Boots the template VM of `shape` (whose key is `key`) in `scratch` and saves it
    /// to `scratch/snapshot`.
    async fn make(
        &self,
        shape: &Shape<'_>,
        key: &str,
        scratch: &Path,
    ) -> Result<(), HypervisorError> {
        let started = Instant::now();
        let p = |n: &str| scratch.join(n);
        let spawn = |what: &'static str| move |source| HypervisorError::Spawn { what, source };
        let mut procs = Vec::new();
        let mut fs_log = None;
        let mut vmm = tokio::process::Command::new(shape.vmm);
        // The console and the VMM's words go through pipes copied (and bounded) here, as
        // a pod's do; the ready line on the console wakes the wait below.
        let (console_read, console_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| spawn("cocoon-vmm")(e.into()))?;
        let console_fd = std::os::fd::AsRawFd::as_raw_fd(&console_write);
        super::inherit_fd(&mut vmm, console_fd);
        vmm.arg("run")
            .arg("--kernel")
            .arg(shape.kernel)
            .arg("--initrd")
            .arg(shape.initrd)
            .args(["--cmdline", shape.cmdline])
            .args(["--mem-mib", &shape.memory_mib.to_string()])
            .args(["--vcpus", &shape.vcpus.to_string()])
            .args(["--serial-out-fd", &console_fd.to_string()])
            .arg("--vsock-uds")
            .arg(p("vsock.sock"))
            .args(["--vsock-cid", &cocoon_protocol::GUEST_CID.to_string()])
            .args(["--jail", "off", "--huge-pages", "off"])
            .arg("--api-sock")
            .arg(p("api.sock"))
            .arg("--snapshot-to")
            .arg(p("snapshot"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        super::process::die_with_parent(&mut vmm);
        if let Some(tag) = shape.fs_tag {
            let share = p("share");
            std::fs::create_dir(&share).map_err(|e| template_err("share", &share, e))?;
            let sock = p("virtiofs.sock");
            let mut fs = tokio::process::Command::new(&self.virtiofsd);
            fs.arg("--socket-path")
                .arg(&sock)
                .arg("--shared-dir")
                .arg(&share)
                .args(["--sandbox", "namespace", "--announce-submounts"])
                .args(["--cache", "auto", "--log-level", "warn"])
                .stdin(Stdio::null())
                .kill_on_drop(true);
            super::process::die_with_parent(&mut fs);
            // What it says goes to a bounded log, quoted if it never serves.
            let log = super::console::log_to_pipe(&mut fs, &p(VIRTIOFSD_LOG))
                .map_err(spawn("virtiofsd"))?;
            let spawned = fs.spawn();
            drop(fs);
            let mut child = spawned.map_err(spawn("virtiofsd"))?;
            // A virtiofsd that ends (a socket path too long, a bad option) is said at
            // once, with its words, not at the boot deadline.
            let mut ended = None;
            let waited = self
                .wait("virtiofsd's socket", started, || match child.try_wait() {
                    Ok(Some(st)) => {
                        ended = Some(st);
                        true
                    }
                    _ => sock.exists(),
                })
                .await;
            let failed = match (waited, ended) {
                (Ok(()), None) => None,
                (Ok(()), Some(st)) => Some(format!("virtiofsd ended before it served ({st})")),
                (Err(_), _) => Some(format!(
                    "virtiofsd's socket not there within {:?}",
                    self.boot_timeout
                )),
            };
            if let Some(why) = failed {
                let _ = child.kill().await;
                log.settled(Instant::now() + Duration::from_millis(500))
                    .await;
                return Err(HypervisorError::Template(format!(
                    "{why}; virtiofsd said: {}",
                    super::tail_lines(&p(VIRTIOFSD_LOG), 5)
                )));
            }
            procs.push(child);
            fs_log = Some(log);
            vmm.arg("--fs").arg(format!("{}:{tag}", sock.display()));
        }
        if shape.hotplug_mib > 0 {
            vmm.args(["--hotplug-mib", &shape.hotplug_mib.to_string()]);
        }
        if shape.block_slots > 0 {
            vmm.args(["--block-slots", &shape.block_slots.to_string()]);
        }
        if shape.net {
            // A tap of its own, made by the VMM (root, unjailed) in this network
            // namespace and gone with it: the guest's driver probes the device and reads
            // TEMPLATE_MAC; its interface stays down, so nothing crosses it.
            vmm.args(["--net-tap", &format!("cctpl{}", &key[..10])]);
        }
        let vmm_log =
            super::console::log_to_pipe(&mut vmm, &p(VMM_LOG)).map_err(spawn("cocoon-vmm"))?;
        let spawned = vmm.spawn();
        // Only the VMM writes the console and its log now: its end closes the copies.
        drop(console_write);
        drop(vmm);
        let Ok(mut vmm) = spawned else {
            vmm_log
                .settled(Instant::now() + Duration::from_millis(500))
                .await;
            return spawned.map(drop).map_err(spawn("cocoon-vmm"));
        };
        let seen = std::sync::Arc::new(tokio::sync::Notify::new());
        let console = super::console::spawn_copier(
            Ok(console_read),
            p(CONSOLE),
            super::console::CONSOLE_LIMIT,
            Some(super::console::ConsoleWatch {
                marker: cocoon_protocol::READY_LINE.as_bytes(),
                seen: seen.clone(),
            }),
        );
        let result = self
            .boot_and_save(&mut vmm, &seen, started, &p("api.sock"))
            .await;
        if result.is_err() {
            let _ = vmm.kill().await;
        }
        for mut fs in procs {
            let _ = fs.kill().await;
        }
        // The scratch directory goes next, so no copy may still be writing (or rotating)
        // in it; and an error quotes what the copies wrote.
        let until = Instant::now() + Duration::from_millis(500);
        console.settled(until).await;
        vmm_log.settled(until).await;
        if let Some(log) = &fs_log {
            log.settled(until).await;
        }
        result.map_err(|e| {
            HypervisorError::Template(format!(
                "{e}; the VMM said: {}; the console: {}",
                super::tail_lines(&p(VMM_LOG), 5),
                super::tail_lines(&p(CONSOLE), 5)
            ))
        })?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "VM template booted and saved"
        );
        Ok(())
    }

    /// Waits for the template's agent to be ready (`seen`), then has the VMM pause,
    /// save and end.
    async fn boot_and_save(
        &self,
        vmm: &mut tokio::process::Child,
        seen: &tokio::sync::Notify,
        started: Instant,
        api: &Path,
    ) -> Result<(), String> {
        let left = self.boot_timeout.saturating_sub(started.elapsed());
        tokio::select! {
            () = seen.notified() => {}
            // A VMM that ends before its guest is ready: say so now, not at the deadline.
            st = vmm.wait() => {
                return Err(format!("the template VM ended before its agent was ready ({st:?})"))
            }
            () = tokio::time::sleep(left) => {
                return Err(format!("the template's agent not ready within {:?}", self.boot_timeout))
            }
        }
        for action in ["pause", "snapshot", "shutdown"] {
            let api = api.to_path_buf();
            let r = tokio::task::spawn_blocking(move || {
                cocoon_vmm::vmm::api_call(&api, &format!(r#"{{"action":"{action}"}}"#))
            })
            .await
            .map_err(|e| format!("{action}: {e}"))?
            .map_err(|e| format!("{action}: {e}"))?;
            if !r.ok {
                return Err(format!("{action} refused: {}", r.error.unwrap_or_default()));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), vmm.wait()).await {
            Ok(Ok(st)) if st.success() => Ok(()),
            other => Err(format!("the template VM did not end cleanly: {other:?}")),
        }
    }

    async fn wait(
        &self,
        what: &str,
        started: Instant,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), HypervisorError> {
        while !done() {
            if started.elapsed() > self.boot_timeout {
                return Err(HypervisorError::Template(format!(
                    "{what} not there within {:?}",
                    self.boot_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plainest shape of these files: one vCPU, 256 MiB, no devices but the console.
    fn plain<'a>(vmm: &'a Path, kernel: &'a Path, initrd: &'a Path) -> Shape<'a> {
        Shape {
            vmm,
            kernel,
            initrd,
            cmdline: "console=ttyS0",
            memory_mib: 256,
            vcpus: 1,
            fs_tag: None,
            net: false,
            hotplug_mib: 0,
            block_slots: 0,
        }
    }

    /// A stand-in VMM: writes `console` to the `--serial-out-fd` it is given and
    /// `stderr` to its stderr, then runs `then` (a shell command).
    fn fake_vmm(dir: &Path, console: &str, stderr: &str, then: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let vmm = dir.join("fake-vmm");
        std::fs::write(
            &vmm,
            format!(
                "#!/bin/bash\nwhile [ \"$1\" != --serial-out-fd ]; do shift; done\n\
                 printf '{console}' >&$2\nprintf '{stderr}' >&2\n{then}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        vmm
    }

    async fn make_with(
        vmm: &Path,
        boot_timeout: Duration,
    ) -> (Result<PathBuf, HypervisorError>, tempfile::TempDir) {
        make_sharing(vmm, boot_timeout, None).await
    }

    /// `make_with` with a share served by `virtiofsd`, where given.
    async fn make_sharing(
        vmm: &Path,
        boot_timeout: Duration,
        virtiofsd: Option<&Path>,
    ) -> (Result<PathBuf, HypervisorError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (dir.path().join("kernel"), dir.path().join("initrd"));
        std::fs::write(&kernel, "k").unwrap();
        std::fs::write(&initrd, "i").unwrap();
        let store = Store {
            dir: dir.path().join(DIR),
            virtiofsd: virtiofsd
                .unwrap_or(Path::new("/nonexistent/virtiofsd"))
                .into(),
            boot_timeout,
        };
        let mut shape = plain(vmm, &kernel, &initrd);
        if virtiofsd.is_some() {
            shape.fs_tag = Some("cocoon");
        }
        (store.get_or_make(&shape).await, dir)
    }

    /// Nothing of a failed template is left: no template, no scratch directory.
    fn nothing_made(dir: &Path) {
        let store = dir.join(DIR);
        let left: Vec<_> = std::fs::read_dir(&store)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "left in the store: {left:?}");
    }

    #[tokio::test]
    async fn a_template_vmm_that_dies_at_boot_is_reported_at_once_with_its_words() {
        let bin = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(
            bin.path(),
            "Linux version 6.12\\nKernel panic - not syncing: VFS\\n",
            "cocoon-vmm: the kernel would not load\\n",
            "exit 3",
        );
        let started = Instant::now();
        let (made, dir) = make_with(&vmm, Duration::from_secs(60)).await;
        let e = made.unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited for the deadline: {e}"
        );
        for said in [
            "ended before its agent was ready",
            "the kernel would not load",
            "Kernel panic",
        ] {
            assert!(e.contains(said), "{said:?} missing from: {e}");
        }
        nothing_made(dir.path());
    }

    /// A template's virtiofsd that ends before it serves (here as one does whose socket
    /// path is too long) fails the template at once, with what it said.
    #[tokio::test]
    async fn a_template_virtiofsd_that_ends_is_reported_at_once_with_its_words() {
        use std::os::unix::fs::PermissionsExt;
        let bin = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(bin.path(), "", "", "exec sleep 600");
        let fsd = bin.path().join("fake-virtiofsd");
        std::fs::write(
            &fsd,
            "#!/bin/sh\necho 'Error creating listener: path must be shorter than SUN_LEN' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fsd, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = Instant::now();
        let (made, dir) = make_sharing(&vmm, Duration::from_secs(60), Some(&fsd)).await;
        let e = made.unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited for the deadline: {e}"
        );
        for said in ["virtiofsd ended before it served", "shorter than SUN_LEN"] {
            assert!(e.contains(said), "{said:?} missing from: {e}");
        }
        nothing_made(dir.path());
    }

    #[tokio::test]
    async fn a_template_guest_that_never_gets_ready_is_stopped_at_the_deadline() {
        let bin = tempfile::tempdir().unwrap();
        let pid_file = bin.path().join("pid");
        let vmm = fake_vmm(
            bin.path(),
            "Linux version 6.12\\n",
            "",
            &format!("echo $$ > {}; exec sleep 600", pid_file.display()),
        );
        let (made, dir) = make_with(&vmm, Duration::from_secs(1)).await;
        let e = made.unwrap_err().to_string();
        assert!(e.contains("not ready within"), "{e}");
        assert!(
            e.contains("Linux version"),
            "the console is missing from: {e}"
        );
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the template's VMM outlived its failure"
        );
        nothing_made(dir.path());
    }

    #[test]
    fn the_key_follows_everything_the_guest_has_seen() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, n).unwrap();
            p
        };
        let (vmm, kernel, initrd) = (f("vmm"), f("kernel"), f("initrd"));
        let shape = |cmdline, memory_mib, tag| Shape {
            vmm: &vmm,
            kernel: &kernel,
            initrd: &initrd,
            cmdline,
            memory_mib,
            vcpus: 1,
            fs_tag: tag,
            net: false,
            hotplug_mib: 0,
            block_slots: 0,
        };
        let base = shape("console=ttyS0", 256, Some("cocoon")).key().unwrap();
        assert_eq!(base.len(), 32);
        assert_eq!(
            base,
            shape("console=ttyS0", 256, Some("cocoon")).key().unwrap()
        );
        for other in [
            shape("console=ttyS0 quiet", 256, Some("cocoon")),
            shape("console=ttyS0", 512, Some("cocoon")),
            shape("console=ttyS0", 256, None),
            Shape {
                net: true,
                ..shape("console=ttyS0", 256, Some("cocoon"))
            },
            Shape {
                hotplug_mib: 768,
                ..shape("console=ttyS0", 256, Some("cocoon"))
            },
        ] {
            assert_ne!(other.key().unwrap(), base);
        }
        std::fs::write(&initrd, "a new initramfs").unwrap();
        assert_ne!(
            shape("console=ttyS0", 256, Some("cocoon")).key().unwrap(),
            base
        );
        std::fs::remove_file(&kernel).unwrap();
        let e = shape("console=ttyS0", 256, None).key().unwrap_err();
        assert!(e.to_string().contains("kernel"), "{e}");
    }

    #[test]
    fn only_templates_no_key_can_name_again_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        // A path with colons, as the record's `path:size:mtime` must survive.
        let files = dir.path().join("im:age");
        std::fs::create_dir(&files).unwrap();
        let f = |n: &str| {
            let p = files.join(n);
            std::fs::write(&p, n).unwrap();
            p
        };
        let (vmm, kernel, initrd, other) = (f("vmm"), f("kernel"), f("initrd"), f("other"));
        let shape = |initrd| plain(&vmm, &kernel, initrd);
        let store = dir.path().join(DIR);
        let template = |key: &str, shape: Option<&Shape>| {
            let t = store.join(key);
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("vm.json"), "{}").unwrap();
            if let Some(s) = shape {
                std::fs::write(t.join(SHAPE_FILE), s.describe().unwrap()).unwrap();
            }
            std::fs::write(store.join(format!("{key}.lock")), "").unwrap();
        };
        template("current", Some(&shape(&initrd)));
        template("another-initrd", Some(&shape(&other)));
        template("changed", Some(&shape(&other)));
        template("unrecorded", None);
        template("kept", None);
        std::fs::create_dir(store.join("made.making")).unwrap();
        // The image of `changed` is rebuilt: same path, new contents.
        std::fs::write(&other, "a rebuilt initramfs").unwrap();
        template("another-initrd", Some(&shape(&other)));
        std::fs::remove_dir_all(store.join("changed")).unwrap();
        template("changed", None);
        std::fs::write(
            store.join("changed").join(SHAPE_FILE),
            shape(&initrd)
                .describe()
                .unwrap()
                .replace(&file_stamp(&initrd).unwrap(), "4:1"),
        )
        .unwrap();

        let listed: Vec<(String, bool)> = list(&store)
            .into_iter()
            .map(|t| (t.key, t.usable))
            .collect();
        let want = [
            ("another-initrd", true),
            ("changed", false),
            ("current", true),
            ("kept", false),
            ("unrecorded", false),
        ];
        assert_eq!(listed, want.map(|(k, u)| (k.to_string(), u)));
        assert!(list(&store).iter().all(|t| t.disk_bytes > 0));
        let mut removed = prune_stale(&store, Some("kept"));
        removed.sort();
        assert_eq!(removed, ["changed", "unrecorded"]);
        for gone in ["changed", "unrecorded", "changed.lock", "unrecorded.lock"] {
            assert!(!store.join(gone).exists(), "{gone} left");
        }
        for left in [
            "current",
            "another-initrd",
            "kept",
            "made.making",
            "current.lock",
        ] {
            assert!(store.join(left).exists(), "{left} removed");
        }
        // A file gone makes every template of it stale.
        std::fs::remove_file(&kernel).unwrap();
        let mut removed = prune_stale(&store, Some("kept"));
        removed.sort();
        assert_eq!(removed, ["another-initrd", "current"]);
        assert!(prune_stale(&dir.path().join("none"), Some("kept")).is_empty());
    }
}
