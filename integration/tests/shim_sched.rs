//! What runc 1.2 added to a process: the CPU scheduler (`process.scheduler`), the I/O
//! priority (`process.ioPriority`) and the execution domain (`linux.personality`).
//! containerd 1.6's spec types predate the first two (runtime-spec 1.1), so neither
//! `ctr` nor CRI can pass them here: the shim's task API is driven directly, with the
//! bundle's spec written as containerd 1.7+ would write it. `linux.personality` also
//! goes through `ctr run --config`. This host's runc (1.1.5) ignores all three, so
//! Cocoon is held to what the fields ask, read back from inside the container; what
//! runc 1.2 refuses is refused at Create, naming it.

mod ctr_common;
mod direct_shim;

use containerd_shim::protos::api;
use ctr_common::*;
use direct_shim::*;

/// The shell's personality, I/O class, then the rt_priority and policy of itself and of
/// a child (`/proc/<pid>/stat` fields 40 and 41). The `true` keeps the shell from
/// running its last command in its own place, unforked.
const REPORT: &str = "cat /proc/$$/personality; ionice -p $$; \
     cut -d' ' -f40,41 /proc/$$/stat /proc/self/stat; true";

/// PER_LINUX32 (8; `uname -m` reads i686 only on a kernel with 32-bit emulation, which
/// Cocoon's own kernel leaves out); idle I/O; SCHED_RR (2) at priority 7 for the shell,
/// and SCHED_OTHER for its child, since `SCHED_FLAG_RESET_ON_FORK` (the runtime spec's
/// spelling, which oci-spec's differs from) resets it there.
const EXPECTED: &str = "00000008\nidle\n7 2\n0 0\n";

fn scheduled(process: &mut serde_json::Value) {
    process["scheduler"] = serde_json::json!({
        "policy": "SCHED_RR", "priority": 7, "flags": ["SCHED_FLAG_RESET_ON_FORK"]
    });
    process["ioPriority"] = serde_json::json!({"class": "IOPRIO_CLASS_IDLE", "priority": 0});
}

/// Edits the bundle's spec before its Create.
fn edit_spec(shim: &DirectShim, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = shim.bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut spec);
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
}

/// A FIFO at `path` for a process's stdout, as containerd makes one, and what comes
/// through it: its first `lines` lines, within 30 s.
fn fifo_lines(path: &std::path::Path, lines: usize) -> std::sync::mpsc::Receiver<String> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let got: Vec<String> = f.lines().take(lines).map_while(Result::ok).collect();
        let _ = tx.send(got.iter().map(|l| format!("{l}\n")).collect());
    });
    rx
}

/// Waits for `id`'s `exec_id` (empty: its init) to exit, within 30 s, and returns
/// what it wrote.
async fn output_at_exit(
    shim: &DirectShim,
    id: &str,
    exec_id: &str,
    out: std::sync::mpsc::Receiver<String>,
) -> String {
    let req = api::WaitRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    let exit = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        shim.client.wait(ctx(), &req),
    )
    .await
    .unwrap_or_else(|_| panic!("{id}/{exec_id} did not exit within 30 s"))
    .unwrap();
    assert_eq!(exit.exit_status, 0, "{id}/{exec_id}");
    out.recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{id}/{exec_id}: no output within 30 s"))
}

#[test]
fn scheduler_io_priority_and_personality_reach_the_process_and_its_execs() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let (init_out, exec_out) = (dir.path().join("init"), dir.path().join("exec"));
    let lines = EXPECTED.lines().count();
    runtime().block_on(async {
        let id = "sched";
        let shim = start_shim(&env, id, &["sh", "-c", REPORT]).await;
        edit_spec(&shim, |s| {
            scheduled(&mut s["process"]);
            s["linux"]["personality"] = serde_json::json!({"domain": "LINUX32"});
        });
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: shim.bundle.to_string_lossy().into_owned(),
            stdout: init_out.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let out = fifo_lines(&init_out, lines);
        shim.client.create(ctx(), &req).await.unwrap();
        shim.start(id, "").await.unwrap();
        assert_eq!(output_at_exit(&shim, id, "", out).await, EXPECTED);
        shim.finish(&env, id).await;

        // An exec's own process spec asks the same of it; the personality is the
        // container's.
        let id = "sched-exec";
        let shim = start_shim(&env, id, &["sleep", "1000"]).await;
        edit_spec(&shim, |s| {
            s["linux"]["personality"] = serde_json::json!({"domain": "LINUX32"})
        });
        shim.create(id).await.unwrap();
        shim.start(id, "").await.unwrap();
        let mut req = exec_request(
            id,
            "report",
            &["sh", "-c", REPORT],
            &exec_out.to_string_lossy(),
        );
        let mut process: serde_json::Value = serde_json::from_slice(&req.spec.value).unwrap();
        scheduled(&mut process);
        req.spec.as_mut().unwrap().value = serde_json::to_vec(&process).unwrap();
        let out = fifo_lines(&exec_out, lines);
        shim.client.exec(ctx(), &req).await.unwrap();
        shim.start(id, "report").await.unwrap();
        assert_eq!(output_at_exit(&shim, id, "report", out).await, EXPECTED);
        shim.finish(&env, id).await;
    });
}

#[test]
fn scheduling_runc_1_2_refuses_is_refused_at_create() {
    let env = env();
    let cases = [
        (
            serde_json::json!({"scheduler": {"policy": "SCHED_OTHER", "priority": 5}}),
            "priority can only be given for SCHED_FIFO or SCHED_RR",
        ),
        (
            serde_json::json!({"scheduler": {"policy": "SCHED_BATCH", "nice": 40}}),
            "nice is out of range",
        ),
        (
            serde_json::json!({"ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 9}}),
            "ioPriority.priority 9 is out of range",
        ),
    ];
    runtime().block_on(async {
        let id = "sched-bad";
        let shim = start_shim(&env, id, &["sh", "-c", "echo ran"]).await;
        for (fields, words) in cases {
            edit_spec(&shim, |s| {
                for (k, v) in fields.as_object().unwrap() {
                    s["process"][k] = v.clone();
                }
                s["process"].as_object_mut().unwrap().retain(|k, _| {
                    !matches!(k.as_str(), "scheduler" | "ioPriority") || fields.get(k).is_some()
                });
            });
            let e = format!("{:?}", shim.create(id).await.unwrap_err());
            assert!(e.contains(words), "wanted a refusal naming {words:?}: {e}");
        }
        let req = api::ShutdownRequest {
            id: id.into(),
            now: true,
            ..Default::default()
        };
        let _ = shim.client.shutdown(ctx(), &req).await;
        assert_clean(&env);
    });
}

/// `linux.personality` is in the runtime spec containerd 1.6 knows: through `ctr`.
#[test]
fn a_personality_asked_through_ctr_is_the_containers() {
    let env = env();
    let spec = spec_file(&env, "personality", |s| {
        s["process"]["args"] = serde_json::json!(["cat", "/proc/self/personality"]);
        s["linux"]["personality"] = serde_json::json!({"domain": "LINUX32"});
    });
    let o = run_config(&env, COCOON, &spec, "personality");
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "00000008\n");
    assert_clean(&env);
}
