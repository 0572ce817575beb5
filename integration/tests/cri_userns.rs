//! Pods with a user namespace of their own (Kubernetes' `hostUsers: false`), through
//! containerd 2's CRI (1.6's makes none): the pod's `userns_options` in mode POD, with
//! kubelet's kind of mapping (container ids 0..65536 onto a host range of its own), and
//! a volume bound with the pod's mapping as kubelet binds them. What a container sees
//! of its ids, its rootfs, the volume and its network is checked against what runc
//! shows for such a pod.
//!
//! runc itself cannot be the baseline on this machine: containerd 2 gives every bind of
//! such a pod (`/etc/hosts` too) the pod's id mapping, which needs runc ≥ 1.2's idmapped
//! mounts, and Debian 12's runc 1.1.5 has none ("idmap mounts not supported: missing
//! `mountExtensions.idmap` entry in `features` command"); Debian's runc 1.3 needs glibc
//! 2.38. So the expectations are runc ≥ 1.2's documented behaviour, written out in
//! `expect`; critest's own user namespace cases (`scripts/critest.sh`) agree with them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use cocoon_integration::containerd::use_containerd2;
use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::loopdev::Ext4;
use cocoon_integration::processes_mentioning;
use cocoon_nested::testing::{hardware_kvm, Place};
use cocoon_shim::shimv2::timings;
use common::{env_full, eventually, reply_from};
use k8s_cri::v1::{IdMapping, Mount, NamespaceMode, UserNamespace};

const COCOON_USERNS_NET: u8 = 121;
const COCOON_USERNS_UNJAILED_NET: u8 = 122;
const COCOON_VMM_USERNS_NET: u8 = 123;
const COCOON_VMM_USERNS_TEMPLATE_NET: u8 = 124;

/// As kubelet picks them: a multiple of 65 536, 65 536 ids.
const HOST_ID: u32 = 3 * 65_536;
const IDS: u32 = 65_536;

#[tokio::test]
async fn cocoon_pod_with_its_own_user_namespace() {
    use_containerd2();
    let seen = pod_with_its_own_user_namespace(
        "cocoon_pod_with_its_own_user_namespace",
        COCOON,
        COCOON_USERNS_NET,
        "",
    )
    .await;
    if let Some(seen) = seen {
        expect(&seen);
    }
}

/// The same with virtiofsd as host root (`[jail] virtiofsd = false`): the mounts'
/// mappings are then not composed with a jail's, the layers idmapped as containerd
/// idmaps them for runc.
#[tokio::test]
async fn cocoon_pod_with_its_own_user_namespace_without_the_virtiofsd_jail() {
    use_containerd2();
    let seen = pod_with_its_own_user_namespace(
        "cocoon_pod_with_its_own_user_namespace_without_the_virtiofsd_jail",
        COCOON,
        COCOON_USERNS_UNJAILED_NET,
        "[jail]\nvirtiofsd = false\n",
    )
    .await;
    if let Some(seen) = seen {
        expect(&seen);
    }
}

/// The same on cocoon-vmm, which needs hardware KVM: rerun in L1.
#[test]
fn cocoon_vmm_pod_with_its_own_user_namespace() {
    on_cocoon_vmm(
        "cocoon_vmm_pod_with_its_own_user_namespace",
        COCOON_VMM_USERNS_NET,
        false,
    );
}

/// The same from a VM template (`[vm] templates`): the restored guest's agent moves
/// the pod's interfaces into the sandbox's network namespace as a cold one does.
#[test]
fn cocoon_vmm_pod_from_a_template_with_its_own_user_namespace() {
    on_cocoon_vmm(
        "cocoon_vmm_pod_from_a_template_with_its_own_user_namespace",
        COCOON_VMM_USERNS_TEMPLATE_NET,
        true,
    );
}

/// Runs the case on cocoon-vmm, in L1 where this host has no hardware KVM. The node's
/// containerd, the shim's run directory and the volume live on ext4 there (on a loop
/// device, `TMPDIR`), as they would on a node's disk, and as Debian's 6.1 needs
/// (`COCOON_L1_KERNEL=6.1`), whose tmpfs cannot be idmapped.
fn on_cocoon_vmm(test: &str, net: u8, templates: bool) {
    if hardware_kvm(test) == Place::Done {
        return;
    }
    let fs = Ext4::new(1 << 30).unwrap_or_else(|e| panic!("ext4 for the node: {e}"));
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe {
        std::env::set_var("TMPDIR", &fs.mnt);
        std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm");
        if templates {
            std::env::set_var("COCOON_TEST_TEMPLATES", "1");
        }
    }
    use_containerd2();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(pod_with_its_own_user_namespace(test, COCOON, net, ""));
    if let Some(seen) = seen {
        expect(&seen);
        assert_eq!(seen.from_template, [templates], "{seen:#?}");
    }
    drop(rt);
    drop(fs);
}

fn mapping() -> Vec<IdMapping> {
    vec![IdMapping {
        host_id: HOST_ID,
        container_id: 0,
        length: IDS,
    }]
}

fn userns() -> UserNamespace {
    UserNamespace {
        mode: NamespaceMode::Pod.into(),
        uids: mapping(),
        gids: mapping(),
    }
}

/// What the container showed, each probe's output by name, and the owner on the host
/// of the file it wrote into its volume.
#[derive(Debug)]
struct Seen {
    probes: Vec<(&'static str, String)>,
    written_owner: (u32, u32),
    /// Per pod VM the shim's timings recorded: whether it came from a VM template.
    from_template: Vec<bool>,
}

/// What runc (≥ 1.2) shows for such a pod, and Cocoon must show too: the pod's
/// mapping in `/proc/self/uid_map`; root inside; a rootfs its root owns and writes; a
/// volume whose host files show their owners through the mapping, and which the
/// container's root writes as the host's root (an idmapped bind); a network namespace
/// the pod's user namespace owns (port 80 bound, sysfs mounted); and no capability
/// beyond the namespace (no `mknod` of a device).
fn expect(seen: &Seen) {
    let map = format!("0 {HOST_ID} {IDS}");
    let want: &[(&str, &str)] = &[
        ("uid_map", &map),
        ("gid_map", &map),
        ("id", "0 0"),
        ("rootfs owners", "0:0 0:0"),
        ("writes its rootfs", "0:0"),
        ("volume file's owner", "0:0"),
        ("binds port 80", "bound"),
        ("mounts sysfs", "sysfs"),
        ("no host capabilities", "mknod refused"),
        ("interface sysctl", "1"),
        ("pod's localhost", "from-userns"),
        ("by the pod's IP", "from-userns"),
        ("port-forward", "from-userns"),
    ];
    for (name, value) in want {
        let got = seen
            .probes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        assert_eq!(got, Some(*value), "{name}: {seen:#?}");
    }
    assert_eq!(
        seen.written_owner,
        (0, 0),
        "the container's root wrote its volume as host root through the idmapped bind: {seen:#?}"
    );
}

async fn pod_with_its_own_user_namespace(
    test: &str,
    handler: &str,
    net: u8,
    tables: &str,
) -> Option<Seen> {
    let env = env_full(test, handler, net, false, tables).await?;
    let node = &env.node;
    let mut pconfig = node.pod_config("userns", "uid-userns", "default");
    pconfig
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("namespace options")
        .userns_options = Some(userns());
    // A sysctl naming the pod's interface: under runc CNI made it before the sandbox
    // started, so the sandbox sets it.
    pconfig.linux.as_mut().unwrap().sysctls =
        [("net.ipv4.conf.eth0.arp_ignore".to_string(), "1".to_string())].into();
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    // A volume with a file of the host's root in it, bound with the pod's mapping as
    // kubelet binds a pod's volumes.
    let vol = env.dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("from-host"), "host\n").unwrap();
    let mut c = CriNode::container_config("c", IMAGE_REF, &["sleep", "3600"], &[]);
    c.linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("namespace options")
        .userns_options = Some(userns());
    c.mounts = vec![Mount {
        host_path: vol.to_string_lossy().into_owned(),
        container_path: "/vol".into(),
        uid_mappings: mapping(),
        gid_mappings: mapping(),
        ..Default::default()
    }];
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    // A server in a second container of the pod, on every address of the pod's network.
    let mut server = CriNode::container_config(
        "server",
        IMAGE_REF,
        &["nc", "-ll", "-p", "9090", "-e", "echo", "from-userns"],
        &[],
    );
    server.linux = c.linux.clone();
    node.create_and_start(&pod, &server, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start server: {e}\n{}", node.log_tail()));
    let probes: &[(&'static str, &str)] = &[
        ("uid_map", "tr -s ' ' < /proc/self/uid_map | sed 's/^ //'"),
        ("gid_map", "tr -s ' ' < /proc/self/gid_map | sed 's/^ //'"),
        ("id", "echo $(id -u) $(id -g)"),
        (
            "rootfs owners",
            "stat -c %u:%g / /bin/busybox | tr '\\n' ' ' | sed 's/ $//'",
        ),
        (
            "writes its rootfs",
            "echo x > /etc/written && stat -c %u:%g /etc/written",
        ),
        ("volume file's owner", "stat -c %u:%g /vol/from-host"),
        ("volume write", "echo c > /vol/from-container && echo ok"),
        (
            "binds port 80",
            "httpd -p 80 -h /tmp && echo bound; pkill httpd; true",
        ),
        (
            "mounts sysfs",
            "awk '$2 == \"/sys\" {print $3}' /proc/self/mounts",
        ),
        (
            "no host capabilities",
            "mknod /tmp/null c 1 3 2>/dev/null && echo made || echo 'mknod refused'",
        ),
        (
            "interface sysctl",
            "cat /proc/sys/net/ipv4/conf/eth0/arp_ignore",
        ),
    ];
    let mut out = Vec::new();
    for (name, script) in probes {
        let (code, stdout, stderr) = node
            .exec_sync(&ctr, &["sh", "-c", script], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{test}: exec {name}: {e}\n{}", node.log_tail()));
        let value = if code == 0 {
            stdout.trim_end().to_string()
        } else {
            format!("exit {code}: {stdout}{stderr}")
        };
        out.push((*name, value));
    }
    // The pod's network: its other container over localhost, the node by the pod's
    // IP, and kubelet's port-forward to its loopback.
    let deadline = Instant::now() + Duration::from_secs(30);
    let localhost = loop {
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &["sh", "-c", "nc 127.0.0.1 9090 </dev/null"],
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|e| panic!("{test}: exec nc: {e}"));
        if (code == 0 && out == "from-userns\n") || Instant::now() >= deadline {
            break format!("{}{}", out.trim_end(), err.trim_end());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    out.push(("pod's localhost", localhost));
    let ip: std::net::Ipv4Addr = node.pod_ip(&pod).await.expect("pod IP").parse().unwrap();
    let by_ip = reply_from((ip, 9090).into(), Duration::from_secs(30)).await;
    out.push((
        "by the pod's IP",
        by_ip.map_or_else(|e| e.to_string(), |r| r.trim_end().to_string()),
    ));
    let url = node
        .runtime()
        .port_forward(k8s_cri::v1::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![9090],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    let forwarded = tokio::task::spawn_blocking(move || {
        cocoon_integration::streaming::port_forward(&url, 9090, b"", Duration::from_secs(20))
    })
    .await
    .unwrap();
    out.push((
        "port-forward",
        forwarded.map_or_else(
            |e| e.to_string(),
            |f| {
                let text = String::from_utf8_lossy(&f.data).trim_end().to_string();
                format!("{text}{}", f.error)
            },
        ),
    ));
    let written = std::fs::metadata(vol.join("from-container"));
    let written_owner = written
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((u32::MAX, u32::MAX));
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    // Nothing of the pod left: no process, no mount of its share in any table.
    let run_dir = env.dir.path().join("run").to_string_lossy().into_owned();
    let gone = eventually(Duration::from_secs(10), || {
        processes_mentioning(&run_dir).is_empty()
            && cocoon_integration::mounts_under(Path::new(&run_dir)).is_empty()
    })
    .await;
    assert!(
        gone,
        "{test}: left behind: {:?} {:?}",
        processes_mentioning(&run_dir),
        cocoon_integration::mounts_under(Path::new(&run_dir))
    );
    // The records are written as containers are deleted.
    let from_template = timings::read(Path::new(&run_dir))
        .into_iter()
        .filter(|r| r.kind == "container" && r.vm_launch_ms > 0.0)
        .map(|r| r.from_template)
        .collect();
    Some(Seen {
        probes: out,
        written_owner,
        from_template,
    })
}
