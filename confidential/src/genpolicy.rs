//! `cocoon policy generate`: an agent policy for one pod, from its Kubernetes manifest
//! (a Pod, or a workload's pod template: Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! Job, CronJob; other documents beside it are skipped),
//! in the spirit of Confidential Containers' `genpolicy`. The host builds every
//! container's spec; in a confidential pod it is not trusted to build the one the pod's
//! owner wrote. The generated policy is the built-in confidential one plus a
//! `CreateContainerImageRequest` rule that holds each container, by its name in the
//! pod, to what the manifest and its image say:
//!
//! - the image the guest pulls: the manifest's, by digest;
//! - the process's arguments: `command` + `args`, or the image's `Entrypoint` with the
//!   manifest's `args`, or the image's `Entrypoint` + `Cmd` (Kubernetes' rules), the
//!   image's config as the guest read it from the digest-checked blob;
//! - the working directory: `workingDir`, else the image's, else `/`;
//! - the environment: every literal `env` entry of the manifest present; nothing else
//!   but the image's own entries, the names the manifest fills from elsewhere
//!   (`valueFrom`, `envFrom` is refused), and what Kubernetes adds (service links,
//!   `HOSTNAME`);
//! - the user and group, when the manifest's `securityContext` names them;
//! - the key broker secrets, only as the pod's own annotation asks.
//!
//! Every container must then be pulled in the guest (the pod needs
//! `io.cocoon.guest-pull: "true"`), which a policy naming the rule enforces.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// The confidential default this policy builds on.
const DEFAULT_POLICY: &str = include_str!("../../guest-agent/policy/confidential-default.rego");

/// The generic rules; `pinned` (the containers' data) comes before them.
const RULES: &str = r#"
# Each container, by its name in the pod, as its manifest and its pulled image say.
default CreateContainerImageRequest := false

CreateContainerImageRequest if {
	c := pinned[input.oci.annotations["io.kubernetes.cri.container-name"]]
	input.guest_image == c.image
	process := input.oci.process
	process.args == pinned_args(c)
	process.cwd == pinned_cwd(c)
	env := object.get(process, "env", [])
	every e in env {
		pinned_env_allows(c, e)
	}
	every e in c.env {
		e in env
	}
	# One entry per name: programs differ on which of two they read.
	names := [split(e, "=")[0] | some e in env]
	count({n | some n in names}) == count(names)
	# The image's own variables stay, unless the manifest sets the name.
	every e in image_list("Env") {
		image_env_kept(c, e, env)
	}
	pinned_id(c.uid, image_uid(c), process.user.uid)
	pinned_id(c.gid, null, process.user.gid)
	not root_refused(c, process.user.uid)
	pinned_security(c, input.oci)
	object.get(input.oci.annotations, "io.cocoon.kbs-secrets", "") == c.kbs_secrets
	every m in object.get(input.oci, "mounts", []) {
		m.destination in allowed_destinations
	}
	every p in object.get(input.oci, ["linux", "maskedPaths"], []) {
		p in kubelet_masked_paths
	}
	every p in object.get(input.oci, ["linux", "readonlyPaths"], []) {
		p in kubelet_readonly_paths
	}
	not seccomp_fakes_success(object.get(input.oci, ["linux", "seccomp"], {}))
}

# The image's config as the guest read it; a field it leaves null is absent.
image_list(key) := v if {
	v := object.get(input.image_config, key, [])
	is_array(v)
}

image_list(key) := [] if not is_array(object.get(input.image_config, key, []))

image_string(key) := v if {
	v := object.get(input.image_config, key, "")
	is_string(v)
}

image_string(key) := "" if not is_string(object.get(input.image_config, key, ""))

pinned_args(c) := array.concat(c.command, c.args) if count(c.command) > 0

pinned_args(c) := array.concat(image_list("Entrypoint"), c.args) if {
	count(c.command) == 0
	count(c.args) > 0
}

pinned_args(c) := array.concat(image_list("Entrypoint"), image_list("Cmd")) if {
	count(c.command) == 0
	count(c.args) == 0
}

pinned_cwd(c) := c.working_dir if c.working_dir != ""

pinned_cwd(c) := image_string("WorkingDir") if {
	c.working_dir == ""
	image_string("WorkingDir") != ""
}

pinned_cwd(c) := "/" if {
	c.working_dir == ""
	image_string("WorkingDir") == ""
}

pinned_env_allows(c, e) if e in c.env

pinned_env_allows(c, e) if e in image_list("Env")

pinned_env_allows(c, e) if split(e, "=")[0] in c.env_from_elsewhere

# The pod's hostname: the host's to choose in any case (it runs the UTS namespace).
pinned_env_allows(_, e) if regex.match(`^HOSTNAME=[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`, e)

# containerd's own PATH, which stays when the image gives none.
pinned_env_allows(_, e) if {
	e == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	not image_sets("PATH")
}

# Service links, as kubelet writes them (addresses, ports, protocols only), for names
# neither the manifest nor the image sets; with enableServiceLinks false, only the API
# server's own.
pinned_env_allows(c, e) if {
	name := split(e, "=")[0]
	not manifest_sets(c, name)
	not image_sets(name)
	service_link(e)
	link_allowed(c, name)
}

link_allowed(c, _) if c.service_links == true

link_allowed(_, name) if startswith(name, "KUBERNETES_")

service_link(e) if regex.match(`^[A-Z0-9_]+_SERVICE_HOST=[0-9a-f.:]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_SERVICE_PORT(_[A-Z0-9_]+)?=[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT=(tcp|udp|sctp)://[0-9a-f.:\[\]]+:[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)=(tcp|udp|sctp)://[0-9a-f.:\[\]]+:[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_PROTO=(tcp|udp|sctp)$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_PORT=[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_ADDR=[0-9a-f.:]+$`, e)

manifest_sets(c, name) if name in c.env_from_elsewhere

manifest_sets(c, name) if {
	some e in c.env
	split(e, "=")[0] == name
}

image_sets(name) if {
	some e in image_list("Env")
	split(e, "=")[0] == name
}

image_env_kept(_, e, env) if e in env

image_env_kept(c, e, _) if manifest_sets(c, split(e, "=")[0])

# The image's numeric user when the manifest names none (a named one needs the image's
# /etc/passwd, which the policy does not read).
image_uid(c) := to_number(split(image_string("User"), ":")[0]) if {
	c.uid == null
	regex.match(`^[0-9]+(:[0-9]+)?$`, image_string("User"))
}

image_uid(c) := null if {
	c.uid == null
	not regex.match(`^[0-9]+(:[0-9]+)?$`, image_string("User"))
}

image_uid(c) := null if c.uid != null

pinned_id(want, _, got) if want == got

pinned_id(want, from_image, got) if {
	want == null
	from_image == got
}

pinned_id(want, from_image, _) if {
	want == null
	from_image == null
}

root_refused(c, uid) if {
	c.run_as_non_root
	uid == 0
}

# allowPrivilegeEscalation: false, readOnlyRootFilesystem and the capabilities the
# manifest drops, as kubelet turns them into the spec.
pinned_security(c, oci) if {
	nnp_as_manifest(c, oci.process)
	read_only_as_manifest(c, oci)
	caps_as_manifest(c, oci)
}

nnp_as_manifest(c, _) if c.no_new_privileges == false

nnp_as_manifest(c, process) if {
	c.no_new_privileges == true
	object.get(process, "noNewPrivileges", false) == true
}

read_only_as_manifest(c, _) if c.read_only_root == false

read_only_as_manifest(c, oci) if {
	c.read_only_root == true
	object.get(oci, ["root", "readonly"], false) == true
}

caps_as_manifest(c, oci) if {
	every kind in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
		every cap in object.get(oci.process, ["capabilities", kind], []) {
			cap_allowed(c, cap)
		}
	}
}

cap_allowed(c, cap) if {
	not c.drop_all
	not cap in c.caps_dropped
}

cap_allowed(c, cap) if {
	c.drop_all
	cap in c.caps_added
}

# A syscall made to return 0 without running (a privilege drop that never happens).
seccomp_fakes_success(s) if object.get(s, "defaultErrnoRet", 1) == 0

seccomp_fakes_success(s) if {
	some r in object.get(s, "syscalls", [])
	object.get(r, "errnoRet", 1) == 0
}

allowed_destinations := {
	"/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm",
	"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log",
}

# kubelet's and containerd's defaults: more would hide files of the image.
kubelet_masked_paths := {
	"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
	"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
	"/sys/firmware", "/sys/devices/virtual/powercap",
}

kubelet_readonly_paths := {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
"#;

/// Init-data (TOML) for the pod in `manifest` (a Kubernetes Pod, YAML or JSON): its
/// policy, and the other documents of `base` (init-data whose `aa.toml` and `cdh.toml`
/// name the key broker and registries) kept; `algorithm` when there is no base.
pub fn generate(manifest: &str, base: Option<&str>, algorithm: &str) -> Result<String, String> {
    let pod = pod_of(manifest)?;
    let pinned = pinned(&pod)?;
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    // It goes into the policy's text (a comment): a DNS name, as Kubernetes requires.
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    {
        return Err(format!("metadata.name {name:?} is not a DNS name"));
    }
    let policy = format!(
        "{DEFAULT_POLICY}\n# Generated by `cocoon policy generate` for pod {name}.\npinned := {}\n{RULES}",
        serde_json::to_string_pretty(&pinned).map_err(|e| e.to_string())?
    );
    let (algorithm, mut data) = match base {
        None => (algorithm.to_owned(), BTreeMap::new()),
        Some(text) => {
            let base = crate::initdata::InitData::parse(text.as_bytes())
                .map_err(|e| format!("the base init-data: {e}"))?;
            if base.policy().is_some() {
                return Err("the base init-data has a policy.rego already".into());
            }
            (base.algorithm.name().to_owned(), base.data.clone())
        }
    };
    data.insert(crate::initdata::POLICY_KEY.to_owned(), policy);
    let mut doc = toml::Table::new();
    doc.insert("version".into(), "0.1.0".into());
    doc.insert("algorithm".into(), algorithm.into());
    let data: toml::Table = data.into_iter().map(|(k, v)| (k, v.into())).collect();
    doc.insert("data".into(), data.into());
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    // What it made must be what the agent takes.
    crate::initdata::InitData::parse(text.as_bytes())
        .map_err(|e| format!("the generated init-data does not parse: {e}"))?;
    Ok(text)
}

/// The one Pod in `manifest`, as JSON.
fn pod_of(manifest: &str) -> Result<Value, String> {
    let docs = yaml_rust2::YamlLoader::load_from_str(manifest)
        .map_err(|e| format!("the manifest is not YAML: {e}"))?;
    let mut pods = Vec::new();
    for d in &docs {
        let v = to_json(d)?;
        let template = match v.get("kind").and_then(Value::as_str) {
            Some("Pod") => {
                pods.push(v);
                continue;
            }
            Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => {
                &v["spec"]["template"]
            }
            Some("CronJob") => &v["spec"]["jobTemplate"]["spec"]["template"],
            // Services, ConfigMaps and the like beside the workload: not the policy's.
            Some(_) => continue,
            None => return Err("a manifest document has no kind".into()),
        };
        if !template.is_object() {
            return Err(format!("the {} has no pod template", v["kind"]));
        }
        // The pods it makes are named after it.
        let mut metadata = template["metadata"].clone();
        if metadata["name"].is_null() {
            metadata["name"] = v["metadata"]["name"].clone();
        }
        pods.push(json!({"kind": "Pod", "metadata": metadata, "spec": template["spec"]}));
    }
    match <[Value; 1]>::try_from(pods) {
        Ok([pod]) => Ok(pod),
        Err(p) => Err(format!(
            "the manifest holds {} Pods or workloads with a pod template; give one",
            p.len()
        )),
    }
}

fn to_json(y: &yaml_rust2::Yaml) -> Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .map(|f| json!(f))
            .map_err(|_| format!("{r:?} is not a number"))?,
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let k = match k {
                    // A merge key would bring values the policy never sees as such.
                    Yaml::String(s) if s == "<<" => {
                        return Err("the manifest uses a YAML merge key (<<); write it out".into())
                    }
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a mapping key {other:?} is not a string")),
                };
                m.insert(k, to_json(v)?);
            }
            Value::Object(m)
        }
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err("the manifest uses an alias or a bad value".into())
        }
    })
}

/// What the policy holds each container to, by name.
fn pinned(pod: &Value) -> Result<Value, String> {
    let spec = &pod["spec"];
    let secrets = pod["metadata"]["annotations"]["io.cocoon.kbs-secrets"]
        .as_str()
        .unwrap_or_default();
    let pod_ids = &spec["securityContext"];
    let service_links = match &spec["enableServiceLinks"] {
        Value::Null => true,
        Value::Bool(b) => *b,
        _ => return Err("spec.enableServiceLinks is not true or false".into()),
    };
    let mut out = Map::new();
    let all = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default());
    for c in all {
        let name = c["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or("a container has no name")?
            .to_owned();
        let bad = |why: String| format!("container {name}: {why}");
        let image = c["image"].as_str().ok_or_else(|| bad("no image".into()))?;
        let image = crate::image_ref::digest_reference(image).ok_or_else(|| {
            bad(format!(
                "image {image:?} is not named by digest; the guest pulls by digest only"
            ))
        })?;
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match &c[key] {
                Value::Null => Ok(Vec::new()),
                Value::Array(a) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        Value::Number(n) => Ok(n.to_string()),
                        _ => Err(bad(format!("{key} holds a non-string"))),
                    })
                    .collect(),
                _ => Err(bad(format!("{key} is not a list"))),
            }
        };
        if !c["envFrom"].is_null() {
            return Err(bad(
                "envFrom names variables the manifest does not show; list them in env".into(),
            ));
        }
        let (mut env, mut elsewhere) = (Vec::new(), Vec::new());
        for e in c["env"].as_array().cloned().unwrap_or_default() {
            let n = e["name"]
                .as_str()
                .ok_or_else(|| bad("an env entry has no name".into()))?;
            match (&e["value"], &e["valueFrom"]) {
                (Value::String(v), Value::Null) => {
                    if v.contains("$(") {
                        return Err(bad(format!(
                            "env {n} refers to another variable ($(...)), which kubelet expands"
                        )));
                    }
                    env.push(format!("{n}={v}"));
                }
                (Value::Null, Value::Null) => env.push(format!("{n}=")),
                (Value::Null, _) => elsewhere.push(n.to_owned()),
                _ => return Err(bad(format!("env {n} has both value and valueFrom"))),
            }
        }
        let id = |key: &str| -> Result<Value, String> {
            let v = match &c["securityContext"][key] {
                Value::Null => &pod_ids[key],
                v => v,
            };
            match v {
                Value::Null => Ok(Value::Null),
                Value::Number(n) if n.is_u64() => Ok(v.clone()),
                _ => Err(bad(format!("securityContext.{key} is not a number"))),
            }
        };
        let (command, args) = (strings("command")?, strings("args")?);
        if command.iter().chain(&args).any(|a| a.contains("$(")) {
            return Err(bad(
                "command or args refer to a variable ($(...)), which kubelet expands".into(),
            ));
        }
        let sc = &c["securityContext"];
        let caps = |key: &str| -> Result<Vec<String>, String> {
            match &sc["capabilities"][key] {
                Value::Null => Ok(Vec::new()),
                Value::Array(a) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(|n| format!("CAP_{}", n.trim_start_matches("CAP_")))
                            .ok_or_else(|| bad(format!("capabilities.{key} holds a non-string")))
                    })
                    .collect(),
                _ => Err(bad(format!("capabilities.{key} is not a list"))),
            }
        };
        let dropped = caps("drop")?;
        let flag = |v: &Value, key: &str| -> Result<Option<bool>, String> {
            match v {
                Value::Null => Ok(None),
                Value::Bool(b) => Ok(Some(*b)),
                _ => Err(bad(format!("securityContext.{key} is not true or false"))),
            }
        };
        let non_root = match flag(&sc["runAsNonRoot"], "runAsNonRoot")? {
            Some(b) => b,
            None => flag(&pod_ids["runAsNonRoot"], "runAsNonRoot")?.unwrap_or(false),
        };
        let pin = json!({
            "image": image,
            "command": command,
            "args": args,
            "run_as_non_root": non_root,
            "no_new_privileges": flag(&sc["allowPrivilegeEscalation"], "allowPrivilegeEscalation")? == Some(false),
            "read_only_root": flag(&sc["readOnlyRootFilesystem"], "readOnlyRootFilesystem")? == Some(true),
            "drop_all": dropped.iter().any(|d| d == "CAP_ALL"),
            "caps_dropped": dropped,
            "caps_added": caps("add")?,
            "service_links": service_links,
            "working_dir": c["workingDir"].as_str().unwrap_or_default(),
            "env": env,
            "env_from_elsewhere": elsewhere,
            "uid": id("runAsUser")?,
            "gid": id("runAsGroup")?,
            "kbs_secrets": secrets,
        });
        if out.insert(name.clone(), pin).is_some() {
            return Err(format!("two containers are named {name}"));
        }
    }
    if out.is_empty() {
        return Err("the Pod has no containers".into());
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:4f0c5ea0d4c1e7f7b3aa7b6e0f2f9a0b2c6d1e5f8a9b0c1d2e3f4a5b6c7d8e9f";

    fn pod(container: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  runtimeClassName: cocoon\n  containers:\n{container}"
        )
    }

    #[test]
    fn a_pods_containers_are_pinned_by_name() {
        let yaml = pod(&format!(
            "  - name: app\n    image: r.io:5000/team/app:1@{DIGEST}\n    command: [\"/bin/app\"]\n    args: [\"--port\", 8080]\n    workingDir: /srv\n    env:\n    - name: MODE\n      value: prod\n    - name: TOKEN\n      valueFrom:\n        secretKeyRef: {{name: s, key: k}}\n    securityContext:\n      runAsUser: 1000\n"
        ));
        let p = pinned(&pod_of(&yaml).unwrap()).unwrap();
        assert_eq!(
            p["app"],
            json!({"image": format!("r.io:5000/team/app@{DIGEST}"), "command": ["/bin/app"],
                   "args": ["--port", "8080"], "working_dir": "/srv", "env": ["MODE=prod"],
                   "env_from_elsewhere": ["TOKEN"], "uid": 1000, "gid": null, "kbs_secrets": "",
                   "run_as_non_root": false, "no_new_privileges": false, "read_only_root": false,
                   "drop_all": false, "caps_dropped": [], "caps_added": [], "service_links": true})
        );
        let text = generate(&yaml, None, "sha384").unwrap();
        let doc = crate::initdata::InitData::parse(text.as_bytes()).unwrap();
        let policy = doc.policy().unwrap();
        assert!(policy.contains("CreateContainerImageRequest") && policy.contains("pinned :="));
    }

    #[test]
    fn what_cannot_be_pinned_is_refused_by_name() {
        for (container, says) in [
            ("  - name: a\n    image: r.io/app:1\n", "not named by digest"),
            (&format!("  - name: a\n    image: r.io/app@{DIGEST}\n    envFrom: [{{configMapRef: {{name: c}}}}]\n") as &str, "envFrom"),
            (&format!("  - name: a\n    image: r.io/app@{DIGEST}\n    env: [{{name: X, value: \"$(Y)\"}}]\n"), "kubelet expands"),
            (&format!("  - name: a\n    image: r.io/app@{DIGEST}\n  - name: a\n    image: r.io/app@{DIGEST}\n"), "two containers"),
            (&format!("  - image: r.io/app@{DIGEST}\n"), "no name"),
            (&format!("  - name: a\n    image: r.io/app@{DIGEST}\n    args: [\"$(X)\"]\n"), "kubelet expands"),
            (&format!("  - &c\n    name: a\n    image: r.io/app@{DIGEST}\n  - <<: *c\n    name: b\n"), "merge key"),
        ] {
            let e = generate(&pod(container), None, "sha384").unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let e = generate("kind: Deployment\n", None, "sha384").unwrap_err();
        assert!(e.contains("pod template"), "{e}");
        let e = generate("kind: Service\n", None, "sha384").unwrap_err();
        assert!(e.contains("holds 0"), "{e}");
        assert!(generate("{", None, "sha384").is_err());
    }

    #[test]
    fn a_workloads_pod_template_is_its_pod() {
        let deployment = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  \
             template:\n    metadata:\n      annotations: {{io.cocoon.kbs-secrets: \"k=a/b/c\"}}\n    \
             spec:\n      containers:\n      - name: a\n        image: r.io/app@{DIGEST}\n"
        );
        let pod = pod_of(&deployment).unwrap();
        assert_eq!(pod["metadata"]["name"], "web");
        let p = pinned(&pod).unwrap();
        assert_eq!(p["a"]["kbs_secrets"], "k=a/b/c");
        let cron = format!(
            "kind: CronJob\nmetadata: {{name: nightly}}\nspec:\n  jobTemplate:\n    spec:\n      \
             template:\n        spec:\n          containers:\n          - name: a\n            \
             image: r.io/app@{DIGEST}\n"
        );
        assert!(generate(&cron, None, "sha384").is_ok());
    }

    #[test]
    fn a_base_init_data_keeps_its_documents() {
        let yaml = pod(&format!("  - name: a\n    image: r.io/app@{DIGEST}\n"));
        let base = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n[image]\nplain_http_registries = [\"r.io\"]\n'''\n";
        let text = generate(&yaml, Some(base), "sha384").unwrap();
        let doc = crate::initdata::InitData::parse(text.as_bytes()).unwrap();
        assert_eq!(doc.registry_config().unwrap().plain_http, ["r.io"]);
        assert_eq!(doc.algorithm.name(), "sha256");
        let with_policy = format!("{base}\"policy.rego\" = \"package agent_policy\"\n");
        assert!(generate(&yaml, Some(&with_policy), "sha384").is_err());
    }
}
