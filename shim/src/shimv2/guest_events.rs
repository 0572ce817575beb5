//! What the shim publishes on a guest's word. The guest is untrusted: an OOM event names
//! a container, and a compromised guest could name another pod's containers, or flood
//! containerd's event bus. Only ids of this shim's containers pass (live, or deleted
//! within `GRACE`: the agent reports an OOM kill before the exit it caused, but on another
//! call, and containerd may delete the task before the event is relayed), and at most a
//! burst of `BURST` per container, refilled at `PER_SECOND`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Events a container may have in a burst.
pub const BURST: f64 = 5.0;
/// Sustained events per second per container (a real OOM killer is far slower).
pub const PER_SECOND: f64 = 1.0;
/// How long a deleted container's events are still relayed.
pub const GRACE: Duration = Duration::from_secs(10);
/// The shortest time between two OOM polls: a guest that answers every poll at once
/// (a real one waits for a kill) costs the host at most this many calls a second.
pub const POLL_PACE: Duration = Duration::from_millis(20);
/// Deleted containers remembered at most (oldest forgotten first).
pub const MAX_RECENT: usize = 64;

/// Decides which guest OOM events reach containerd.
#[derive(Debug, Default)]
pub struct OomFilter {
    /// Tokens left per container and when they were last counted.
    buckets: HashMap<String, (f64, Instant)>,
    /// Containers deleted lately, oldest first.
    recent: VecDeque<(String, Instant)>,
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
    /// Records that the shim deleted container `id` at `now`.
    pub fn deleted(&mut self, id: &str, now: Instant) {
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((id.to_owned(), now));
    }

    /// Admits an OOM event for `id` at `now`, if `id` is among the `live` containers or
    /// was deleted within `GRACE`, and is under its rate; forgets the rest.
    pub fn admit<'a>(
        &mut self,
        id: &str,
        live: impl Iterator<Item = &'a String> + Clone,
        now: Instant,
    ) -> Result<(), Dropped> {
        self.recent
            .retain(|(_, at)| now.saturating_duration_since(*at) <= GRACE);
        let known =
            |k: &str| live.clone().any(|l| l == k) || self.recent.iter().any(|(r, _)| r == k);
        if !known(id) {
            self.buckets.retain(|k, _| known(k));
            return Err(Dropped::Unknown);
        }
        self.buckets.retain(|k, _| known(k));
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
    fn deleted_containers_pass_for_a_grace_period_then_are_forgotten() {
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        let none: [String; 0] = [];
        f.deleted("a", t0);
        // The event raced the delete: still relayed.
        assert_eq!(
            f.admit("a", none.iter(), t0 + Duration::from_secs(1)),
            Ok(())
        );
        let late = t0 + GRACE + Duration::from_secs(1);
        assert_eq!(f.admit("a", none.iter(), late), Err(Dropped::Unknown));
        assert!(f.buckets.is_empty() && f.recent.is_empty());
    }

    #[test]
    fn the_memory_of_deleted_containers_is_bounded() {
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        for i in 0..1000 {
            f.deleted(&format!("c{i}"), t0);
        }
        assert_eq!(f.recent.len(), MAX_RECENT);
        let none: [String; 0] = [];
        assert_eq!(f.admit("c0", none.iter(), t0), Err(Dropped::Unknown));
        assert_eq!(f.admit("c999", none.iter(), t0), Ok(()));
    }
}
