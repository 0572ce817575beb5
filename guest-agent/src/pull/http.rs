//! The one HTTP request a pull makes, many times: `GET` (and an OAuth2 token `POST`) over
//! TCP, or TLS (rustls, only the roots the pod's init-data gives), with a deadline on each read and write, the body
//! streamed to the caller (layers are large), its length bounded by what the caller
//! expects. The digests, not the channel, make the content trustworthy; TLS adds the
//! registry's identity and keeps what is pulled from the network's view.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use cocoon_confidential::kbs::http::Deadlined;

use super::PullError;

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
type Conn = BufReader<Deadlined<Box<dyn ReadWrite>>>;

/// Where a request goes: `http(s)://host[:port]/path?query`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// `host[:port]` as written (a v6 address in brackets).
    pub host: String,
    /// The path and query, from its `/`.
    pub path: String,
}

impl Url {
    /// An absolute `http://` or `https://` URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (tls, rest) = match (s.strip_prefix("https://"), s.strip_prefix("http://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => return Err(format!("{s:?} is not an http:// or https:// URL")),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = path.split('#').next().unwrap_or("/");
        // A name, a v4 address or a bracketed v6 one, and a port: nothing that could
        // end the request's Host line.
        let host_ok = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if host.is_empty() || !host_ok || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!("{s:?} is not a URL this client takes"));
        }
        Ok(Url {
            tls,
            host: host.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The host without its port or brackets: the TLS server name.
    fn server_name(&self) -> &str {
        let h = match self.host.rsplit_once(':') {
            Some((h, p))
                if p.bytes().all(|b| b.is_ascii_digit())
                    && (!h.contains(':') || h.ends_with(']')) =>
            {
                h
            }
            _ => self.host.as_str(),
        };
        h.trim_start_matches('[').trim_end_matches(']')
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host, self.path)
    }
}

/// The most header bytes a reply may have.
const MAX_HEAD: usize = 64 * 1024;

/// A reply whose body is still on the wire.
pub struct Reply {
    pub status: u16,
    pub length: Option<u64>,
    pub location: Option<String>,
    /// `WWW-Authenticate`, on a 401.
    pub authenticate: Option<String>,
    body: Body,
}

enum Body {
    Plain(std::io::Take<Conn>),
    Chunked { r: Conn, left: u64, done: bool },
}

impl Read for Reply {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.body {
            Body::Plain(r) => r.read(buf),
            Body::Chunked { r, left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    r.by_ref().take(1024).read_line(&mut line)?;
                    if line == "\r\n" {
                        line.clear();
                        r.by_ref().take(1024).read_line(&mut line)?;
                    }
                    let size = line.trim().split(';').next().unwrap_or_default();
                    *left = u64::from_str_radix(size, 16).map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("bad chunk size {size:?}"),
                        )
                    })?;
                    if *left == 0 {
                        *done = true;
                        return Ok(0);
                    }
                }
                let want = buf.len().min(*left as usize);
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                *left -= n as u64;
                Ok(n)
            }
        }
    }
}

/// `GET url` with `headers`; over TLS with `tls` (an `https` URL without it is an error).
/// Each connect, read and write waits `each` at most, and nothing goes on past `until`.
pub fn get(
    url: &Url,
    headers: &[(&str, &str)],
    each: Duration,
    until: std::time::Instant,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Reply, PullError> {
    request(url, headers, None, each, until, tls)
}

/// As `get`, but a `POST` of `form` (`application/x-www-form-urlencoded`): an OAuth2
/// token request.
pub fn post_form(
    url: &Url,
    headers: &[(&str, &str)],
    form: &str,
    each: Duration,
    until: std::time::Instant,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Reply, PullError> {
    request(url, headers, Some(form), each, until, tls)
}

fn request(
    url: &Url,
    headers: &[(&str, &str)],
    form: Option<&str>,
    each: Duration,
    until: std::time::Instant,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Reply, PullError> {
    let left = until.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(PullError::Registry(format!(
            "{url}: the pull ran out of time"
        )));
    }
    let deadline = each.min(left);
    let host = url.host.as_str();
    let path = url.path.as_str();
    let fail = |what: &str, e: std::io::Error| PullError::Registry(format!("{what} {host}: {e}"));
    // A host named without a port is on its scheme's (a v6 address keeps its brackets).
    let with_port = match host.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            host.to_owned()
        }
        _ if url.tls => format!("{host}:443"),
        _ => format!("{host}:80"),
    };
    let addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| fail("resolve", e))?
        .collect();
    let mut last = std::io::Error::other("no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, deadline) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = stream.ok_or_else(|| fail("connect to", last))?;
    stream
        .set_read_timeout(Some(deadline))
        .and_then(|()| stream.set_write_timeout(Some(deadline)))
        .map_err(|e| fail("set deadlines for", e))?;
    let stream: Box<dyn ReadWrite> = match (url.tls, tls) {
        (false, _) => Box::new(stream),
        (true, None) => {
            return Err(PullError::Registry(format!(
                "{url}: the guest trusts no TLS root for registries (init-data's cdh.toml: [image] extra_root_certificates, or plain_http_registries to name this one)"
            )))
        }
        (true, Some(config)) => {
            let name = rustls::pki_types::ServerName::try_from(url.server_name().to_owned())
                .map_err(|e| PullError::Registry(format!("{host} is not a TLS server name: {e}")))?;
            let conn = rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| PullError::Registry(format!("TLS to {host}: {e}")))?;
            Box::new(rustls::StreamOwned::new(conn, stream))
        }
    };
    let mut stream = Deadlined {
        inner: stream,
        until,
    };
    let method = if form.is_some() { "POST" } else { "GET" };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: cocoon-agent\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(form) = form {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream
        .write_all(req.as_bytes())
        .map_err(|e| fail("send to", e))?;

    let mut r = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        if std::time::Instant::now() >= until {
            return Err(PullError::Registry(format!(
                "{url}: the pull ran out of time"
            )));
        }
        let before = head.len();
        (&mut r)
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .map_err(|e| fail("read from", e))?;
        if head.len() == before || head.len() >= MAX_HEAD {
            return Err(PullError::Registry(format!(
                "{host} sent no complete reply head"
            )));
        }
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            PullError::Registry(format!("{host} sent {status_line:?}, not an HTTP/1 status"))
        })?;
    let (mut length, mut location, mut authenticate, mut chunked) = (None, None, None, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(PullError::Registry(format!(
                "{host} sent a bad header {line:?}"
            )));
        };
        let value = value.trim().to_owned();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length =
                    Some(value.parse().map_err(|_| {
                        PullError::Registry(format!("{host} sent length {value:?}"))
                    })?)
            }
            "location" => location = Some(value),
            "www-authenticate" => authenticate = Some(value),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        Body::Chunked {
            r,
            left: 0,
            done: false,
        }
    } else {
        Body::Plain(r.take(length.unwrap_or(u64::MAX)))
    };
    Ok(Reply {
        status,
        length,
        location,
        authenticate,
        body,
    })
}
