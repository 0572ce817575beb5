//! A set-user-ID program in a container, as CRI's validation suite checks it ("should
//! allow privilege escalation when false", "should not allow privilege escalation when
//! true"): run by uid 1000, a root-owned 04755 program runs as root unless the
//! container has no_new_privs. Under cocoon the program reaches the guest through the
//! pod share (virtio-fs, idmapped for the jailed virtiofsd), so both the owner and the
//! mode bit must survive the way. The same report is asked of runc and cocoon.

mod common;

use std::path::Path;
use std::time::Duration;

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use common::env;
use k8s_cri::v1::{Int64Value, Mount};

const RUNC_NET: u8 = 58;
const COCOON_NET: u8 = 59;

/// Prints its effective uid. Static: the test image has no C library.
const EUID_C: &str = "#include <stdio.h>\n#include <unistd.h>\n\
                      int main(void) { printf(\"%d\\n\", (int)geteuid()); return 0; }\n";

/// Builds the set-user-ID program into `dir`, or says why it cannot.
fn build_euid(dir: &Path) -> Result<(), String> {
    let euid = cocoon_integration::build_static_c(dir, "euid", EUID_C)?;
    std::os::unix::fs::chown(&euid, Some(0), Some(0)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&euid, std::os::unix::fs::PermissionsExt::from_mode(0o4755))
        .map_err(|e| e.to_string())
}

/// The program's effective uid in a container of uid 1000, without and with
/// no_new_privs.
async fn observe(test: &str, handler: &str, net: u8) -> Option<(String, String)> {
    let env = env(test, handler, net).await?;
    let node = &env.node;
    let vol = env.dir.path().join("suid");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    if let Err(why) = build_euid(&vol) {
        cocoon_nested::testing::missing(test, &why);
        return None;
    }
    let pconfig = node.pod_config("suid", "uid-suid", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut euids = Vec::new();
    for (name, no_new_privs) in [("escalates", false), ("contained", true)] {
        let mut c = CriNode::container_config(name, IMAGE_REF, &["sleep", "3600"], &[]);
        c.mounts = vec![Mount {
            host_path: vol.to_string_lossy().into_owned(),
            container_path: "/suid".into(),
            readonly: true,
            ..Default::default()
        }];
        let sc = c
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .expect("container_config sets a security context");
        sc.run_as_user = Some(Int64Value { value: 1000 });
        sc.no_new_privs = no_new_privs;
        let ctr = node
            .create_and_start(&pod, &c, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: {name}: {e}\n{}", node.log_tail()));
        let (code, out, err) = node
            .exec_sync(&ctr, &["/suid/euid"], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{test}: {name}: ExecSync: {e}"));
        assert_eq!(code, 0, "{test}: {name}: {err}");
        euids.push(out);
    }
    node.stop_and_remove_pod(&pod)
        .await
        .unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
    Some((euids.remove(0), euids.remove(0)))
}

#[tokio::test]
async fn a_setuid_program_escalates_as_under_runc() {
    let test = "a_setuid_program_escalates_as_under_runc";
    let (runc, cocoon) = tokio::join!(
        observe(test, RUNC, RUNC_NET),
        observe(test, COCOON, COCOON_NET)
    );
    let (Some(runc), Some(cocoon)) = (runc, cocoon) else {
        return;
    };
    assert_eq!(
        (runc.0.as_str(), runc.1.as_str()),
        ("0\n", "1000\n"),
        "runc"
    );
    assert_eq!(cocoon, runc, "cocoon (left) differs from runc");
}
