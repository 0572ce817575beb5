//! The containerd runtime v2 shim for Cocoon (`io.containerd.cocoon.v2`).

fn main() {
    // A pod's janitor (started by the shim, never by containerd): no async runtime.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == cocoon_shim::shimv2::janitor::ACTION)
    {
        std::process::exit(cocoon_shim::shimv2::janitor::main(&args[1..]));
    }
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
