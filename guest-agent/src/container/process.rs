//! One process of a container (its init or an exec): pid, stdio, and the
//! exit status that WaitProcess reports.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::reaper::{Exit, Reaper};
use crate::stdio::ProcessIo;

/// How long after an exit WaitProcess waits for output still in flight
/// (a daemonized child may keep the pipe open forever).
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Process {
    pub exec_id: String,
    pid: AtomicI32,
    pub io: Arc<ProcessIo>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, io: Arc<ProcessIo>) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            pid: AtomicI32::new(0),
            io,
            exit: watch::channel(None).0,
        })
    }

    /// 0 until the process exists.
    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Records the pid and starts following its exit.
    pub fn set_pid(self: &Arc<Self>, pid: i32, reaper: &Reaper) {
        self.pid.store(pid, Ordering::Relaxed);
        let rx = reaper.watch(pid);
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(exit) = rx.await {
                tracing::debug!(exec = %me.exec_id, pid, status = exit.status, "process exited");
                me.exit.send_replace(Some(exit));
            }
        });
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Resolves at exit (without waiting for output).
    pub async fn exit(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        let exit = rx.wait_for(|e| e.is_some()).await.ok().and_then(|e| *e);
        match exit {
            Some(e) => e,
            // The sender lives in `self`, so this is unreachable; never hang.
            None => std::future::pending().await,
        }
    }

    /// The exit, once the output streams are drained (or the grace ran out).
    pub async fn wait(&self) -> Exit {
        let exit = self.exit().await;
        self.io.drained(exit.at + DRAIN_GRACE).await;
        exit
    }
}
