//! The containerd runtime v2 shim for Cocoon (`io.containerd.cocoon.v2`).

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-cocoon-v2: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(cocoon_shim::shimv2::main());
    std::process::exit(code);
}
