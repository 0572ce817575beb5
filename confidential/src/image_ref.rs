//! Image references as the guest's pull takes them.

/// `name` as the guest's pull takes it, `registry/repository@sha256:<hex>`: a tag beside
/// the digest dropped (the digest decides), a Docker Hub short name made whole
/// (`nginx@…` is `docker.io/library/nginx@…`), as Docker's references read. `None`
/// without a sha256 digest.
pub fn digest_reference(name: &str) -> Option<String> {
    let (name, digest) = name.split_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    // A tag is in the last part only (`host:5000/repo:tag`).
    let name = match name.rsplit_once('/') {
        Some((head, last)) => format!("{head}/{}", last.split(':').next()?),
        None => name.split(':').next()?.to_owned(),
    };
    let first = name.split('/').next()?;
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let name = match (has_registry, name.contains('/')) {
        (true, _) => name,
        (false, true) => format!("docker.io/{name}"),
        (false, false) => format!("docker.io/library/{name}"),
    };
    Some(format!("{name}@{digest}"))
}
