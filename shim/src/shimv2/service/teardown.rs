//! The end of a container and of the pod: Delete, Shutdown, and the teardown that both
//! a Shutdown and a SIGTERM lead to, done once. Delete and Shutdown run to their end
//! whatever their caller does (`util::to_completion`).

use super::*;

impl Service {
    pub(super) async fn delete_task(
        &self,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut containers = self.inner.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            if p.started && p.exit.borrow().is_none() {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "cannot delete a running exec process",
                ));
            }
            let p = c.execs.remove(&req.exec_id).expect("checked above");
            let (status, at) = p.exit.borrow().clone().unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        if c.init.started && c.init.exit.borrow().is_none() {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("cannot delete running task {}", req.id),
            ));
        }
        let t_delete = std::time::Instant::now();
        let mut c = containers.remove(&req.id).expect("checked above");
        // Until its guest container, disks and mounts are gone, a Create of the id is
        // refused and Shutdown waits.
        let _held = super::undo::Undoing::hold(&self.inner, &req.id);
        self.inner
            .oom_filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deleted(&req.id, std::time::Instant::now());
        drop(containers);
        let sb = self.existing_sandbox().await.ok();
        super::undo::take_back(sb.as_deref(), &req.id, &mut c.mounts).await;
        ContainerState::remove(&c.bundle);
        let this = crate::shimv2::hooks::For {
            id: &req.id,
            bundle: &c.bundle,
            pid: sb.as_ref().and_then(|sb| sb.vmm_pid),
        };
        c.hooks.run_poststop(&this).await;
        if let Ok(mut t) = c.timing.lock() {
            t.delete_ms = timings::ms(t_delete.elapsed());
            timings::append(&self.inner.config.paths.run_dir, &t);
        }
        let (status, at) = c.init.exit.borrow().clone().unwrap_or((0, now()));
        let pid = c.init.pid;
        let mut m = ev::TaskDelete::new();
        m.container_id = req.id.clone();
        m.pid = pid;
        m.exit_status = status;
        m.exited_at = MessageField::some(at.clone());
        m.id = req.id.clone();
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(m))
            .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    pub(super) async fn shutdown_shim(&self) -> TtrpcResult<api::Empty> {
        if !self.inner.containers.lock().await.is_empty() {
            return Ok(api::Empty::new());
        }
        // A boot in progress holds the sandbox slot: abandon it rather than wait for it.
        self.inner.cancel_boot.send_replace(true);
        self.tear_down().await;
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }

    /// Stops the pod's VM (its share, cgroup and network go with it), once: a second
    /// caller (a Shutdown again, a SIGTERM) waits for the first instead of ending the
    /// shim in the middle of it. Containers still being undone or deleted get a moment
    /// before and after: the VM's end ends what they wait on (`Sandbox::stop` ends
    /// every wait on the guest).
    pub(super) async fn tear_down(&self) {
        self.inner
            .torn_down
            .get_or_init(|| async {
                if !self.settled().await {
                    tracing::warn!(
                        "stopping the pod VM with containers still being undone: {:?}",
                        self.inner.undoing.borrow()
                    );
                }
                if let Some(sb) = self.inner.sandbox.lock().await.take() {
                    sb.stop().await;
                }
                // All of the pod is gone: the node's record of it too.
                let record = self
                    .inner
                    .record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(r) = record {
                    r.release();
                }
                // What waited on the guest ends with it: let it finish (a Delete's
                // state file and event) before the shim exits and drops it.
                if !self.settled().await {
                    tracing::warn!(
                        "the shim exits with containers still being undone: {:?}",
                        self.inner.undoing.borrow()
                    );
                }
            })
            .await;
    }

    /// Waits (`UNDO_WAIT` at most) for no container to be being undone or deleted.
    async fn settled(&self) -> bool {
        let mut undoing = self.inner.undoing.subscribe();
        let settled = undoing.wait_for(|s| s.is_empty());
        tokio::time::timeout(super::undo::UNDO_WAIT, settled)
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
