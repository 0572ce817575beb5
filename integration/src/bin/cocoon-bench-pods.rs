//! `cocoon bench pods` (this binary does the work; `cocoon` hands it the arguments):
//! Kubernetes-style pod start through containerd's CRI plugin, as kubelet drives it,
//! cocoon against runc in the same run on the same node (a private containerd with a CNI
//! bridge, as the tests use):
//!
//! - sequential: RunPodSandbox → CreateContainer → StartContainer returned (the
//!   container runs), alternating handlers, median and p90;
//! - concurrent: N pods started at once, time until all run, and the host memory per
//!   pod: the proportional set size (Pss) of every process under the node's shims (for
//!   cocoon the shim, the VMM, its vsock backend and virtiofsd; for runc the shim and
//!   the containers), divided by N.
//!
//! Writes a JSON report and prints a table. Needs root, containerd, runc, the CNI
//! plugins and the guest image (`make image`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cocoon_integration::cri::{self, CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use cocoon_shim::bench::Stats;
use serde_json::json;

/// The bench node's pod network, `198.18.60.0/24` (apart from the tests').
const NET: u8 = 60;

struct Args {
    runs: usize,
    concurrent: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 10,
        concurrent: 10,
        out: PathBuf::from("cocoon-bench-pods.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value()?.parse().map_err(|_| "--runs wants a number")?,
            "--concurrent" => {
                a.concurrent = value()?
                    .parse()
                    .map_err(|_| "--concurrent wants a number")?
            }
            "--out" => a.out = PathBuf::from(value()?),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--runs N --concurrent N --out PATH)"
                ))
            }
        }
    }
    if a.runs == 0 || a.concurrent == 0 {
        return Err("--runs and --concurrent must be at least 1".into());
    }
    Ok(a)
}

/// Starts one pod with one `sleep` container; returns the pod id once it runs.
async fn start_pod(node: &CriNode, handler: &str, name: &str) -> Result<String, String> {
    let pconfig = node.pod_config(name, &format!("uid-{name}"), "bench");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let c = CriNode::container_config("main", IMAGE_REF, &["sleep", "3600"], &[]);
    node.create_and_start(&pod, &c, &pconfig)
        .await
        .map_err(|e| format!("create/start ({handler}): {e}"))?;
    Ok(pod)
}

fn pss_kib(pid: u32) -> u64 {
    cocoon_shim::telemetry::Rollup::of(pid).map_or(0, |r| r.pss)
}

/// Pss of the node's shims and everything under them.
fn node_pss_kib(node: &CriNode) -> u64 {
    let shims: Vec<u32> = cocoon_integration::processes_mentioning(&node.address.to_string_lossy())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim"))
        .map(|(pid, _)| pid)
        .collect();
    let below = cocoon_shim::telemetry::descendants(&shims);
    shims.iter().chain(&below).map(|&p| pss_kib(p)).sum()
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, CNI, runc)".into());
    }
    if let Some(why) = cri::cni_missing() {
        return Err(why);
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = cri::write_shim_config(dir.path(), Duration::from_secs(300));
    let node = CriNode::start(&dir.path().join("containerd"), &config, NET).await;

    let mut seq: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 0..args.runs {
        for handler in [RUNC, COCOON] {
            let t = Instant::now();
            let pod = start_pod(&node, handler, &format!("seq-{handler}-{i}")).await?;
            seq.entry(handler)
                .or_default()
                .push(t.elapsed().as_secs_f64() * 1e3);
            node.stop_and_remove_pod(&pod)
                .await
                .map_err(|e| format!("stop/remove: {e}"))?;
        }
    }

    let mut conc = serde_json::Map::new();
    for handler in [RUNC, COCOON] {
        let t = Instant::now();
        let names: Vec<String> = (0..args.concurrent)
            .map(|i| format!("conc-{handler}-{i}"))
            .collect();
        let starts = names.iter().map(|n| start_pod(&node, handler, n));
        let results = futures::future::join_all(starts).await;
        let all_running_ms = t.elapsed().as_secs_f64() * 1e3;
        let pss = node_pss_kib(&node);
        let mut pods = Vec::new();
        let mut failed = Vec::new();
        for r in results {
            match r {
                Ok(p) => pods.push(p),
                Err(e) => failed.push(e),
            }
        }
        for p in &pods {
            node.stop_and_remove_pod(p)
                .await
                .map_err(|e| format!("stop/remove: {e}"))?;
        }
        if !failed.is_empty() {
            return Err(format!(
                "{} of {} {handler} pods failed: {failed:?}",
                failed.len(),
                args.concurrent
            ));
        }
        conc.insert(
            handler.into(),
            json!({
                "all_running_ms": all_running_ms,
                "host_pss_kib_per_pod": pss / args.concurrent as u64,
            }),
        );
    }
    let stats = |h: &str| Stats::of(&seq[h]);
    Ok(json!({
        "runs": args.runs,
        "concurrent_pods": args.concurrent,
        "host_check": cocoon_shim::check::report().verdicts,
        "sequential_ms": { "runc": seq[RUNC], "cocoon": seq[COCOON] },
        "sequential_summary": { "runc": stats(RUNC), "cocoon": stats(COCOON) },
        "concurrent": conc,
    }))
}

fn table(r: &serde_json::Value) -> String {
    let f = |p: &str| r.pointer(p).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let mut t = format!(
        "RunPodSandbox -> container running ({} runs each, ms; {} pods at once)\n",
        r["runs"], r["concurrent_pods"]
    );
    t.push_str(&format!(
        "{:<8} {:>9} {:>9} {:>16} {:>16}\n",
        "handler", "median", "p90", "all N running", "host MiB/pod"
    ));
    for h in [RUNC, COCOON] {
        t.push_str(&format!(
            "{:<8} {:>9.0} {:>9.0} {:>16.0} {:>16.1}\n",
            h,
            f(&format!("/sequential_summary/{h}/median")),
            f(&format!("/sequential_summary/{h}/p90")),
            f(&format!("/concurrent/{h}/all_running_ms")),
            f(&format!("/concurrent/{h}/host_pss_kib_per_pod")) / 1024.0,
        ));
    }
    t
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cocoon bench pods: {e}");
            std::process::exit(2);
        }
    };
    let out = args.out.clone();
    match run(args).await {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Err(e) = std::fs::write(&out, text) {
                eprintln!("cocoon bench pods: cannot write {}: {e}", out.display());
                std::process::exit(1);
            }
            print!("{}", table(&report));
            println!("report written to {}", out.display());
        }
        Err(e) => {
            eprintln!("cocoon bench pods: {e}");
            std::process::exit(1);
        }
    }
}
