//! The runtime zygote (`runtime::zygote`): the agent's single-threaded fork that forks
//! each container's runtime helper. It must serve every create and exec, keep nothing
//! from them (no children, no descriptors), and end with the agent.

mod common;

use std::time::Duration;

use common::*;

/// The processes whose parent is `pid` (zombies included), with their names.
fn children_of(pid: i32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // "pid (comm) state ppid ...": the comm may hold spaces, so split at the last ')'.
            let (head, tail) = stat.rsplit_once(')')?;
            let ppid: i32 = tail.split_whitespace().nth(1)?.parse().ok()?;
            let comm = head.split_once('(')?.1;
            (ppid == pid).then(|| (p, comm.to_string()))
        })
        .collect()
}

/// The agent's children named `cocoon-zygote`.
fn zygotes_of(agent: i32) -> Vec<i32> {
    children_of(agent)
        .into_iter()
        .filter(|(_, comm)| comm == "cocoon-zygote")
        .map(|(pid, _)| pid)
        .collect()
}

/// Whether this process may lower an `oom_score_adj` (CAP_SYS_RESOURCE, bit 24).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    const CAP_SYS_RESOURCE: u32 = 24;
    eff & (1 << CAP_SYS_RESOURCE) != 0
}

fn fds_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_zygote_forks_every_helper_keeps_nothing_and_ends_with_the_agent() {
    require_root!();
    let agent = Agent::start().await;
    // The zygote names itself just after its fork, which may be after the agent listens
    // (seen once under load).
    let zygote = poll("the agent's one zygote", Duration::from_secs(10), || {
        let z = zygotes_of(agent.pid());
        (z.len() == 1).then(|| z[0])
    })
    .await;
    let fds_before = fds_of(zygote);
    assert!(fds_before > 0, "cannot read the zygote's descriptors");

    let rootfs = busybox_rootfs(agent.dir.path());
    let (status, out, _) = agent.run("first", &spec(&rootfs, &["echo", "made"])).await;
    assert_eq!((status, out.as_slice()), (0, b"made\n".as_slice()));
    let init = agent
        .create(
            "probe",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    // Until its execve the container's init is a fork of the helper, so it has the name
    // the zygote gives each helper (an exec'd helper would be "exe").
    let comm = std::fs::read_to_string(format!("/proc/{init}/comm")).unwrap();
    assert_eq!(
        comm, "cocoon-runtime\n",
        "the helper did not come from the zygote"
    );
    // The zygote is out of the OOM killer's reach; what it forks is not (the spec names
    // no oomScoreAdj, so the container keeps the agent's own, as exec'd helpers did).
    let adj = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    // Lowering it takes CAP_SYS_RESOURCE, which the guest's agent has and a test host's
    // root may lack (this one's container does): then the zygote keeps the agent's.
    let protected = if has_cap_sys_resource() {
        "-1000\n".to_string()
    } else {
        adj(agent.pid())
    };
    assert_eq!(adj(zygote), protected);
    assert_eq!(adj(init as i32), adj(agent.pid()));
    agent.start_container("probe").await.unwrap();
    for i in 0..10 {
        let id = format!("probe-{i}");
        agent
            .exec(
                "probe",
                &id,
                &process(&["echo", &id]),
                streams(false, true, false),
            )
            .await
            .unwrap();
        let mut out = agent.stream("stdout", "probe", &id).await;
        assert_eq!(read_all(&mut out).await, format!("{id}\n").into_bytes());
        assert_eq!(agent.wait("probe", &id).await.unwrap().status, 0);
    }

    // Each helper has ended and been reaped by the kernel (no zombies under the zygote);
    // the descriptors each request brought were closed.
    poll(
        "the zygote to have no children",
        Duration::from_secs(10),
        || children_of(zygote).is_empty().then_some(()),
    )
    .await;
    assert_eq!(fds_of(zygote), fds_before, "the zygote's descriptors grew");
    assert_eq!(zygotes_of(agent.pid()), vec![zygote], "a second zygote");
    agent.remove("probe").await.unwrap();

    // It ends with the agent, also when the agent is killed.
    drop(agent);
    poll(
        "the zygote to end with the agent",
        Duration::from_secs(10),
        || (!std::path::Path::new(&format!("/proc/{zygote}")).exists()).then_some(()),
    )
    .await;
}

/// Without a zygote (`--no-zygote`, as when it cannot start) the agent exec's each helper
/// and containers run the same.
#[tokio::test]
async fn without_the_zygote_helpers_are_execd() {
    require_root!();
    let agent = Agent::start_with(&["--no-zygote"]).await;
    assert_eq!(zygotes_of(agent.pid()), Vec::<i32>::new());
    let rootfs = busybox_rootfs(agent.dir.path());
    let init = agent
        .create(
            "probe",
            &spec(&rootfs, &["echo", "made"]),
            streams(false, true, false),
        )
        .await
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{init}/comm")).unwrap();
    assert_eq!(comm, "exe\n", "an exec'd helper's fork");
    let mut out = agent.stream("stdout", "probe", "").await;
    agent.start_container("probe").await.unwrap();
    assert_eq!(read_all(&mut out).await, b"made\n");
    assert_eq!(agent.wait("probe", "").await.unwrap().status, 0);
    agent.remove("probe").await.unwrap();
}
