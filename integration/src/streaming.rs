//! A client for kubelet's streaming protocols over WebSocket, which containerd's CRI
//! streaming server speaks (the URLs `PortForward`, `Exec` and `Attach` return): each
//! binary message starts with its channel number. For port-forward, each port has a data
//! channel (2i) and an error channel (2i+1), and the server's first message on each is
//! the port, two bytes little-endian.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// What one port-forward session brought back.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub data: Vec<u8>,
    /// The error channel's text (containerd's reason when it could not connect).
    pub error: String,
}

/// The binary channel protocol's name in the WebSocket handshake.
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";

fn ws_url(url: &str) -> String {
    url.replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1)
}

/// Forwards one connection to `port` through the streaming `url` from `PortForward`:
/// sends `input`, then reads until the server closes the session or `limit` passes.
pub fn port_forward(
    url: &str,
    port: u16,
    input: &[u8],
    limit: Duration,
) -> Result<Forwarded, String> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut request = format!("{}{sep}port={port}", ws_url(url))
        .into_client_request()
        .map_err(|e| format!("bad URL {url}: {e}"))?;
    // kubelet's binary channel protocol (the server answers with a subprotocol even when
    // none is asked for, which a strict client then refuses).
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static(CHANNEL_PROTOCOL),
    );
    let (mut ws, _) = tungstenite::connect(request).map_err(|e| format!("connect {url}: {e}"))?;
    set_timeout(&mut ws, Duration::from_millis(200))?;
    if !input.is_empty() {
        let mut m = vec![0u8];
        m.extend_from_slice(input);
        ws.send(Message::Binary(m.into()))
            .map_err(|e| format!("send: {e}"))?;
    }
    let deadline = Instant::now() + limit;
    let mut out = Forwarded::default();
    let mut port_seen = [false; 2];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no end of session within {limit:?}: got {out:?}"));
        }
        match ws.read() {
            Ok(Message::Binary(b)) if !b.is_empty() => {
                let ch = b[0] as usize;
                if ch > 1 {
                    return Err(format!("message on unknown channel {ch}"));
                }
                let mut payload = &b[1..];
                if !port_seen[ch] {
                    // The server's first message on a channel is the port it serves.
                    if payload.len() < 2 || u16::from_le_bytes([payload[0], payload[1]]) != port {
                        return Err(format!(
                            "channel {ch} did not start with port {port}: {payload:?}"
                        ));
                    }
                    port_seen[ch] = true;
                    payload = &payload[2..];
                }
                if ch == 0 {
                    out.data.extend_from_slice(payload);
                } else {
                    out.error.push_str(&String::from_utf8_lossy(payload));
                }
            }
            Ok(Message::Close(_)) => return Ok(out),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(out)
            }
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e} (so far {out:?})")),
        }
    }
}

fn set_timeout(ws: &mut WebSocket<MaybeTlsStream<TcpStream>>, t: Duration) -> Result<(), String> {
    match ws.get_mut() {
        MaybeTlsStream::Plain(s) => s
            .set_read_timeout(Some(t))
            .map_err(|e| format!("set timeout: {e}")),
        _ => Err("only plain ws:// is expected from a local streaming server".into()),
    }
}

/// What one exec or attach session brought back.
#[derive(Debug, Default)]
pub struct Session {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel's text: kubelet's JSON status (`"status":"Success"`, or a
    /// failure carrying the exit code).
    pub status: String,
}

impl Session {
    /// The exit code the status reports: 0 for success, the `ExitCode` cause otherwise.
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.status).ok()?;
        if v["status"] == "Success" {
            return Some(0);
        }
        v["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse().ok())
    }
}

/// Channels of kubelet's remote command protocol.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Runs an exec or attach session through the streaming `url` from `Exec` or `Attach`:
/// sends a terminal size (if any) and `stdin`, then reads until the server closes the
/// session or `limit` passes.
/// With `until`, returns as soon as stdout holds it (an attached shell never ends).
pub fn command_session(
    url: &str,
    size: Option<(u16, u16)>,
    stdin: &[u8],
    until: Option<&[u8]>,
    limit: Duration,
) -> Result<Session, String> {
    let mut request = ws_url(url)
        .into_client_request()
        .map_err(|e| format!("bad URL {url}: {e}"))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static(CHANNEL_PROTOCOL),
    );
    let (mut ws, _) = tungstenite::connect(request).map_err(|e| format!("connect {url}: {e}"))?;
    set_timeout(&mut ws, Duration::from_millis(200))?;
    let mut send = |ch: u8, data: &[u8]| {
        let mut m = vec![ch];
        m.extend_from_slice(data);
        ws.send(Message::Binary(m.into()))
            .map_err(|e| format!("send on channel {ch}: {e}"))
    };
    if let Some((cols, rows)) = size {
        send(
            RESIZE,
            format!("{{\"Width\":{cols},\"Height\":{rows}}}").as_bytes(),
        )?;
    }
    if !stdin.is_empty() {
        send(STDIN, stdin)?;
    }
    let deadline = Instant::now() + limit;
    let mut out = Session::default();
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no end of session within {limit:?}: got {out:?}"));
        }
        match ws.read() {
            Ok(Message::Binary(b)) if !b.is_empty() => match b[0] {
                STDOUT => {
                    out.stdout.extend_from_slice(&b[1..]);
                    if until.is_some_and(|u| out.stdout.windows(u.len()).any(|w| w == u)) {
                        let _ = ws.close(None);
                        return Ok(out);
                    }
                }
                STDERR => out.stderr.extend_from_slice(&b[1..]),
                ERROR => out.status.push_str(&String::from_utf8_lossy(&b[1..])),
                ch => return Err(format!("message on unexpected channel {ch}")),
            },
            Ok(Message::Close(_)) => return Ok(out),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(out)
            }
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e} (so far {out:?})")),
        }
    }
}
