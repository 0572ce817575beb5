//! Bind mounts' recursive attributes (`rro`, `rnoexec`, ...), which containerd 2's CRI
//! (a volume with `recursiveReadOnly: Enabled`), Docker and nerdctl send, and the
//! other options runc knows (`nosymfollow`), against runc.

mod ctr_common;

use std::os::unix::fs::PermissionsExt;

use ctr_common::*;

const CHECK: &str = r#"
for p in /rro /rro/nested; do
  if touch $p/w-$0 2>/dev/null; then echo "$p writable"; else echo "$p read-only"; fi
done
for s in /rro/nested/s.sh /rnx/s.sh /rnx/nested/s.sh; do
  if $s >/dev/null 2>&1; then echo "$s ran"; else echo "$s refused"; fi
done
for l in /rro/link /nsf/link; do
  if cat $l >/dev/null 2>&1; then echo "$l followed"; else echo "$l not followed"; fi
done
"#;

const EXPECTED: &str = "/rro read-only\n/rro/nested read-only\n/rro/nested/s.sh ran\n\
                        /rnx/s.sh refused\n/rnx/nested/s.sh refused\n\
                        /rro/link followed\n/nsf/link not followed\n";

#[test]
fn mount_options_and_recursive_attributes_act_as_under_runc() {
    let env = env();
    let host = env.containerd.dir.join("recursive");
    std::fs::create_dir_all(host.join("nested")).unwrap();
    // A mount inside the volume: the recursive attributes must reach it.
    let _nested = TmpfsMount::on(&host.join("nested"));
    for script in [host.join("s.sh"), host.join("nested/s.sh")] {
        std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    std::os::unix::fs::symlink("s.sh", host.join("link")).unwrap();
    let h = host.display();
    let rro = format!("type=bind,src={h},dst=/rro,options=rbind:rprivate:rro");
    let rnoexec = format!("type=bind,src={h},dst=/rnx,options=rbind:rnoexec");
    let nosymfollow = format!("type=bind,src={h},dst=/nsf,options=rbind:nosymfollow");
    let flags = [
        "--mount",
        &rro,
        "--mount",
        &rnoexec,
        "--mount",
        &nosymfollow,
    ];
    for runtime in [RUNC, COCOON] {
        let name = runtime_id("rec", runtime);
        let o = ctr_run(&env, runtime, &name, &flags, &["sh", "-c", CHECK, &name]);
        assert_eq!(
            (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
            (Some(0), EXPECTED),
            "{runtime}: {}",
            show(&o)
        );
    }
    let written: Vec<_> = [host.clone(), host.join("nested")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("w-"))
        .collect();
    assert!(
        written.is_empty(),
        "a read-only volume was written: {written:?}"
    );
    assert_clean(&env);
}

/// While a container runs with a volume, the node unmounts a mount inside the volume
/// and removes its directory (critest's recursive read-only case cleans up so). Under
/// runc the volume's copy is in the container's mount namespace and the removal
/// detaches it there; a Cocoon pod's share is in a namespace of the pod's own
/// (`shimv2::podns`), so the same holds. It used to fail with EBUSY while the pod ran.
#[test]
fn the_node_removes_a_mount_point_inside_a_running_containers_volume() {
    let env = env();
    for runtime in [RUNC, COCOON] {
        let host = env
            .containerd
            .dir
            .join(format!("vol-{}", runtime_id("rm", runtime)));
        std::fs::create_dir_all(host.join("sub")).unwrap();
        let sub = TmpfsMount::on(&host.join("sub"));
        std::fs::write(host.join("sub/f"), "on the node's mount").unwrap();
        let mount = format!("type=bind,src={},dst=/vol,options=rbind:rw", host.display());
        let id = runtime_id("rmdir", runtime);
        with_detached(&env, runtime, &id, &["--mount", &mount], |env, id| {
            let seen = exec_output(env, id, "cat", &["cat", "/vol/sub/f"], "node's");
            assert_eq!(seen, "on the node's mount", "{runtime}");
            drop(sub);
            std::fs::remove_dir(host.join("sub")).unwrap_or_else(|e| {
                panic!("{runtime}: the node cannot remove the volume's emptied mount point: {e}")
            });
            let ls = exec_output(env, id, "ls", &["sh", "-c", "ls /vol; echo end"], "end");
            assert_eq!(ls, "end\n", "{runtime}: the container still sees it");
        });
    }
    assert_clean(&env);
}

/// The read-only paths of a container's `/proc` (`/proc/sys`, `/proc/bus`, ...) and a
/// read-only root keep the other flags of their mount, as under runc: a read-only
/// remount once dropped the proc mount's `nosuid,nodev,noexec` from them.
#[test]
fn read_only_paths_keep_their_mount_flags_as_under_runc() {
    // Mount point and per-mount options of each.
    let script = "grep -E ' /proc/(sys|bus|fs|irq) | / ' /proc/self/mountinfo | cut -d' ' -f5,6";
    let out = same("ro-flags", &["--read-only"], &["sh", "-c", script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/proc/sys ro,nosuid,nodev,noexec,relatime\n"),
        "{}",
        show(&out)
    );
    assert!(text.starts_with("/ ro,"), "{}", show(&out));
}
