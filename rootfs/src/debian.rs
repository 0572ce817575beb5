//! Talks to Debian's package tools: resolves `linux-image-cloud-amd64` to the concrete
//! kernel package with `apt-cache`, fetches its `.deb` with `apt-get download` into the
//! download cache (reused later without network) and reads a given `.deb`'s control fields.
//! Nothing is ever installed on the host.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::hash;

/// The metapackage that always depends on the current cloud kernel of the release.
pub const CLOUD_METAPACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Debug, Error)]
pub enum DebianError {
    #[error("Failed to run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("Command `{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },
    #[error("Package {0} does not depend on a linux-image package")]
    NoKernelDependency(String),
    #[error("Package {package} has no {field} field")]
    MissingField {
        package: String,
        field: &'static str,
    },
    #[error("Download of {package} produced no .deb in {}", dir.display())]
    NoDownload { package: String, dir: PathBuf },
    #[error("Downloaded {} has sha256 {actual}, apt expects {expected}", path.display())]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("No linux-image-*-cloud-amd64 package of version {version} (that of {source_package}) is known to apt; candidates: {candidates}")]
    NoCloudKernelFor {
        source_package: String,
        version: String,
        candidates: String,
    },
    #[error("Kernel package {} does not exist", .0.display())]
    DebNotFound(PathBuf),
    #[error("Failed to access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A binary package as apt knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// From the archive's Packages index, when apt knows it.
    pub sha256: Option<String>,
}

impl AptPackage {
    /// The file name `apt-get download` gives this package (an epoch's `:` becomes `%3a`).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.architecture
        )
    }
}

/// Resolves the cloud metapackage to its concrete kernel package, refreshing apt's lists
/// once if they do not know it yet.
pub fn resolve_cloud_kernel() -> Result<AptPackage, DebianError> {
    with_fresh_lists(CLOUD_METAPACKAGE, resolve_kernel_of)
}

/// The cloud kernel built from the same Debian source version as `source` (a
/// `linux-source-X.Y` package): for linux-source-6.12 6.12.118-1~deb12u1,
/// linux-image-6.12.118+deb12-cloud-amd64. Debian names these images after the upstream
/// release and an ABI suffix that varies (`+deb12`, `+deb12.1`), so the name is found by
/// searching, and the version must match exactly.
pub fn resolve_cloud_kernel_of_source(source: &str) -> Result<AptPackage, DebianError> {
    let src = resolve_package(source)?;
    let upstream = upstream_version(&src.version);
    let pattern = format!(
        "^linux-image-{}\\+deb[0-9.]*-cloud-amd64$",
        upstream.replace('.', "\\.")
    );
    let found = run("apt-cache", &["search", "--names-only", &pattern], None)?;
    let names = search_names(&found);
    for name in &names {
        let pkg = resolve_package(name)?;
        if pkg.version == src.version {
            return Ok(pkg);
        }
    }
    Err(DebianError::NoCloudKernelFor {
        source_package: source.to_owned(),
        version: src.version,
        candidates: if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        },
    })
}

/// A Debian version's upstream part: `6.12.118` of `6.12.118-1~deb12u1` (an epoch goes too).
pub fn upstream_version(version: &str) -> &str {
    let v = version.split_once(':').map_or(version, |(_, v)| v);
    v.rsplit_once('-').map_or(v, |(u, _)| u)
}

/// The package names of `apt-cache search` output (`name - description` lines).
fn search_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_once(" - ").map(|(n, _)| n.trim().to_owned()))
        .filter(|n| !n.is_empty())
        .collect()
}

/// `resolve(name)`, and once more after `apt-get update` if apt did not know it.
fn with_fresh_lists(
    name: &str,
    resolve: impl Fn(&str) -> Result<AptPackage, DebianError>,
) -> Result<AptPackage, DebianError> {
    match resolve(name) {
        Ok(pkg) => Ok(pkg),
        Err(first) => {
            log::info!("resolving {name} failed ({first}); running apt-get update");
            run("apt-get", &["update", "-q"], None)?;
            resolve(name)
        }
    }
}

/// Resolves a package by name to the version apt would install, refreshing apt's lists
/// once if they do not know it yet.
pub fn resolve_package(name: &str) -> Result<AptPackage, DebianError> {
    let show = |name: &str| -> Result<AptPackage, DebianError> {
        let stanza = run("apt-cache", &["show", "--no-all-versions", name], None)?;
        let get = |f: &'static str| {
            field(&stanza, f).ok_or_else(|| DebianError::MissingField {
                package: name.to_owned(),
                field: f,
            })
        };
        Ok(AptPackage {
            name: name.to_owned(),
            version: get("Version")?,
            architecture: get("Architecture")?,
            sha256: field(&stanza, "SHA256"),
        })
    };
    with_fresh_lists(name, show)
}

fn resolve_kernel_of(meta: &str) -> Result<AptPackage, DebianError> {
    let stanza = run("apt-cache", &["show", "--no-all-versions", meta], None)?;
    let depends = field(&stanza, "Depends").ok_or_else(|| DebianError::MissingField {
        package: meta.to_owned(),
        field: "Depends",
    })?;
    let (name, version) = kernel_dependency(&depends)
        .ok_or_else(|| DebianError::NoKernelDependency(meta.to_owned()))?;
    let spec = match &version {
        Some(v) => format!("{name}={v}"),
        None => name.clone(),
    };
    let stanza = run("apt-cache", &["show", "--no-all-versions", &spec], None)?;
    let get = |f: &'static str| {
        field(&stanza, f).ok_or_else(|| DebianError::MissingField {
            package: name.clone(),
            field: f,
        })
    };
    Ok(AptPackage {
        version: get("Version")?,
        architecture: get("Architecture")?,
        sha256: field(&stanza, "SHA256"),
        name,
    })
}

/// Picks `linux-image-…` (and its `(= version)` pin) out of a Depends field.
pub fn kernel_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends.split(',').find_map(|alt| {
        let dep = alt.split('|').next()?.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_owned());
        Some((name.to_owned(), version))
    })
}

/// The first value of `name` in the first stanza of a control-format text.
pub fn field(stanza: &str, name: &str) -> Option<String> {
    stanza
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
}

/// Returns the package's `.deb` in `downloads` and its sha256, fetching it only if it is
/// not there. A cached file is checked against apt's checksum before it is reused.
pub fn fetch(pkg: &AptPackage, downloads: &Path) -> Result<(PathBuf, String), DebianError> {
    let target = downloads.join(pkg.deb_file_name());
    if target.is_file() {
        let sha256 = verify(pkg, &target)?;
        log::info!("reusing {}", target.display());
        return Ok((target, sha256));
    }
    fs::create_dir_all(downloads).map_err(|source| DebianError::Io {
        path: downloads.to_owned(),
        source,
    })?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(downloads)
        .map_err(|source| DebianError::Io {
            path: downloads.to_owned(),
            source,
        })?;
    log::info!("downloading {} {}", pkg.name, pkg.version);
    let spec = format!("{}={}", pkg.name, pkg.version);
    // The sandbox user cannot write into our private temp dir; we are not installing anything.
    run(
        "apt-get",
        &["download", "-q", "-o", "APT::Sandbox::User=root", &spec],
        Some(partial.path()),
    )?;
    let downloaded = partial.path().join(pkg.deb_file_name());
    if !downloaded.is_file() {
        return Err(DebianError::NoDownload {
            package: pkg.name.clone(),
            dir: partial.path().to_owned(),
        });
    }
    let sha256 = verify(pkg, &downloaded)?;
    fs::rename(&downloaded, &target).map_err(|source| DebianError::Io {
        path: target.clone(),
        source,
    })?;
    Ok((target, sha256))
}

/// Hashes the file and, when apt knows the expected checksum, compares.
fn verify(pkg: &AptPackage, path: &Path) -> Result<String, DebianError> {
    let actual = hash::sha256_file(path).map_err(|source| DebianError::Io {
        path: path.to_owned(),
        source,
    })?;
    match &pkg.sha256 {
        Some(expected) if &actual != expected => Err(DebianError::ChecksumMismatch {
            path: path.to_owned(),
            expected: expected.clone(),
            actual,
        }),
        _ => Ok(actual),
    }
}

/// Reads `Package`, `Version` and `Architecture` from a `.deb` file.
pub fn deb_package(deb: &Path) -> Result<AptPackage, DebianError> {
    if !deb.is_file() {
        return Err(DebianError::DebNotFound(deb.to_owned()));
    }
    let path = deb.to_string_lossy();
    let out = run(
        "dpkg-deb",
        &["-f", &path, "Package", "Version", "Architecture"],
        None,
    )?;
    let get = |f: &'static str| {
        field(&out, f).ok_or_else(|| DebianError::MissingField {
            package: path.to_string(),
            field: f,
        })
    };
    Ok(AptPackage {
        name: get("Package")?,
        version: get("Version")?,
        architecture: get("Architecture")?,
        sha256: None,
    })
}

/// Unpacks a `.deb`'s files (not its maintainer scripts) into `dest`.
pub fn unpack(deb: &Path, dest: &Path) -> Result<(), DebianError> {
    if !deb.is_file() {
        return Err(DebianError::DebNotFound(deb.to_owned()));
    }
    run(
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &dest.to_string_lossy()],
        None,
    )
    .map(drop)
}

fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, DebianError> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    log::debug!("running {program} {}", args.join(" "));
    let out = cmd.output().map_err(|source| DebianError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(DebianError::CommandFailed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_and_search_results_are_read() {
        assert_eq!(upstream_version("6.12.118-1~deb12u1"), "6.12.118");
        assert_eq!(upstream_version("1:2.3-4-5"), "2.3-4");
        assert_eq!(upstream_version("6.12"), "6.12");
        assert_eq!(
            search_names(
                "linux-image-6.12.90+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)\n\
                 linux-image-6.12.90+deb12.1-cloud-amd64 - Linux 6.12 (signed)\n\n"
            ),
            vec![
                "linux-image-6.12.90+deb12-cloud-amd64".to_string(),
                "linux-image-6.12.90+deb12.1-cloud-amd64".to_string()
            ]
        );
    }

    #[test]
    fn picks_the_kernel_out_of_depends() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            kernel_dependency(
                "initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-9-cloud-amd64"
            ),
            Some(("linux-image-6.1.0-9-cloud-amd64".into(), None))
        );
        assert_eq!(kernel_dependency("libc6 (>= 2.36)"), None);
    }

    #[test]
    fn reads_fields_of_the_first_stanza_only() {
        let text =
            "Package: a\nVersion: 1:2.0-1\nDescription: x\n more\n\nPackage: b\nVersion: 3\n";
        assert_eq!(field(text, "Version").as_deref(), Some("1:2.0-1"));
        assert_eq!(field(text, "SHA256"), None);
        let pkg = AptPackage {
            name: "a".into(),
            version: "1:2.0-1".into(),
            architecture: "amd64".into(),
            sha256: None,
        };
        assert_eq!(pkg.deb_file_name(), "a_1%3a2.0-1_amd64.deb");
    }

    #[test]
    fn missing_deb_is_named() {
        let err = deb_package(Path::new("/nonexistent/kernel.deb")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Kernel package /nonexistent/kernel.deb does not exist"
        );
    }
}
