//! `cocoon-vmm`: Cocoon's VMM-side process. Subcommands select what it runs; today the
//! vhost-user vsock backend QEMU uses for the guest agent channel.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cocoon_vmm::vsock::defs::{DEFAULT_GUEST_CID, DEFAULT_MAX_CONNECTIONS};
use cocoon_vmm::vsock::VsockConfig;

#[derive(Parser)]
#[command(name = "cocoon-vmm", version, about = "Cocoon VMM-side devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a virtio-vsock device to one vhost-user frontend (QEMU), with host
    /// connections over Unix sockets (Firecracker's hybrid vsock convention).
    VhostUserVsock {
        /// vhost-user socket to create and listen on for the frontend.
        #[arg(long)]
        socket: PathBuf,
        /// Unix socket host clients connect to (`CONNECT <port>\n`); guest connections to
        /// host port P go to `<uds-path>_P`.
        #[arg(long)]
        uds_path: PathBuf,
        /// The guest's context id.
        #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
        guest_cid: u64,
        /// Milliseconds the guest has to accept a host connection.
        #[arg(long, default_value_t = 2000)]
        connect_timeout_ms: u64,
        /// Most simultaneous connections.
        #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::VhostUserVsock {
            socket,
            uds_path,
            guest_cid,
            connect_timeout_ms,
            max_connections,
        } => {
            let config = VsockConfig {
                guest_cid,
                uds_path,
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                max_connections,
            };
            cocoon_vmm::vhost_user_vsock::serve(&socket, config).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocoon-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
