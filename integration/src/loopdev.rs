//! Loop devices over files of a test's, for raw block device tests, and who holds them.

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
