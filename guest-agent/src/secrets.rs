//! Secrets from the pod's key broker, as files in a container: a container annotation
//! `io.cocoon.kbs-secrets: name=repository/type/tag[,name=...]` has the agent fetch each
//! resource from the key broker named in the pod's init-data (`aa.toml`'s
//! `[token_configs.kbs] url`, as in Confidential Containers), attesting with the guest's
//! own evidence, and put it at `/run/secrets/cocoon/<name>` (read-only, mode 0400, on a
//! tmpfs of the guest's). The host never sees them: the broker encrypts each to a key
//! that exists only in the guest (`cocoon_confidential::kbs`).
//!
//! Which secrets a container may ask for is the pod owner's policy's to decide (the
//! annotation is in CreateContainer's input, `input.oci.annotations`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use serde_json::Value;

pub const ANNOTATION: &str = "io.cocoon.kbs-secrets";
/// Where the agent keeps each container's secrets (`<dir>/<container id>/<name>`).
pub const DIR: &str = "/run/cocoon/secrets";
/// Where a container sees them.
pub const IN_CONTAINER: &str = "/run/secrets/cocoon";
/// The most secrets one container may ask for.
const MAX_SECRETS: usize = 32;

/// One requested secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub repository: String,
    pub kind: String,
    pub tag: String,
}

fn plain(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses the annotation's value.
pub fn parse(value: &str) -> Result<Vec<Secret>, String> {
    let mut out: Vec<Secret> = Vec::new();
    for item in value.split(',').map(str::trim) {
        let bad = || {
            format!("{ANNOTATION}: {item:?} is not name=repository/type/tag (letters, digits, '.', '_', '-')")
        };
        let (name, path) = item.split_once('=').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        let [repository, kind, tag] = parts[..] else {
            return Err(bad());
        };
        if ![name, repository, kind, tag].iter().all(|p| plain(p)) {
            return Err(bad());
        }
        if out.iter().any(|s| s.name == name) {
            return Err(format!("{ANNOTATION}: the name {name:?} is given twice"));
        }
        out.push(Secret {
            name: name.into(),
            repository: repository.into(),
            kind: kind.into(),
            tag: tag.into(),
        });
    }
    if out.len() > MAX_SECRETS {
        return Err(format!(
            "{ANNOTATION}: {} secrets; at most {MAX_SECRETS}",
            out.len()
        ));
    }
    Ok(out)
}

/// The secrets `spec` asks for (none without the annotation).
pub fn requested(spec: &Value) -> Result<Vec<Secret>, String> {
    match spec.get("annotations").and_then(|a| a.get(ANNOTATION)) {
        None => Ok(Vec::new()),
        Some(Value::String(v)) => parse(v),
        Some(_) => Err(format!("{ANNOTATION} is not a string")),
    }
}

/// Fetches each secret with `fetch`, writes it under `dir` (made here, mode 0700) and
/// mounts `dir` read-only at `IN_CONTAINER` in `spec`. Nothing is left on failure.
pub fn provide(
    mut fetch: impl FnMut(&Secret) -> Result<Vec<u8>, String>,
    secrets: &[Secret],
    dir: &Path,
    spec: &mut Value,
) -> Result<(), String> {
    let result = (|| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        for s in secrets {
            let bytes = fetch(s).map_err(|e| {
                format!(
                    "secret {:?} ({}/{}/{}): {e}",
                    s.name, s.repository, s.kind, s.tag
                )
            })?;
            let path = dir.join(&s.name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)
                .and_then(|mut f| f.write_all(&bytes))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        let mounts = spec
            .as_object_mut()
            .ok_or("the OCI spec is not an object")?
            .entry("mounts")
            .or_insert_with(|| Value::Array(Vec::new()));
        let list = mounts
            .as_array_mut()
            .ok_or("the OCI spec's mounts are not a list")?;
        list.push(serde_json::json!({
            "destination": IN_CONTAINER,
            "type": "bind",
            "source": dir.to_string_lossy(),
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        }));
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_names_plain_parts() {
        let s = parse("key=default/key/one, cert=app/tls/v2").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[1],
            Secret {
                name: "cert".into(),
                repository: "app".into(),
                kind: "tls".into(),
                tag: "v2".into()
            }
        );
        for bad in [
            "key",
            "key=a/b",
            "key=a/b/c/d",
            "../x=a/b/c",
            "k=a/../c",
            "k=a/b/c,k=a/b/d",
            "=a/b/c",
            "k=a/b/",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        let many: Vec<String> = (0..33).map(|i| format!("s{i}=a/b/c")).collect();
        assert!(parse(&many.join(",")).unwrap_err().contains("at most 32"));
    }

    #[test]
    fn secrets_are_files_mounted_read_only_or_nothing_is_left() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c1");
        let mut spec =
            serde_json::json!({"annotations": {ANNOTATION: "key=default/key/one,other=r/t/x"}});
        let wanted = requested(&spec).unwrap();
        provide(
            |s| Ok(format!("value of {}", s.tag).into_bytes()),
            &wanted,
            &dir,
            &mut spec,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("key")).unwrap(),
            "value of one"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.join("other"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o400
        );
        assert_eq!(spec["mounts"][0]["destination"], IN_CONTAINER);
        assert_eq!(spec["mounts"][0]["options"][1], "ro");

        let dir2 = t.path().join("c2");
        let mut spec2 = serde_json::json!({});
        let e = provide(
            |s| {
                if s.name == "other" {
                    Err("refused by the broker".into())
                } else {
                    Ok(b"x".to_vec())
                }
            },
            &wanted,
            &dir2,
            &mut spec2,
        )
        .unwrap_err();
        assert!(
            e.contains("\"other\"") && e.contains("refused by the broker"),
            "{e}"
        );
        assert!(!dir2.exists());
        assert!(spec2.get("mounts").is_none());
    }
}
