//! Loop devices over files of a test's, for raw block device tests, and who holds them;
//! an ext4 filesystem on one, for kernels whose tmpfs cannot be idmapped (6.1), and
//! a tmpfs of a test's own, for those whose tmpfs can (6.3 on).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A loop device over a file of the test's, detached when dropped.
pub struct Loop {
    pub dev: PathBuf,
    pub file: PathBuf,
}

impl Loop {
    /// A 4 MiB file starting with `first`, attached to a free loop device.
    pub fn new(dir: &Path, name: &str, first: &[u8]) -> Result<Loop, String> {
        let file = dir.join(name);
        let mut bytes = vec![0u8; 4 << 20];
        bytes[..first.len()].copy_from_slice(first);
        std::fs::write(&file, &bytes).map_err(|e| e.to_string())?;
        Self::attach(file)
    }

    /// `file` attached to a free loop device.
    pub fn attach(file: PathBuf) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Loop { dev, file })
    }

    /// The processes holding the device open, as `pid comm`.
    pub fn holders(&self) -> Vec<String> {
        let rdev = std::fs::metadata(&self.dev).unwrap().rdev();
        let mut who = Vec::new();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            let holds = fds.flatten().any(|fd| {
                std::fs::metadata(fd.path())
                    .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
            });
            if holds {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                who.push(format!(
                    "{} {}",
                    p.file_name().to_string_lossy(),
                    comm.trim()
                ));
            }
        }
        who
    }
}

/// Waits up to `limit` for no process to hold `loops` (CRI deletes a stopped
/// container's task after StopContainer returns); those still holding them then.
pub fn held_after(loops: &[&Loop], limit: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let held: Vec<String> = loops.iter().flat_map(|l| l.holders()).collect();
        if held.is_empty() || std::time::Instant::now() >= deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// An ext4 filesystem of `size` bytes (a sparse file) on a loop device, mounted until
/// dropped on a directory of its own with a short path (`/run/e…`): a run directory
/// below it must leave room for the sockets made there (`config::MAX_RUN_DIR`).
pub struct Ext4 {
    pub mnt: PathBuf,
    _dev: Loop,
    _dirs: [tempfile::TempDir; 2],
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Ext4 {
    pub fn new(size: u64) -> Result<Ext4, String> {
        let image = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mnt = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/run")
            .map_err(|e| format!("a mount point in /run: {e}"))?;
        let file = image.path().join("ext4.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let dev = Loop::attach(file)?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.dev))?;
        run(Command::new("mount").arg(&dev.dev).arg(mnt.path()))?;
        Ok(Ext4 {
            mnt: mnt.path().to_path_buf(),
            _dev: dev,
            _dirs: [mnt, image],
        })
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Before the loop device and the directories go (fields drop after this).
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A tmpfs of the test's own, mounted under /run (a short path: a shim's run directory
/// may go below it), unmounted when dropped.
pub struct Tmpfs {
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// At most `size` bytes.
    pub fn new(size: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("t")
            .tempdir_in("/run")
            .map_err(|e| format!("a mount point in /run: {e}"))?;
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0755").as_str()),
        )
        .map_err(|e| format!("a tmpfs at {}: {e}", dir.path().display()))?;
        Ok(Tmpfs {
            mnt: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Before the directory goes (fields drop after this).
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}
