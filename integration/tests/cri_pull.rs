//! A CRI pod whose container image the guest pulls itself (`io.cocoon.guest-image`), by
//! digest, from a registry on the pod network's gateway: the container runs from the
//! pulled root filesystem, the host shares none for it, and a digest the registry lacks
//! fails CreateContainer with the reason.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use base64::Engine;
use serde_json::json;
use std::time::Duration;

mod common;

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_nested::registry::{layer, Registry, E};
use common::env;

const GUEST_PULL_NET: u8 = 48;

/// A minimal image: busybox, a shell, and a file saying where it came from.
fn image_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    vec![layer(&[
        E::Dir("bin"),
        E::File("bin/busybox", &busybox, 0o755),
        E::Link("bin/sh", "busybox"),
        E::Link("bin/cat", "busybox"),
        E::Link("bin/sleep", "busybox"),
        E::Link("bin/ls", "busybox"),
        E::Dir("etc"),
        E::File("etc/pulled", b"pulled in the guest\n", 0o644),
    ])]
}

/// A registry on the pod network's gateway (the bridge and its address exist once a
/// pod's network does) holding the test image; with the image's digest.
fn registry_on(test: &str, node: &CriNode) -> Option<(Registry, String)> {
    let gateway: Ipv4Addr = node.gateway();
    let registry = Registry::start_on(test, gateway)?;
    let digest = registry.push_image("cocoon/pulled", &image_layers());
    Some((registry, digest))
}

/// Creating and starting `c` in `pod` fails, saying `says` (`what`: what was refused).
async fn refused(
    node: &CriNode,
    pod: &str,
    c: &k8s_cri::v1::ContainerConfig,
    pconfig: &k8s_cri::v1::PodSandboxConfig,
    says: &str,
    what: &str,
) {
    match node.create_and_start(pod, c, pconfig).await {
        Ok(_) => panic!("{what}: it ran"),
        Err(e) => assert!(e.message().contains(says), "{what}: {e}"),
    }
}

/// The host shares no root filesystem for container `app` (under the shim's `run` dir).
fn no_host_root(run: &std::path::Path, app: &str, test: &str) {
    let shared: Vec<_> = cocoon_integration::mounts_under(run)
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&format!("{app}/rootfs")))
        .collect();
    assert!(
        shared.is_empty(),
        "{test}: the host mounted a rootfs for it: {shared:?}"
    );
}

/// Makes `c` run from the test image as the guest pulls it by `digest`.
fn pull_in_guest(c: &mut k8s_cri::v1::ContainerConfig, registry: &Registry, digest: &str) {
    c.annotations.insert(
        "io.cocoon.guest-image".into(),
        registry.reference("cocoon/pulled", digest),
    );
}

#[tokio::test]
async fn cocoon_pod_runs_an_image_the_guest_pulled() {
    let test = "cocoon_pod_runs_an_image_the_guest_pulled";
    let Some(env) = env(test, COCOON, GUEST_PULL_NET).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("pulled", "uid-pulled", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    let Some((registry, digest)) = registry_on(test, node) else {
        return;
    };

    let mut c = CriNode::container_config("app", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    pull_in_guest(&mut c, &registry, &digest);
    let app = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&app, &["/bin/cat", "/etc/pulled"], Duration::from_secs(30))
        .await
        .expect("ExecSync cat");
    assert_eq!(
        (code, out.as_str()),
        (0, "pulled in the guest\n"),
        "{test}: {err}"
    );
    // Its root is the pulled image, not the host's busybox image (which has /usr).
    let (_, out, _) = node
        .exec_sync(&app, &["/bin/ls", "/"], Duration::from_secs(30))
        .await
        .expect("ExecSync ls");
    assert!(
        !out.split_whitespace().any(|e| e == "usr"),
        "{test}: / holds {out:?}"
    );
    // The host shares no root filesystem for it.
    let run = env.dir.path().join("run");
    no_host_root(&run, &app, test);

    // A digest the registry does not have: CreateContainer fails, naming it.
    let missing = format!("sha256:{}", "0".repeat(64));
    let mut bad = CriNode::container_config("missing", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    pull_in_guest(&mut bad, &registry, &missing);
    let e = node
        .create_and_start(&pod, &bad, &pconfig)
        .await
        .expect_err("a missing digest was pulled");
    assert!(
        e.message().contains(&missing) && e.message().contains("not in the registry"),
        "{test}: {e}"
    );
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
    let left = cocoon_integration::mounts_under(&run);
    assert!(left.is_empty(), "{test}: mounts left: {left:?}");
}

const CONFIDENTIAL_NET: u8 = 47;

/// A confidential agent (`cocoon.confidential` on the guest's command line: without
/// hardware here, which changes only the agent) under its built-in default policy runs
/// only what the guest made: the pod's sandbox container is the agent's own pause (the
/// policy refuses any root the host shares, so the pod would not start otherwise), an
/// application container runs from an image the guest pulled by digest, and one whose
/// root the host would share is refused. Nothing of its inside reaches the host: exec,
/// the debug console and evidence the guest does not have are refused by the agent.
#[tokio::test]
async fn a_confidential_pod_runs_only_what_its_guest_made() {
    let test = "a_confidential_pod_runs_only_what_its_guest_made";
    let vm = "kernel_params = \"cocoon.confidential\"\n";
    // The debug console is on for the pod ([debug] console): the policy must still
    // refuse its sessions.
    let tables = "[debug]\nconsole = true\n";
    let Some(env) = common::env_vm(test, COCOON, CONFIDENTIAL_NET, false, vm, tables).await else {
        return;
    };
    let node = &env.node;
    let mut pconfig = node.pod_config("sealed", "uid-sealed", "default");
    // Init-data with no policy: the agent's built-in confidential one applies. A
    // confidential guest speaks plain HTTP only to registries its init-data names: the
    // test's, on the gateway (any port).
    let bare = base64::engine::general_purpose::STANDARD.encode(format!(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = '''\n\
         [image]\nplain_http_registries = [\"{}\"]\n'''\n",
        node.gateway()
    ));
    pconfig
        .annotations
        .insert("io.cocoon.init-data".into(), bare);
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let Some((registry, digest)) = registry_on(test, node) else {
        return;
    };

    // From a pulled image: it runs, and answers on the pod network.
    let serve = [
        "/bin/busybox",
        "nc",
        "-ll",
        "-p",
        "8080",
        "-e",
        "/bin/cat",
        "/etc/pulled",
    ];
    let mut c = CriNode::container_config("app", IMAGE_REF, &serve, &[]);
    // As kubelet sends it: the default policy wants the guest kernel's knobs masked.
    CriNode::with_kubelet_proc_masks(&mut c);
    pull_in_guest(&mut c, &registry, &digest);
    let app = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let ip: Ipv4Addr = node.pod_ip(&pod).await.unwrap().parse().unwrap();
    let addr = std::net::SocketAddr::from((ip, 8080));
    match common::reply_from(addr, Duration::from_secs(30)).await {
        Ok(r) => assert_eq!(r, "pulled in the guest\n", "{test}"),
        Err(e) => panic!("{test}: cannot reach {addr}: {e}\n{}", node.log_tail()),
    }

    // Refused by the agent's policy: exec, the debug console, a root the host shares.
    let e = node
        .exec_sync(&app, &["/bin/cat", "/etc/pulled"], Duration::from_secs(30))
        .await
        .expect_err("an exec into a confidential container");
    assert!(
        e.message().contains("ExecProcessRequest is blocked"),
        "{test}: {e}"
    );
    let cli = |args: &[&str]| {
        std::process::Command::new(cocoon_integration::workspace_root().join("target/debug/cocoon"))
            .args(args)
            .env("COCOON_CONFIG", env.dir.path().join("cocoon.toml"))
            .output()
            .expect("target/debug/cocoon (cargo build first)")
    };
    let debug = cli(&[
        "debug",
        &pod,
        "--namespace",
        "k8s.io",
        "--",
        "echo",
        "inside",
    ]);
    let said = String::from_utf8_lossy(&debug.stdout);
    assert!(
        !said.contains("inside")
            && said.contains("debug console is refused by the pod's agent policy"),
        "{test}: the debug console served a session, or did not say why not: {said}{}",
        String::from_utf8_lossy(&debug.stderr)
    );
    // Evidence on request: the policy lets it through, and a guest without a TEE
    // (cocoon.confidential alone, under TCG) says it has none.
    let attest = cli(&["attest", &pod, "--namespace", "k8s.io", "--nonce", "00ff"]);
    assert!(
        !attest.status.success()
            && String::from_utf8_lossy(&attest.stderr).contains("this guest has no TEE evidence"),
        "{test}: {}",
        String::from_utf8_lossy(&attest.stderr)
    );
    // A host-path volume, even on a pulled image.
    let vol = env.dir.path().join("volume");
    std::fs::create_dir_all(&vol).unwrap();
    let mut with_volume = c.clone();
    with_volume.metadata.as_mut().unwrap().name = "with-volume".into();
    with_volume.mounts = vec![k8s_cri::v1::Mount {
        host_path: vol.to_string_lossy().into_owned(),
        container_path: "/data".into(),
        ..Default::default()
    }];
    refused(
        node,
        &pod,
        &with_volume,
        &pconfig,
        "CreateContainerRequest is blocked",
        "a host-path volume in a confidential pod",
    )
    .await;
    // A capability beyond containerd's default set, even on a pulled image.
    let mut admin = c.clone();
    admin.metadata.as_mut().unwrap().name = "sys-admin".into();
    let sc = admin
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("container_config sets a security context");
    sc.capabilities = Some(k8s_cri::v1::Capability {
        add_capabilities: vec!["SYS_ADMIN".into()],
        ..Default::default()
    });
    refused(
        node,
        &pod,
        &admin,
        &pconfig,
        "CreateContainerRequest is blocked",
        "CAP_SYS_ADMIN in a confidential pod",
    )
    .await;
    let host_root = CriNode::container_config("host-root", IMAGE_REF, &["sleep", "3600"], &[]);
    refused(
        node,
        &pod,
        &host_root,
        &pconfig,
        "CreateContainerRequest is blocked",
        "a container on a root the host shared",
    )
    .await;

    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
    let mounts = cocoon_integration::mounts_under(env.dir.path());
    assert!(mounts.is_empty(), "{test}: mounts left: {mounts:?}");
    let left = cocoon_integration::pod_leftovers(&env.dir.path().join("run"));
    assert!(left.is_empty(), "{test}: left in the run dir: {left:?}");
}

const TLS_PULL_NET: u8 = 70;

/// A CA and a server certificate for `ip` it signed, made with openssl in `dir`: the CA
/// in PEM, and the server certificate's and key's paths.
fn make_tls(dir: &std::path::Path, ip: Ipv4Addr) -> Result<(String, PathBuf, PathBuf), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl: {e} (apt-get install openssl)"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ];
    openssl(
        &[
            ca.concat(),
            vec!["-subj", "/CN=test registry CA", "-days", "2"],
        ]
        .concat(),
    )?;
    let csr = [
        &["req", "-new"][..],
        &ec,
        &["-keyout", "server.key", "-out", "server.csr"],
    ];
    openssl(&[csr.concat(), vec!["-subj", "/CN=registry"]].concat())?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "2",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ])?;
    let ca = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| e.to_string())?;
    Ok((ca, dir.join("server.pem"), dir.join("server.key")))
}

/// A pod whose init-data's `cdh.toml` gives a registry root: its guest pulls from a
/// registry over TLS with it (and from no plain-HTTP registry it did not name).
#[tokio::test]
async fn cocoon_pod_pulls_over_tls_trusting_its_init_datas_roots() {
    let test = "cocoon_pod_pulls_over_tls_trusting_its_init_datas_roots";
    let Some(env) = env(test, COCOON, TLS_PULL_NET).await else {
        return;
    };
    let node = &env.node;
    let tls_dir = env.dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let (ca, cert, key) = match make_tls(&tls_dir, node.gateway()) {
        Ok(v) => v,
        Err(why) => return cocoon_nested::testing::missing(test, &why),
    };
    // Registry credentials from the key broker, asked for only by a registry that
    // challenges: public pulls go on without them.
    let gateway = node.gateway();
    let init_data = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n\
         [image]\nextra_root_certificates = [\"\"\"\n{ca}\"\"\"]\n\
         authenticated_registry_credentials_uri = \"{CREDENTIALS}\"\n'''\n\
         \"aa.toml\" = '''\n[token_configs.kbs]\nurl = \"http://{gateway}:1\"\n'''\n"
    );
    let mut pconfig = node.pod_config("tls", "uid-tls", "default");
    pconfig.annotations.insert(
        "io.cocoon.init-data".into(),
        base64::engine::general_purpose::STANDARD.encode(init_data),
    );
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let Some((plain, digest)) = registry_on(test, node) else {
        return;
    };
    let tls = plain.tls_twin(&cert, &key);

    let mut c = CriNode::container_config("app", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    pull_in_guest(&mut c, &tls, &digest);
    let app = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&app, &["/bin/cat", "/etc/pulled"], Duration::from_secs(30))
        .await
        .expect("ExecSync cat");
    assert_eq!(
        (code, out.as_str()),
        (0, "pulled in the guest\n"),
        "{test}: {err}"
    );

    // With roots given, a registry is spoken to over TLS unless named as plain HTTP.
    let mut c = CriNode::container_config("plain", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    pull_in_guest(&mut c, &plain, &digest);
    refused(
        node,
        &pod,
        &c,
        &pconfig,
        &plain.addr,
        "a plain-HTTP registry was pulled from over TLS",
    )
    .await;

    // A private registry: its credentials are the key broker's to give, and only for
    // hardware evidence, which this guest has none of. The agent says so.
    let private = plain.private_twin(&cert, &key);
    let mut c = CriNode::container_config("private", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    pull_in_guest(&mut c, &private, &digest);
    let e = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .expect_err("a private registry was pulled from without credentials");
    assert!(
        e.message().contains(CREDENTIALS) && e.message().contains("no TEE evidence"),
        "{test}: {e}"
    );
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
}

/// Where the TLS pod's init-data says its registry credentials are.
const CREDENTIALS: &str = "kbs:///default/credential/test";

const KUBE_PULL_NET: u8 = 74;

/// As Kubernetes runs it: the pod says `io.cocoon.guest-pull: "true"` (a Pod's containers
/// cannot carry annotations of their own), the node pulls the container's image by digest
/// as kubelet does before creating it, and the container is created from the reference
/// CRI gave back. The guest pulls the same image by digest from the registry and the
/// container runs from that; the host shares no root filesystem for it. A container whose
/// image is named by tag is refused, naming why.
#[tokio::test]
async fn a_kubernetes_pod_has_its_containers_images_pulled_in_the_guest() {
    let test = "a_kubernetes_pod_has_its_containers_images_pulled_in_the_guest";
    let Some(env) = env(test, COCOON, KUBE_PULL_NET).await else {
        return;
    };
    let node = &env.node;
    let mut pconfig = node.pod_config("kube-pull", "uid-kube-pull", "default");
    pconfig
        .annotations
        .insert("io.cocoon.guest-pull".into(), "true".into());
    // A pod owner's policy pins each container's process to its image's command, as
    // the guest read it from the pulled image's config.
    let rego = cocoon_integration::policy::allowing_all(
        &["ExecProcess", "ReadStream"],
        "default CreateContainerImageRequest := false\n\
         CreateContainerImageRequest if {\n\
         input.oci.process.args == input.image_config.Cmd\n}\n",
    );
    let init_data = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = '''\n{rego}'''\n"
    );
    pconfig.annotations.insert(
        "io.cocoon.init-data".into(),
        base64::engine::general_purpose::STANDARD.encode(init_data),
    );
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let gateway: Ipv4Addr = node.gateway();
    let Some(registry) = Registry::start_on(test, gateway) else {
        return;
    };
    let config = serde_json::json!({"Cmd": ["/bin/sleep", "3600"]});
    let digest = registry.push_image_with("cocoon/pulled", &image_layers(), config);
    node.plain_http_registry(&registry.addr);
    let image = registry.reference("cocoon/pulled", &digest);
    let image_ref = node
        .pull_image(&image)
        .await
        .unwrap_or_else(|e| panic!("{test}: PullImage {image}: {e}\n{}", node.log_tail()));

    let c = CriNode::container_config("app", &image_ref, &["/bin/sleep", "3600"], &[]);
    let app = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&app, &["/bin/cat", "/etc/pulled"], Duration::from_secs(30))
        .await
        .expect("ExecSync cat");
    assert_eq!(
        (code, out.as_str()),
        (0, "pulled in the guest\n"),
        "{test}: {err}"
    );
    no_host_root(&env.dir.path().join("run"), &app, test);

    // The same image with a process its config does not name: the guest pulls it,
    // reads its config, and refuses, leaving nothing.
    let c = CriNode::container_config("other", &image_ref, &["/bin/sh", "-c", "id"], &[]);
    refused(
        node,
        &pod,
        &c,
        &pconfig,
        "CreateContainerImageRequest",
        "a process the image's config does not name was run",
    )
    .await;

    // An image the node knows by tag only: the guest could not check what it pulls.
    let c = CriNode::container_config("tagged", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    refused(
        node,
        &pod,
        &c,
        &pconfig,
        "not named by digest",
        "a container of an image named by tag was pulled in the guest",
    )
    .await;
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
}

const GENPOLICY_NET: u8 = 75;

/// A confidential pod whose policy `cocoon policy generate` wrote from its manifest: its
/// containers run as the manifest says, as the image's named user with the groups
/// containerd gives it (the image's and the pod's); a container the manifest does not
/// name, or one of its containers with another command, as root, or with a group more,
/// is refused by the agent after the pull.
#[tokio::test]
async fn a_generated_policy_runs_the_manifest_and_nothing_else() {
    let test = "a_generated_policy_runs_the_manifest_and_nothing_else";
    let vm = "kernel_params = \"cocoon.confidential\"\n";
    let Some(env) = common::env_vm(test, COCOON, GENPOLICY_NET, false, vm, "").await else {
        return;
    };
    let node = &env.node;
    // The pod network's bridge (and the registry's address on it) exists once a pod
    // has a network: a runc pod makes it, so the manifest can name the registry.
    let bootstrap = node.pod_config("net", "uid-net", "default");
    let first = node
        .run_pod(&bootstrap, cocoon_integration::cri::RUNC)
        .await
        .unwrap_or_else(|e| panic!("{test}: runc RunPodSandbox: {e}\n{}", node.log_tail()));
    let gateway: Ipv4Addr = node.gateway();
    let Some(registry) = Registry::start_on(test, gateway) else {
        return;
    };
    // The test image with accounts, run as its user `app` by name.
    let mut layers = image_layers();
    layers.push(layer(&[
        E::Link("bin/id", "busybox"),
        E::File(
            "etc/passwd",
            b"root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
            0o644,
        ),
        E::File(
            "etc/group",
            b"root:x:0:\nstaff:x:50:app\nwheel:x:10:root\napp:x:1000:\n",
            0o644,
        ),
    ]));
    let digest = registry.push_image_with("cocoon/accounts", &layers, json!({"User": "app"}));
    node.plain_http_registry(&registry.addr);
    let image = registry.reference("cocoon/accounts", &digest);
    let serve = r#"["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/id"]"#;
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sealed\n  annotations:\n    \
         io.cocoon.guest-pull: \"true\"\nspec:\n  runtimeClassName: cocoon\n  \
         securityContext:\n    fsGroup: 2000\n    supplementalGroups: [3000]\n  containers:\n  \
         - name: app\n    image: {image}\n    command: {serve}\n  \
         - name: side\n    image: {image}\n    command: [\"/bin/sleep\", \"3600\"]\n"
    );
    let base = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = '''\n\
         [image]\nplain_http_registries = [\"{}\"]\n'''\n",
        node.gateway()
    );
    // The node's containerd: before 1.6.22 and 1.7.3 it gives a named image user root's
    // groups (wheel) rather than its own (staff); the policy is made for it.
    let containerd = node.runtime_version().await.expect("CRI Version");
    let containerd = containerd.trim_start_matches('v').to_owned();
    let older = ["1.6.", "1.7."].iter().any(|minor| {
        containerd
            .strip_prefix(minor)
            .and_then(|p| {
                p.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
            .is_some_and(|patch| patch < if minor == &"1.6." { 22 } else { 3 })
    });
    let image_group = if older { "10(wheel)" } else { "50(staff)" };
    let dir = env.dir.path();
    std::fs::write(dir.join("pod.yaml"), &manifest).unwrap();
    std::fs::write(dir.join("base.toml"), &base).unwrap();
    let out = std::process::Command::new(
        cocoon_integration::workspace_root().join("target/debug/cocoon"),
    )
    .args([
        "policy",
        "generate",
        "--annotation",
        "--containerd",
        &containerd,
    ])
    .arg("--init-data")
    .arg(dir.join("base.toml"))
    .arg(dir.join("pod.yaml"))
    .output()
    .expect("target/debug/cocoon (cargo build first)");
    assert!(
        out.status.success(),
        "{test}: cocoon policy generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let annotation = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mut pconfig = node.pod_config("sealed", "uid-sealed", "default");
    pconfig
        .annotations
        .insert("io.cocoon.guest-pull".into(), "true".into());
    pconfig
        .annotations
        .insert("io.cocoon.init-data".into(), annotation);
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let image_ref = node
        .pull_image(&image)
        .await
        .unwrap_or_else(|e| panic!("{test}: PullImage {image}: {e}\n{}", node.log_tail()));
    // As kubelet makes it of the manifest: the pod's supplementalGroups, then fsGroup.
    let container = |name: &str, command: &[&str], attempt: u32| {
        let mut c = CriNode::container_config(name, &image_ref, command, &[]);
        CriNode::with_kubelet_proc_masks(&mut c);
        c.metadata.as_mut().unwrap().attempt = attempt;
        security(&mut c).supplemental_groups = vec![3000, 2000];
        c
    };

    let serve: Vec<&str> = serde_json::from_str(serve).unwrap();
    node.create_and_start(&pod, &container("app", &serve, 0), &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start app: {e}\n{}", node.log_tail()));
    let ip: Ipv4Addr = node.pod_ip(&pod).await.unwrap().parse().unwrap();
    let addr = std::net::SocketAddr::from((ip, 8080));
    // containerd's groups: the user's own, the image's group listing it, the pod's.
    match common::reply_from(addr, Duration::from_secs(30)).await {
        Ok(r) => {
            assert!(
                r.starts_with("uid=1000(app) gid=1000(app) groups="),
                "{test}: {r}"
            );
            let groups: std::collections::BTreeSet<&str> =
                r.trim().rsplit('=').next().unwrap().split(',').collect();
            let want = ["1000(app)", image_group, "2000", "3000"];
            assert_eq!(groups, want.into_iter().collect(), "{test}: {r}");
        }
        Err(e) => panic!("{test}: cannot reach {addr}: {e}\n{}", node.log_tail()),
    }
    let mut as_root = container("side", &["/bin/sleep", "3600"], 1);
    security(&mut as_root).run_as_user = Some(k8s_cri::v1::Int64Value { value: 0 });
    let mut more_groups = container("side", &["/bin/sleep", "3600"], 2);
    security(&mut more_groups).supplemental_groups.push(4000);
    for (c, what) in [
        (
            container("side", &["/bin/sleep", "1"], 0),
            "side with another command",
        ),
        (
            container("intruder", &["/bin/sleep", "3600"], 0),
            "a container it does not name",
        ),
        (as_root, "side as root"),
        (more_groups, "side with a group more"),
    ] {
        let what = format!("{test}: {what}, which its manifest does not say");
        refused(
            node,
            &pod,
            &c,
            &pconfig,
            "CreateContainerImageRequest",
            &what,
        )
        .await;
    }
    // The sidecar as its manifest says (a new attempt: CRI keeps the refused ones' names).
    let side = container("side", &["/bin/sleep", "3600"], 3);
    node.create_and_start(&pod, &side, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start side: {e}\n{}", node.log_tail()));
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
    node.stop_and_remove_pod(&first)
        .await
        .expect("stop/remove runc pod");
}

/// The Linux security context `container_config` gives every container.
fn security(
    c: &mut k8s_cri::v1::ContainerConfig,
) -> &mut k8s_cri::v1::LinuxContainerSecurityContext {
    c.linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("container_config sets a security context")
}
