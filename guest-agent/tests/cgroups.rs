//! End-to-end tests of containers in cgroup v2 groups, against the agent in
//! its dev mode (see `containers.rs`). A cgroup v1 host has no v2 hierarchy at
//! /sys/fs/cgroup, so they use the hybrid hierarchy's `unified` (no
//! controllers: placement, freeze, pids, the cgroup namespace) and skip
//! without one. Limits need controllers: the ctr tests check them in-guest.

mod common;

use std::time::Duration;

use cocoon_protocol::agent::ContainerRequest;
use common::*;
use serde_json::json;

/// Removes a test's cgroup tree (leaves first), even after a failed assert.
struct CgroupTree(std::path::PathBuf);

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let parent = self.0.join("cocoon");
        if let Ok(dirs) = std::fs::read_dir(&parent) {
            for d in dirs.flatten() {
                let _ = std::fs::remove_dir(d.path());
            }
        }
        let _ = std::fs::remove_dir(&parent);
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn cgroup_v2_pause_resume_pids_and_cleanup() {
    require_root!();
    // This host's /sys/fs/cgroup is v1; its unified hierarchy has no
    // controllers but does have cgroup.procs, cgroup.freeze and cpu.stat.
    // Limits, memory stats and OOM events need controllers: unit tests and
    // the in-guest tests cover those.
    let Some(unified) = cgroup2_parent() else {
        cocoon_nested::testing::missing(
            "cgroup_v2_pause_resume_pids_and_cleanup",
            "no cgroup v2 hierarchy",
        );
        return;
    };
    let root = unified.join(format!("cocoon-test-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let tree = CgroupTree(root.clone());
    let agent = Agent::start_with(&["--cgroup-root", root.to_str().unwrap()]).await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let group = root.join("cocoon/cg");
    let init = agent
        .create(
            "cg",
            &spec(&rootfs, &sh("sleep 1000 & wait")),
            streams(false, false, false),
        )
        .await
        .unwrap();
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == init.to_string()), "{procs}");
    agent.start_container("cg").await.unwrap();
    let exec = agent
        .exec(
            "cg",
            "e",
            &process(&["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();

    // Pids come from cgroup.procs: init, its sleep, and the exec.
    let mut req = ContainerRequest::new();
    req.container_id = "cg".into();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let r = agent.client.list_pids(ctx(), &req).await.unwrap();
        if r.processes.len() == 3 {
            break r.processes;
        }
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(listed.iter().any(|p| p.pid == init && p.exec_id.is_empty()));
    assert!(listed.iter().any(|p| p.pid == exec && p.exec_id == "e"));

    agent.client.pause_container(ctx(), &req).await.unwrap();
    let events = std::fs::read_to_string(group.join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    let err = agent
        .exec(
            "cg",
            "e2",
            &process(&["true"]),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("FAILED_PRECONDITION"),
        "{err:?}"
    );
    agent.client.resume_container(ctx(), &req).await.unwrap();
    let events = std::fs::read_to_string(group.join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 0"), "{events}");

    let stats = agent.client.stats_container(ctx(), &req).await.unwrap();
    assert!(stats.cpu.is_some());

    // Signal-all reaches every process in the group.
    agent.signal("cg", "", libc::SIGKILL, true).await.unwrap();
    assert_eq!(agent.wait("cg", "").await.unwrap().status, 137);
    assert_eq!(agent.wait("cg", "e").await.unwrap().status, 137);
    agent.remove("cg").await.unwrap();
    assert!(!group.exists());
    drop(tree);
    assert!(!root.exists());
}

/// A cgroup v2 directory the tests may create groups in: the hybrid
/// hierarchy's `unified`, or the root of a pure v2 host.
fn cgroup2_parent() -> Option<std::path::PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

#[tokio::test]
async fn cgroup_namespace_shows_the_containers_own_group() {
    require_root!();
    let Some(parent) = cgroup2_parent() else {
        cocoon_nested::testing::missing(
            "cgroup_namespace_shows_the_containers_own_group",
            "no cgroup v2 hierarchy",
        );
        return;
    };
    let root = parent.join(format!("cocoon-ns-test-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let _tree = CgroupTree(root.clone());
    let agent = Agent::start_with(&["--cgroup-root", root.to_str().unwrap()]).await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut s = spec(
        &rootfs,
        &sh(
            "cat /proc/self/cgroup; echo procs $(cat /sys/fs/cgroup/cgroup.procs); \
             mkdir /sys/fs/cgroup/x 2>/dev/null && echo cgroupfs-rw || echo cgroupfs-ro; \
             grep ' /sys/fs/cgroup ' /proc/self/mountinfo; \
             cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max 2>/dev/null; \
             echo done; exec sleep 1000",
        ),
    );
    // containerd on a cgroup v1 host writes no cgroup namespace; the guest
    // is v2, where runc would have one.
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "cgroup");
    // Limits need the memory and cpu controllers, which a hybrid host keeps
    // in v1: only a host that delegates them to v2 can check those here.
    let delegated =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    let limits = ["memory", "cpu"]
        .iter()
        .all(|c| delegated.split_whitespace().any(|d| d == *c));
    if limits {
        s["linux"]["resources"]["memory"] = json!({"limit": 67108864});
        s["linux"]["resources"]["cpu"] = json!({"quota": 50000, "period": 100000});
    } else {
        eprintln!("memory.max and cpu.max unchecked: no memory and cpu controllers in v2");
    }
    agent
        .create("cgns", &s, streams(false, true, false))
        .await
        .unwrap();
    let mut out = agent.stream("stdout", "cgns", "").await;
    agent.start_container("cgns").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut out, &mut got, "done\n").await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    // The namespace's root is the container's group...
    assert!(lines.contains(&"0::/"), "{text}");
    // ...which is what /sys/fs/cgroup shows: only the container's
    // processes, by their pids in its pid namespace.
    let procs: Vec<u32> = lines
        .iter()
        .find_map(|l| l.strip_prefix("procs "))
        .unwrap_or_else(|| panic!("{text}"))
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        procs.contains(&1) && procs.iter().all(|p| *p < 100),
        "{text}"
    );
    assert!(lines.contains(&"cgroupfs-ro"), "{text}");
    let mount = lines
        .iter()
        .find(|l| l.contains(" /sys/fs/cgroup "))
        .unwrap_or_else(|| panic!("{text}"));
    let fields: Vec<&str> = mount.split(' ').collect();
    assert_eq!(fields[3], "/", "{mount}");
    assert!(fields[5].starts_with("ro,nosuid,nodev,noexec"), "{mount}");
    assert!(mount.contains(" - cgroup2 "), "{mount}");
    if limits {
        assert!(text.contains("\n67108864\n50000 100000\n"), "{text}");
    }

    // An exec joins the same namespace.
    agent
        .exec(
            "cgns",
            "e",
            &process(&["cat", "/proc/self/cgroup"]),
            streams(false, true, false),
        )
        .await
        .unwrap();
    let mut exec_out = agent.stream("stdout", "cgns", "e").await;
    let exec_text = String::from_utf8(read_all(&mut exec_out).await).unwrap();
    assert!(exec_text.lines().any(|l| l == "0::/"), "{exec_text}");
    assert_eq!(agent.wait("cgns", "e").await.unwrap().status, 0);
    agent.remove("cgns").await.unwrap();
}
