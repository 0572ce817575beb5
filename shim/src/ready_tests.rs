use std::path::Path;

use super::*;
use crate::check;

/// A host as `check` would describe it, with the facts the verdict reads set by hand.
fn host(kvm: KvmKind, root: bool, jail: Result<(), String>) -> HostReport {
    HostReport {
        kvm,
        vhost_vsock: false,
        sev_snp: false,
        tdx: false,
        sev_snp_obstacles: Vec::new(),
        tdx_obstacles: Vec::new(),
        cgroup: "v2",
        shmem_thp: None,
        huge_tmpfs: Err("no hugetlb here".into()),
        tools: Vec::new(),
        verdicts: Vec::new(),
        confinement: Vec::new(),
        root,
        seccomp: true,
        dev_kvm: Some((0o20660, 108)),
        virtiofsd_jail: jail,
        pods: None,
    }
}

/// The shell script `body` as the executable `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A stand-in virtiofsd in `dir` whose `--help` prints `help`.
fn fake_virtiofsd(dir: &Path, help: &str) -> std::path::PathBuf {
    script(dir, "virtiofsd", &format!("cat <<'EOF'\n{help}\nEOF"))
}

/// A config from `extra` whose image, backends and virtiofsd exist (files that are not
/// run, but for a virtiofsd that lists every option pods pass) where `extra` does not
/// name them.
fn config(image: &Path, extra: &str) -> Result<Config, crate::config::ConfigError> {
    std::fs::write(image.join("vmlinuz"), "kernel").unwrap();
    std::fs::write(image.join("initramfs.cpio"), "initrd").unwrap();
    let mut c = Config::parse(extra)?;
    c.paths.image_dir = image.to_owned();
    if c.paths.virtiofsd.as_os_str().is_empty() {
        c.paths.virtiofsd = fake_virtiofsd(image, &hypervisor::VIRTIOFSD_OPTIONS.join("\n"));
    }
    if c.paths.vmm_binary.as_os_str().is_empty() {
        c.paths.vmm_binary = "/bin/true".into();
    }
    if c.qemu.binary.is_relative() {
        c.qemu.binary = "/bin/true".into();
    }
    Ok(c)
}

fn verdict(image: &Path, extra: &str, host: &HostReport) -> PodsReady {
    pods(
        Some("/etc/cocoon/config.toml".into()),
        &config(image, extra),
        host,
    )
}

/// This machine's KVM, so that `hypervisor::from_config` (which asks the host itself)
/// and the faked facts agree.
fn here() -> KvmKind {
    check::kvm_kind()
}

#[test]
fn a_node_with_everything_is_ready_and_says_with_what() {
    let d = tempfile::tempdir().unwrap();
    let v = verdict(d.path(), "", &host(here(), true, Ok(())));
    assert!(v.ready(), "{v}");
    let backend = v.backend.as_deref().unwrap();
    match here() {
        KvmKind::Hardware => assert!(backend.starts_with("cocoon-vmm"), "{backend}"),
        _ => assert!(backend.starts_with("QEMU with TCG"), "{backend}"),
    }
    let shown = v.to_string();
    assert!(
        shown.starts_with("pods:           ready with the config /etc/cocoon/config.toml: "),
        "{shown}"
    );
}

#[test]
fn a_config_that_cannot_be_read_is_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let v = verdict(d.path(), "bogus_key = 1", &host(here(), true, Ok(())));
    assert!(!v.ready());
    assert_eq!(v.problems.len(), 1, "{v}");
    assert!(v.problems[0].contains("bogus_key"), "{v}");
    assert!(v.backend.is_none());
}

#[test]
fn a_missing_image_or_virtiofsd_is_named() {
    let d = tempfile::tempdir().unwrap();
    let c = config(d.path(), "");
    std::fs::remove_file(d.path().join("initramfs.cpio")).unwrap();
    let v = pods(None, &c, &host(here(), true, Ok(())));
    let missing = d.path().join("initramfs.cpio").display().to_string();
    assert!(
        v.problems.iter().any(|p| p.contains(&missing)),
        "the missing initrd is not named: {v}"
    );
    assert!(v.to_string().contains("with the built-in defaults"), "{v}");

    let v = verdict(
        d.path(),
        "[paths]\nvirtiofsd = \"/nonexistent/virtiofsd\"",
        &host(here(), true, Ok(())),
    );
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("/nonexistent/virtiofsd")),
        "{v}"
    );
}

#[test]
fn the_jail_needs_root_unless_it_is_off() {
    let d = tempfile::tempdir().unwrap();
    let not_root = host(here(), false, Err("not root".into()));
    let v = verdict(d.path(), "", &not_root);
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("[jail] enabled") && p.contains("root")),
        "{v}"
    );
    // The virtiofsd jail is named too, with where it was tried.
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("[jail] virtiofsd") && p.contains("/run/cocoon")),
        "{v}"
    );
    let v = verdict(d.path(), "[jail]\nenabled = false", &not_root);
    assert!(v.ready(), "{v}");
}

#[test]
fn a_virtiofsd_jail_the_kernel_refuses_is_a_reason_unless_it_is_off() {
    let d = tempfile::tempdir().unwrap();
    let refused = host(
        here(),
        true,
        Err("an overlay of idmapped layers: EINVAL".into()),
    );
    let v = verdict(d.path(), "", &refused);
    assert_eq!(v.problems.len(), 1, "{v}");
    assert!(v.problems[0].contains("EINVAL"), "{v}");
    let v = verdict(d.path(), "[jail]\nvirtiofsd = false", &refused);
    assert!(v.ready(), "{v}");
}

#[test]
fn cocoon_vmm_asked_for_without_hardware_kvm_is_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let v = verdict(
        d.path(),
        "hypervisor = \"cocoon-vmm\"",
        &host(here(), true, Ok(())),
    );
    if here() == KvmKind::Hardware {
        assert!(v.ready(), "{v}");
    } else {
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("needs hardware virtualization")),
            "{v}"
        );
    }
}

#[test]
fn qemu_with_kvm_on_pvm_or_a_kvm_device_a_jail_cannot_open_is_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let v = verdict(
        d.path(),
        "hypervisor = \"qemu\"\n[qemu]\naccel = \"kvm\"",
        &host(KvmKind::Pvm, true, Ok(())),
    );
    assert!(v.problems.iter().any(|p| p.contains("PVM")), "{v}");

    let mut hw = host(KvmKind::Hardware, true, Ok(()));
    hw.dev_kvm = Some((0o20600, 0));
    let v = verdict(d.path(), "hypervisor = \"qemu\"", &hw);
    assert!(
        v.backend.as_deref().unwrap().starts_with("QEMU with KVM"),
        "{v}"
    );
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("/dev/kvm has mode 600")),
        "{v}"
    );
    let shown = v.to_string();
    assert!(
        shown.contains("NOT READY") && shown.contains("\n  - "),
        "{shown}"
    );
}

/// Both VMMs put guest RAM on a huge-page tmpfs of their own: `on` where none can be
/// made is a reason whichever runs the pods; `auto` falls back to a memfd.
#[test]
fn huge_pages_on_without_a_huge_page_tmpfs_is_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let v = verdict(
        d.path(),
        "hypervisor = \"qemu\"\n[qemu]\naccel = \"tcg\"\n[vm]\nhuge_pages = \"on\"",
        &host(here(), true, Ok(())),
    );
    assert!(!v.ready(), "{v}");
    assert!(
        v.problems.len() == 1
            && v.problems[0].contains("vm.huge_pages = \"on\"")
            && v.problems[0].contains("no hugetlb here"),
        "{v}"
    );
    let v = verdict(d.path(), "", &host(here(), true, Ok(())));
    assert!(v.ready(), "{v}");
}

/// A virtiofsd without the options pods pass (QEMU's old C one, which older
/// distributions install as /usr/libexec/virtiofsd) would fail every pod: it is named,
/// with what it lacks. The virtiofsd this host has lacks none of them.
#[test]
fn a_virtiofsd_without_the_options_pods_pass_is_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let c_help = "Usage: virtiofsd [options]\n    --socket-path=PATH\n    --fd=FDNUM\n    \
                  -o source=PATH\n    --rlimit-nofile=<num>\n    --print-capabilities";
    let old = fake_virtiofsd(d.path(), c_help);
    let toml = format!("[paths]\nvirtiofsd = \"{}\"", old.display());
    let v = verdict(d.path(), &toml, &host(here(), true, Ok(())));
    let named = v
        .problems
        .iter()
        .find(|p| p.contains(&old.display().to_string()))
        .unwrap_or_else(|| panic!("the old virtiofsd is not named: {v}"));
    let lacks = hypervisor::virtiofsd_lacks(&old).unwrap();
    assert_eq!(
        lacks,
        [
            "--shared-dir",
            "--sandbox",
            "--announce-submounts",
            "--cache",
            "--log-level",
            "--inode-file-handles"
        ]
    );
    assert!(named.contains(&lacks.join(", ")), "{named}");

    let real = find_binary("virtiofsd", Path::new(""));
    match real {
        Ok(real) => assert_eq!(
            hypervisor::virtiofsd_lacks(&real).unwrap(),
            Vec::<&str>::new(),
            "{}",
            real.display()
        ),
        Err(e) => cocoon_nested::testing::missing(
            "a_virtiofsd_without_the_options_pods_pass_is_a_reason",
            &format!("no virtiofsd on this host: {e}"),
        ),
    }
}

/// A virtiofsd that cannot tell its options (it fails, say for a missing library, or it
/// never answers) is named with that, not with every option it "lacks", and the check
/// does not wait on it past its deadline.
#[test]
fn a_virtiofsd_that_fails_or_hangs_is_named_for_that() {
    let d = tempfile::tempdir().unwrap();
    let broken = script(
        d.path(),
        "broken",
        "echo 'error while loading shared libraries: libseccomp.so.2' >&2; exit 127",
    );
    let err = hypervisor::virtiofsd_lacks(&broken).unwrap_err();
    assert!(
        err.contains("127") && err.contains("libseccomp.so.2"),
        "{err}"
    );
    assert!(!err.contains("--sandbox"), "{err}");

    let hangs = script(d.path(), "hangs", "exec sleep 600");
    let started = std::time::Instant::now();
    let err = hypervisor::virtiofsd_lacks_within(&hangs, std::time::Duration::from_millis(300))
        .unwrap_err();
    assert!(err.contains("no answer"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    let toml = format!("[paths]\nvirtiofsd = \"{}\"", broken.display());
    let v = verdict(d.path(), &toml, &host(here(), true, Ok(())));
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains(&broken.display().to_string()) && p.contains("libseccomp")),
        "{v}"
    );
}
