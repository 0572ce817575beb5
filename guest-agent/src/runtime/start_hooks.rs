//! A container's `startContainer` OCI hooks: run in the container (its namespaces, root,
//! user, capabilities and seccomp filter, its working directory, its environment when
//! the hook names none) just before its process's exec, as runc runs them. Their path is the container's. The shim runs every other kind of hook on the
//! host (`shimv2::hooks` there).

use std::path::Path;

use nix::sys::signal::{signal, SigHandler, Signal};
use oci_spec::runtime::Spec;

use super::{Context, RuntimeError};

/// Runs `spec`'s `startContainer` hooks in order; the first failure is the error.
/// `id` names the container; its state names pid 1 (the process as the container sees
/// it) and, as bundle, the guest directory its root is in.
pub fn run(spec: &Spec, id: &str) -> Result<(), RuntimeError> {
    let hooks = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().clone())
        .unwrap_or_default();
    if hooks.is_empty() {
        return Ok(());
    }
    let bundle = spec
        .root()
        .as_ref()
        .and_then(|r| r.path().parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut state = serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "status": "created",
        "pid": std::process::id(),
        "bundle": bundle,
    });
    if let Some(a) = spec.annotations().as_ref().filter(|a| !a.is_empty()) {
        state["annotations"] = serde_json::json!(a);
    }
    let state = serde_json::to_vec(&state).unwrap_or_default();
    // As runc's: a hook without an environment of its own gets the process's, and
    // runs in its working directory (the helper is there already).
    let process = spec.process().as_ref();
    let env = process.and_then(|p| p.env().clone()).unwrap_or_default();
    let cwd = process
        .map(|p| p.cwd().clone())
        .unwrap_or_else(|| "/".into());
    // A hook that does not read its state closes the pipe: that must not end this
    // process, whose SIGPIPE is the default the container's process inherits.
    // SAFETY: setting a signal's disposition to ignore or default installs no handler.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }
        .ctx(|| "cannot ignore SIGPIPE".into())?;
    let ran = hooks.iter().enumerate().try_for_each(|(i, hook)| {
        cocoon_protocol::hook::run_oci(hook, &state, &cwd, Some(&env)).map_err(|e| {
            RuntimeError::Invalid(format!(
                "error running startContainer hook #{i} ({}): {e}",
                hook.path().display()
            ))
        })
    });
    // SAFETY: as above.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }
        .ctx(|| "cannot restore SIGPIPE".into())?;
    ran?;
    Ok(())
}
