//! The Kubernetes deployment (deploy/): the manifests, the containerd snippet and the
//! shim agree on names, and install.sh installs into a node root, stays idempotent,
//! refuses a containerd config it cannot edit, and uninstalls without a trace. Needs
//! bash and coreutils; the two tests of the node check run the real `cocoon check`, so
//! they need the build (`target/debug/cocoon`), the guest image and root (its jail
//! checks). Nothing here is skipped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cocoon_shim::config::Config;
use cocoon_shim::shimv2::pod::{MEMORY_ANNOTATION, VCPUS_ANNOTATION};
use cocoon_shim::shimv2::RUNTIME_ID;
use yaml_rust2::{Yaml, YamlLoader};

/// containerd 1.6/1.7's CRI plugin, whose `containerd.runtimes` table names the handlers.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
const SHIM: &str = "containerd-shim-cocoon-v2";
const BINARIES: [&str; 3] = [SHIM, "cocoon", "cocoon-vmm"];
const IMAGE_FILES: [&str; 3] = ["vmlinuz", "initramfs.cpio", "manifest.json"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn install_sh() -> PathBuf {
    deploy_dir().join("install.sh")
}

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

/// The plugin that holds CRI's runtimes in containerd 2's config (`version = 3`).
const CRI_RUNTIME_PLUGIN_V3: &str = "io.containerd.cri.v1.runtime";

/// The containerd `runtimes` table of a config of `version` 2 (containerd 1.6/1.7) or 3
/// (containerd 2.x).
fn runtimes(config: &toml::Value, version: i64) -> &toml::value::Table {
    let plugin = if version == 3 {
        CRI_RUNTIME_PLUGIN_V3
    } else {
        CRI_PLUGIN
    };
    config["plugins"][plugin]["containerd"]["runtimes"]
        .as_table()
        .unwrap_or_else(|| panic!("a [plugins.\"{plugin}\".containerd.runtimes.*] table"))
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

/// The label install.sh puts on its node.
const NODE_LABEL: &str = "cocoon.io/runtime";

/// A node root and an installer payload in a temporary directory.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(containerd_config: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let node = Node { dir };
        let payload = node.payload();
        std::fs::create_dir_all(payload.join("bin")).unwrap();
        std::fs::create_dir_all(payload.join("share/cocoon")).unwrap();
        for b in BINARIES {
            std::fs::write(payload.join("bin").join(b), format!("binary {b}\n")).unwrap();
        }
        for f in IMAGE_FILES {
            std::fs::write(payload.join("share/cocoon").join(f), format!("image {f}\n")).unwrap();
        }
        std::fs::create_dir_all(node.host("etc/containerd")).unwrap();
        if let Some(text) = containerd_config {
            std::fs::write(node.containerd_config(), text).unwrap();
        }
        // A kubectl that records its arguments, for the node label.
        let bin = node.dir.path().join("tools");
        std::fs::create_dir_all(&bin).unwrap();
        let kubectl = bin.join("kubectl");
        std::fs::write(
            &kubectl,
            format!(
                "#!/bin/sh\necho \"$*\" >> {}\n",
                node.dir.path().join("kubectl.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A `cocoon check` that finds the node ready (the payload's binaries are not
        // real); the tests of the check itself run the real one.
        let check = bin.join("cocoon-check");
        std::fs::write(
            &check,
            "#!/bin/sh
echo 'KVM:            test'
echo
\
             echo 'pods:           ready with the config /etc/cocoon/config.toml: test'
",
        )
        .unwrap();
        std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
        node
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    fn host(&self, path: &str) -> PathBuf {
        self.root().join(path)
    }

    fn payload(&self) -> PathBuf {
        self.dir.path().join("payload")
    }

    fn containerd_config(&self) -> PathBuf {
        self.host("etc/containerd/config.toml")
    }

    fn kubectl_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kubectl.log")).unwrap_or_default()
    }

    /// Runs install.sh with `args`; `node_name` also puts the recording kubectl on PATH.
    fn run(&self, args: &[&str], node_name: Option<&str>) -> Output {
        let check = self.dir.path().join("tools/cocoon-check");
        self.run_env(
            args,
            node_name,
            &[("COCOON_CHECK", &check.display().to_string())],
        )
    }

    /// `run`, with `env` set as well.
    fn run_env(&self, args: &[&str], node_name: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(install_sh())
            .args(args)
            .env("HOST_ROOT", self.root())
            .env("COCOON_PAYLOAD", self.payload())
            .env("COCOON_NO_RESTART", "1")
            .env_remove("CONTAINERD_CONFIG")
            .env_remove("NODE_NAME");
        if let Some(name) = node_name {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("NODE_NAME", name).env(
                "PATH",
                format!("{}:{path}", self.dir.path().join("tools").display()),
            );
        }
        // Last: a caller's PATH wins.
        cmd.envs(env.iter().copied());
        cmd.output().expect("run bash")
    }

    fn run_ok(&self, args: &[&str], node_name: Option<&str>) -> String {
        let out = self.run(args, node_name);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "install.sh {args:?} failed ({}):\n{}{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// Runs install.sh expecting a refusal; returns its stderr.
    fn run_refused(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "install.sh {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }
}

const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

/// A containerd 2 config as `containerd config default` and `containerd config migrate`
/// write them: version 3, single-quoted keys, the CRI runtime's own plugin table.
const CONTAINERD2_CONFIG: &str = r#"version = 3
root = '/var/lib/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false

    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
"#;

fn assert_installed(node: &Node) {
    for b in BINARIES {
        let p = node.host("opt/cocoon/bin").join(b);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            format!("binary {b}\n")
        );
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755,
            "{}",
            p.display()
        );
    }
    for f in IMAGE_FILES {
        let p = node.host("opt/cocoon/share/cocoon").join(f);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            format!("image {f}\n")
        );
    }
    assert_eq!(
        std::fs::read_link(node.host("usr/local/bin").join(SHIM)).expect("the shim's link"),
        Path::new("/opt/cocoon/bin").join(SHIM),
        "containerd finds the shim on its PATH through this link"
    );

    // The config the shim reads: valid, and naming the installed image.
    let text = std::fs::read_to_string(node.host("etc/cocoon/config.toml")).unwrap();
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    for (path, file) in [
        (config.kernel_path(), "vmlinuz"),
        (config.initrd_path(), "initramfs.cpio"),
    ] {
        assert_eq!(path, Path::new("/opt/cocoon/share/cocoon").join(file));
        let seen = node.root().join(path.strip_prefix("/").unwrap());
        assert!(seen.is_file(), "{} is not installed", seen.display());
    }

    let text = std::fs::read_to_string(node.containerd_config()).unwrap();
    assert_eq!(
        text.lines().filter(|l| *l == "# BEGIN cocoon").count(),
        1,
        "one cocoon block:\n{text}"
    );
    assert_eq!(
        text.lines().filter(|l| *l == "# END cocoon").count(),
        1,
        "one cocoon block:\n{text}"
    );
    let parsed: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("containerd's config: {e}\n{text}"));
    let version = parsed["version"].as_integer().expect("a version");
    let runtimes = runtimes(&parsed, version);
    assert_eq!(
        runtimes["cocoon"]["runtime_type"].as_str(),
        Some(RUNTIME_ID),
        "{text}"
    );
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2"),
        "the existing runtimes stay: {text}"
    );
}

fn assert_uninstalled(node: &Node, original: &[u8]) {
    assert_eq!(
        std::fs::read(node.containerd_config()).unwrap(),
        original,
        "uninstall must restore containerd's config byte for byte"
    );
    assert!(
        !node.host("opt/cocoon").exists(),
        "/opt/cocoon is left: {:?}",
        std::fs::read_dir(node.host("opt/cocoon"))
            .map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
    );
    assert!(
        std::fs::symlink_metadata(node.host("usr/local/bin").join(SHIM)).is_err(),
        "the shim's link is left"
    );
    assert!(
        !node.host("etc/cocoon").exists(),
        "/etc/cocoon is left (the config was not edited)"
    );
    let left: Vec<_> = std::fs::read_dir(node.host("etc/containerd"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["config.toml"], "temporary files are left");
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
