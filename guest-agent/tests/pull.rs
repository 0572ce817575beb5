//! In-guest image pulls (`cocoon_agent::pull`) against a real registry: Debian's
//! `docker-registry` (the CNCF distribution registry) on loopback, filled by this test
//! with images it builds, so every layer and whiteout is known. The same code runs in
//! the guest; here it runs on the host, where the registry's storage can be tampered with.

use std::io::Write;
use std::path::Path;

use cocoon_agent::pull::{pull, PullError, Reference, Transport};
use cocoon_nested::registry::{digest, layer, Registry, E};

mod pull_common;
use pull_common::*;

#[test]
fn an_image_pulled_by_digest_has_its_layers_and_whiteouts_applied() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let (_d, root, work) = dirs();
    pull(
        &reference(&reg, "test/app", &digest),
        &root,
        &work,
        soon(),
        &Transport::default(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert!(!root.join("etc/gone").exists());
    let mut data: Vec<_> = std::fs::read_dir(root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    data.sort();
    assert_eq!(data, ["new"]);
    let mode = std::fs::metadata(root.join("bin/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(root.join("conf-link")).unwrap(),
        Path::new("etc/conf")
    );
    // The downloaded layers are gone once applied.
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
}

#[test]
fn the_images_config_comes_back_checked_against_its_digest() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let config =
        serde_json::json!({"Entrypoint": ["/bin/hello"], "Cmd": ["--loud"], "Env": ["A=1"]});
    let digest = reg.push_image_with("test/conf", &base_layers(), config.clone());
    let (_d, root, work) = dirs();
    let image = reference(&reg, "test/conf", &digest);
    let got = pull(&image, &root, &work, soon(), &Transport::default()).unwrap();
    assert_eq!(got, config);

    // The config blob changed in the registry's storage: refused, nothing left.
    let manifest: serde_json::Value = serde_json::from_slice(
        &reg.request(
            "GET",
            &format!("/v2/test/conf/manifests/{digest}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .unwrap()
        .2,
    )
    .unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let hex = config_digest.trim_start_matches("sha256:");
    let blob = reg
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut tampered = std::fs::read(&blob).unwrap();
    let at = tampered.len() - 3;
    tampered[at] ^= 1;
    std::fs::write(&blob, tampered).unwrap();
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &Transport::default()).unwrap_err();
    assert!(
        matches!(
            e,
            PullError::DigestMismatch {
                what: "image config",
                ..
            }
        ),
        "{e}"
    );
    assert!(!root.exists());
}

#[test]
fn an_index_gives_the_linux_amd64_manifest() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let amd64 = reg.push_image("test/multi", &base_layers());
    let arm64 = reg.push_image("test/multi", &[layer(&[E::File("arm", b"arm", 0o644)])]);
    let entry = |d: &str, arch: &str| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 1, "platform": {"os": "linux", "architecture": arch}});
    // The registry checks each entry's size against the manifest it names.
    let size = |d: &str| {
        reg.request(
            "GET",
            &format!("/v2/test/multi/manifests/{d}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .unwrap()
        .2
        .len()
    };
    let mut arm = entry(&arm64, "arm64");
    arm["size"] = size(&arm64).into();
    let mut amd = entry(&amd64, "amd64");
    amd["size"] = size(&amd64).into();
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [arm, amd]});
    let index = reg.push_manifest(
        "test/multi",
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let (_d, root, work) = dirs();
    pull(
        &reference(&reg, "test/multi", &index),
        &root,
        &work,
        soon(),
        &Transport::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert!(!root.join("arm").exists());
}

#[test]
fn a_digest_the_registry_lacks_or_content_that_is_not_its_digest_is_refused() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let image = reg.push_image("test/app", &base_layers());
    let (_d, root, work) = dirs();
    let missing = format!("sha256:{}", "0".repeat(64));
    let e = pull(
        &reference(&reg, "test/app", &missing),
        &root,
        &work,
        soon(),
        &Transport::default(),
    )
    .unwrap_err();
    assert!(matches!(e, PullError::Missing { status: 404, .. }), "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    assert!(!root.exists());

    // Change a layer's bytes in the registry's own storage: same size, other content.
    let first_layer = base_layers().remove(0);
    let layer_digest = digest(&first_layer);
    let hexd = layer_digest.trim_start_matches("sha256:");
    let data = reg.storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hexd}/data",
        &hexd[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let e = pull(
        &reference(&reg, "test/app", &image),
        &root,
        &work,
        soon(),
        &Transport::default(),
    )
    .unwrap_err();
    match &e {
        PullError::DigestMismatch {
            what: "layer",
            digest: d,
            ..
        } => assert_eq!(d, &layer_digest),
        other => panic!("not a digest mismatch: {other}"),
    }
    assert!(!root.exists(), "a refused pull left its root filesystem");
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "a refused layer was kept"
    );
}

#[test]
fn layers_cannot_write_outside_the_root() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let outside = tempfile::tempdir().unwrap();
    // A symbolic link out of the root, then a file through it.
    let through_link = layer(&[
        E::Link("evil", outside.path().to_str().unwrap()),
        E::File("evil/planted", b"x", 0o644),
    ]);
    // An entry named with "..", written into the header by hand (tar::Builder refuses).
    let mut dotdot = {
        let mut h = tar::Header::new_old();
        let name = b"../../planted";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend([b'x']);
        raw.resize(512 * 2, 0);
        raw.extend([0u8; 1024]);
        raw
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&dotdot).unwrap();
    dotdot = gz.finish().unwrap();
    for (name, l, why) in [
        ("link", through_link, "outside of destination"),
        ("dotdot", dotdot, "leaves the root"),
    ] {
        let digest = reg.push_image("test/evil", &[l]);
        let (d, root, work) = dirs();
        let e = pull(
            &reference(&reg, "test/evil", &digest),
            &root,
            &work,
            soon(),
            &Transport::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, PullError::Malformed(_)) && e.to_string().contains(why),
            "{name}: {e}"
        );
        assert!(
            !outside.path().join("planted").exists(),
            "{name}: a file was planted outside"
        );
        assert!(
            !d.path().join("planted").exists()
                && !d.path().parent().unwrap().join("planted").exists(),
            "{name}"
        );
        assert!(!root.exists());
    }
}

#[test]
fn a_container_gets_its_pulled_root_and_loses_it_on_removal() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let images = tempfile::tempdir().unwrap();
    let spec = br#"{"ociVersion":"1.0.2","root":{"path":"/run/cocoon/shared/c1/rootfs"},"process":{"args":["sh"],"cwd":"/"}}"#;
    let image = format!("{}/test/app@{digest}", reg.addr);
    let (out, config) = cocoon_agent::pull::for_container(
        images.path(),
        "c1",
        &image,
        spec,
        soon(),
        &Transport::default(),
    )
    .unwrap();
    assert_eq!(config, serde_json::json!({}));
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let root = images.path().join("c1/rootfs");
    assert_eq!(out["root"]["path"], root.to_str().unwrap());
    assert_eq!(out["process"]["args"][0], "sh");
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert!(!images.path().join("c1/work").exists());
    let again = cocoon_agent::pull::for_container(
        images.path(),
        "c1",
        &image,
        spec,
        soon(),
        &Transport::default(),
    )
    .unwrap_err();
    assert!(again.contains("already"), "{again}");
    cocoon_agent::pull::remove_for_container(images.path(), "c1");
    assert!(!images.path().join("c1").exists());

    let wrong = format!("{}/test/app@sha256:{}", reg.addr, "1".repeat(64));
    let e = cocoon_agent::pull::for_container(
        images.path(),
        "c2",
        &wrong,
        spec,
        soon(),
        &Transport::default(),
    )
    .unwrap_err();
    assert!(
        e.starts_with(&format!(
            "pulling {wrong} in the guest: manifest sha256:111"
        )),
        "{e}"
    );
    assert!(!images.path().join("c2").exists());
    for bad_id in ["", "..", "a/b"] {
        assert!(cocoon_agent::pull::for_container(
            images.path(),
            bad_id,
            &image,
            spec,
            soon(),
            &Transport::default()
        )
        .is_err());
    }
}

#[test]
fn later_layers_replace_what_earlier_ones_left_whatever_its_kind() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let layers = vec![
        layer(&[
            E::File("was-file", b"f", 0o644),
            E::Dir("was-dir"),
            E::File("was-dir/inner", b"i", 0o644),
            E::File("linked", b"old", 0o644),
            E::Dir("opaque"),
            E::File("opaque/lower", b"l", 0o644),
            // Merged /usr: a link inside the root.
            E::Dir("usr"),
            E::Dir("usr/lib"),
            E::Link("lib", "usr/lib"),
        ]),
        layer(&[
            // A directory where a file was, a link where a directory was.
            E::Dir("was-file"),
            E::File("was-file/now", b"n", 0o644),
            E::Link("was-dir", "was-file"),
            // A hard link over an existing file.
            E::File("target", b"t", 0o644),
            E::HardLink("linked", "target"),
            // This layer's own file under an opaque directory, listed before the marker
            // and with no entry of its own for the directory between.
            E::File("opaque/sub/mine", b"m", 0o644),
            E::File("opaque/.wh..wh..opq", b"", 0o644),
            E::File("lib/libfoo.so", b"so", 0o755),
        ]),
    ];
    let digest = reg.push_image("test/replace", &layers);
    let (_d, root, work) = dirs();
    pull(
        &reference(&reg, "test/replace", &digest),
        &root,
        &work,
        soon(),
        &Transport::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(root.join("was-file/now")).unwrap(), b"n");
    assert_eq!(
        std::fs::read_link(root.join("was-dir")).unwrap(),
        Path::new("was-file")
    );
    assert_eq!(std::fs::read(root.join("linked")).unwrap(), b"t");
    assert_eq!(std::fs::read(root.join("opaque/sub/mine")).unwrap(), b"m");
    assert!(!root.join("opaque/lower").exists());
    assert_eq!(
        std::fs::read(root.join("usr/lib/libfoo.so")).unwrap(),
        b"so"
    );
}

#[test]
fn a_pull_past_its_deadline_stops_and_leaves_nothing() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let (_d, root, work) = dirs();
    let past = std::time::Instant::now();
    let e = pull(
        &reference(&reg, "test/app", &digest),
        &root,
        &work,
        past,
        &Transport::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("ran out of time"), "{e}");
    assert!(!root.exists());
}

#[test]
fn a_registry_dripping_its_reply_cannot_hold_a_pull_past_its_deadline() {
    // A byte of reply head every 100 ms, for ever: each read is quick, the whole is not.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        while conn.write_all(b"X").is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let image = Reference::parse(&format!("{addr}/test/app@sha256:{}", "1".repeat(64))).unwrap();
    let (_d, root, work) = dirs();
    let started = std::time::Instant::now();
    let until = started + std::time::Duration::from_secs(1);
    let e = pull(&image, &root, &work, until, &Transport::default()).unwrap_err();
    assert!(e.to_string().contains("out of time"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
