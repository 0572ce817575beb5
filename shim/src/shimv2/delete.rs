//! `delete`: containerd's cleanup when a task's connection closed, mostly because the
//! shim is gone (crashed or killed). Works from the state file in the bundle: kills what
//! is left of the VM (only processes that are provably ours, and only once the shim that
//! ran it is gone or past answering), undoes the container's mounts, runs its poststop
//! hooks, and reports the container as killed.

use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::Flags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

use super::persist::{ContainerState, Shim};

pub async fn run(_flags: &Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    if let Some(mut st) = ContainerState::load(&bundle) {
        match st.shim.clone() {
            Some(shim) if shim.process.alive() => {
                if answers(&shim).await {
                    spare_live_shims_vm(&bundle, st);
                } else {
                    // containerd gave up on a shim that lives but does not answer (a
                    // reload after its restart timed out): nobody can reach that shim
                    // again, so it goes, and its VM with it.
                    eprintln!(
                        "container {}: its shim (pid {}) does not answer: killing it",
                        st.container_id, shim.process.pid
                    );
                    if shim.process.alive() {
                        let _ = kill(Pid::from_raw(shim.process.pid as i32), Signal::SIGKILL);
                    }
                    clean_up(&bundle, &mut st).await;
                }
            }
            _ => clean_up(&bundle, &mut st).await,
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut at = containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp::new();
    at.seconds = now.as_secs() as i64;
    at.nanos = now.subsec_nanos() as i32;
    let resp = DeleteResponse {
        exit_status: 137,
        exited_at: MessageField::some(at),
        ..Default::default()
    };
    let mut out = tokio::io::stdout();
    out.write_all(&resp.write_to_bytes()?).await?;
    out.flush().await?;
    Ok(())
}

/// How long a live shim has to answer `shim delete`'s probe.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `shim` answers a call on its task socket within `ANSWER_WITHIN`: a stopped
/// or wedged shim still has its socket accept connections. The call names a service no
/// shim serves, so the ttrpc server itself answers it (INVALID_ARGUMENT) without any of
/// the shim's locks, which a Create waiting on a slow guest pull may hold for minutes.
async fn answers(shim: &Shim) -> bool {
    let address = format!("unix://{}", shim.socket.display());
    let call = async {
        let client = ttrpc::asynchronous::Client::connect(&address).await.ok()?;
        let req = ttrpc::Request {
            service: "cocoon.shim.v1.Liveness".into(),
            method: "Probe".into(),
            timeout_nano: ANSWER_WITHIN.as_nanos() as i64,
            ..Default::default()
        };
        match client.request(req).await {
            Ok(_) | Err(ttrpc::Error::RpcStatus(_)) => Some(()),
            Err(_) => None,
        }
    };
    matches!(
        tokio::time::timeout(ANSWER_WITHIN, call).await,
        Ok(Some(()))
    )
}

/// containerd runs `shim delete` in a task's bundle whenever the task's connection
/// closes: also under a shim that lives on and answers, e.g. after a Delete or Create
/// its caller gave up on while the shim still takes that container away, once a retry
/// is answered NotFound. The container's mounts go; the VM, its share, run dir and cgroup stay the
/// live shim's to stop (they cannot outlive it: its VM processes die with it), and the
/// state keeps naming them for a `shim delete` after that shim died.
fn spare_live_shims_vm(bundle: &std::path::Path, mut st: ContainerState) {
    eprintln!(
        "container {}: its shim (pid {}) lives on; only the container's mounts are taken",
        st.container_id,
        st.shim.as_ref().map_or(0, |s| s.process.pid)
    );
    st.mounts.cleanup();
    st.mounts = Default::default();
    let names_vm = !st.vm_pids.is_empty() || !st.share.as_os_str().is_empty();
    if !names_vm || st.save(bundle).is_err() {
        ContainerState::remove(bundle);
    }
}

/// After a shim that died: kills what is left of its VM, then takes the container's
/// mounts and the VM's share, run dir and cgroup away; and, the shim being dead, undoes
/// every pod on the node that no live shim holds (`podrecord`), this one's record too.
async fn clean_up(bundle: &std::path::Path, st: &mut ContainerState) {
    st.mounts.cleanup();
    // A state with the container's mounts alone (recorded while the guest made it)
    // names no VM: nothing of one is taken away.
    let vm = (
        st.vm_run_dir.clone(),
        st.share.clone(),
        std::mem::take(&mut st.vm_pids),
        std::mem::take(&mut st.host_cgroup),
    );
    let _ = tokio::task::spawn_blocking(move || {
        super::podrecord::undo_vm(&vm.0, &vm.1, &vm.2, &vm.3);
        if let Some(root) = vm.0.parent().filter(|_| !vm.0.as_os_str().is_empty()) {
            super::podrecord::sweep(root);
        }
    })
    .await;
    ContainerState::remove(bundle);
    if st.poststop_pending {
        run_poststop_hooks(bundle, &st.container_id).await;
    }
}

/// The container's poststop hooks, read again from its bundle's spec: the shim that
/// would have run them at Delete is gone (runc's `delete --force` runs them from its
/// state file). Nothing else of the spec is read, so a spec the shim once took cannot
/// fail here on a part that does not matter.
async fn run_poststop_hooks(bundle: &std::path::Path, id: &str) {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return;
    };
    let Ok(full) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return;
    };
    let part = serde_json::json!({
        "ociVersion": full.get("ociVersion").cloned().unwrap_or_default(),
        "annotations": full.get("annotations").cloned(),
        "hooks": full.get("hooks").cloned(),
    });
    let Ok(mut spec) = serde_json::from_value::<oci_spec::runtime::Spec>(part) else {
        return;
    };
    if let Ok(hooks) = super::hooks::take(&mut spec) {
        let this = super::hooks::For {
            id,
            bundle,
            pid: None,
        };
        hooks.run_poststop(&this).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shimv2::persist::{is_vm_process, ProcessId};

    fn state(run_dir: &std::path::Path, pid: u32, shim: ProcessId) -> ContainerState {
        ContainerState {
            container_id: "c".into(),
            vm_run_dir: run_dir.into(),
            vm_pids: vec![pid],
            shim: Some(Shim {
                process: shim,
                socket: run_dir.join("shim.sock"),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_shim_answers_only_if_something_serves_its_socket() {
        let d = tempfile::tempdir().unwrap();
        let socket = d.path().join("shim.sock");
        let shim = Shim {
            process: ProcessId::this().unwrap(),
            socket: socket.clone(),
        };
        assert!(!answers(&shim).await, "no socket, yet an answer");
        // Bound, listening, never accepted: a stopped shim's socket.
        let _held = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let t = std::time::Instant::now();
        assert!(
            !answers(&shim).await,
            "an answer from a socket nobody serves"
        );
        assert!(t.elapsed() < ANSWER_WITHIN * 2, "waited {:?}", t.elapsed());
        drop(_held);
        std::fs::remove_file(&socket).unwrap();
        // A ttrpc server answers for itself: no handler of the shim's is asked.
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap();
        server.start().await.unwrap();
        assert!(answers(&shim).await, "a serving shim did not answer");
        server.shutdown().await.unwrap();
    }

    /// A spec in `bundle` whose poststop hook writes the state it reads to the file
    /// returned, in `dir`. Nothing else of the spec is valid.
    fn poststop_hook_in(bundle: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
        let ran = dir.join("poststop-ran");
        let hook = format!("cat > {}", ran.display());
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"capabilities": {"bounding": ["CAP_NOT_YET_INVENTED"]}},
            "hooks": {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]}
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        ran
    }

    /// A Delete, or the undo of a failed Create, ran them already (and put back a state
    /// without the mark): they do not run twice.
    #[tokio::test]
    async fn poststop_hooks_a_live_shim_ran_are_not_run_again() {
        let d = tempfile::tempdir().unwrap();
        let ran = poststop_hook_in(d.path(), d.path());
        let mut st = ContainerState {
            container_id: "c".into(),
            ..Default::default()
        };
        st.save(d.path()).unwrap();
        clean_up(d.path(), &mut st).await;
        assert!(ContainerState::load(d.path()).is_none());
        assert!(!ran.exists(), "the poststop hooks ran again");
    }

    #[tokio::test]
    async fn a_live_shims_vm_is_spared_and_a_dead_ones_taken() {
        let d = tempfile::tempdir().unwrap();
        let (bundle, run_dir) = (d.path().join("bundle"), d.path().join("run"));
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&run_dir).unwrap();
        let mut vm = crate::shimv2::persist::stand_in_vm(&run_dir);
        let marks = [run_dir.as_path()];
        let me = ProcessId::this().unwrap();

        let st = state(&run_dir, vm.id(), me);
        st.save(&bundle).unwrap();
        spare_live_shims_vm(&bundle, st);
        assert!(
            is_vm_process(vm.id(), &marks),
            "a live shim's VM was killed"
        );
        assert!(run_dir.is_dir());
        let kept = ContainerState::load(&bundle).expect("the state naming the VM went");
        assert_eq!(kept.vm_pids, vec![vm.id()]);

        let gone = ProcessId {
            started: me.started + 1,
            ..me
        };
        let mut st = ContainerState {
            poststop_pending: true,
            ..state(&run_dir, vm.id(), gone)
        };
        st.save(&bundle).unwrap();
        // Its poststop hooks run, as `runc delete --force` runs them.
        let ran = poststop_hook_in(&bundle, d.path());
        assert!(!gone.alive());
        clean_up(&bundle, &mut st).await;
        let status = vm.wait().unwrap();
        assert!(!status.success(), "the dead shim's VM was not killed");
        assert!(!run_dir.exists(), "the dead shim's run dir stayed");
        assert!(ContainerState::load(&bundle).is_none());
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ran).unwrap()).unwrap();
        assert_eq!(
            (&state["id"], &state["status"]),
            (&"c".into(), &"stopped".into())
        );
    }
}
