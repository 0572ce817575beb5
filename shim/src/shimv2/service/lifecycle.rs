//! What the task service does beyond answering a call: creating a container (and the
//! pod VM with the first), watching processes for their exits, relaying the guest's
//! OOM kills, and cleaning up a process the guest started but the host cannot use.

use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::agent as pb;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::TtrpcResult;
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::sync::Mutex;

use super::util::{agent_err, err, exit_status, exit_time, now, read_spec, unix_ns_now};
use super::{Container, Process, Service, Watched, DRAIN_GRACE, VM_LOST_STATUS};
use crate::agent_client::AgentError;
use crate::shimv2::mounts;
use crate::shimv2::persist::ContainerState;
use crate::shimv2::pod;
use crate::shimv2::sandbox::{self, Sandbox};
use crate::shimv2::stdio::{self, StdioPaths};
use crate::shimv2::timings;

impl Service {
    /// Whether `sb` is still this shim's pod VM (Shutdown takes it away).
    pub(super) async fn serves(&self, sb: &Arc<Sandbox>) -> bool {
        let current = self.inner.sandbox.lock().await;
        current.as_ref().is_some_and(|c| Arc::ptr_eq(c, sb))
    }

    /// Relays the guest's OOM kills as TaskOOM events until the VM goes away: only
    /// for this shim's live containers, and rate-limited (`guest_events`).
    pub(super) async fn forward_oom_events(&self, sb: Arc<Sandbox>) {
        let mut dropped = 0u64;
        let mut failed = 0u64;
        let mut last_poll = std::time::Instant::now() - crate::shimv2::guest_events::POLL_PACE;
        loop {
            // Paced: a guest that answers at once cannot make this loop spin.
            let since = last_poll.elapsed();
            if let Some(wait) = crate::shimv2::guest_events::POLL_PACE.checked_sub(since) {
                tokio::time::sleep(wait).await;
            }
            last_poll = std::time::Instant::now();
            let next = tokio::select! {
                r = sb.agent.next_oom_event(Duration::from_secs(3600)) => r,
                _ = sb.until_lost() => return,
            };
            match next {
                Ok(e) => {
                    let verdict = {
                        let containers = self.inner.containers.lock().await;
                        let mut filter = self
                            .inner
                            .oom_filter
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        filter.admit(
                            &e.container_id,
                            containers.keys(),
                            std::time::Instant::now(),
                        )
                    };
                    if let Err(why) = verdict {
                        sb.stats.count("oom_events_dropped");
                        dropped += 1;
                        // Power-of-two counts: a flood cannot flood the log either.
                        if dropped.is_power_of_two() {
                            tracing::warn!(
                                container = %e.container_id.escape_debug(),
                                "dropped a guest OOM event ({why:?}); {dropped} so far"
                            );
                        }
                        continue;
                    }
                    sb.stats.count("oom_events");
                    let mut m = ev::TaskOOM::new();
                    m.container_id = e.container_id;
                    self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(m))
                        .await;
                }
                Err(AgentError::CallTimeout { .. }) => continue,
                // The VM is gone, or the shim is going: nothing more will come.
                Err(_) if sb.lost().is_some() || !self.serves(&sb).await => return,
                Err(e) => {
                    // One bad call (a malformed reply, a dropped connection) must not
                    // end OOM reporting for the pod's life: try again, not in a spin,
                    // and logged at power-of-two counts (a guest failing every poll
                    // would otherwise write a line a second for the pod's life).
                    failed += 1;
                    if failed.is_power_of_two() {
                        tracing::warn!(
                            "OOM event poll failed: {e}; {failed} so far, polling again"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits for a started process in the guest, lets its output drain, then
    /// records and publishes its exit.
    pub(super) fn watch_exit(&self, sb: Arc<Sandbox>, w: Watched) {
        let Watched {
            cid,
            exec_id,
            pid,
            exit,
            copies,
            timing,
        } = w;
        let me = self.clone();
        let started = std::time::Instant::now();
        let watched_from = unix_ns_now();
        tokio::spawn(async move {
            let waited = tokio::select! {
                r = sb.agent.wait_process(&cid, &exec_id) => r.map_err(|e| e.to_string()),
                _ = sb.until_lost() => Err(format!(
                    "the pod VM is gone: {}",
                    sb.lost().unwrap_or_default()
                )),
            };
            let (status, at) = match waited {
                Ok(r) => (
                    exit_status(&cid, &exec_id, r.status),
                    exit_time(r.exited_at_ns, watched_from),
                ),
                Err(e) => {
                    tracing::warn!(container = %cid, exec = %exec_id, "lost the process: {e}");
                    (VM_LOST_STATUS, now())
                }
            };
            if let Some(c) = copies {
                c.lock().await.drained(DRAIN_GRACE).await;
            }
            if let Some(t) = timing {
                if let Ok(mut t) = t.lock() {
                    t.start_to_exit_ms = timings::ms(started.elapsed());
                }
            }
            exit.send_replace(Some((status, at.clone())));
            let mut m = ev::TaskExit::new();
            m.container_id = cid.clone();
            m.id = if exec_id.is_empty() { cid } else { exec_id };
            m.pid = pid;
            m.exit_status = status;
            m.exited_at = MessageField::some(at);
            me.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(m)).await;
        });
    }

    /// Kills an exec whose Start failed after the guest started it, and waits (within
    /// the call's deadline) for the agent to collect it.
    pub(super) async fn end_orphan_exec(&self, sb: &Sandbox, id: &str, exec_id: &str) {
        const SIGKILL: u32 = libc::SIGKILL as u32;
        if let Err(e) = sb.agent.signal_process(id, exec_id, SIGKILL, false).await {
            tracing::warn!(container = %id, exec = %exec_id, "cannot kill a failed exec: {e}");
            return;
        }
        let waited =
            tokio::time::timeout(Duration::from_secs(10), sb.agent.wait_process(id, exec_id));
        if !matches!(waited.await, Ok(Ok(_))) {
            tracing::warn!(container = %id, exec = %exec_id, "a failed exec was not collected");
        }
    }

    /// A container signalled before Start has no exit watcher yet, and a killed one
    /// will never be started: watch it now, so Wait returns and TaskExit is sent (as
    /// runc's shim does). A signal it survives leaves it running, and Start refused.
    pub(super) async fn watch_unstarted(&self, sb: &Arc<Sandbox>, id: &str) {
        let mut containers = self.inner.containers.lock().await;
        let Some(c) = containers.get_mut(id) else {
            return;
        };
        if c.init.started || c.init.exit.borrow().is_some() {
            return;
        }
        c.init.started = true;
        let watched = Watched {
            cid: id.to_owned(),
            exec_id: String::new(),
            pid: c.init.pid,
            exit: c.init.exit.clone(),
            copies: c.init.copies.clone(),
            timing: None,
        };
        drop(containers);
        self.watch_exit(sb.clone(), watched);
    }

    pub(super) async fn create_inner(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        if !req.checkpoint.is_empty() {
            return Err(err(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = read_spec(&bundle)?;
        let t_call = std::time::Instant::now();
        // Before anything is made for it: a container that cannot say its image fails here.
        let guest_image =
            pod::guest_image(&spec).map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        if guest_image.is_some() && crate::shimv2::idmaps::any_user_namespace(&spec) {
            // Its rootfs would not be idmapped, and its pulls would run outside the
            // pod's network namespace.
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                "a container with a user namespace of its own (hostUsers: false, --uidmap) \
                 cannot have its image pulled in the guest yet",
            ));
        }
        let size_from_limits = self.inner.config.vm.size_from_pod_limits;
        pod::own_user_namespace(&mut spec);
        let pod_vm = pod::pod_vm(&spec, size_from_limits).map_err(|e| match &e {
            pod::PodSpecError::Confidential(kind) => {
                // Say everything on this host that stands in the way, not only that
                // the launch flow is missing.
                let tee = crate::hypervisor::confidential::Tee::parse(kind);
                let why = tee
                    .map(|t| {
                        crate::hypervisor::confidential::obstacles(
                            t,
                            &self.inner.config.qemu.binary,
                        )
                    })
                    .unwrap_or_default();
                let mut msg = e.to_string();
                if !why.is_empty() {
                    msg.push_str(&format!("; this host also lacks: {}", why.join("; ")));
                }
                err(ttrpc::Code::FAILED_PRECONDITION, msg)
            }
            pod::PodSpecError::HostNetwork
            | pod::PodSpecError::HostPid
            | pod::PodSpecError::HostIpc
            | pod::PodSpecError::HostNamespace { .. }
            | pod::PodSpecError::SharesHostNetwork
            | pod::PodSpecError::SharesHostNamespace(_) => err(ttrpc::Code::FAILED_PRECONDITION, e),
            pod::PodSpecError::BadAnnotation { .. } | pod::PodSpecError::UserNamespace(_) => {
                err(ttrpc::Code::INVALID_ARGUMENT, e)
            }
        })?;
        pod::adapt_spec(&mut spec);
        let hooks = crate::shimv2::hooks::take(&mut spec)
            .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        if let Some(process) = spec.process_mut() {
            crate::shimv2::rlimits::inherit(process);
        }
        let cri_name = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(pod::CONTAINER_NAME_ANNOTATION).cloned());
        let (sb, booted_here) = self.sandbox(pod_vm, &req.id, &bundle).await?;
        if let Some(why) = sb.lost() {
            return Err(err(
                ttrpc::Code::UNAVAILABLE,
                format!("the pod VM is gone: {why}"),
            ));
        }
        let t_sandbox = std::time::Instant::now();
        if let Some(ns) = &sb.share_userns {
            crate::shimv2::idmaps::check_covered(&spec, ns).map_err(|e| {
                err(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("the container's user namespace: {e}"),
                )
            })?;
        }
        // Known by their host paths, which `mounts::prepare` replaces.
        let watched = crate::shimv2::watched::watched_mounts(&spec);
        let shm = pod::take_pod_shm(&mut spec);
        let root = match guest_image {
            Some(_) => mounts::Root::Guest,
            None => mounts::Root::Host(&req.rootfs),
        };
        let mounts = mounts::prepare(
            &sb.share,
            sb.share_userns.clone(),
            sb.share_ns.clone(),
            &req.id,
            &bundle,
            root,
            &mut spec,
        )
        .map_err(|e| err(ttrpc::Code::INTERNAL, super::util::chain(&e)))?;
        // Recorded before the guest makes the container, so that a shim dying from here
        // on leaves `shim delete` the mounts to take away. Only the mounts: containerd
        // runs `shim delete` in a bundle whenever a task's connection closes, also for a
        // Create its caller gave up on while this live shim still undoes it, and the VM
        // must not go with that container (`shim delete` also spares a live shim's VM;
        // this holds without it). The Create that booted the VM records the VM too (its
        // bundle holds the booted VM's state), as it would on success.
        let early = if booted_here {
            sb.state_for(&req.id, &mounts)
        } else {
            ContainerState {
                container_id: req.id.clone(),
                mounts: mounts.clone(),
                ..Default::default()
            }
        };
        super::undo::save_state(&bundle, &early);
        // From here on, a Create cut short undoes what it made (see `Undo`).
        let mut undo = super::undo::Undo {
            inner: self.inner.clone(),
            sb: sb.clone(),
            id: req.id.clone(),
            mounts: Some(mounts),
            guest_call: None,
            state: (bundle.clone(), booted_here),
            hooks: None,
        };
        pod::restore_pod_shm(&mut spec, shm);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let unnamed = sandbox::disks::take_unnamed(&mut spec);
        if !unnamed.is_empty() {
            tracing::info!(
                container = %req.id,
                "the node's block devices {unnamed:?} are not given to a pod VM wholesale \
                 (a catch-all device rule): the container gets no node for them"
            );
        }
        let fetches = guest_image.is_some()
            || spec
                .annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key(pod::KBS_SECRETS_ANNOTATION));
        let mut creq = pb::CreateContainerRequest::new();
        creq.container_id = req.id.clone();
        creq.stdio = MessageField::some(stdio.streams());
        creq.sandbox_id = self.inner.group.clone();
        creq.guest_image = guest_image.clone().unwrap_or_default();
        creq.watched_mounts = watched.clone();
        // The host's hooks of Create: the VM is up, the guest has not made the container.
        let this = crate::shimv2::hooks::For {
            id: &req.id,
            bundle: &bundle,
            pid: sb.vmm_pid,
        };
        let hooks = Arc::new(hooks);
        undo.hooks = Some(hooks.clone());
        if hooks.has_poststop() {
            // Should this shim die from here on, `shim delete` runs them.
            let pending = ContainerState {
                poststop_pending: true,
                ..early
            };
            super::undo::save_state(&bundle, &pending);
        }
        if let Err(e) = hooks.run_create(&this).await {
            if let Some(undone) = undo.launch() {
                let _ = undone.await;
            }
            return Err(err(ttrpc::Code::FAILED_PRECONDITION, e));
        }
        let cpu_milli = crate::shimv2::sizing::spec_cpu_milli(&spec);
        let memory_mib = crate::shimv2::sizing::spec_memory_mib(&spec);
        // The disks and the guest's container, in a task of their own: a Create cut
        // meanwhile leaves them whole (no disk half plugged), and its undo waits for
        // them before taking them away.
        let (done, answered) = tokio::sync::watch::channel(false);
        undo.guest_call = Some(answered);
        let made = tokio::spawn({
            let sb = sb.clone();
            async move {
                let r = tokio::select! {
                    r = make_in_guest(&sb, creq, &spec, fetches) => r,
                    _ = sb.until_lost() => Err(err(
                        ttrpc::Code::UNAVAILABLE,
                        format!("the pod VM is gone: {}", sb.lost().unwrap_or_default()),
                    )),
                };
                done.send_replace(true);
                r
            }
        });
        let result = async {
            let pid = made
                .await
                .map_err(|e| err(ttrpc::Code::INTERNAL, format!("the create failed: {e}")))??;
            // Streams attach before Start, so no early output waits anywhere.
            let copies = stdio::attach(
                &sb.vsock_uds(),
                &self.inner.namespace,
                &req.id,
                "",
                &stdio,
                self.inner.config.logs.file_limit(),
            )
            .await
            .map_err(|e| {
                err(
                    ttrpc::Code::INTERNAL,
                    format!("{:#}", anyhow::Error::new(e)),
                )
            })?;
            Ok::<_, ttrpc::Error>((pid, copies))
        }
        .await;
        let (pid, copies) = match result {
            Ok(v) => v,
            Err(e) => {
                // Awaited, so a retry after this answer finds nothing left; in a task of
                // its own, so a caller going now cannot cut it.
                if let Some(undone) = undo.launch() {
                    let _ = undone.await;
                }
                return Err(e);
            }
        };
        let mut init = Process::new(stdio, Vec::new());
        init.pid = pid;
        init.copies = Some(Arc::new(Mutex::new(copies)));
        let mut rec = timings::Record {
            kind: "container".into(),
            container_id: req.id.clone(),
            vm_id: sb.id.clone(),
            container_create_ms: timings::ms(t_sandbox.elapsed()),
            ..Default::default()
        };
        if booted_here {
            let shim_start = crate::shimv2::SHIM_STARTED.get().copied().unwrap_or(t_call);
            rec.shim_to_create_ms = timings::ms(t_call.saturating_duration_since(shim_start));
            rec.vm_launch_ms = timings::ms(sb.boot.vm_launch);
            rec.agent_ready_ms = timings::ms(sb.boot.agent_ready);
            rec.sandbox_setup_ms = timings::ms(sb.boot.sandbox_setup);
            rec.from_template = sb.boot.from_template;
        }
        let marks = timings::HostMarks {
            create_called: t_call,
            vm: if booted_here { sb.boot.marks } else { None },
            from_template: sb.boot.from_template,
            create_returned: std::time::Instant::now(),
        };
        // Counted toward the vCPUs the pod's limits ask online (a container beyond
        // what the sandbox's resources said may want more).
        if let Err(e) = sb.set_cpu_limit(&req.id, cpu_milli, false).await {
            tracing::warn!("cannot bring vCPUs online for {}: {e}", req.id);
        }
        // And toward the memory (with `[vm] hotplug_memory`).
        if let Err(e) = sb.set_memory_limit(&req.id, memory_mib, false).await {
            tracing::warn!("cannot grow the VM's memory for {}: {e}", req.id);
        }
        let mut containers = self.inner.containers.lock().await;
        // Nothing waits from here on: the Create can no longer be cut, and its
        // container is the table's.
        let mounts = undo.mounts.take().expect("taken only here or on failure");
        let c = Container {
            timing: Arc::new(std::sync::Mutex::new(rec)),
            marks,
            bundle,
            mounts,
            init,
            execs: HashMap::new(),
            paused: false,
            hooks,
        };
        let created = ContainerState {
            poststop_pending: c.hooks.has_poststop(),
            ..sb.state_for(&req.id, &c.mounts)
        };
        super::undo::save_state(&c.bundle, &created);
        sb.stats.container_created(cri_name.as_deref());
        containers.insert(req.id.clone(), c);
        Ok(pid)
    }
}

/// Plugs the container's disks and creates it in the guest; its pid there.
async fn make_in_guest(
    sb: &Sandbox,
    mut creq: pb::CreateContainerRequest,
    spec: &oci_spec::runtime::Spec,
    fetches: bool,
) -> TtrpcResult<u32> {
    creq.block_devices = sb
        .disks
        .attach(&creq.container_id, spec)
        .await
        .map_err(|e| {
            use crate::hypervisor::disks::DiskError;
            match e {
                DiskError::Unsupported(_) => err(ttrpc::Code::FAILED_PRECONDITION, e),
                DiskError::Full(_) => err(ttrpc::Code::RESOURCE_EXHAUSTED, e),
                _ => err(ttrpc::Code::INTERNAL, super::util::chain(&e)),
            }
        })?;
    creq.oci_spec_json = serde_json::to_vec(spec).map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
    sb.agent
        .create_container(creq, fetches)
        .await
        .map_err(agent_err)
}
