//! The host ids a container's own user namespace names (`linux.uidMappings` and
//! `gidMappings`, as `ctr run --uidmap 0:100000:65536` writes them), and which of them
//! the pod's share must map for the guest to see its rootfs's owners as they are
//! (`hypervisor::userns`).

use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};

use crate::hypervisor::userns::{PodUserns, IDS_PER_POD};

/// The most ranges beyond its first that one pod's share maps: each takes one of
/// `[jail] share_ranges` for the pod's life.
pub const MAX_EXTRA_RANGES: usize = 4;

/// Whether the spec asks for a new user namespace (not one named by path).
pub fn new_user_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_none())
        })
}

/// Whether the spec has a user namespace, new or joined.
pub fn any_user_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User))
}

/// Every host range (start, count) the spec's id mappings name, uids and gids
/// together, sorted and merged where they touch. Checked: each range is non-empty and
/// within 32 bits, and a new user namespace comes with both mappings.
pub fn host_ranges(spec: &Spec) -> Result<Vec<(u32, u32)>, String> {
    let linux = spec.linux().as_ref();
    let uids = linux
        .and_then(|l| l.uid_mappings().clone())
        .unwrap_or_default();
    let gids = linux
        .and_then(|l| l.gid_mappings().clone())
        .unwrap_or_default();
    if !any_user_namespace(spec) && (!uids.is_empty() || !gids.is_empty()) {
        return Err("uidMappings or gidMappings without a user namespace".into());
    }
    // A namespace joined by path was mapped by whoever made it.
    if !new_user_namespace(spec) {
        return Ok(Vec::new());
    }
    if uids.is_empty() || gids.is_empty() {
        return Err("a new user namespace needs both uidMappings and gidMappings".into());
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (kind, m) in uids
        .iter()
        .map(|m| ("uid", m))
        .chain(gids.iter().map(|m| ("gid", m)))
    {
        let (start, count) = (u64::from(m.host_id()), u64::from(m.size()));
        if count == 0 || start + count > u64::from(u32::MAX) {
            return Err(format!("{kind} mapping {}", show(m)));
        }
        ranges.push((start, start + count));
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    // Within u32 by the check above.
    Ok(merged
        .into_iter()
        .map(|(s, e)| (s as u32, (e - s) as u32))
        .collect())
}

fn show(m: &LinuxIdMapping) -> String {
    format!(
        "container {} -> host {} ({} ids) is empty or passes 2^32",
        m.container_id(),
        m.host_id(),
        m.size()
    )
}

/// The ranges a pod's share must map beyond its first `IDS_PER_POD` ids for the
/// first container's mappings: each is at most `IDS_PER_POD` ids long (longer ones
/// split), at most `MAX_EXTRA_RANGES` of them.
pub fn extra_share_ranges(spec: &Spec) -> Result<Vec<(u32, u32)>, String> {
    let mut out = Vec::new();
    for (start, count) in host_ranges(spec)? {
        let end = u64::from(start) + u64::from(count);
        if end <= u64::from(IDS_PER_POD) {
            continue;
        }
        if start < IDS_PER_POD {
            return Err(format!(
                "host ids {start}..{end} cross {IDS_PER_POD}: a user namespace's host ids \
                 must lie either below {IDS_PER_POD} or wholly above it"
            ));
        }
        let mut at = u64::from(start);
        while at < end {
            let n = (end - at).min(u64::from(IDS_PER_POD));
            out.push((at as u32, n as u32));
            at += n;
        }
    }
    if out.len() > MAX_EXTRA_RANGES {
        return Err(format!(
            "the user namespace's host ids need {} ranges of {IDS_PER_POD} in the pod's \
             share, more than its {MAX_EXTRA_RANGES}",
            out.len()
        ));
    }
    Ok(out)
}

/// For a later container of a pod: its mappings must lie in what the pod's share maps.
pub fn check_covered(spec: &Spec, ns: &PodUserns) -> Result<(), String> {
    for (start, count) in host_ranges(spec)? {
        if !ns.covers(start, count) {
            let end = u64::from(start) + u64::from(count);
            return Err(format!(
                "the container's user namespace maps host ids {start}..{end}, which the \
                 pod's share does not (it maps those its first container named); give the \
                 pod's containers the same --uidmap and --gidmap"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(maps: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": maps,
        }))
        .unwrap()
    }

    fn userns(uid: &[(u32, u32, u32)], gid: &[(u32, u32, u32)]) -> Spec {
        let m = |v: &[(u32, u32, u32)]| {
            v.iter()
                .map(|&(c, h, n)| serde_json::json!({"containerID": c, "hostID": h, "size": n}))
                .collect::<Vec<_>>()
        };
        spec(serde_json::json!({
            "namespaces": [{"type": "user"}, {"type": "mount"}],
            "uidMappings": m(uid),
            "gidMappings": m(gid),
        }))
    }

    #[test]
    fn no_user_namespace_needs_nothing() {
        let s = spec(serde_json::json!({"namespaces": [{"type": "mount"}]}));
        assert_eq!(extra_share_ranges(&s), Ok(vec![]));
        let joined = spec(serde_json::json!({
            "namespaces": [{"type": "user", "path": "/proc/1/ns/user"}],
        }));
        assert_eq!(extra_share_ranges(&joined), Ok(vec![]));
    }

    #[test]
    fn ctrs_uidmap_takes_one_range_for_uids_and_gids() {
        let s = userns(&[(0, 100_000, 65_536)], &[(0, 100_000, 65_536)]);
        assert_eq!(extra_share_ranges(&s), Ok(vec![(100_000, 65_536)]));
    }

    #[test]
    fn ranges_below_the_pods_own_ids_need_none_and_long_ones_split() {
        let low = userns(&[(0, 1000, 1000)], &[(0, 1000, 1000)]);
        assert_eq!(extra_share_ranges(&low), Ok(vec![]));
        let long = userns(&[(0, 200_000, 100_000)], &[(0, 200_000, 1)]);
        assert_eq!(
            extra_share_ranges(&long),
            Ok(vec![(200_000, 65_536), (265_536, 34_464)])
        );
    }

    #[test]
    fn bad_mappings_are_named() {
        let crossing = userns(&[(0, 60_000, 10_000)], &[(0, 60_000, 10_000)]);
        assert!(extra_share_ranges(&crossing).unwrap_err().contains("cross"));
        let empty = userns(&[(0, 100_000, 0)], &[(0, 100_000, 1)]);
        assert!(extra_share_ranges(&empty)
            .unwrap_err()
            .contains("uid mapping"));
        let wraps = userns(&[(0, u32::MAX, 2)], &[(0, 100_000, 1)]);
        assert!(extra_share_ranges(&wraps).unwrap_err().contains("2^32"));
        let no_gids = userns(&[(0, 100_000, 1)], &[]);
        assert!(extra_share_ranges(&no_gids).unwrap_err().contains("both"));
        let many: Vec<_> = (1..=5).map(|i| (i, i * 100_000, 1)).collect();
        let s = userns(&many, &many);
        assert!(extra_share_ranges(&s).unwrap_err().contains("more than"));
        let stray = spec(serde_json::json!({
            "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
        }));
        assert!(host_ranges(&stray).unwrap_err().contains("without"));
    }
}
