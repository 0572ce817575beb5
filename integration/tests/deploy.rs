//! The Kubernetes deployment (deploy/): the manifests, the containerd snippet and the
//! shim agree on names, and install.sh installs into a node root, stays idempotent,
//! refuses a containerd config it cannot edit, and uninstalls without a trace. Needs
//! bash and coreutils; the two tests of the node check run the real `cocoon check`, so
//! they need the build (`target/debug/cocoon`), the guest image and root (its jail
//! checks). Nothing here is skipped.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;

use cocoon_shim::shimv2::pod::{MEMORY_ANNOTATION, VCPUS_ANNOTATION};
use cocoon_shim::shimv2::RUNTIME_ID;
use yaml_rust2::{Yaml, YamlLoader};

mod deploy_node;
use deploy_node::*;

/// Every YAML document of every deploy/*.yaml, with the file it came from.
fn documents() -> Vec<(String, Yaml)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ has no .yaml files");
    let mut docs = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        let parsed =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"));
        for doc in parsed {
            assert!(
                doc["apiVersion"].as_str().is_some() && doc["kind"].as_str().is_some(),
                "a document of {name} has no apiVersion or kind: {doc:?}"
            );
            docs.push((name.clone(), doc));
        }
    }
    docs
}

/// The one document of this kind.
fn only(docs: &[(String, Yaml)], kind: &str) -> Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(found.len(), 1, "deploy/ must hold one {kind}");
    found[0].clone()
}

fn strings(y: &Yaml) -> Vec<&str> {
    y.as_vec()
        .map(|v| v.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

/// The handler snippet install.sh appends to a config of `version`, parsed.
fn snippet(version: i64) -> toml::Value {
    let file = if version == 3 {
        "containerd2-cocoon.toml"
    } else {
        "containerd-cocoon.toml"
    };
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// containerd's `pod_annotations` patterns: `*` is any run of characters but `/`, as in
/// Go's `path.Match`, which is all these patterns use.
fn glob_match(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .take_while(|&i| !rest[..i].contains('/'))
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

#[test]
fn glob_match_is_containerds() {
    assert!(glob_match("io.cocoon.*", "io.cocoon.vm.vcpus"));
    assert!(glob_match("io.cocoon.*", "io.cocoon."));
    assert!(!glob_match("io.cocoon.*", "io.cocoonx"));
    assert!(!glob_match("io.cocoon.*", "io.cocoon.a/b"));
    assert!(glob_match("a*c*e", "abcde"));
    assert!(!glob_match("a*c", "abd"));
}

#[test]
fn manifests_snippet_and_shim_agree() {
    let docs = documents();

    let rc = only(&docs, "RuntimeClass");
    assert_eq!(rc["apiVersion"].as_str(), Some("node.k8s.io/v1"));
    let handler = rc["handler"].as_str().expect("RuntimeClass.handler");
    assert_eq!(rc["metadata"]["name"].as_str(), Some("cocoon"));
    for resource in ["memory", "cpu"] {
        assert!(
            rc["overhead"]["podFixed"][resource].as_str().is_some(),
            "RuntimeClass.overhead.podFixed.{resource} is not set"
        );
    }
    let selector = rc["scheduling"]["nodeSelector"]
        .as_hash()
        .expect("RuntimeClass.scheduling.nodeSelector");
    assert_eq!(selector.len(), 1, "one node label: {selector:?}");
    let (label, value) = selector.iter().next().unwrap();
    assert_eq!(
        (label.as_str(), value.as_str()),
        (Some(NODE_LABEL), Some("true")),
        "the RuntimeClass must select the label install.sh sets"
    );

    let (v2, v3) = (snippet(2), snippet(3));
    let runtimes = runtimes(&v2, 2);
    // containerd 2's snippet is the same handler where version 3 keeps it.
    assert_eq!(
        runtimes,
        self::runtimes(&v3, 3),
        "deploy/containerd-cocoon.toml and deploy/containerd2-cocoon.toml must define the same handler"
    );
    assert_eq!(
        runtimes.keys().collect::<Vec<_>>(),
        [handler],
        "the snippet's runtime must be the RuntimeClass handler"
    );
    let runtime = &runtimes[handler];
    assert_eq!(runtime["runtime_type"].as_str(), Some(RUNTIME_ID));
    assert_eq!(
        runtime["privileged_without_host_devices"].as_bool(),
        Some(true)
    );
    assert!(
        runtime.get("options").is_none(),
        "the shim reads no containerd runtime options; its config is /etc/cocoon/config.toml"
    );
    let patterns: Vec<&str> = runtime["pod_annotations"]
        .as_array()
        .expect("pod_annotations")
        .iter()
        .map(|p| p.as_str().expect("pod_annotations are strings"))
        .collect();
    for annotation in [VCPUS_ANNOTATION, MEMORY_ANNOTATION] {
        assert!(
            patterns.iter().any(|p| glob_match(p, annotation)),
            "pod_annotations {patterns:?} do not pass {annotation} to the shim"
        );
    }

    let ds = only(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"].as_str(), Some("kube-system"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"].as_bool(),
        Some(true),
        "nsenter needs hostPID"
    );
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(
        c["image"].as_str(),
        Some("ghcr.io/cocoon-runtime/cocoon-deploy:latest")
    );
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));
    let command = strings(&c["command"]);
    assert_eq!(
        command.first().copied(),
        Some("/opt/cocoon-artifacts/install.sh"),
        "the DaemonSet must run install.sh: {command:?}"
    );
    let pre_stop = strings(&c["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(
        pre_stop,
        ["/opt/cocoon-artifacts/install.sh", "uninstall"],
        "preStop must uninstall"
    );
    let env = c["env"].as_vec().expect("env");
    let env_var = |name: &str| env.iter().find(|e| e["name"].as_str() == Some(name));
    assert_eq!(
        env_var("NODE_NAME").expect("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    let host_root = env_var("HOST_ROOT").map_or("/host", |e| e["value"].as_str().unwrap());
    let root_volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"].as_str() == Some("/"))
        .expect("a hostPath volume of the node's root")["name"]
        .as_str()
        .unwrap();
    let mounted_at = c["volumeMounts"]
        .as_vec()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"].as_str() == Some(root_volume))
        .expect("the node's root is mounted")["mountPath"]
        .as_str();
    assert_eq!(
        mounted_at,
        Some(host_root),
        "the node's root must be mounted at HOST_ROOT"
    );
    assert_eq!(
        c["volumeMounts"][0]["readOnly"].as_bool(),
        None,
        "install.sh writes to the node's root"
    );

    let sa = only(&docs, "ServiceAccount");
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        sa["metadata"]["name"].as_str()
    );
    let role = only(&docs, "ClusterRole");
    let rules = role["rules"].as_vec().expect("rules");
    assert!(
        rules
            .iter()
            .any(|r| strings(&r["resources"]).contains(&"nodes")
                && strings(&r["verbs"]).contains(&"patch")
                && strings(&r["verbs"]).contains(&"get")),
        "the ClusterRole must let install.sh get and patch nodes: {rules:?}"
    );
    let binding = only(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"]["name"].as_str(),
        role["metadata"]["name"].as_str()
    );
    assert!(binding["subjects"].as_vec().unwrap().iter().any(|s| {
        s["kind"].as_str() == Some("ServiceAccount")
            && s["name"].as_str() == sa["metadata"]["name"].as_str()
            && s["namespace"].as_str() == Some("kube-system")
    }));

    // The image puts install.sh and the snippet where the DaemonSet runs them.
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(
            "COPY install.sh containerd-cocoon.toml containerd2-cocoon.toml /opt/cocoon-artifacts/"
        ),
        "deploy/Dockerfile must ship install.sh and its snippets in /opt/cocoon-artifacts"
    );
}

#[test]
fn install_twice_then_uninstall_leaves_nothing() {
    let node = Node::new(Some(CONTAINERD_CONFIG));
    install_twice_then_uninstall(&node, CONTAINERD_CONFIG, |first| {
        assert!(first.starts_with(CONTAINERD_CONFIG));
    });
    // And again: nothing left to undo is not an error.
    node.run_ok(&["uninstall"], None);
    assert_uninstalled(&node, CONTAINERD_CONFIG.as_bytes());
}

/// Installs on `node` (whose containerd config was `original`), checks the config it
/// wrote with `check`, installs again (which changes nothing), then uninstalls.
fn install_twice_then_uninstall(node: &Node, original: &str, check: impl FnOnce(&str)) {
    node.run_ok(&[], None);
    assert_installed(node);
    let first = std::fs::read_to_string(node.containerd_config()).unwrap();
    check(&first);
    node.run_ok(&["install"], None);
    assert_installed(node);
    assert_eq!(
        std::fs::read_to_string(node.containerd_config()).unwrap(),
        first,
        "a second install changes nothing"
    );
    node.run_ok(&["uninstall"], None);
    assert_uninstalled(node, original.as_bytes());
}

/// A config that does not end in a newline, with comments and a blank line, comes back
/// exactly; and an upgraded snippet replaces the block rather than adding one.
#[test]
fn uninstall_restores_an_unusual_containerd_config_exactly() {
    let original = "# managed by hand\n\nversion = 2 # containerd 1.7\n\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  \
                    runtime_type = \"io.containerd.runc.v2\"";
    let node = Node::new(Some(original));
    node.run_ok(&[], None);
    assert_installed(&node);
    // An older block (another snippet) is replaced, not duplicated.
    let text = std::fs::read_to_string(node.containerd_config()).unwrap();
    let older = text.replace("privileged_without_host_devices = true", "");
    std::fs::write(node.containerd_config(), older).unwrap();
    node.run_ok(&[], None);
    assert_installed(&node);
    assert_eq!(
        std::fs::read_to_string(node.containerd_config()).unwrap(),
        text
    );

    node.run_ok(&["uninstall"], None);
    assert_uninstalled(&node, original.as_bytes());
}

/// containerd 2's config (`version = 3`) gets the handler where containerd 2 reads it,
/// and uninstall gives the config back byte for byte.
#[test]
fn install_on_a_containerd_2_config_then_uninstall() {
    let node = Node::new(Some(CONTAINERD2_CONFIG));
    install_twice_then_uninstall(&node, CONTAINERD2_CONFIG, |text| {
        let parsed: toml::Value = toml::from_str(text).unwrap();
        assert!(
            parsed["plugins"].get(CRI_PLUGIN).is_none(),
            "no version 2 table in a version 3 config:\n{text}"
        );
    });
}

#[test]
fn a_containerd_config_of_another_version_is_refused() {
    for (config, named) in [
        (
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n",
            "no top-level `version`",
        ),
        ("version = 4\n\n[plugins]\n", "version = 4"),
        ("version = 1\n", "version = 1"),
    ] {
        let node = Node::new(Some(config));
        let stderr = node.run_refused(&[]);
        assert!(
            stderr.contains(named) && stderr.contains("config.toml"),
            "the refusal must name the file and the version ({named:?}): {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(node.containerd_config()).unwrap(),
            config,
            "a refused install must not touch containerd's config"
        );
        assert!(
            !node.host("opt/cocoon").exists() && !node.host("etc/cocoon").exists(),
            "a refused install must install nothing"
        );
    }

    let node = Node::new(None);
    let stderr = node.run_refused(&[]);
    assert!(
        stderr.contains("etc/containerd/config.toml does not exist"),
        "{stderr}"
    );
}

#[test]
fn what_is_wrong_is_named() {
    // A cocoon runtime the user wrote himself would be a duplicate table.
    let node = Node::new(Some(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.cocoon]\n  \
         runtime_type = \"io.containerd.cocoon.v2\"\n",
    ));
    let stderr = node.run_refused(&[]);
    assert!(
        stderr.contains("already defines the runtime `cocoon`"),
        "{stderr}"
    );
    let node = Node::new(Some(
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.cocoon]\n  \
         runtime_type = 'io.containerd.cocoon.v2'\n",
    ));
    let stderr = node.run_refused(&[]);
    assert!(
        stderr.contains("already defines the runtime `cocoon`"),
        "{stderr}"
    );

    let node = Node::new(Some(CONTAINERD_CONFIG));
    std::fs::remove_file(node.payload().join("share/cocoon/vmlinuz")).unwrap();
    let stderr = node.run_refused(&[]);
    assert!(stderr.contains("share/cocoon/vmlinuz"), "{stderr}");
    assert!(!node.host("opt/cocoon").exists());

    let node = Node::new(Some(CONTAINERD_CONFIG));
    let stderr = node.run_refused(&["reinstall"]);
    assert!(stderr.contains("unknown action 'reinstall'"), "{stderr}");

    // A shim installed by hand is not overwritten.
    let node = Node::new(Some(CONTAINERD_CONFIG));
    std::fs::create_dir_all(node.host("usr/local/bin")).unwrap();
    std::fs::write(node.host("usr/local/bin").join(SHIM), "by hand").unwrap();
    let stderr = node.run_refused(&[]);
    assert!(
        stderr.contains("usr/local/bin/containerd-shim-cocoon-v2 exists"),
        "{stderr}"
    );
}

/// A config.toml that was there before, or that the user edited, outlives uninstall.
#[test]
fn uninstall_keeps_a_cocoon_config_the_user_wrote_or_edited() {
    let node = Node::new(Some(CONTAINERD_CONFIG));
    node.run_ok(&[], None);
    let config = node.host("etc/cocoon/config.toml");
    let edited = format!(
        "{}\n[qemu]\naccel = \"tcg\"\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    node.run_ok(&["uninstall"], None);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(!node.host("opt/cocoon").exists());

    let node = Node::new(Some(CONTAINERD_CONFIG));
    std::fs::create_dir_all(node.host("etc/cocoon")).unwrap();
    std::fs::write(node.host("etc/cocoon/config.toml"), "[vm]\nvcpus = 2\n").unwrap();
    node.run_ok(&[], None);
    assert_eq!(
        std::fs::read_to_string(node.host("etc/cocoon/config.toml")).unwrap(),
        "[vm]\nvcpus = 2\n",
        "install must not replace an existing config"
    );
    node.run_ok(&["uninstall"], None);
    assert_eq!(
        std::fs::read_to_string(node.host("etc/cocoon/config.toml")).unwrap(),
        "[vm]\nvcpus = 2\n"
    );
}

#[test]
fn the_node_is_labelled_and_unlabelled() {
    let node = Node::new(Some(CONTAINERD_CONFIG));
    node.run_ok(&[], Some("node-1"));
    assert_eq!(
        node.kubectl_log(),
        format!("label node node-1 {NODE_LABEL}=true --overwrite\n")
    );
    node.run_ok(&["uninstall"], Some("node-1"));
    assert_eq!(
        node.kubectl_log(),
        format!(
            "label node node-1 {NODE_LABEL}=true --overwrite\n\
             label node node-1 {NODE_LABEL}- --overwrite\n"
        )
    );
}

/// What install.sh makes of the real `cocoon check` on a node whose config is `config`
/// (written before the install, so kept): its output and what it labelled.
fn install_checked_by_cocoon(config: &str) -> (Output, String) {
    let node = Node::new(Some(CONTAINERD_CONFIG));
    let path = node.host("etc/cocoon/config.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, config).unwrap();
    let cocoon = cocoon_integration::workspace_root().join("target/debug/cocoon");
    assert!(cocoon.is_file(), "{} is not built", cocoon.display());
    // The command runs as given, with this environment: the node's config by name, and
    // the tools where the other tests find them.
    let tools = format!(
        "{}:{}",
        node.dir.path().join("tools").display(),
        cocoon_integration::containerd::tool_path()
    );
    let out = node.run_env(
        &[],
        Some("node-1"),
        &[
            ("COCOON_CHECK", &format!("{} check", cocoon.display())),
            ("COCOON_CONFIG", &path.display().to_string()),
            ("PATH", &tools),
        ],
    );
    (out, node.kubectl_log())
}

/// A node whose pods could not start (here: no guest kernel where its config says; then
/// a virtiofsd without the options pods pass) is labelled so that the RuntimeClass does
/// not pick it, and the installer says why.
#[test]
fn a_node_that_cannot_run_pods_is_labelled_unready_with_the_reasons() {
    let nowhere = tempfile::tempdir().unwrap();
    let image_dir = nowhere.path().join("no-image");
    let (out, labels) = install_checked_by_cocoon(&format!(
        "[paths]\nimage_dir = \"{}\"\n",
        image_dir.display()
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "install.sh should exit 2:\n{stderr}"
    );
    assert!(stderr.contains("NOT READY"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "guest kernel {}",
            image_dir.join("vmlinuz").display()
        )),
        "the missing kernel is not named:\n{stderr}"
    );
    assert_eq!(
        labels,
        format!("label node node-1 {NODE_LABEL}=unready --overwrite\n")
    );

    // The built image, but a virtiofsd that takes other options (QEMU's old C one, as
    // older distributions install it in /usr/libexec, where the shim looks).
    let old = nowhere.path().join("virtiofsd");
    cocoon_integration::write_executable(
        &old,
        "#!/bin/sh\necho '  --socket-path=PATH'\necho '  -o source=PATH'\n",
    );
    let (out, labels) = install_checked_by_cocoon(&format!(
        "[paths]\nimage_dir = \"{}\"\nvirtiofsd = \"{}\"\n{}",
        cocoon_integration::image_dir().display(),
        old.display(),
        cocoon_integration::jail_table_for_this_kernel("")
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: its --help lists none of", old.display()))
            && stderr.contains("--sandbox"),
        "the unfit virtiofsd is not named:\n{stderr}"
    );
    assert_eq!(
        labels,
        format!("label node node-1 {NODE_LABEL}=unready --overwrite\n")
    );
}

/// A node where pods can start, by the real check, is labelled for the RuntimeClass.
#[test]
fn a_node_that_can_run_pods_is_labelled_after_cocoon_check() {
    let image_dir = cocoon_integration::image_dir();
    assert!(
        image_dir.join("initramfs.cpio").is_file(),
        "the guest image is not built in {} (make image)",
        image_dir.display()
    );
    let config = format!(
        "[paths]\nimage_dir = \"{}\"\n{}",
        image_dir.display(),
        cocoon_integration::jail_table_for_this_kernel("")
    );
    let (out, labels) = install_checked_by_cocoon(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "install.sh failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cocoon check on the node: ready with the config "),
        "{stdout}"
    );
    assert_eq!(
        labels,
        format!("label node node-1 {NODE_LABEL}=true --overwrite\n")
    );
}

/// A check that could not run (nsenter refused, a binary the node cannot execute) is
/// not a verdict: its own words are shown, and the node is not labelled ready.
#[test]
fn a_check_that_fails_to_run_is_named_and_the_node_is_unready() {
    let node = Node::new(Some(CONTAINERD_CONFIG));
    let broken = node.dir.path().join("tools/broken-check");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'nsenter: reassociate to namespace failed' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let missing = node.dir.path().join("tools/no-such-cocoon");
    for (check, words) in [
        (&broken, "nsenter: reassociate to namespace failed"),
        (&missing, "No such file or directory"),
    ] {
        let out = node.run_env(
            &[],
            Some("node-1"),
            &[("COCOON_CHECK", &check.display().to_string())],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("failed on the node") && stderr.contains(words),
            "{stderr}"
        );
        assert!(!stderr.contains("pods cannot start there"), "{stderr}");
    }
    assert_eq!(
        node.kubectl_log(),
        format!("label node node-1 {NODE_LABEL}=unready --overwrite\n").repeat(2)
    );
}
