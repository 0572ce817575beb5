//! Cocoon's own guest kernel, built from Debian's `linux-source-6.12` with the config
//! fragment `rootfs/kernel/cocoon.config` merged over `make tinyconfig` (after the small
//! patches in `rootfs/kernel/patches`, see `PATCHES`): everything a pod
//! VM uses built in, nothing else probed, so the kernel boots without looking for
//! hardware a microVM does not have. The one module an image takes, `virtio_blk`, is
//! what the agent loads when a container first names a block device (the disk slots a
//! VM boots with would otherwise be probed on every boot); the config's defaults make
//! a few others (`efivarfs`, `x86_pkg_temp_thermal`) that no image asks for.
//!
//! The result (`vmlinuz`, the same kernel as a PVH-bootable ELF `vmlinux` with its
//! symbols stripped, the kernel's `modules.builtin`, its modules under `modules/`, its
//! release) is cached under
//! `<cache>/kernels/<key>`, where the key hashes the source package, the fragment, the
//! patches and this recipe: a build happens once per change of any of them, then every image build
//! reuses it. A fragment option the kernel does not honour (a missing dependency, a
//! misspelt name) fails the build naming it, rather than quietly booting without it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::debian::{self, AptPackage, DebianError};
use crate::hash;

/// The Debian package with the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The config fragment, merged over `tinyconfig`.
pub const FRAGMENT: &str = include_str!("../kernel/cocoon.config");
/// Our changes to the source, applied in order before configuring (`patch -p1`). Each
/// says in itself why it is there; part of the cache key.
/// - `lapic_timer_hz=`: the VMM gives the local APIC timer's rate, so a TCG guest's boot
///   skips the timer's 100 ms calibration (`qemu.rs` passes QEMU's 1 GHz).
pub const PATCHES: &[(&str, &str)] = &[(
    "0001-lapic-timer-hz.patch",
    include_str!("../kernel/patches/0001-lapic-timer-hz.patch"),
)];
/// What the steps below do; part of the cache key, so a change rebuilds.
const RECIPE: &str = "patches + tinyconfig + merge_config -m cocoon.config + olddefconfig + \
     bzImage, stripped vmlinux, modules; v4";

#[derive(Debug, Error)]
pub enum KbuildError {
    #[error("Failed to fetch {SOURCE_PACKAGE}")]
    Debian(#[from] DebianError),
    #[error("Failed to {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed in {}; its output ends with:\n{tail}", dir.display())]
    Step {
        command: String,
        dir: PathBuf,
        tail: String,
    },
    #[error(
        "The kernel did not take these options of rootfs/kernel/cocoon.config (a missing \
         dependency or a misspelt name): {}",
        .0.join(", ")
    )]
    NotHonoured(Vec<String>),
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    pub vmlinuz: PathBuf,
    /// The same kernel uncompressed, an ELF with the PVH entry note: VMMs start it in
    /// 32-bit protected mode directly (no real-mode setup, no decompression).
    pub vmlinux: PathBuf,
    /// The kernel's `modules.builtin` (every driver built in), for module resolution.
    pub modules_builtin: PathBuf,
    /// Its loadable modules (`<name>.ko`), stripped of debug info.
    pub modules: PathBuf,
    pub release: String,
    pub source: AptPackage,
    pub source_deb: PathBuf,
    pub source_sha256: String,
    /// The cache key: source, fragment and recipe.
    pub key: String,
}

/// The `CONFIG_…` assignments of a config text (`# CONFIG_X is not set` as `n`).
pub fn assignments(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    m.insert(name.to_owned(), "n".to_owned());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                m.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    m
}

/// The fragment's options that `config` (a final `.config`) does not have as asked.
pub fn not_honoured(fragment: &str, config: &str) -> Vec<String> {
    let have = assignments(config);
    assignments(fragment)
        .into_iter()
        .filter(|(k, want)| {
            let got = have.get(k).map(String::as_str).unwrap_or("n");
            got != want
        })
        .map(|(k, want)| {
            let got = have.get(&k).map(String::as_str).unwrap_or("not set");
            format!("{k}={want} (got {got})")
        })
        .collect()
}

/// The cache key of a build from the source package with this sha256.
pub fn cache_key(source_sha256: &str) -> String {
    let mut text = format!("{source_sha256}\n{RECIPE}\n{FRAGMENT}");
    for (name, patch) in PATCHES {
        text.push_str(&format!("\n{name}\n{patch}"));
    }
    hash::sha256_hex(text.as_bytes())[..16].to_owned()
}

/// Builds the kernel (or reuses the cached build) with `jobs` parallel jobs.
pub fn build(
    downloads: &Path,
    kernels: &Path,
    scratch: &Path,
    jobs: usize,
) -> Result<BuiltKernel, KbuildError> {
    let pkg = debian::resolve_package(SOURCE_PACKAGE)?;
    let (deb, sha256) = debian::fetch(&pkg, downloads)?;
    let key = cache_key(&sha256);
    let out = kernels.join(&key);
    let built = |release: String| BuiltKernel {
        vmlinuz: out.join("vmlinuz"),
        vmlinux: out.join("vmlinux"),
        modules_builtin: out.join("modules.builtin"),
        modules: out.join("modules"),
        release,
        source: pkg.clone(),
        source_deb: deb.clone(),
        source_sha256: sha256.clone(),
        key: key.clone(),
    };
    if let Ok(release) = fs::read_to_string(out.join("release")) {
        if out.join("vmlinuz").is_file()
            && out.join("vmlinux").is_file()
            && out.join("modules").is_dir()
        {
            log::info!("reusing the kernel built in {}", out.display());
            return Ok(built(release.trim().to_owned()));
        }
    }
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| KbuildError::Io { what, path, source }
    };
    fs::create_dir_all(scratch).map_err(io_err("create", scratch))?;
    let work = tempfile::Builder::new()
        .prefix("kbuild-")
        .tempdir_in(scratch)
        .map_err(io_err("create a directory in", scratch))?;
    // Said whatever the log level: minutes with no output would look like a hang.
    eprintln!(
        "building the guest kernel from {} {} (once per change of rootfs/kernel/; \
         about 6 minutes on 2 cores)",
        pkg.name, pkg.version
    );
    debian::unpack(&deb, work.path())?;
    let tarball = work.path().join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
    run(work.path(), "tar", &["-xf", &tarball.to_string_lossy()])?;
    let src = work.path().join(SOURCE_PACKAGE);
    for (name, patch) in PATCHES {
        let file = work.path().join(name);
        fs::write(&file, patch).map_err(io_err("write", &file))?;
        run(
            &src,
            "patch",
            &["-p1", "--forward", "--batch", "-i", &file.to_string_lossy()],
        )?;
    }
    let jobs = format!("-j{}", jobs.max(1));
    run(&src, "make", &["tinyconfig"])?;
    let fragment = work.path().join("cocoon.config");
    fs::write(&fragment, FRAGMENT).map_err(io_err("write", &fragment))?;
    run(
        &src,
        "sh",
        &[
            "scripts/kconfig/merge_config.sh",
            "-m",
            ".config",
            &fragment.to_string_lossy(),
        ],
    )?;
    run(&src, "make", &["olddefconfig"])?;
    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err("read", &config_path))?;
    let missing = not_honoured(FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(KbuildError::NotHonoured(missing));
    }
    run(&src, "make", &[&jobs, "bzImage", "modules"])?;
    let release = run(&src, "make", &["-s", "kernelrelease"])?
        .trim()
        .to_owned();

    // Into place in one rename: a half-written cache entry is never reused.
    fs::create_dir_all(kernels).map_err(io_err("create", kernels))?;
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(kernels)
        .map_err(io_err("create a directory in", kernels))?;
    let copy = |from: &Path, name: &str| {
        let to = staging.path().join(name);
        fs::copy(from, &to).map(drop).map_err(io_err("copy", from))
    };
    copy(&src.join("arch/x86/boot/bzImage"), "vmlinuz")?;
    // Symbols only: the loadable segments and the PVH note stay (checked below).
    let vmlinux = staging.path().join("vmlinux");
    run(
        &src,
        "objcopy",
        &["--strip-all", "vmlinux", &vmlinux.to_string_lossy()],
    )?;
    if !has_pvh_note(&fs::read(&vmlinux).map_err(io_err("read", &vmlinux))?) {
        return Err(KbuildError::NotHonoured(vec![
            "PVH (no PVH entry note in vmlinux)".into(),
        ]));
    }
    match src.join("modules.builtin") {
        p if p.is_file() => copy(&p, "modules.builtin")?,
        p => fs::write(staging.path().join("modules.builtin"), "").map_err(io_err("write", &p))?,
    }
    let modules = staging.path().join("modules");
    fs::create_dir(&modules).map_err(io_err("create", &modules))?;
    for ko in find_modules(&src).map_err(io_err("read", &src))? {
        let name = ko
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let to = modules.join(&name);
        run(
            &src,
            "objcopy",
            &[
                "--strip-debug",
                &ko.to_string_lossy(),
                &to.to_string_lossy(),
            ],
        )?;
    }
    copy(&config_path, "config")?;
    fs::write(staging.path().join("release"), &release).map_err(io_err("write", staging.path()))?;
    let staged = staging.keep();
    if let Err(e) = fs::rename(&staged, &out) {
        // Another build got there first: theirs is as good.
        let _ = fs::remove_dir_all(&staged);
        if !out.join("vmlinuz").is_file() {
            return Err(io_err("move the build into", &out)(e));
        }
    }
    log::info!("guest kernel {release} built into {}", out.display());
    Ok(built(release))
}

/// The `.ko` files a build made under `dir` (none outside the source's own tree).
fn find_modules(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            found.extend(find_modules(&path)?);
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "ko") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Whether an ELF kernel carries the Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, type
/// 18, owner "Xen") that PVH loaders look for: a check of our own build, not a parser
/// (the VMMs parse it properly).
pub fn has_pvh_note(elf: &[u8]) -> bool {
    // A note header as it lies in the file: namesz 4, descsz (4 or 8), type 18, "Xen\0".
    elf.starts_with(b"\x7fELF")
        && elf.windows(16).any(|w| {
            w[..4] == [4, 0, 0, 0]
                && matches!(w[4..8], [4, 0, 0, 0] | [8, 0, 0, 0])
                && w[8..] == [18, 0, 0, 0, b'X', b'e', b'n', 0]
        })
}

/// Runs `program args` in `dir`; its stdout on success, the tail of its output otherwise.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String, KbuildError> {
    let command = format!("{program} {}", args.join(" "));
    log::info!("kernel build: {command}");
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_USER", "cocoon")
        .env("KBUILD_BUILD_HOST", "cocoon")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KbuildError::Step {
            command: command.clone(),
            dir: dir.to_owned(),
            tail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    Err(KbuildError::Step {
        command,
        dir: dir.to_owned(),
        tail: lines[lines.len().saturating_sub(20)..].join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_the_kernel_dropped_are_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n# CONFIG_C is not set\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=32\nCONFIG_C=y\n";
        assert_eq!(
            not_honoured(fragment, config),
            [
                "CONFIG_B=y (got n)",
                "CONFIG_C=n (got y)",
                "CONFIG_N=64 (got 32)"
            ]
        );
        assert!(not_honoured(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n").is_empty());
        assert_eq!(
            not_honoured("CONFIG_Z=y\n", ""),
            ["CONFIG_Z=y (got not set)"]
        );
    }

    #[test]
    fn the_fragment_asks_for_what_a_pod_needs() {
        let f = assignments(FRAGMENT);
        for k in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_MEMCG",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_PVH",
            "CONFIG_ACPI",
            // A pod's containers' own networking: bridges, iptables.
            "CONFIG_BRIDGE",
            "CONFIG_IP_NF_NAT",
            "CONFIG_NFT_NAT",
        ] {
            assert_eq!(f.get(k).map(String::as_str), Some("y"), "{k}");
        }
        // The block driver is a module, loaded when first needed: the disk slots a VM
        // boots with are then not probed at every boot.
        assert_eq!(f.get("CONFIG_VIRTIO_BLK").map(String::as_str), Some("m"));
    }

    #[test]
    fn the_pvh_note_is_found_only_where_it_is() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend_from_slice(&[0; 60]);
        assert!(!has_pvh_note(&elf));
        let note = [4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        elf.extend_from_slice(&note);
        assert!(has_pvh_note(&elf));
        // Another Xen note type is not the entry point.
        let other = [4, 0, 0, 0, 8, 0, 0, 0, 17, 0, 0, 0, b'X', b'e', b'n', 0];
        let mut elf2 = b"\x7fELF".to_vec();
        elf2.extend_from_slice(&other);
        assert!(!has_pvh_note(&elf2));
        assert!(!has_pvh_note(&note));
    }

    #[test]
    fn the_key_follows_the_source() {
        assert_ne!(cache_key("a"), cache_key("b"));
        assert_eq!(cache_key("a"), cache_key("a"));
        assert_eq!(cache_key("a").len(), 16);
    }
}
