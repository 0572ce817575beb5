//! `start`: find the shim of this container's pod, or launch one, and print
//! its address. containerd runs this with the bundle as the working directory.

use std::process::Stdio;

use anyhow::Context;
use containerd_shim::Flags;
use tokio::io::AsyncReadExt;

use super::SANDBOX_ID_ANNOTATION;

/// The grouping key: the pod's sandbox id for Kubernetes containers (they
/// share a shim and a VM), else the container's own id.
pub fn group_of(config_json: &[u8], id: &str) -> String {
    let v: serde_json::Value = serde_json::from_slice(config_json).unwrap_or_default();
    v.pointer("/annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| id.to_string())
}

pub async fn run(flags: &Flags) -> anyhow::Result<()> {
    let spec = std::fs::read("config.json").unwrap_or_default();
    let group = group_of(&spec, &flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = address.trim_start_matches("unix://").to_string();

    // Another container of the same pod: its shim is already serving.
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        std::fs::write("address", &address).context("writing the address file")?;
        print!("{address}");
        return Ok(());
    }
    // The handler's own config (`ConfigPath` in its options), checked before a shim
    // starts with it: a bad file fails the pod's first container with its reason.
    let config = handler_config().await?;
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &flags.address,
    ])
    .args(["-socket", &address])
    .env("COCOON_SHIM_GROUP", &group)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(config) = &config {
        cmd.env(crate::config::CONFIG_ENV, config);
    }
    // The shim outlives containerd's call (and containerd itself): its own
    // session, not tied to the caller's terminal or process group.
    // SAFETY: setsid between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning the shim server")?;
    // The server closes its stdout once it listens; EOF means ready.
    let mut out = child.stdout.take().expect("piped");
    let mut sink = Vec::new();
    let ready = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        out.read_to_end(&mut sink),
    )
    .await;
    if ready.is_err() {
        let _ = child.start_kill();
        anyhow::bail!("the shim server did not start within 10 s");
    }
    if let Ok(Some(status)) = child.try_wait() {
        anyhow::bail!("the shim server exited at start ({status}); see containerd's log");
    }
    std::fs::write("address", &address).context("writing the address file")?;
    print!("{address}");
    Ok(())
}

/// The config file the runtime's options on our stdin name (`options::handler_config`),
/// loaded once to check it; none when containerd passed no such options. An inline
/// config (containerd 1.7+'s `config_body`) is laid over the node's config file, checked
/// the same way, and written to the bundle, which containerd removes with the container.
async fn handler_config() -> anyhow::Result<Option<std::path::PathBuf>> {
    // containerd writes the options and closes the pipe (or gives /dev/null); a
    // terminal would never close.
    if nix::unistd::isatty(std::io::stdin()).unwrap_or(false) {
        return Ok(None);
    }
    let mut options = Vec::new();
    let mut stdin = tokio::io::stdin().take(super::options::MAX_OPTIONS);
    let read = stdin.read_to_end(&mut options);
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .context("containerd's runtime options did not arrive within 5 s")?
        .context("reading containerd's runtime options")?;
    if options.len() as u64 == super::options::MAX_OPTIONS {
        anyhow::bail!(
            "containerd's runtime options are {} bytes or more: not Cocoon's",
            super::options::MAX_OPTIONS
        );
    }
    use super::options::HandlerConfig;
    match super::options::handler_config(&options).map_err(anyhow::Error::msg)? {
        None => Ok(None),
        Some(HandlerConfig::Path(path)) => {
            crate::config::Config::from_file(&path)
                .with_context(|| format!("the runtime's ConfigPath {}", path.display()))?;
            Ok(Some(path))
        }
        Some(HandlerConfig::Inline(body)) => {
            // Laid over the node's own file, so that what it leaves out ([jail] ranges
            // and lock file above all, which every handler must share) stays the node's.
            let base = match &crate::config::Config::node_path() {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading the node's config {}", p.display()))?,
                None => String::new(),
            };
            let text = super::options::overlay(&base, body).map_err(anyhow::Error::msg)?;
            crate::config::Config::parse(&text)
                .context("the handler's options table in containerd's config (config_body)")?;
            let path = std::env::current_dir()
                .context("the bundle directory")?
                .join("cocoon-config.toml");
            std::fs::write(&path, text).context("writing the handler's inline config")?;
            Ok(Some(path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_group_by_sandbox_id() {
        let spec = br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"sb1"}}"#;
        assert_eq!(group_of(spec, "c1"), "sb1");
        assert_eq!(group_of(b"{}", "c1"), "c1");
        assert_eq!(group_of(b"not json", "c1"), "c1");
        assert_eq!(
            group_of(
                br#"{"annotations":{"io.kubernetes.cri.sandbox-id":""}}"#,
                "c1"
            ),
            "c1"
        );
    }
}
