//! Bringing the guest's offline CPUs online. A pod's VM may be booted with more vCPUs
//! than it first needs, the rest held offline by the kernel's `maxcpus=`; when the
//! pod's CPU limits are raised, the shim asks for more and this onlines them through
//! sysfs (`/sys/devices/system/cpu/cpuN/online`), as Kata's agent does after a CPU
//! hotplug. CPUs are only ever added: taking one away under a running workload would
//! move its threads and shrink cpusets the containers were given.

use std::path::Path;

/// The CPU directory under sysfs.
pub const SYSFS_CPUS: &str = "/sys/devices/system/cpu";

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a CPU list: {text:?}")]
    List { path: String, text: String },
    #[error("cannot bring cpu{cpu} online")]
    Online {
        cpu: u32,
        #[source]
        source: std::io::Error,
    },
}

/// CPUs online after the call, and all present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Onlined {
    pub online: u32,
    pub present: u32,
}

/// Brings present CPUs online, lowest first, until `count` are online or none is left.
/// `root` is the sysfs CPU directory ([`SYSFS_CPUS`]).
pub fn online_up_to(root: &Path, count: u32) -> Result<Onlined, CpuError> {
    let present = read_list(root, "present")?;
    let mut online = read_list(root, "online")?;
    for &cpu in &present {
        if online.len() >= count as usize {
            break;
        }
        if online.contains(&cpu) {
            continue;
        }
        std::fs::write(root.join(format!("cpu{cpu}/online")), "1")
            .map_err(|source| CpuError::Online { cpu, source })?;
        online.push(cpu);
    }
    // What the kernel says now, not what was asked.
    let online = read_list(root, "online")?;
    Ok(Onlined {
        online: online.len() as u32,
        present: present.len() as u32,
    })
}

fn read_list(root: &Path, name: &str) -> Result<Vec<u32>, CpuError> {
    let path = root.join(name);
    let text = std::fs::read_to_string(&path).map_err(|source| CpuError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_list(&text).ok_or_else(|| CpuError::List {
        path: path.display().to_string(),
        text,
    })
}

/// The kernel's CPU list format, e.g. `0-3,6,8-9` (empty: none), ascending.
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
            None => {
                let n: u32 = part.parse().ok()?;
                (n, n)
            }
        };
        // The kernel has at most a few thousand CPUs: a longer range is not a list.
        if lo > hi || hi - lo > 8192 {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_read_as_the_kernel_writes_them() {
        assert_eq!(parse_list("0-3,6,8-9\n"), Some(vec![0, 1, 2, 3, 6, 8, 9]));
        assert_eq!(parse_list("0\n"), Some(vec![0]));
        assert_eq!(parse_list("\n"), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("a"), None);
        assert_eq!(parse_list("0-4294967295"), None);
    }

    /// A sysfs look-alike: `present`, `online` and a writable `cpuN/online` each.
    fn fake(present: &str, online: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("present"), present).unwrap();
        std::fs::write(d.path().join("online"), online).unwrap();
        for cpu in parse_list(present).unwrap() {
            std::fs::create_dir(d.path().join(format!("cpu{cpu}"))).unwrap();
        }
        d
    }

    #[test]
    fn offline_cpus_are_onlined_lowest_first_and_only_as_many_as_asked() {
        let d = fake("0-3\n", "0\n");
        // The fake kernel does not update `online`: what comes back is what it says.
        let got = online_up_to(d.path(), 3).unwrap();
        assert_eq!(
            got,
            Onlined {
                online: 1,
                present: 4
            }
        );
        for (cpu, written) in [(1, true), (2, true), (3, false)] {
            let f = d.path().join(format!("cpu{cpu}/online"));
            assert_eq!(f.exists(), written, "cpu{cpu}");
            if written {
                assert_eq!(std::fs::read_to_string(f).unwrap(), "1");
            }
        }
    }

    #[test]
    fn nothing_is_written_when_enough_are_online() {
        let d = fake("0-1\n", "0-1\n");
        let got = online_up_to(d.path(), 5).unwrap();
        assert_eq!(
            got,
            Onlined {
                online: 2,
                present: 2
            }
        );
        assert!(!d.path().join("cpu0/online").exists());
        assert!(!d.path().join("cpu1/online").exists());
    }

    #[test]
    fn a_cpu_that_cannot_go_online_is_named() {
        let d = fake("0-1\n", "0\n");
        std::fs::remove_dir(d.path().join("cpu1")).unwrap();
        let e = online_up_to(d.path(), 2).unwrap_err();
        assert!(e.to_string().contains("cpu1"), "{e}");
    }
}
