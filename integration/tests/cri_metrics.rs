//! `cocoon metrics`: a running CRI pod's metrics (boot stages, agent call latency,
//! host process memory, containers and restarts) and the node's, in a well-formed
//! Prometheus exposition, printed once and served over HTTP.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use common::env;

const NET: u8 = 63;

fn cocoon(config: &std::path::Path) -> Command {
    let mut c = Command::new(cocoon_integration::workspace_root().join("target/debug/cocoon"));
    c.env("COCOON_CONFIG", config);
    c
}

fn metrics_once(config: &std::path::Path) -> String {
    let o = cocoon(config).arg("metrics").output().unwrap();
    assert!(
        o.status.success(),
        "cocoon metrics: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Checks the text format's rules that a scraper enforces: every sample's family
/// declared once, before its samples, and its samples together. Returns the samples.
fn parse(text: &str) -> Vec<(String, f64)> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut done: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample is `series value`");
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no TYPE before it");
        if family != current {
            assert!(
                !done.contains(&family.to_string()),
                "{family}'s samples are split"
            );
            done.push(current.clone());
            current = family.into();
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.push((series.to_string(), v));
    }
    samples
}

fn value(samples: &[(String, f64)], prefix: &str, contains: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|(s, _)| s.starts_with(prefix) && contains.iter().all(|c| s.contains(c)))
        .map(|(_, v)| *v)
}

#[tokio::test]
async fn a_pod_and_its_node_are_measured() {
    let test = "a_pod_and_its_node_are_measured";
    let Some(env) = env(test, COCOON, NET).await else {
        return;
    };
    let node = &env.node;
    let config = env.dir.path().join("cocoon.toml");
    let pconfig = node.pod_config("metered", "uid-metered", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    node.create_and_start(&pod, &c, &pconfig).await.unwrap();
    // kubelet's restart: the same name, the next attempt.
    c.metadata.as_mut().unwrap().attempt = 1;
    node.create_and_start(&pod, &c, &pconfig).await.unwrap();

    let samples = parse(&metrics_once(&config));
    assert_eq!(value(&samples, "cocoon_node_pods", &[]), Some(1.0));
    let sandbox = format!("sandbox=\"{pod}\"");
    let s = |prefix: &str, more: &[&str]| {
        let mut all = vec![sandbox.as_str()];
        all.extend_from_slice(more);
        value(&samples, prefix, &all)
    };
    assert!(s("cocoon_pod_boot_seconds", &["stage=\"agent_ready\""]).unwrap() > 0.0);
    assert!(
        s(
            "cocoon_agent_call_duration_seconds_count",
            &["method=\"Agent.CreateContainer\""]
        )
        .unwrap()
            >= 3.0,
        "sandbox and two containers"
    );
    assert_eq!(s("cocoon_pod_containers_created_total", &[]), Some(3.0));
    assert_eq!(s("cocoon_pod_container_restarts_total", &[]), Some(1.0));
    assert_eq!(s("cocoon_pod_vm_lost", &[]), Some(0.0));
    for process in [
        "containerd-shim",
        "cocoon-janitor",
        "qemu-system-x86",
        "virtiofsd",
    ] {
        let pss = s(
            "cocoon_pod_process_memory_bytes",
            &[&format!("process=\"{process}"), "kind=\"pss\""],
        );
        assert!(
            pss.unwrap_or(0.0) > 0.0,
            "no PSS for {process}: {samples:?}"
        );
    }

    // The same, served over HTTP.
    let mut server = cocoon(&config)
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut err = std::io::BufReader::new(server.stderr.take().unwrap());
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("cocoon metrics: serving http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let get = |path: &str| {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        reply
    };
    let reply = get("/metrics");
    let _ = server.kill();
    let _ = server.wait();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let served = parse(body);
    assert_eq!(value(&served, "cocoon_node_pods", &[]), Some(1.0));

    node.stop_and_remove_pod(&pod).await.unwrap();
    let after = parse(&metrics_once(&config));
    assert_eq!(value(&after, "cocoon_node_pods", &[]), Some(0.0));
}
