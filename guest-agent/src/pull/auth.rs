//! Credentials for private registries: a containers-auth.json document (the format
//! `podman login` and `docker login` write, and Confidential Containers keeps in its key
//! broker), fetched from the pod's key broker only when a registry first asks for
//! authentication, so public pulls never attest.
//!
//! ```json
//! {"auths": {"registry.example:5000": {"auth": "base64(user:password)"},
//!            "registry.example:5000/team/app": {"username": "u", "password": "p"}}}
//! ```
//!
//! A key is `host[:port]`, optionally followed by a repository path that narrows it (the
//! most specific key wins, as in containers-auth.json); a key written as a URL
//! (`https://host/v1/`, Docker's legacy form) names its host. The credentials are sent as
//! HTTP Basic, to the registry or to the token realm its challenge names, and only over
//! TLS: in a confidential guest the host carries the traffic.
//!
//! An entry's `identitytoken` (an OAuth2 refresh token, what `docker login` and `az acr
//! login` keep for registries that hand them out, such as Azure's) is traded at the token
//! realm for an access token (`POST`, `grant_type=refresh_token`), as containers/image
//! and containerd do; it answers no Basic challenge, which the entry's `auth` (if any)
//! does.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;

/// Where the credentials come from when a registry asks for them: the document's bytes,
/// or why it cannot be had.
pub type Source = Arc<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>;

/// The most entries one document may hold.
const MAX_ENTRIES: usize = 1024;

/// Parsed credentials: for each key, what its entry gives.
#[derive(Clone, Default)]
pub struct Credentials {
    by_key: BTreeMap<String, Entry>,
}

/// One key's credentials: at least one of the two.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The `Authorization: Basic …` value, for the registry or its token realm.
    pub basic: Option<String>,
    /// An OAuth2 refresh token for the token realm.
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for Entry {
    // Which secrets there are, never what they hold.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("basic", &self.basic.is_some())
            .field("identity_token", &self.identity_token.is_some())
            .finish()
    }
}

/// The longest identity token taken (Azure's are ≈1.5 KB JWTs).
const MAX_IDENTITY_TOKEN: usize = 16 * 1024;

impl std::fmt::Debug for Credentials {
    // Never the secrets themselves, in a log or an error.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_key.keys()).finish()
    }
}

impl Credentials {
    /// Reads a containers-auth.json document. Every entry must be usable: one that is
    /// not is an error naming its key (and never its secret).
    pub fn parse(doc: &[u8]) -> Result<Credentials, String> {
        let v: serde_json::Value = serde_json::from_slice(doc)
            .map_err(|e| format!("the registry credentials are not JSON: {e}"))?;
        let auths = v
            .get("auths")
            .and_then(serde_json::Value::as_object)
            .ok_or("the registry credentials have no \"auths\" object (containers-auth.json)")?;
        if auths.len() > MAX_ENTRIES {
            return Err(format!(
                "the registry credentials have {} entries; at most {MAX_ENTRIES}",
                auths.len()
            ));
        }
        // Each key's entry, and whether it was written as a URL (an exact key wins).
        let mut by_key: BTreeMap<String, (Entry, bool)> = BTreeMap::new();
        for (key, entry) in auths {
            let bad = |why: &str| format!("the registry credentials for {key:?}: {why}");
            let (name, from_url) =
                normalize(key).ok_or_else(|| bad("not host[:port][/repository]"))?;
            let field = |f: &str| entry.get(f).and_then(serde_json::Value::as_str);
            let identity_token = match entry.get("identitytoken") {
                // Go's decoders (docker's, containers/image's) read `null` as none.
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(t)) if t.is_empty() => None,
                Some(serde_json::Value::String(t))
                    if t.len() <= MAX_IDENTITY_TOKEN && !t.chars().any(char::is_control) =>
                {
                    Some(t.clone())
                }
                Some(_) => {
                    return Err(bad(&format!(
                        "\"identitytoken\" is not text of at most {MAX_IDENTITY_TOKEN} bytes \
                         without control characters"
                    )))
                }
            };
            let basic = match (field("auth"), field("username"), field("password")) {
                (Some(auth), None, None) => {
                    let plain = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad("\"auth\" is not base64"))?;
                    let plain = String::from_utf8(plain)
                        .map_err(|_| bad("\"auth\" does not decode to text"))?;
                    let (u, p) = plain
                        .split_once(':')
                        .ok_or_else(|| bad("\"auth\" is not user:password"))?;
                    (u.to_owned(), p.to_owned())
                }
                (None, Some(u), Some(p)) => (u.to_owned(), p.to_owned()),
                // An identity token alone, or what `docker login` leaves with a
                // credential store (nothing to use).
                (None, None, None) => match identity_token {
                    Some(_) => (String::new(), String::new()),
                    None => continue,
                },
                _ => return Err(bad("give \"auth\", or \"username\" and \"password\"")),
            };
            let basic = match basic {
                (user, _) if user.is_empty() && identity_token.is_some() => None,
                (user, _)
                    if user.is_empty()
                        || user.contains(':')
                        || user.chars().any(char::is_control) =>
                {
                    return Err(bad(
                        "the user name is empty or holds ':' or a control character",
                    ))
                }
                (user, password) => Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                )),
            };
            match by_key.get(&name) {
                // An exact key wins over a URL naming the same registry.
                Some((_, false)) if from_url => continue,
                Some((_, was_url)) if *was_url == from_url => {
                    return Err(bad("the registry is named twice"))
                }
                _ => {}
            }
            let entry = Entry {
                basic,
                identity_token,
            };
            by_key.insert(name, (entry, from_url));
        }
        let by_key = by_key.into_iter().map(|(k, (v, _))| (k, v)).collect();
        Ok(Credentials { by_key })
    }

    /// The credentials for `repository` of `registry`: the most specific key naming it,
    /// if any.
    pub fn for_repository(&self, registry: &str, repository: &str) -> Option<&Entry> {
        let mut key = format!("{}/{repository}", canonical_host(registry));
        loop {
            if let Some(v) = self.by_key.get(&key) {
                return Some(v);
            }
            match key.rsplit_once('/') {
                Some((rest, _)) => key = rest.to_owned(),
                None => return None,
            }
        }
    }
}

/// Docker Hub's names, which `docker login` and references spell differently.
const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A registry host as keys and lookups compare it: lower case, Docker Hub by one name.
fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match DOCKER_HUB.contains(&host.as_str()) {
        true => DOCKER_HUB[0].to_owned(),
        false => host,
    }
}

/// A key as lookups see it, and whether it was written as a URL (which names its host
/// alone); otherwise `host[:port]` with an optional repository path.
fn normalize(key: &str) -> Option<(String, bool)> {
    let (key, from_url) = match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(rest) => (rest.split('/').next().unwrap_or_default(), true),
        None => (key.trim_end_matches('/'), false),
    };
    let (host, path) = key.split_once('/').unwrap_or((key, ""));
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let path_ok = path.is_empty()
        || path.split('/').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    let name = match path.is_empty() {
        true => canonical_host(host),
        false => format!("{}/{path}", canonical_host(host)),
    };
    (host_ok && path_ok).then_some((name, from_url))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn the_most_specific_key_names_a_repositorys_credentials() {
        let doc = serde_json::json!({"auths": {
            "r.example:5000": {"auth": b64("all:pw1")},
            "r.example:5000/team": {"username": "team", "password": "pw:2"},
            "https://index.docker.io/v1/": {"auth": b64("hub:pw3")},
            "Other.Example": {"auth": b64("o:pw4")},
            "https://other.example/v1/": {"auth": b64("url:pw5")},
            "helper.example": {},
        }});
        let c = Credentials::parse(doc.to_string().as_bytes()).unwrap();
        let basic = |r, p| c.for_repository(r, p).and_then(|e| e.basic.clone());
        assert_eq!(
            basic("r.example:5000", "team/app"),
            Some(format!("Basic {}", b64("team:pw:2")))
        );
        assert_eq!(
            basic("r.example:5000", "other/app"),
            Some(format!("Basic {}", b64("all:pw1")))
        );
        // A key narrows by whole path parts, not by prefix.
        assert_eq!(
            basic("r.example:5000", "teamx/app"),
            Some(format!("Basic {}", b64("all:pw1")))
        );
        // Docker Hub by any of its names; hosts in any case; an exact key over a URL.
        for hub in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(
                basic(hub, "library/busybox"),
                Some(format!("Basic {}", b64("hub:pw3"))),
                "{hub}"
            );
        }
        assert_eq!(
            basic("other.EXAMPLE", "a"),
            Some(format!("Basic {}", b64("o:pw4")))
        );
        // An entry a credential helper keeps is none.
        assert_eq!(basic("helper.example", "a"), None);
        assert_eq!(basic("r.example", "team/app"), None);
        // Debug output names the keys, never the secrets.
        let shown = format!("{c:?}");
        assert!(
            shown.contains("r.example:5000/team") && !shown.contains("Basic"),
            "{shown}"
        );
    }

    #[test]
    fn unusable_entries_are_named_without_their_secret() {
        for (doc, why) in [
            (serde_json::json!({}), "no \"auths\""),
            (
                serde_json::json!({"auths": {"r:1": {"auth": "%%%"}}}),
                "not base64",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"auth": b64("nocolon")}}}),
                "user:password",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"auth": b64(":pw")}}}),
                "empty",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"identitytoken": 7}}}),
                "\"identitytoken\" is not text",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"identitytoken": "a\nb"}}}),
                "control characters",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"username": "u"}}}),
                "\"password\"",
            ),
            (
                serde_json::json!({"auths": {"r:1/A": {"auth": b64("u:p")}}}),
                "host[:port]",
            ),
            (
                serde_json::json!({"auths": {"r\r\nX: 1": {"auth": b64("u:p")}}}),
                "host[:port]",
            ),
            (
                serde_json::json!({"auths": {"r:1": {"auth": b64("u:p")}, "r:1/": {"auth": b64("u:q")}}}),
                "named twice",
            ),
            (
                serde_json::json!({"auths": {"docker.io": {"auth": b64("u:p")}, "index.docker.io": {"auth": b64("u:q")}}}),
                "named twice",
            ),
        ] {
            let e = Credentials::parse(doc.to_string().as_bytes()).unwrap_err();
            assert!(e.contains(why), "{doc}: {e}");
            assert!(!e.contains("pw") && !e.contains("p\""), "{e}");
        }
        assert!(Credentials::parse(b"not json").is_err());
    }

    #[test]
    fn an_identity_token_is_kept_beside_or_without_basic_credentials() {
        let doc = serde_json::json!({"auths": {
            // As `az acr login` writes it: a placeholder user with no password.
            "acr.example": {"auth": b64("00000000-0000-0000-0000-000000000000:"), "identitytoken": "refresh.jwt"},
            "alone.example": {"identitytoken": "r2"},
            "empty.example": {"auth": b64("u:p"), "identitytoken": ""},
            "null.example": {"auth": b64("u:p"), "identitytoken": null},
        }});
        let c = Credentials::parse(doc.to_string().as_bytes()).unwrap();
        let acr = c.for_repository("acr.example", "app").unwrap();
        assert_eq!(acr.identity_token.as_deref(), Some("refresh.jwt"));
        assert_eq!(
            acr.basic,
            Some(format!(
                "Basic {}",
                b64("00000000-0000-0000-0000-000000000000:")
            ))
        );
        let alone = c.for_repository("alone.example", "app").unwrap();
        assert_eq!(
            (alone.basic.as_deref(), alone.identity_token.as_deref()),
            (None, Some("r2"))
        );
        let empty = c.for_repository("empty.example", "app").unwrap();
        assert_eq!(empty.identity_token, None);
        let null = c.for_repository("null.example", "app").unwrap();
        assert_eq!(
            (null.basic.is_some(), null.identity_token.as_deref()),
            (true, None)
        );
        assert!(!format!("{c:?}").contains("refresh"));
    }
}
