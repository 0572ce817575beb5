//! In-guest image pulls (`cocoon_agent::pull`) against a real registry: Debian's
//! `docker-registry` (the CNCF distribution registry) on loopback, filled by this test
//! with images it builds, so every layer and whiteout is known. The same code runs in
//! the guest; here it runs on the host, where the registry's storage can be tampered with.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_agent::pull::{pull, PullError, Reference};
use sha2::{Digest, Sha256};

const REGISTRY: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    addr: String,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

impl Registry {
    /// A registry on a free loopback port, or `None` (SKIPPED) where it is not installed.
    fn start() -> Option<Registry> {
        if !Path::new(REGISTRY).exists() {
            let why = format!("{REGISTRY} is missing (Debian's docker-registry; scripts/setup-host.sh installs it)");
            assert!(!in_ci(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry {
            child,
            addr,
            storage,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if r.request("GET", "/v2/", &[], b"")
                .is_ok_and(|(s, _, _)| s == 200)
            {
                return Some(r);
            }
            assert!(
                Instant::now() < deadline,
                "the registry never answered on {}",
                r.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request; (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String, Vec<u8>)> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(raw.len());
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((
            status,
            head,
            raw.get(end + 4..).unwrap_or_default().to_vec(),
        ))
    }

    fn push_blob(&self, repo: &str, blob: &[u8]) -> String {
        let digest = digest(blob);
        let (status, head, _) = self
            .request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")
            .unwrap();
        assert_eq!(status, 202, "{head}");
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .unwrap()
            .trim()
            .trim_start_matches(&format!("http://{}", self.addr))
            .to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let (status, head, _) = self
            .request(
                "PUT",
                &format!("{location}{sep}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                blob,
            )
            .unwrap();
        assert_eq!(status, 201, "{head}");
        digest
    }

    fn push_manifest(&self, repo: &str, media_type: &str, manifest: &[u8]) -> String {
        let digest = digest(manifest);
        let (status, head, body) = self
            .request(
                "PUT",
                &format!("/v2/{repo}/manifests/{digest}"),
                &[("Content-Type", media_type)],
                manifest,
            )
            .unwrap();
        assert_eq!(status, 201, "{head} {}", String::from_utf8_lossy(&body));
        digest
    }

    /// Pushes a one-platform image of `layers` (tar.gz each); returns its manifest digest.
    fn push_image(&self, repo: &str, layers: &[Vec<u8>]) -> String {
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config);
        let layers: Vec<_> = layers
            .iter()
            .map(|l| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": self.push_blob(repo, l), "size": l.len()})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers,
        });
        self.push_manifest(
            repo,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        )
    }

    fn reference(&self, repo: &str, digest: &str) -> Reference {
        Reference::parse(&format!("{}/{repo}@{digest}", self.addr)).unwrap()
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            E::File(p, data, mode) => {
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn base_layers() -> Vec<Vec<u8>> {
    vec![
        layer(&[
            E::Dir("bin"),
            E::File("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
            E::Dir("etc"),
            E::File("etc/conf", b"one", 0o644),
            E::File("etc/gone", b"x", 0o644),
            E::Dir("data"),
            E::File("data/old1", b"1", 0o600),
            E::File("data/old2", b"2", 0o600),
            E::Link("conf-link", "etc/conf"),
        ]),
        layer(&[
            E::File("etc/.wh.gone", b"", 0o644),
            E::File("data/.wh..wh..opq", b"", 0o644),
            E::File("data/new", b"n", 0o644),
            E::File("etc/conf", b"two", 0o644),
        ]),
    ]
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (root, work) = (d.path().join("rootfs"), d.path().join("work"));
    (d, root, work)
}

#[test]
fn an_image_pulled_by_digest_has_its_layers_and_whiteouts_applied() {
    let Some(reg) = Registry::start() else { return };
    let digest = reg.push_image("test/app", &base_layers());
    let (_d, root, work) = dirs();
    pull(&reg.reference("test/app", &digest), &root, &work).unwrap();
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
fn an_index_gives_the_linux_amd64_manifest() {
    let Some(reg) = Registry::start() else { return };
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
    pull(&reg.reference("test/multi", &index), &root, &work).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert!(!root.join("arm").exists());
}

#[test]
fn a_digest_the_registry_lacks_or_content_that_is_not_its_digest_is_refused() {
    let Some(reg) = Registry::start() else { return };
    let image = reg.push_image("test/app", &base_layers());
    let (_d, root, work) = dirs();
    let missing = format!("sha256:{}", "0".repeat(64));
    let e = pull(&reg.reference("test/app", &missing), &root, &work).unwrap_err();
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
    let e = pull(&reg.reference("test/app", &image), &root, &work).unwrap_err();
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
    let Some(reg) = Registry::start() else { return };
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
        let e = pull(&reg.reference("test/evil", &digest), &root, &work).unwrap_err();
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
