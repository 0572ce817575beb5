//! Kubernetes pods restored from a VM template (`[vm] templates`, cocoon-vmm), through
//! containerd's CRI plugin with real CNI: a restored guest's NIC keeps the MAC its
//! driver read when the template booted, and the sandbox set-up must give it the pod's,
//! or no frame CNI sends it is taken. Needs hardware KVM, so here it reruns in L1.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

mod common;

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_nested::testing::{hardware_kvm, Place, NOTE_PREFIX};
use cocoon_shim::shimv2::timings;

const NET: u8 = 40;

#[test]
fn cocoon_vmm_cri_pods_start_from_a_vm_template() {
    let test = "cocoon_vmm_cri_pods_start_from_a_vm_template";
    if hardware_kvm(test) == Place::Done {
        return;
    }
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe {
        std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm");
        std::env::set_var("COCOON_TEST_TEMPLATES", "1");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Some(env) = common::env(test, COCOON, NET).await else {
            return;
        };
        let node = &env.node;
        let server_pod = node.pod_config("tpl-server", "uid-tpl-server", "default");
        let pod = node
            .run_pod(&server_pod, COCOON)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
        let server = CriNode::container_config(
            "server",
            IMAGE_REF,
            &["nc", "-ll", "-p", "8080", "-e", "echo", "hello"],
            &[],
        );
        node.create_and_start(&pod, &server, &server_pod)
            .await
            .unwrap_or_else(|e| panic!("create/start: {e}\n{}", node.log_tail()));
        let ip: Ipv4Addr = node.pod_ip(&pod).await.expect("pod IP").parse().unwrap();

        // From the node, by pod IP: frames to the pod's MAC reach the restored guest.
        let addr = SocketAddr::from((ip, 8080));
        let reply = common::reply_from(addr, Duration::from_secs(30)).await;
        match reply {
            Ok(r) => assert_eq!(r, "hello\n", "reply from {addr}"),
            Err(e) => panic!("cannot reach {addr}: {e}\n{}", node.log_tail()),
        }

        // A second pod from the same template reaches the first by its IP.
        let client_pod = node.pod_config("tpl-client", "uid-tpl-client", "default");
        let other = node
            .run_pod(&client_pod, COCOON)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox (client): {e}\n{}", node.log_tail()));
        let c = CriNode::container_config("client", IMAGE_REF, &["sleep", "3600"], &[]);
        let client = node
            .create_and_start(&other, &c, &client_pod)
            .await
            .unwrap_or_else(|e| panic!("create/start client: {e}\n{}", node.log_tail()));
        let (code, out, err) = node
            .exec_sync(
                &client,
                &[
                    "sh",
                    "-c",
                    &format!("nc {ip} 8080 </dev/null; cat /sys/class/net/eth0/address"),
                ],
                Duration::from_secs(20),
            )
            .await
            .expect("ExecSync");
        assert_eq!(code, 0, "{err}");
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("hello"),
            "pod to pod over {ip}: {out}{err}"
        );
        let mac = lines.next().unwrap_or_default();
        assert_ne!(
            mac,
            cocoon_shim::hypervisor::template::TEMPLATE_MAC,
            "the client kept the template's MAC"
        );

        for p in [&pod, &other] {
            node.stop_and_remove_pod(p).await.expect("stop/remove pod");
        }
        // The records are written as containers are deleted.
        let run_dir = env.dir.path().join("run");
        let records: Vec<_> = timings::read(&run_dir)
            .into_iter()
            .filter(|r| r.kind == "container" && r.vm_launch_ms > 0.0)
            .collect();
        assert_eq!(records.len(), 2, "{records:?}");
        assert!(records.iter().all(|r| r.from_template), "{records:?}");
        for r in &records {
            eprintln!(
                "{NOTE_PREFIX}{test}: {}: VM launch {:.0} ms, agent ready {:.0} ms after, \
                 sandbox set up {:.0} ms after",
                r.container_id, r.vm_launch_ms, r.agent_ready_ms, r.sandbox_setup_ms
            );
        }
        // The template's tap went with its VMM.
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(
            !links.contains("cctpl"),
            "a template's tap is left:\n{links}"
        );
    });
}
