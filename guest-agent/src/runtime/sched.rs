//! What runc 1.2 added to a process before its execve: the CPU scheduler
//! (`process.scheduler`, sched_setattr), the I/O priority (`process.ioPriority`,
//! ioprio_set) and the execution domain (`linux.personality`, personality). All
//! three are set while the helper still holds the agent's capabilities: a real-time
//! policy or I/O class is one the container itself may not be allowed to choose. In
//! a container with a user namespace of its own, the scheduler is set inside it (as
//! runc 1.2 sets it), where a real-time policy is refused (EPERM: CAP_SYS_NICE counts
//! in the guest's first namespace only).
//!
//! No crate wraps sched_setattr or ioprio_set (nix and libc have neither call's
//! arguments), so they are made here from the kernel's uapi headers.

use oci_spec::runtime::{
    IOPriorityClass, LinuxIOPriority, LinuxPersonality, LinuxPersonalityDomain, LinuxSchedulerFlag,
    LinuxSchedulerPolicy, Scheduler,
};

use super::{Context, RuntimeError};

/// `struct sched_attr` of include/uapi/linux/sched/types.h, the size the kernel
/// calls SCHED_ATTR_SIZE_VER1 (with the utilization clamps), as runc passes it.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

fn policy_number(p: LinuxSchedulerPolicy) -> u32 {
    match p {
        LinuxSchedulerPolicy::SchedOther => 0,
        LinuxSchedulerPolicy::SchedFifo => 1,
        LinuxSchedulerPolicy::SchedRr => 2,
        LinuxSchedulerPolicy::SchedBatch => 3,
        // Reserved by Linux and never implemented: the kernel refuses it (EINVAL),
        // and so the Create fails naming it, as under runc.
        LinuxSchedulerPolicy::SchedIso => 4,
        LinuxSchedulerPolicy::SchedIdle => 5,
        LinuxSchedulerPolicy::SchedDeadline => 6,
    }
}

fn flag_bit(f: LinuxSchedulerFlag) -> u64 {
    match f {
        LinuxSchedulerFlag::SchedResetOnFork => 0x01,
        LinuxSchedulerFlag::SchedFlagReclaim => 0x02,
        LinuxSchedulerFlag::SchedFlagDLOverrun => 0x04,
        LinuxSchedulerFlag::SchedFlagKeepPolicy => 0x08,
        LinuxSchedulerFlag::SchedFlagKeepParams => 0x10,
        LinuxSchedulerFlag::SchedFlagUtilClampMin => 0x20,
        LinuxSchedulerFlag::SchedFlagUtilClampMax => 0x40,
    }
}

fn sched_attr(s: &Scheduler) -> SchedAttr {
    SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: policy_number(*s.policy()),
        flags: s.flags().iter().flatten().fold(0, |a, f| a | flag_bit(*f)),
        nice: s.nice().unwrap_or(0),
        // Checked at Create (`container::validate`): 0 to 99.
        priority: s.priority().unwrap_or(0).max(0) as u32,
        runtime: s.runtime().unwrap_or(0),
        deadline: s.deadline().unwrap_or(0),
        period: s.period().unwrap_or(0),
        ..Default::default()
    }
}

/// The spec's scheduling policy, on this thread (the process it becomes keeps it).
pub fn set_scheduler(s: Option<&Scheduler>) -> Result<(), RuntimeError> {
    let Some(s) = s else { return Ok(()) };
    let attr = sched_attr(s);
    // SAFETY: sched_setattr reads `attr.size` bytes from a valid, initialized struct
    // of that size; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    nix::errno::Errno::result(rc).ctx(|| format!("cannot set the scheduler {:?}", s.policy()))?;
    Ok(())
}

/// The ioprio value of include/uapi/linux/ioprio.h: the class above 13 bits of data.
fn ioprio_value(p: &LinuxIOPriority) -> libc::c_int {
    let class = match p.class() {
        IOPriorityClass::IoprioClassRt => 1,
        IOPriorityClass::IoprioClassBe => 2,
        IOPriorityClass::IoprioClassIdle => 3,
    };
    // Checked at Create (`container::validate`): 0 to 7.
    (class << 13) | p.priority().clamp(0, 7) as libc::c_int
}

/// The spec's I/O priority, on this process (its children inherit it).
pub fn set_io_priority(p: Option<&LinuxIOPriority>) -> Result<(), RuntimeError> {
    let Some(p) = p else { return Ok(()) };
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    // SAFETY: ioprio_set takes three integers; who 0 is the calling process.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, ioprio_value(p)) };
    nix::errno::Errno::result(rc).ctx(|| format!("cannot set the I/O priority {:?}", p.class()))?;
    Ok(())
}

/// The spec's execution domain, as `linux32`/`setarch` sets it. Under `LINUX32` a
/// kernel with 32-bit emulation answers `uname -m` with i686; Cocoon's own kernel has
/// none (no `IA32_EMULATION`, so no 32-bit programs either), and only
/// `/proc/<pid>/personality` shows it there. Its `flags` are skipped, as runc skips
/// them (with a warning; the spec defines none).
pub fn set_personality(p: Option<&LinuxPersonality>) -> Result<(), RuntimeError> {
    let Some(p) = p else { return Ok(()) };
    const PER_LINUX: libc::c_ulong = 0x0000;
    const PER_LINUX32: libc::c_ulong = 0x0008;
    let domain = match p.domain() {
        LinuxPersonalityDomain::PerLinux => PER_LINUX,
        LinuxPersonalityDomain::PerLinux32 => PER_LINUX32,
    };
    // SAFETY: personality takes one integer and touches no memory of ours.
    let rc = unsafe { libc::personality(domain) };
    nix::errno::Errno::result(rc).ctx(|| format!("cannot set the personality {:?}", p.domain()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_values_handed_to_the_kernel_are_its_own_numbers() {
        let s: Scheduler = serde_json::from_value(serde_json::json!({
            "policy": "SCHED_DEADLINE", "runtime": 1, "deadline": 2, "period": 3,
            "flags": ["SCHED_FLAG_RECLAIM", "SCHED_FLAG_D_L_OVERRUN"]
        }))
        .unwrap();
        // oci-spec's spelling: the shim renames the runtime spec's
        // (`shimv2::service::util::spell_scheduler_flags`).
        let a = sched_attr(&s);
        assert_eq!(a.size, 56, "SCHED_ATTR_SIZE_VER1");
        assert_eq!((a.policy, a.flags), (6, 0x06));
        assert_eq!((a.runtime, a.deadline, a.period), (1, 2, 3));
        let s: Scheduler =
            serde_json::from_value(serde_json::json!({"policy": "SCHED_RR", "priority": 10}))
                .unwrap();
        assert_eq!((sched_attr(&s).policy, sched_attr(&s).priority), (2, 10));
        let io: LinuxIOPriority = serde_json::from_value(
            serde_json::json!({"class": "IOPRIO_CLASS_IDLE", "priority": 7}),
        )
        .unwrap();
        assert_eq!(ioprio_value(&io), (3 << 13) | 7);
    }
}
