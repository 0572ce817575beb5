//! A pod's VM sized for its containers' limits (a Kubernetes pod's, or the one
//! container of a `ctr run`). kubelet (1.23+) sums the
//! limits of a pod's containers into the sandbox's resources, and containerd passes them
//! to the runtime as the sandbox's annotations below. Without them a pod's VM has the
//! config's size, and a container whose limit is larger than the VM is killed by the
//! guest's OOM killer long before its own limit, where runc would let it grow. So, as
//! Kata's static sandbox sizing does, the VM gets the config's vCPUs and memory (the
//! room the guest kernel, the agent and the pause process need, which the RuntimeClass's
//! overhead pays for) *plus* the pod's limits (which its requests and limits pay for).
//! Explicit `io.cocoon.vm.*` annotations win; `[vm] size_from_pod_limits = false` turns
//! this off. Limits need no one's leave and are not scheduled on, so the addition is
//! capped (`[vm] max_vcpus`, `max_memory_mib`, the host's by default): a guest kernel
//! initialises its page structures for all of its memory at boot (≈1.6 % of it).

use oci_spec::runtime::Spec;

use super::pod::PodSpecError;

/// The sum of the pod's containers' memory limits, in bytes (0: none has one).
pub const SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
/// The sum of their CPU limits as a CFS quota over a period (quota 0 or -1: none).
pub const SANDBOX_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The most a VM may have (as the size annotations allow).
pub const MAX_VCPUS: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 1_048_576;

/// What a pod's containers' limits add to its VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodLimits {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// The limits containerd passed with a CRI sandbox, rounded up to whole vCPUs and MiB;
/// none when it passed none. A value that is not a number is an error naming it.
pub fn pod_limits(spec: &Spec) -> Result<Option<PodLimits>, PodSpecError> {
    let Some(a) = spec.annotations().as_ref() else {
        return Ok(None);
    };
    let number = |key: &str| -> Result<Option<i64>, PodSpecError> {
        a.get(key)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| PodSpecError::BadAnnotation {
                        key: key.into(),
                        value: v.clone(),
                        why: "containerd's sandbox resources must be whole numbers".into(),
                    })
            })
            .transpose()
    };
    let memory = number(SANDBOX_MEMORY_ANNOTATION)?;
    let quota = number(SANDBOX_CPU_QUOTA_ANNOTATION)?;
    let period = number(SANDBOX_CPU_PERIOD_ANNOTATION)?;
    if memory.is_none() && quota.is_none() {
        return Ok(None);
    }
    Ok(Some(PodLimits::of(memory, quota, period)))
}

impl PodLimits {
    /// A memory limit in bytes and a CFS quota over a period, as whole MiB and vCPUs
    /// rounded up; absent, zero or negative values add nothing.
    fn of(memory: Option<i64>, quota: Option<i64>, period: Option<i64>) -> PodLimits {
        let memory_mib = memory_mib(memory).min(u64::from(MAX_MEMORY_MIB)) as u32;
        let vcpus = match (quota, period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => {
                (q as u64).div_ceil(p as u64).min(u64::from(MAX_VCPUS)) as u32
            }
            _ => 0,
        };
        PodLimits { vcpus, memory_mib }
    }
}

/// What a container that has a VM of its own (`ctr run`, not a CRI pod) asks by its own
/// limits (`ctr run --memory-limit`, `--cpus`): its spec's memory limit and CPU quota,
/// rounded up; none when it has neither.
pub fn container_limits(spec: &Spec) -> Option<PodLimits> {
    let r = spec.linux().as_ref()?.resources().as_ref()?;
    let cpu = r.cpu().as_ref();
    let limits = PodLimits::of(
        r.memory().as_ref().and_then(|m| m.limit()),
        cpu.and_then(|c| c.quota()),
        cpu.and_then(|c| c.period())
            .and_then(|p| i64::try_from(p).ok()),
    );
    (limits != PodLimits::default()).then_some(limits)
}

/// The VM's vCPUs and memory: the config's, or the pod's own annotations', plus the
/// pod's limits when `add_limits`; the addition capped at `host` (`host_capacity`) and
/// the maxima. With a line saying what was added or capped, for
/// the log, when anything was.
pub fn vm_size(
    base: (u32, u32),
    annotated: (Option<u32>, Option<u32>),
    limits: Option<PodLimits>,
    add_limits: bool,
    host: (u32, u32),
) -> (u32, u32, Option<String>) {
    let limits = limits.filter(|_| add_limits).unwrap_or_default();
    let size = |annotated: Option<u32>, base: u32, add: u32, host: u32, max: u32| match annotated {
        Some(n) => (n, n),
        None => {
            let wanted = base.saturating_add(add);
            // Only the addition is capped by the host, never the config's own size.
            (wanted, wanted.min(host.max(base)).min(max))
        }
    };
    let (want_cpus, vcpus) = size(annotated.0, base.0, limits.vcpus, host.0, MAX_VCPUS);
    let (want_mib, memory_mib) = size(
        annotated.1,
        base.1,
        limits.memory_mib,
        host.1,
        MAX_MEMORY_MIB,
    );
    let added = (annotated.0.is_none() && limits.vcpus > 0)
        || (annotated.1.is_none() && limits.memory_mib > 0);
    let note = added.then(|| {
        let mut s = format!(
            "the pod's limits size its VM: {vcpus} vCPUs ({} + {}), {memory_mib} MiB ({} + {})",
            base.0, limits.vcpus, base.1, limits.memory_mib
        );
        if vcpus < want_cpus || memory_mib < want_mib {
            s.push_str(&format!(
                "; capped at the host's {} CPUs and {} MiB",
                host.0, host.1
            ));
        }
        s
    });
    (vcpus, memory_mib, note)
}

/// The kernel's CFS period when a quota comes without one (as the agent's cgroup code
/// assumes).
const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// The most vCPUs a VM with held-offline vCPUs is given: what both VMMs take
/// (cocoon-vmm's MP table holds 32).
pub const MAX_HOTPLUG_VCPUS: u32 = cocoon_vmm::arch::mptable::MAX_VCPUS as u32;

/// A CFS quota over a period in thousandths of a CPU, rounded up; a quota of zero or
/// less (no limit) is 0, and a missing period the kernel's default. None without a
/// quota: a CPU section without one (shares or cpuset only) leaves the limit as it was.
pub fn cpu_milli(quota: Option<i64>, period: Option<u64>) -> Option<u64> {
    let q = quota?;
    let p = period.filter(|&p| p > 0).unwrap_or(DEFAULT_CPU_PERIOD);
    Some(if q > 0 {
        (q as u64)
            .saturating_mul(1000)
            .div_ceil(p)
            .min(u64::from(MAX_VCPUS) * 1000)
    } else {
        0
    })
}

/// A container's CPU limit from its spec, in thousandths of a CPU (0: none).
pub fn spec_cpu_milli(spec: &Spec) -> u64 {
    let cpu = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.cpu().as_ref());
    cpu_milli(cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())).unwrap_or(0)
}

/// The vCPUs of a VM booted with some of them held offline (`[vm] hotplug_vcpus`), and
/// what its containers' CPU limits ask: when raised limits (UpdateContainerResources)
/// ask for more than are online, more are brought online, up to all the VM has. As
/// Kata's CPU hotplug, but the vCPUs exist from the start (the guest kernel's
/// `maxcpus=` keeps them offline), so it works alike on every VMM and machine type.
/// None is ever taken offline again.
#[derive(Debug)]
pub struct CpuRoom {
    /// The VM's own room (the config's vCPUs) beyond its containers' limits.
    base: u32,
    present: u32,
    online: u32,
    /// Each container's CPU limit, in thousandths of a CPU.
    pub limits: Limits,
}

/// Each container's limit of one resource (thousandths of a CPU, MiB), as created and
/// updated, until it is deleted.
#[derive(Debug, Default)]
pub struct Limits(std::collections::HashMap<String, u64>);

impl Limits {
    /// A created container's limit.
    pub fn set(&mut self, container: &str, value: u64) {
        self.0.insert(container.to_owned(), value);
    }

    /// A known container's new limit; false (and nothing recorded) for one not known,
    /// e.g. deleted while its update was on its way.
    pub fn change(&mut self, container: &str, value: u64) -> bool {
        match self.0.get_mut(container) {
            Some(v) => {
                *v = value;
                true
            }
            None => false,
        }
    }

    pub fn forget(&mut self, container: &str) {
        self.0.remove(container);
    }

    pub fn sum(&self) -> u64 {
        self.0.values().fold(0, |a, v| a.saturating_add(*v))
    }
}

impl CpuRoom {
    pub fn new(base: u32, online: u32, present: u32) -> CpuRoom {
        CpuRoom {
            base,
            present: present.max(online),
            online,
            limits: Limits::default(),
        }
    }

    /// How many vCPUs should be online for the containers' limits, when that is more
    /// than are (capped at all the VM has); None when enough are.
    pub fn wanted(&self) -> Option<u32> {
        let sum = self.limits.sum();
        let limits = sum.div_ceil(1000).min(u64::from(MAX_VCPUS)) as u32;
        let want = self.base.saturating_add(limits).min(self.present);
        (want > self.online).then_some(want)
    }

    /// What the guest said is online now. None is ever taken offline, so a count
    /// below the last (an older reply overtaken by a newer one) changes nothing; one
    /// above what the VM has is the VM's.
    pub fn onlined(&mut self, online: u32) {
        self.online = online.min(self.present).max(self.online);
    }

    pub fn online(&self) -> u32 {
        self.online
    }

    pub fn present(&self) -> u32 {
        self.present
    }
}

/// The memory of a VM launched with room to grow (`[vm] hotplug_memory`: a virtio-mem
/// device), and what its containers' memory limits ask: when raised limits
/// (UpdateContainerResources, a Kubernetes in-place resize) ask for more than the VM
/// booted with and has had plugged, more of the region is asked for, in whole blocks,
/// up to all of it. Nothing is unplugged when limits fall (as with Kata's memory
/// hotplug): a guest gives back what it frees through free page reporting instead.
#[derive(Debug)]
pub struct MemRoom {
    /// The VM's own room (the config's memory) beyond its containers' limits.
    base_mib: u32,
    /// What the VM booted with.
    boot_mib: u32,
    region_mib: u32,
    /// What the device has been asked to have plugged, and what the guest last said
    /// it has.
    requested_mib: u32,
    plugged_mib: u32,
    /// Each container's memory limit, in MiB (0: none).
    pub limits: Limits,
}

impl MemRoom {
    pub fn new(base_mib: u32, boot_mib: u32, region_mib: u32) -> MemRoom {
        MemRoom {
            base_mib,
            boot_mib,
            region_mib,
            requested_mib: 0,
            plugged_mib: 0,
            limits: Limits::default(),
        }
    }

    /// How much of the region to ask for when the limits want more than the VM has
    /// (booted with and asked for): whole blocks, at most the region; None when it has
    /// enough.
    pub fn wanted(&self) -> Option<u32> {
        let want = u64::from(self.base_mib).saturating_add(self.limits.sum());
        let beyond = want.saturating_sub(u64::from(self.boot_mib));
        let block = u64::from(crate::hypervisor::memctl::BLOCK_MIB);
        let asked = beyond
            .div_ceil(block)
            .saturating_mul(block)
            .min(u64::from(self.region_mib)) as u32;
        (asked > self.requested_mib).then_some(asked)
    }

    /// How much more the limits want than the VM can ever have (0: none).
    pub fn beyond_room_mib(&self) -> u32 {
        let want = u64::from(self.base_mib).saturating_add(self.limits.sum());
        let most = u64::from(self.boot_mib) + u64::from(self.region_mib);
        want.saturating_sub(most).min(u64::from(u32::MAX)) as u32
    }

    /// The device was asked for `mib`.
    pub fn requested(&mut self, mib: u32) {
        self.requested_mib = self.requested_mib.max(mib);
    }

    /// The guest has `mib` plugged (at most the region).
    pub fn plugged(&mut self, mib: u32) {
        self.plugged_mib = mib.min(self.region_mib);
    }

    /// The VM's memory now: what it booted with and what is plugged.
    pub fn now_mib(&self) -> u32 {
        self.boot_mib + self.plugged_mib
    }

    pub fn boot_mib(&self) -> u32 {
        self.boot_mib
    }

    pub fn region_mib(&self) -> u32 {
        self.region_mib
    }
}

/// A container's memory limit from its spec, in whole MiB rounded up (0: none).
pub fn spec_memory_mib(spec: &Spec) -> u64 {
    let limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    memory_mib(limit)
}

/// A memory limit in bytes as whole MiB rounded up; none, zero or less (no limit) is 0.
pub fn memory_mib(limit: Option<i64>) -> u64 {
    match limit {
        Some(b) if b > 0 => (b as u64).div_ceil(1 << 20),
        _ => 0,
    }
}

/// The most a pod's limits may make a VM: `[vm] max_vcpus` and `max_memory_mib`, where
/// 0 means this host's online CPUs and its memory (as Kata's `default_maxvcpus` and
/// `default_maxmemory`).
pub fn host_capacity(vm: &crate::config::VmConfig) -> (u32, u32) {
    // Online CPUs, not those this process may run on (containerd's own cgroup or
    // affinity would cap every VM at its share).
    // SAFETY: sysconf reads a value and has no other effect.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpus = u32::try_from(online).unwrap_or(1).max(1);
    let mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(MAX_MEMORY_MIB, |kib| {
            (kib / 1024).min(u64::from(MAX_MEMORY_MIB)) as u32
        });
    let or = |set: u32, host: u32| if set == 0 { host } else { set };
    (or(vm.max_vcpus, cpus), or(vm.max_memory_mib, mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)]) -> Spec {
        let a: std::collections::HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "annotations": a}))
            .unwrap()
    }

    #[test]
    fn containerd_s_sandbox_resources_become_whole_vcpus_and_mib() {
        let s = spec(&[
            (SANDBOX_MEMORY_ANNOTATION, "536870913"),
            (SANDBOX_CPU_QUOTA_ANNOTATION, "150000"),
            (SANDBOX_CPU_PERIOD_ANNOTATION, "100000"),
        ]);
        assert_eq!(
            pod_limits(&s),
            Ok(Some(PodLimits {
                vcpus: 2,
                memory_mib: 513
            }))
        );
        // kubelet's pod without limits: containerd still passes them, as 0 and -1.
        let none = spec(&[
            (SANDBOX_MEMORY_ANNOTATION, "0"),
            (SANDBOX_CPU_QUOTA_ANNOTATION, "-1"),
            (SANDBOX_CPU_PERIOD_ANNOTATION, "0"),
        ]);
        assert_eq!(pod_limits(&none), Ok(Some(PodLimits::default())));
        assert_eq!(pod_limits(&spec(&[])), Ok(None));
        let bad = spec(&[(SANDBOX_MEMORY_ANNOTATION, "lots")]);
        let e = pod_limits(&bad).unwrap_err().to_string();
        assert!(e.contains(SANDBOX_MEMORY_ANNOTATION), "{e}");
    }

    #[test]
    fn the_vm_is_the_configs_plus_the_pods_limits_within_the_host() {
        let limits = Some(PodLimits {
            vcpus: 2,
            memory_mib: 512,
        });
        let host = (16, 65_536);
        assert_eq!(vm_size((1, 256), (None, None), None, true, host).0, 1);
        let (c, m, note) = vm_size((1, 256), (None, None), limits, true, host);
        assert_eq!((c, m), (3, 768));
        assert!(note
            .unwrap()
            .contains("3 vCPUs (1 + 2), 768 MiB (256 + 512)"));
        // Turned off, or asked outright: the pod's limits add nothing.
        assert_eq!(
            vm_size((1, 256), (None, None), limits, false, host),
            (1, 256, None)
        );
        let (c, m, _) = vm_size((1, 256), (Some(4), Some(1024)), limits, true, host);
        assert_eq!((c, m), (4, 1024));
        // Beyond the host: the addition is capped, never what was configured.
        let (c, m, note) = vm_size((1, 256), (None, None), limits, true, (2, 600));
        assert_eq!((c, m), (2, 600));
        assert!(note.unwrap().contains("capped"));
        let (c, m, _) = vm_size((4, 1024), (None, None), limits, true, (2, 600));
        assert_eq!((c, m), (4, 1024));
    }

    #[test]
    fn a_containers_own_limits_are_its_vms() {
        let with = |resources: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2", "linux": {"resources": resources}
            }))
            .unwrap()
        };
        let s = with(serde_json::json!({
            "memory": {"limit": 33554432}, "cpu": {"quota": 50000, "period": 100000}
        }));
        assert_eq!(
            container_limits(&s),
            Some(PodLimits {
                vcpus: 1,
                memory_mib: 32
            })
        );
        let unlimited = with(serde_json::json!({"memory": {"limit": -1}, "cpu": {"shares": 1024}}));
        assert_eq!(container_limits(&unlimited), None);
        assert_eq!(container_limits(&with(serde_json::json!({}))), None);
    }

    #[test]
    fn cpu_limits_are_counted_in_thousandths_rounded_up() {
        assert_eq!(cpu_milli(Some(150_000), Some(100_000)), Some(1500));
        assert_eq!(cpu_milli(Some(1), Some(3)), Some(334));
        assert_eq!(cpu_milli(Some(-1), Some(100_000)), Some(0), "unlimited");
        // No period: the kernel's 100 ms, as the agent sets the cgroup.
        assert_eq!(cpu_milli(Some(150_000), None), Some(1500));
        assert_eq!(cpu_milli(Some(150_000), Some(0)), Some(1500));
        assert_eq!(
            cpu_milli(None, Some(100_000)),
            None,
            "the limit is left as it is"
        );
        assert_eq!(cpu_milli(Some(i64::MAX), Some(1)), Some(64_000));
    }

    /// Raised limits bring vCPUs online beyond the VM's own, up to all it has; what is
    /// online already, or a lowered limit, asks for nothing.
    #[test]
    fn raised_limits_want_more_vcpus_up_to_all_the_vm_has() {
        // One vCPU of its own, booted with one more for a 500m limit, four in all.
        let mut room = CpuRoom::new(1, 2, 4);
        room.limits.set("pause", 0);
        room.limits.set("app", 500);
        assert_eq!(room.wanted(), None);
        room.limits.set("app", 1500);
        assert_eq!(room.wanted(), Some(3));
        room.onlined(3);
        assert_eq!(room.wanted(), None);
        room.limits.set("side", 600);
        assert_eq!(room.wanted(), Some(4), "1 + ceil(2.1)");
        room.limits.set("app", 9000);
        assert_eq!(room.wanted(), Some(4), "never past all the VM has");
        room.onlined(7);
        assert_eq!(
            room.online(),
            4,
            "the guest cannot claim more than the VM has"
        );
        room.limits.forget("app");
        room.limits.set("side", 0);
        assert_eq!(room.wanted(), None, "none is taken offline");
    }

    /// Raised memory limits ask for whole blocks of the region beyond what the VM
    /// booted with, up to all of it; nothing is ever asked back.
    #[test]
    fn raised_memory_limits_ask_for_whole_blocks_up_to_the_region() {
        // 256 MiB of its own, booted with 128 more for a limit, 1 GiB to grow into.
        let mut room = MemRoom::new(256, 384, 1024);
        room.limits.set("pause", 0);
        room.limits.set("app", 128);
        assert_eq!(room.wanted(), None);
        assert!(!room.limits.change("gone", 4096), "an unknown container");
        assert_eq!(room.wanted(), None);
        assert!(room.limits.change("app", 129));
        assert_eq!(room.wanted(), Some(128), "one MiB more is a block");
        room.requested(128);
        assert_eq!(room.wanted(), None);
        room.limits.set("side", 300);
        assert_eq!(
            room.wanted(),
            Some(384),
            "256 + 429 - 384 = 301: three blocks"
        );
        assert_eq!(room.beyond_room_mib(), 0);
        room.limits.set("app", 2000);
        assert_eq!(room.beyond_room_mib(), 256 + 2000 + 300 - 384 - 1024);
        room.limits.set("app", 1 << 40);
        assert_eq!(room.wanted(), Some(1024), "never past the region");
        assert_eq!(room.beyond_room_mib(), u32::MAX, "capped, never wrapped");
        room.requested(1024);
        room.requested(512);
        room.limits.forget("app");
        assert_eq!(room.wanted(), None, "nothing is unplugged");
        assert_eq!((room.boot_mib(), room.region_mib()), (384, 1024));
        room.plugged(5000);
        assert_eq!(
            room.now_mib(),
            384 + 1024,
            "a guest cannot claim more than the room"
        );
    }

    #[test]
    fn memory_limits_are_whole_mib_rounded_up() {
        assert_eq!(memory_mib(None), 0);
        assert_eq!(memory_mib(Some(-1)), 0);
        assert_eq!(memory_mib(Some(1)), 1);
        assert_eq!(memory_mib(Some(128 << 20)), 128);
        assert_eq!(memory_mib(Some((128 << 20) + 1)), 129);
        let mut s = spec(&[]);
        assert_eq!(spec_memory_mib(&s), 0);
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_str(r#"{"memory": {"limit": 268435456}}"#).unwrap();
        let mut linux = s.linux().clone().unwrap_or_default();
        linux.set_resources(Some(r));
        s.set_linux(Some(linux));
        assert_eq!(spec_memory_mib(&s), 256);
    }

    #[test]
    fn the_maxima_are_the_configs_or_the_hosts() {
        let mut vm = crate::config::VmConfig::default();
        let (cpus, mib) = host_capacity(&vm);
        assert!(cpus >= 1 && mib >= 64, "{cpus} CPUs, {mib} MiB");
        (vm.max_vcpus, vm.max_memory_mib) = (3, 1000);
        assert_eq!(host_capacity(&vm), (3, 1000));
    }
}
