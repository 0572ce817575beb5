//! Init-data: the settings a pod owner gives the guest (Confidential Containers' TOML
//! format), above all the agent policy in Rego. The document's digest, by the algorithm
//! it names, is what a confidential launch binds into the hardware evidence (HOST_DATA on
//! SEV-SNP, MRCONFIGID on TDX), so the guest can check that what the host handed it is
//! what the owner measured.
//!
//! ```toml
//! version = "0.1.0"
//! algorithm = "sha384"          # sha256, sha384 or sha512
//! [data]
//! "policy.rego" = '''
//! package agent_policy
//! default ExecProcessRequest := false
//! '''
//! ```

use std::collections::BTreeMap;

use sha2::{Digest, Sha256, Sha384, Sha512};

/// The key of `[data]` that holds the agent policy.
pub const POLICY_KEY: &str = "policy.rego";
/// The key of `[data]` that holds the attestation agent's config (Confidential
/// Containers' `aa.toml`), whose `[token_configs.kbs] url` names the key broker.
pub const AA_CONFIG_KEY: &str = "aa.toml";
/// The key of `[data]` that holds the confidential data hub's config (Confidential
/// Containers' `cdh.toml`), whose `[image]` table says how the guest reaches registries.
pub const CDH_CONFIG_KEY: &str = "cdh.toml";

/// `cdh.toml`'s `[image]` key naming the registry credentials' resource.
pub const CREDENTIALS_KEY: &str = "authenticated_registry_credentials_uri";

/// How the guest reaches registries, from `cdh.toml`'s `[image]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// PEM certificates a registry's TLS certificate must chain to
    /// (`extra_root_certificates`, as in Confidential Containers). With none, the guest
    /// trusts no root, and registries are spoken to over plain HTTP.
    pub root_certificates: Vec<String>,
    /// Registries (`host[:port]`) spoken to over plain HTTP even so
    /// (`plain_http_registries`, Cocoon's own key).
    pub plain_http: Vec<String>,
    /// The key broker resource holding credentials for private registries
    /// (`authenticated_registry_credentials_uri = "kbs:///repository/type/tag"`, as in
    /// Confidential Containers): a containers-auth.json document.
    pub credentials: Option<ResourcePath>,
}

/// A key broker resource (`repository/type/tag`), each part checked as the broker
/// client checks names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePath {
    pub repository: String,
    pub kind: String,
    pub tag: String,
}

impl ResourcePath {
    /// `kbs:///repository/type/tag`: the pod's own key broker (an empty authority; the
    /// broker is `aa.toml`'s), three plain parts.
    pub fn parse_uri(uri: &str) -> Result<ResourcePath, String> {
        let bad = |why: &str| format!("{uri:?} is not kbs:///repository/type/tag: {why}");
        let path = uri
            .strip_prefix("kbs://")
            .ok_or_else(|| bad("it is not a kbs:// URI"))?;
        let path = path.strip_prefix('/').ok_or_else(|| {
            bad("it names a broker; only the init-data's own ([token_configs.kbs] url in aa.toml) is used")
        })?;
        let parts: Vec<&str> = path.split('/').collect();
        let [repository, kind, tag] = parts[..] else {
            return Err(bad("it does not have three parts"));
        };
        if let Some(p) = [repository, kind, tag]
            .into_iter()
            .find(|p| !resource_part(p))
        {
            return Err(bad(&format!(
                "{p:?} is not letters, digits, '.', '_' and '-' (not . or ..)"
            )));
        }
        Ok(ResourcePath {
            repository: repository.into(),
            kind: kind.into(),
            tag: tag.into(),
        })
    }
}

/// Whether `part` may be one part of a key broker resource path: what the broker's URL
/// scheme allows, and nothing that could walk its store (`..`) or add a segment.
pub fn resource_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part.len() <= 128
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl std::fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kbs:///{}/{}/{}", self.repository, self.kind, self.tag)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitDataError {
    #[error("init-data is not valid TOML: {0}")]
    Toml(String),
    #[error("init-data version {0:?} is not 0.1.0")]
    Version(String),
    #[error("init-data algorithm {0:?} is not sha256, sha384 or sha512")]
    Algorithm(String),
    #[error("init-data has an unknown key {0:?} (known: version, algorithm, data)")]
    UnknownKey(String),
    #[error("init-data's [data] entry {0:?} is not a string")]
    NotAString(String),
    #[error("init-data's aa.toml: {0}")]
    AaConfig(String),
    #[error("init-data's cdh.toml: {0}")]
    CdhConfig(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    /// As init-data spells it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }
}

/// A parsed init-data document and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitData {
    pub algorithm: Algorithm,
    pub data: BTreeMap<String, String>,
    /// The digest of the document's bytes as given.
    pub digest: Vec<u8>,
    /// The document itself (a key broker checks its digest against the evidence).
    pub text: String,
}

impl InitData {
    pub fn parse(bytes: &[u8]) -> Result<InitData, InitDataError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| InitDataError::Toml(format!("not UTF-8: {e}")))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| InitDataError::Toml(e.message().to_owned()))?;
        let mut version = None;
        let mut algorithm = None;
        let mut data = BTreeMap::new();
        for (key, value) in table {
            match key.as_str() {
                "version" => version = value.as_str().map(str::to_owned),
                "algorithm" => algorithm = value.as_str().map(str::to_owned),
                "data" => {
                    let t = value
                        .as_table()
                        .ok_or(InitDataError::NotAString(key.clone()))?;
                    for (k, v) in t {
                        let s = v
                            .as_str()
                            .ok_or_else(|| InitDataError::NotAString(k.clone()))?;
                        data.insert(k.clone(), s.to_owned());
                    }
                }
                _ => return Err(InitDataError::UnknownKey(key)),
            }
        }
        let version = version.unwrap_or_default();
        if version != "0.1.0" {
            return Err(InitDataError::Version(version));
        }
        let algorithm = match algorithm.as_deref() {
            Some("sha256") => Algorithm::Sha256,
            Some("sha384") => Algorithm::Sha384,
            Some("sha512") => Algorithm::Sha512,
            other => return Err(InitDataError::Algorithm(other.unwrap_or("").to_owned())),
        };
        let digest = match algorithm {
            Algorithm::Sha256 => Sha256::digest(bytes).to_vec(),
            Algorithm::Sha384 => Sha384::digest(bytes).to_vec(),
            Algorithm::Sha512 => Sha512::digest(bytes).to_vec(),
        };
        Ok(InitData {
            algorithm,
            data,
            digest,
            text: text.to_owned(),
        })
    }

    /// The key broker's URL, if the document's `aa.toml` names one.
    pub fn kbs_url(&self) -> Result<Option<String>, InitDataError> {
        self.kbs_field("url")
    }

    /// The PEM certificate the broker's TLS certificate must chain to (`aa.toml`'s
    /// `[token_configs.kbs] cert`), if given.
    pub fn kbs_cert(&self) -> Result<Option<String>, InitDataError> {
        self.kbs_field("cert")
    }

    fn kbs_field(&self, name: &str) -> Result<Option<String>, InitDataError> {
        let Some(aa) = self.data.get(AA_CONFIG_KEY) else {
            return Ok(None);
        };
        let bad = |e: String| InitDataError::AaConfig(e);
        let t: toml::Table = aa
            .parse()
            .map_err(|e: toml::de::Error| bad(e.message().to_owned()))?;
        match t
            .get("token_configs")
            .and_then(|c| c.get("kbs"))
            .and_then(|k| k.get(name))
        {
            None => Ok(None),
            Some(toml::Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(bad(format!("[token_configs.kbs] {name} is not a string"))),
        }
    }

    /// How the guest reaches registries (`cdh.toml`'s `[image]`); the default when the
    /// document has no `cdh.toml`.
    pub fn registry_config(&self) -> Result<RegistryConfig, InitDataError> {
        let Some(cdh) = self.data.get(CDH_CONFIG_KEY) else {
            return Ok(RegistryConfig::default());
        };
        let bad = |e: String| InitDataError::CdhConfig(e);
        let t: toml::Table = cdh
            .parse()
            .map_err(|e: toml::de::Error| bad(e.message().to_owned()))?;
        let image = match t.get("image") {
            None => None,
            Some(toml::Value::Table(i)) => Some(i),
            Some(_) => return Err(bad("[image] is not a table".into())),
        };
        let strings = |key: &str| -> Result<Vec<String>, InitDataError> {
            match image.and_then(|i| i.get(key)) {
                None => Ok(Vec::new()),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad(format!("[image] {key} holds a non-string")))
                    })
                    .collect(),
                Some(_) => Err(bad(format!("[image] {key} is not an array of strings"))),
            }
        };
        let credentials = match image.and_then(|i| i.get(CREDENTIALS_KEY)) {
            None => None,
            Some(toml::Value::String(uri)) => Some(
                ResourcePath::parse_uri(uri)
                    .map_err(|e| bad(format!("[image] {CREDENTIALS_KEY}: {e}")))?,
            ),
            Some(_) => return Err(bad(format!("[image] {CREDENTIALS_KEY} is not a string"))),
        };
        Ok(RegistryConfig {
            root_certificates: strings("extra_root_certificates")?,
            plain_http: strings("plain_http_registries")?,
            credentials,
        })
    }

    /// The agent policy, if the document carries one.
    pub fn policy(&self) -> Option<&str> {
        self.data.get(POLICY_KEY).map(String::as_str)
    }

    /// SEV-SNP's HOST_DATA (32 bytes): the digest, truncated or zero-padded.
    pub fn host_data(&self) -> [u8; 32] {
        fit(&self.digest)
    }

    /// TDX's MRCONFIGID (48 bytes): the digest, truncated or zero-padded.
    pub fn mr_config_id(&self) -> [u8; 48] {
        fit(&self.digest)
    }
}

/// An init-data document as a pod annotation carries it (standard base64), decoded and
/// checked to parse.
pub fn from_annotation(value: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    InitData::parse(&bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn fit<const N: usize>(digest: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = digest.len().min(N);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = '''\npackage agent_policy\ndefault ExecProcessRequest := false\n'''\n";

    #[test]
    fn parses_and_digests_the_bytes_as_given() {
        let d = InitData::parse(DOC.as_bytes()).unwrap();
        assert_eq!(d.algorithm, Algorithm::Sha256);
        assert!(d.policy().unwrap().contains("package agent_policy"));
        assert_eq!(d.digest, Sha256::digest(DOC.as_bytes()).to_vec());
        // sha256 fills HOST_DATA exactly and is zero-padded into MRCONFIGID.
        assert_eq!(d.host_data().to_vec(), d.digest);
        assert_eq!(&d.mr_config_id()[..32], &d.digest[..]);
        assert_eq!(&d.mr_config_id()[32..], &[0u8; 16]);
        let d384 = InitData::parse(DOC.replace("sha256", "sha384").as_bytes()).unwrap();
        assert_eq!(d384.digest.len(), 48);
        assert_eq!(d384.mr_config_id().to_vec(), d384.digest);
        assert_eq!(d384.host_data(), d384.digest[..32]);
    }

    #[test]
    fn bad_documents_are_named() {
        let e = |s: &str| InitData::parse(s.as_bytes()).unwrap_err();
        assert_eq!(
            e("version = \"0.2.0\"\nalgorithm = \"sha256\"\n"),
            InitDataError::Version("0.2.0".into())
        );
        assert_eq!(
            e("version = \"0.1.0\"\nalgorithm = \"md5\"\n"),
            InitDataError::Algorithm("md5".into())
        );
        assert_eq!(
            e("version = \"0.1.0\"\nalgorithm = \"sha256\"\npolicy = 1\n"),
            InitDataError::UnknownKey("policy".into())
        );
        assert_eq!(
            e("version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = 3\n"),
            InitDataError::NotAString("policy.rego".into())
        );
        assert!(matches!(e("version = "), InitDataError::Toml(_)));
    }
    #[test]
    fn registry_settings_come_from_cdh_toml() {
        let with = |cdh: &str| {
            let doc = format!(
                "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n{cdh}\n'''\n"
            );
            InitData::parse(doc.as_bytes()).unwrap().registry_config()
        };
        let c = with(
            "[image]\nextra_root_certificates = [\"A\", \"B\"]\nplain_http_registries = [\"r:5000\"]",
        )
        .unwrap();
        assert_eq!(c.root_certificates, ["A", "B"]);
        assert_eq!(c.plain_http, ["r:5000"]);
        assert_eq!(c.credentials, None);
        let c = with(
            "[image]\nauthenticated_registry_credentials_uri = \"kbs:///default/credential/test\"",
        )
        .unwrap();
        assert_eq!(
            c.credentials.unwrap().to_string(),
            "kbs:///default/credential/test"
        );
        assert_eq!(
            with("[kbc]\nname = \"cc_kbc\"").unwrap(),
            RegistryConfig::default()
        );
        assert_eq!(
            InitData::parse(DOC.as_bytes()).unwrap().registry_config(),
            Ok(RegistryConfig::default())
        );
        for bad in [
            "[image]\nextra_root_certificates = \"A\"",
            "[image]\nextra_root_certificates = [1]",
            "[image]\nauthenticated_registry_credentials_uri = 1",
            "[image]\nauthenticated_registry_credentials_uri = \"https:///a/b/c\"",
            "[image]\nauthenticated_registry_credentials_uri = \"kbs://broker:8080/a/b/c\"",
            "[image]\nauthenticated_registry_credentials_uri = \"kbs:///a/b\"",
            "[image]\nauthenticated_registry_credentials_uri = \"kbs:///a/../c\"",
            "[image]\nauthenticated_registry_credentials_uri = \"kbs:///a/b/c/d\"",
            "image = \"x\"",
            "[image",
        ] {
            assert!(
                matches!(with(bad), Err(InitDataError::CdhConfig(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_key_brokers_url_comes_from_aa_toml() {
        let with = |aa: &str| {
            let doc = format!(
                "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = '''\n{aa}\n'''\n"
            );
            InitData::parse(doc.as_bytes()).unwrap()
        };
        let d = with("[token_configs.kbs]\nurl = \"http://10.0.0.1:8080\"");
        assert_eq!(d.kbs_url(), Ok(Some("http://10.0.0.1:8080".into())));
        assert_eq!(d.kbs_cert(), Ok(None));
        let tls = with("[token_configs.kbs]\nurl = \"https://kbs\"\ncert = \"PEM\"");
        assert_eq!(tls.kbs_cert(), Ok(Some("PEM".into())));
        assert!(d.text.contains("token_configs"));
        assert_eq!(
            with("[token_configs.coco_as]\nurl = \"x\"").kbs_url(),
            Ok(None)
        );
        assert_eq!(InitData::parse(DOC.as_bytes()).unwrap().kbs_url(), Ok(None));
        assert!(matches!(
            with("[token_configs.kbs]\nurl = 3").kbs_url(),
            Err(InitDataError::AaConfig(_))
        ));
        assert!(matches!(
            with("[token_configs").kbs_url(),
            Err(InitDataError::AaConfig(_))
        ));
    }
}
