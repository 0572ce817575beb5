//! Undoing what a call made when it cannot finish: a Create cut short by its caller
//! (ttrpc drops a handler's future when the call's deadline passes, e.g. kubelet's
//! during a slow guest pull), or one that failed; and keeping the id of a container
//! being undone (or deleted) from being made again meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::util::err;
use super::Inner;
use crate::shimv2::mounts::ContainerMounts;
use crate::shimv2::persist::ContainerState;
use crate::shimv2::sandbox::Sandbox;

/// How long the teardown waits for containers still being undone or deleted, before it
/// stops the VM (which ends what they wait on) and again after: within containerd's 3 s
/// for Shutdown as a rule, though the teardown goes on past it either way.
pub(super) const UNDO_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An id held in `Inner::undoing` while this lives: a Create of it is refused
/// (UNAVAILABLE, "try again"), and Shutdown waits for the set to empty.
pub(super) struct Undoing {
    inner: Arc<Inner>,
    id: String,
}

impl Undoing {
    pub(super) fn hold(inner: &Arc<Inner>, id: &str) -> Self {
        inner.undoing.send_modify(|s| {
            s.insert(id.to_owned());
        });
        Self {
            inner: inner.clone(),
            id: id.to_owned(),
        }
    }
}

impl Drop for Undoing {
    fn drop(&mut self) {
        self.inner.undoing.send_modify(|s| {
            s.remove(&self.id);
        });
    }
}

/// Refuses a Create of an id still being undone.
pub(super) fn refuse_undoing(inner: &Inner, id: &str) -> Result<(), ttrpc::Error> {
    if inner.undoing.borrow().contains(id) {
        return Err(err(
            ttrpc::Code::UNAVAILABLE,
            format!("container {id}: an earlier Create or Delete of it is still being undone; try again"),
        ));
    }
    Ok(())
}

/// What a Create has made so far, undone if the Create does not finish. Create stays
/// cancellable, since a boot nobody waits for is meant to be abandoned; what it made
/// once the VM was there is undone in a task of its own, after the guest answered the
/// CreateContainer (removing the container while the guest still makes it would miss
/// it), with the id held (`Undoing`) so a retried Create cannot have its container
/// removed by this undo.
pub(super) struct Undo {
    pub inner: Arc<Inner>,
    pub sb: Arc<Sandbox>,
    pub id: String,
    /// Taken by a Create that finished, or by `launch`.
    pub mounts: Option<ContainerMounts>,
    /// Becomes true once the disks and the guest's container are made, or refused (or
    /// the call's own deadline passed).
    pub guest_call: Option<tokio::sync::watch::Receiver<bool>>,
    /// The bundle, and whether this Create booted the VM: its state file is then put
    /// back to the VM's alone once undone, and removed otherwise.
    pub state: (PathBuf, bool),
    /// The container's host hooks, once its Create hooks began: its poststop hooks run
    /// once it is undone, as runc's destroy of a container whose create failed.
    pub hooks: Option<Arc<crate::shimv2::hooks::HostHooks>>,
}

impl Undo {
    /// Starts the undo in a task of its own (a cut caller cannot stop it); None if
    /// there is nothing to undo.
    pub(super) fn launch(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let mut mounts = self.mounts.take()?;
        let (bundle, booted) = std::mem::take(&mut self.state);
        let previous = booted.then(|| self.sb.state_for(&self.id, &Default::default()));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            mounts.cleanup();
            put_back(&bundle, previous);
            return None;
        };
        let held = Undoing::hold(&self.inner, &self.id);
        let (sb, id, guest_call) = (self.sb.clone(), self.id.clone(), self.guest_call.take());
        let hooks = self.hooks.take();
        Some(rt.spawn(async move {
            if let Some(mut answered) = guest_call {
                let _ = answered.wait_for(|a| *a).await;
            }
            take_back(Some(&sb), &id, &mut mounts).await;
            if let Some(hooks) = hooks {
                let this = crate::shimv2::hooks::For {
                    id: &id,
                    bundle: &bundle,
                    pid: None,
                };
                hooks.run_poststop(&this).await;
            }
            put_back(&bundle, previous);
            drop(held);
        }))
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.mounts.is_some() {
            tracing::warn!(container = %self.id, "Create abandoned by its caller: undoing it");
            self.launch();
        }
    }
}

/// Writes `st` in `bundle` (for `shim delete`), saying so if it cannot.
pub(super) fn save_state(bundle: &Path, st: &ContainerState) {
    if let Err(e) = st.save(bundle) {
        tracing::warn!("cannot save state in {}: {e}", bundle.display());
    }
}

/// The bundle's state file once a Create is undone: the VM's alone in the bundle of the
/// Create that booted it, none in another's.
fn put_back(bundle: &Path, vm: Option<ContainerState>) {
    match vm {
        Some(st) => save_state(bundle, &st),
        None => ContainerState::remove(bundle),
    }
}

/// A container's part of the pod goes (at Delete, or undoing a Create): from a live VM
/// its guest container, the limits it counted toward and its disks (a lost VM has no
/// guest to ask: that would only wait out the call's deadline); its mounts always.
pub(super) async fn take_back(sb: Option<&Sandbox>, id: &str, mounts: &mut ContainerMounts) {
    if let Some(sb) = sb.filter(|sb| sb.lost().is_none()) {
        if let Err(e) = sb.agent.remove_container(id).await {
            tracing::warn!("agent remove {id}: {e}");
        }
        sb.forget_limits(id);
        sb.disks.release(id).await;
    }
    mounts.cleanup();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undone_create_leaves_the_vms_state_alone_or_none() {
        let bundle = tempfile::tempdir().unwrap();
        let booting = ContainerState {
            container_id: "pod".into(),
            vm_pids: vec![7],
            ..Default::default()
        };
        let created = ContainerState {
            container_id: "pod".into(),
            vm_pids: vec![7],
            mounts: ContainerMounts {
                dir: "/share/pod".into(),
                mounted: vec!["/share/pod/rootfs".into()],
                ns: None,
            },
            ..Default::default()
        };
        // The bundle of the Create that booted the VM: the VM's state, no mounts.
        created.save(bundle.path()).unwrap();
        put_back(bundle.path(), Some(booting));
        let st = ContainerState::load(bundle.path()).unwrap();
        assert_eq!(st.vm_pids, [7]);
        assert!(st.mounts.mounted.is_empty());
        // Another container's: none.
        put_back(bundle.path(), None);
        assert!(ContainerState::load(bundle.path()).is_none());
    }
}
