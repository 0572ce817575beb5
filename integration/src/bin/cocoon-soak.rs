//! `cocoon soak` (this binary does the work; `cocoon` hands it the arguments): pod
//! lifecycles through containerd's CRI plugin with faults injected (see
//! `cocoon_integration::soak`), on a private node. Writes a JSON report, prints a table,
//! and exits non-zero if anything leaked or failed uncleanly.

use std::path::PathBuf;
use std::time::Duration;

use cocoon_integration::cri::{self, CriNode};
use cocoon_integration::soak::{Fault, FAULTS};

/// The soak node's pod network, `198.18.61.0/24` (apart from the tests' and the bench's).
const NET: u8 = 61;

struct Args {
    cycles: usize,
    seed: u64,
    out: PathBuf,
    faults: Vec<Fault>,
}

fn parse_args() -> Result<Args, String> {
    let (mut cycles, mut seed, mut out) = (50usize, 1u64, PathBuf::from("cocoon-soak.json"));
    let mut faults = FAULTS.to_vec();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--cycles" => cycles = value()?.parse().map_err(|_| "--cycles wants a number")?,
            "--seed" => seed = value()?.parse().map_err(|_| "--seed wants a number")?,
            "--out" => out = PathBuf::from(value()?),
            "--faults" => {
                faults = value()?
                    .split(',')
                    .map(Fault::parse)
                    .collect::<Result<_, _>>()?
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--cycles N --seed N --out PATH --faults A,B)"
                ))
            }
        }
    }
    if cycles == 0 {
        return Err("--cycles must be at least 1".into());
    }
    Ok(Args {
        cycles,
        seed,
        out,
        faults,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Args {
        cycles,
        seed,
        out,
        faults,
    } = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cocoon soak: {e}");
            std::process::exit(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cocoon soak: needs root (network namespaces, CNI)");
        std::process::exit(2);
    }
    if let Some(why) = cri::cni_missing() {
        eprintln!("cocoon soak: {why}");
        std::process::exit(2);
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = cri::write_shim_config_with(
        dir.path(),
        Duration::from_secs(300),
        cocoon_integration::soak::SHIM_CONFIG_TABLES,
    );
    let mut node = CriNode::start(&dir.path().join("containerd"), &config, NET).await;
    let report =
        cocoon_integration::soak::soak(&mut node, &dir.path().join("run"), cycles, seed, &faults)
            .await;
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Err(e) = std::fs::write(&out, text) {
        eprintln!("cocoon soak: cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
    print!("{}", report.table());
    println!("report written to {}", out.display());
    let clean = report.leaks.is_empty() && report.unclean.is_empty() && report.fresh_pod_after;
    // exit() runs no destructors: tear the node down first.
    drop(node);
    drop(dir);
    std::process::exit(if clean { 0 } else { 1 });
}
