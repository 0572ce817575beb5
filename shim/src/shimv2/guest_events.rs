//! What the shim publishes on a guest's word. The guest is untrusted: an OOM event names
//! a container, and a compromised guest could name another pod's containers, or flood
//! containerd's event bus. Only ids of this shim's live containers pass, and at most a
//! burst of `BURST` per container, refilled at `PER_SECOND`.

use std::collections::HashMap;
use std::time::Instant;

/// Events a container may have in a burst.
pub const BURST: f64 = 5.0;
/// Sustained events per second per container (a real OOM killer is far slower).
pub const PER_SECOND: f64 = 1.0;

/// Decides which guest OOM events reach containerd.
#[derive(Debug, Default)]
pub struct OomFilter {
    /// Tokens left per container and when they were last counted.
    buckets: HashMap<String, (f64, Instant)>,
}

/// Why an event was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not a container of this shim (or already deleted).
    Unknown,
    /// Over the per-container rate.
    RateLimited,
}

impl OomFilter {
    /// Admits an OOM event for `id` at `now`, if `id` is among `live` containers and
    /// under its rate; forgets containers that are no longer live.
    pub fn admit<'a>(
        &mut self,
        id: &str,
        mut live: impl Iterator<Item = &'a String> + Clone,
        now: Instant,
    ) -> Result<(), Dropped> {
        self.buckets.retain(|k, _| live.clone().any(|l| l == k));
        if !live.any(|l| l == id) {
            return Err(Dropped::Unknown);
        }
        let (tokens, last) = self.buckets.entry(id.to_owned()).or_insert((BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * PER_SECOND;
        *tokens = (*tokens + refill).min(BURST);
        *last = now;
        if *tokens < 1.0 {
            return Err(Dropped::RateLimited);
        }
        *tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_live_containers_of_this_shim_pass() {
        let mut f = OomFilter::default();
        let live = ["a".to_string(), "b".to_string()];
        let now = Instant::now();
        assert_eq!(f.admit("a", live.iter(), now), Ok(()));
        assert_eq!(
            f.admit("other-pod", live.iter(), now),
            Err(Dropped::Unknown)
        );
        assert_eq!(f.admit("", live.iter(), now), Err(Dropped::Unknown));
    }

    #[test]
    fn a_flood_is_cut_to_the_burst_then_the_rate() {
        let mut f = OomFilter::default();
        let live = ["a".to_string()];
        let t0 = Instant::now();
        let passed = (0..1000)
            .filter(|_| f.admit("a", live.iter(), t0).is_ok())
            .count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(f.admit("a", live.iter(), t0), Err(Dropped::RateLimited));
        // One second later, one more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(f.admit("a", live.iter(), t1), Ok(()));
        assert_eq!(f.admit("a", live.iter(), t1), Err(Dropped::RateLimited));
    }

    #[test]
    fn deleted_containers_are_forgotten() {
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            let _ = f.admit("a", ["a".to_string()].iter(), t0);
        }
        let none: [String; 0] = [];
        assert_eq!(f.admit("a", none.iter(), t0), Err(Dropped::Unknown));
        assert!(f.buckets.is_empty());
    }
}
