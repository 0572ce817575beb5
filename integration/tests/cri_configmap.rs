//! A ConfigMap volume that kubelet updates while its pod runs: the update reaches the
//! container, read-only, and an application watching the volume with inotify sees
//! kubelet's `..data` swap (`IN_MOVED_TO`), under runc and under cocoon. Under cocoon the
//! agent keeps a copy of the volume on a guest tmpfs (`guest-agent/src/watched.rs`):
//! through virtio-fs alone the guest kernel raises no event for a host's change.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use common::env;

#[tokio::test]
async fn runc_a_configmap_update_reaches_the_container() {
    configmap_update("runc_a_configmap_update_reaches_the_container", RUNC, 84).await;
}

#[tokio::test]
async fn cocoon_a_configmap_update_reaches_the_container() {
    configmap_update(
        "cocoon_a_configmap_update_reaches_the_container",
        COCOON,
        85,
    )
    .await;
}

/// Prints `ready`, then one line per event in the directory it is given: what a
/// reloading application waits for. Static: the test image has no C library (and its
/// busybox no `inotifyd`).
const WATCH_C: &str = r#"
#include <stdio.h>
#include <sys/inotify.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = inotify_init();
    if (argc < 2 || fd < 0 || inotify_add_watch(fd, argv[1], IN_MOVED_TO | IN_CREATE) < 0) {
        perror("inotify");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            return 1;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            printf("%s %s\n", (e->mask & IN_MOVED_TO) ? "moved_to" : "create", e->len ? e->name : "");
            fflush(stdout);
            p += sizeof *e + e->len;
        }
    }
}
"#;

/// kubelet's atomic writer: the files in a fresh `..<ts>` directory, `..data` swapped to
/// it by a rename, a link per key, and the old directory removed.
fn atomic_write(volume: &Path, ts: &str, old: Option<&str>, conf: &str) {
    std::fs::create_dir(volume.join(ts)).unwrap();
    std::fs::write(volume.join(ts).join("app.conf"), conf).unwrap();
    let tmp = volume.join("..data_tmp");
    std::os::unix::fs::symlink(ts, &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
    if std::fs::symlink_metadata(volume.join("app.conf")).is_err() {
        std::os::unix::fs::symlink("..data/app.conf", volume.join("app.conf")).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(volume.join(old)).unwrap();
    }
}

/// Waits until the container's CRI log has a line ending in `what`.
fn wait_for_log(log: &Path, what: &str, deadline: Instant) -> Result<(), String> {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.ends_with(what)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no {what:?} in {}:\n{text}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn configmap_update(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let tools = env.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    if let Err(why) = cocoon_integration::build_static_c(&tools, "watch", WATCH_C) {
        cocoon_nested::testing::missing(test, &why);
        return;
    }
    // Where kubelet keeps a ConfigMap volume (the shim knows it by this path).
    let volume = env
        .dir
        .path()
        .join("pods/uid-cm/volumes/kubernetes.io~configmap/cfg");
    std::fs::create_dir_all(&volume).unwrap();
    atomic_write(&volume, "..2026_12_02_01", None, "v1\n");
    let pconfig = node.pod_config("configured", "uid-cm", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["/tools/watch", "/etc/config"], &[]);
    let mount = |host: &Path, container: &str| k8s_cri::v1::Mount {
        host_path: host.to_string_lossy().into_owned(),
        container_path: container.into(),
        readonly: true,
        ..Default::default()
    };
    c.mounts = vec![mount(&volume, "/etc/config"), mount(&tools, "/tools")];
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let log = Path::new(&pconfig.log_directory).join("app/0.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_for_log(&log, " ready", deadline).unwrap_or_else(|e| panic!("{test}: {e}"));
    let run = |script: &'static str| {
        let ctr = ctr.clone();
        async move {
            let (code, out, err) = node
                .exec_sync(&ctr, &["sh", "-c", script], Duration::from_secs(30))
                .await
                .expect("ExecSync");
            assert_eq!(code, 0, "{script}: {out}{err}");
            out
        }
    };
    assert_eq!(
        run("cat /etc/config/app.conf; touch /etc/config/x 2>/dev/null || echo read-only").await,
        "v1\nread-only\n",
        "{test}"
    );
    if handler == COCOON {
        let fs = run("awk '$2 == \"/etc/config\" {print $3}' /proc/mounts").await;
        assert_eq!(fs, "tmpfs\n", "{test}: the guest's copy");
    }

    atomic_write(&volume, "..2026_12_02_02", Some("..2026_12_02_01"), "v2\n");
    // The event a reloading application waits for, then the new files only.
    let deadline = Instant::now() + Duration::from_secs(15);
    wait_for_log(&log, " moved_to ..data", deadline).unwrap_or_else(|e| panic!("{test}: {e}"));
    loop {
        let seen = run("cat /etc/config/app.conf; ls -a /etc/config | grep -c '^\\.\\.2026'").await;
        if seen == "v2\n1\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: still {seen:?} 15 s after the update"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}
