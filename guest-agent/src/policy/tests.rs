use super::*;
use serde_json::json;

#[test]
fn requests_become_inputs_with_their_json_documents_parsed() {
    let mut req = cocoon_protocol::agent::ExecProcessRequest::new();
    req.container_id = "c1".into();
    req.process_json = br#"{"args": ["true"], "cwd": "/"}"#.to_vec();
    let v = input_of(&req);
    assert_eq!(v["container_id"], "c1");
    assert_eq!(v["process"]["args"], json!(["true"]));
    assert_eq!(v["exec_id"], "", "defaults are there for rules to rely on");
}

fn init_data(rego: &str) -> String {
    format!(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = '''\n{rego}\n'''\n"
    )
}

const POLICY: &str = r#"package agent_policy
default CreateContainerRequest := true
default ExecProcessRequest := false
ExecProcessRequest if { input.process.args[0] == "/bin/true" }
"#;

#[test]
fn a_pulled_images_config_can_pin_the_process() {
    let pinned = |args: &[&str]| {
        json!({"oci": {"process": {"args": args}},
               "image_config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"]}})
    };
    // No policy, or one without the rule: CreateContainer's decision stands.
    let g = Gate::new(false);
    assert_eq!(g.check_pulled(|| pinned(&["/bin/sh"])), Ok(()));
    g.set_init_data(init_data(POLICY).as_bytes()).unwrap();
    assert_eq!(g.check_pulled(|| pinned(&["/bin/sh"])), Ok(()));
    // The rule: the process is the image's entrypoint and command, nothing else.
    let g = Gate::new(false);
    let rego = format!(
        "{POLICY}\ndefault CreateContainerImageRequest := false\n\
         CreateContainerImageRequest if {{\n\
         input.oci.process.args == array.concat(input.image_config.Entrypoint, input.image_config.Cmd)\n}}\n"
    );
    g.set_init_data(init_data(&rego).as_bytes()).unwrap();
    assert_eq!(g.check_pulled(|| pinned(&["/bin/app", "--serve"])), Ok(()));
    assert_eq!(
        g.check_pulled(|| pinned(&["/bin/sh", "-c", "curl evil"])),
        Err(Denied::Policy("CreateContainerImageRequest".into()))
    );
    assert!(g.pins_images());
    // Without a default, a body that fails leaves the rule undefined: refused too.
    let g = Gate::new(false);
    let rego = format!(
        "{POLICY}\nCreateContainerImageRequest if {{\n\
         input.oci.process.args == input.image_config.Cmd\n}}\n"
    );
    g.set_init_data(init_data(&rego).as_bytes()).unwrap();
    assert_eq!(g.check_pulled(|| pinned(&["--serve"])), Ok(()));
    assert_eq!(
        g.check_pulled(|| pinned(&["/bin/sh"])),
        Err(Denied::Policy("CreateContainerImageRequest".into()))
    );
}

#[test]
fn rules_decide_and_undefined_ones_refuse() {
    let g = Gate::new(false);
    assert_eq!(
        g.check("ExecProcess", || json!({})),
        Ok(()),
        "no init-data: allowed"
    );
    g.set_init_data(init_data(POLICY).as_bytes()).unwrap();
    assert_eq!(g.check("CreateContainer", || json!({})), Ok(()));
    assert_eq!(
        g.check("ExecProcess", || json!({"process": {"args": ["sh"]}})),
        Err(Denied::Policy("ExecProcessRequest".into()))
    );
    assert_eq!(
        g.check(
            "ExecProcess",
            || json!({"process": {"args": ["/bin/true"]}})
        ),
        Ok(())
    );
    // No rule at all for this call: refused.
    assert_eq!(
        g.check("PauseContainer", || json!({})),
        Err(Denied::Policy("PauseContainerRequest".into()))
    );
    // Set once.
    assert!(g.set_init_data(init_data(POLICY).as_bytes()).is_err());
}

/// A pod owner's policy can demand that every container's image be pulled in the
/// guest, and pin which: the request's `guest_image` is in the input.
#[test]
fn a_policy_can_require_guest_pulled_images() {
    let pinned = format!("r.io/app@sha256:{}", "ab".repeat(32));
    let rego = format!(
        "package agent_policy\ndefault CreateContainerRequest := false\nCreateContainerRequest if {{ input.guest_image == \"{pinned}\" }}\n"
    );
    let g = Gate::new(true);
    g.set_init_data(init_data(&rego).as_bytes()).unwrap();
    let mut req = cocoon_protocol::agent::CreateContainerRequest::new();
    req.oci_spec_json = br#"{"ociVersion": "1.0.2"}"#.to_vec();
    assert_eq!(
        g.check("CreateContainer", || input_of(&req)),
        Err(Denied::Policy("CreateContainerRequest".into())),
        "a host-shared root filesystem"
    );
    req.guest_image = pinned.clone();
    assert_eq!(g.check("CreateContainer", || input_of(&req)), Ok(()));
    req.guest_image = pinned.replace("ab", "cd");
    assert!(g.check("CreateContainer", || input_of(&req)).is_err());
}

#[test]
fn confidential_mode_waits_for_init_data_and_bad_policies_are_refused() {
    let g = Gate::new(true);
    assert_eq!(
        g.check("CreateSandbox", || json!({})),
        Err(Denied::NoInitData)
    );
    let e = g
        .set_init_data(init_data("package other\nx := 1").as_bytes())
        .unwrap_err();
    assert!(e.contains("not package agent_policy"), "{e}");
    let e = g
        .set_init_data(init_data("package agent_policy\nx := ").as_bytes())
        .unwrap_err();
    assert!(e.contains("does not compile"), "{e}");
    // Init-data without a policy: the confidential default from then on.
    g.set_init_data(b"version = \"0.1.0\"\nalgorithm = \"sha256\"\n")
        .unwrap();
    assert_eq!(g.check("CreateSandbox", || json!({})), Ok(()));
    assert!(g.check("ExecProcess", || json!({})).is_err());
    // Outside confidential mode, none: everything allowed.
    let g = Gate::new(false);
    g.set_init_data(b"version = \"0.1.0\"\nalgorithm = \"sha256\"\n")
        .unwrap();
    assert_eq!(g.check("ExecProcess", || json!({})), Ok(()));
}

/// The built-in confidential policy: the lifecycle goes through, looking inside
/// does not, and neither do host-path volumes nor a root filesystem the host shared.
#[test]
fn the_confidential_default_denies_what_it_says() {
    let g = Gate::new(true);
    g.set_init_data(b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n")
        .unwrap();
    // What a CRI container's spec holds once the shim has rewritten it.
    let mounts = json!([
        {"destination": "/proc", "source": "proc", "type": "proc"},
        {"destination": "/dev", "source": "tmpfs", "type": "tmpfs"},
        {"destination": "/sys/fs/cgroup", "source": "cgroup", "type": "cgroup"},
        {"destination": "/dev/shm", "source": "/run/cocoon/pod-shm", "type": "bind"},
        {"destination": "/etc/hosts", "source": "/run/cocoon/shared/c1/mounts/1"},
        {"destination": "/dev/termination-log", "source": "/run/cocoon/shared/c1/mounts/2"}
    ]);
    let namespaces = json!([
        {"type": "mount"},
        {"type": "pid"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"}
    ]);
    let caps = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let input = |image: &str, mounts: &serde_json::Value, ns: &serde_json::Value| {
        json!({"guest_image": image, "storages": [],
        "oci": {"mounts": mounts,
                "process": {"capabilities":
                    {"bounding": caps, "effective": caps, "permitted": caps}},
                "linux": {"namespaces": ns,
                    "sysctl": {"net.ipv4.ip_forward": "1"},
                    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                                    "/sys/firmware", "/proc/acpi"],
                    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq",
                                      "/proc/sys", "/proc/sysrq-trigger"],
                    "resources": {"devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
                ]}}}})
    };
    let app = "registry:5000/app@sha256:00";
    for image in [app, cocoon_protocol::BUILTIN_PAUSE] {
        let pulled = input(image, &mounts, &namespaces);
        assert_eq!(g.check("CreateContainer", || pulled), Ok(()), "{image}");
    }
    let host_root = input("", &mounts, &namespaces);
    assert!(g.check("CreateContainer", || host_root).is_err());
    // Anything else of the host's: refused, however it is spelled.
    for (dest, source, kind) in [
        ("/data", "/run/cocoon/shared/c1/mounts/3", "bind"),
        ("/etc", "/run/cocoon/shared/c1/mounts/3", "bind"),
        ("/etc/hosts/x", "/run/cocoon/shared/c1/mounts/3", "bind"),
        ("/", "/run/cocoon/shared/sandbox/rootfs", "bind"),
        ("/data", "//run/cocoon/shared/c1/mounts/3", "bind"),
        (
            "/etc/hosts",
            "/proc/self/root/run/cocoon/shared/c1/mounts/1",
            "bind",
        ),
        (
            "/etc/hosts",
            "/run/cocoon/shared/c1/mounts/1/../../rootfs",
            "bind",
        ),
        ("/data", "overlay", "overlay"),
        ("/data", "cocoon-share", "virtiofs"),
        ("/dev/shm", "/run/cocoon/secrets", "bind"),
        ("/proc", "/run/cocoon", "proc"),
    ] {
        let mut m = mounts.clone();
        m.as_array_mut()
            .unwrap()
            .push(json!({"destination": dest, "source": source, "type": kind}));
        let i = input(app, &m, &namespaces);
        assert!(
            g.check("CreateContainer", || i).is_err(),
            "{dest} {source} {kind}"
        );
    }
    // Privileged, however it is asked for.
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 13] = [
        (
            "no capabilities in the spec (the runtime then drops none)",
            |v| v["oci"]["process"] = json!({}),
        ),
        ("no permitted set", |v| {
            v["oci"]["process"]["capabilities"] = json!({"bounding": [], "effective": []})
        }),
        ("a global sysctl", |v| {
            v["oci"]["linux"]["sysctl"] = json!({"kernel.core_pattern": "|/x"})
        }),
        ("/proc/sys writable", |v| {
            v["oci"]["linux"]["readonlyPaths"] = json!([])
        }),
        ("/proc/kcore unmasked", |v| {
            v["oci"]["linux"]["maskedPaths"] = json!(["/sys/firmware"])
        }),
        ("a writable sysfs", |v| {
            v["oci"]["mounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"destination": "/sys", "source": "sysfs", "type": "sysfs"}))
        }),
        ("a proc mount that is a bind of the agent's tree", |v| {
            v["oci"]["mounts"].as_array_mut().unwrap().push(
                json!({"destination": "/x", "source": "run", "type": "proc", "options": ["rbind"]}),
            )
        }),
        ("a device node", |v| {
            v["oci"]["linux"]["devices"] = json!([{"path": "/dev/sda", "type": "b"}])
        }),
        ("every device", |v| {
            v["oci"]["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}])
        }),
        ("a whole major", |v| {
            v["oci"]["linux"]["resources"]["devices"] =
                json!([{"allow": true, "type": "b", "major": 8, "access": "rwm"}])
        }),
        ("CAP_SYS_ADMIN", |v| {
            v["oci"]["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"])
        }),
        ("CAP_SYS_MODULE in ambient", |v| {
            v["oci"]["process"]["capabilities"]["ambient"] = json!(["CAP_SYS_MODULE"])
        }),
        ("a startContainer hook", |v| {
            v["oci"]["hooks"] = json!({"startContainer": [{"path": "/bin/sh"}]})
        }),
    ];
    for (what, edit) in edits {
        let mut i = input(app, &mounts, &namespaces);
        edit(&mut i);
        assert!(g.check("CreateContainer", || i).is_err(), "{what}");
    }
    for ns in [
        json!([{"type": "mount"}]),
        json!([{"type": "pid"}]),
        json!([{"type": "pid"}, {"type": "mount", "path": "/proc/42/ns/mnt"}]),
    ] {
        let i = input(app, &mounts, &ns);
        assert!(g.check("CreateContainer", || i).is_err(), "{ns}");
    }
    let mut ro_sysfs = input(app, &mounts, &namespaces);
    ro_sysfs["oci"]["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/sys", "source": "sysfs", "type": "sysfs", "options": ["nosuid", "ro"]}),
    );
    assert_eq!(
        g.check("CreateContainer", || ro_sysfs),
        Ok(()),
        "a read-only sysfs"
    );
    let mut storages = input(app, &mounts, &namespaces);
    storages["storages"] = json!([{"source": "/dev/vdb", "mount_point": "/run/cocoon/images/c1"}]);
    assert!(g.check("CreateContainer", || storages).is_err(), "storages");
    for ns in [
        json!({"type": "mount", "path": "/proc/1/ns/mnt"}),
        json!({"type": "mount", "path": "/proc/42/ns/mnt"}),
        json!({"type": "ipc", "path": "/proc/1/ns/ipc"}),
        json!({"type": "pid", "path": "/proc/42/ns/../../1/ns/pid"}),
        json!({"type": "user", "path": "/proc/42/ns/user"}),
    ] {
        let i = input(app, &mounts, &json!([ns]));
        assert!(g.check("CreateContainer", || i).is_err(), "{ns}");
    }
    for allowed in [
        "StartContainer",
        "WaitProcess",
        "SignalProcess",
        "RemoveContainer",
    ] {
        assert_eq!(g.check(allowed, || json!({})), Ok(()), "{allowed}");
    }
    for denied in ["ExecProcess", "ReadStream", "WriteStream", "DebugConsole"] {
        assert_eq!(
            g.check(denied, || json!({})),
            Err(Denied::Policy(format!("{denied}Request"))),
            "{denied}"
        );
    }
}

#[test]
fn the_command_line_names_the_mode() {
    assert_eq!(Mode::from_cmdline("console=ttyS0 quiet"), Mode::Plain);
    assert_eq!(Mode::from_cmdline("cocoon.confidential"), Mode::Policy);
    assert_eq!(Mode::from_cmdline("cocoon.confidential=1"), Mode::Policy);
    assert_eq!(
        Mode::from_cmdline("a cocoon.confidential=sev-snp b"),
        Mode::Tee(Tee::SevSnp)
    );
    assert_eq!(
        Mode::from_cmdline("cocoon.confidential=tdx"),
        Mode::Tee(Tee::Tdx)
    );
    assert!(matches!(
        Mode::from_cmdline("cocoon.confidential=sev"),
        Mode::Invalid(why) if why.contains("sev")
    ));
}

/// With a TEE named, init-data is taken only if the guest's evidence binds it;
/// refused, the agent still serves nothing.
#[test]
fn a_tee_gate_takes_only_the_init_data_its_evidence_binds() {
    let doc = b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n";
    let measured = InitData::parse(doc).unwrap();
    let d = tempfile::tempdir().unwrap();
    let entry = d.path().join("cocoon-init-data");
    let fake = |host_data: [u8; 32]| {
        std::fs::create_dir_all(&entry).unwrap();
        let mut r = vec![0u8; 0x4A0];
        r[0xC0..0xE0].copy_from_slice(&host_data);
        r[0x50..0x90].copy_from_slice(&evidence::init_data_report_data(&measured));
        std::fs::write(entry.join("outblob"), r).unwrap();
        std::fs::write(entry.join("provider"), "sev_guest\n").unwrap();
        std::fs::write(entry.join("generation"), "0\n").unwrap();
    };
    let g = Gate::for_mode(Mode::Tee(Tee::SevSnp), d.path().into());
    fake([0xAA; 32]);
    let e = g.set_init_data(doc).unwrap_err();
    assert!(e.contains("not the one the launch measured"), "{e}");
    assert_eq!(
        g.check("CreateContainer", || json!({})),
        Err(Denied::NoInitData)
    );
    fake(measured.host_data());
    g.set_init_data(doc).unwrap();
    let caps = json!(["CAP_KILL"]);
    let pulled = || {
        json!({"guest_image": "registry:5000/app@sha256:00", "storages": [],
            "oci": {"process": {"capabilities":
                        {"bounding": caps, "effective": caps, "permitted": caps}},
                    "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}],
                        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                                        "/sys/firmware"],
                        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq",
                                          "/proc/sys", "/proc/sysrq-trigger"]}}})
    };
    assert_eq!(g.check("CreateContainer", pulled), Ok(()));

    let none = Gate::for_mode(Mode::Tee(Tee::Tdx), d.path().join("absent"));
    let e = none.set_init_data(doc).unwrap_err();
    assert!(e.contains("absent"), "{e}");
    let bad = Gate::for_mode(Mode::Invalid("no such TEE".into()), d.path().into());
    assert!(bad.set_init_data(doc).unwrap_err().contains("no such TEE"));
}

#[test]
fn start_hooks_are_seen_wherever_the_spec_names_one() {
    assert!(has_start_hooks(
        br#"{"hooks": {"startContainer": [{"path": "/bin/sh"}]}}"#
    ));
    for no in [
        &br#"{"hooks": {"startContainer": []}}"#[..],
        br#"{"hooks": {"poststop": [{"path": "/bin/sh"}]}}"#,
        br#"{}"#,
        b"not json",
    ] {
        assert!(!has_start_hooks(no), "{}", String::from_utf8_lossy(no));
    }
}
