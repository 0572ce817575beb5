//! Rate limiting for log lines a guest can trigger at will.
//!
//! Levels in the VMM: `error` the VM or a device cannot go on; `warn` a misbehaving guest
//! (always through a [`LogLimiter`]); `info` lifecycle; `debug` per-request detail.

use std::time::{Duration, Instant};

/// Lets through a burst of lines per second and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    what: &'static str,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(1);

    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// What the lines are about (a device's name).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Whether to log now; reports what was suppressed when a new window opens.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Self::WINDOW {
            if self.suppressed > 0 {
                log::warn!(
                    "{}: {} similar messages suppressed",
                    self.what,
                    self.suppressed
                );
            }
            self.window_start = now;
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_a_burst() {
        let mut l = LogLimiter::new("t");
        assert_eq!((0..100).filter(|_| l.allow()).count(), 10);
    }
}
