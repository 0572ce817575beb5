//! Tests of `mounts`, on real mounts (they need root).

use super::*;

fn spec_with(mounts: serde_json::Value) -> Spec {
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "mounts": mounts,
        "linux": {"cgroupsPath": "/default/x"}
    }))
    .unwrap()
}

#[test]
fn rootfs_and_binds_are_mounted_and_rewritten() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
    std::fs::write(bundle.join("rootfs/etc/hostname"), "x").unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "hello").unwrap();
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, None, None).unwrap();
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]},
        {"destination": "/f", "source": data.join("f"), "options": ["bind", "rw"]}
    ]));
    let mut m = prepare(
        &share,
        None,
        None,
        "c1",
        &bundle,
        Root::Host(&[]),
        &mut spec,
    )
    .unwrap();
    assert_eq!(
        spec.root().as_ref().unwrap().path(),
        Path::new("/run/cocoon/shared/c1/rootfs")
    );
    assert!(share.join("c1/rootfs/etc/hostname").exists());
    let mounts = spec.mounts().as_ref().unwrap();
    assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
    assert_eq!(
        mounts[1].source().as_deref(),
        Some(Path::new("/run/cocoon/shared/c1/mounts/1"))
    );
    assert_eq!(
        mounts[2].source().as_deref(),
        Some(Path::new("/run/cocoon/shared/c1/mounts/2"))
    );
    assert_eq!(
        std::fs::read_to_string(share.join("c1/mounts/1/f")).unwrap(),
        "hello"
    );
    // Read-only on the host side too.
    let err = std::fs::write(share.join("c1/mounts/1/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    std::fs::write(share.join("c1/mounts/2"), "changed").unwrap();
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "changed");
    assert!(spec.linux().as_ref().unwrap().cgroups_path().is_none());
    // The guest's view takes no new names in the container's directory.
    let planted = std::os::unix::fs::symlink("/", share.join("c1/mounts/evil")).unwrap_err();
    assert_eq!(planted.raw_os_error(), Some(libc::EROFS));
    m.cleanup();
    assert!(!share.join("c1").exists());
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "changed");
    crate::shimv2::share::remove(&share, None);
    assert!(!share.exists());
}

/// In the pod's own mount namespace: the rootfs (an overlay, as containerd hands
/// it) and a volume reach the export there and never the node's table; the node can
/// take away a directory inside the volume that had a mount, as under runc; and
/// nothing of the pod is mounted anywhere once it is undone.
#[test]
fn in_the_pods_namespace_the_node_keeps_its_own_mounts() {
    use crate::shimv2::podns::PodNs;
    use nix::mount::{mount, MsFlags};
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |s: &str| t.path().join(s);
    for d in ["lower/etc", "upper", "work", "bundle", "vol/sub", "shares"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    std::fs::write(p("lower/etc/hostname"), "from the layer").unwrap();
    mount(
        Some("tmpfs"),
        &p("vol/sub"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::write(p("vol/sub/f"), "on the node's mount").unwrap();
    let ns = Arc::new(PodNs::new(&[p("shares")]).unwrap());
    let share = p("shares/pod");
    crate::shimv2::share::create(&share, None, Some(&ns)).unwrap();
    let rootfs = RootfsMount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("lowerdir={}", p("lower").display()),
            format!("upperdir={}", p("upper").display()),
            format!("workdir={}", p("work").display()),
        ],
        ..Default::default()
    };
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/vol", "type": "bind", "source": p("vol"), "options": ["rbind", "rw"]}
    ]));
    let mut m = prepare(
        &share,
        None,
        Some(ns.clone()),
        "c1",
        &p("bundle"),
        Root::Host(std::slice::from_ref(&rootfs)),
        &mut spec,
    )
    .unwrap();
    let node_points = || {
        let t = std::fs::read("/proc/self/mountinfo").unwrap();
        crate::shimv2::propagation::table::parse(&t)
            .into_iter()
            .map(|m| m.point)
            .collect::<Vec<_>>()
    };
    assert!(
        !node_points().iter().any(|m| m.starts_with(p("shares"))),
        "the node's table has the pod's mounts: {:?}",
        node_points()
    );
    // The guest's view, read in the pod's namespace.
    let (s, seen) = (share.clone(), ns.clone());
    let read = move |rel: &'static str| {
        let path = s.join(rel);
        seen.run(move || std::fs::read_to_string(path)).unwrap()
    };
    assert_eq!(read("c1/rootfs/etc/hostname").unwrap(), "from the layer");
    assert_eq!(read("c1/mounts/0/sub/f").unwrap(), "on the node's mount");
    // The node unmounts the volume's submount and removes its directory.
    nix::mount::umount2(&p("vol/sub"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    std::fs::remove_dir(p("vol/sub")).unwrap();
    assert!(read("c1/mounts/0/sub/f").is_err(), "the pod still has it");
    m.cleanup();
    crate::shimv2::share::remove(&share, Some(&ns));
    let left = ns
        .run(|| std::fs::read("/proc/thread-self/mountinfo"))
        .unwrap()
        .unwrap();
    let left: Vec<_> = crate::shimv2::propagation::table::parse(&left)
        .into_iter()
        .filter(|m| m.point.starts_with(p("shares")))
        .collect();
    assert!(left.is_empty(), "left in the pod's namespace: {left:?}");
    assert!(!share.exists());
    // The layer's data is the node's still.
    assert!(p("lower/etc/hostname").is_file());
}

/// A container whose image the guest pulls: nothing of the host's root filesystem
/// is shared, the spec names where the agent unpacks it, volumes are shared as ever.
#[test]
fn a_guest_pulled_root_shares_only_the_volumes() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, None, None).unwrap();
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]}
    ]));
    let mut m = prepare(&share, None, None, "c3", &bundle, Root::Guest, &mut spec).unwrap();
    assert_eq!(
        spec.root().as_ref().unwrap().path(),
        Path::new("/run/cocoon/images/c3/rootfs")
    );
    assert!(!share.join("c3/rootfs").exists());
    let mounts = spec.mounts().as_ref().unwrap();
    assert_eq!(
        mounts[0].source().as_deref(),
        Some(Path::new("/run/cocoon/shared/c3/mounts/0"))
    );
    m.cleanup();
    assert!(!share.join("c3").exists());
    crate::shimv2::share::remove(&share, None);
}

/// With the pod's namespace: a snapshot given as a bind (a single-layer view, the
/// native snapshotter) and a volume are idmapped, and the spec is still rewritten.
#[test]
fn with_a_namespace_a_bind_rootfs_and_volumes_show_shifted_owners() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let snap = t.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("owned"), "x").unwrap();
    std::os::unix::fs::lchown(snap.join("owned"), Some(1000), Some(1000)).unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "hello").unwrap();
    std::os::unix::fs::lchown(data.join("f"), Some(7), Some(7)).unwrap();
    let base = 1_500_327_680;
    let ns = Arc::new(PodUserns::create(base, crate::hypervisor::userns::IDS_PER_POD).unwrap());
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, Some(&ns), None).unwrap();
    let rootfs = [RootfsMount {
        type_: "bind".into(),
        source: snap.display().to_string(),
        options: vec!["rbind".into(), "rw".into()],
        ..Default::default()
    }];
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}
    ]));
    let mut m = prepare(
        &share,
        Some(ns),
        None,
        "c1",
        &bundle,
        Root::Host(&rootfs),
        &mut spec,
    )
    .unwrap();
    let uid = |p: &str| std::fs::symlink_metadata(share.join(p)).unwrap().uid();
    assert_eq!(uid("c1/rootfs/owned"), base + 1000);
    assert_eq!(uid("c1/mounts/0/f"), base + 7);
    // The structure shows as the namespace's root.
    assert_eq!(uid("c1"), base);
    assert_eq!(
        spec.mounts().as_ref().unwrap()[0].source().as_deref(),
        Some(Path::new("/run/cocoon/shared/c1/mounts/0"))
    );
    m.cleanup();
    crate::shimv2::share::remove(&share, None);
    assert!(!share.exists());
    assert_eq!(std::fs::metadata(data.join("f")).unwrap().uid(), 7);
}

#[test]
fn missing_bind_source_is_named_and_undone() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, None, None).unwrap();
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}
    ]));
    let err = prepare(
        &share,
        None,
        None,
        "c2",
        &bundle,
        Root::Host(&[]),
        &mut spec,
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/src"), "{err}");
    assert!(
        !share.join("c2").exists(),
        "a failed prepare leaves nothing"
    );
    crate::shimv2::share::remove(&share, None);
}

/// A volume on a filesystem that cannot be idmapped (an overlay, as `/tmp` is in
/// many containers; NFS) cannot reach the jailed virtiofsd: the error names the
/// volume, the filesystem and the way out, and nothing is left in the share.
#[test]
fn a_volume_that_cannot_be_idmapped_is_named_with_its_filesystem() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    use nix::mount::{mount, MsFlags};
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    let (lower, upper, work, vol) = (
        t.path().join("lower"),
        t.path().join("upper"),
        t.path().join("work"),
        t.path().join("vol"),
    );
    for d in [&bundle.join("rootfs"), &lower, &upper, &work, &vol] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &vol,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    let ns =
        Arc::new(PodUserns::create(1_500_458_752, crate::hypervisor::userns::IDS_PER_POD).unwrap());
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, Some(&ns), None).unwrap();
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]}
    ]));
    let err = prepare(
        &share,
        Some(ns),
        None,
        "c4",
        &bundle,
        Root::Host(&[]),
        &mut spec,
    )
    .unwrap_err();
    let _ = umount2(&vol, MntFlags::MNT_DETACH);
    let mut text = err.to_string();
    let mut next = std::error::Error::source(&err);
    while let Some(e) = next {
        text = format!("{text}: {e}");
        next = e.source();
    }
    for part in [
        vol.to_str().unwrap(),
        "overlayfs",
        "[jail] virtiofsd = true",
    ] {
        assert!(text.contains(part), "{part:?} not in: {text}");
    }
    assert!(
        !share.join("c4").exists(),
        "a failed prepare leaves nothing"
    );
    crate::shimv2::share::remove(&share, None);
}

/// A host mount beneath an rslave volume's source reaches the share, idmapped, and
/// goes when the host unmounts it; one that cannot be idmapped (sysfs) gets its place
/// held by an empty read-only directory, so the guest cannot remove or rename over
/// the host's mount point through virtiofsd.
#[test]
fn host_mounts_reach_an_rslave_volume_or_have_their_place_held() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    use nix::mount::{mount, MsFlags};
    let none = None::<&str>;
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    let data = t.path().join("data");
    for d in [&bundle, &data.join("ok"), &data.join("bad")] {
        std::fs::create_dir_all(d).unwrap();
    }
    mount(Some(&data), &data, none, MsFlags::MS_BIND, none).unwrap();
    mount(none, &data, none, MsFlags::MS_SHARED, none).unwrap();
    let ns =
        Arc::new(PodUserns::create(1_500_393_216, crate::hypervisor::userns::IDS_PER_POD).unwrap());
    // As `<run>/shares/<vm>`: mounts under `<run>/shares` are never mirrored.
    let share = t.path().join("shares/share");
    crate::shimv2::share::create(&share, Some(&ns), None).unwrap();
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rslave"]}
    ]));
    let mut m = prepare(
        &share,
        Some(ns),
        None,
        "c1",
        &bundle,
        Root::Guest,
        &mut spec,
    )
    .unwrap();
    let vol = share.join("c1/mounts/0");
    let eventually = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let mounted_at = |p: &Path| {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        table
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&p.display().to_string()))
    };
    mount(
        Some("t"),
        &data.join("ok"),
        Some("tmpfs"),
        MsFlags::empty(),
        none,
    )
    .unwrap();
    std::fs::write(data.join("ok/f"), "x").unwrap();
    mount(
        Some("sysfs"),
        &data.join("bad"),
        Some("sysfs"),
        MsFlags::empty(),
        none,
    )
    .unwrap();
    eventually("the tmpfs in the share", &|| vol.join("ok/f").exists());
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(vol.join("ok/f")).unwrap().uid();
    assert_eq!(uid, 1_500_393_216, "the copy is idmapped");
    eventually("the held place", &|| mounted_at(&vol.join("bad")));
    assert_eq!(std::fs::read_dir(vol.join("bad")).unwrap().count(), 0);
    assert!(
        std::fs::create_dir(vol.join("bad/x")).is_err(),
        "the placeholder takes writes"
    );
    umount2(&data.join("ok"), MntFlags::empty()).unwrap();
    eventually("the copy gone", &|| !vol.join("ok/f").exists());
    umount2(&data.join("bad"), MntFlags::empty()).unwrap();
    eventually("the held place gone", &|| !mounted_at(&vol.join("bad")));
    m.cleanup();
    umount2(&data, MntFlags::MNT_DETACH).unwrap();
    crate::shimv2::share::remove(&share, None);
    assert!(!share.exists());
}

/// A `hostUsers: false` pod's volume (CRI gives it the pod's `uidMappings`) in a jailed
/// pod: idmapped with its mapping composed with the share's, so the file the host's
/// root owns shows as the share's id for the pod's first host id, and the guest's spec
/// no longer names the mappings (the guest could not apply them).
#[test]
fn a_volume_with_its_own_mapping_shows_the_pods_host_ids_through_the_jail() {
    if !nix::unistd::geteuid().is_root() {
        cocoon_nested::testing::missing("mounts", "mounting needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    // Outside the shares' parent, whose mounts are never mirrored.
    let elsewhere = tempfile::tempdir().unwrap();
    let data = elsewhere.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "hello").unwrap();
    std::os::unix::fs::lchown(data.join("f"), Some(7), Some(7)).unwrap();
    let (base, extra) = (1_500_524_288, 1_500_589_824);
    let ns = Arc::new(
        PodUserns::create_for_test(
            base,
            &[crate::hypervisor::userns::Extent {
                inside: 196_608,
                outside: extra,
                count: 65_536,
            }],
        )
        .unwrap(),
    );
    let share = t.path().join("share");
    crate::shimv2::share::create(&share, Some(&ns), None).unwrap();
    let map = serde_json::json!([{"containerID": 0, "hostID": 196_608, "size": 65_536}]);
    let mut spec = spec_with(serde_json::json!([
        {"destination": "/data", "type": "bind", "source": data,
         "options": ["rbind", "rw", "rslave"], "uidMappings": map, "gidMappings": map},
        {"destination": "/plain", "type": "bind", "source": data, "options": ["rbind", "ro"]}
    ]));
    let mut m = prepare(
        &share,
        Some(ns),
        None,
        "c1",
        &bundle,
        Root::Host(&[]),
        &mut spec,
    )
    .unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(share.join(p)).unwrap();
    assert_eq!(
        (meta("c1/mounts/0/f").uid(), meta("c1/mounts/0/f").gid()),
        (extra + 7, extra + 7)
    );
    // The same source without a mapping shows through the share's own.
    assert_eq!(meta("c1/mounts/1/f").uid(), base + 7);
    let mounts = spec.mounts().as_ref().unwrap();
    assert!(mounts[0].uid_mappings().is_none() && mounts[0].gid_mappings().is_none());
    // A host mount made later beneath the volume's source is mirrored with the
    // volume's own mapping, not the share's.
    let sub = data.join("sub");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    std::fs::write(sub.join("g"), "x").unwrap();
    std::os::unix::fs::lchown(sub.join("g"), Some(9), Some(9)).unwrap();
    let mirrored = share.join("c1/mounts/0/sub/g");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::symlink_metadata(&mirrored).is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let seen = std::fs::symlink_metadata(&mirrored).map(|m| m.uid());
    nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(seen.ok(), Some(extra + 9), "the mirrored mount's owner");
    m.cleanup();
    crate::shimv2::share::remove(&share, None);
}
