//! What this host offers Cocoon, and which backends can run here. Facts come
//! from /proc, /sys and /dev, never from trying to boot something.

use std::path::Path;

use serde::Serialize;

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmKind {
    /// VT-x / AMD-V: boots any guest.
    Hardware,
    /// KVM served by `kvm_pvm` (a guest itself, shadow paging): runs only
    /// simple guests; stock Linux hits emulation failures.
    Pvm,
    None,
}

/// Classifies KVM from the host's files (parameters so tests can fake them).
pub fn classify_kvm(dev_kvm: bool, cpuinfo: &str, module_dir: &Path) -> KvmKind {
    if !dev_kvm {
        return KvmKind::None;
    }
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let hw_module = module_dir.join("kvm_intel").exists() || module_dir.join("kvm_amd").exists();
    if module_dir.join("kvm_pvm").exists() {
        KvmKind::Pvm
    } else if has_flag || hw_module {
        KvmKind::Hardware
    } else {
        // /dev/kvm without VT-x/AMD-V: treat as the paravirtual kind.
        KvmKind::Pvm
    }
}

pub fn kvm_kind() -> KvmKind {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify_kvm(
        Path::new("/dev/kvm").exists(),
        &cpuinfo,
        Path::new("/sys/module"),
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    pub name: String,
    pub path: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub backend: &'static str,
    pub usable: bool,
    pub recommended: bool,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kvm: KvmKind,
    pub vhost_vsock: bool,
    pub sev_snp: bool,
    pub tdx: bool,
    /// What stands in the way of a confidential launch, per TEE (empty: nothing found;
    /// Cocoon still refuses confidential pods until its launch flow lands).
    pub sev_snp_obstacles: Vec<String>,
    pub tdx_obstacles: Vec<String>,
    pub cgroup: &'static str,
    /// `/sys/kernel/mm/transparent_hugepage/shmem_enabled`'s selected value, if any.
    pub shmem_thp: Option<String>,
    /// Whether guest RAM's own huge-page tmpfs can be made here (`vm.huge_pages`), or
    /// why not.
    pub huge_tmpfs: Result<(), String>,
    pub tools: Vec<Tool>,
    pub verdicts: Vec<Verdict>,
    /// What this host allows of the per-pod confinement (docs/security.md), one line each.
    pub confinement: Vec<String>,
    /// Whether this runs as root (jails need it).
    pub root: bool,
    /// Whether the kernel has seccomp's filter mode.
    pub seccomp: bool,
    /// `/dev/kvm`'s mode and group, where it exists.
    pub dev_kvm: Option<(u32, u32)>,
    /// Whether `[jail] virtiofsd` works where pods' shares will be, or why not.
    pub virtiofsd_jail: Result<(), String>,
    /// Whether pods with the node's config can start here (`crate::ready`); filled in
    /// by the caller that has the config.
    pub pods: Option<crate::ready::PodsReady>,
}

/// Whether a jailed QEMU, which opens `/dev/kvm` through its group, can: a group other
/// than root's with read-write access.
pub fn kvm_group_may_open(mode: u32, gid: u32) -> bool {
    mode & 0o060 == 0o060 && gid != 0
}

/// What of the per-pod confinement this host allows (pure, for tests): whether we run
/// as root (namespaces, a uid per pod), whether the kernel has seccomp, and who may open
/// `/dev/kvm` (`(mode, gid)`), which a jailed QEMU under KVM needs through a group.
pub fn confinement(root: bool, seccomp: bool, dev_kvm: Option<(u32, u32)>) -> Vec<String> {
    let mut v = Vec::new();
    v.push(if root {
        "jails: yes: QEMU, cocoon-vmm and the vsock backend run as a uid of the pod's own \
         ([jail] range), without capabilities, as PID 1 of their own PID namespace, in their \
         own mount, network, IPC and UTS namespaces with a read-only root"
            .to_string()
    } else {
        "jails: no: not root, so no namespaces and no uid per pod; pods with [jail] enabled = true \
         (the default) will not start"
            .to_string()
    });
    v.push(if seccomp {
        "seccomp: yes: QEMU's -sandbox, cocoon-vmm's and the vsock backend's own filters".into()
    } else {
        "seccomp: no: this kernel has no seccomp filter mode; confined pods will not start".into()
    });
    match dev_kvm {
        Some((mode, gid)) if kvm_group_may_open(mode, gid) => v.push(format!(
            "/dev/kvm: group {gid} may open it: a jailed QEMU under KVM gets that group"
        )),
        Some((mode, gid)) => v.push(format!(
            "/dev/kvm: mode {:o} group {gid}: a jailed QEMU under KVM could not open it; \
             give it a kvm group with read-write access (or set [jail] enabled = false)",
            mode & 0o7777
        )),
        None => {}
    }
    v
}

/// Whether a pod's virtiofsd can run as root of a user namespace of its own here
/// (`[jail] virtiofsd`): tried for real, in a scratch directory, with a namespace and an
/// overlay of idmapped layers made detached and never attached.
pub fn virtiofsd_jail() -> String {
    virtiofsd_jail_in(None)
}

/// `virtiofsd_jail`, tried on the filesystem of `dir` (the run directory, where pods'
/// shares live; its nearest existing parent if it is not there yet) where given, else
/// in the temporary directory.
pub fn virtiofsd_jail_in(dir: Option<&Path>) -> String {
    virtiofsd_jail_line(dir, &try_virtiofsd_jail(dir))
}

/// Tries what `[jail] virtiofsd` needs, in a scratch directory on `dir`'s filesystem
/// (the temporary directory's without one); nothing is left behind. `Err` says why not.
pub fn try_virtiofsd_jail(dir: Option<&Path>) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let t = match dir {
        Some(d) => {
            let existing = d.ancestors().find(|a| a.is_dir()).unwrap_or(Path::new("/"));
            tempfile::tempdir_in(existing)
                .map_err(|e| format!("a scratch directory in {}: {e}", existing.display()))?
        }
        None => tempfile::tempdir().map_err(|e| e.to_string())?,
    };
    for d in ["lower", "snap/fs", "snap/work"] {
        std::fs::create_dir_all(t.path().join(d)).map_err(|e| e.to_string())?;
    }
    let ns = crate::hypervisor::userns::PodUserns::create(
        crate::config::JailConfig::default().share_id_base,
        crate::hypervisor::userns::IDS_PER_POD,
    )
    .map_err(|e| format!("user namespace: {e}"))?;
    let p = |d: &str| t.path().join(d).display().to_string();
    let o = crate::shimv2::overlay::parse(&[
        format!("lowerdir={}", p("lower")),
        format!("upperdir={}", p("snap/fs")),
        format!("workdir={}", p("snap/work")),
    ])?;
    crate::shimv2::overlay::mount_idmapped(&o, &ns, None)
        .map(drop)
        .map_err(|e| format!("an overlay of idmapped layers: {e}"))
}

/// The `cocoon check` line for a `try_virtiofsd_jail(dir)` that gave `tried`.
pub fn virtiofsd_jail_line(dir: Option<&Path>, tried: &Result<(), String>) -> String {
    let on = match dir {
        Some(d) => format!(" (tried on {}'s filesystem)", d.display()),
        None => String::new(),
    };
    match tried {
        Ok(()) => {
            let how = match crate::shimv2::overlay::last_method() {
                Some(crate::shimv2::overlay::Method::ScratchPaths) => {
                    "; this kernel takes no detached overlay layer (Linux < 6.15), so a \
                     rootfs's layers are attached in a throwaway mount namespace"
                }
                _ => "",
            };
            format!(
                "virtiofsd jail: yes: root of a user namespace of the pod's own, over \
                 idmapped mounts of the share ([jail] virtiofsd){how}{on}"
            )
        }
        Err(e) => format!(
            "virtiofsd jail: no{on}: {e}; pods with [jail] virtiofsd = true (the default) \
             will not start (Linux >= 5.19 and filesystems with idmapped mounts are \
             needed: ext4, xfs, btrfs, tmpfs from 6.3; [jail] virtiofsd = false runs it as \
             host root)"
        ),
    }
}

/// Where the shim would find `name` when nothing configures it
/// ([`crate::hypervisor::find_binary`]).
fn which(name: &str) -> Option<std::path::PathBuf> {
    crate::hypervisor::find_binary(name, Path::new("")).ok()
}

fn tool(name: &str, version_arg: &str) -> Tool {
    let path = which(name);
    let version = path.as_ref().and_then(|p| {
        let out = std::process::Command::new(p)
            .arg(version_arg)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().next().map(|l| l.trim().to_string())
    });
    Tool {
        name: name.into(),
        path: path.map(|p| p.display().to_string()),
        version,
    }
}

/// The bracketed (selected) word of a sysfs choice file, e.g. `always [advise] never`.
pub fn selected(choice: &str) -> Option<String> {
    let start = choice.find('[')? + 1;
    let end = start + choice[start..].find(']')?;
    Some(choice[start..end].to_owned())
}

/// Whether guest RAM (a shared memfd, for vhost-user devices) can be backed by
/// transparent huge pages: cocoon-vmm asks for them with MADV_HUGEPAGE, which shmem
/// honours under `advise`, `within_size`, `always` and `force`.
pub fn shmem_thp_ok(mode: &str) -> bool {
    matches!(mode, "advise" | "within_size" | "always" | "force")
}

fn sev_snp() -> bool {
    Path::new("/dev/sev").exists()
        && std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev_snp")
            .is_ok_and(|v| v.trim() == "Y" || v.trim() == "1")
}

fn tdx() -> bool {
    std::fs::read_to_string("/sys/module/kvm_intel/parameters/tdx")
        .is_ok_and(|v| v.trim() == "Y" || v.trim() == "1")
}

/// Verdicts per backend from the facts (pure, for tests).
pub fn verdicts(kvm: KvmKind, qemu: bool, vmm: bool) -> Vec<Verdict> {
    let mut v = Vec::new();
    let (usable, why) = match (qemu, kvm) {
        (false, _) => (false, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".to_string()),
        (true, KvmKind::Hardware) => (true, "QEMU with KVM (hardware virtualization)".into()),
        (true, KvmKind::Pvm) => (true, "QEMU with TCG: /dev/kvm is PVM, which cannot boot stock Linux; expect seconds per boot".into()),
        (true, KvmKind::None) => (true, "QEMU with TCG: no /dev/kvm; expect seconds per boot".into()),
    };
    v.push(Verdict {
        backend: "qemu",
        usable,
        recommended: false,
        why,
    });
    let (usable, why) = match kvm {
        KvmKind::Hardware if !vmm => (false, "cocoon-vmm is not installed (make install)".to_string()),
        KvmKind::Hardware => (true, "hardware KVM: our own microVM monitor, the fastest and smallest path (the default hypervisor = \"auto\" picks it)".into()),
        KvmKind::Pvm => (false, "/dev/kvm is PVM, not hardware virtualization (no vmx/svm): stock Linux guests fail with emulation errors".into()),
        KvmKind::None => (false, "no /dev/kvm".into()),
    };
    v.push(Verdict {
        backend: "cocoon-vmm",
        usable,
        recommended: usable,
        why,
    });
    // One recommendation: cocoon-vmm where it runs, QEMU otherwise.
    if !usable && v[0].usable {
        v[0].recommended = true;
    }
    v
}

/// Whether pods can start from VM templates here (`[vm] templates`): cocoon-vmm saves
/// and restores VMs; QEMU 7.2 cannot save one with vhost-user devices.
pub fn templates_line(kvm: KvmKind) -> &'static str {
    match kvm {
        KvmKind::Hardware => {
            "possible: cocoon-vmm restores pods from a saved VM with [vm] templates = true"
        }
        _ => {
            "not here: they need cocoon-vmm, which needs hardware KVM; QEMU cannot save a \
             VM with vhost-user devices"
        }
    }
}

/// How a running pod's memory can grow here (`[vm] hotplug_memory`): cocoon-vmm's own
/// virtio-mem where it runs, else QEMU's, which needs the pc machine.
pub fn memory_growth_line(kvm: KvmKind) -> &'static str {
    match kvm {
        KvmKind::Hardware => {
            "possible: cocoon-vmm plugs memory as limits rise with [vm] hotplug_memory = true \
             and max_memory_mib (QEMU too, with [qemu] machine = \"pc\")"
        }
        _ => {
            "possible with QEMU's pc machine: [vm] hotplug_memory = true, max_memory_mib and \
             [qemu] machine = \"pc\" (QEMU 7.2's microvm has no room for added memory)"
        }
    }
}

pub fn report() -> HostReport {
    report_in(None)
}

/// `report`, with the virtiofsd jail tried in `run_dir` (`virtiofsd_jail_in`).
pub fn report_in(run_dir: Option<&Path>) -> HostReport {
    let kvm = kvm_kind();
    let tools = vec![
        tool("qemu-system-x86_64", "--version"),
        tool("containerd", "--version"),
        tool("ctr", "--version"),
        tool("runc", "--version"),
        tool("virtiofsd", "--version"),
        tool("cocoon-vmm", "--version"),
        tool("containerd-shim-cocoon-v2", "--version"),
        // Kubernetes pods: the pod network is carried into the VM with ip and tc, and
        // PortForward reaches the guest through an nftables redirect.
        tool("ip", "-V"),
        tool("tc", "-V"),
        tool("nft", "--version"),
    ];
    let has = |n: &str| tools.iter().any(|t| t.name == n && t.path.is_some());
    let vmm_found = has("cocoon-vmm")
        || std::env::current_exe()
            .ok()
            .is_some_and(|e| e.with_file_name("cocoon-vmm").is_file());
    let root = nix::unistd::geteuid().is_root();
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:")));
    let dev_kvm = std::fs::metadata("/dev/kvm").ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.mode(), m.gid())
    });
    let virtiofsd_jail = try_virtiofsd_jail(run_dir);
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup").exists() {
        "v1/hybrid"
    } else {
        "none"
    };
    HostReport {
        kvm,
        vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        sev_snp: sev_snp(),
        tdx: tdx(),
        sev_snp_obstacles: crate::hypervisor::confidential::obstacles(
            crate::hypervisor::confidential::Tee::SevSnp,
            Path::new("qemu-system-x86_64"),
        ),
        tdx_obstacles: crate::hypervisor::confidential::obstacles(
            crate::hypervisor::confidential::Tee::Tdx,
            Path::new("qemu-system-x86_64"),
        ),
        cgroup,
        shmem_thp: std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .ok()
            .and_then(|s| selected(&s)),
        huge_tmpfs: cocoon_vmm::vstate::ram_file::huge_tmpfs_file(2 << 20)
            .map(drop)
            .map_err(|e| format!("{e}: {}", e.source)),
        verdicts: verdicts(kvm, has("qemu-system-x86_64"), vmm_found),
        tools,
        confinement: {
            let mut c = confinement(root, seccomp, dev_kvm);
            c.push(virtiofsd_jail_line(run_dir, &virtiofsd_jail));
            c
        },
        root,
        seccomp,
        dev_kvm,
        virtiofsd_jail,
        pods: None,
    }
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kvm = match self.kvm {
            KvmKind::Hardware => "hardware (vmx/svm)",
            KvmKind::Pvm => "PVM (paravirtual, no vmx/svm): cannot boot stock Linux",
            KvmKind::None => "none",
        };
        let yn = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "KVM:            {kvm}")?;
        writeln!(
            f,
            "vhost-vsock:    {} (Cocoon uses its own user-space vsock backend either way)",
            yn(self.vhost_vsock)
        )?;
        let tee = |ok: bool, why: &[String]| {
            if why.is_empty() {
                format!("{} (launch flow not in Cocoon yet)", yn(ok))
            } else {
                format!("{}: {}", yn(ok), why.join("; "))
            }
        };
        writeln!(
            f,
            "SEV-SNP:        {}",
            tee(self.sev_snp, &self.sev_snp_obstacles)
        )?;
        writeln!(f, "TDX:            {}", tee(self.tdx, &self.tdx_obstacles))?;
        writeln!(f, "host cgroups:   {}", self.cgroup)?;
        writeln!(f, "VM templates:   {}", templates_line(self.kvm))?;
        writeln!(f, "memory growth:  {}", memory_growth_line(self.kvm))?;
        writeln!(
            f,
            "block devices:  cocoon-vmm: each in one of the empty disk slots its VM boots \
             with ([vm] block_slots, 4 by default); QEMU: plugged after boot with [qemu] \
             machine = \"pc\"; microvm refuses a container that names one"
        )?;
        match (&self.huge_tmpfs, self.shmem_thp.as_deref()) {
            (Ok(()), Some(m)) if m != "deny" => writeln!(
                f,
                "guest RAM:      2 MiB pages (both VMMs: a huge=always tmpfs of its own, \
                 which shmem THP {m} does not restrict)"
            )?,
            (Err(e), _) => writeln!(f, "guest RAM:      no huge-page tmpfs of its own: {e}")?,
            _ => {}
        }
        match self.shmem_thp.as_deref() {
            Some(m) if shmem_thp_ok(m) => writeln!(
                f,
                "shmem THP:      {m} (cocoon-vmm guest RAM gets 2 MiB pages)"
            )?,
            Some(m) => writeln!(
                f,
                "shmem THP:      {m}: a memfd (guest RAM with vm.huge_pages = off, or \
                 where no huge-page tmpfs can be made) stays in 4 KiB pages, which slows \
                 boots (1.9x under nesting); /sys/kernel/mm/transparent_hugepage/shmem_enabled \
                 = advise allows them"
            )?,
            None => writeln!(f, "shmem THP:      not available")?,
        }
        for t in &self.tools {
            match (&t.path, &t.version) {
                (Some(p), Some(v)) => writeln!(f, "{:<15} {v} ({p})", format!("{}:", t.name))?,
                (Some(p), None) => writeln!(f, "{:<15} {p}", format!("{}:", t.name))?,
                (None, _) => writeln!(f, "{:<15} not found", format!("{}:", t.name))?,
            }
        }
        for c in &self.confinement {
            writeln!(f, "{c}")?;
        }
        writeln!(f)?;
        for v in &self.verdicts {
            let mark = match (v.usable, v.recommended) {
                (true, true) => "RECOMMENDED",
                (true, false) => "usable",
                (false, _) => "unavailable",
            };
            writeln!(f, "backend {:<11} {mark}: {}", v.backend, v.why)?;
        }
        if let Some(pods) = &self.pods {
            writeln!(f)?;
            write!(f, "{pods}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_classified() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        assert_eq!(classify_kvm(false, "flags : vmx", m), KvmKind::None);
        assert_eq!(
            classify_kvm(true, "flags\t\t: fpu vmx sse", m),
            KvmKind::Hardware
        );
        assert_eq!(
            classify_kvm(true, "flags\t\t: fpu svm", m),
            KvmKind::Hardware
        );
        assert_eq!(classify_kvm(true, "flags\t\t: fpu sse", m), KvmKind::Pvm);
        std::fs::create_dir(m.join("kvm_pvm")).unwrap();
        assert_eq!(classify_kvm(true, "flags\t\t: fpu vmx", m), KvmKind::Pvm);
    }

    #[test]
    fn shmem_thp_setting_is_read() {
        let m = selected("always within_size [advise] never deny force\n").unwrap();
        assert_eq!(m, "advise");
        assert!(shmem_thp_ok(&m));
        let m = selected("always within_size advise [never] deny force").unwrap();
        assert!(!shmem_thp_ok(&m));
        assert_eq!(selected("garbage"), None);
    }

    /// The probe is real: as root on this kernel it works, as any other user it says
    /// why not.
    #[test]
    fn the_virtiofsd_jail_probe_says_what_this_host_allows() {
        let line = virtiofsd_jail();
        if nix::unistd::geteuid().is_root() {
            assert!(line.starts_with("virtiofsd jail: yes"), "{line}");
        } else {
            assert!(line.contains("not root"), "{line}");
        }
    }

    /// Tried where the run directory will be (not made yet: its parent), and said so;
    /// nothing left there.
    #[test]
    fn the_virtiofsd_jail_probe_tries_the_run_directorys_filesystem() {
        let t = tempfile::tempdir().unwrap();
        let run_dir = t.path().join("cocoon/run");
        let line = virtiofsd_jail_in(Some(&run_dir));
        assert!(
            line.contains(&format!("tried on {}", run_dir.display())),
            "{line}"
        );
        if nix::unistd::geteuid().is_root() {
            assert!(line.starts_with("virtiofsd jail: yes"), "{line}");
        }
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            0,
            "left behind"
        );
    }

    #[test]
    fn confinement_follows_the_host() {
        let c = confinement(true, true, Some((0o20660, 108)));
        assert!(c[0].starts_with("jails: yes") && c[1].starts_with("seccomp: yes"));
        assert!(c[2].contains("group 108 may open"), "{c:?}");
        let c = confinement(false, false, Some((0o20600, 0)));
        assert!(c[0].starts_with("jails: no") && c[1].starts_with("seccomp: no"));
        assert!(
            c[2].contains("could not open") && c[2].contains("600"),
            "{c:?}"
        );
        assert_eq!(confinement(true, true, None).len(), 2);
    }

    #[test]
    fn memory_growth_names_what_each_host_needs() {
        assert!(memory_growth_line(KvmKind::Hardware).contains("cocoon-vmm"));
        for kvm in [KvmKind::Pvm, KvmKind::None] {
            let line = memory_growth_line(kvm);
            assert!(
                line.contains("machine = \"pc\"") && line.contains("microvm"),
                "{line}"
            );
        }
    }

    #[test]
    fn verdicts_follow_the_host() {
        let v = verdicts(KvmKind::Pvm, true, true);
        assert!(v[0].usable && v[0].recommended && v[0].why.contains("TCG"));
        assert!(!v[1].usable && v[1].why.contains("PVM"));
        let v = verdicts(KvmKind::Hardware, true, true);
        assert!(v[0].usable && v[0].why.contains("KVM") && !v[0].recommended);
        assert!(v[1].usable && v[1].recommended);
        let v = verdicts(KvmKind::Hardware, true, false);
        assert!(v[0].recommended && !v[1].usable);
        let v = verdicts(KvmKind::None, false, false);
        assert!(!v[0].usable && v[0].why.contains("not installed"));
    }
}
