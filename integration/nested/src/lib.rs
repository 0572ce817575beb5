//! The nested harness: boots an "L1" Linux guest under QEMU/TCG with emulated AMD SVM
//! and nested paging, so that L1 has a real hardware-style `/dev/kvm` (`kvm_amd`) even on
//! hosts without VT-x/AMD-V (or with PVM), and runs a command inside it. L1 sees the host's
//! own root read-only through virtio-fs under a tmpfs overlay (as `virtme-ng` does), so the
//! host's binaries, test executables and guest images are all there at the same paths.
//!
//! This is how cocoon-vmm's Linux path (boot, ACPI, SMP, interrupts, virtio-mmio under the
//! real drivers, vsock, virtio-fs, the shim on cocoon-vmm) is tested in CI. It is for
//! correctness, not for absolute timing: every L2 exit is handled by L1's KVM under TCG.
//! Ratios between two VMMs run in the same L1 are still meaningful.

pub mod fuzzing;
pub mod image;
pub mod registry;
pub mod run;
pub mod testing;
pub mod watchdog;

use std::path::PathBuf;

use thiserror::Error;

pub use image::{L1Image, L1Kernel};
pub use run::{L1Output, L1};

#[derive(Debug, Error)]
pub enum NestedError {
    #[error("{what} is needed for the nested harness but was not found ({hint})")]
    Missing { what: String, hint: &'static str },
    #[error("QEMU cannot give L1 a hardware-style /dev/kvm: {0}")]
    NoSvm(String),
    #[error("L1 has SVM but KVM did not come up: {0}")]
    NoKvm(String),
    #[error("L1 setup failed: {message}\nL1 console (end):\n{console}")]
    Setup { message: String, console: String },
    #[error(
        "L1 did not finish within {seconds} s\ncommand output so far (end):\n{output}\nL1 console (end):\n{console}"
    )]
    Timeout {
        seconds: u64,
        output: String,
        console: String,
    },
    #[error("L1 ended without reporting the command's exit status\ncommand output (end):\n{output}\nL1 console (end):\n{console}")]
    NoStatus { output: String, console: String },
    /// L1's own kernel panicked (its console says so) before the command ended. Under
    /// TCG's emulated SVM this is the emulation's fault, not the command's: see
    /// docs/notes.md, "L1 kernel panics".
    #[error("L1's kernel panicked ({panic}) before the command ended\ncommand output (end):\n{output}\nL1 console (end):\n{console}")]
    L1Panic {
        panic: String,
        output: String,
        console: String,
    },
    /// A CPU of L1's kernel stopped scheduling for a minute or more (its watchdog says
    /// "soft lockup"), inside KVM running an L2 guest: seen only under TCG's emulated
    /// SVM, where an L1 CPU executing L2 code can miss L1's own interrupts for good. The
    /// run cannot finish; it is ended at once instead of at the timeout.
    #[error("L1's kernel stalled ({stall}) before the command ended\ncommand output (end):\n{output}\nL1 console (end):\n{console}")]
    L1Stall {
        stall: String,
        output: String,
        console: String,
    },
    /// L1 wrote nothing on any serial port (console, output, heartbeat) for `seconds`:
    /// frozen, under TCG's emulated SVM (seen in CI about 10 s into boot, with no
    /// panic or lockup line). Ended then instead of at the timeout.
    #[error("L1 went silent for {seconds} s ({after} s after its start) before the command ended\ncommand output (end):\n{output}\nL1 console (end):\n{console}")]
    L1Silent {
        seconds: u64,
        after: u64,
        output: String,
        console: String,
    },
    #[error("Failed to build the L1 image")]
    Image(#[from] cocoon_rootfs::RootfsError),
    #[error("Failed to read the guest image manifest {}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The guest image manifest {} is not valid", path.display())]
    ManifestFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Failed to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl NestedError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
        let what = what.into();
        move |source| NestedError::Io { what, source }
    }

    /// Whether this host simply cannot run the harness (a prerequisite is missing), as
    /// opposed to the harness or the command failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            NestedError::Missing { .. } | NestedError::NoSvm(_) | NestedError::NoKvm(_)
        )
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
