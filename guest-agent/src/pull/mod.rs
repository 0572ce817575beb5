//! Pulling a container image inside the guest, by digest: for pods whose host must not
//! provide (or see) the container's root filesystem. The reference names a registry, a
//! repository and a manifest digest (`registry:5000/library/busybox@sha256:…`; tags are
//! refused: a tag is whatever the registry says today). Every byte is checked against the
//! digest that names it before it is used: the manifest (or the index, then the
//! linux/amd64 manifest it names), each layer (downloaded whole, hashed, only then
//! unpacked), so neither the registry nor the network in between can change what runs.
//!
//! Bounds: a manifest of at most 4 MiB, each layer exactly the size its manifest says and
//! the image at most `MAX_IMAGE` bytes compressed, a deadline on every read.

pub mod accounts;
mod auth;
mod http;
mod registry;
mod unpack;

pub use auth::{Credentials, Source};
pub use registry::Transport;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The most a manifest or index may hold.
const MAX_MANIFEST: u64 = 4 << 20;
/// The most an image's config may hold.
const MAX_CONFIG: u64 = 1 << 20;
/// The most an image's layers may hold together, compressed.
pub const MAX_IMAGE: u64 = 2 << 30;
/// The deadline on each connect, read and write.
const DEADLINE: Duration = Duration::from_secs(30);

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image reference {0:?}: {1}")]
    Reference(String, &'static str),
    #[error("registry: {0}")]
    Registry(String),
    #[error("{what} {digest} is not in the registry (HTTP {status})")]
    Missing {
        what: &'static str,
        digest: String,
        status: u16,
    },
    #[error("{what} {digest} does not match its digest (got sha256:{got}): refused")]
    DigestMismatch {
        what: &'static str,
        digest: String,
        got: String,
    },
    #[error("the image is malformed: {0}")]
    Malformed(String),
    #[error("cannot write the image to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `registry/repository@sha256:hex`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub digest: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, PullError> {
        let bad = |why| PullError::Reference(s.to_owned(), why);
        let (name, digest) = s
            .split_once('@')
            .ok_or_else(|| bad("it has no @sha256: digest (images are pulled by digest only)"))?;
        check_digest(digest)
            .map_err(|_| bad("its digest is not sha256: and 64 lowercase hex digits"))?;
        let (registry, repository) = name
            .split_once('/')
            .ok_or_else(|| bad("it names no registry host"))?;
        if registry.is_empty()
            || !(registry.contains('.') || registry.contains(':') || registry == "localhost")
        {
            return Err(bad(
                "its first part is not a registry host (host.domain, host:port or localhost)",
            ));
        }
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if repository.contains(':') {
            return Err(bad("it has a tag as well as a digest"));
        }
        if !repository.split('/').all(part_ok) {
            return Err(bad(
                "its repository is not lowercase path parts of [a-z0-9._-]",
            ));
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            digest: digest.to_owned(),
        })
    }
}

fn check_digest(d: &str) -> Result<&str, ()> {
    let hex = d.strip_prefix("sha256:").ok_or(())?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(())
    }
}

/// Pulls `image` and unpacks its layers into `rootfs` (which must not exist yet), using
/// `work` for the downloaded layers (removed after), reaching the registry through
/// `transport`. Returns the image's configuration (its config blob's `config`: `Env`,
/// `Entrypoint`, `Cmd`, `WorkingDir`, `User`...; `{}` when it has none), checked
/// against its digest like every layer.
pub fn pull(
    image: &Reference,
    rootfs: &Path,
    work: &Path,
    deadline: Instant,
    transport: &Transport,
) -> Result<Value, PullError> {
    let mut session =
        registry::Session::new(transport, &image.registry, &image.repository, deadline);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PullError::Io { path, source }
    };
    let late = || -> Result<(), PullError> {
        match Instant::now() >= deadline {
            true => Err(PullError::Registry(format!(
                "the pull of {} ran out of time",
                image.digest
            ))),
            false => Ok(()),
        }
    };
    let (manifest, _) = fetch_manifest(&mut session, image, &image.digest)?;
    let manifest = match media_type(&manifest).as_str() {
        "application/vnd.oci.image.index.v1+json"
        | "application/vnd.docker.distribution.manifest.list.v2+json" => {
            let digest = pick_platform(&manifest)?;
            fetch_manifest(&mut session, image, &digest)?.0
        }
        _ => manifest,
    };
    let config = fetch_config(&mut session, image, &manifest)?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| PullError::Malformed("the manifest has no layers".into()))?;
    let mut total = 0u64;
    let mut planned = Vec::new();
    for l in layers {
        let digest = l
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        check_digest(&digest)
            .map_err(|_| PullError::Malformed(format!("a layer digest {digest:?}")))?;
        let size = l
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| PullError::Malformed(format!("layer {digest} has no size")))?;
        let kind = unpack::Compression::of(
            l.get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        )?;
        total = total.saturating_add(size);
        if total > MAX_IMAGE {
            return Err(PullError::Malformed(format!(
                "its layers hold more than {MAX_IMAGE} bytes"
            )));
        }
        planned.push((digest, size, kind));
    }
    std::fs::create_dir_all(work).map_err(io(work))?;
    std::fs::create_dir(rootfs).map_err(io(rootfs))?;
    let result = (|| {
        for (digest, size, kind) in &planned {
            let file = work.join(digest.replace(':', "-"));
            late()?;
            fetch_blob(&mut session, image, digest, *size, &file, deadline)?;
            let f = File::open(&file).map_err(io(&file))?;
            unpack::layer(f, *kind, rootfs).map_err(|e| match e {
                PullError::Malformed(m) => PullError::Malformed(format!("layer {digest}: {m}")),
                other => other,
            })?;
            let _ = std::fs::remove_file(&file);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(rootfs);
    }
    result.map(|()| config)
}

/// The `config` object of the image config blob `manifest` names, checked against its
/// digest.
fn fetch_config(
    session: &mut registry::Session,
    image: &Reference,
    manifest: &Value,
) -> Result<Value, PullError> {
    let digest = manifest
        .get("config")
        .and_then(|c| c.get("digest"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    check_digest(digest)
        .map_err(|_| PullError::Malformed(format!("the image config digest {digest:?}")))?;
    let size = manifest
        .get("config")
        .and_then(|c| c.get("size"))
        .and_then(Value::as_u64);
    if size.is_some_and(|s| s > MAX_CONFIG) {
        return Err(PullError::Malformed(format!(
            "image config {digest} is over {MAX_CONFIG} bytes"
        )));
    }
    let path = format!("/v2/{}/blobs/{digest}", image.repository);
    let body = fetch_checked(session, &path, None, "image config", digest, MAX_CONFIG)?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| PullError::Malformed(format!("image config {digest}: {e}")))?;
    match v.get("config") {
        None | Some(Value::Null) => Ok(Value::Object(Default::default())),
        Some(c @ Value::Object(_)) => Ok(c.clone()),
        Some(_) => Err(PullError::Malformed(format!(
            "image config {digest}: its config is not an object"
        ))),
    }
}

/// Where pulled images are unpacked, one directory per container (the guest's tmpfs
/// `/run`: an image costs guest memory).
pub const IMAGES_DIR: &str = "/run/cocoon/images";

/// Mounts a tmpfs of its own at `IMAGES_DIR`, once, at most half the guest's memory:
/// unlike the `/run` it sits in, it allows set-user-ID programs, as an image's root
/// filesystem may hold them (the container's own mount options still apply).
pub fn images_dir() -> Result<&'static Path, String> {
    static MOUNTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let dir = Path::new(IMAGES_DIR);
    MOUNTED
        .get_or_init(|| {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {IMAGES_DIR}: {e}"))?;
            nix::mount::mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0700,size=50%"),
            )
            .map_err(|e| format!("cannot mount a tmpfs at {IMAGES_DIR}: {e}"))
        })
        .clone()
        .map(|()| dir)
}

/// Pulls `image` for container `id` under `images` and returns `spec_json` with its
/// root pointing there, and the image's configuration, giving up at `deadline`. The container's directory is claimed
/// first (a second pull for the same id fails without touching the first's) and is
/// removed on failure.
pub fn for_container(
    images: &Path,
    id: &str,
    image: &str,
    spec_json: &[u8],
    deadline: Instant,
    transport: &Transport,
) -> Result<(Vec<u8>, Value), String> {
    let reference = Reference::parse(image).map_err(|e| e.to_string())?;
    let (dir, mut spec) = claim(images, id, spec_json)?;
    let rootfs = dir.join("rootfs");
    let result = pull(&reference, &rootfs, &dir.join("work"), deadline, transport);
    let _ = std::fs::remove_dir_all(dir.join("work"));
    let config = match result {
        Ok(config) => config,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("pulling {image} in the guest: {e}"));
        }
    };
    // The agent decides where the root is, whatever the host wrote.
    spec["root"]["path"] = Value::String(rootfs.to_string_lossy().into_owned());
    let spec = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    Ok((spec, config))
}

/// The first step of giving container `id` a root the guest makes under `images` (a
/// pull, the built-in pause): checks that the id can name a directory and the spec is a
/// JSON object, then claims `<images>/<id>`; a second claim for the same id fails
/// without touching the first's. Returns the directory and the parsed spec.
pub(crate) fn claim(images: &Path, id: &str, spec_json: &[u8]) -> Result<(PathBuf, Value), String> {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Err(format!("container id {id:?} cannot name a directory"));
    }
    let spec: Value =
        serde_json::from_slice(spec_json).map_err(|e| format!("the OCI spec: {e}"))?;
    if !spec.is_object() {
        return Err("the OCI spec is not a JSON object".into());
    }
    let dir = images.join(id);
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok((dir, spec)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(format!("container {id} already has a root in the guest"))
        }
        Err(e) => Err(format!("cannot make {}: {e}", dir.display())),
    }
}

/// Removes what `for_container` pulled for `id`, if anything.
pub fn remove_for_container(images: &Path, id: &str) {
    if !id.is_empty() && !id.contains('/') && id != "." && id != ".." {
        let _ = std::fs::remove_dir_all(images.join(id));
    }
}

fn media_type(v: &Value) -> String {
    v.get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The linux/amd64 entry of an index.
fn pick_platform(index: &Value) -> Result<String, PullError> {
    let entries = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| PullError::Malformed("the index has no manifests".into()))?;
    entries
        .iter()
        .find(|m| {
            let p = &m["platform"];
            p["os"] == "linux" && p["architecture"] == "amd64"
        })
        .and_then(|m| m.get("digest").and_then(Value::as_str))
        .map(str::to_owned)
        .ok_or_else(|| PullError::Malformed("the index has no linux/amd64 manifest".into()))
}

/// `path` of the registry, `what` named `digest`: at most `max` bytes, checked against
/// the digest before anything reads it.
fn fetch_checked(
    session: &mut registry::Session,
    path: &str,
    accept: Option<&str>,
    what: &'static str,
    digest: &str,
    max: u64,
) -> Result<Vec<u8>, PullError> {
    let mut reply = session.get(path, accept)?;
    if reply.status != 200 {
        return Err(PullError::Missing {
            what,
            digest: digest.to_owned(),
            status: reply.status,
        });
    }
    let mut body = Vec::new();
    (&mut reply)
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| PullError::Registry(format!("reading {what} {digest}: {e}")))?;
    if body.len() as u64 > max {
        return Err(PullError::Malformed(format!(
            "{what} {digest} is over {max} bytes"
        )));
    }
    let got = hex(&Sha256::digest(&body));
    if format!("sha256:{got}") != digest {
        return Err(PullError::DigestMismatch {
            what,
            digest: digest.to_owned(),
            got,
        });
    }
    Ok(body)
}

/// The manifest (or index) named `digest`, checked against it.
fn fetch_manifest(
    session: &mut registry::Session,
    image: &Reference,
    digest: &str,
) -> Result<(Value, Vec<u8>), PullError> {
    check_digest(digest)
        .map_err(|_| PullError::Malformed(format!("a manifest digest {digest:?}")))?;
    let path = format!("/v2/{}/manifests/{digest}", image.repository);
    let body = fetch_checked(
        session,
        &path,
        Some(ACCEPT),
        "manifest",
        digest,
        MAX_MANIFEST,
    )?;
    let mut v: Value = serde_json::from_slice(&body)
        .map_err(|e| PullError::Malformed(format!("manifest {digest}: {e}")))?;
    // OCI lets mediaType be left out of the document: tell an index by its shape (the
    // digest-checked bytes), not by the reply's unauthenticated Content-Type.
    if v.get("mediaType").is_none() && v.get("manifests").is_some() {
        v["mediaType"] = Value::String("application/vnd.oci.image.index.v1+json".into());
    }
    Ok((v, body))
}

/// Downloads blob `digest` of `size` bytes to `file`, hashing as it goes; the file is
/// kept only if the bytes match.
fn fetch_blob(
    session: &mut registry::Session,
    image: &Reference,
    digest: &str,
    size: u64,
    file: &Path,
    deadline: Instant,
) -> Result<(), PullError> {
    let path = format!("/v2/{}/blobs/{digest}", image.repository);
    let mut reply = session.get(&path, None)?;
    if reply.status != 200 {
        return Err(PullError::Registry(format!(
            "layer {digest}: HTTP {}",
            reply.status
        )));
    }
    if reply.length.is_some_and(|l| l != size) {
        return Err(PullError::Malformed(format!(
            "layer {digest} is {} bytes, its manifest says {size}",
            reply.length.unwrap_or(0)
        )));
    }
    let mut out = File::create(file).map_err(|source| PullError::Io {
        path: file.to_owned(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut limited = (&mut reply).take(size + 1);
    loop {
        let n = limited
            .read(&mut buf)
            .map_err(|e| PullError::Registry(format!("reading layer {digest}: {e}")))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > size {
            break;
        }
        if Instant::now() >= deadline {
            let _ = std::fs::remove_file(file);
            return Err(PullError::Registry(format!(
                "layer {digest}: the pull ran out of time after {got} of {size} bytes"
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| PullError::Io {
            path: file.to_owned(),
            source,
        })?;
    }
    let fail = |e: PullError| {
        let _ = std::fs::remove_file(file);
        Err(e)
    };
    if got != size {
        return fail(PullError::Malformed(format!(
            "layer {digest} sent {got} bytes, its manifest says {size}"
        )));
    }
    let hash = hex(&hasher.finalize());
    if format!("sha256:{hash}") != digest {
        return fail(PullError::DigestMismatch {
            what: "layer",
            digest: digest.to_owned(),
            got: hash,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_registry_and_a_digest() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("10.0.0.1:5000/library/busybox@{d}")).unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.digest.as_str()
            ),
            ("10.0.0.1:5000", "library/busybox", d.as_str())
        );
        assert!(Reference::parse(&format!("localhost/x@{d}")).is_ok());
        for (bad, why) in [
            ("10.0.0.1:5000/busybox:latest".to_owned(), "by digest only"),
            (format!("busybox@{d}"), "no registry"),
            (format!("library/busybox@{d}"), "not a registry host"),
            (format!("r.io/busybox:1@{d}"), "a tag as well"),
            (format!("r.io/Busy@{d}"), "lowercase"),
            ("r.io/busybox@sha256:abc".to_owned(), "64 lowercase hex"),
            (
                format!("r.io/busybox@{}", d.to_uppercase()),
                "64 lowercase hex",
            ),
        ] {
            let e = Reference::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
