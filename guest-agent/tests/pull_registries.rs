//! In-guest pulls from registries as public and private ones behave: over TLS to the
//! roots init-data gives, with bearer tokens and redirects, and with the pod's registry
//! credentials (Basic, or for a token realm), never in clear. Debian's `docker-registry`
//! on loopback, with its htpasswd authentication for the private one; a front for the
//! token protocol.

use std::io::Write;

use cocoon_agent::pull::{pull, Reference, Transport};
use cocoon_nested::registry::{Registry, PULLER};

mod pull_common;
use pull_common::*;

#[test]
fn a_registry_over_tls_is_trusted_only_through_the_roots_init_data_gives() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let tls = reg.tls_twin(&tls_fixture("server.pem"), &tls_fixture("server.pk8.pem"));
    let image = Reference::parse(&tls.reference("test/app", &digest)).unwrap();

    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &transport(&["ca.pem"], &[])).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");

    // A certificate that does not chain to the roots given: nothing is pulled.
    let (_d, root, work) = dirs();
    let e = pull(
        &image,
        &root,
        &work,
        soon(),
        &transport(&["other-ca.pem"], &[]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert!(!root.exists());

    // No roots: plain HTTP, which a TLS-only registry refuses; the error says what to do.
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &Transport::default()).unwrap_err();
    assert!(e.to_string().contains("extra_root_certificates"), "{e}");

    // Roots given, and the plain registry named as plain HTTP: it still works.
    let plain = reference(&reg, "test/app", &digest);
    let (_d, root, work) = dirs();
    let t = transport(&["ca.pem"], &[&reg.addr]);
    pull(&plain, &root, &work, soon(), &t).unwrap();
    // Not named: spoken to over TLS, which it does not speak.
    let (_d, root, work) = dirs();
    assert!(pull(&plain, &root, &work, soon(), &transport(&["ca.pem"], &[])).is_err());

    // A confidential guest speaks plain HTTP only to a registry its init-data names
    // (here by host, any port), roots or not.
    let (_d, root, work) = dirs();
    let e = pull(&plain, &root, &work, soon(), &transport_for(&[], &[], true)).unwrap_err();
    assert!(e.to_string().contains("plain_http_registries"), "{e}");
    let (_d, root, work) = dirs();
    let named = transport_for(&[], &["127.0.0.1"], true);
    pull(&plain, &root, &work, soon(), &named).unwrap();
}

/// What the front registry saw: token requests' queries and `Authorization` headers,
/// every `Authorization` the registry got, and for each request it proxied, its path and
/// `Authorization` header.
#[derive(Default)]
struct Seen {
    token_queries: Vec<String>,
    token_auth: Vec<Option<String>>,
    /// OAuth2 token requests' forms and `Authorization` headers.
    token_posts: Vec<(String, Option<String>)>,
    registry_auth: Vec<Option<String>>,
    proxied: Vec<(String, Option<String>)>,
    /// For the upgrading front: whether each request came over TLS, and its
    /// `Authorization`.
    requests: Vec<(bool, Option<String>)>,
}

/// What the front asks a client for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// A bearer token from its own `/token` realm, over plain HTTP, given to anyone.
    AnonymousToken,
    /// Basic credentials (none is ever accepted: the front speaks plain HTTP).
    Basic,
    /// A bearer token from a realm over TLS that gives one only for `PULLER`'s
    /// credentials, as private repositories of public registries do.
    PrivateToken,
}

/// The registry got no `Authorization` but the token the realm gave.
fn only_the_token_reached_the_registry(seen: &Seen) {
    assert!(
        seen.registry_auth
            .iter()
            .all(|a| a.as_deref().is_none_or(|a| a == "Bearer t0k3n")),
        "{:?}",
        seen.registry_auth
    );
}

/// An identity token (an OAuth2 refresh token), and as a form encodes it.
const IDENTITY_TOKEN: &str = "r3fresh+t/k=";
const IDENTITY_TOKEN_FORM: &str = "r3fresh%2Bt%2Fk%3D";

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b}")
}

/// One request's head from `r`: its path and `Authorization` and `Accept` headers. A
/// `POST`'s path is followed by a newline and its body (an OAuth2 form).
fn read_head(r: &mut impl std::io::Read) -> (String, Option<String>, String) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") && r.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let (mut auth, mut accept, mut length) = (None, String::new(), 0);
    for h in lines {
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_owned()),
                "accept" => accept = v.trim().to_owned(),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    if !head.starts_with("POST ") {
        return (path, auth, accept);
    }
    let mut body = vec![0u8; length.min(64 * 1024)];
    let _ = r.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body);
    (format!("{path}\n{body}"), auth, accept)
}

fn reply(status: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A TLS server configuration with the key broker's test certificate for 127.0.0.1.
fn server_tls() -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(tls_fixture("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.pk8.pem")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// What a test server speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Speaks {
    Plain,
    Tls,
    /// Both on one port, told apart by the first byte (a TLS handshake's is 0x16).
    Both,
}

/// Serves each connection to `listener` with `handle` (whether it came over TLS, the
/// request's path, `Authorization` and `Accept`; the reply's bytes).
fn serve(
    listener: std::net::TcpListener,
    speaks: Speaks,
    handle: impl Fn(bool, String, Option<String>, String) -> Vec<u8> + Send + 'static,
) {
    let config = server_tls();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let tls = match speaks {
                Speaks::Plain => false,
                Speaks::Tls => true,
                Speaks::Both => {
                    let mut first = [0u8];
                    conn.peek(&mut first).is_ok_and(|n| n == 1) && first[0] == 0x16
                }
            };
            if tls {
                let tls = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(tls, conn);
                let (path, auth, accept) = read_head(&mut s);
                let _ = s.write_all(&handle(true, path, auth, accept));
                s.conn.send_close_notify();
                let _ = s.flush();
            } else {
                let (path, auth, accept) = read_head(&mut conn);
                let _ = conn.write_all(&handle(false, path, auth, accept));
            }
        }
    });
}

/// A token realm over TLS giving `t0k3n` only for `PULLER`'s credentials (`GET`), or
/// for `IDENTITY_TOKEN` (an OAuth2 `POST`); returns its URL.
fn tls_token_realm(seen: &std::sync::Arc<std::sync::Mutex<Seen>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/token", listener.local_addr().unwrap());
    let seen = seen.clone();
    serve(listener, Speaks::Tls, move |_, path, auth, _| {
        if let Some(form) = path.strip_prefix("/token\n") {
            let mut seen = seen.lock().unwrap();
            seen.token_posts.push((form.to_owned(), auth));
            let fields: Vec<&str> = form.split('&').collect();
            return match fields.contains(&"grant_type=refresh_token")
                && fields.contains(&format!("refresh_token={IDENTITY_TOKEN_FORM}").as_str())
            {
                true => reply(
                    "200 OK",
                    "",
                    br#"{"access_token":"t0k3n","expires_in":300}"#,
                ),
                false => reply("401 Unauthorized", "", b""),
            };
        }
        let query = path.strip_prefix("/token?").unwrap_or_default().to_owned();
        let ok = auth.as_deref() == Some(basic(PULLER.0, PULLER.1).as_str());
        let mut seen = seen.lock().unwrap();
        seen.token_queries.push(query);
        seen.token_auth.push(auth);
        match ok {
            true => reply("200 OK", "", br#"{"token":"t0k3n","expires_in":300}"#),
            false => reply("401 Unauthorized", "", b""),
        }
    });
    url
}

/// A registry front as public registries behave: `/v2/` requests without the bearer
/// token get a 401 challenge (what `ask` says); with it, manifests are served from `reg`
/// and blobs redirected to `cdn` (another listener that serves them from `reg`). Both
/// over TLS when `tls`.
fn front(
    reg: &std::sync::Arc<Registry>,
    seen: &std::sync::Arc<std::sync::Mutex<Seen>>,
    ask: Ask,
    tls: bool,
) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cdn = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let scheme = if tls { "https" } else { "http" };
    let cdn_url = format!("{scheme}://{}", cdn.local_addr().unwrap());
    let realm = match ask {
        Ask::PrivateToken => tls_token_realm(seen),
        _ => format!("{scheme}://{addr}/token"),
    };
    for (l, is_cdn) in [(listener, false), (cdn, true)] {
        let (reg, seen, realm, cdn_url) =
            (reg.clone(), seen.clone(), realm.clone(), cdn_url.clone());
        let speaks = if tls { Speaks::Tls } else { Speaks::Plain };
        serve(l, speaks, move |_, path, auth, accept| {
            if !is_cdn && !path.starts_with("/token") {
                seen.lock().unwrap().registry_auth.push(auth.clone());
            }
            if let Some(q) = path.strip_prefix("/token?") {
                seen.lock().unwrap().token_queries.push(q.to_owned());
                reply("200 OK", "", br#"{"token":"t0k3n","expires_in":300}"#)
            } else if !is_cdn && auth.as_deref() != Some("Bearer t0k3n") {
                let challenge = match ask {
                    Ask::Basic => "Basic realm=\"test\"".to_owned(),
                    _ => format!("Bearer realm=\"{realm}\",service=\"test-registry\",scope=\"repository:test/app:pull\""),
                };
                reply(
                    "401 Unauthorized",
                    &format!("WWW-Authenticate: {challenge}\r\n"),
                    b"",
                )
            } else if !is_cdn && path.contains("/blobs/") {
                reply(
                    "307 Temporary Redirect",
                    &format!("Location: {cdn_url}{path}\r\n"),
                    b"",
                )
            } else {
                seen.lock()
                    .unwrap()
                    .proxied
                    .push((path.clone(), auth.clone()));
                let (status, _, body) = reg
                    .request("GET", &path, &[("Accept", &accept)], b"")
                    .unwrap();
                reply(&format!("{status} X"), "", &body)
            }
        });
    }
    addr
}

/// A private registry whose plain-HTTP side sends everything to its HTTPS side on the
/// same port (as many front proxies do), which asks for `PULLER`'s credentials as Basic.
fn upgrading_front(
    reg: &std::sync::Arc<Registry>,
    seen: &std::sync::Arc<std::sync::Mutex<Seen>>,
) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (reg, seen, here) = (reg.clone(), seen.clone(), addr.clone());
    serve(listener, Speaks::Both, move |tls, path, auth, accept| {
        seen.lock().unwrap().requests.push((tls, auth.clone()));
        if !tls {
            reply(
                "301 Moved Permanently",
                &format!("Location: https://{here}{path}\r\n"),
                b"",
            )
        } else if auth.as_deref() != Some(basic(PULLER.0, PULLER.1).as_str()) {
            reply(
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"test\"\r\n",
                b"",
            )
        } else {
            let (status, _, body) = reg
                .request("GET", &path, &[("Accept", &accept)], b"")
                .unwrap();
            reply(&format!("{status} X"), "", &body)
        }
    });
    addr
}

#[test]
fn a_registry_asking_for_a_token_and_redirecting_blobs_is_followed() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let reg = std::sync::Arc::new(reg);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = front(&reg, &seen, Ask::AnonymousToken, false);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &Transport::default()).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    let seen = seen.lock().unwrap();
    // One token for the whole pull, asked for the challenge's service and scope.
    assert_eq!(
        seen.token_queries,
        ["service=test-registry&scope=repository%3Atest%2Fapp%3Apull"]
    );
    // The manifest came with the token; the layers from the storage host, without it.
    let manifest = seen.proxied.iter().find(|(p, _)| p.contains("/manifests/"));
    assert_eq!(manifest.unwrap().1.as_deref(), Some("Bearer t0k3n"));
    let blobs: Vec<_> = seen
        .proxied
        .iter()
        .filter(|(p, _)| p.contains("/blobs/"))
        .collect();
    // The image config and two layers.
    assert_eq!(blobs.len(), 3, "{:?}", seen.proxied);
    assert!(blobs.iter().all(|(_, auth)| auth.is_none()), "{blobs:?}");
    drop(seen);

    // With registry credentials named, a registry that gives anonymous tokens never
    // has them fetched: public pulls do not attest.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = with_credentials(
        Transport::default(),
        auth_json(&addr, PULLER.0, PULLER.1),
        &asked,
    );
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn credentials_never_travel_in_clear_to_a_registry_that_upgrades_to_tls() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = upgrading_front(&std::sync::Arc::new(reg), &seen);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Named as plain HTTP: every request starts in clear and is sent to TLS.
    let t = with_credentials(
        transport(&["ca.pem"], &[&addr]),
        auth_json(&addr, PULLER.0, PULLER.1),
        &asked,
    );
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    let creds = basic(PULLER.0, PULLER.1);
    // Manifest, config and two layers, each started in clear; none carried the
    // credentials.
    let plain: Vec<_> = seen.requests.iter().filter(|(tls, _)| !tls).collect();
    assert_eq!(plain.len(), 4, "{:?}", seen.requests);
    assert!(plain.iter().all(|(_, a)| a.is_none()), "{plain:?}");
    let with_creds = seen
        .requests
        .iter()
        .filter(|(tls, a)| *tls && a.as_deref() == Some(creds.as_str()))
        .count();
    assert_eq!(with_creds, 4, "{:?}", seen.requests);
}

/// A transport trusting the test CA, with `doc` as the pod's registry credentials;
/// counts how often they are asked for.
fn with_credentials(
    base: Transport,
    doc: serde_json::Value,
    asked: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Transport {
    let asked = asked.clone();
    base.with_credentials(
        "kbs:///default/credential/test",
        std::sync::Arc::new(move || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(doc.to_string().into_bytes())
        }),
    )
}

fn auth_json(registry: &str, user: &str, password: &str) -> serde_json::Value {
    let header = basic(user, password);
    let b = header.trim_start_matches("Basic ");
    serde_json::json!({"auths": {registry: {"auth": b}}})
}

#[test]
fn a_registry_asking_for_credentials_without_any_is_refused_with_the_reason() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = front(&std::sync::Arc::new(reg), &seen, Ask::Basic, false);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &Transport::default()).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("Basic authentication"), "{e}");
    assert!(e.contains("authenticated_registry_credentials_uri"), "{e}");
    assert!(!root.exists());

    // With credentials for it, they are still not sent over plain HTTP.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = with_credentials(
        Transport::default(),
        auth_json(&addr, PULLER.0, PULLER.1),
        &asked,
    );
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &t).unwrap_err();
    assert!(e.to_string().contains("never sent in clear"), "{e}");
    assert!(!root.exists());
    let seen = seen.lock().unwrap();
    assert!(
        seen.registry_auth.iter().all(Option::is_none),
        "{:?}",
        seen.registry_auth
    );
}

#[test]
fn a_private_registry_takes_the_pods_credentials_over_tls() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("team/app", &base_layers());
    let private = reg.private_twin(&tls_fixture("server.pem"), &tls_fixture("server.pk8.pem"));
    let image = Reference::parse(&private.reference("team/app", &digest)).unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = || asked.swap(0, std::sync::atomic::Ordering::SeqCst);

    // The right credentials, asked for once for the whole pull.
    let t = with_credentials(
        transport(&["ca.pem"], &[]),
        auth_json(&private.addr, PULLER.0, PULLER.1),
        &asked,
    );
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert_eq!(count(), 1);

    // Credentials for the repository's namespace count; a wrong password is named.
    let narrowed = format!("{}/team", private.addr);
    for (doc, ok) in [
        (auth_json(&narrowed, PULLER.0, PULLER.1), true),
        (auth_json(&private.addr, PULLER.0, "wrong"), false),
    ] {
        let t = with_credentials(transport(&["ca.pem"], &[]), doc, &asked);
        let (_d, root, work) = dirs();
        let got = pull(&image, &root, &work, soon(), &t);
        assert_eq!(got.is_ok(), ok, "{got:?}");
        if let Err(e) = got {
            assert!(
                e.to_string()
                    .contains("HTTP 401 with the pod's credentials"),
                "{e}"
            );
            assert!(!root.exists());
        }
    }

    // None for this registry, none at all, or none to be had: each says so.
    let t = with_credentials(
        transport(&["ca.pem"], &[]),
        auth_json("other.example:5000", PULLER.0, PULLER.1),
        &asked,
    );
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &t).unwrap_err();
    assert!(e.to_string().contains("have none for it"), "{e}");
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &transport(&["ca.pem"], &[])).unwrap_err();
    assert!(
        e.to_string()
            .contains("authenticated_registry_credentials_uri"),
        "{e}"
    );
    let refusing = transport(&["ca.pem"], &[]).with_credentials(
        "kbs:///default/credential/test",
        std::sync::Arc::new(|| Err("this guest has no TEE evidence".to_owned())),
    );
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &refusing).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("kbs:///default/credential/test") && e.contains("no TEE evidence"),
        "{e}"
    );
}

#[test]
fn a_token_realm_gets_the_pods_credentials_only_when_the_challenge_came_over_tls() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let reg = std::sync::Arc::new(reg);
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // A registry spoken to over TLS names a realm over TLS.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = front(&reg, &seen, Ask::PrivateToken, true);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    // Anonymously the realm refuses, and the error says no credentials were given.
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &transport(&["ca.pem"], &[])).unwrap_err();
    assert!(
        e.to_string().contains("HTTP 401 when asked anonymously"),
        "{e}"
    );
    let doc = auth_json(&addr, PULLER.0, PULLER.1);
    let t = with_credentials(transport(&["ca.pem"], &[]), doc, &asked);
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    {
        let seen = seen.lock().unwrap();
        // The credentials went to the realm, once; the registry only saw the token,
        // and the storage host nothing.
        // Anonymous first (refused), then with the credentials.
        let creds = basic(PULLER.0, PULLER.1);
        assert_eq!(seen.token_auth, [None, None, Some(creds.clone())]);
        only_the_token_reached_the_registry(&seen);
        let blobs = seen.proxied.iter().filter(|(p, _)| p.contains("/blobs/"));
        assert!(
            blobs.clone().count() == 3 && blobs.clone().all(|(_, a)| a.is_none()),
            "{:?}",
            seen.proxied
        );
    }

    // A registry spoken to in clear: whoever is on the way could name a realm of its
    // own (over TLS, with a certificate of its own), so the credentials stay home.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = front(&reg, &seen, Ask::PrivateToken, false);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    let doc = auth_json(&addr, PULLER.0, PULLER.1);
    let t = with_credentials(transport(&["ca.pem"], &[&addr]), doc, &asked);
    let (_d, root, work) = dirs();
    asked.store(0, std::sync::atomic::Ordering::SeqCst);
    let e = pull(&image, &root, &work, soon(), &t).unwrap_err();
    assert!(e.to_string().contains("never sent in clear"), "{e}");
    // An anonymous token was asked for; the credentials were not even fetched.
    assert_eq!(seen.lock().unwrap().token_auth, [None]);
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn an_identity_token_is_traded_at_the_realm_in_an_oauth2_post() {
    let Some(reg) = Registry::start(module_path!()) else {
        return;
    };
    let digest = reg.push_image("test/app", &base_layers());
    let reg = std::sync::Arc::new(reg);
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let addr = front(&reg, &seen, Ask::PrivateToken, true);
    let image = Reference::parse(&format!("{addr}/test/app@{digest}")).unwrap();
    // As `az acr login` writes it: a placeholder user without a password, and the token.
    let placeholder = basic("00000000-0000-0000-0000-000000000000", "");
    let doc = |token: &str| {
        serde_json::json!({"auths": {&addr: {
            "auth": placeholder.trim_start_matches("Basic "), "identitytoken": token}}})
    };
    let t = with_credentials(transport(&["ca.pem"], &[]), doc(IDENTITY_TOKEN), &asked);
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    {
        let seen = seen.lock().unwrap();
        // One POST with the form, no Authorization; the placeholder user went nowhere.
        assert_eq!(
            seen.token_posts,
            [(
                format!(
                    "service=test-registry&scope=repository%3Atest%2Fapp%3Apull&\
                     grant_type=refresh_token&refresh_token={IDENTITY_TOKEN_FORM}&client_id=cocoon"
                ),
                None
            )]
        );
        assert!(!seen.token_auth.contains(&Some(placeholder.clone())));
        only_the_token_reached_the_registry(&seen);
    }

    // A token the realm refuses is named as such (the placeholder, tried after it on a
    // GET as containerd does, is refused too), and nothing is unpacked.
    let t = with_credentials(transport(&["ca.pem"], &[]), doc("stale"), &asked);
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 401 when asked with the pod's identity token")
            && e.contains("HTTP 401 when asked with the pod's credentials"),
        "{e}"
    );
    assert!(!root.exists());

    // A realm refusing the token takes real credentials beside it on a GET.
    let real = basic(PULLER.0, PULLER.1);
    let both = serde_json::json!({"auths": {&addr: {
        "auth": real.trim_start_matches("Basic "), "identitytoken": "stale"}}});
    let t = with_credentials(transport(&["ca.pem"], &[]), both, &asked);
    let (_d, root, work) = dirs();
    pull(&image, &root, &work, soon(), &t).unwrap();
    assert_eq!(std::fs::read(root.join("etc/conf")).unwrap(), b"two");
    assert_eq!(seen.lock().unwrap().token_auth.last(), Some(&Some(real)));

    // A registry asking for Basic authentication is not given an identity token.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let private = upgrading_front(&reg, &seen);
    let image = Reference::parse(&format!("{private}/test/app@{digest}")).unwrap();
    let only_token = serde_json::json!({"auths": {&private: {"identitytoken": IDENTITY_TOKEN}}});
    let t = with_credentials(transport(&["ca.pem"], &[]), only_token, &asked);
    let (_d, root, work) = dirs();
    let e = pull(&image, &root, &work, soon(), &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hold only an identity token"), "{e}");
    assert!(
        seen.lock()
            .unwrap()
            .requests
            .iter()
            .all(|(_, a)| a.is_none()),
        "{:?}",
        seen.lock().unwrap().requests
    );
}
