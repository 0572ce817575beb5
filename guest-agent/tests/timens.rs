//! Time namespaces (runtime spec 1.1: `{"type": "time"}` and `linux.timeOffsets`), as
//! runc 1.2 makes them, against the agent binary in its dev mode and this host's kernel.
//! Not through `ctr`: containerd 1.6 reads the spec with runtime-spec 1.0's types and
//! drops `timeOffsets`. Needs root, like `containers.rs`.

mod common;

use common::*;
use serde_json::json;

/// Ten days, in seconds: far beyond this host's uptime in any test run.
const BOOTTIME_OFFSET: u64 = 864_000;

fn uptime(out: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(out);
    text.split('.')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {text:?}"))
}

fn with_time_ns(
    rootfs: &std::path::Path,
    args: &[&str],
    offsets: serde_json::Value,
) -> serde_json::Value {
    let mut s = spec(rootfs, args);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "time"}));
    s["linux"]["timeOffsets"] = offsets;
    s
}

#[tokio::test]
async fn a_time_namespace_offsets_the_boot_clock_for_the_init_and_its_execs() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let host = uptime(std::fs::read_to_string("/proc/uptime").unwrap().as_bytes());
    let offsets = json!({"boottime": {"secs": BOOTTIME_OFFSET}, "monotonic": {"secs": 3600}});

    let (status, out, err) = agent
        .run(
            "timens",
            &with_time_ns(&rootfs, &["cat", "/proc/uptime"], offsets.clone()),
        )
        .await;
    assert_eq!((status, String::from_utf8_lossy(&err).as_ref()), (0, ""));
    let up = uptime(&out);
    assert!(
        (host + BOOTTIME_OFFSET..host + BOOTTIME_OFFSET + 600).contains(&up),
        "the container's uptime {up} s should be the host's {host} s plus {BOOTTIME_OFFSET}"
    );

    // An exec joins the container's time namespace.
    agent
        .create(
            "timens-exec",
            &with_time_ns(&rootfs, &["sleep", "1000"], offsets),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("timens-exec").await.unwrap();
    agent
        .exec(
            "timens-exec",
            "up",
            &process(&["cat", "/proc/uptime"]),
            streams(false, true, false),
        )
        .await
        .unwrap();
    let mut stdout = agent.stream("stdout", "timens-exec", "up").await;
    let up = uptime(&read_all(&mut stdout).await);
    assert!(
        up >= host + BOOTTIME_OFFSET,
        "the exec's uptime {up} s is the host's"
    );
    assert_eq!(agent.wait("timens-exec", "up").await.unwrap().status, 0);
    agent.signal("timens-exec", "", 9, true).await.unwrap();
    agent.wait("timens-exec", "").await.unwrap();
    agent.remove("timens-exec").await.unwrap();
}

#[tokio::test]
async fn offsets_a_time_namespace_cannot_take_are_refused_by_name() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let err = agent
        .create(
            "timens-bad",
            &with_time_ns(&rootfs, &["true"], json!({"realtime": {"secs": 1}})),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("realtime"), "{err:?}");

    let mut no_ns = spec(&rootfs, &["true"]);
    no_ns["linux"]["timeOffsets"] = json!({"boottime": {"secs": 1}});
    let err = agent
        .create("timens-none", &no_ns, streams(false, false, false))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("without a new time namespace"),
        "{err:?}"
    );
}
