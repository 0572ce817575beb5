//! Two containers of one pod OOM-killed together: kubelet must see both as OOMKilled,
//! under cocoon as under runc. containerd marks a container OOMKilled only when the
//! TaskOOM event for it arrived, so a lost event shows here.

mod common;

use std::time::{Duration, Instant};

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use common::env;
use k8s_cri::v1::{ContainerState, ContainerStatusRequest, LinuxContainerResources};

const RUNC_NET: u8 = 64;
const COCOON_NET: u8 = 65;

/// PID 1 of the container grows without bound, so the OOM killer takes it.
const HOG: &[&str] = &[
    "sh",
    "-c",
    "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
];

async fn both_oom_killed(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("hogs", "uid-hogs", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut ids = Vec::new();
    for name in ["hog-a", "hog-b"] {
        let mut c = CriNode::container_config(name, IMAGE_REF, HOG, &[]);
        c.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 * 1024 * 1024,
            ..Default::default()
        });
        ids.push(node.create_and_start(&pod, &c, &pconfig).await.unwrap());
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let s = node
                .runtime()
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if s.state == ContainerState::ContainerExited as i32 {
                break s;
            }
            assert!(Instant::now() < deadline, "{test}: {id} never exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (status.exit_code, status.reason.as_str()),
            (137, "OOMKilled"),
            "{test}: {}",
            status.metadata.map(|m| m.name).unwrap_or_default()
        );
    }
    node.stop_and_remove_pod(&pod).await.unwrap();
}

#[tokio::test]
async fn runc_containers_oom_killed_together_are_both_reported() {
    both_oom_killed(
        "runc_containers_oom_killed_together_are_both_reported",
        RUNC,
        RUNC_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_containers_oom_killed_together_are_both_reported() {
    both_oom_killed(
        "cocoon_containers_oom_killed_together_are_both_reported",
        COCOON,
        COCOON_NET,
    )
    .await;
}
