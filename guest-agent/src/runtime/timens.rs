//! Time namespaces (`{"type": "time"}` and `linux.timeOffsets`, runtime spec 1.1): the
//! container's `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` run at offsets of their own, as
//! runc 1.2 makes them. A time namespace applies to the children of the process that
//! made it, and its offsets can be written only before any process is in it, so the
//! helper writes them between its `unshare` and the container init's fork.

use nix::sched::CloneFlags;
use oci_spec::runtime::{Linux, LinuxNamespaceType};

use super::{Context, RuntimeError};

/// `CLONE_NEWTIME` (Linux 5.6), which nix does not name.
pub const CLONE_NEWTIME: CloneFlags = CloneFlags::from_bits_retain(0x80);

/// The clocks a time namespace offsets, by the spec's names (also the kernel's).
const CLOCKS: &[&str] = &["monotonic", "boottime"];

/// `/proc/self/timens_offsets`'s text for the spec's offsets: one line per clock.
/// `None` when there are none; an unknown clock is refused, naming it.
pub fn offsets_text(linux: &Linux) -> Result<Option<String>, RuntimeError> {
    let Some(offsets) = linux.time_offsets().as_ref().filter(|o| !o.is_empty()) else {
        return Ok(None);
    };
    let mut clocks: Vec<_> = offsets.iter().collect();
    clocks.sort_by_key(|(name, _)| name.as_str());
    let mut text = String::new();
    for (name, offset) in clocks {
        if !CLOCKS.contains(&name.as_str()) {
            return Err(RuntimeError::Invalid(format!(
                "timeOffsets names clock {name:?}: a time namespace offsets only {CLOCKS:?}"
            )));
        }
        let secs = offset.secs().unwrap_or(0);
        let nanos = offset.nanosecs().unwrap_or(0);
        if nanos >= 1_000_000_000 {
            return Err(RuntimeError::Invalid(format!(
                "timeOffsets {name:?}: nanosecs {nanos} is not below one second"
            )));
        }
        text += &format!("{name} {secs} {nanos}\n");
    }
    Ok(Some(text))
}

/// Whether the spec asks for a new time namespace (not one joined by path).
pub fn wants_new(linux: &Linux) -> bool {
    linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Time && n.path().is_none())
}

/// Checks the offsets against the namespaces before anything is made: offsets need a
/// new time namespace to go in.
pub fn check(linux: &Linux) -> Result<Option<String>, RuntimeError> {
    let text = offsets_text(linux)?;
    if text.is_some() && !wants_new(linux) {
        return Err(RuntimeError::Invalid(
            "timeOffsets without a new time namespace".into(),
        ));
    }
    Ok(text)
}

/// Writes the offsets of the time namespace this process just made for its children.
pub fn set_offsets(text: &str) -> Result<(), RuntimeError> {
    std::fs::write("/proc/self/timens_offsets", text)
        .ctx(|| format!("cannot set the time namespace's offsets ({})", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(v: serde_json::Value) -> Linux {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn offsets_become_one_line_per_clock() {
        let l = linux(serde_json::json!({
            "namespaces": [{"type": "time"}],
            "timeOffsets": {
                "monotonic": {"secs": 3600},
                "boottime": {"secs": -5, "nanosecs": 7}
            }
        }));
        assert_eq!(
            check(&l).unwrap().as_deref(),
            Some("boottime -5 7\nmonotonic 3600 0\n")
        );
        assert_eq!(check(&linux(serde_json::json!({}))).unwrap(), None);
    }

    #[test]
    fn bad_offsets_are_refused_by_name() {
        let unknown = linux(serde_json::json!({
            "namespaces": [{"type": "time"}],
            "timeOffsets": {"realtime": {"secs": 1}}
        }));
        let e = check(&unknown).unwrap_err().to_string();
        assert!(e.contains("realtime"), "{e}");
        let no_ns = linux(serde_json::json!({"timeOffsets": {"boottime": {"secs": 1}}}));
        let e = check(&no_ns).unwrap_err().to_string();
        assert!(e.contains("without a new time namespace"), "{e}");
        let nanos = linux(serde_json::json!({
            "namespaces": [{"type": "time"}],
            "timeOffsets": {"boottime": {"secs": 1, "nanosecs": 1000000000u32}}
        }));
        assert!(check(&nanos).is_err());
    }
}
