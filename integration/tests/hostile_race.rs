//! The pod share against a guest that races the shim: root in the guest (the debug
//! console starts the attacker, outside every container) loops over the share's
//! structure while the host creates, starts, stops and removes containers with volumes
//! in the pod: the moments the shim makes mount points and mounts on them. Each round
//! it tries to rename every entry and put a symlink to a host directory (the canary) in
//! its place, to plant links under the names the shim is about to use (the next mount
//! index of every container), and to make new names. Kata Containers' CVE-2020-2026 was
//! this race won. Nothing may be mounted on or written in the canary, no mount may
//! appear on the host outside the pod's own directories, every container must get its
//! volumes as asked, and the pod must go away leaving nothing.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::{mounts_under, processes_mentioning};
use common::{env_full, eventually};
use k8s_cri::v1::{Mount, RemoveContainerRequest, StopContainerRequest};

const RACE_NET: u8 = 49;
/// Containers created and removed while the guest races.
const ROUNDS: usize = 10;

/// The attacker, as one line for `sh -c`; `CANARY` is replaced by the host path. Links
/// are made with `-T`, so that an existing directory is never taken as where to put
/// one (that would be a write inside a writable mount, which the guest may do). It
/// runs niced in the background until `/run/race-stop` exists, and leaves its tally in
/// `/run/race-result`: rounds done, attempts the guest's kernel let through.
const ATTACKER: &str = r#"renice -n 19 -p $$ >/dev/null 2>&1; S=/run/cocoon/shared; rounds=0; allowed=0;
try() { if "$@" 2>/dev/null; then allowed=$((allowed+1)); echo "ALLOWED: $*" >> /run/race-log; return 0; fi; return 1; };
while [ ! -e /run/race-stop ]; do
  for e in $S/* $S/*/* $S/*/mounts/*; do
    [ -e "$e" ] || [ -L "$e" ] || continue;
    try mv -T "$e" "$e.moved" && try ln -sT CANARY "$e";
    try ln -sT CANARY "$e.planted";
  done;
  for c in $S/*; do for i in 1 2 3 4 5 6 7 8; do try ln -sT CANARY "$c/mounts/$i"; done; done;
  try mkdir $S/made-$rounds; try ln -sT CANARY $S/link-$rounds;
  rounds=$((rounds+1));
done;
echo "rounds=$rounds allowed=$allowed" > /run/race-result"#;

#[tokio::test]
async fn a_guest_racing_the_shims_mounts_reaches_nothing_on_the_host() {
    let test = "a_guest_racing_the_shims_mounts_reaches_nothing_on_the_host";
    let tables = "[debug]\nconsole = true\n";
    let Some(env) = env_full(test, COCOON, RACE_NET, false, tables).await else {
        return;
    };
    let node = &env.node;
    let dir = env.dir.path();
    let run = dir.join("run");
    let canary = dir.join("canary");
    let (rw, ro) = (dir.join("volumes/rw"), dir.join("volumes/ro"));
    for d in [&canary, &rw, &ro] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(ro.join("in"), "from the host\n").unwrap();

    // Watch the mount tables (the node's and the pod's own) for the whole test: every
    // mount point that appears at or under the canary, or directly under `/` (where a
    // planted `/` would land).
    let before: BTreeSet<String> = mount_points();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, canary) = (stop.clone(), canary.to_string_lossy().into_owned());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                for m in mount_points().difference(&before) {
                    let top = Path::new(m).parent() == Some(Path::new("/"));
                    if m.starts_with(&canary) || canary.starts_with(m.as_str()) || top {
                        seen.insert(m.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };

    let pconfig = node.pod_config("race", "uid-race", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let uds = cocoon_integration::leftover_entries(&run)
        .into_iter()
        .map(|d| d.join("vsock.sock"))
        .find(|p| p.exists())
        .expect("the pod's vsock socket");
    let attacker = ATTACKER
        .replace('\n', " ")
        .replace("CANARY", &canary.to_string_lossy());
    let start = format!(
        "sh -c '{attacker}' </dev/null >/dev/null 2>&1 & echo started",
        attacker = attacker.replace('\'', "'\\''")
    );
    let o = in_guest(&uds, &start).await;
    assert!(o.contains("started"), "{test}: the attacker: {o}");

    let mount = |host: &Path, container: &str, readonly: bool| Mount {
        host_path: host.to_string_lossy().into_owned(),
        container_path: container.into(),
        readonly,
        ..Default::default()
    };
    let mut runtime = node.runtime();
    for round in 0..ROUNDS {
        let name = format!("app-{round}");
        let mut c = CriNode::container_config(&name, IMAGE_REF, &["sleep", "3600"], &[]);
        c.mounts = vec![mount(&rw, "/rw", false), mount(&ro, "/ro", true)];
        let id = node
            .create_and_start(&pod, &c, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: round {round}: {e}\n{}", node.log_tail()));
        if round == 0 {
            // What the agent's wait for a shared root relies on (`wait_shared_root`): the
            // guest sees the host's mount of a root as a filesystem of its own.
            let devs = in_guest(
                &uds,
                &format!("stat -c %d /run/cocoon/shared/{id} /run/cocoon/shared/{id}/rootfs"),
            )
            .await;
            let devs: Vec<&str> = devs.split_whitespace().collect();
            assert!(
                devs.len() == 2 && devs[0] != devs[1],
                "{test}: the shared root is not a mount of its own in the guest: {devs:?}"
            );
        }
        // The container got its volumes as asked, racing guest or not.
        let script = format!(
            "cat /ro/in; echo {round} > /rw/round-{round} && echo written; \
             touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused"
        );
        let (code, out, err) = node
            .exec_sync(&id, &["sh", "-c", &script], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{test}: round {round}: ExecSync: {e}"));
        assert_eq!(
            (code, out.as_str()),
            (0, "from the host\nwritten\nro-refused\n"),
            "{test}: round {round}: {err}"
        );
        runtime
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{test}: round {round}: StopContainer: {e}"));
        runtime
            .remove_container(RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{test}: round {round}: RemoveContainer: {e}"));
    }

    // Stop the attacker and read its tally: it must have raced (more than one round)
    // and been refused every time.
    let o = in_guest(
        &uds,
        "touch /run/race-stop; i=0; while [ ! -e /run/race-result ] && [ $i -lt 60 ]; \
         do sleep 1; i=$((i+1)); done; cat /run/race-result; cat /run/race-log 2>/dev/null",
    )
    .await;
    let tally = o
        .lines()
        .find(|l| l.starts_with("rounds="))
        .unwrap_or_else(|| panic!("{test}: no tally from the attacker: {o}"));
    let field = |k: &str| -> u64 {
        tally
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{test}: {k} in {tally}"))
    };
    eprintln!("{test}: the attacker's tally: {tally}");
    assert!(
        field("rounds=") > 1,
        "{test}: the attacker never raced: {o}"
    );
    assert_eq!(
        field("allowed="),
        0,
        "{test}: the guest changed the share: {o}"
    );

    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(seen.is_empty(), "{test}: mounts on the host: {seen:?}");

    // Nothing reached the canary; every round's write reached the rw volume; the ro
    // volume holds only what the host put there.
    let entries = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    assert!(
        entries(&canary).is_empty(),
        "{test}: {:?}",
        entries(&canary)
    );
    assert_eq!(entries(&ro), vec![ro.join("in")], "{test}");
    for round in 0..ROUNDS {
        assert_eq!(
            std::fs::read_to_string(rw.join(format!("round-{round}"))).unwrap(),
            format!("{round}\n")
        );
    }
    // The pod went away whole: no process, mount or VM directory of it.
    let run_text = run.to_string_lossy().into_owned();
    let gone = eventually(Duration::from_secs(10), || {
        processes_mentioning(&pod).is_empty() && processes_mentioning(&run_text).is_empty()
    })
    .await;
    assert!(
        gone,
        "{test}: left running: {:?} {:?}",
        processes_mentioning(&pod),
        processes_mentioning(&run_text)
    );
    let mounts = mounts_under(dir);
    assert!(mounts.is_empty(), "{test}: mounts left: {mounts:?}");
    let left = cocoon_integration::pod_leftovers(&run);
    assert!(left.is_empty(), "{test}: left in the run dir: {left:?}");
}

/// The mount points now, the node's and those in each pod's own namespace (where a
/// pod's share is mounted).
fn mount_points() -> BTreeSet<String> {
    cocoon_integration::mount_points_everywhere()
        .into_iter()
        .collect()
}

/// Runs `line` in the guest through the debug console; what it printed, read until the
/// guest closes the session (bounded).
async fn in_guest(uds: &Path, line: &str) -> String {
    let mut stream = cocoon_shim::debugconsole::open(uds, &[line.to_string()])
        .await
        .unwrap_or_else(|e| panic!("the debug console: {e:#}"));
    tokio::task::spawn_blocking(move || {
        // Nothing to send: as `cocoon debug` does at the end of its input, so that the
        // session closes once the guest's side has.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}
