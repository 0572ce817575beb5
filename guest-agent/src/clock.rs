//! The guest's wall clock, stepped to the host's when the two differ.
//!
//! Under KVM the guest reads wall time from kvmclock and agrees with the host to
//! microseconds. Under TCG there is no kvmclock: the kernel takes wall time from the
//! emulated RTC, in whole seconds, so a pod started up to a second behind the host
//! (measured 1.1 s here: a container's `date` lagged runc's by a second). The shim sends
//! its wall time with CreateSandbox, and the agent steps its clock to it when the two
//! differ by more than [`STEP_ABOVE`], more than the call's transit takes, so a guest whose
//! clock is already right keeps it. Never in confidential mode: there the host is not
//! trusted with the guest's time.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// Differences up to this are left alone (ns): a call's transit under TCG is a few ms.
pub const STEP_ABOVE: i64 = 50_000_000;

/// The time to step to, if the guest's `guest_ns` is too far from the host's `host_ns`
/// (0: the host sent none).
pub fn correction(guest_ns: i64, host_ns: i64) -> Option<i64> {
    (host_ns > 0 && guest_ns.abs_diff(host_ns) > STEP_ABOVE as u64).then_some(host_ns)
}

/// Steps CLOCK_REALTIME to `host_ns` if it is too far off; returns the step (ns).
pub fn align(host_ns: i64) -> nix::Result<Option<i64>> {
    let now = clock_gettime(ClockId::CLOCK_REALTIME)?;
    let now_ns = now.tv_sec() * 1_000_000_000 + now.tv_nsec();
    let Some(to) = correction(now_ns, host_ns) else {
        return Ok(None);
    };
    let ts = TimeSpec::new(to / 1_000_000_000, to % 1_000_000_000);
    clock_settime(ClockId::CLOCK_REALTIME, ts)?;
    Ok(Some(to - now_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clock_off_by_more_than_a_transit_is_stepped() {
        let host = 1_796_000_000_000_000_000;
        assert_eq!(
            correction(host - 1_100_000_000, host),
            Some(host),
            "a second behind"
        );
        assert_eq!(correction(host + 2_000_000_000, host), Some(host), "ahead");
        assert_eq!(
            correction(host - 3_000_000, host),
            None,
            "a transit's worth"
        );
        assert_eq!(correction(host, 0), None, "the host sent no time");
    }
}
