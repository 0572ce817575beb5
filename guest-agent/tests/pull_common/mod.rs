//! What the pull tests share: a deadline, images and directories, the test CA, and
//! transports built as the agent builds them from init-data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cocoon_agent::pull::{Reference, Transport};
use cocoon_nested::registry::{layer, Registry, E};

/// A deadline no test pull comes near.
pub fn soon() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(120)
}

pub fn reference(reg: &Registry, repo: &str, digest: &str) -> Reference {
    Reference::parse(&reg.reference(repo, digest)).unwrap()
}

pub fn base_layers() -> Vec<Vec<u8>> {
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

pub fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (root, work) = (d.path().join("rootfs"), d.path().join("work"));
    (d, root, work)
}

/// The test CA, another CA, and a server certificate for 127.0.0.1 the first signed
/// (the key broker's TLS fixtures, `confidential/tests/fixtures/kbs-tls/gen.sh`).
pub fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../confidential/tests/fixtures/kbs-tls")
        .join(name)
}

pub fn transport(roots: &[&str], plain_http: &[&str]) -> Transport {
    transport_for(roots, plain_http, false)
}

/// As `transport`, for a confidential guest when `confidential`.
pub fn transport_for(roots: &[&str], plain_http: &[&str], confidential: bool) -> Transport {
    let pem = |n: &&str| std::fs::read_to_string(tls_fixture(n)).unwrap();
    let config = cocoon_confidential::initdata::RegistryConfig {
        root_certificates: roots.iter().map(pem).collect(),
        plain_http: plain_http.iter().map(|s| s.to_string()).collect(),
        credentials: None,
    };
    Transport::from_config(&config, confidential).unwrap()
}
