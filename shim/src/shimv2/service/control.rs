//! Task calls that act on a running container or process: Kill, Pause, Resume,
//! Update. Each runs to its end whatever its caller does (`util::to_completion`).

use super::*;
use crate::shimv2::KILL_EXIT_DEADLINE;

impl Service {
    pub(super) async fn kill_task(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let sb = self.existing_sandbox().await?;
        {
            let containers = self.inner.containers.lock().await;
            let (_, p) = lookup(&containers, &req.id, &req.exec_id)?;
            if p.exit.borrow().is_some() {
                return Err(not_found("process (already exited)"));
            }
            // An exec never started (or whose start failed) has nothing to signal; as
            // runc's shim says, and containerd's cleanup of a failed exec goes on.
            if !req.exec_id.is_empty() && !p.started {
                return Err(err(ttrpc::Code::FAILED_PRECONDITION, "process not created"));
            }
        }
        // `all` is for a container's processes: for an exec it means that exec alone,
        // as under runc (containerd's WithProcessKill sends it for any process).
        let all = req.all && req.exec_id.is_empty();
        // A lost VM has killed every process of the pod already: the kill has happened,
        // and refusing it would leave containerd's cleanup of a failed pod stuck (CRI
        // marks such a sandbox UNKNOWN and keeps it).
        if sb.lost().is_none() {
            let sent = sb
                .agent
                .signal_process(&req.id, &req.exec_id, req.signal, all)
                .await;
            // A SIGKILL of the pod's own container ends the pod. A guest that cannot
            // take it (stuck, out of memory, hostile) must not keep the pod from being
            // removed: ending the VM is that kill, as runc's would be.
            let pod_kill = req.signal == libc::SIGKILL as u32
                && req.exec_id.is_empty()
                && req.id == self.inner.group;
            match sent {
                Err(e) if !pod_kill => return Err(agent_err(e)),
                Err(e) => {
                    sb.end(format!(
                        "the guest did not take a SIGKILL of the pod's container: {e}"
                    ))
                    .await
                }
                // Taken, but the exit is the guest's to report, and a guest that never
                // does would keep the pod (and containerd's delete) waiting for good.
                Ok(()) if pod_kill => self.end_pod_unless_it_exits(&sb, &req.id).await,
                Ok(()) => {}
            }
        }
        if req.exec_id.is_empty() {
            self.watch_unstarted(&sb, &req.id).await;
        }
        Ok(api::Empty::new())
    }

    /// Ends the pod's VM if its container, just SIGKILLed, has not exited within
    /// [`KILL_EXIT_DEADLINE`]: its exit then reads as the VM's loss, and every wait ends.
    async fn end_pod_unless_it_exits(&self, sb: &Arc<Sandbox>, id: &str) {
        let exit = {
            let containers = self.inner.containers.lock().await;
            match lookup(&containers, id, "") {
                Ok((_, p)) => p.exit.subscribe(),
                Err(_) => return,
            }
        };
        let (me, sb) = (self.clone(), sb.clone());
        tokio::spawn(async move {
            let mut exit = exit;
            let exited = tokio::select! {
                r = tokio::time::timeout(KILL_EXIT_DEADLINE, exit.wait_for(Option::is_some)) => {
                    r.is_ok()
                }
                _ = sb.until_lost() => true,
            };
            if !exited && sb.lost().is_none() && me.serves(&sb).await {
                sb.end(format!(
                    "the guest took a SIGKILL of the pod's container but reported no exit \
                     within {KILL_EXIT_DEADLINE:?}"
                ))
                .await;
            }
        });
    }

    /// Pause (`pause`) or Resume: the guest's freezer, the state State reports, and
    /// the event.
    pub(super) async fn pause_task(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let sb = self.existing_sandbox().await?;
        let done = if pause {
            sb.agent.pause_container(id).await
        } else {
            sb.agent.resume_container(id).await
        };
        done.map_err(agent_err)?;
        if let Some(c) = self.inner.containers.lock().await.get_mut(id) {
            c.paused = pause;
        }
        if pause {
            let mut m = ev::TaskPaused::new();
            m.container_id = id.to_owned();
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(m))
                .await;
        } else {
            let mut m = ev::TaskResumed::new();
            m.container_id = id.to_owned();
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(m))
                .await;
        }
        Ok(api::Empty::new())
    }

    pub(super) async fn update_task(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let sb = self.existing_sandbox().await?;
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(&value).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("malformed resources: {e}"),
            )
        })?;
        let mut res = pb::LinuxResources::new();
        if let Some(m) = r.memory() {
            res.memory_limit_bytes = m.limit().unwrap_or(0);
            res.memory_swap_bytes = m.swap().unwrap_or(0);
        }
        if let Some(c) = r.cpu() {
            res.cpu_shares = c.shares().unwrap_or(0);
            res.cpu_quota = c.quota().unwrap_or(0);
            res.cpu_period = c.period().unwrap_or(0);
            res.cpuset_cpus = c.cpus().clone().unwrap_or_default();
            res.cpuset_mems = c.mems().clone().unwrap_or_default();
        }
        if let Some(p) = r.pids() {
            res.pids_limit = p.limit();
        }
        let mut ureq = pb::UpdateContainerRequest::new();
        ureq.container_id = req.id.clone();
        ureq.resources = MessageField::some(res);
        // A raised memory limit may want more memory in the VM: plugged first, so the
        // container can use it when this returns.
        let limit = r.memory().as_ref().and_then(|m| m.limit());
        let limit_mib = crate::shimv2::sizing::memory_mib(limit);
        if limit.is_some() && sb.grows_memory() {
            if let Err(e) = sb.set_memory_limit(&req.id, limit_mib, true).await {
                tracing::warn!("cannot grow the VM's memory for {}: {e}", req.id);
            }
        } else if limit_mib > u64::from(sb.memory_mib) {
            tracing::warn!(
                "{}'s memory limit ({limit_mib} MiB) is more than its VM has ({} MiB): \
                 memory is added to a running VM only with [vm] hotplug_memory",
                req.id,
                sb.memory_mib
            );
        }
        sb.agent.update_container(ureq).await.map_err(agent_err)?;
        // A raised CPU limit may want more of the VM's vCPUs online.
        let milli = r
            .cpu()
            .as_ref()
            .and_then(|c| crate::shimv2::sizing::cpu_milli(c.quota(), c.period()));
        if let Some(milli) = milli {
            if let Err(e) = sb.set_cpu_limit(&req.id, milli, true).await {
                tracing::warn!("cannot bring vCPUs online for {}: {e}", req.id);
            }
        }
        Ok(api::Empty::new())
    }
}
