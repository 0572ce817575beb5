//! The node harness of `deploy.rs`: a node root with an installer payload in a temporary
//! directory, the containerd configs install.sh edits, and what an install must leave
//! (and an uninstall take away). Kept apart so that `deploy.rs` holds the tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cocoon_shim::config::Config;
use cocoon_shim::shimv2::RUNTIME_ID;

/// containerd 1.6/1.7's CRI plugin, whose `containerd.runtimes` table names the handlers.
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
pub const SHIM: &str = "containerd-shim-cocoon-v2";
pub const BINARIES: [&str; 3] = [SHIM, "cocoon", "cocoon-vmm"];
pub const IMAGE_FILES: [&str; 3] = ["vmlinuz", "initramfs.cpio", "manifest.json"];

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

pub fn install_sh() -> PathBuf {
    deploy_dir().join("install.sh")
}

/// The plugin that holds CRI's runtimes in containerd 2's config (`version = 3`).
pub const CRI_RUNTIME_PLUGIN_V3: &str = "io.containerd.cri.v1.runtime";

/// The containerd `runtimes` table of a config of `version` 2 (containerd 1.6/1.7) or 3
/// (containerd 2.x).
pub fn runtimes(config: &toml::Value, version: i64) -> &toml::value::Table {
    let plugin = if version == 3 {
        CRI_RUNTIME_PLUGIN_V3
    } else {
        CRI_PLUGIN
    };
    config["plugins"][plugin]["containerd"]["runtimes"]
        .as_table()
        .unwrap_or_else(|| panic!("a [plugins.\"{plugin}\".containerd.runtimes.*] table"))
}

/// The label install.sh puts on its node.
pub const NODE_LABEL: &str = "cocoon.io/runtime";

/// A node root and an installer payload in a temporary directory.
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new(containerd_config: Option<&str>) -> Node {
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

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    pub fn host(&self, path: &str) -> PathBuf {
        self.root().join(path)
    }

    pub fn payload(&self) -> PathBuf {
        self.dir.path().join("payload")
    }

    pub fn containerd_config(&self) -> PathBuf {
        self.host("etc/containerd/config.toml")
    }

    pub fn kubectl_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kubectl.log")).unwrap_or_default()
    }

    /// Runs install.sh with `args`; `node_name` also puts the recording kubectl on PATH.
    pub fn run(&self, args: &[&str], node_name: Option<&str>) -> Output {
        let check = self.dir.path().join("tools/cocoon-check");
        self.run_env(
            args,
            node_name,
            &[("COCOON_CHECK", &check.display().to_string())],
        )
    }

    /// `run`, with `env` set as well.
    pub fn run_env(&self, args: &[&str], node_name: Option<&str>, env: &[(&str, &str)]) -> Output {
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

    pub fn run_ok(&self, args: &[&str], node_name: Option<&str>) -> String {
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
    pub fn run_refused(&self, args: &[&str]) -> String {
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

pub const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

/// A containerd 2 config as `containerd config default` and `containerd config migrate`
/// write them: version 3, single-quoted keys, the CRI runtime's own plugin table.
pub const CONTAINERD2_CONFIG: &str = r#"version = 3
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

pub fn assert_installed(node: &Node) {
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

pub fn assert_uninstalled(node: &Node, original: &[u8]) {
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
