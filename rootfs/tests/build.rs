//! Builds real images from Debian's cloud kernel. The `.deb` is fetched with apt once into
//! a download cache under the target dir and reused offline afterwards; where `dpkg-deb`
//! is missing (not a Debian host) these tests say so and pass without checking anything,
//! except under `CI=true`, where a missing prerequisite is a failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cocoon_rootfs::{build, cpio, hash, modinfo, BuildOptions, Image, KernelSource, Manifest};

fn have_dpkg() -> bool {
    let found = Command::new("dpkg-deb").arg("--version").output().is_ok();
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !found && ci {
        panic!("dpkg-deb is not installed, so no Debian kernel package can be read (CI=true)");
    }
    if !found {
        eprintln!("SKIPPED: dpkg-deb is not installed, so no Debian kernel package can be read");
    }
    found
}

/// The kernel `.deb`, downloaded (through the library, as `cocoon image build` does) once.
fn kernel_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rootfs-test-cache");
        let agent = write_agent(&cache);
        let mut opts = BuildOptions::new(KernelSource::DebianCloud, agent);
        opts.cache_dir = Some(cache.clone());
        build(&opts).expect("build from linux-image-cloud-amd64");
        let mut debs: Vec<PathBuf> = fs::read_dir(cache.join("downloads"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        debs.pop().expect("a downloaded kernel package")
    })
    .clone()
}

/// Any file will do as the agent: the builder never runs it.
fn write_agent(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("agent");
    fs::write(
        &path,
        b"#!/bin/sh\n# stand-in for the cocoon agent\nexec /bin/sh\n",
    )
    .unwrap();
    path
}

fn build_into(cache: &Path, agent: &Path) -> Image {
    let mut opts = BuildOptions::new(KernelSource::DebFile(kernel_deb()), agent);
    opts.cache_dir = Some(cache.to_owned());
    build(&opts).unwrap()
}

fn sha(path: &Path) -> String {
    hash::sha256_file(path).unwrap()
}

#[test]
fn same_inputs_give_the_same_bytes_in_another_cache() {
    if !have_dpkg() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = write_agent(tmp.path());
    let one = build_into(&tmp.path().join("a"), &agent);
    let two = build_into(&tmp.path().join("b"), &agent);
    assert_eq!(one.id, two.id);
    assert_eq!(sha(&one.kernel), sha(&two.kernel));
    assert_eq!(sha(&one.initrd), sha(&two.initrd));
    assert_eq!(
        fs::read(&one.manifest).unwrap(),
        fs::read(&two.manifest).unwrap()
    );
    assert_eq!(
        one.id,
        hash::image_id(
            &fs::read(&one.kernel).unwrap(),
            &fs::read(&one.initrd).unwrap()
        )
    );
}

#[test]
fn initramfs_holds_agent_and_modules_in_dependency_order() {
    if !have_dpkg() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = write_agent(tmp.path());
    let image = build_into(tmp.path(), &agent);
    let manifest: Manifest = serde_json::from_slice(&fs::read(&image.manifest).unwrap()).unwrap();
    assert_eq!(manifest.id, image.id);
    assert_eq!(manifest.kernel.release, image.kernel_release);
    assert!(manifest.kernel.package.package.starts_with("linux-image-"));
    assert_eq!(
        &fs::read(&image.kernel).unwrap()[0x202..0x206],
        b"HdrS",
        "vmlinuz is a bzImage"
    );

    let entries = cpio::parse(&fs::read(&image.initrd).unwrap()).unwrap();
    let get = |name: &str| entries.iter().find(|e| e.name == name);
    let init = get("init").expect("/init");
    assert_eq!(init.data, fs::read(&agent).unwrap());
    assert_eq!(init.perm(), 0o755);
    assert!(get("dev/console").unwrap().is_char_device());

    let list = String::from_utf8(get("etc/cocoon/modules").unwrap().data.clone()).unwrap();
    let order: Vec<&str> = list.lines().map(|l| l.split(' ').next().unwrap()).collect();
    let wanted = [
        "virtio_mmio",
        "virtio_pci",
        "vmw_vsock_virtio_transport",
        "vmw_vsock_virtio_transport_common",
        "vsock",
        "virtio",
        "virtio_ring",
        "virtiofs",
        "fuse",
        "overlay",
        "virtio_blk",
        "virtio_net",
        "net_failover",
        "failover",
        "erofs",
    ];
    for name in wanted {
        assert!(
            order.contains(&name) || manifest.initramfs.builtin_modules.iter().any(|b| b == name),
            "{name} missing from {order:?}"
        );
    }
    let names: Vec<&str> = manifest
        .initramfs
        .modules
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, order);
    for (i, line) in list.lines().enumerate() {
        let (name, path) = line.split_once(' ').unwrap();
        assert_eq!(
            path,
            format!("/lib/modules/{}/{name}.ko", image.kernel_release)
        );
        let ko = get(path.trim_start_matches('/'))
            .unwrap_or_else(|| panic!("{path} not in the initramfs"));
        for dep in modinfo::parse_module(&ko.data).unwrap().depends {
            let at = order
                .iter()
                .position(|n| *n == dep)
                .unwrap_or_else(|| panic!("{dep} ({name}) missing"));
            assert!(at < i, "{dep} must load before {name}");
        }
    }
}

#[test]
fn warm_build_reuses_the_image_and_publishes_to_out() {
    if !have_dpkg() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = write_agent(tmp.path());
    let first = build_into(tmp.path(), &agent);
    let stamp = fs::metadata(&first.initrd).unwrap().modified().unwrap();
    let out = tmp.path().join("out");
    // A PVH kernel an earlier (own-kernel) image left there: not this image's, whose
    // distribution kernel is a bzImage only, so it must go.
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join(cocoon_rootfs::PVH_KERNEL_FILE), b"stale").unwrap();
    let mut opts = BuildOptions::new(KernelSource::DebFile(kernel_deb()), &agent);
    opts.cache_dir = Some(tmp.path().to_owned());
    opts.out_dir = Some(out.clone());
    let second = build(&opts).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        fs::metadata(&second.initrd).unwrap().modified().unwrap(),
        stamp,
        "image rewritten"
    );
    for name in ["vmlinuz", "initramfs.cpio", "manifest.json"] {
        assert_eq!(
            sha(&out.join(name)),
            sha(&first.initrd.with_file_name(name))
        );
    }
    assert!(!out.join(cocoon_rootfs::PVH_KERNEL_FILE).exists());
    let manifest: cocoon_rootfs::Manifest =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.kernel.pvh_file, None);
}

#[test]
fn cli_prints_the_image_as_json() {
    if !have_dpkg() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = write_agent(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_cocoon-rootfs"))
        .arg("build")
        .arg("--agent")
        .arg(&agent)
        .arg("--kernel-deb")
        .arg(kernel_deb())
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--gzip")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Image = serde_json::from_slice(&out.stdout).unwrap();
    assert!(image.initrd.ends_with("initramfs.cpio.gz"));
    assert_eq!(&fs::read(&image.initrd).unwrap()[..2], &[0x1f, 0x8b]);
}

#[test]
fn errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = write_agent(tmp.path());
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            text += &format!(": {s}");
            cur = s.source();
        }
        text
    };

    let missing_agent = tmp.path().join("no-such-agent");
    let mut opts = BuildOptions::new(
        KernelSource::DebFile(tmp.path().join("x.deb")),
        &missing_agent,
    );
    opts.cache_dir = Some(tmp.path().join("cache"));
    let err = chain(&build(&opts).unwrap_err());
    assert!(err.contains(&missing_agent.display().to_string()), "{err}");

    let bad_deb = tmp.path().join("no-such-kernel.deb");
    opts.agent = agent.clone();
    opts.kernel = KernelSource::DebFile(bad_deb.clone());
    let err = chain(&build(&opts).unwrap_err());
    assert!(err.contains(&bad_deb.display().to_string()), "{err}");

    let not_a_deb = tmp.path().join("garbage.deb");
    fs::write(&not_a_deb, b"not an ar archive").unwrap();
    opts.kernel = KernelSource::DebFile(not_a_deb.clone());
    let err = chain(&build(&opts).unwrap_err());
    assert!(err.contains("garbage.deb"), "{err}");

    if have_dpkg() {
        opts.kernel = KernelSource::DebFile(kernel_deb());
        opts.modules = vec!["virtio_mmio".into(), "no_such_module".into()];
        let err = chain(&build(&opts).unwrap_err());
        assert!(
            err.contains("Module no_such_module is neither a .ko file nor built into kernel 6."),
            "{err}"
        );
    }
}
