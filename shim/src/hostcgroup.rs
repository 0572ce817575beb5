//! The pod's host cgroup. Under runc a pod's processes live in the cgroups kubelet and
//! containerd name (`cgroupsPath`), so the node accounts and limits them. Under Cocoon the
//! containers run in the guest, and the host processes that are the pod's real cost are
//! the VMM, its vsock backend and virtiofsd: they join the sandbox container's cgroup,
//! below kubelet's pod cgroup, so the node's accounting (and `PodSandboxStats`) sees the
//! VM, and `overhead.podFixed` in the RuntimeClass is what they use beyond the pod's
//! containers.
//!
//! cgroup v2 (one hierarchy) and v1/hybrid (one directory per controller) are both
//! handled; on v1 the VM joins the accounting controllers (cpu, cpuacct, memory, pids,
//! blkio). Only the leaf this creates is removed again.

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers the VM's processes join.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];

#[derive(Debug, Error)]
pub enum HostCgroupError {
    #[error(
        "cgroupsPath {0:?} is not a cgroupfs path (/a/b) or a systemd one (slice:prefix:name)"
    )]
    BadPath(String),
    #[error("no cgroup hierarchy found under {CGROUP_ROOT}")]
    NoHierarchy,
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot move pid {pid} into cgroup {dir}")]
    Join {
        pid: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup, relative to a hierarchy's root, that `cgroups_path` names: a cgroupfs
/// path as is, or systemd's `slice:prefix:name` expanded as systemd lays it out
/// (`a-b.slice` is `a.slice/a-b.slice`, and the unit is `<prefix>-<name>.scope`).
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = || HostCgroupError::BadPath(cgroups_path.into());
    let rel = if let Some(p) = cgroups_path.strip_prefix('/') {
        PathBuf::from(p)
    } else {
        let mut parts = cgroups_path.split(':');
        let (Some(slice), Some(prefix), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let mut rel = PathBuf::new();
        if !slice.is_empty() && slice != "-.slice" {
            let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
            let mut acc = String::new();
            for part in stem.split('-') {
                if part.is_empty() {
                    return Err(bad());
                }
                if !acc.is_empty() {
                    acc.push('-');
                }
                acc.push_str(part);
                rel.push(format!("{acc}.slice"));
            }
        }
        if name.is_empty() {
            return Err(bad());
        }
        rel.push(if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        });
        rel
    };
    let normal = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if rel.as_os_str().is_empty() || !normal || cgroups_path.contains('\0') {
        return Err(bad());
    }
    Ok(rel)
}

/// The directories of the cgroup `rel` in each hierarchy the VM should join.
pub fn hierarchy_dirs(root: &Path, rel: &Path) -> Result<Vec<PathBuf>, HostCgroupError> {
    Ok(hierarchies(root)?
        .into_iter()
        .map(|h| h.join(rel))
        .collect())
}

/// The root of each hierarchy the VM joins.
fn hierarchies(root: &Path) -> Result<Vec<PathBuf>, HostCgroupError> {
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.to_path_buf()]);
    }
    let dirs: Vec<PathBuf> = V1_CONTROLLERS
        .iter()
        .map(|c| root.join(c))
        .filter(|d| d.join("cgroup.procs").exists())
        .collect();
    if dirs.is_empty() {
        return Err(HostCgroupError::NoHierarchy);
    }
    Ok(dirs)
}

/// The pod's host cgroup, joined by the VM's processes.
#[derive(Debug)]
pub struct HostCgroup {
    /// The leaf directories this created (removed again), each with its hierarchy's
    /// root, one per hierarchy.
    created: Vec<(PathBuf, PathBuf)>,
}

impl HostCgroup {
    /// Creates the cgroup `cgroups_path` (under `root`) in every hierarchy the VM joins
    /// and moves `pids` into it. Undoes what it created on failure.
    pub fn join(root: &Path, cgroups_path: &str, pids: &[u32]) -> Result<Self, HostCgroupError> {
        let rel = relative_path(cgroups_path)?;
        let mut cg = HostCgroup {
            created: Vec::new(),
        };
        let result = (|| {
            for hierarchy in hierarchies(root)? {
                let dir = hierarchy.join(&rel);
                if !dir.exists() {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| HostCgroupError::Create(dir.clone(), e))?;
                    cg.created.push((hierarchy, dir.clone()));
                }
                for &pid in pids {
                    match std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                        // Gone since it was listed (a helper process of virtiofsd's
                        // sandbox setup, say): nothing left to account.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                        r => r.map_err(|source| HostCgroupError::Join {
                            pid,
                            dir: dir.clone(),
                            source,
                        })?,
                    }
                    // Then its children (a jailed VMM's waiter forks the VMM just after
                    // it starts): one forked from here on is born in the cgroup, one
                    // forked before is listed now. One that has already gone is no loss.
                    for child in crate::telemetry::children_of(pid) {
                        let _ = std::fs::write(dir.join("cgroup.procs"), child.to_string());
                    }
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    /// The leaf directories this created.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.created.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Removes the leaves this created. Processes still in one (a VM being torn down
    /// after a failed start) go back to the hierarchy's root first; the kernel may take
    /// a moment to release a cgroup whose last task just exited, so a busy one is
    /// retried briefly.
    pub fn remove(&mut self) {
        for (hierarchy, dir) in self.created.drain(..) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = std::fs::write(hierarchy.join("cgroup.procs"), pid);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if std::time::Instant::now() >= deadline => {
                        tracing::warn!("cannot remove the pod cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}

/// For cleanup after a dead shim: removes leaf cgroup directories it had created, once
/// their processes are gone. Only directories under `CGROUP_ROOT` are touched.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        let ours = dir.starts_with(CGROUP_ROOT)
            && dir.components().all(|c| !matches!(c, Component::ParentDir));
        if !ours {
            tracing::warn!("not a cgroup directory: {}", dir.display());
            continue;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::fs::remove_dir(dir).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths_are_laid_out() {
        assert_eq!(
            relative_path("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            relative_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/\
                 cri-containerd-abc.scope"
            )
        );
        for bad in [
            "",
            "/",
            "/a/../b",
            "relative/path",
            "a.slice:b",
            "x:y:z",
            "-.slice:p:",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn v1_and_v2_hierarchies_are_found() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(
            hierarchy_dirs(v2.path(), Path::new("k/p")).unwrap(),
            [v2.path().join("k/p")]
        );
        let v1 = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpuset"] {
            std::fs::create_dir(v1.path().join(c)).unwrap();
            std::fs::write(v1.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(
            hierarchy_dirs(v1.path(), Path::new("k/p")).unwrap(),
            [v1.path().join("memory/k/p"), v1.path().join("pids/k/p")]
        );
        let none = tempfile::tempdir().unwrap();
        assert!(matches!(
            hierarchy_dirs(none.path(), Path::new("k")),
            Err(HostCgroupError::NoHierarchy)
        ));
    }
}
