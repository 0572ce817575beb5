//! `cocoon-rootfs build`: builds the guest image and prints it as JSON on stdout.
//! Progress goes to stderr; `RUST_LOG=debug` shows the commands run.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cocoon_rootfs::{build, BuildOptions, Compression, KernelSource, DEFAULT_MODULES};

#[derive(Parser)]
#[command(
    name = "cocoon-rootfs",
    about = "Builds the Cocoon guest kernel and initramfs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the image into the cache (reusing it if identical) and print it as JSON.
    Build(BuildArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Statically linked guest agent; becomes /init.
    #[arg(long)]
    agent: PathBuf,
    /// Use this linux-image .deb instead of resolving linux-image-cloud-amd64 with apt.
    #[arg(long, conflicts_with = "built_kernel")]
    kernel_deb: Option<PathBuf>,
    /// Build Cocoon's own kernel from linux-source-6.12 (cached) instead.
    #[arg(long)]
    built_kernel: bool,
    /// Cache root [default: $COCOON_CACHE_DIR, /var/lib/cocoon as root, else ~/.cache/cocoon].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Also copy vmlinuz, the initramfs and manifest.json into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Include this module (and its dependencies) besides the default set; repeatable.
    #[arg(long = "module", value_name = "NAME")]
    extra_modules: Vec<String>,
    /// Gzip the initramfs (initramfs.cpio.gz); uncompressed boots faster under emulation.
    #[arg(long)]
    gzip: bool,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Command::Build(args) = Cli::parse().command;
    let kernel = match (args.kernel_deb, args.built_kernel) {
        (Some(deb), _) => KernelSource::DebFile(deb),
        (None, true) => KernelSource::Built,
        (None, false) => KernelSource::DebianCloud,
    };
    let mut opts = BuildOptions::new(kernel, args.agent);
    opts.cache_dir = args.cache_dir;
    opts.out_dir = args.out;
    opts.modules = DEFAULT_MODULES
        .iter()
        .map(|m| (*m).to_owned())
        .chain(args.extra_modules)
        .collect();
    if args.gzip {
        opts.compression = Compression::Gzip;
    }
    let started = std::time::Instant::now();
    let image = build(&opts)?;
    log::info!("done in {:.2?}", started.elapsed());
    println!("{}", serde_json::to_string_pretty(&image)?);
    Ok(())
}
