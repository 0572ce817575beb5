//! Growing a running VM's memory (`[vm] hotplug_memory`): the VM is launched with a
//! virtio-mem device whose region the guest's memory can grow into, plugged as the
//! host asks. The host asks through the VMM: QEMU's QMP (`qom-set` of the device's
//! `requested-size`), or cocoon-vmm's API (`resize_memory`). Either way the shim made
//! the socket's listener in the root-owned run directory and handed it to the VMM, so
//! it never connects through a path a pod's process could have changed.
//!
//! The VMM runs the guest, so it is only as trusted as the guest: every reply is read
//! with a deadline and a bounded length, and a reply that makes no sense is an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::UnixStream;

use super::qmp::read_line;

/// The socket's name in the VM's run directory.
pub const SOCKET: &str = "memctl.sock";
/// QEMU's id for the virtio-mem device (its QOM path is `/machine/peripheral/<id>`).
pub const QEMU_DEVICE_ID: &str = "hotmem0";
/// The granule of growth: Linux adds memory in blocks of 128 MiB on x86 (smaller
/// requests would be plugged only in part), and both VMMs' regions are sized in it.
pub const BLOCK_MIB: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum MemctlError {
    #[error("cannot reach the VMM's control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the VMM's control socket failed")]
    Io(#[from] std::io::Error),
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    // Their text is the VMM's (a QMP `desc`, a line it sent, cocoon-vmm's `error`): a VMM
    // a guest took over chooses it, so it is cut and its control characters escaped
    // wherever it is shown (errors, logs).
    #[error("the VMM's reply is not what was asked for: {}", vmm_text(.0))]
    BadReply(String),
    #[error("the VMM refused: {}", vmm_text(.0))]
    Refused(String),
    #[error("the VMM has no such device: {}", vmm_text(.0))]
    NotFound(String),
}

/// Text the VMM chose, as the shim shows it: cut to a line of reasonable length, no
/// control characters.
fn vmm_text(s: &str) -> String {
    crate::agent_reply::error_message(s)
}

/// How the shim reaches a VM's virtio-mem device.
#[derive(Debug, Clone)]
pub enum MemoryControl {
    /// QEMU's QMP monitor.
    Qmp(PathBuf),
    /// cocoon-vmm's API socket.
    CocoonVmm(PathBuf),
}

/// The device's sizes, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plugged {
    pub requested_mib: u32,
    pub plugged_mib: u32,
}

impl MemoryControl {
    /// Asks for `requested_mib` of the region to be plugged (a multiple of
    /// [`BLOCK_MIB`]). The guest plugs it in its own time: see [`Self::sizes`].
    pub async fn request(&self, requested_mib: u32, deadline: Duration) -> Result<(), MemctlError> {
        let bytes = u64::from(requested_mib) << 20;
        match self {
            MemoryControl::Qmp(path) => {
                let reply = qmp(
                    path,
                    serde_json::json!({"execute": "qom-set", "arguments": {
                        "path": format!("/machine/peripheral/{QEMU_DEVICE_ID}"),
                        "property": "requested-size",
                        "value": bytes,
                    }}),
                    deadline,
                )
                .await?;
                reply
                    .as_object()
                    .filter(|o| o.is_empty())
                    .map(|_| ())
                    .ok_or_else(|| MemctlError::BadReply(reply.to_string()))
            }
            MemoryControl::CocoonVmm(path) => {
                let request =
                    serde_json::json!({"action": "resize_memory", "requested_mib": requested_mib});
                vmm_api(path, request, deadline).await.map(|_| ())
            }
        }
    }

    /// What is asked and what the guest has plugged.
    pub async fn sizes(&self, deadline: Duration) -> Result<Plugged, MemctlError> {
        match self {
            MemoryControl::Qmp(path) => {
                // One deadline for both questions.
                let end = tokio::time::Instant::now() + deadline;
                let mut get = Vec::new();
                for property in ["requested-size", "size"] {
                    let reply = qmp(
                        path,
                        serde_json::json!({"execute": "qom-get", "arguments": {
                            "path": format!("/machine/peripheral/{QEMU_DEVICE_ID}"),
                            "property": property,
                        }}),
                        end.saturating_duration_since(tokio::time::Instant::now()),
                    )
                    .await?;
                    get.push(mib_of(&reply, property)?);
                }
                Ok(Plugged {
                    requested_mib: get[0],
                    plugged_mib: get[1],
                })
            }
            MemoryControl::CocoonVmm(path) => {
                let reply =
                    vmm_api(path, serde_json::json!({"action": "memory"}), deadline).await?;
                let field = |name: &str| {
                    reply
                        .get(name)
                        .and_then(|v| v.as_u64())
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| MemctlError::BadReply(format!("no {name} in {reply}")))
                };
                Ok(Plugged {
                    requested_mib: field("requested_mib")?,
                    plugged_mib: field("plugged_mib")?,
                })
            }
        }
    }
}

/// The control socket's listener for a VM with room to grow: made by the shim in the
/// root-owned run directory, so it never connects through a path the VMM (or a pod's
/// process) could change; the VMM inherits it, the shim's copy closes with this.
pub struct Listener {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl Listener {
    /// A listener at `<run_dir>/memctl.sock` when the VM is `controlled` (it has room
    /// to grow, or it is QEMU's `pc`, which also takes disks after boot).
    pub fn for_vm(
        run_dir: &Path,
        controlled: bool,
    ) -> Result<Option<Listener>, super::HypervisorError> {
        if !controlled {
            return Ok(None);
        }
        let path = run_dir.join(SOCKET);
        let listener = super::pod_jail::unix_listener(&path)?;
        Ok(Some(Listener { listener, path }))
    }

    /// The descriptor the VMM inherits.
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// How the shim reaches the VMM once it holds its own copy of the listener.
    pub fn into_control(self, how: fn(PathBuf) -> MemoryControl) -> MemoryControl {
        how(self.path)
    }

    /// The socket's path, for the shim's own connections once the VMM holds it.
    pub fn into_path(self) -> PathBuf {
        self.path
    }
}

impl MemoryControl {
    /// Asks for `want` MiB plugged (then calls `requested`), and waits until the guest
    /// has plugged it, the VM is `lost`, or `deadline` passes: what it has plugged by
    /// then. The guest plugs in its own time, block by block; it is asked every 100 ms.
    pub async fn grow_to(
        &self,
        want: u32,
        deadline: tokio::time::Instant,
        requested: impl FnOnce(),
        lost: impl Fn() -> bool,
    ) -> Result<Plugged, MemctlError> {
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        self.request(want, left()).await?;
        requested();
        let pause = Duration::from_millis(100);
        loop {
            let sizes = self.sizes(left()).await?;
            // No round is begun without time left to answer it.
            if sizes.plugged_mib >= want || left() <= pause || lost() {
                return Ok(sizes);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// A byte count QEMU gave as MiB (whole, as every size we ask is).
fn mib_of(v: &serde_json::Value, what: &str) -> Result<u32, MemctlError> {
    v.as_u64()
        .map(|b| b >> 20)
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| MemctlError::BadReply(format!("{what}: {v}")))
}

async fn connect(path: &Path) -> Result<BufReader<UnixStream>, MemctlError> {
    let s = UnixStream::connect(path)
        .await
        .map_err(|e| MemctlError::Connect(path.to_owned(), e))?;
    Ok(BufReader::new(s))
}

/// One QMP command on a session of its own (QMP takes one client at a time; the
/// caller serialises).
async fn qmp(
    path: &Path,
    command: serde_json::Value,
    deadline: Duration,
) -> Result<serde_json::Value, MemctlError> {
    let end = tokio::time::Instant::now() + deadline;
    let mut session = super::qmp::Session::connect(path, end).await?;
    session.execute(command).await
}

/// One cocoon-vmm API request; its reply's `memory` object.
async fn vmm_api(
    path: &Path,
    request: serde_json::Value,
    deadline: Duration,
) -> Result<serde_json::Value, MemctlError> {
    vmm_call(path, &request, None, "memory", deadline).await
}

/// One cocoon-vmm API request on a connection of its own, `fd` riding with it
/// (SCM_RIGHTS); its reply's `field`, or why there is none.
pub(crate) async fn vmm_call(
    path: &Path,
    request: &serde_json::Value,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    field: &str,
    deadline: Duration,
) -> Result<serde_json::Value, MemctlError> {
    let exchange = async {
        let mut s = connect(path).await?;
        let mut line = request.to_string();
        line.push('\n');
        super::qmp::write_with_fd(s.get_mut(), line.as_bytes(), fd).await?;
        let reply = read_line(&mut s).await?;
        if reply.get("ok").and_then(|o| o.as_bool()) != Some(true) {
            let e = reply.get("error").and_then(|e| e.as_str()).unwrap_or("?");
            return Err(MemctlError::Refused(e.to_owned()));
        }
        reply
            .get(field)
            .cloned()
            .ok_or_else(|| MemctlError::BadReply(format!("no {field} in {reply}")))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| MemctlError::Timeout(deadline))?
}

/// The largest region: what cocoon-vmm takes (QEMU takes more).
pub const MAX_REGION_MIB: u32 = cocoon_vmm::config::MAX_MEM_MIB as u32;

/// The region a VM of `boot_mib` gets to grow into up to `max_mib`, in whole blocks, at
/// most [`MAX_REGION_MIB`] (0: no room, no device).
pub fn region_mib(boot_mib: u32, max_mib: u32) -> u32 {
    max_mib.saturating_sub(boot_mib).min(MAX_REGION_MIB) / BLOCK_MIB * BLOCK_MIB
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::qmp::MAX_LINE;
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// `reply` with the QMP id of `request`, as QEMU echoes it (events carry none).
    pub(crate) fn with_id_of(request: &str, reply: &str) -> String {
        let req: serde_json::Value = serde_json::from_str(request).unwrap_or_default();
        let mut rep: serde_json::Value = serde_json::from_str(reply).unwrap();
        if let (Some(id), false) = (req.get("id"), rep.get("event").is_some()) {
            rep["id"] = id.clone();
        }
        rep.to_string()
    }

    /// A fake VMM that answers each connection with its lines in turn (reading one line
    /// before each reply, but the first when `greet`), then hangs up.
    async fn serve(listener: UnixListener, conns: Vec<(bool, Vec<&'static str>)>) -> Vec<String> {
        let mut seen = Vec::new();
        for (greet, replies) in conns {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            for (i, reply) in replies.iter().enumerate() {
                let mut reply = reply.to_string();
                if !(greet && i == 0) {
                    let mut line = String::new();
                    s.read_line(&mut line).await.unwrap();
                    seen.push(line.trim().to_owned());
                    reply = with_id_of(&line, &reply);
                }
                s.get_mut().write_all(reply.as_bytes()).await.unwrap();
                s.get_mut().write_all(b"\n").await.unwrap();
            }
        }
        seen
    }

    #[tokio::test]
    async fn qmp_sets_the_size_and_reads_both_back_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let greet = r#"{"QMP": {"version": {}, "capabilities": []}}"#;
        let server = tokio::spawn(serve(
            listener,
            vec![
                (true, vec![greet, r#"{"return": {}}"#, r#"{"event": "X"}"#]),
                (
                    true,
                    vec![greet, r#"{"return": {}}"#, r#"{"return": 536870912}"#],
                ),
                (
                    true,
                    vec![greet, r#"{"return": {}}"#, r#"{"return": 268435456}"#],
                ),
            ],
        ));
        let ctl = MemoryControl::Qmp(path);
        let d = Duration::from_secs(5);
        // The first connection's command reply is an event only, then the VMM hangs up:
        // an error, never a hang.
        let e = ctl.request(512, d).await.unwrap_err();
        assert!(matches!(e, MemctlError::BadReply(_)), "{e:?}");
        let sizes = ctl.sizes(d).await.unwrap();
        assert_eq!(
            sizes,
            Plugged {
                requested_mib: 512,
                plugged_mib: 256
            }
        );
        let seen = server.await.unwrap();
        assert!(
            seen[1].contains("requested-size") && seen[1].contains("536870912"),
            "{seen:?}"
        );
        assert!(
            seen[3].contains("qom-get") && seen[5].contains(r#""size""#),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn qmp_errors_and_silence_are_errors_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let greet = r#"{"QMP": {}}"#;
        let refuse = r#"{"error": {"class": "GenericError", "desc": "too big"}}"#;
        tokio::spawn(serve(
            listener,
            vec![
                (true, vec![greet, r#"{"return": {}}"#, refuse]),
                (true, vec![r#"{"hello": 1}"#]),
            ],
        ));
        let ctl = MemoryControl::Qmp(path.clone());
        let d = Duration::from_millis(500);
        let e = ctl.request(128, d).await.unwrap_err();
        assert!(
            matches!(&e, MemctlError::Refused(s) if s == "too big"),
            "{e:?}"
        );
        let e = ctl.request(128, d).await.unwrap_err();
        assert!(e.to_string().contains("not what was asked"), "{e}");
        // A VMM that takes the connection and says nothing: the deadline ends the wait.
        std::fs::remove_file(&path).unwrap();
        let silent = UnixListener::bind(&path).unwrap();
        let hold = tokio::spawn(async move { silent.accept().await.map(|(s, _)| s) });
        let e = ctl.request(128, d).await.unwrap_err();
        assert!(matches!(e, MemctlError::Timeout(_)), "{e:?}");
        drop(hold);
    }

    #[test]
    fn the_vmms_words_are_cut_and_escaped_where_shown() {
        let forged = format!("ok\n\x1b[2J{}", "y".repeat(60_000));
        for e in [
            MemctlError::Refused(forged.clone()),
            MemctlError::NotFound(forged.clone()),
            MemctlError::BadReply(forged.clone()),
        ] {
            let shown = e.to_string();
            assert!(
                !shown.chars().any(char::is_control),
                "a control character in {:?}",
                &shown[..80]
            );
            assert!(shown.contains("ok\\n\\u{1b}[2J"), "{:?}", &shown[..80]);
            assert!(
                shown.len() < 5000 && shown.ends_with("bytes cut)"),
                "{}",
                shown.len()
            );
        }
    }

    #[tokio::test]
    async fn a_reply_line_without_end_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let junk = vec![b'x'; (MAX_LINE as usize) * 2];
            let _ = s.write_all(&junk).await;
        });
        let e = MemoryControl::Qmp(path)
            .sizes(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not what was asked"), "{e}");
    }

    #[tokio::test]
    async fn cocoon_vmm_requests_and_reads_the_memory_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let ok = r#"{"ok": true, "state": "running", "memory": {"region_mib": 1024, "requested_mib": 256, "plugged_mib": 128}}"#;
        let server = tokio::spawn(serve(
            listener,
            vec![
                (false, vec![ok]),
                (false, vec![ok]),
                (
                    false,
                    vec![r#"{"ok": false, "state": "running", "error": "no device"}"#],
                ),
            ],
        ));
        let ctl = MemoryControl::CocoonVmm(path);
        let d = Duration::from_secs(5);
        ctl.request(256, d).await.unwrap();
        assert_eq!(
            ctl.sizes(d).await.unwrap(),
            Plugged {
                requested_mib: 256,
                plugged_mib: 128
            }
        );
        let e = ctl.sizes(d).await.unwrap_err();
        assert!(
            matches!(&e, MemctlError::Refused(s) if s == "no device"),
            "{e:?}"
        );
        let seen = server.await.unwrap();
        assert_eq!(
            seen[..2],
            [
                r#"{"action":"resize_memory","requested_mib":256}"#.to_string(),
                r#"{"action":"memory"}"#.to_string()
            ]
        );
    }

    /// A cocoon-vmm that plugs a block per `memory` question, up to what was asked, or
    /// (`stuck`) never plugs anything.
    async fn plugging_vmm(listener: UnixListener, stuck: bool) {
        let (mut requested, mut plugged) = (0u32, 0u32);
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let mut s = BufReader::new(s);
            let mut line = String::new();
            if s.read_line(&mut line).await.is_err() {
                continue;
            }
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            if req["action"] == "resize_memory" {
                requested = req["requested_mib"].as_u64().unwrap() as u32;
            } else if !stuck {
                plugged = (plugged + BLOCK_MIB).min(requested);
            }
            let reply = serde_json::json!({"ok": true, "state": "running", "memory": {
                "region_mib": 1024, "requested_mib": requested, "plugged_mib": plugged}});
            let _ = s.get_mut().write_all(format!("{reply}\n").as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn growing_waits_for_the_guest_within_one_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        tokio::spawn(plugging_vmm(UnixListener::bind(&path).unwrap(), false));
        let ctl = MemoryControl::CocoonVmm(path);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let asked = std::cell::Cell::new(false);
        let got = ctl
            .grow_to(384, deadline, || asked.set(true), || false)
            .await
            .unwrap();
        assert!(asked.get());
        assert_eq!(got.plugged_mib, 384, "three blocks, one per question");

        // A guest that never plugs: what it has when the deadline passes, not a hang.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        tokio::spawn(plugging_vmm(UnixListener::bind(&path).unwrap(), true));
        let ctl = MemoryControl::CocoonVmm(path);
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
        let got = ctl.grow_to(256, deadline, || (), || false).await.unwrap();
        assert_eq!((got.requested_mib, got.plugged_mib), (256, 0));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // A VM found lost stops the wait at once.
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        ctl.grow_to(256, deadline, || (), || true).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn the_region_is_whole_blocks_up_to_the_maximum() {
        assert_eq!(region_mib(256, 4096), 3840);
        assert_eq!(region_mib(300, 1000), 640);
        assert_eq!(region_mib(1000, 1000), 0);
        assert_eq!(region_mib(2000, 1000), 0);
        assert_eq!(
            region_mib(256, 1 << 20),
            MAX_REGION_MIB,
            "cocoon-vmm's most"
        );
        assert_eq!(MAX_REGION_MIB % BLOCK_MIB, 0);
    }
}
