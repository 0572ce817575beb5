//! A short soak in CI: each fault once (and a few more at random), through CRI; nothing
//! may leak and nothing may hang. `cocoon soak --cycles 500` is the long one.

mod common;

use cocoon_integration::cri::COCOON;
use common::env_full;

const SOAK_NET: u8 = 62;

#[tokio::test]
async fn a_short_soak_leaks_nothing_and_never_hangs() {
    let test = "a_short_soak_leaks_nothing_and_never_hangs";
    let tables = cocoon_integration::soak::SHIM_CONFIG_TABLES;
    let Some(mut env) = env_full(test, COCOON, SOAK_NET, false, tables).await else {
        return;
    };
    let run_dir = env.dir.path().join("run");
    let cycles = cocoon_integration::soak::FAULTS.len() + 4;
    let report = cocoon_integration::soak::soak(
        &mut env.node,
        &run_dir,
        cycles,
        // Its four random cycles: virtiofsd killed while the pod starts, the shim 55 ms
        // into the pod's stop (the whole stop takes longer, even on a fast machine), the
        // agent crashed while running, then while starting.
        354,
        cocoon_integration::soak::FAULTS,
    )
    .await;
    eprint!("{}", report.table());
    if !report.leaks.is_empty() {
        // The shim says why it kept something only in containerd's log.
        let log = env.node.log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN cocoon_shim"))
            .collect();
        eprintln!(
            "the shim's last warnings:\n{}",
            warnings[warnings.len().saturating_sub(40)..].join("\n")
        );
    }
    assert!(
        report.leaks.is_empty(),
        "{test}: leaks: {:#?}",
        report.leaks
    );
    assert!(
        report.unclean.is_empty(),
        "{test}: unclean: {:#?}",
        report.unclean
    );
    assert!(
        report.fresh_pod_after,
        "{test}: no fresh pod after the soak"
    );
    assert!(report.faults_while_starting >= 1, "{report:?}");
    assert!(report.faults_while_stopping >= 1, "{report:?}");
    // Each kind of fault acted at least once (the vsock backend exists under QEMU only).
    assert!(
        report.faults.len() >= cocoon_integration::soak::FAULTS.len() - 1,
        "{report:?}"
    );
}
