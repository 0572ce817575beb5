//! The host ids a container's own user namespace names (`linux.uidMappings` and
//! `gidMappings`, as `ctr run --uidmap 0:100000:65536` writes them), and which of them
//! the pod's share must map for the guest to see its rootfs's owners as they are
//! (`hypervisor::userns`).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Mount, Spec};

use crate::hypervisor::userns::{Extent, PodUserns, IDS_PER_POD};

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
    // A namespace joined by path was mapped by whoever made it; an idmapped mount
    // names host ids of its own (CRI gives every bind of a `hostUsers: false` pod the
    // pod's mapping).
    let (mut uids, mut gids) = if new_user_namespace(spec) {
        if uids.is_empty() || gids.is_empty() {
            return Err("a new user namespace needs both uidMappings and gidMappings".into());
        }
        (uids, gids)
    } else {
        (Vec::new(), Vec::new())
    };
    for m in spec.mounts().iter().flatten() {
        uids.extend(m.uid_mappings().iter().flatten().cloned());
        gids.extend(m.gid_mappings().iter().flatten().cloned());
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

/// The uid and gid mappings of an idmapped mount: container ids inside, the host ids
/// they show as outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountMaps {
    pub uids: Vec<Extent>,
    pub gids: Vec<Extent>,
}

fn extents(kind: &str, maps: &[LinuxIdMapping]) -> Result<Vec<Extent>, String> {
    maps.iter()
        .map(|m| {
            let e = Extent {
                inside: m.container_id(),
                outside: m.host_id(),
                count: m.size(),
            };
            checked(kind, e)
        })
        .collect()
}

fn checked(kind: &str, e: Extent) -> Result<Extent, String> {
    let fits = |x: u32| u64::from(x) + u64::from(e.count) <= u64::from(u32::MAX);
    if e.count == 0 || !fits(e.inside) || !fits(e.outside) {
        return Err(format!(
            "{kind} mapping container {} -> host {} ({} ids) is empty or passes 2^32",
            e.inside, e.outside, e.count
        ));
    }
    Ok(e)
}

/// A bind mount's `uidMappings` and `gidMappings` (OCI runtime spec 1.1: the mount is
/// idmapped with them), if it has any. Both or neither.
pub fn of_mount(m: &Mount) -> Result<Option<MountMaps>, String> {
    let uids = m.uid_mappings().clone().unwrap_or_default();
    let gids = m.gid_mappings().clone().unwrap_or_default();
    match (uids.is_empty(), gids.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(MountMaps {
            uids: extents("uid", &uids)?,
            gids: extents("gid", &gids)?,
        })),
        _ => Err(format!(
            "the mount at {} has only one of uidMappings and gidMappings",
            m.destination().display()
        )),
    }
}

/// containerd's `uidmap=` or `gidmap=` option of an overlay over idmapped layers:
/// `container:host:count`, several joined by commas.
pub fn parse_option(kind: &str, value: &str) -> Result<Vec<Extent>, String> {
    let bad = || format!("{kind}map={value:?} is not container:host:count[,...]");
    let out: Vec<Extent> = value
        .split(',')
        .map(|one| {
            let n: Vec<u32> = one
                .split(':')
                .map(|x| x.parse::<u32>().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            match n[..] {
                [inside, outside, count] => checked(
                    kind,
                    Extent {
                        inside,
                        outside,
                        count,
                    },
                ),
                _ => Err(bad()),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(out)
}

/// The user namespaces one container's idmapped mounts need, each made once: the
/// mount's own mapping, followed by the pod's share's (`PodUserns::compose`) when
/// the pod's virtiofsd is jailed, so that virtiofsd and the guest see the ids the
/// mount's mapping names.
pub struct Idmappers<'a> {
    pod: Option<&'a PodUserns>,
    made: Vec<(MountMaps, Arc<OwnedFd>)>,
}

impl<'a> Idmappers<'a> {
    pub fn new(pod: Option<&'a PodUserns>) -> Self {
        Self {
            pod,
            made: Vec::new(),
        }
    }

    /// A user namespace to idmap a mount asking for `maps` with (shared: a volume's
    /// mirrored host mounts are idmapped with it too, later).
    pub fn get(&mut self, maps: &MountMaps) -> std::io::Result<Arc<OwnedFd>> {
        let at = match self.made.iter().position(|(m, _)| m == maps) {
            Some(i) => i,
            None => {
                let compose = |e: &[Extent]| match self.pod {
                    Some(p) => p.compose(e).map_err(std::io::Error::other),
                    None => Ok(e.to_vec()),
                };
                let (uids, gids) = (compose(&maps.uids)?, compose(&maps.gids)?);
                let fd = crate::hypervisor::userns::mapped_namespace(&uids, &gids)?;
                self.made.push((maps.clone(), Arc::new(fd)));
                self.made.len() - 1
            }
        };
        Ok(self.made[at].1.clone())
    }
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
        // Those below are the pod's own first range's (critest maps 0:1000:100000).
        let mut at = u64::from(start.max(IDS_PER_POD));
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

    /// critest's user namespace case maps `0:1000:100000`: the ids below the pod's
    /// own `IDS_PER_POD` are its first range's, the rest one more range.
    #[test]
    fn ranges_crossing_the_pods_own_ids_take_only_what_lies_above() {
        let critest = userns(&[(0, 1000, 100_000)], &[(0, 1000, 100_000)]);
        assert_eq!(extra_share_ranges(&critest), Ok(vec![(65_536, 35_464)]));
    }

    /// CRI gives every bind of a `hostUsers: false` pod the pod's mapping; a workload
    /// container joins the sandbox's namespace, so its mounts alone name host ids.
    #[test]
    fn idmapped_mounts_name_host_ids_too() {
        let s = spec(serde_json::json!({
            "namespaces": [{"type": "user", "path": "/proc/7/ns/user"}],
            "uidMappings": [{"containerID": 0, "hostID": 196_608, "size": 65_536}],
            "gidMappings": [{"containerID": 0, "hostID": 196_608, "size": 65_536}],
        }));
        assert_eq!(host_ranges(&s), Ok(vec![]));
        let mut with_mount = serde_json::to_value(&s).unwrap();
        with_mount["mounts"] = serde_json::json!([{
            "destination": "/vol", "type": "bind", "source": "/v", "options": ["rbind"],
            "uidMappings": [{"containerID": 0, "hostID": 196_608, "size": 65_536}],
            "gidMappings": [{"containerID": 0, "hostID": 196_608, "size": 65_536}],
        }]);
        let s: Spec = serde_json::from_value(with_mount).unwrap();
        assert_eq!(host_ranges(&s), Ok(vec![(196_608, 65_536)]));
        let m = &s.mounts().as_ref().unwrap()[0];
        let maps = of_mount(m).unwrap().unwrap();
        let e = Extent {
            inside: 0,
            outside: 196_608,
            count: 65_536,
        };
        assert_eq!(
            maps,
            MountMaps {
                uids: vec![e],
                gids: vec![e]
            }
        );
    }

    #[test]
    fn containerds_overlay_idmap_options_parse_strictly() {
        assert_eq!(
            parse_option("uid", "0:196608:65536,65536:1000:1"),
            Ok(vec![
                Extent {
                    inside: 0,
                    outside: 196_608,
                    count: 65_536
                },
                Extent {
                    inside: 65_536,
                    outside: 1000,
                    count: 1
                },
            ])
        );
        for bad in [
            "",
            "0:1",
            "0:1:2:3",
            "a:1:2",
            "0:1:0",
            "0:4294967295:2",
            "0:1:2,",
        ] {
            assert!(parse_option("uid", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_mappings_are_named() {
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
