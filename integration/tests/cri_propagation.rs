//! Mount propagation of volumes, as CRI's validation suite checks it ("mount with
//! 'rprivate' should not support propagation", "'rslave' should support propagation from
//! host to container", and the host-to-container half of "'rshared'"): a directory made
//! a shared mount on the host is given to three containers, one per propagation; after
//! they started, the host mounts a directory holding `flag` inside it. Containers with
//! host-to-container or bidirectional propagation see `flag`, the private one does not.
//! Under cocoon the volume reaches the guest through the pod share (virtio-fs, idmapped
//! for the jailed virtiofsd), so the mount made afterwards must reach the share too. The
//! same report is asked of runc and cocoon.
//!
//! Not asked: a mount made *in* a bidirectional container reaching the host. A guest
//! kernel's mounts cannot become the host's (docs/kubernetes.md).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use common::env;
use k8s_cri::v1::{Mount, MountPropagation};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

const RUNC_NET: u8 = 68;
const COCOON_NET: u8 = 69;

const KINDS: [(&str, MountPropagation); 3] = [
    ("private", MountPropagation::PropagationPrivate),
    ("slave", MountPropagation::PropagationHostToContainer),
    ("shared", MountPropagation::PropagationBidirectional),
];

/// A host directory `mnt` made a shared mount of its own (as the suite makes it), with
/// `mnt/point` to mount on later and `src/flag` to mount there. Unmounted on drop.
struct HostDir {
    mnt: PathBuf,
    src: PathBuf,
}

impl HostDir {
    fn new(base: &Path) -> HostDir {
        let mnt = base.join("mnt");
        let src = base.join("src");
        std::fs::create_dir_all(mnt.join("point")).unwrap();
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("flag"), "").unwrap();
        for d in [base, &mnt, &mnt.join("point"), &src] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
        }
        let none = None::<&str>;
        mount(
            Some(&mnt),
            &mnt,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .unwrap();
        let dir = HostDir { mnt, src };
        mount(
            none,
            &dir.mnt,
            none,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            none,
        )
        .unwrap();
        dir
    }

    fn mount_flag(&self) {
        let none = None::<&str>;
        mount(
            Some(&self.src),
            &self.mnt.join("point"),
            none,
            MsFlags::MS_BIND,
            none,
        )
        .unwrap();
    }

    fn unmount_flag(&self) {
        umount2(&self.mnt.join("point"), MntFlags::empty()).unwrap();
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = umount2(&self.mnt, MntFlags::MNT_DETACH);
    }
}

/// What each container lists in the mount point after the host mounted on it, then
/// after the host unmounted it, as `(kind, listing)`.
async fn observe(test: &str, handler: &str, net: u8) -> Option<Vec<(String, String)>> {
    let env = env(test, handler, net).await?;
    let node = &env.node;
    let pconfig = node.pod_config("prop", "uid-prop", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut started = Vec::new();
    for (kind, propagation) in KINDS {
        let dir = HostDir::new(&env.dir.path().join(format!("prop-{kind}")));
        let mut c = CriNode::container_config(kind, IMAGE_REF, &["sleep", "3600"], &[]);
        c.mounts = vec![Mount {
            host_path: dir.mnt.to_string_lossy().into_owned(),
            container_path: "/prop".into(),
            propagation: propagation as i32,
            ..Default::default()
        }];
        let ctr = node
            .create_and_start(&pod, &c, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: {kind}: {e}\n{}", node.log_tail()));
        started.push((kind, dir, ctr));
    }
    // What the container lists in the mount point, once it shows the flag as `want`
    // says or 5 s passed: the guest's virtio-fs keeps a name it looked up for up to
    // a second (`--cache auto`), runc's containers see a change at once. The shim
    // mirrors the host's change a moment after it, so an `ls` may read the name and
    // then find it gone; that too only counts once the deadline passed.
    let list = |ctr: String, when: String, want: bool| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, out, err) = node
                .exec_sync(&ctr, &["ls", "-A", "/prop/point"], Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("{test}: ExecSync: {e}"));
            let past = Instant::now() > deadline;
            if code != 0 && !past {
                continue;
            }
            assert_eq!(code, 0, "{test}: {handler}: ls {when}: {err}");
            if out.contains("flag") == want || past {
                return out;
            }
        }
    };
    let mut seen = Vec::new();
    for (_, dir, _) in &started {
        dir.mount_flag();
    }
    for (kind, _, ctr) in &started {
        let when = format!("{kind}, host mounted");
        let want = *kind != "private";
        seen.push((when.clone(), list(ctr.clone(), when, want).await));
    }
    for (_, dir, _) in &started {
        dir.unmount_flag();
    }
    for (kind, _, ctr) in &started {
        let when = format!("{kind}, host unmounted");
        seen.push((when.clone(), list(ctr.clone(), when, false).await));
    }
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    if handler == COCOON {
        // The copies of the host's mounts went with the pod's share.
        let run = env.dir.path().join("run");
        let left = cocoon_integration::pod_leftovers(&run);
        assert!(left.is_empty(), "{test}: left behind: {left:?}");
        let mounted = cocoon_integration::mounts_under(&run);
        assert!(mounted.is_empty(), "{test}: still mounted: {mounted:?}");
    }
    Some(seen)
}

#[tokio::test]
async fn host_mounts_propagate_into_volumes_as_under_runc() {
    let test = "host_mounts_propagate_into_volumes_as_under_runc";
    let (runc, cocoon) = tokio::join!(
        observe(test, RUNC, RUNC_NET),
        observe(test, COCOON, COCOON_NET)
    );
    let (Some(runc), Some(cocoon)) = (runc, cocoon) else {
        return;
    };
    let flag_seen: Vec<bool> = runc.iter().map(|(_, out)| out.contains("flag")).collect();
    assert_eq!(
        flag_seen,
        [false, true, true, false, false, false],
        "runc: {runc:?}"
    );
    assert_eq!(cocoon, runc, "cocoon (left) differs from runc");
}

const HOSTILE_NET: u8 = 73;

/// Root in the guest (the debug console, outside every container) tries to remove and
/// rename over the host's mount points in an rslave volume, straight through the share:
/// a mirrored tmpfs, and a sysfs that cannot be idmapped (its place held). A mount point
/// of another namespace only would let both through and detach the host's mount; the
/// mounts the shim put in their places make them fail, as the container's own copy of
/// the mount does under runc.
#[tokio::test]
async fn a_guest_cannot_take_the_hosts_mounts_away_from_a_volume() {
    use std::io::Read;
    let test = "a_guest_cannot_take_the_hosts_mounts_away_from_a_volume";
    let tables = "[debug]\nconsole = true\n";
    let Some(env) = common::env_full(test, COCOON, HOSTILE_NET, false, tables).await else {
        return;
    };
    let node = &env.node;
    let dir = HostDir::new(&env.dir.path().join("prop"));
    std::fs::create_dir(dir.mnt.join("sys")).unwrap();
    let pconfig = node.pod_config("prop", "uid-prop", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("slave", IMAGE_REF, &["sleep", "3600"], &[]);
    c.mounts = vec![Mount {
        host_path: dir.mnt.to_string_lossy().into_owned(),
        container_path: "/prop".into(),
        propagation: MountPropagation::PropagationHostToContainer as i32,
        ..Default::default()
    }];
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    dir.mount_flag();
    let none = None::<&str>;
    let sys = dir.mnt.join("sys");
    mount(Some("sysfs"), &sys, Some("sysfs"), MsFlags::empty(), none).unwrap();
    let _sys = scopeguard(&sys);
    // Mirrored once the container sees the flag.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = node
            .exec_sync(&ctr, &["ls", "-A", "/prop/point"], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{test}: ExecSync: {e}"));
        if out.contains("flag") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: the host's mount never showed"
        );
    }
    let uds = cocoon_integration::leftover_entries(&env.dir.path().join("run"))
        .into_iter()
        .map(|d| d.join("vsock.sock"))
        .find(|p| p.exists())
        .expect("the pod's vsock socket");
    let attack = "for d in /run/cocoon/shared/*/mounts/*; do rmdir $d/point $d/sys; \
                  mv $d/point $d/moved; mv $d/sys $d/moved2; done 2>&1; echo done";
    let mut stream = cocoon_shim::debugconsole::open(&uds, &[attack.to_string()])
        .await
        .unwrap_or_else(|e| panic!("{test}: the debug console: {e:#}"));
    let said = tokio::task::spawn_blocking(move || {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(said.contains("done"), "{test}: the guest said {said:?}");
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for point in [dir.mnt.join("point"), sys.clone()] {
        let p = point.to_string_lossy();
        assert!(
            table.lines().any(|l| l.split(' ').nth(4) == Some(&*p)),
            "{test}: the host lost its mount at {p}; the guest said {said:?}"
        );
    }
    assert!(dir.mnt.join("point/flag").exists(), "{test}: {said:?}");
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
}

/// Unmounts `path` (detached) when dropped.
fn scopeguard(path: &Path) -> impl Drop + '_ {
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = umount2(self.0, MntFlags::MNT_DETACH);
        }
    }
    Unmount(path)
}
