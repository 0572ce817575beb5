//! `delete`: containerd's cleanup when the shim is gone (crashed or killed).
//! Works from the state file in the bundle: kills what is left of the VM
//! (only processes that are provably ours), undoes the container's mounts,
//! and reports the container as killed.

use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::Flags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

use super::persist::{is_vm_process, ContainerState};

pub async fn run(_flags: &Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    if let Some(mut st) = ContainerState::load(&bundle) {
        let marks = [st.vm_run_dir.as_path(), st.share.as_path()];
        for pid in &st.vm_pids {
            if is_vm_process(*pid, &marks) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        st.mounts.cleanup();
        // SIGKILL (ours, or PR_SET_PDEATHSIG's when the shim died) takes a
        // moment; wait for the VM's processes, bounded, before removing what
        // they used. The VM is gone with its shim: its run dir and share go.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while st.vm_pids.iter().any(|p| is_vm_process(*p, &marks))
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A state with the container's mounts alone (recorded while the guest made it)
        // names no VM: nothing of one is taken away.
        if !st.share.as_os_str().is_empty() {
            super::share::remove(&st.share);
        }
        if !st.vm_run_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&st.vm_run_dir);
        }
        crate::hostcgroup::remove_dirs(&st.host_cgroup);
        ContainerState::remove(&bundle);
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
