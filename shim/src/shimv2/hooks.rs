//! A container's OCI hooks: those whose program is the host's run here, the
//! `startContainer` ones (whose program is the container's) go to the guest in the spec.
//!
//! Where each runs, as Kata runs them (a VM has no runtime namespace inside it):
//!
//! | hook | where | when | on failure |
//! |---|---|---|---|
//! | `prestart`, `createRuntime`, `createContainer` | host, the shim's namespaces | Create, once the VM is up, before the guest makes the container | Create fails and is undone |
//! | `startContainer` | guest, the container's namespaces and identity | Start, just before the process's exec | Start fails |
//! | `poststart` | host | Start, once the process runs | the container is killed and Start fails |
//! | `poststop` | host | Delete, once the container is gone | logged; Delete goes on |
//!
//! runc 1.1 runs `poststart` at create (its issue 4347); Cocoon keeps the spec's moment,
//! as Kata does. A Create that fails or is abandoned once its hooks began runs the
//! `poststop` hooks when undone (`Undo`), as runc's destroy does.
//!
//! `createContainer` runs in the host's namespaces, not the container's: its program is
//! the host's, which the guest cannot run. The state a host hook reads names the VMM's
//! pid (the program itself, not a jail's waiter; none at `poststop`, as under runc): a
//! live process, whose namespaces are the jail's own (its network namespace holds a
//! loopback alone), so a hook that enters them changes nothing of the host's. A network
//! a hook sets up there never reaches the VM, which has booted by then (nerdctl's CNI
//! hook; `ctr run --with-ns` is the way). The statuses are runc 1.1's (`creating`,
//! `created` at `poststart`, `stopped`). The bundle is the host's. A hook runs in the
//! bundle, with its own `env` (or the shim's when it names none, as runc's get runc's),
//! and `timeout` seconds at most when given (above zero, or Create is refused).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Hook, Hooks, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    Poststart,
    Poststop,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook #{index} ({path}) has a timeout of {timeout}s: it must be above zero")]
    BadTimeout {
        stage: String,
        index: usize,
        path: PathBuf,
        timeout: i64,
    },
    #[error("error running {stage} hook #{index} ({path}): {source}")]
    Run {
        stage: Stage,
        index: usize,
        path: PathBuf,
        #[source]
        source: cocoon_protocol::hook::HookError,
    },
    #[error("the {stage} hook #{index} could not be run: {message}")]
    Task {
        stage: Stage,
        index: usize,
        message: String,
    },
}

/// The hooks of one container that run on the host, with what their state names.
#[derive(Debug, Clone, Default)]
pub struct HostHooks {
    create: Vec<(Stage, Hook)>,
    poststart: Vec<Hook>,
    poststop: Vec<Hook>,
    version: String,
    annotations: HashMap<String, String>,
}

/// Takes the host's hooks out of `spec`, leaving it only the `startContainer` ones;
/// refuses a timeout that is not above zero in any of them.
pub fn take(spec: &mut Spec) -> Result<HostHooks, HookError> {
    let hooks = spec.hooks().clone().unwrap_or_default();
    #[allow(deprecated)] // runc still runs prestart hooks, and so do we.
    let prestart = hooks.prestart().clone().unwrap_or_default();
    let list = |h: &Option<Vec<Hook>>| h.clone().unwrap_or_default();
    let start_container = list(hooks.start_container());
    for (stage, hooks) in [
        ("prestart", &prestart),
        ("createRuntime", &list(hooks.create_runtime())),
        ("createContainer", &list(hooks.create_container())),
        ("startContainer", &start_container),
        ("poststart", &list(hooks.poststart())),
        ("poststop", &list(hooks.poststop())),
    ] {
        for (index, h) in hooks.iter().enumerate() {
            if let Some(timeout) = h.timeout().filter(|t| *t <= 0) {
                return Err(HookError::BadTimeout {
                    stage: stage.into(),
                    index,
                    path: h.path().clone(),
                    timeout,
                });
            }
        }
    }
    let tagged = |stage, h: &Option<Vec<Hook>>| list(h).into_iter().map(move |h| (stage, h));
    let create = prestart
        .into_iter()
        .map(|h| (Stage::Prestart, h))
        .chain(tagged(Stage::CreateRuntime, hooks.create_runtime()))
        .chain(tagged(Stage::CreateContainer, hooks.create_container()))
        .collect();
    let host = HostHooks {
        create,
        poststart: list(hooks.poststart()),
        poststop: list(hooks.poststop()),
        version: spec.version().clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
    };
    let mut guest = Hooks::default();
    guest.set_start_container(Some(start_container).filter(|h| !h.is_empty()));
    spec.set_hooks(guest.start_container().is_some().then_some(guest));
    Ok(host)
}

/// The container a hook is run for.
#[derive(Clone, Copy)]
pub struct For<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    /// The VMM's host pid, where it is still known.
    pub pid: Option<u32>,
}

impl HostHooks {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.poststart.is_empty() && self.poststop.is_empty()
    }

    /// `prestart`, `createRuntime` and `createContainer`, in that order; the first
    /// failure ends them.
    pub async fn run_create(&self, c: &For<'_>) -> Result<(), HookError> {
        let state = self.state(c, "creating");
        let mut index = HashMap::new();
        for (stage, hook) in &self.create {
            let i = index.entry(*stage).or_insert(0usize);
            run_one(*stage, *i, hook, &state, c.bundle).await?;
            *i += 1;
        }
        Ok(())
    }

    /// The state says "created", as runc 1.1 says: Start has not returned yet.
    pub async fn run_poststart(&self, c: &For<'_>) -> Result<(), HookError> {
        let state = self.state(c, "created");
        for (i, hook) in self.poststart.iter().enumerate() {
            run_one(Stage::Poststart, i, hook, &state, c.bundle).await?;
        }
        Ok(())
    }

    /// Every `poststop` hook, whatever the others did: each failure is logged. The state
    /// names no pid, as runc's: the container's process is gone.
    /// Whether there are poststop hooks to run.
    pub fn has_poststop(&self) -> bool {
        !self.poststop.is_empty()
    }

    pub async fn run_poststop(&self, c: &For<'_>) {
        let c = For { pid: None, ..*c };
        let state = self.state(&c, "stopped");
        for (i, hook) in self.poststop.iter().enumerate() {
            if let Err(e) = run_one(Stage::Poststop, i, hook, &state, c.bundle).await {
                tracing::warn!(container = c.id, "{e}");
            }
        }
    }

    /// The container's state as runc gives it to a hook.
    fn state(&self, c: &For<'_>, status: &str) -> Vec<u8> {
        let mut s = serde_json::json!({
            "ociVersion": self.version,
            "id": c.id,
            "status": status,
            "bundle": c.bundle,
        });
        if let Some(pid) = c.pid {
            s["pid"] = pid.into();
        }
        if !self.annotations.is_empty() {
            s["annotations"] = serde_json::json!(self.annotations);
        }
        serde_json::to_vec(&s).unwrap_or_default()
    }
}

/// Runs one hook on a blocking thread (it waits on a process).
async fn run_one(
    stage: Stage,
    index: usize,
    hook: &Hook,
    state: &[u8],
    cwd: &Path,
) -> Result<(), HookError> {
    let (hook, state, cwd) = (hook.clone(), state.to_vec(), cwd.to_path_buf());
    let path = hook.path().clone();
    tracing::debug!(%stage, index, path = %path.display(), "running hook");
    tokio::task::spawn_blocking(move || cocoon_protocol::hook::run_oci(&hook, &state, &cwd, None))
        .await
        .map_err(|e| HookError::Task {
            stage,
            index,
            message: e.to_string(),
        })?
        .map_err(|source| HookError::Run {
            stage,
            index,
            path,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": {"a": "b"},
            "hooks": hooks
        }))
        .unwrap()
    }

    fn writes(file: &Path, what: &str) -> serde_json::Value {
        serde_json::json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("echo {what} $(cat) >> {}", file.display())]
        })
    }

    #[tokio::test]
    async fn host_hooks_run_in_order_with_the_state_and_start_container_stays() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut s = spec(serde_json::json!({
            "prestart": [writes(&log, "prestart")],
            "createContainer": [writes(&log, "createContainer")],
            "createRuntime": [writes(&log, "createRuntime")],
            "startContainer": [{"path": "/in/the/container"}],
            "poststart": [writes(&log, "poststart")],
            "poststop": [{"path": "/bin/false"}, writes(&log, "poststop")]
        }));
        let host = take(&mut s).unwrap();
        let guest = s.hooks().as_ref().unwrap();
        assert_eq!(guest.start_container().as_ref().unwrap().len(), 1);
        assert!(guest.create_runtime().is_none() && guest.poststop().is_none());
        let c = For {
            id: "c1",
            bundle: dir.path(),
            pid: Some(42),
        };
        host.run_create(&c).await.unwrap();
        host.run_poststart(&c).await.unwrap();
        // The failing first poststop hook does not stop the second.
        host.run_poststop(&c).await;
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let order: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            order,
            [
                "prestart",
                "createRuntime",
                "createContainer",
                "poststart",
                "poststop"
            ]
        );
        let state: serde_json::Value =
            serde_json::from_str(lines[0].split_once(' ').unwrap().1).unwrap();
        assert_eq!(state["id"], "c1");
        assert_eq!(state["pid"], 42);
        assert_eq!(state["status"], "creating");
        assert_eq!(state["ociVersion"], "1.0.2");
        assert_eq!(state["annotations"]["a"], "b");
        assert_eq!(state["bundle"], dir.path().to_str().unwrap());
        assert!(lines[3].contains("\"created\"") && lines[4].contains("\"stopped\""));
        assert!(!lines[4].contains("\"pid\""), "{}", lines[4]);
    }

    #[tokio::test]
    async fn a_failing_hook_is_named_and_ends_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut s = spec(serde_json::json!({
            "createRuntime": [
                {"path": "/bin/sh", "args": ["sh", "-c", "echo no >&2; exit 2"]},
                writes(&log, "after")
            ]
        }));
        let host = take(&mut s).unwrap();
        assert!(s.hooks().is_none());
        let c = For {
            id: "c1",
            bundle: dir.path(),
            pid: None,
        };
        let e = host.run_create(&c).await.unwrap_err().to_string();
        assert!(e.contains("createRuntime hook #0 (/bin/sh)"), "{e}");
        assert!(e.contains("stderr: no"), "{e}");
        assert!(!log.exists());
    }

    #[test]
    fn a_timeout_not_above_zero_is_refused() {
        let mut s = spec(serde_json::json!({
            "poststop": [{"path": "/bin/true"}, {"path": "/bin/true", "timeout": 0}]
        }));
        let e = take(&mut s).unwrap_err().to_string();
        assert!(
            e.contains("poststop hook #1 (/bin/true) has a timeout of 0s"),
            "{e}"
        );
    }
}
