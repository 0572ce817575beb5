//! The client's transport: HTTP/1.1 over TCP, one connection per request
//! (`Connection: close`), with deadlines on connecting, sending and receiving and a
//! bound on what the broker may send. Over `https://` (rustls, TLS 1.2/1.3) the broker
//! must present a certificate that chains to a CA the pod owner pinned (init-data's
//! `aa.toml`, `[token_configs.kbs] cert`): the guest trusts no other root. Responses are
//! encrypted to the TEE key either way; TLS adds the broker's identity, so the host cannot
//! answer in its place.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::KbsError;

/// The most a response's head and body may hold together.
pub const MAX_RESPONSE: usize = super::jwe::MAX_RESPONSE + 64 * 1024;

/// One HTTP exchange's answer, as the client needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The value of a `Set-Cookie: kbs-session-id=…` header.
    pub session: Option<String>,
    pub body: Vec<u8>,
}

/// What carries the client's requests; `Http` over TCP, or a test's own.
pub trait Transport {
    /// The broker's address, for messages.
    fn url(&self) -> &str;
    /// Sends `method path` with the session cookie and a JSON body.
    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        session: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Reply, KbsError>;
}

/// HTTP/1.1 over TCP to `http://host[:port]`, or over TLS to `https://host[:port]`.
#[derive(Debug, Clone)]
pub struct Http {
    url: String,
    host: String,
    port: u16,
    deadline: Duration,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Http {
    /// `url` is `http://host[:port]` (no path); `deadline` bounds each connect, write
    /// and read.
    pub fn new(url: &str, deadline: Duration) -> Result<Http, KbsError> {
        Http::with_ca(url, deadline, None)
    }

    /// As `new`, and `https://host[:port]` with `ca_pem`, the PEM certificate(s) the
    /// broker's must chain to (required: no other root is trusted).
    pub fn with_ca(url: &str, deadline: Duration, ca_pem: Option<&str>) -> Result<Http, KbsError> {
        let bad = |detail: &str| KbsError::Transport {
            url: url.to_owned(),
            detail: detail.to_owned(),
        };
        let (rest, tls) = if let Some(rest) = url.strip_prefix("https://") {
            let pem = ca_pem.ok_or_else(|| {
                bad("https needs the broker's CA certificate (aa.toml's [token_configs.kbs] cert): no other root is trusted")
            })?;
            (
                rest,
                Some(tls_config(pem, "the broker's CA certificate").map_err(|e| bad(&e))?),
            )
        } else {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| bad("the broker's URL must start with http:// or https://"))?;
            (rest, None)
        };
        let default_port = if tls.is_some() { "443" } else { "80" };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad(
                "the broker's URL must be http(s)://host[:port], without a path",
            ));
        }
        let (host, port) = match rest.strip_prefix('[') {
            // [v6 address] with an optional :port
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed '['"))?;
                match after.strip_prefix(':') {
                    Some(p) => (host, p),
                    None if after.is_empty() => (host, default_port),
                    None => return Err(bad("text after the address")),
                }
            }
            None => rest.split_once(':').unwrap_or((rest, default_port)),
        };
        let port = port.parse().map_err(|_| bad("its port is not a number"))?;
        Ok(Http {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            deadline,
            tls,
        })
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let mut last = None;
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, self.deadline) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("the name resolves to no address")))
    }
}

impl Transport for Http {
    fn url(&self) -> &str {
        &self.url
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        session: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Reply, KbsError> {
        let fail = |detail: String| KbsError::Transport {
            url: self.url.clone(),
            detail,
        };
        let stream = self.connect().map_err(|e| fail(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(self.deadline))
            .and_then(|()| stream.set_write_timeout(Some(self.deadline)))
            .map_err(|e| fail(e.to_string()))?;
        let stream: Box<dyn ReadWrite> = match &self.tls {
            None => Box::new(stream),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| fail(format!("{:?} is not a TLS server name: {e}", self.host)))?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| fail(format!("TLS: {e}")))?;
                Box::new(rustls::StreamOwned::new(conn, stream))
            }
        };
        // The whole exchange within one deadline, not only each read.
        let mut stream = Deadlined {
            inner: stream,
            until: std::time::Instant::now() + self.deadline,
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.host, self.port
        );
        if let Some(id) = session {
            head.push_str(&format!("Cookie: {}={id}\r\n", super::SESSION_COOKIE));
        }
        let body = body.unwrap_or_default();
        if method != "GET" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|e| fail(format!("send: {e}")))?;
        let mut raw = Vec::new();
        match stream.take(MAX_RESPONSE as u64 + 1).read_to_end(&mut raw) {
            Ok(_) => {}
            // A TLS peer that closes without close_notify: what arrived is checked for
            // completeness (its Content-Length) by the parse below.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.tls.is_some() => {}
            Err(e) => return Err(fail(format!("receive: {e}"))),
        }
        if raw.len() > MAX_RESPONSE {
            return Err(fail(format!("the response exceeds {MAX_RESPONSE} bytes")));
        }
        parse_reply(&raw).map_err(|detail| KbsError::Malformed {
            what: "HTTP response",
            detail,
        })
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A connection whose every read and write fails once `until` has passed: a peer
/// dripping its reply a byte at a time cannot hold the caller (each read alone is
/// quick, under its socket timeout). The agent's image pulls use it too.
pub struct Deadlined<T> {
    pub inner: T,
    pub until: std::time::Instant,
}

impl<T> Deadlined<T> {
    fn check(&self) -> std::io::Result<()> {
        match std::time::Instant::now() >= self.until {
            true => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "out of time",
            )),
            false => Ok(()),
        }
    }
}

impl<T: Read> Read for Deadlined<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.read(buf)
    }
}

impl<T: Write> Write for Deadlined<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A client config trusting only the certificates in `pem`, with the ring provider.
/// `what` names the certificates in messages.
pub fn tls_config(pem: &str, what: &str) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("{what}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{what}: {e}"))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Parses a whole HTTP/1.1 response (the connection closed after it).
pub fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let (mut length, mut chunked, mut session) = (None, false, None);
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header {line:?}"))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("bad length {value:?}"))?,
                )
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "set-cookie" => {
                let pair = value.split(';').next().unwrap_or_default();
                if let Some((k, v)) = pair.split_once('=') {
                    if k.trim() == super::SESSION_COOKIE {
                        session = Some(v.trim().to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("the body is {} bytes, not {n}", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        session,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size_text =
            std::str::from_utf8(&rest[..eol]).map_err(|_| "a chunk size is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("a chunk is cut short")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunk is cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_with_length_chunks_and_a_session() {
        let r = parse_reply(b"HTTP/1.1 200 OK\r\nSet-Cookie: kbs-session-id=abc; Path=/\r\nContent-Length: 2\r\n\r\n{}junk").unwrap();
        assert_eq!(
            (r.status, r.session.as_deref(), &r.body[..]),
            (200, Some("abc"), &b"{}"[..])
        );
        let r = parse_reply(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(
            (r.status, r.session, &r.body[..]),
            (401, None, &b"abcde"[..])
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"[..],
            b"SSH-2.0 hello\r\n\r\n",
            b"HTTP/1.1 999 What\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab",
            b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n",
        ] {
            assert!(
                parse_reply(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn broker_urls() {
        let h = Http::new("http://10.0.0.1:8080", Duration::from_secs(1)).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("10.0.0.1", 8080));
        let h = Http::new("http://kbs.local/", Duration::from_secs(1)).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("kbs.local", 80));
        let h = Http::new("http://[::1]:9", Duration::from_secs(1)).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("::1", 9));
        let h = Http::new("http://[fe80::1]", Duration::from_secs(1)).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("fe80::1", 80));
        for bad in [
            "https://kbs",
            "ftp://kbs",
            "http://",
            "http://kbs/path",
            "http://kbs:x",
            "http://a:1:2",
            "http://[::1",
        ] {
            let e = Http::new(bad, Duration::from_secs(1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
