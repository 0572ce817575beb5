//! Two RuntimeClasses of Cocoon on one node, each with its own config, as Kata's and
//! gVisor's are offered: the second handler's containerd entry names its file by the
//! runtime's options (`ConfigPath`), which the shim reads on `start`. Its pods get what
//! that file says (here, more guest memory) while the first handler's keep theirs; a
//! file with an unknown key fails the pod with the file and the key named.

mod common;

use std::time::Duration;

use cocoon_integration::cri::{CriNode, ALT_CONFIG, COCOON, COCOON_ALT};
use cocoon_integration::image::IMAGE_REF;

const NET: u8 = 76;

/// The guest memory the second handler's config gives its pods, and the default's.
const ALT_MEMORY_MIB: u64 = 512;
const DEFAULT_MEMORY_MIB: u64 = 256;

#[tokio::test]
async fn each_handler_runs_its_pods_with_its_own_config() {
    let test = "each_handler_runs_its_pods_with_its_own_config";
    let Some(env) = common::env(test, COCOON, NET).await else {
        return;
    };
    let node = &env.node;
    let main = std::fs::read_to_string(env.dir.path().join("cocoon.toml")).unwrap();
    assert!(main.contains("[vm]\n"), "{test}: the node's config: {main}");
    let alt = env.dir.path().join("containerd").join(ALT_CONFIG);

    // A misspelt key: the pod fails, naming the file and the key.
    std::fs::write(&alt, main.replace("[vm]\n", "[vm]\nmemory_mb = 512\n")).unwrap();
    let pconfig = node.pod_config("broken", "uid-broken", "default");
    match node.run_pod(&pconfig, COCOON_ALT).await {
        Ok(_) => panic!("{test}: a pod ran with an unknown key in its handler's config"),
        Err(e) => {
            let m = e.message();
            assert!(
                m.contains("memory_mb") && m.contains(&*alt.to_string_lossy()),
                "{test}: the error names neither the key nor the file: {m}"
            );
        }
    }

    std::fs::write(
        &alt,
        main.replace("[vm]\n", &format!("[vm]\nmemory_mib = {ALT_MEMORY_MIB}\n")),
    )
    .unwrap();
    // Both handlers' pods at once, each reporting its guest's memory.
    let memory = |handler: &'static str, name: &'static str| async move {
        let pconfig = node.pod_config(name, &format!("uid-{name}"), "default");
        let pod = node.run_pod(&pconfig, handler).await.unwrap_or_else(|e| {
            panic!("{test}: {handler}: RunPodSandbox: {e}\n{}", node.log_tail())
        });
        let c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
        let ctr = node
            .create_and_start(&pod, &c, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: {handler}: {e}\n{}", node.log_tail()));
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &["grep", "MemTotal", "/proc/meminfo"],
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("{test}: {handler}: ExecSync: {e}"));
        assert_eq!(code, 0, "{test}: {handler}: {err}");
        let kib: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{test}: {handler}: {out:?}"));
        (pod, kib / 1024)
    };
    let ((pod, mib), (alt_pod, alt_mib)) =
        tokio::join!(memory(COCOON, "main"), memory(COCOON_ALT, "alt"));
    // MemTotal is RAM less what the kernel keeps: compare the two guests.
    let more = alt_mib as i64 - mib as i64;
    let asked = (ALT_MEMORY_MIB - DEFAULT_MEMORY_MIB) as i64;
    assert!(
        more > asked * 9 / 10 && more <= asked,
        "{test}: {COCOON} guest {mib} MiB, {COCOON_ALT} guest {alt_mib} MiB: \
         not {asked} MiB more"
    );
    for p in [&pod, &alt_pod] {
        node.stop_and_remove_pod(p)
            .await
            .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    }
    // Both handlers' pods share the node's run directory: nothing of either is left.
    let left = cocoon_integration::pod_leftovers(&env.dir.path().join("run"));
    assert!(left.is_empty(), "{test}: left behind: {left:?}");
}
