//! Limits the guest kernel would size by its own small RAM (open files in all, inotify
//! and epoll watches, threads, namespaces of each kind) read as the host's, as under
//! runc, whose containers read the host's (`hypervisor::HOST_LIMITS`). A 256 MiB guest
//! allowed 8 192 inotify watches and 21 736 open files where this host allows 192 546
//! and 2 466 290.

mod ctr_common;

use ctr_common::*;

#[test]
fn kernel_limits_sized_by_ram_read_as_the_hosts() {
    let files: Vec<String> = cocoon_shim::hypervisor::HOST_LIMITS
        .iter()
        .map(|name| format!("/proc/sys/{}", name.replace('.', "/")))
        .collect();
    let script = format!("for f in {}; do echo $f $(cat $f); done", files.join(" "));
    let out = same("host-limits", &[], &["sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    let watches = cocoon_shim::hypervisor::host_sysctl("fs.inotify.max_user_watches").unwrap();
    assert!(
        text.contains(&format!("/proc/sys/fs/inotify/max_user_watches {watches}")),
        "{text}"
    );
    assert_eq!(text.lines().count(), files.len(), "{text}");
}
