//! Kernel settings the guest kernel would size by its own small RAM (open files in all,
//! inotify and epoll watches, threads, namespaces of each kind, conntrack entries, TCP
//! buffers and queues) read as the host's, as under runc, whose containers read the
//! host's (`hypervisor::HOST_SYSCTLS`). A 256 MiB guest allowed 8 192 inotify watches
//! and 2 048 tracked connections where this host allows 192 546 and 262 144.

mod ctr_common;

use cocoon_shim::hypervisor::{host_sysctl, HOST_SYSCTLS};
use ctr_common::*;

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
