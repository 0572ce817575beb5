//! What a container inherits rather than asks for, as under runc: resource limits and
//! scheduling, and the kernel settings the guest kernel would size by its own small RAM
//! (open files in all, inotify and epoll watches, threads, namespaces of each kind,
//! conntrack entries, TCP buffers and queues), which read as the host's, as under runc,
//! whose containers read the host's (`hypervisor::HOST_SYSCTLS`). A 256 MiB guest allowed
//! 8 192 inotify watches and 2 048 tracked connections where this host allows 192 546
//! and 262 144.

mod ctr_common;

use cocoon_shim::hypervisor::{host_sysctl, HOST_SYSCTLS};
use ctr_common::*;

/// Limits the spec leaves out are inherited as under runc (runc's from the shim,
/// Cocoon's named by the shim), not taken from the guest's PID 1: the guest kernel
/// sizes `ulimit -u` and `-i` by the VM's RAM (850 in a 256 MiB pod, against the
/// host's 96 369 here).
#[test]
fn resource_limits_are_inherited_like_runc() {
    let out = same("ulimit", &[], &["sh", "-c", "ulimit -a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(-u)") && text.contains("(-i)"), "{text}");
}

/// A process's nice value, real-time priority and scheduling policy (`/proc/<pid>/stat`
/// fields 19, 40 and 41), its own and an exec'd child's, are runc's: the agent's runtime
/// zygote starts as `SCHED_IDLE` (out of the agent's way while it boots) and must be back
/// to `SCHED_OTHER` before it forks any container's helper.
#[test]
fn scheduling_as_under_runc() {
    let out = same(
        "sched",
        &[],
        &[
            "sh",
            "-c",
            "cut -d' ' -f19,40,41 /proc/$$/stat /proc/self/stat",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0 0 0\n0 0 0\n");
}

/// A container in a network namespace of its own (ctr's default) reads each setting as
/// a container on runc does. `kernel.pid_max` is only held to at least the host's:
/// since Linux 6.14 a host keeps it per PID namespace and a new one reads the largest
/// possible value, which the host's own bounds in fact.
#[test]
fn kernel_settings_sized_by_ram_read_as_the_hosts() {
    let exact: Vec<String> = HOST_SYSCTLS
        .iter()
        .filter(|name| **name != "kernel.pid_max")
        .filter(|name| host_sysctl_present(name))
        .map(|name| format!("/proc/sys/{}", name.replace('.', "/")))
        .collect();
    let pid_max = host_sysctl("kernel.pid_max").unwrap();
    let script = format!(
        "for f in {}; do echo $f $(cat $f); done; \
         [ $(cat /proc/sys/kernel/pid_max) -ge {pid_max} ] && echo pid_max is the hosts",
        exact.join(" ")
    );
    let out = same("host-sysctls", &[], &["sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (file, value) in [
        (
            "fs/inotify/max_user_watches",
            host_sysctl("fs.inotify.max_user_watches"),
        ),
        (
            "net/ipv4/tcp_max_tw_buckets",
            host_sysctl("net.ipv4.tcp_max_tw_buckets"),
        ),
    ] {
        let line = format!("/proc/sys/{file} {}", value.unwrap());
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    assert_eq!(text.lines().count(), exact.len() + 1, "{text}");
    assert!(text.contains("pid_max is the hosts"), "{text}");
}

fn host_sysctl_present(name: &str) -> bool {
    std::path::Path::new("/proc/sys")
        .join(name.replace('.', "/"))
        .exists()
}
