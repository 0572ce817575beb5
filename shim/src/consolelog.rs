//! A pod's guest console, for `cocoon logs`: the live one in the VM's run directory
//! while the pod runs, and, for a pod whose VM failed (a host process died, the boot
//! failed), a copy kept after the run directory is gone. What is kept is bounded: the
//! last `KEPT_BYTES` of each console, and the newest `KEPT_FILES` consoles.

use std::path::{Path, PathBuf};

use crate::shimv2::sandbox_vm_id;

/// Where failed pods' consoles are kept, under the run root.
pub const FAILED_DIR: &str = "failed-consoles";
/// The most of one console kept (its end).
pub const KEPT_BYTES: u64 = 256 * 1024;
/// The most consoles kept; older ones are removed.
pub const KEPT_FILES: usize = 20;
/// containerd namespaces looked in when none is given: CRI's, ctr's default, Docker's.
pub const NAMESPACES: &[&str] = &["k8s.io", "default", "moby"];

/// Keeps the end of a failed VM's console under `run_root`, then drops the oldest kept
/// consoles beyond `KEPT_FILES`.
pub fn keep_failed(run_root: &Path, vm_id: &str, console: &Path) -> std::io::Result<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let dir = run_root.join(FAILED_DIR);
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::File::open(console)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(KEPT_BYTES)))?;
    let mut tail = Vec::new();
    f.take(KEPT_BYTES).read_to_end(&mut tail)?;
    let kept = dir.join(format!("{vm_id}.console.log"));
    std::fs::write(&kept, tail)?;
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)?
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    all.sort();
    for (_, old) in all.iter().take(all.len().saturating_sub(KEPT_FILES)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(kept)
}

/// The console of the pod `id` (a sandbox id, a container id of a pod of its own, or a
/// VM id `pod-…`): the live one if the pod runs, else the one kept after a failure.
pub fn find(run_root: &Path, id: &str, namespaces: &[&str]) -> Option<PathBuf> {
    let vm_ids = vm_ids(id, namespaces);
    vm_ids
        .iter()
        .map(|vm| run_root.join(vm).join("console.log"))
        .chain(
            vm_ids
                .iter()
                .map(|vm| run_root.join(FAILED_DIR).join(format!("{vm}.console.log"))),
        )
        .find(|p| p.is_file())
}

/// The VM ids pod `id` may have: its own if it is one (`pod-…`, never a path), then the
/// one it has in each of `namespaces`.
pub fn vm_ids(id: &str, namespaces: &[&str]) -> Vec<String> {
    let mut vm_ids: Vec<String> = namespaces.iter().map(|ns| sandbox_vm_id(ns, id)).collect();
    if id.starts_with("pod-") && !id.contains('/') && id != "pod-.." {
        vm_ids.insert(0, id.to_string());
    }
    vm_ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_consoles_come_first_then_kept_ones() {
        let root = tempfile::tempdir().unwrap();
        let vm = sandbox_vm_id("k8s.io", "abc");
        assert_eq!(find(root.path(), "abc", NAMESPACES), None);
        let console = root.path().join("console-src.log");
        std::fs::write(&console, "booted\n").unwrap();
        let kept = keep_failed(root.path(), &vm, &console).unwrap();
        assert_eq!(find(root.path(), "abc", NAMESPACES), Some(kept.clone()));
        assert_eq!(find(root.path(), &vm, &[]), Some(kept));
        std::fs::create_dir_all(root.path().join(&vm)).unwrap();
        std::fs::write(root.path().join(&vm).join("console.log"), "live\n").unwrap();
        assert_eq!(
            find(root.path(), "abc", NAMESPACES),
            Some(root.path().join(&vm).join("console.log"))
        );
        // Not a way out of the run root.
        assert_eq!(find(root.path(), "pod-../../etc", &[]), None);
    }

    #[test]
    fn only_the_end_and_the_newest_are_kept() {
        let root = tempfile::tempdir().unwrap();
        let console = root.path().join("big.log");
        let mut text = vec![b'a'; KEPT_BYTES as usize];
        text.extend_from_slice(b"the end\n");
        std::fs::write(&console, &text).unwrap();
        for i in 0..KEPT_FILES + 5 {
            keep_failed(root.path(), &format!("pod-{i}"), &console).unwrap();
        }
        let dir = root.path().join(FAILED_DIR);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), KEPT_FILES);
        let last = std::fs::read(dir.join(format!("pod-{}.console.log", KEPT_FILES + 4))).unwrap();
        assert_eq!(last.len() as u64, KEPT_BYTES);
        assert!(last.ends_with(b"the end\n"));
    }
}
