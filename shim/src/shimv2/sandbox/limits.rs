//! A running pod VM's room as its containers' limits change (UpdateContainerResources,
//! a Kubernetes in-place resize): vCPUs brought online (`[vm] hotplug_vcpus`) and memory
//! plugged (`[vm] hotplug_memory`).

use std::time::Instant;

use super::Sandbox;
use crate::hypervisor::memctl::MemctlError;

impl Sandbox {
    /// Records `container`'s CPU limit (thousandths of a CPU): a created container's,
    /// or with `known_only` a new one for a container already recorded (an update
    /// racing the container's delete records nothing). When the pod's limits then ask
    /// for more vCPUs than are online, has the guest bring more online (`[vm]
    /// hotplug_vcpus`). A guest that brings fewer online than asked is logged, not an
    /// error: the container's own limit is set either way, as under runc on a node with
    /// fewer CPUs than its limit.
    pub async fn set_cpu_limit(
        &self,
        container: &str,
        milli: u64,
        known_only: bool,
    ) -> Result<(), crate::agent_client::AgentError> {
        let room = || self.cpus.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut room = room();
            if known_only {
                if !room.limits.change(container, milli) {
                    return Ok(());
                }
            } else {
                room.limits.set(container, milli);
            }
        }
        // One call at a time, each asking for what the limits want by then.
        let _one = self.onlining.lock().await;
        let Some(want) = room().wanted() else {
            return Ok(());
        };
        let got = self.agent.online_cpus(want).await?;
        let (online, present) = {
            let mut room = room();
            room.onlined(got.online);
            (room.online(), room.present())
        };
        if online < want {
            tracing::warn!(
                vm = %self.id,
                "asked the guest for {want} vCPUs online, it has {online} of {present}"
            );
        } else {
            tracing::info!(vm = %self.id, "{online} of {present} vCPUs online for the pod's CPU limits");
        }
        Ok(())
    }

    /// Records `container`'s memory limit (MiB, 0: none), as `set_cpu_limit` does its
    /// CPU limit. When the pod's limits then ask for more memory than the VM has, has
    /// the guest plug more of its room (`[vm] hotplug_memory`) and waits, up to the call
    /// deadline, until it has: a container may use what its raised limit allows once
    /// its update returns. A guest that plugs less is logged, not an error, as for vCPUs.
    pub async fn set_memory_limit(
        &self,
        container: &str,
        mib: u64,
        known_only: bool,
    ) -> Result<(), MemctlError> {
        let room = || self.memory.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut room = room();
            let Some(r) = room.as_mut() else {
                return Ok(());
            };
            if known_only {
                if !r.limits.change(container, mib) {
                    return Ok(());
                }
            } else {
                r.limits.set(container, mib);
            }
        }
        let Some((ctl, call)) = &self.memory_control else {
            return Ok(());
        };
        // Nothing to ask (a lowered limit, or room enough): no waiting on another plug.
        if room()
            .as_ref()
            .and_then(crate::shimv2::sizing::MemRoom::wanted)
            .is_none()
        {
            return Ok(());
        }
        // One deadline for the whole call: the wait for another plug, the request and
        // the guest's plugging.
        let deadline = tokio::time::Instant::now() + *call;
        let _one = tokio::time::timeout_at(deadline, self.plugging.lock())
            .await
            .map_err(|_| MemctlError::Timeout(*call))?;
        let Some((want, boot, short)) = room()
            .as_ref()
            .and_then(|r| r.wanted().map(|w| (w, r.boot_mib(), r.beyond_room_mib())))
        else {
            return Ok(());
        };
        if short > 0 {
            tracing::warn!(
                vm = %self.id,
                "the pod's memory limits want {short} MiB more than its VM can grow to \
                 ({boot} MiB booted, room for {want} MiB more: vm.max_memory_mib)"
            );
        }
        let started = Instant::now();
        let requested = || {
            if let Some(r) = room().as_mut() {
                r.requested(want);
            }
        };
        let sizes = ctl
            .grow_to(want, deadline, requested, || self.lost().is_some())
            .await?;
        if let Some(r) = room().as_mut() {
            r.plugged(sizes.plugged_mib);
        }
        if sizes.plugged_mib >= want {
            tracing::info!(
                vm = %self.id,
                "{} MiB plugged beyond the {boot} MiB booted, for the pod's memory limits",
                sizes.plugged_mib
            );
        } else {
            tracing::warn!(
                vm = %self.id,
                "asked the guest to plug {want} MiB, it has plugged {} MiB in {:?}",
                sizes.plugged_mib,
                started.elapsed()
            );
        }
        Ok(())
    }

    /// The guest's memory now (MiB): as launched, and what it has plugged since.
    pub fn memory_now_mib(&self) -> u32 {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(self.memory_mib, crate::shimv2::sizing::MemRoom::now_mib)
    }

    /// Whether the VM has room to grow its memory.
    pub fn grows_memory(&self) -> bool {
        self.memory_control.is_some()
    }

    /// Forgets a deleted container's limits (vCPUs stay online, memory plugged).
    pub fn forget_limits(&self, container: &str) {
        self.cpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limits
            .forget(container);
        if let Some(r) = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            r.limits.forget(container);
        }
    }

    /// The vCPUs online now (as the guest last said).
    pub fn online_vcpus(&self) -> u32 {
        self.cpus.lock().unwrap_or_else(|e| e.into_inner()).online()
    }
}
