//! Speaking to a registry as public ones expect: over TLS to the roots the pod's
//! init-data gives, with the bearer token the registry's challenge asks for (Docker's
//! token protocol: `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`, a
//! `GET` of the realm for a token, the request again with it), anonymous or with the
//! pod's registry credentials (an identity token in an OAuth2 `POST` to the realm
//! instead), or with those credentials as HTTP Basic when the
//! registry asks so; and following the redirects registries answer blob requests with
//! (to a storage host).
//!
//! The token or credentials go to the registry alone (and credentials to its token
//! realm), never to where it redirects, and credentials never in clear. A redirect from
//! TLS to plain HTTP is refused. None of it is trusted for content: every byte pulled is
//! still checked against its digest.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use super::auth::{Credentials, Entry, Source};
use super::http::{self, Reply, Url};
use super::{PullError, DEADLINE};

/// The most redirects one request follows.
const MAX_REDIRECTS: usize = 5;
/// The most a token reply may hold.
const MAX_TOKEN_REPLY: u64 = 256 * 1024;

/// How the guest reaches registries: the TLS roots it trusts (none: plain HTTP only),
/// the registries spoken to over plain HTTP even so, and whether plain HTTP needs naming
/// (a confidential guest: the host, which carries its traffic, must not see what it pulls).
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<Arc<rustls::ClientConfig>>,
    plain_http: Vec<String>,
    tls_unless_named: bool,
    /// Registry credentials, asked for when a registry first challenges, and where they
    /// come from (for messages).
    credentials: Option<(String, Source)>,
}

impl Transport {
    /// From init-data's `cdh.toml` `[image]` settings; `confidential`: a registry is
    /// spoken to over TLS unless `plain_http_registries` names it, roots or not.
    pub fn from_config(
        c: &cocoon_confidential::initdata::RegistryConfig,
        confidential: bool,
    ) -> Result<Transport, String> {
        let tls = match c.root_certificates.is_empty() {
            true => None,
            false => Some(cocoon_confidential::kbs::http::tls_config(
                &c.root_certificates.join("\n"),
                "init-data's cdh.toml [image] extra_root_certificates",
            )?),
        };
        Ok(Transport {
            tls_unless_named: confidential || tls.is_some(),
            tls,
            plain_http: c.plain_http.clone(),
            credentials: None,
        })
    }

    /// The same, with registry credentials from `source` (a containers-auth.json
    /// document), called at most once per pull and only if a registry asks; `from` says
    /// where they come from in messages.
    pub fn with_credentials(mut self, from: &str, source: Source) -> Transport {
        self.credentials = Some((from.to_owned(), source));
        self
    }

    /// Whether `registry` (`host[:port]`) is spoken to over TLS. A `plain_http_registries`
    /// entry names one registry (`host:port`) or every port of a host (`host`).
    pub fn uses_tls(&self, registry: &str) -> bool {
        let host = match registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => registry,
        };
        self.tls_unless_named && !self.plain_http.iter().any(|h| h == registry || h == host)
    }
}

/// What a registry took as authentication.
struct Auth {
    /// The `Authorization` header's value.
    header: String,
    /// Whether the pod's credentials are in it (Basic) or earned it (a token asked for
    /// with them): then it goes over TLS only, whatever the registry is spoken to with
    /// (a plain registry redirecting to its HTTPS side would otherwise get it in clear
    /// on the next request).
    credentials: bool,
}

/// Requests to one repository of one registry, with the token it gave, if any.
pub struct Session<'a> {
    transport: &'a Transport,
    /// The pull's own deadline: no request goes on past it.
    until: std::time::Instant,
    registry: String,
    repository: String,
    /// The `Authorization` value the registry took: a token, or Basic credentials.
    auth: Option<Auth>,
    /// The credentials, once fetched.
    credentials: Option<Credentials>,
}

impl<'a> Session<'a> {
    pub fn new(
        transport: &'a Transport,
        registry: &str,
        repository: &str,
        until: std::time::Instant,
    ) -> Session<'a> {
        // Docker Hub's registry answers at its own host, as Docker's clients know.
        let registry = match registry {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        };
        Session {
            transport,
            until,
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            auth: None,
            credentials: None,
        }
    }

    /// This repository's entry in the pod's credentials, fetched on first use; `None`
    /// when the init-data names no credentials or they have none for it.
    fn entry(&mut self) -> Result<Option<Entry>, PullError> {
        let Some((from, source)) = &self.transport.credentials else {
            return Ok(None);
        };
        if self.credentials.is_none() {
            let fail = |e: String| {
                PullError::Registry(format!(
                    "{} asks for authentication; the credentials at {from}: {e}",
                    self.registry
                ))
            };
            let doc = source().map_err(fail)?;
            self.credentials = Some(Credentials::parse(&doc).map_err(fail)?);
        }
        Ok(self
            .credentials
            .as_ref()
            .and_then(|c| c.for_repository(&self.registry, &self.repository))
            .cloned())
    }

    /// Why there are no credentials for this registry, for an error.
    fn no_credentials(&self) -> String {
        match &self.transport.credentials {
            None => format!(
                "the pod's init-data names no registry credentials (cdh.toml [image] {})",
                cocoon_confidential::initdata::CREDENTIALS_KEY
            ),
            Some((from, _)) => format!("the credentials at {from} have none for it"),
        }
    }

    /// `GET path` of the registry, through its challenge and redirects.
    pub fn get(&mut self, path: &str, accept: Option<&str>) -> Result<Reply, PullError> {
        let mut url = Url {
            tls: self.transport.uses_tls(&self.registry),
            host: self.registry.clone(),
            path: path.to_owned(),
        };
        // Anonymous first; with the pod's credentials if that is refused.
        let mut answered = 0;
        let mut hops = 0;
        loop {
            let to_registry = url.host == self.registry;
            let auth = self
                .auth
                .as_ref()
                .filter(|a| to_registry && (url.tls || !a.credentials))
                .map(|a| a.header.as_str());
            let mut headers = Vec::new();
            headers.extend(accept.map(|a| ("Accept", a)));
            headers.extend(auth.map(|a| ("Authorization", a)));
            let tls = self.transport.tls.as_ref();
            let reply = http::get(&url, &headers, DEADLINE, self.until, tls)?;
            match reply.status {
                401 if to_registry && answered < 2 => {
                    let anonymous = self.auth.as_ref().is_some_and(|a| !a.credentials);
                    if answered == 1 && !(anonymous && self.may_use_credentials(&url)) {
                        return Err(self.refused(&url));
                    }
                    let challenge = reply.authenticate.clone().ok_or_else(|| {
                        PullError::Registry(format!("{url}: HTTP 401 without a challenge"))
                    })?;
                    let auth = self.answer(&url, &challenge, answered == 1)?;
                    self.auth = Some(auth);
                    answered += 1;
                }
                401 if to_registry => return Err(self.refused(&url)),
                301..=303 | 307 | 308 if reply.location.is_some() => {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(PullError::Registry(format!(
                            "{url}: more than {MAX_REDIRECTS} redirects"
                        )));
                    }
                    let next = resolve(&url, reply.location.as_deref().unwrap_or_default())
                        .map_err(|e| PullError::Registry(format!("{url}: {e}")))?;
                    if url.tls && !next.tls {
                        return Err(PullError::Registry(format!(
                            "{url} redirects to {next}: from TLS to plain HTTP, refused"
                        )));
                    }
                    url = next;
                }
                // A server that speaks only TLS answers plain HTTP so (Go's does).
                400 if !url.tls => {
                    return Err(PullError::Registry(format!(
                        "{url}: HTTP 400 over plain HTTP; a registry that speaks only HTTPS \
                         answers so (its root goes in init-data's cdh.toml, [image] \
                         extra_root_certificates)"
                    )))
                }
                _ => return Ok(reply),
            }
        }
    }

    /// Whether the pod's credentials may answer a challenge from `url`: over TLS only, as
    /// a challenge in clear may come from anyone on the way, naming a realm of theirs
    /// (over TLS, with a certificate of their own).
    fn may_use_credentials(&self, url: &Url) -> bool {
        url.tls && self.transport.credentials.is_some()
    }

    /// The error for a registry that refused what it was given.
    fn refused(&self, url: &Url) -> PullError {
        let with = match &self.auth {
            Some(a) if a.credentials => "the pod's credentials".to_owned(),
            _ if self.transport.credentials.is_some() && !url.tls => format!(
                "an anonymous token; the pod's credentials are never sent in clear or \
                 where a challenge in clear points ({} is spoken to over plain HTTP)",
                self.registry
            ),
            _ => format!("an anonymous token, and {}", self.no_credentials()),
        };
        PullError::Registry(format!(
            "{url}: HTTP 401 with {with}: not allowed to pull {}",
            self.repository
        ))
    }

    /// What answers `challenge` (a `WWW-Authenticate` value) of the registry at `url`: a
    /// bearer token (anonymous unless `with_credentials`, or unless the realm refuses an
    /// anonymous one), or the pod's credentials as Basic.
    fn answer(
        &mut self,
        url: &Url,
        challenge: &str,
        with_credentials: bool,
    ) -> Result<Auth, PullError> {
        let registry = self.registry.clone();
        let fail = |e: String| PullError::Registry(format!("{registry}: {e}"));
        let clear = || {
            fail(format!(
                "it challenged over plain HTTP ({url}); the pod's credentials are never sent in \
                 clear or where a challenge in clear points (its root goes in cdh.toml [image] \
                 extra_root_certificates, and not in plain_http_registries)"
            ))
        };
        match parse_challenge(challenge).map_err(fail)? {
            Challenge::Bearer(params) => {
                if !with_credentials {
                    match self.fetch_token(&params, None)? {
                        Ok(token) => {
                            return Ok(Auth {
                                header: format!("Bearer {token}"),
                                credentials: false,
                            })
                        }
                        // Refused for another reason, or no credentials to try.
                        Err(e)
                            if !matches!(e.0, 401 | 403)
                                || self.transport.credentials.is_none() =>
                        {
                            return Err(fail(e.1))
                        }
                        Err(_) => {}
                    }
                }
                if !url.tls {
                    return Err(clear());
                }
                let Some(entry) = self.entry()? else {
                    return Err(fail(format!(
                        "its token realm refused an anonymous token, and {}",
                        self.no_credentials()
                    )));
                };
                // An identity token is what the realm is meant to be shown, where given.
                // Realms without the OAuth2 form (GCR answers 404, ACR 400, Artifactory
                // 401) take the entry's Basic credentials on a GET, as containerd
                // retries them.
                let token = match (entry.identity_token, entry.basic) {
                    (Some(t), basic) => match self.fetch_token(&params, Some(Grant::Refresh(t)))? {
                        Ok(token) => token,
                        Err((400 | 401 | 404 | 405, first)) if basic.is_some() => self
                            .fetch_token(&params, basic.map(Grant::Basic))?
                            .map_err(|e| fail(format!("{first}; then {}", e.1)))?,
                        Err(e) => return Err(fail(e.1)),
                    },
                    (None, Some(b)) => self
                        .fetch_token(&params, Some(Grant::Basic(b)))?
                        .map_err(|e| fail(e.1))?,
                    (None, None) => return Err(fail(self.no_credentials())),
                };
                Ok(Auth {
                    header: format!("Bearer {token}"),
                    credentials: true,
                })
            }
            Challenge::Basic => {
                if self.transport.credentials.is_some() && !url.tls {
                    return Err(clear());
                }
                match self.entry()? {
                    Some(Entry {
                        basic: Some(header),
                        ..
                    }) => Ok(Auth {
                        header,
                        credentials: true,
                    }),
                    Some(_) => {
                        Err(fail(format!(
                        "it asks for Basic authentication, and the credentials at {} hold only \
                         an identity token for it, which answers a token realm alone",
                        self.transport.credentials.as_ref().map_or("", |c| c.0.as_str())
                    )))
                    }
                    None => Err(fail(format!(
                        "it asks for Basic authentication, and {}",
                        self.no_credentials()
                    ))),
                }
            }
        }
    }

    /// A token for a `Bearer` challenge's `params`, asked for with the pod's credentials
    /// when given (anonymous otherwise): Basic credentials on a `GET`, an identity token
    /// in an OAuth2 `POST`. The inner error is the realm's refusal (its status, and a
    /// message).
    fn fetch_token(
        &self,
        params: &BTreeMap<String, String>,
        grant: Option<Grant>,
    ) -> Result<Result<String, (u16, String)>, PullError> {
        let fail = |e: String| PullError::Registry(format!("{}: {e}", self.registry));
        let realm = params
            .get("realm")
            .ok_or_else(|| fail("its challenge names no realm".into()))?;
        let mut url = Url::parse(realm).map_err(|e| fail(format!("its token realm: {e}")))?;
        // A token asked for in clear for a registry spoken to over TLS: the network would
        // see its scope and could hand another.
        if self.transport.uses_tls(&self.registry) && !url.tls {
            return Err(fail(format!("its token realm {url} is not over TLS")));
        }
        // Credentials never in clear, whatever the registry itself is spoken to with.
        if grant.is_some() && !url.tls {
            return Err(fail(format!(
                "its token realm {url} is not over TLS; the pod's credentials are never sent in clear"
            )));
        }
        let default_scope = format!("repository:{}:pull", self.repository);
        let scope = params.get("scope").unwrap_or(&default_scope);
        let mut query = vec![format!("scope={}", encode(scope))];
        if let Some(service) = params.get("service") {
            query.insert(0, format!("service={}", encode(service)));
        }
        let tls = self.transport.tls.as_ref();
        let mut reply = match &grant {
            // The OAuth2 form: the realm's own query stays, the rest goes in the body.
            Some(Grant::Refresh(token)) => {
                // Docker's OAuth2 form names the service even when the challenge did not.
                if !params.contains_key("service") {
                    query.insert(0, "service=".to_owned());
                }
                query.extend([
                    "grant_type=refresh_token".to_owned(),
                    format!("refresh_token={}", encode(token)),
                    "client_id=cocoon".to_owned(),
                ]);
                http::post_form(&url, &[], &query.join("&"), DEADLINE, self.until, tls)?
            }
            _ => {
                url.path
                    .push(if url.path.contains('?') { '&' } else { '?' });
                url.path.push_str(&query.join("&"));
                let headers: Vec<(&str, &str)> = match &grant {
                    Some(Grant::Basic(b)) => vec![("Authorization", b.as_str())],
                    _ => Vec::new(),
                };
                http::get(&url, &headers, DEADLINE, self.until, tls)?
            }
        };
        if reply.status != 200 {
            let with = match grant {
                Some(Grant::Basic(_)) => "with the pod's credentials".to_owned(),
                Some(Grant::Refresh(_)) => {
                    "with the pod's identity token (an OAuth2 POST)".to_owned()
                }
                None if !matches!(reply.status, 401 | 403) => "anonymously".to_owned(),
                None => format!("anonymously, and {}", self.no_credentials()),
            };
            let why = format!(
                "its token realm {url} answered HTTP {} when asked {with}",
                reply.status
            );
            return Ok(Err((reply.status, why)));
        }
        let mut body = Vec::new();
        (&mut reply)
            .take(MAX_TOKEN_REPLY + 1)
            .read_to_end(&mut body)
            .map_err(|e| fail(format!("reading a token from {url}: {e}")))?;
        if body.len() as u64 > MAX_TOKEN_REPLY {
            return Err(fail(format!(
                "{url} sent a token over {MAX_TOKEN_REPLY} bytes"
            )));
        }
        token_of(&body)
            .map(Ok)
            .map_err(|e| fail(format!("{url}: {e}")))
    }
}

/// What a token realm is shown for a token.
enum Grant {
    /// An `Authorization: Basic …` value.
    Basic(String),
    /// An OAuth2 refresh token (containers-auth.json's `identitytoken`).
    Refresh(String),
}

/// The token of a token reply (`token`, or OAuth's `access_token`): printable, no
/// spaces (it goes into a header line).
fn token_of(body: &[u8]) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("its token reply: {e}"))?;
    let t = ["token", "access_token"]
        .iter()
        .find_map(|k| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .filter(|t| !t.is_empty())
        })
        .ok_or("its token reply has no token")?;
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("its token is not printable ASCII without spaces".into());
    }
    Ok(t.to_owned())
}

/// What a registry's `WWW-Authenticate` asks for.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    /// A token from a realm, with these parameters.
    Bearer(BTreeMap<String, String>),
    /// Credentials with each request.
    Basic,
}

/// A `Bearer` challenge's parameters, or `Basic`; another scheme is an error naming it.
fn parse_challenge(s: &str) -> Result<Challenge, String> {
    let (scheme, rest) = s.trim().split_once(' ').unwrap_or((s.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!(
            "it asks for {scheme} authentication; only Bearer and Basic are supported"
        ));
    }
    let mut out = BTreeMap::new();
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("a malformed challenge {s:?}"))?;
        let key = key.trim().to_ascii_lowercase();
        let (value, after) = match after.strip_prefix('"') {
            Some(q) => {
                let end = q
                    .find('"')
                    .ok_or_else(|| format!("an unterminated quote in {s:?}"))?;
                (&q[..end], &q[end + 1..])
            }
            None => after.split_once(',').map_or((after, ""), |(v, a)| (v, a)),
        };
        out.insert(key, value.trim().to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    Ok(Challenge::Bearer(out))
}

/// Where a `Location` leads from `base`: an absolute URL, or a path on the same host.
fn resolve(base: &Url, location: &str) -> Result<Url, String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Url::parse(location);
    }
    if location.starts_with('/') && !location.starts_with("//") {
        return Url::parse(&format!(
            "{}{location}",
            Url {
                path: String::new(),
                ..base.clone()
            }
        ));
    }
    Err(format!(
        "a redirect to {location:?}, neither absolute nor a path"
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_challenge_is_read_with_its_quoted_commas() {
        let Ok(Challenge::Bearer(p)) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        ) else {
            panic!("not a bearer challenge");
        };
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert_eq!(parse_challenge(r#"Basic realm="x""#), Ok(Challenge::Basic));
        let e = parse_challenge(r#"Negotiate x"#).unwrap_err();
        assert!(e.contains("Negotiate"), "{e}");
        assert!(parse_challenge(r#"Bearer realm="x"#).is_err());
    }

    #[test]
    fn redirects_resolve_to_absolute_urls_or_paths_on_the_same_host() {
        let base = Url::parse("https://reg.example:5000/v2/a/blobs/sha256:1").unwrap();
        assert_eq!(
            resolve(&base, "/b?x=1").unwrap().to_string(),
            "https://reg.example:5000/b?x=1"
        );
        let cdn = resolve(&base, "http://cdn.example/blob").unwrap();
        assert_eq!(
            (cdn.tls, cdn.host.as_str(), cdn.path.as_str()),
            (false, "cdn.example", "/blob")
        );
        assert!(resolve(&base, "//evil/x").is_err());
        assert!(resolve(&base, "relative").is_err());
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("https://user@x/").is_err());
    }

    #[test]
    fn tokens_must_be_one_printable_word() {
        assert_eq!(token_of(br#"{"token":"abc.def"}"#).unwrap(), "abc.def");
        assert_eq!(token_of(br#"{"access_token":"t"}"#).unwrap(), "t");
        assert!(token_of(br#"{"token":"a\r\nX-Evil: 1"}"#).is_err());
        assert!(token_of(br#"{"token":""}"#).is_err());
        assert!(token_of(b"not json").is_err());
    }

    #[test]
    fn plain_http_names_a_registry_or_every_port_of_a_host() {
        let c = |plain: &[&str]| cocoon_confidential::initdata::RegistryConfig {
            root_certificates: vec![],
            plain_http: plain.iter().map(|s| s.to_string()).collect(),
            credentials: None,
        };
        let t = Transport::from_config(&c(&["a:5000", "b", "[::1]"]), true).unwrap();
        assert!(!t.uses_tls("a:5000") && t.uses_tls("a:5001") && t.uses_tls("a"));
        assert!(!t.uses_tls("b:1") && !t.uses_tls("b"));
        assert!(!t.uses_tls("[::1]:5000"));
        // Not confidential and no roots: plain HTTP for all.
        assert!(!Transport::from_config(&c(&[]), false)
            .unwrap()
            .uses_tls("a:5000"));
        assert!(Transport::from_config(&c(&[]), true)
            .unwrap()
            .uses_tls("a:5000"));
    }

    #[test]
    fn scopes_are_percent_encoded() {
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
