//! Start: a container's init or an exec'd process, started in the guest, its exit
//! watched, its output copied, the start reported to containerd.

use super::*;

impl Service {
    /// Task.Start.
    pub(super) async fn start_task(
        &self,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let sb = self.live_sandbox().await?;
        // The containers lock is never held across a guest call: a slow or dead guest
        // must not stall every other task call (kubelet's probes exec all the time).
        // `started` is claimed first, so a second Start is refused meanwhile, and given
        // back if the guest refuses.
        let mut containers = self.inner.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if req.exec_id.is_empty() {
            if c.init.started {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "container already started",
                ));
            }
            c.init.started = true;
            let pid = c.init.pid;
            let watched = Watched {
                cid: req.id.clone(),
                exec_id: String::new(),
                pid,
                exit: c.init.exit.clone(),
                copies: c.init.copies.clone(),
                timing: Some(c.timing.clone()),
            };
            let marks = c.marks;
            let (hooks, bundle) = (c.hooks.clone(), c.bundle.clone());
            drop(containers);
            let start_called = std::time::Instant::now();
            if let Err(e) = sb.agent.start_container(&req.id).await {
                if let Some(c) = self.inner.containers.lock().await.get_mut(&req.id) {
                    c.init.started = false;
                }
                return Err(agent_err(e));
            }
            let start = (start_called, std::time::Instant::now());
            self.watch_exit(sb.clone(), watched);
            let this = crate::shimv2::hooks::For {
                id: &req.id,
                bundle: &bundle,
                pid: sb.vmm_pid,
            };
            if let Err(e) = hooks.run_poststart(&this).await {
                // As runc 1.1: the container is ended and Start fails.
                if let Err(k) = sb.agent.signal_process(&req.id, "", 9, true).await {
                    tracing::warn!(container = %req.id, "cannot kill it after its poststart hook failed: {k}");
                }
                return Err(err(ttrpc::Code::FAILED_PRECONDITION, e));
            }
            // Off the Start path: one more call to read the guest's side.
            let run_dir = self.inner.config.paths.run_dir.clone();
            tokio::spawn(place_timeline(
                sb.clone(),
                req.id.clone(),
                marks,
                start,
                run_dir,
            ));
            let mut m = ev::TaskStart::new();
            m.container_id = req.id.clone();
            m.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(m))
                .await;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let p = c
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
        if p.started {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                "exec process already started",
            ));
        }
        p.started = true;
        let process_json = std::mem::take(&mut p.spec_json);
        let stdio_paths = p.stdio.clone();
        let exit = p.exit.clone();
        drop(containers);
        let mut ereq = pb::ExecProcessRequest::new();
        ereq.container_id = req.id.clone();
        ereq.exec_id = req.exec_id.clone();
        ereq.process_json = process_json.clone();
        ereq.stdio = MessageField::some(stdio_paths.streams());
        let started = async {
            let pid = sb.agent.exec_process(ereq).await.map_err(agent_err)?;
            match stdio::attach(
                &sb.vsock_uds(),
                &self.inner.namespace,
                &req.id,
                &req.exec_id,
                &stdio_paths,
                self.inner.config.logs.file_limit(),
            )
            .await
            {
                Ok(copies) => Ok((pid, Arc::new(Mutex::new(copies)))),
                Err(e) => {
                    // The process runs in the guest but nothing can reach its stdio:
                    // end it there, and collect its exit so the agent forgets it.
                    self.end_orphan_exec(&sb, &req.id, &req.exec_id).await;
                    Err(err(
                        ttrpc::Code::INTERNAL,
                        format!("{:#}", anyhow::Error::new(e)),
                    ))
                }
            }
        }
        .await;
        let mut containers = self.inner.containers.lock().await;
        let p = containers
            .get_mut(&req.id)
            .and_then(|c| c.execs.get_mut(&req.exec_id));
        let (pid, copies) = match (started, p) {
            (Ok(v), Some(p)) => {
                p.pid = v.0;
                p.copies = Some(v.1.clone());
                v
            }
            (Err(e), Some(p)) => {
                p.started = false;
                p.spec_json = process_json;
                return Err(e);
            }
            (Err(e), None) => return Err(e),
            // Deleted while it started: nothing will wait for it here.
            (Ok(_), None) => return Err(not_found(&format!("exec {}", req.exec_id))),
        };
        drop(containers);
        self.watch_exit(
            sb.clone(),
            Watched {
                cid: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                exit,
                copies: Some(copies),
                timing: None,
            },
        );
        let mut m = ev::TaskExecStarted::new();
        m.container_id = req.id.clone();
        m.exec_id = req.exec_id.clone();
        m.pid = pid;
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(m))
            .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }
}
