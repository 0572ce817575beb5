//! A real OCI registry for tests (Debian's `docker-registry`, the CNCF distribution
//! registry), filled by the test with images it builds, so every layer is known: for
//! the in-guest pull tests of the agent (on loopback) and of CRI pods (on a pod
//! network's gateway).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const REGISTRY: &str = "/usr/bin/docker-registry";

/// The user and password a `private_twin` takes.
pub const PULLER: (&str, &str) = ("puller", "pull-secret");
/// Their bcrypt htpasswd line (cost 4, made once with Python's `crypt`; the registry
/// reads bcrypt only).
const PULLER_HTPASSWD: &str =
    "puller:$2b$04$8gV/HpT7lyTvtQ0j1PXFGuhygjIb2rRXgHsgvQtI8so4WcCrLylBG\n";

pub struct Registry {
    child: Child,
    pub addr: String,
    /// Its filesystem storage (`docker/registry/v2/blobs/...`), for tampering.
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// A registry on a free loopback port, or `None` (SKIPPED, failing under CI) where
    /// it is not installed.
    pub fn start(test: &str) -> Option<Registry> {
        Registry::start_on(test, std::net::Ipv4Addr::LOCALHOST)
    }

    /// The same on a free port of `ip`.
    pub fn start_on(test: &str, ip: std::net::Ipv4Addr) -> Option<Registry> {
        if !Path::new(REGISTRY).exists() {
            let why = format!("{REGISTRY} is missing (Debian's docker-registry; scripts/setup-host.sh installs it)");
            crate::testing::missing(test, &why);
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        Some(Registry::spawn(dir, ip, storage, ""))
    }

    /// A second registry serving this one's storage over TLS, with the PEM certificate
    /// and key at `cert` and `key`, on a free port of the same address: push to `self`,
    /// pull from it.
    pub fn tls_twin(&self, cert: &Path, key: &Path) -> Registry {
        self.twin(cert, key, "", None)
    }

    /// A TLS twin (as `tls_twin`) that serves only clients with `PULLER`'s credentials
    /// (the registry's htpasswd Basic authentication): a private registry.
    pub fn private_twin(&self, cert: &Path, key: &Path) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, PULLER_HTPASSWD).unwrap();
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: cocoon-test\n    path: {}\n",
            htpasswd.display()
        );
        self.twin(cert, key, &auth, Some(dir))
    }

    /// A twin over TLS with `top_extra` added to the config's top level, its config in
    /// `keep` (with files the config names) if given.
    fn twin(
        &self,
        cert: &Path,
        key: &Path,
        top_extra: &str,
        keep: Option<tempfile::TempDir>,
    ) -> Registry {
        let ip: std::net::Ipv4Addr = self
            .addr
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.parse().ok())
            .expect("an IPv4 address and port");
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n{top_extra}",
            cert.display(),
            key.display()
        );
        let dir = keep.unwrap_or_else(|| tempfile::tempdir().unwrap());
        Registry::spawn(dir, ip, self.storage.clone(), &tls)
    }

    /// Starts the registry with its config in `dir`, on a free port of `ip`, storing in
    /// `storage`; `http_extra` is added to the config's `http` section (TLS), and may go
    /// on with top-level sections. Returns once it answers.
    fn spawn(
        dir: tempfile::TempDir,
        ip: std::net::Ipv4Addr,
        storage: PathBuf,
        http_extra: &str,
    ) -> Registry {
        let port = std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("{ip}:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{http_extra}",
                storage.display()
            ),
        )
        .unwrap();
        let mut command = Command::new(REGISTRY);
        command
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Gone with the test that started it, even where `Drop` never runs: a registry
        // a test's server threads still hold when its process exits, or a test killed.
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().unwrap();
        let r = Registry {
            child,
            addr,
            storage,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Over TLS, a plain request gets Go's 400 ("an HTTP request to an HTTPS server").
        let ready = if http_extra.is_empty() { 200 } else { 400 };
        loop {
            if r.request("GET", "/v2/", &[], b"")
                .is_ok_and(|(s, _, _)| s == ready)
            {
                return r;
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
    pub fn request(
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

    pub fn push_blob(&self, repo: &str, blob: &[u8]) -> String {
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

    pub fn push_manifest(&self, repo: &str, media_type: &str, manifest: &[u8]) -> String {
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
    pub fn push_image(&self, repo: &str, layers: &[Vec<u8>]) -> String {
        self.push_image_with(repo, layers, serde_json::json!({}))
    }

    /// As `push_image`, with `config` as the image's configuration (`Env`,
    /// `Entrypoint`, `Cmd`...).
    pub fn push_image_with(
        &self,
        repo: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> String {
        // The digests of the layers uncompressed, as a node's containerd checks them when
        // it unpacks the image.
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| {
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(&l[..])
                    .read_to_end(&mut tar)
                    .expect("a gzip'd layer");
                digest(&tar)
            })
            .collect();
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
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

    /// `addr/repo@digest`.
    pub fn reference(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.addr)
    }
}

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One entry of a test layer.
pub enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
    /// A hard link at the first path to the second (an earlier entry of the layer).
    HardLink(&'a str, &'a str),
}

/// A gzip'd tar layer of `entries`, owned by root.
pub fn layer(entries: &[E]) -> Vec<u8> {
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
            E::HardLink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}
