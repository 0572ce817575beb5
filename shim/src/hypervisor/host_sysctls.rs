//! Kernel settings a pod's guest reads as the host's, as a container on runc does.
//!
//! The guest kernel sizes many limits by its own small RAM at boot. A container on runc
//! reads the host's, and software notices: a file watcher fails with "System limit for
//! number of file watchers reached" (as Kata's users report), a service mesh's NAT drops
//! packets past 2 048 tracked connections. Each is given the host's value as a `sysctl.`
//! boot parameter, on either VMM. These only bound what may be asked: what is used stays
//! charged to the containers' memory cgroups and the VM's own RAM, so a pod that asks
//! too much exhausts only its own VM. (A confidential launch never takes these, since
//! they vary by node: such pods are refused before a VM boots.)

use super::VmSpec;

/// The settings read from the host. Measured on one host against a 256 MiB guest:
///
/// | sysctl | host | guest |
/// |---|---|---|
/// | `fs.file-max` | 2 466 290 | 21 736 |
/// | `fs.inotify.max_user_watches` | 192 546 | 8 192 |
/// | `kernel.threads-max` | 192 739 | 1 701 |
/// | `user.max_*_namespaces` | 96 369 | 850 |
/// | `net.netfilter.nf_conntrack_max` | 262 144 | 2 048 |
/// | `net.ipv4.tcp_max_tw_buckets` | 131 072 | 1 024 |
/// | `net.ipv4.tcp_rmem` (max) | 33 554 432 | 1 723 104 |
///
/// - `kernel.pid_max` is sized by the CPUs (systemd raises the host's to 4 194 304).
/// - `kernel.dmesg_restrict` is no limit: the host's (1 on most distributions) keeps
///   the guest kernel's log from container users without `CAP_SYSLOG`.
/// - The TCP ones are per network namespace. `tcp_rmem` and `tcp_wmem` are copied from
///   the first namespace into each new one; `tcp_max_tw_buckets` and
///   `tcp_max_syn_backlog` are computed again for each, so the agent copies them into a
///   container's own namespace (`cocoon_protocol::NETNS_COPIED_SYSCTLS`).
/// - `tcp_mem` (pages for all sockets) stays the guest's own: it is about the guest's
///   memory, which the host's would overstate.
pub const HOST_SYSCTLS: &[&str] = &[
    "fs.file-max",
    "fs.inotify.max_user_watches",
    "fs.epoll.max_user_watches",
    "kernel.threads-max",
    "kernel.pid_max",
    "kernel.dmesg_restrict",
    "user.max_user_namespaces",
    "user.max_ipc_namespaces",
    "user.max_mnt_namespaces",
    "user.max_net_namespaces",
    "user.max_pid_namespaces",
    "user.max_uts_namespaces",
    "user.max_cgroup_namespaces",
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.netfilter.nf_conntrack_max",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_max_syn_backlog",
];

impl VmSpec {
    /// The host's values of [`HOST_SYSCTLS`] as `sysctl.` parameters, the same on both
    /// VMMs; a setting the host lacks (no conntrack loaded) is left out.
    /// `kernel.threads-max` is at least what the VM may grow to (one thread per
    /// 128 KiB): the kernel sizes it once, at boot, and never again.
    pub fn limit_kernel_params(&self) -> Vec<String> {
        let grown = (u64::from(self.memory_mib) + u64::from(self.hotplug_mib)) * 8;
        HOST_SYSCTLS
            .iter()
            .filter_map(|name| {
                let mut value = host_sysctl_words(name)?;
                if *name == "kernel.threads-max" {
                    let host: u64 = value.parse().ok()?;
                    value = host.max(grown).to_string();
                }
                Some(sysctl_param(name, &value))
            })
            .collect()
    }
}

/// `sysctl.<name>=<value>`, quoted where the value has several words (the kernel takes
/// the quotes off).
fn sysctl_param(name: &str, value: &str) -> String {
    if value.contains(' ') {
        format!("sysctl.{name}=\"{value}\"")
    } else {
        format!("sysctl.{name}={value}")
    }
}

/// The host's value of the numeric sysctl `name` (dotted, as `fs.file-max`).
pub fn host_sysctl(name: &str) -> Option<u64> {
    host_sysctl_words(name)?.parse().ok()
}

/// The host's value of `name` as numbers joined by one space (`tcp_rmem` has three);
/// `None` where it is missing or holds anything but numbers, so that nothing else can
/// reach the command line.
pub fn host_sysctl_words(name: &str) -> Option<String> {
    let path = std::path::Path::new("/proc/sys").join(name.replace('.', "/"));
    numbers(&std::fs::read_to_string(path).ok()?)
}

fn numbers(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let all_numbers = words.iter().all(|w| w.parse::<u64>().is_ok());
    (!words.is_empty() && all_numbers).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numbers_reach_the_command_line() {
        assert_eq!(
            numbers("4096\t131072\t33554432\n").as_deref(),
            Some("4096 131072 33554432")
        );
        assert_eq!(numbers("1\n").as_deref(), Some("1"));
        for bad in ["", "\n", "4096 x", "-1", "1 init=/bin/sh"] {
            assert_eq!(numbers(bad), None, "{bad:?}");
        }
        assert_eq!(
            sysctl_param("net.ipv4.tcp_rmem", "4096 131072 33554432"),
            "sysctl.net.ipv4.tcp_rmem=\"4096 131072 33554432\""
        );
        assert_eq!(
            sysctl_param("kernel.pid_max", "32768"),
            "sysctl.kernel.pid_max=32768"
        );
    }

    #[test]
    fn limits_are_the_hosts_and_threads_cover_growth() {
        let mut spec = crate::hypervisor::tests::bare_spec("limits", "/k", "/i", 256);
        let params = spec.limit_kernel_params();
        let on_host = HOST_SYSCTLS
            .iter()
            .filter(|n| host_sysctl_words(n).is_some());
        assert_eq!(params.len(), on_host.count(), "{params:?}");
        let file_max = format!("sysctl.fs.file-max={}", host_sysctl("fs.file-max").unwrap());
        assert!(params.contains(&file_max), "{params:?}");
        let rmem = host_sysctl_words("net.ipv4.tcp_rmem").unwrap();
        assert!(params.contains(&format!("sysctl.net.ipv4.tcp_rmem=\"{rmem}\"")));
        // Room to grow far beyond the host's thread table: the growth wins.
        spec.hotplug_mib = 1 << 20;
        let threads = format!("sysctl.kernel.threads-max={}", (256u64 + (1 << 20)) * 8);
        assert!(spec.limit_kernel_params().contains(&threads));
    }

    #[test]
    fn the_copied_ones_are_read_from_the_host_too() {
        for name in cocoon_protocol::NETNS_COPIED_SYSCTLS {
            assert!(HOST_SYSCTLS.contains(name), "{name}");
        }
    }
}
