//! CreateContainer: the root the guest makes (a pulled image, the built-in pause) or
//! waits for (a shared one), the secrets from the key broker, then the container.

use cocoon_protocol::agent::{CreateContainerRequest, CreateContainerResponse};

use super::{rpc_error, status, AgentService, CALL_DEADLINE};
use crate::sandbox;

/// What the agent made for a container beside its spec: a pulled image, its secrets.
pub(super) fn remove_container_files(id: &str) {
    crate::pause::remove(std::path::Path::new(crate::pull::IMAGES_DIR), id);
    crate::pull::remove_for_container(std::path::Path::new(crate::secrets::DIR), id);
    crate::watched::remove(id);
}

impl AgentService {
    /// The secrets the spec asks for (`crate::secrets`), fetched from the pod's key
    /// broker and mounted into it: the spec to create with, or `None` if it asks none.
    /// `doc` is the parsed spec, `None` when it did not parse (the container runtime's
    /// to report).
    async fn provide_secrets(
        &self,
        id: &str,
        doc: Option<serde_json::Value>,
    ) -> ttrpc::Result<Option<Vec<u8>>> {
        let Some(mut doc) = doc else {
            return Ok(None);
        };
        let wanted = crate::secrets::requested(&doc)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e))?;
        if wanted.is_empty() {
            return Ok(None);
        }
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container id {id:?}"),
            ));
        }
        let gate = self.state.policy.clone();
        let dir = std::path::Path::new(crate::secrets::DIR).join(id);
        let bytes = tokio::task::spawn_blocking(move || {
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(crate::secrets::DIR)
            .map_err(|e| format!("cannot make {}: {e}", crate::secrets::DIR))?;
            crate::secrets::provide(
                |s| gate.secret(&s.repository, &s.kind, &s.tag),
                &wanted,
                &dir,
                &mut doc,
            )?;
            serde_json::to_vec(&doc).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
        .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
        Ok(Some(bytes))
    }

    /// Copies of the container's ConfigMap-like volumes (`crate::watched`): the spec to
    /// create with, when any was made, and the copies to keep fresh.
    async fn mirror_watched(
        &self,
        req: &CreateContainerRequest,
        spec: &[u8],
    ) -> ttrpc::Result<(Option<Vec<u8>>, Vec<crate::watched::Mirror>)> {
        let id = &req.container_id;
        // A bad id is the container's create to refuse.
        if req.watched_mounts.is_empty()
            || crate::container::validate_id("container id", id, false).is_err()
        {
            return Ok((None, Vec::new()));
        }
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(spec) else {
            return Ok((None, Vec::new()));
        };
        let dir = std::path::Path::new(crate::watched::DIR).join(id);
        let wanted: Vec<String> = req.watched_mounts.iter().take(64).cloned().collect();
        tokio::task::spawn_blocking(move || {
            let shared = std::path::Path::new(crate::sandbox::SHARED_DIR);
            let mirrors = crate::watched::provide(shared, &dir, &wanted, &mut doc);
            if mirrors.is_empty() {
                return Ok((None, mirrors));
            }
            serde_json::to_vec(&doc)
                .map(|bytes| (Some(bytes), mirrors))
                .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))
        })
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
    }

    /// The spec with the guest's numbers for the block devices the host plugged for
    /// it (`crate::disks`), or `None` when it has none.
    async fn remap_disks(
        &self,
        req: &CreateContainerRequest,
        spec: &[u8],
    ) -> ttrpc::Result<Option<Vec<u8>>> {
        if req.block_devices.is_empty() {
            return Ok(None);
        }
        let deadline = CALL_DEADLINE
            .try_with(|d| d.into_std())
            .unwrap_or_else(|_| std::time::Instant::now() + std::time::Duration::from_secs(60));
        let (wanted, spec) = (req.block_devices.clone(), spec.to_vec());
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            // The disks' driver, with the first container that names one.
            crate::modules::load_on_demand(&state.on_demand, &state.modules, &state.cmdline)
                .map_err(|e| format!("loading the block device driver: {e}"))?;
            let sys = std::path::Path::new(crate::disks::SYS_BLOCK);
            let (spec, found) = crate::disks::remap(&spec, &wanted, sys, deadline)?;
            for disk in &found {
                crate::disks::ready(disk)?;
            }
            Ok::<_, String>(spec)
        })
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
        .map(Some)
        .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))
    }

    pub(super) async fn create_container_inner(
        &self,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let timeline = &crate::details::TIMELINE;
        timeline.mark("container-create-received", &req.container_id);
        // Storages may need filesystem modules that load after boot.
        sandbox::wait_modules(&self.state).await.map_err(|e| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                crate::runtime::error_chain(&e),
            )
        })?;
        // What the agent makes beside the spec (a pulled image, secrets) is named by
        // the container's id: never touch those of a container that exists.
        if self.containers().get(&req.container_id).is_ok() {
            return Err(rpc_error(crate::container::ContainerError::Exists(
                req.container_id.clone(),
            )));
        }
        let pulled = if req.guest_image.is_empty() {
            None
        } else if req.guest_image == crate::pause::BUILTIN_PAUSE {
            let (id, spec) = (req.container_id.clone(), req.oci_spec_json.clone());
            let spec = tokio::task::spawn_blocking(move || {
                // The agent's own binary, wherever it sits now.
                let exe = std::path::Path::new("/proc/self/exe");
                crate::pause::prepare(crate::pull::images_dir()?, &id, exe, &spec)
            })
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
            Some(spec)
        } else {
            let (id, image, spec) = (
                req.container_id.clone(),
                req.guest_image.clone(),
                req.oci_spec_json.clone(),
            );
            let transport = self
                .state
                .policy
                .registry_transport()
                .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
            let deadline = CALL_DEADLINE
                .try_with(|d| d.into_std())
                .unwrap_or_else(|_| {
                    std::time::Instant::now() + std::time::Duration::from_secs(300)
                });
            let (spec, config) = tokio::task::spawn_blocking(move || {
                let images = crate::pull::images_dir()?;
                crate::pull::for_container(images, &id, &image, &spec, deadline, &transport)
            })
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
            timeline.mark("image-pulled", &req.container_id);
            let decided = self.state.policy.check_pulled(|| {
                let mut input = crate::policy::input_of(&req);
                input["image_config"] = config;
                if let Some(accounts) = pulled_accounts(&req.container_id) {
                    input["image_accounts"] = accounts;
                }
                input
            });
            if let Err(denied) = decided {
                tracing::warn!(call = "CreateContainer", "refused: {denied}");
                let id = req.container_id.clone();
                let _ = tokio::task::spawn_blocking(move || remove_container_files(&id)).await;
                return Err(status(ttrpc::Code::PERMISSION_DENIED, denied.to_string()));
            }
            Some(spec)
        };
        let spec = pulled.as_deref().unwrap_or(&req.oci_spec_json);
        let remapped = match self.remap_disks(&req, spec).await {
            Ok(v) => v,
            Err(e) => {
                remove_container_files(&req.container_id);
                return Err(e);
            }
        };
        let spec = remapped.as_deref().unwrap_or(spec);
        // Parsed once for the two steps that look into it as a document (a parse of a
        // few KB is 2-4 ms of a create under TCG).
        let doc = serde_json::from_slice::<serde_json::Value>(spec).ok();
        sandbox::wait_shared_mounts(doc.as_ref()).await;
        let with_secrets = match self.provide_secrets(&req.container_id, doc).await {
            Ok(v) => v,
            Err(e) => {
                remove_container_files(&req.container_id);
                return Err(e);
            }
        };
        let spec = with_secrets.as_deref().unwrap_or(spec);
        let (with_copies, mirrors) = match self.mirror_watched(&req, spec).await {
            Ok(v) => v,
            Err(e) => {
                remove_container_files(&req.container_id);
                return Err(e);
            }
        };
        // Named now, before anything could remove and remake it.
        let copies = std::path::Path::new(crate::watched::DIR).join(&req.container_id);
        let copies_id = crate::watched::identity(&copies);
        let created = self
            .containers()
            .create(
                &req.container_id,
                with_copies.as_deref().unwrap_or(spec),
                &req.storages,
                req.stdio.get_or_default(),
            )
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                if !matches!(e, crate::container::ContainerError::Exists(_)) {
                    remove_container_files(&req.container_id);
                }
                return Err(rpc_error(e));
            }
        };
        if !mirrors.is_empty() {
            tokio::spawn(crate::watched::keep_fresh(copies, copies_id, mirrors));
        }
        timeline.mark("container-created", &req.container_id);
        let mut r = CreateContainerResponse::new();
        r.pid = pid as u32;
        Ok(r)
    }
}

/// The accounts of the image pulled for container `id`, for the policy; none when they
/// cannot be read, so that a policy that needs them refuses what it cannot check.
fn pulled_accounts(id: &str) -> Option<serde_json::Value> {
    let read = crate::pull::images_dir()
        .and_then(|d| crate::pull::accounts::of_rootfs(&d.join(id).join("rootfs")));
    read.map_err(|e| tracing::warn!("the policy gets no accounts of container {id}'s image: {e}"))
        .ok()
}
