//! A busybox OCI image built here, from Debian's static busybox, as an OCI
//! archive `ctr images import` takes: no registry is reachable from CI.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const IMAGE_REF: &str = "docker.io/cocoon/busybox:test";

/// A pause image for CRI sandboxes: the same busybox root, sleeping forever.
pub const PAUSE_REF: &str = "docker.io/cocoon/pause:test";
pub const PAUSE_ENTRYPOINT: &[&str] = &["/bin/sleep", "infinity"];

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn add(t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, path, data).unwrap();
}

fn dir(t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    t.append_data(&mut h, path, std::io::empty()).unwrap();
}

/// The root filesystem layer: busybox and its applet links, users, dirs.
fn layer(busybox: &Path) -> Vec<u8> {
    let bb = std::fs::read(busybox).expect("static busybox (apt-get install busybox-static)");
    let applets = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap()
        .stdout;
    let mut t = tar::Builder::new(Vec::new());
    for d in [
        "bin/", "etc/", "tmp/", "proc/", "sys/", "dev/", "root/", "home/", "var/", "run/", "data/",
    ] {
        dir(&mut t, d, if d == "tmp/" { 0o1777 } else { 0o755 });
    }
    add(&mut t, "bin/busybox", 0o755, &bb);
    for a in String::from_utf8_lossy(&applets).lines() {
        if a == "busybox" || a.is_empty() {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_mtime(0);
        t.append_link(&mut h, format!("bin/{a}"), "busybox")
            .unwrap();
    }
    add(&mut t, "etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nuser:x:1000:1000:user:/home:/bin/sh\n");
    add(
        &mut t,
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\nuser:x:1000:\nextra:x:2000:user\n",
    );
    t.into_inner().unwrap()
}

/// Unpacks the same root filesystem into `dir` (for specs that name a rootfs).
pub fn write_rootfs(busybox: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    tar::Archive::new(&layer(busybox)[..]).unpack(dir).unwrap();
}

/// Writes the image as an OCI archive to `out`.
pub fn write_archive(busybox: &Path, out: &Path) {
    write_image(busybox, out, IMAGE_REF, &[]);
}

/// Writes an OCI archive of the busybox root named `image_ref`, whose config
/// runs `entrypoint` (none: the image's `Cmd`, `sh`).
pub fn write_image(busybox: &Path, out: &Path, image_ref: &str, entrypoint: &[&str]) {
    let layer = layer(busybox);
    let layer_sha = sha(&layer);
    let mut image_config = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/"
    });
    if !entrypoint.is_empty() {
        image_config["Entrypoint"] = serde_json::json!(entrypoint);
        image_config.as_object_mut().unwrap().remove("Cmd");
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sha}")]}
    }))
    .unwrap();
    let config_sha = sha(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_sha}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_sha}"), "size": layer.len()}]
    }))
    .unwrap();
    let manifest_sha = sha(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_sha}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": image_ref, "org.opencontainers.image.ref.name": "test"}
        }]
    }))
    .unwrap();
    let mut t = tar::Builder::new(Vec::new());
    add(
        &mut t,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    add(&mut t, "index.json", 0o644, &index);
    dir(&mut t, "blobs/", 0o755);
    dir(&mut t, "blobs/sha256/", 0o755);
    for (s, data) in [
        (&layer_sha, &layer),
        (&config_sha, &config),
        (&manifest_sha, &manifest),
    ] {
        add(&mut t, &format!("blobs/sha256/{s}"), 0o644, data);
    }
    std::fs::File::create(out)
        .unwrap()
        .write_all(&t.into_inner().unwrap())
        .unwrap();
}
