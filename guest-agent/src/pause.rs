//! The agent's own pause: a CRI pod's sandbox container run from what the guest image
//! already holds, so that no root filesystem the host made runs in the VM.
//!
//! A sandbox container does nothing but hold the pod's namespaces; under runc it is the
//! pause image. Here its root is a directory of the guest's images tmpfs holding one
//! file, `/pause`: the agent's own binary, bound read-only (no copy: its pages are the
//! initramfs's). Started as `/pause`, the binary waits for SIGTERM or SIGINT and reaps
//! what the kernel hands it, as the pause image's program does. A confidential agent runs
//! every sandbox container this way, whatever the host asked (`for_request`); any host
//! may ask for it with `BUILTIN_PAUSE` as the container's guest image (the shim does not
//! yet).

use std::path::Path;

use cocoon_protocol::agent::CreateContainerRequest;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

pub use cocoon_protocol::BUILTIN_PAUSE;

/// Where the pause program is in its root.
pub const PROGRAM: &str = "/pause";

/// The CRI annotation that marks a pod's sandbox container.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Whether this process was started as the pause program (by its argv[0]).
pub fn is_pause(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "pause")
}

/// The pause program: waits for SIGTERM or SIGINT, reaping children meanwhile (it is
/// the pod's PID 1 when the pod shares a PID namespace), then exits 0.
pub fn main() -> ! {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => continue,
        }
    }
}

/// Whether `spec_json` is a CRI pod's sandbox container.
fn is_sandbox(spec_json: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(spec_json)
        .ok()
        .and_then(|s| {
            s.get("annotations")?
                .get(CONTAINER_TYPE)?
                .as_str()
                .map(|t| t == "sandbox")
        })
        .unwrap_or(false)
}

/// In a confidential pod: a sandbox container gets the built-in pause, whatever root
/// the host shared or image it named (a host that marks an application container as a
/// sandbox only gets a pause where it wanted its program), and none of the files the
/// host shared for it (CRI binds `/etc/hosts` and the like into a sandbox too; the
/// pause reads none of them).
pub fn for_request(req: &mut CreateContainerRequest) {
    if !is_sandbox(&req.oci_spec_json) {
        return;
    }
    req.guest_image = BUILTIN_PAUSE.into();
    if let Ok(mut spec) = serde_json::from_slice::<serde_json::Value>(&req.oci_spec_json) {
        drop_shared_mounts(&mut spec);
        if let Ok(bytes) = serde_json::to_vec(&spec) {
            req.oci_spec_json = bytes;
        }
    }
}

/// Removes the spec's mounts of what the host shared into the guest.
fn drop_shared_mounts(spec: &mut serde_json::Value) {
    let shared = format!("{}/", crate::sandbox::SHARED_DIR);
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        mounts.retain(|m| {
            !m.get("source")
                .and_then(|s| s.as_str())
                .is_some_and(|s| s.starts_with(&shared))
        });
    }
}

/// Makes `<images>/<id>/rootfs` holding only the pause program (`exe`, bound
/// read-only) and returns `spec_json` with its root there and its process the program.
/// The directory is claimed first, as a pull's is; removed again on failure.
pub fn prepare(images: &Path, id: &str, exe: &Path, spec_json: &[u8]) -> Result<Vec<u8>, String> {
    let (dir, mut spec) = crate::pull::claim(images, id, spec_json)?;
    let rootfs = dir.join("rootfs");
    let program = rootfs.join(PROGRAM.trim_start_matches('/'));
    let made = (|| {
        std::fs::create_dir(&rootfs)
            .map_err(|e| format!("cannot make {}: {e}", rootfs.display()))?;
        std::fs::write(&program, b"")
            .map_err(|e| format!("cannot make {}: {e}", program.display()))?;
        let fail =
            |e: nix::Error| format!("cannot bind the pause program from {}: {e}", exe.display());
        mount(
            Some(exe),
            &program,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(fail)?;
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
        mount(None::<&str>, &program, None::<&str>, ro, None::<&str>).map_err(fail)
    })();
    if let Err(e) = made {
        remove(images, id);
        return Err(e);
    }
    drop_shared_mounts(&mut spec);
    spec["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
    if let Some(process) = spec.get_mut("process").and_then(|p| p.as_object_mut()) {
        process.insert("args".into(), serde_json::json!([PROGRAM]));
    }
    serde_json::to_vec(&spec).map_err(|e| e.to_string())
}

/// Removes what `prepare` (or a pull) made for `id`: the program's mount first, so that
/// the removal does not stop at it. Never through a link: a pulled image, or a container
/// writing its own root, may have made `/pause` a link to a mount of the agent's own.
pub fn remove(images: &Path, id: &str) {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return;
    }
    let program = images
        .join(id)
        .join("rootfs")
        .join(PROGRAM.trim_start_matches('/'));
    let _ = umount2(&program, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
    let _ = std::fs::remove_dir_all(images.join(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "root": {"path": "/host/shared/rootfs"},
            "process": {"args": ["/host-chosen"], "user": {"uid": 65535, "gid": 65535}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/run/cocoon/shared/s1/mounts/1"}
            ],
            "annotations": {"io.kubernetes.cri.container-type": kind},
        }))
        .unwrap()
    }

    #[test]
    fn only_a_sandbox_container_is_given_the_pause() {
        let mut req = CreateContainerRequest::new();
        req.oci_spec_json = spec("sandbox");
        req.guest_image = "registry/whatever@sha256:00".into();
        for_request(&mut req);
        assert_eq!(req.guest_image, BUILTIN_PAUSE);
        let given: serde_json::Value = serde_json::from_slice(&req.oci_spec_json).unwrap();
        assert_eq!(given["mounts"].as_array().unwrap().len(), 1, "{given}");
        assert_eq!(given["mounts"][0]["type"], "proc");
        let mut app = CreateContainerRequest::new();
        app.oci_spec_json = spec("container");
        for_request(&mut app);
        assert_eq!(app.guest_image, "");
        assert_eq!(
            app.oci_spec_json,
            spec("container"),
            "an application's spec changed"
        );
        app.oci_spec_json = b"not json".to_vec();
        for_request(&mut app);
        assert_eq!(app.guest_image, "");
    }

    #[test]
    fn the_pause_is_the_agents_binary_and_goes_away_whole() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("pause", "binding the program needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = prepare(t.path(), "p1", &exe, &spec("sandbox")).unwrap();
        let made: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let rootfs = t.path().join("p1/rootfs");
        assert_eq!(made["root"]["path"], rootfs.to_string_lossy().as_ref());
        assert_eq!(made["process"]["args"], serde_json::json!(["/pause"]));
        assert_eq!(made["process"]["user"]["uid"], 65535, "the rest is kept");
        assert_eq!(made["mounts"].as_array().unwrap().len(), 1, "{made}");
        let names: Vec<_> = std::fs::read_dir(&rootfs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["pause"]);
        assert_eq!(
            std::fs::metadata(rootfs.join("pause")).unwrap().len(),
            std::fs::metadata(&exe).unwrap().len()
        );
        assert!(
            std::fs::write(rootfs.join("pause"), b"x").is_err(),
            "writable"
        );
        let again = prepare(t.path(), "p1", &exe, &spec("sandbox")).unwrap_err();
        assert!(again.contains("already has a root"), "{again}");
        remove(t.path(), "p1");
        assert!(!t.path().join("p1").exists());
        assert!(prepare(t.path(), "../x", &exe, &spec("sandbox")).is_err());
    }

    #[test]
    fn pause_is_known_by_its_name() {
        assert!(is_pause("/pause") && is_pause("pause"));
        assert!(!is_pause("/init") && !is_pause("/pause/x") && !is_pause("cocoon-agent"));
    }
}
