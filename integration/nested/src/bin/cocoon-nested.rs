//! `cocoon-nested run -- CMD...`: runs a command inside an L1 guest with hardware-style
//! KVM (QEMU/TCG with emulated SVM) that sees this host's root read-only, and exits with
//! the command's status. `make test-nested` uses it; so can a developer chasing a
//! cocoon-vmm bug on a host without VT-x/AMD-V.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cocoon_nested::{L1Image, L1Kernel, L1};

#[derive(Parser)]
#[command(
    name = "cocoon-nested",
    about = "Run a command inside an L1 guest with KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot L1, run CMD there (in the current directory), print its output, exit with its status.
    Run {
        /// The guest image whose kernel package L1 uses.
        #[arg(long, default_value = "target/image")]
        image_dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// QEMU's -accel for L1 (e.g. `tcg,thread=single`).
        #[arg(long, default_value = "tcg")]
        accel: String,
        #[arg(long, default_value_t = 3072)]
        mem_mib: u32,
        /// Seconds before L1 is killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// L1's kernel: `6.12` (Debian's 6.12 cloud kernel) or `image` (also `6.1`: the
        /// guest image's Debian kernel package, else Debian 12's cloud kernel, 6.1).
        /// Default: `COCOON_L1_KERNEL`'s, as for the tests, else `6.12`.
        #[arg(long, value_parser = ["6.12", "image", "6.1"])]
        l1_kernel: Option<String>,
        /// Variables to pass into L1 (NAME or NAME=VALUE).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let Cmd::Run {
        image_dir,
        cpus,
        accel,
        mem_mib,
        timeout,
        l1_kernel,
        env,
        cmd,
    } = Cli::parse().command;
    let l1_kernel = l1_kernel
        .or_else(|| std::env::var(cocoon_nested::testing::L1_KERNEL_ENV).ok())
        .unwrap_or_default();
    let kernel = match l1_kernel.as_str() {
        "" | "6.12" => L1Kernel::Linux612,
        "image" | "6.1" => L1Kernel::Image,
        other => anyhow::bail!(
            "{}={other}: use `6.12`, `image` or `6.1`",
            cocoon_nested::testing::L1_KERNEL_ENV
        ),
    };
    let image = L1Image::build_with(&image_dir, None, kernel).context("L1 image")?;
    let l1 = L1 {
        cpus,
        accel,
        mem_mib,
        timeout: Duration::from_secs(timeout),
        ..L1::new(image)
    };
    let env: Vec<(String, String)> = env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e.clone(), std::env::var(e).unwrap_or_default()),
        })
        .collect();
    let script = cmd
        .iter()
        .map(|w| cocoon_nested::run::quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let out = l1.run(&script, &std::env::current_dir()?, &env)?;
    use std::io::Write;
    std::io::stdout().write_all(&out.output)?;
    eprintln!(
        "cocoon-nested: exit {} after {:.1} s in L1",
        out.status,
        out.wall.as_secs_f64()
    );
    std::process::exit(out.status);
}
