//! The virtiofsd jail's rootfs (an overlay of idmapped layers, `shimv2/overlay.rs`) on
//! kernels older than 6.15, which take no detached mount as an overlay layer: Debian's
//! 6.1 (an L1 of its own), its layers on an ext4 loop device (6.1 idmaps ext4, not
//! tmpfs), and Debian's 6.12 (an L1 of its own), on tmpfs, as a node's /run is. On a
//! host with hardware KVM the tests run where they are, and check whichever method that
//! kernel takes.

use std::os::unix::fs::MetadataExt;

mod ctr_common;

use ctr_common::*;

use std::path::Path;

use cocoon_integration::loopdev::{Ext4, Tmpfs};
use cocoon_nested::testing::{hardware_kvm_in, Place, IN_L1_ENV, NOTE_PREFIX};
use cocoon_nested::L1Kernel;
use cocoon_shim::hypervisor::userns::{PodUserns, IDS_PER_POD};
use cocoon_shim::shimv2::overlay::{self, Method};

/// The running kernel's major and minor version.
fn kernel_version() -> (u32, u32) {
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    let mut parts = release.split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => panic!("cannot read the kernel's version from {release:?}"),
    }
}

/// Inside L1, that it runs the kernel asked for (a harness that booted another would
/// make the test prove nothing).
fn assert_l1_runs(major_minor: (u32, u32)) {
    if std::env::var_os(IN_L1_ENV).is_some() {
        assert_eq!(kernel_version(), major_minor, "L1's kernel");
    }
}

/// Inside L1, that it runs a kernel before 6.15: Debian's cloud kernel of this host's
/// release (6.1 on Debian 12), whatever `COCOON_L1_KERNEL` says for other tests.
fn assert_l1_is_older() {
    if std::env::var_os(IN_L1_ENV).is_some() {
        assert!(
            kernel_version() < (6, 15),
            "L1's kernel: {:?}",
            kernel_version()
        );
    }
}

#[test]
fn an_overlay_of_idmapped_layers_on_an_older_kernel_in_l1() {
    let test = "an_overlay_of_idmapped_layers_on_an_older_kernel_in_l1";
    if hardware_kvm_in(test, L1Kernel::Image) == Place::Done {
        return;
    }
    assert_l1_is_older();
    let fs = Ext4::new(16 << 20).unwrap();
    overlay_of_idmapped_layers_on(&fs.mnt);
}

/// The same on 6.12, whose tmpfs can be idmapped but which still refuses a layer by
/// descriptor: `FSCONFIG_SET_FD` takes no O_PATH descriptor there (EBADF, where 6.1
/// says EOPNOTSUPP). Found by this test: the shim fell back only on EINVAL and
/// EOPNOTSUPP, so every jailed pod failed on 6.12.
#[test]
fn an_overlay_of_idmapped_layers_on_tmpfs_on_linux_6_12_in_l1() {
    let test = "an_overlay_of_idmapped_layers_on_tmpfs_on_linux_6_12_in_l1";
    if hardware_kvm_in(test, L1Kernel::Linux612) == Place::Done {
        return;
    }
    assert_l1_runs((6, 12));
    let fs = Tmpfs::new(16 << 20).unwrap();
    overlay_of_idmapped_layers_on(&fs.mnt);
}

/// Makes an overlay of idmapped layers in `dir` as the shim makes a pod's rootfs, by the
/// method this kernel takes, and checks its owners and writes.
fn overlay_of_idmapped_layers_on(dir: &Path) {
    let version = kernel_version();
    let expected = if version >= (6, 15) {
        Method::Descriptors
    } else {
        Method::ScratchPaths
    };
    println!(
        "{NOTE_PREFIX}Linux {}.{}: overlay layers by {expected:?}",
        version.0, version.1
    );

    let p = |s: &str| dir.join(s);
    for d in ["lower", "snap/fs", "snap/work", "target"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    std::fs::write(p("lower/root-file"), "r").unwrap();
    std::fs::write(p("lower/user-file"), "u").unwrap();
    std::os::unix::fs::lchown(p("lower/user-file"), Some(1000), Some(1000)).unwrap();
    let o = overlay::parse(&[
        format!("lowerdir={}", p("lower").display()),
        format!("upperdir={}", p("snap/fs").display()),
        format!("workdir={}", p("snap/work").display()),
    ])
    .unwrap();
    let base = 1_500_393_216;
    let ns = PodUserns::create(base, IDS_PER_POD).unwrap();

    if expected == Method::ScratchPaths {
        // Why the other method exists: this kernel refuses detached layers.
        let e = overlay::mount_idmapped_by(&o, &ns, None, Some(Method::Descriptors))
            .expect_err("a detached layer taken by a kernel older than 6.15");
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ),
            "{e}"
        );
    }
    let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // As the shim makes a pod's rootfs: the method is the kernel's to decide.
    let m = overlay::mount_idmapped(&o, &ns, None)
        .unwrap_or_else(|e| panic!("an overlay of idmapped layers on Linux {version:?}: {e}"));
    assert_eq!(overlay::last_method(), Some(expected));
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        before,
        "making the overlay left mounts in this namespace"
    );
    let target = nix::fcntl::open(
        &p("target"),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    cocoon_shim::shimv2::share::attach(&m, &target).unwrap();
    drop(m);
    let uid = |f: &str| {
        std::fs::symlink_metadata(p("target").join(f))
            .unwrap()
            .uid()
    };
    assert_eq!(uid("root-file"), base);
    assert_eq!(uid("user-file"), base + 1000);
    // The namespace's root (the jailed virtiofsd) writes as the guest's root would.
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.current_dir(p("target"))
        .args(["-c", "echo x > new && chown 1000:1000 new && mkdir d"]);
    ns.enter_as_root(&mut cmd, 1024);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async { cmd.status().await }).unwrap();
    assert!(
        status.success(),
        "writes through the overlay as the pod's root"
    );
    nix::mount::umount2(&p("target"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let disk = |f: &str| std::fs::symlink_metadata(p(f)).unwrap();
    assert_eq!(disk("snap/fs/new").uid(), 1000);
    assert_eq!(disk("snap/fs/d").uid(), 0);
}

/// A pod on cocoon-vmm with the virtiofsd jail asked for, on a kernel older than 6.15
/// (L1's 6.1), with containerd's snapshots, the shim's run directory and the volume on
/// ext4 (6.1 idmaps ext4, not tmpfs): virtiofsd runs as root of a user namespace of the
/// pod's own, and the container sees and writes the owners runc's does.
#[test]
fn cocoon_vmm_jails_virtiofsd_on_an_older_kernel() {
    let test = "cocoon_vmm_jails_virtiofsd_on_an_older_kernel";
    if hardware_kvm_in(test, L1Kernel::Image) == Place::Done {
        return;
    }
    assert_l1_is_older();
    let fs = Ext4::new(512 << 20).unwrap();
    jailed_pod_with_its_files_on(&fs.mnt);
    drop(fs);
}

/// The same on 6.12, everything on tmpfs.
#[test]
fn cocoon_vmm_jails_virtiofsd_on_tmpfs_on_linux_6_12() {
    let test = "cocoon_vmm_jails_virtiofsd_on_tmpfs_on_linux_6_12";
    if hardware_kvm_in(test, L1Kernel::Linux612) == Place::Done {
        return;
    }
    assert_l1_runs((6, 12));
    let fs = Tmpfs::new(1 << 30).unwrap();
    jailed_pod_with_its_files_on(&fs.mnt);
    drop(fs);
}

/// A jailed-virtiofsd pod on cocoon-vmm whose containerd, run directory and volumes are
/// in `dir` (the temporary directory for this process).
fn jailed_pod_with_its_files_on(dir: &Path) {
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe { std::env::set_var("TMPDIR", dir) };
    // `cocoon check` probes there (its scratch directory is the temporary one).
    let line = cocoon_shim::check::virtiofsd_jail();
    let older = kernel_version() < (6, 15);
    assert!(line.starts_with("virtiofsd jail: yes"), "{line}");
    assert_eq!(line.contains("throwaway mount namespace"), older, "{line}");
    let env = env_with(
        "hypervisor = \"cocoon-vmm\"\n",
        "[jail]\nvirtiofsd = true\n",
    );
    owners_match_runc(&env);
    virtiofsd_is_jailed(&env);
    assert_clean(&env);
    drop(env);
}
