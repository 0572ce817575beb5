//! The guest's OOM kills waiting for the host's `GetOomEvent` long poll. A queue, not a
//! broadcast: a broadcast only reaches a receiver subscribed at the moment of the kill,
//! and between two polls (the one that just returned and the next) nobody is, so two
//! containers killed together lost the second event. Bounded: if the host stops polling,
//! the oldest events go first (each container's OOM count stays in its cgroup's
//! memory.events, and the host's stats read it).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Events kept while the host is not polling.
pub const CAPACITY: usize = 256;

#[derive(Debug, Default)]
pub struct OomQueue {
    events: Mutex<VecDeque<String>>,
    ready: Notify,
}

impl OomQueue {
    /// Records an OOM kill of `container_id`; the oldest is dropped when full.
    pub fn push(&self, container_id: String) {
        {
            let mut q = self.events.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= CAPACITY {
                q.pop_front();
            }
            q.push_back(container_id);
        }
        self.ready.notify_one();
    }

    /// The oldest event, waiting for one if there is none.
    pub async fn pop(&self) -> String {
        loop {
            // Registered before the check, so a push in between is not missed.
            let notified = self.ready.notified();
            if let Some(id) = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                return id;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn events_between_polls_are_kept_in_order() {
        let q = OomQueue::default();
        q.push("a".into());
        q.push("b".into());
        assert_eq!(q.pop().await, "a");
        assert_eq!(q.pop().await, "b");
    }

    #[tokio::test]
    async fn a_waiting_poll_gets_the_next_event() {
        let q = std::sync::Arc::new(OomQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.push("c".into());
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the poll never woke")
            .unwrap();
        assert_eq!(got, "c");
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_keeps_the_newest() {
        let q = OomQueue::default();
        for i in 0..CAPACITY + 10 {
            q.push(format!("c{i}"));
        }
        assert_eq!(q.pop().await, "c10");
    }
}
