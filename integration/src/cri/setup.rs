//! A node's files and processes: containerd's config with the CRI plugin and both
//! runtime handlers, the CNI network list, the cocoon shim's config, containerd itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

pub(super) fn bridge_name(subnet_index: u8) -> String {
    format!("cni-ct{subnet_index}")
}

/// containerd's config for this node: containerd 1.6's version 2, or, under containerd 2
/// (`containerd::use_containerd2`), the version 3 a containerd 2 node has: containerd's
/// own `config migrate` of the same settings, with the `cocoon` handler added from
/// deploy/containerd2-cocoon.toml as install.sh adds it.
pub(super) fn containerd_config(dir: &Path, address: &Path) -> String {
    if crate::containerd::major_version_in_use() < 2 {
        return containerd_toml(dir, address, true);
    }
    let v2 = dir.join("containerd-v2.toml");
    std::fs::write(&v2, containerd_toml(dir, address, false)).unwrap();
    let out = Command::new("containerd")
        .arg("--config")
        .arg(&v2)
        .args(["config", "migrate"])
        .env("PATH", tool_path())
        .output()
        .expect("containerd config migrate");
    let migrated = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && migrated.starts_with("version = 3"),
        "containerd config migrate: {}{}",
        migrated,
        String::from_utf8_lossy(&out.stderr)
    );
    let snippet = crate::workspace_root().join("deploy/containerd2-cocoon.toml");
    let handler = std::fs::read_to_string(&snippet).unwrap();
    format!("{migrated}\n# BEGIN cocoon\n{handler}# END cocoon\n")
}

/// A version 2 config (containerd 1.6/1.7), with the `cocoon` handler or without.
fn containerd_toml(dir: &Path, address: &Path, with_cocoon: bool) -> String {
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    let cocoon = if with_cocoon {
        format!(
            "[{cri}.containerd.runtimes.{COCOON}]\n  runtime_type = \"io.containerd.cocoon.v2\"\n  \
             pod_annotations = [\"io.cocoon.*\"]\n  container_annotations = [\"io.cocoon.*\"]\n  \
             privileged_without_host_devices = true\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"version = 2
root = "{r}/root"
state = "{r}/state"
[grpc]
  address = "{a}"
[ttrpc]
  address = "{a}.ttrpc"
[debug]
  level = "info"
# containerd 2's NRI listens on /var/run/nri/nri.sock unless told otherwise: nodes that
# run side by side each need their own.
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{r}/nri.sock"
[{cri}]
  sandbox_image = "{PAUSE_REF}"
  # This host refuses to lower oom_score_adj; runc then fails to start anything.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.containerd]
  default_runtime_name = "{RUNC}"
  snapshotter = "overlayfs"
[{cri}.containerd.runtimes.{RUNC}]
  runtime_type = "io.containerd.runc.v2"
{cocoon}[{cri}.containerd.runtimes.{COCOON_ALT}]
  runtime_type = "io.containerd.cocoon.v2"
  pod_annotations = ["io.cocoon.*"]
  container_annotations = ["io.cocoon.*"]
  privileged_without_host_devices = true
  [{cri}.containerd.runtimes.{COCOON_ALT}.options]
    ConfigPath = "{r}/{ALT_CONFIG}"
[{cri}.registry]
  # Per registry `hosts.toml` (`CriNode::plain_http_registry`).
  config_path = "{r}/certs.d"
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{r}/cni"
  max_conf_num = 1
"#,
        r = dir.display(),
        a = address.display(),
    )
}

/// The IPv6 pod network of a dual-stack node (a unique local range).
pub fn subnet_v6(subnet_index: u8) -> (std::net::Ipv6Addr, u8) {
    (
        std::net::Ipv6Addr::new(0xfd00, 0xcc, subnet_index.into(), 0, 0, 0, 0, 0),
        64,
    )
}

pub(super) fn cni_conflist(dir: &Path, subnet_index: u8, ipv6: bool) -> String {
    let (net, len) = subnet(subnet_index);
    let (net6, len6) = subnet_v6(subnet_index);
    let mut ranges = vec![serde_json::json!([{ "subnet": format!("{net}/{len}") }])];
    let mut routes = vec![serde_json::json!({ "dst": "0.0.0.0/0" })];
    if ipv6 {
        ranges.push(serde_json::json!([{ "subnet": format!("{net6}/{len6}") }]));
        routes.push(serde_json::json!({ "dst": "::/0" }));
    }
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "0.4.0",
        "name": format!("cocoon-test-{subnet_index}"),
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge_name(subnet_index),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": dir.join("ipam"),
                }
            },
            {"type": "loopback"}
        ]
    }))
    .unwrap()
}

/// Writes the shim's COCOON_CONFIG for a CRI node under `dir` (the built guest image, a
/// private run dir `dir/run`) and returns its path. runc pods never read it.
pub fn write_shim_config(dir: &Path, boot_timeout: Duration) -> PathBuf {
    write_shim_config_with(dir, boot_timeout, "")
}

/// As `write_shim_config`, with `tables` (TOML tables) added.
pub fn write_shim_config_with(dir: &Path, boot_timeout: Duration, tables: &str) -> PathBuf {
    write_shim_config_vm(dir, boot_timeout, "", tables)
}

/// As `write_shim_config_with`, with `vm_keys` (TOML lines) added to its `[vm]` table.
pub fn write_shim_config_vm(
    dir: &Path,
    boot_timeout: Duration,
    vm_keys: &str,
    tables: &str,
) -> PathBuf {
    let c = crate::test_config(&dir.join("run"), boot_timeout);
    let path = dir.join("cocoon.toml");
    // COCOON_TEST_HYPERVISOR names the VMM outright (a test of cocoon-vmm must not pass
    // on QEMU); otherwise the host decides ("auto").
    let hypervisor = std::env::var("COCOON_TEST_HYPERVISOR").unwrap_or_else(|_| "auto".into());
    // COCOON_TEST_TEMPLATES=1: pods start from VM templates (`[vm] templates`).
    let templates = std::env::var("COCOON_TEST_TEMPLATES").is_ok_and(|v| v == "1");
    let toml = format!(
        "hypervisor = {hypervisor:?}\n[vm]\nkernel = {:?}\ninitrd = {:?}\nboot_timeout_ms = {}\n\
         templates = {templates}\n{vm_keys}[paths]\nrun_dir = {:?}\n{tables}{}",
        c.vm.kernel,
        c.vm.initrd,
        c.vm.boot_timeout_ms,
        c.paths.run_dir,
        crate::jail_table_for_this_kernel(tables)
    );
    std::fs::write(&path, toml).unwrap();
    path
}

pub(super) fn spawn_containerd(dir: &Path, cocoon_config: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .env("PATH", tool_path())
        .env("COCOON_CONFIG", cocoon_config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("containerd (apt-get install containerd)")
}
