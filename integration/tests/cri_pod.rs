//! What a pod's container sees of what kubelet asked for (hostname, DNS, /etc/hosts,
//! hostPath volumes, /dev/shm, sysctls, securityContext), under runc and under cocoon:
//! the two reports must be the same.

mod common;

use std::path::Path;
use std::time::Duration;

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use common::env;
use k8s_cri::v1::{
    security_profile::ProfileType, Capability, Int64Value, LinuxContainerResources, Mount,
    SecurityProfile,
};

const RUNC_NET: u8 = 15;
const COCOON_NET: u8 = 26;

/// Printed by the container: one item per line, nothing that differs between two
/// correct runs (no IPs, pids or times).
const REPORT: &str = r#"
echo "hostname: $(hostname)"
echo "etc-hostname: $(cat /etc/hostname)"
echo "resolv.conf:"; cat /etc/resolv.conf
echo "hosts:"; cat /etc/hosts
echo "id: $(id)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
touch /rootfs-probe 2>/dev/null && echo "rootfs: writable" || echo "rootfs: read-only"
echo hello > /data-rw/out 2>/dev/null && echo "rw volume: writable" || echo "rw volume: refused"
echo hello > /data-ro/out 2>/dev/null && echo "ro volume: writable" || echo "ro volume: refused"
echo "ro volume holds: $(cat /data-ro/in)"
echo "file volume holds: $(cat /config.txt)"
echo "shm: $(awk '$2 == "/dev/shm" {print $3}' /proc/mounts)"
echo shared > /dev/shm/probe 2>/dev/null && echo "shm: writable" || echo "shm: refused"
echo "sysctl shm_rmid_forced: $(cat /proc/sys/kernel/shm_rmid_forced)"
echo "sysctl unprivileged ports from: $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
echo "termination-log: $(test -f /dev/termination-log && echo present || echo absent)"
echo "open files: $(ulimit -n) $(ulimit -Hn)"
for s in fs/inotify/max_user_watches kernel/dmesg_restrict net/netfilter/nf_conntrack_max \
    net/ipv4/tcp_max_tw_buckets net/ipv4/tcp_max_syn_backlog net/ipv4/tcp_rmem; do
  echo "$s: $(cat /proc/sys/$s)"
done
"#;

/// Runs the report in a pod on `handler` and returns it, with the host side of the
/// rw volume.
async fn observe(test: &str, handler: &str, net: u8) -> Option<(String, String)> {
    let env = env(test, handler, net).await?;
    let node = &env.node;
    let vols = env.dir.path().join("volumes");
    for d in ["rw", "ro"] {
        std::fs::create_dir_all(vols.join(d)).unwrap();
    }
    // The container runs as uid 1000: the rw volume is open to it, as an emptyDir is.
    std::fs::set_permissions(
        vols.join("rw"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    std::fs::write(vols.join("ro/in"), "from the host\n").unwrap();
    std::fs::write(vols.join("config.txt"), "a config file\n").unwrap();

    let mut pconfig = node.pod_config("web-0", "uid-web-0", "default");
    if let Some(linux) = pconfig.linux.as_mut() {
        linux
            .sysctls
            .insert("kernel.shm_rmid_forced".into(), "1".into());
        linux
            .sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
    }
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    let mount = |host: &Path, container: &str, readonly: bool| Mount {
        host_path: host.to_string_lossy().into_owned(),
        container_path: container.into(),
        readonly,
        ..Default::default()
    };
    c.mounts = vec![
        mount(&vols.join("rw"), "/data-rw", false),
        mount(&vols.join("ro"), "/data-ro", true),
        mount(&vols.join("config.txt"), "/config.txt", true),
    ];
    let sc = c
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("container_config sets a security context");
    sc.run_as_user = Some(Int64Value { value: 1000 });
    sc.run_as_group = Some(Int64Value { value: 2000 });
    sc.supplemental_groups = vec![3000];
    sc.readonly_rootfs = true;
    sc.no_new_privs = true;
    sc.capabilities = Some(Capability {
        add_capabilities: vec!["NET_BIND_SERVICE".into()],
        drop_capabilities: vec!["ALL".into()],
        ..Default::default()
    });
    sc.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&ctr, &["sh", "-c", REPORT], Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{test}: ExecSync: {e}"));
    assert_eq!(code, 0, "{test}: the report failed: {err}\n{out}");
    let written = std::fs::read_to_string(vols.join("rw/out")).unwrap_or_default();
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    Some((out, written))
}

#[tokio::test]
async fn pod_environment_matches_runc() {
    let test = "pod_environment_matches_runc";
    let (runc, cocoon) = tokio::join!(
        observe(test, RUNC, RUNC_NET),
        observe(test, COCOON, COCOON_NET)
    );
    let (Some((runc, runc_written)), Some((cocoon, cocoon_written))) = (runc, cocoon) else {
        return;
    };
    // The baseline itself must show what was asked for, or the comparison means little.
    for expected in [
        "hostname: web-0",
        "nameserver 198.18.",
        "search default.svc.cluster.local",
        "options ndots:5",
        "id: uid=1000(user) gid=2000(extra) groups=2000(extra),3000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "rootfs: read-only",
        "rw volume: writable",
        "ro volume: refused",
        "ro volume holds: from the host",
        "file volume holds: a config file",
        "shm: tmpfs",
        "sysctl shm_rmid_forced: 1",
        "sysctl unprivileged ports from: 80",
    ] {
        assert!(
            runc.contains(expected),
            "runc's report lacks {expected:?}:\n{runc}"
        );
    }
    // Limits a guest would size by its RAM read as the host's (`HOST_SYSCTLS`).
    for name in ["fs.inotify.max_user_watches", "net.ipv4.tcp_max_tw_buckets"] {
        let value = cocoon_shim::hypervisor::host_sysctl(name).unwrap();
        let line = format!("{}: {value}", name.replace('.', "/"));
        assert!(
            runc.contains(&line),
            "runc's report lacks {line:?}:\n{runc}"
        );
    }
    assert_eq!(
        runc_written, "hello\n",
        "runc: the rw volume's write reached the host"
    );
    // The nameserver is each node's own bridge; everything else must match exactly.
    let normalize = |s: &str| {
        s.lines()
            .map(|l| match l.strip_prefix("nameserver 198.18.") {
                Some(_) => "nameserver <bridge>".to_string(),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        normalize(&cocoon),
        normalize(&runc),
        "cocoon's pod differs from runc's (left: cocoon, right: runc)"
    );
    assert_eq!(
        cocoon_written, "hello\n",
        "cocoon: the rw volume's write reached the host"
    );
}

const COCOON_SIZED_NET: u8 = 28;

/// A pod's annotations size its VM (containerd passes `io.cocoon.*` to the runtime);
/// a bad value is refused with the annotation's name.
#[tokio::test]
async fn cocoon_pod_vm_is_sized_by_its_annotations() {
    let test = "cocoon_pod_vm_is_sized_by_its_annotations";
    let Some(env) = env(test, COCOON, COCOON_SIZED_NET).await else {
        return;
    };
    let node = &env.node;
    let mut pconfig = node.pod_config("sized", "uid-sized", "default");
    pconfig
        .annotations
        .insert("io.cocoon.vm.vcpus".into(), "2".into());
    pconfig
        .annotations
        .insert("io.cocoon.vm.memory_mib".into(), "384".into());
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(
            &ctr,
            &[
                "sh",
                "-c",
                "nproc; awk '/^MemTotal:/ {print $2}' /proc/meminfo",
            ],
            Duration::from_secs(10),
        )
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "vCPUs seen in the pod: {out}");
    let mem_kib: u64 = lines.next().and_then(|l| l.parse().ok()).expect("MemTotal");
    // The guest kernel keeps some of the 384 MiB for itself.
    assert!(
        (300 * 1024..=384 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for a 384 MiB VM"
    );
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");

    let mut bad = node.pod_config("badly-sized", "uid-badly-sized", "default");
    bad.annotations
        .insert("io.cocoon.vm.vcpus".into(), "lots".into());
    let e = node
        .run_pod(&bad, COCOON)
        .await
        .expect_err("a pod with a bad size annotation must not start");
    assert!(
        e.message().contains("io.cocoon.vm.vcpus") && e.message().contains("1 to 64"),
        "the error must name the annotation and the range: {e}"
    );
}

const COCOON_LIMITS_NET: u8 = 77;

/// A pod whose containers have limits (kubelet sums them into the sandbox's resources,
/// containerd passes them on) gets a VM of the config's size plus those limits, so that
/// a container can use the memory its limit allows, as under runc: here 300 MiB under a
/// 400 MiB limit, which a VM of the default 256 MiB could never hold.
#[tokio::test]
async fn cocoon_pod_vm_grows_by_its_containers_limits() {
    let test = "cocoon_pod_vm_grows_by_its_containers_limits";
    let Some(env) = env(test, COCOON, COCOON_LIMITS_NET).await else {
        return;
    };
    let node = &env.node;
    const LIMIT: i64 = 400 << 20;
    let mut pconfig = node.pod_config("limited", "uid-limited", "default");
    // As kubelet's calculateSandboxResources writes them: one CPU, 400 MiB.
    pconfig.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        memory_limit_in_bytes: LIMIT,
        ..Default::default()
    });
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    c.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        memory_limit_in_bytes: LIMIT,
        ..Default::default()
    });
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    // dd's block is one buffer of that size, filled from /dev/zero: 300 MiB touched.
    let script = "nproc; awk '/^MemTotal:/ {print $2}' /proc/meminfo; \
                  dd if=/dev/zero of=/dev/null bs=300M count=1 2>&1 && echo allocated";
    let (code, out, err) = node
        .exec_sync(&ctr, &["sh", "-c", script], Duration::from_secs(60))
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "{test}: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "{test}: vCPUs (1 + 1): {out}");
    let mem_kib: u64 = lines.next().and_then(|l| l.parse().ok()).expect("MemTotal");
    // 256 + 400 MiB, less what the guest kernel keeps.
    assert!(
        (556 * 1024..=656 * 1024).contains(&mem_kib),
        "{test}: MemTotal {mem_kib} KiB for a 656 MiB VM"
    );
    assert!(out.trim_end().ends_with("allocated"), "{test}: {out}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

const RUNC_STATS_NET: u8 = 16;
const COCOON_STATS_NET: u8 = 29;

#[tokio::test]
async fn runc_pod_and_container_stats() {
    pod_and_container_stats("runc_pod_and_container_stats", RUNC, RUNC_STATS_NET).await;
}

#[tokio::test]
async fn cocoon_pod_and_container_stats() {
    pod_and_container_stats("cocoon_pod_and_container_stats", COCOON, COCOON_STATS_NET).await;
}

/// The pod's cgroup directories below kubelet's pod cgroup, in every hierarchy.
fn pod_cgroup_children(node: &CriNode, uid: &str) -> Vec<std::path::PathBuf> {
    let rel = format!("{}/pod{uid}", node.cgroup_parent_root());
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join(&rel))
        .chain([Path::new("/sys/fs/cgroup").join(&rel)])
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// ContainerStats and PodSandboxStats report CPU, memory and the pod's network as
/// kubelet reads them; under cocoon the pod's cgroup holds the VM's host processes, so
/// the node accounts what the pod really costs. Nothing of the pod's cgroups is left.
async fn pod_and_container_stats(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let uid = "uid-stats";
    let pconfig = node.pod_config("stats", uid, "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    let gateway = node.gateway().to_string();
    let c = CriNode::container_config(
        "busy",
        IMAGE_REF,
        &[
            "sh",
            "-c",
            "ping -c 3 -W 2 \"$GW\"; dd if=/dev/zero of=/dev/null bs=1M count=300; sleep 3600",
        ],
        &[],
    );
    let mut c = c;
    c.envs = vec![k8s_cri::v1::KeyValue {
        key: "GW".into(),
        value: gateway,
    }];
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\n{}", node.log_tail()));

    let mut runtime = node.runtime();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (cstats, pstats) = loop {
        let cs = runtime
            .container_stats(k8s_cri::v1::ContainerStatsRequest {
                container_id: ctr.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("container stats");
        let ps = runtime
            .pod_sandbox_stats(k8s_cri::v1::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("PodSandboxStats: {e}"))
            .into_inner()
            .stats
            .expect("pod stats");
        let rx = ps
            .linux
            .as_ref()
            .and_then(|l| l.network.as_ref())
            .and_then(|n| n.default_interface.as_ref())
            .and_then(|i| i.rx_bytes.as_ref())
            .map_or(0, |v| v.value);
        let cpu = cs
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value);
        // The working set is usage less inactive file pages: a container this small can
        // read 0 for a moment (seen once in CI, usage 348 KiB), so wait for it too.
        let working_set = cs
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value);
        let pod_cpu_and_memory = ps.linux.as_ref().is_some_and(|l| {
            l.cpu
                .as_ref()
                .and_then(|c| c.usage_core_nano_seconds.as_ref())
                .is_some_and(|v| v.value > 0)
                && l.memory
                    .as_ref()
                    .and_then(|m| m.working_set_bytes.as_ref())
                    .is_some_and(|v| v.value > 0)
        });
        if (rx > 0 && cpu > 0 && working_set > 0 && pod_cpu_and_memory)
            || std::time::Instant::now() >= deadline
        {
            break (cs, ps);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let v = |x: Option<&k8s_cri::v1::UInt64Value>| x.map_or(0, |v| v.value);
    let ccpu = v(cstats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref()));
    let cmem = v(cstats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref()));
    assert!(
        ccpu > 0 && cmem > 0,
        "{test}: container stats empty: {cstats:?}"
    );
    let listed = runtime
        .list_container_stats(k8s_cri::v1::ListContainerStatsRequest {
            filter: Some(k8s_cri::v1::ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    let mine = listed
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == ctr))
        .unwrap_or_else(|| panic!("{test}: ListContainerStats lacks {ctr}: {listed:?}"));
    assert!(
        v(mine
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref()))
            > 0,
        "{test}: listed stats empty: {mine:?}"
    );
    let linux = pstats.linux.as_ref().expect("linux pod stats");
    let pcpu = v(linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref()));
    let pmem = v(linux
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref()));
    let iface = linux
        .network
        .as_ref()
        .and_then(|n| n.default_interface.as_ref())
        .expect("the pod's network interface");
    assert_eq!(iface.name, "eth0");
    assert!(
        v(iface.rx_bytes.as_ref()) > 0 && v(iface.tx_bytes.as_ref()) > 0,
        "{iface:?}"
    );
    // With the node's log: a VM whose processes could not join the pod cgroup says so.
    assert!(
        pcpu > 0 && pmem > 0,
        "{test}: pod stats empty: {pstats:?}\n{}",
        node.log_tail()
    );
    eprintln!(
        "{test}: container cpu {ccpu} ns, working set {cmem} B; pod cpu {pcpu} ns, \
         working set {pmem} B"
    );
    if handler == COCOON {
        // The pod's cost is its VM: the VMM is in the pod's cgroup, and the pod's memory
        // is at least what the guest has touched, far above one container's.
        let children = pod_cgroup_children(node, uid);
        let run_dir = env.dir.path().join("run").to_string_lossy().into_owned();
        let vmm = cocoon_integration::processes_mentioning(&run_dir)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("qemu-system") || cmd.contains("cocoon-vmm run "))
            .expect("the pod's VMM");
        let joined = children.iter().any(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .is_ok_and(|p| p.lines().any(|l| l == vmm.0.to_string()))
        });
        assert!(
            joined,
            "VMM {} not in the pod's cgroups {children:?}",
            vmm.0
        );
        assert!(pmem > 20 << 20, "pod working set {pmem} B is not the VM's");
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
    let left = pod_cgroup_children(node, uid);
    assert!(left.is_empty(), "{test}: pod cgroups left: {left:?}");
}

const RUNC_PRIVILEGED_NET: u8 = 17;
const COCOON_PRIVILEGED_NET: u8 = 30;

/// What a privileged container sees and may do. Under cocoon "privileged" means the
/// guest's capabilities, devices and kernel interfaces, never the host's
/// (`privileged_without_host_devices` for the handler).
const PRIVILEGED_REPORT: &str = r#"
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
awk '$2 == "/sys" {split($4, o, ","); print "sys:", o[1]}' /proc/mounts
ip addr add 10.255.255.1/32 dev lo && echo "net admin: yes" || echo "net admin: no"
ip addr del 10.255.255.1/32 dev lo 2>/dev/null
mkdir -p /tmp/m && mount -t tmpfs probe /tmp/m && echo "mount: yes" && umount /tmp/m || echo "mount: no"
brctl addbr cocoonbr0 && echo "bridge: yes" && brctl delbr cocoonbr0 || echo "bridge: no"
"#;

async fn privileged_report(test: &str, handler: &str, net: u8) -> Option<(String, Vec<String>)> {
    let env = env(test, handler, net).await?;
    let node = &env.node;
    let mut pconfig = node.pod_config("priv", "uid-priv", "default");
    if let Some(sc) = pconfig
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.privileged = true;
    }
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    if let Some(sc) = c.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.privileged = true;
    }
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(
            &ctr,
            &["sh", "-c", PRIVILEGED_REPORT],
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{test}: ExecSync: {e}"));
    assert_eq!(code, 0, "{test}: {err}\n{out}");
    let (_, devs, _) = node
        .exec_sync(&ctr, &["ls", "/dev"], Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{test}: ExecSync: {e}"));
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    Some((out, devs.lines().map(str::to_string).collect()))
}

#[tokio::test]
async fn privileged_pod_matches_runc() {
    let test = "privileged_pod_matches_runc";
    let (runc, cocoon) = tokio::join!(
        privileged_report(test, RUNC, RUNC_PRIVILEGED_NET),
        privileged_report(test, COCOON, COCOON_PRIVILEGED_NET)
    );
    let (Some((runc, runc_devs)), Some((cocoon, cocoon_devs))) = (runc, cocoon) else {
        return;
    };
    for expected in [
        "Seccomp:\t0",
        "NoNewPrivs:\t0",
        "net admin: yes",
        "mount: yes",
        "bridge: yes",
    ] {
        assert!(
            runc.contains(expected),
            "runc's report lacks {expected:?}:\n{runc}"
        );
    }
    // Capabilities: everything runc grants, at least. A sandboxed host may withhold some
    // from runc (this one lacks CAP_SYS_RESOURCE) that the guest kernel grants.
    let caps = |report: &str, which: &str| -> u64 {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{which}:\t")))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {which} in {report}"))
    };
    for which in ["CapEff", "CapBnd"] {
        let (r, c) = (caps(&runc, which), caps(&cocoon, which));
        assert_eq!(
            r & !c,
            0,
            "{which}: cocoon {c:016x} lacks some of runc's {r:016x}"
        );
    }
    // CRI's spec asks for a writable /sys for a privileged container (`rw` in its
    // config.json, checked by hand). runc on this host still shows it read-only, which we
    // have not explained (the host is itself sandboxed); in the VM the spec is followed
    // as written.
    assert!(
        cocoon.contains("sys: rw"),
        "cocoon: /sys not writable:\n{cocoon}"
    );
    let rest = |report: &str| -> Vec<String> {
        report
            .lines()
            .filter(|l| !l.starts_with("Cap") && !l.starts_with("sys:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        rest(&cocoon),
        rest(&runc),
        "privileged under cocoon differs from runc (left: cocoon)"
    );
    // No host device reaches the VM: the guest's /dev has only what a container gets by
    // default, as runc's has with privileged_without_host_devices.
    let host_only: Vec<_> = cocoon_devs
        .iter()
        .filter(|d| !runc_devs.contains(d))
        .collect();
    assert!(
        host_only.is_empty(),
        "devices in cocoon's privileged container that runc's lacks: {host_only:?}"
    );
}
