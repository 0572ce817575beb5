//! The pod's agent policy (Kata's agent-policy model): a Rego document from the pod's
//! init-data decides every call the host makes, with the request as `input`. The rule
//! `data.agent_policy.<Call>Request` must evaluate to `true` (`ExecProcessRequest`,
//! `CreateContainerRequest`, `ReadStreamRequest`...); anything else, undefined
//! included, refuses the call with PERMISSION_DENIED, here in the guest, whatever the
//! host does.
//!
//! Without init-data every call is allowed (the host is trusted, as with runc). In
//! confidential mode (`cocoon.confidential` on the kernel command line, which the launch
//! measures) nothing but `SetInitData` is served until init-data has arrived; with
//! `cocoon.confidential=sev-snp|tdx` init-data is taken only if the guest's own hardware
//! evidence binds its digest (`cocoon_confidential::evidence`).

use std::sync::{Arc, Mutex, OnceLock};

use cocoon_confidential::evidence::{self, Tee, TSM_REPORT_ROOT};
use cocoon_confidential::initdata::InitData;

/// The policy a confidential pod gets when its init-data carries none: lifecycle yes;
/// exec, attach, output, host-path volumes and the debug console no.
pub const CONFIDENTIAL_DEFAULT: &str = include_str!("../policy/confidential-default.rego");

/// What the (measured) guest command line's `cocoon.confidential` asks of the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Absent: the host is trusted, as with runc.
    #[default]
    Plain,
    /// `cocoon.confidential` (or `=1`): serve nothing before init-data, enforce its policy
    /// or the confidential default. No hardware evidence is asked for (a VM without a
    /// TEE, for tests of the policy).
    Policy,
    /// `cocoon.confidential=sev-snp|tdx`: as `Policy`, and init-data is taken only if the
    /// guest's own evidence binds its digest (HOST_DATA, MRCONFIGID).
    Tee(Tee),
    /// Any other value: everything is refused, with this reason.
    Invalid(String),
}

impl Mode {
    pub fn from_cmdline(cmdline: &str) -> Mode {
        let mut mode = Mode::Plain;
        for w in crate::cmdline::words(cmdline) {
            mode = match w.as_str() {
                "cocoon.confidential" | "cocoon.confidential=1" => Mode::Policy,
                _ => match w.strip_prefix("cocoon.confidential=") {
                    Some(v) => Tee::parse(v).map(Mode::Tee).unwrap_or_else(|| {
                        Mode::Invalid(format!(
                            "cocoon.confidential={v} on the guest command line is not sev-snp or tdx"
                        ))
                    }),
                    None => continue,
                },
            };
        }
        mode
    }

    fn confidential(&self) -> bool {
        *self != Mode::Plain
    }
}

/// The agent's policy state: unset until `SetInitData`, then fixed for the VM's life.
#[derive(Default)]
pub struct Gate {
    set: OnceLock<Option<Mutex<regorus::Engine>>>,
    /// The digest of the init-data taken, bound into evidence given on request.
    init_digest: OnceLock<Vec<u8>>,
    /// Confidential mode: refuse everything until init-data is set.
    confidential: bool,
    mode: Mode,
    /// configfs-tsm's report directory (the guest's evidence), for `Mode::Tee`.
    tsm_root: std::path::PathBuf,
    /// The init-data taken (its key broker, its text for the broker's check).
    init_data: OnceLock<InitData>,
    /// The session with the pod's key broker, made on first use.
    kbs: Mutex<Option<KbsClient>>,
}

/// The rule that decides a container once its image is pulled.
pub const IMAGE_RULE: &str = "CreateContainerImageRequest";

type KbsClient = cocoon_confidential::kbs::client::Client<
    cocoon_confidential::kbs::http::Http,
    cocoon_confidential::kbs::attester::Tsm,
>;

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// Confidential mode and no init-data yet.
    NoInitData,
    /// The policy's rule for the call was not true.
    Policy(String),
    /// The policy could not be evaluated for this call (an error in the Rego).
    Error(String),
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::NoInitData => write!(
                f,
                "refused by the agent: a confidential pod serves no call before its init-data"
            ),
            Denied::Policy(call) => write!(f, "{call} is blocked by the pod's agent policy"),
            Denied::Error(e) => write!(f, "the pod's agent policy failed: {e}"),
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("confidential", &self.confidential)
            .field(
                "policy",
                &match self.set.get() {
                    None => "no init-data yet",
                    Some(None) => "none",
                    Some(Some(_)) => "set",
                },
            )
            .finish()
    }
}

impl Gate {
    pub fn new(confidential: bool) -> Gate {
        Gate::for_mode(
            if confidential {
                Mode::Policy
            } else {
                Mode::Plain
            },
            TSM_REPORT_ROOT.into(),
        )
    }

    /// A gate for `mode`, reading evidence (`Mode::Tee`) under `tsm_root`.
    pub fn for_mode(mode: Mode, tsm_root: std::path::PathBuf) -> Gate {
        Gate {
            set: OnceLock::new(),
            init_digest: OnceLock::new(),
            confidential: mode.confidential(),
            mode,
            tsm_root,
            init_data: OnceLock::new(),
            kbs: Mutex::new(None),
        }
    }

    /// The guest's evidence for a relying party's `nonce`, bound to the init-data taken
    /// (`evidence::nonce_report_data`). Only a TEE launch has any.
    pub fn evidence(&self, nonce: &[u8]) -> Result<(evidence::TsmReport, [u8; 64]), String> {
        let Mode::Tee(tee) = &self.mode else {
            return Err(
                "this guest has no TEE evidence: evidence needs a confidential launch \
                 (cocoon.confidential=sev-snp or tdx on the measured command line)"
                    .into(),
            );
        };
        let digest = self
            .init_digest
            .get()
            .map(Vec::as_slice)
            .unwrap_or_default();
        evidence::evidence_for(&self.tsm_root, *tee, digest, nonce).map_err(|e| e.to_string())
    }

    /// Whether the host is untrusted (confidential mode).
    pub fn confidential(&self) -> bool {
        self.confidential
    }

    /// Takes the pod's init-data: once. Returns it parsed; the policy it carries, if
    /// any, is compiled and enforced from now on.
    pub fn set_init_data(&self, bytes: &[u8]) -> Result<InitData, String> {
        if self.set.get().is_some() {
            return Err("init-data was already set; it cannot change for a VM's life".into());
        }
        let data = InitData::parse(bytes).map_err(|e| e.to_string())?;
        match &self.mode {
            Mode::Invalid(why) => return Err(format!("init-data refused: {why}")),
            Mode::Tee(tee) => {
                evidence::verify_init_data(&self.tsm_root, *tee, &data)
                    .map_err(|e| format!("init-data refused against the guest's evidence: {e}"))?;
                tracing::info!(tee = ?tee, "init-data matches the launch's evidence");
            }
            Mode::Plain | Mode::Policy => {}
        }
        let engine = match data.policy() {
            Some(rego) => Some(Mutex::new(compile(rego)?)),
            None if self.confidential => Some(Mutex::new(
                compile(CONFIDENTIAL_DEFAULT).expect("the built-in policy compiles"),
            )),
            None => None,
        };
        // The document first: what it says (`pins_images`) holds before the engine
        // decides anything.
        const ONCE: &str = "init-data was already set; it cannot change for a VM's life";
        self.init_data.set(data.clone()).map_err(|_| ONCE)?;
        let _ = self.init_digest.set(data.digest.clone());
        self.set.set(engine).map_err(|_| ONCE)?;
        Ok(data)
    }

    /// How image pulls reach registries: from the init-data's `cdh.toml` (TLS unless
    /// named plain in a confidential guest; credentials from the key broker resource it
    /// names, fetched when a registry first asks), or plain HTTP without init-data.
    pub fn registry_transport(self: &Arc<Self>) -> Result<crate::pull::Transport, String> {
        let Some(init) = self.init_data.get() else {
            return Ok(crate::pull::Transport::default());
        };
        let config = init.registry_config().map_err(|e| e.to_string())?;
        let transport = crate::pull::Transport::from_config(&config, self.confidential)?;
        Ok(match config.credentials {
            None => transport,
            Some(path) => {
                let gate = Arc::clone(self);
                let from = path.to_string();
                transport.with_credentials(
                    &from,
                    Arc::new(move || gate.secret(&path.repository, &path.kind, &path.tag)),
                )
            }
        })
    }

    /// A resource from the key broker the init-data names, fetched with the guest's
    /// SEV-SNP report or TD quote (one attested session for the VM's life, renewed when the broker
    /// forgets it). Blocking: call it off the async runtime.
    pub fn secret(&self, repository: &str, kind: &str, tag: &str) -> Result<Vec<u8>, String> {
        let init = self
            .init_data
            .get()
            .ok_or("no init-data: the key broker is named in the pod's init-data (aa.toml)")?;
        let url = init.kbs_url().map_err(|e| e.to_string())?.ok_or(
            "no key broker: the pod's init-data names none ([token_configs.kbs] url in aa.toml)",
        )?;
        use cocoon_confidential::kbs::attester::{SnpTsm, TdxTsm, Tsm};
        let attester = match &self.mode {
            Mode::Tee(Tee::SevSnp) => Tsm::Snp(SnpTsm {
                root: self.tsm_root.clone(),
            }),
            Mode::Tee(Tee::Tdx) => Tsm::Tdx(TdxTsm {
                root: self.tsm_root.clone(),
                ..TdxTsm::default()
            }),
            _ => return Err(
                "this guest has no TEE evidence: secrets from a key broker need a confidential \
                            launch (cocoon.confidential=sev-snp or tdx on the measured command line)"
                    .into(),
            ),
        };
        let mut session = self
            .kbs
            .lock()
            .map_err(|_| "the key broker session is poisoned")?;
        if session.is_none() {
            let cert = init.kbs_cert().map_err(|e| e.to_string())?;
            let http = cocoon_confidential::kbs::http::Http::with_ca(
                &url,
                std::time::Duration::from_secs(30),
                cert.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            *session = Some(cocoon_confidential::kbs::client::Client::new(
                http,
                attester,
                Some(init.text.clone()),
            ));
        }
        session
            .as_mut()
            .expect("made above")
            .resource(repository, kind, tag)
            .map_err(|e| e.to_string())
    }

    /// Decides a container whose image the guest pulled, now that its configuration is
    /// known: the policy's `CreateContainerImageRequest` with `input` (CreateContainer's
    /// input and `image_config`, the image's `Env`, `Entrypoint`, `Cmd`, `WorkingDir`,
    /// `User`, checked against its digest), so a pod owner can pin the process the host
    /// asks for to what the image says. A policy that does not define the rule leaves
    /// the decision to `CreateContainerRequest`, taken before the pull; one that names it
    /// is a rule like the others: undefined refuses.
    pub fn check_pulled(&self, input: impl FnOnce() -> serde_json::Value) -> Result<(), Denied> {
        let Some(Some(engine)) = self.set.get() else {
            return Ok(());
        };
        if !self.pins_images() {
            return Ok(());
        }
        decide(engine, IMAGE_RULE, input)
    }

    /// Whether the pod's policy decides containers by their pulled image
    /// (`IMAGE_RULE`): then a container the guest does not pull is refused, and a
    /// sandbox gets the built-in pause, as in a confidential pod.
    /// Named anywhere in it, a comment included: the agent then refuses what the rule does
    /// not allow (it never lets a container through for a misread policy).
    pub fn pins_images(&self) -> bool {
        self.init_data
            .get()
            .and_then(InitData::policy)
            .is_some_and(|rego| rego.contains(IMAGE_RULE))
    }

    /// Decides `call` (the RPC's name, e.g. `ExecProcess`) with `input` (the request as
    /// JSON, built only when a policy is there to read it).
    pub fn check(
        &self,
        call: &str,
        input: impl FnOnce() -> serde_json::Value,
    ) -> Result<(), Denied> {
        let engine = match self.set.get() {
            None if self.confidential => return Err(Denied::NoInitData),
            None | Some(None) => return Ok(()),
            Some(Some(engine)) => engine,
        };
        decide(engine, &format!("{call}Request"), input)
    }
}

/// Evaluates `rule` of the policy in `engine` with `input`: allowed only if it is true. A
/// query, not `eval_rule`: a rule the policy does not define is undefined (no result),
/// which refuses, rather than an error.
fn decide(
    engine: &Mutex<regorus::Engine>,
    rule: &str,
    input: impl FnOnce() -> serde_json::Value,
) -> Result<(), Denied> {
    let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
    let input = regorus::Value::from_json_str(&input().to_string())
        .map_err(|e| Denied::Error(format!("input for {rule}: {e}")))?;
    engine.set_input(input);
    let results = engine
        .eval_query(format!("data.agent_policy.{rule}"), false)
        .map_err(|e| Denied::Error(format!("{rule}: {e}")))?;
    match results.result.as_slice() {
        [one] if matches!(one.expressions.as_slice(), [e] if e.value == regorus::Value::from(true)) => {
            Ok(())
        }
        _ => Err(Denied::Policy(rule.into())),
    }
}

/// A request as the policy's `input`: its fields by their proto names (defaults
/// included, so a rule can rely on them), and the JSON documents some requests carry as
/// strings parsed beside them (`oci` for a container's spec, `process` for an exec's).
pub fn input_of<M: protobuf::MessageFull>(req: &M) -> serde_json::Value {
    let options = protobuf_json_mapping::PrintOptions {
        proto_field_name: true,
        always_output_default_values: true,
        ..Default::default()
    };
    let text = protobuf_json_mapping::print_to_string_with_options(req, &options)
        .unwrap_or_else(|_| "{}".into());
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let descriptor = M::descriptor();
    for (field, key) in [("oci_spec_json", "oci"), ("process_json", "process")] {
        let Some(f) = descriptor.field_by_name(field) else {
            continue;
        };
        let parsed = match f.get_singular_field_or_default(req) {
            protobuf::reflect::ReflectValueRef::Bytes(b) => {
                serde_json::from_slice::<serde_json::Value>(b).ok()
            }
            _ => None,
        };
        if let Some(p) = parsed {
            v[key] = p;
        }
    }
    v
}

/// The stdio lookup the stream server uses, asking the policy about each stream.
pub struct PolicedStreams {
    pub containers: std::sync::Arc<crate::container::Containers>,
    pub gate: std::sync::Arc<Gate>,
}

impl crate::stdio::ProcessLookup for PolicedStreams {
    fn process_io(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Option<std::sync::Arc<crate::stdio::ProcessIo>> {
        self.containers.process_io(container_id, exec_id)
    }

    fn allow_stream(&self, h: &crate::stdio::StreamHeader) -> bool {
        use crate::stdio::StreamKind;
        let (call, stream) = match h.kind {
            StreamKind::Stdin => ("WriteStream", "stdin"),
            StreamKind::Stdout => ("ReadStream", "stdout"),
            StreamKind::Stderr => ("ReadStream", "stderr"),
        };
        let input = || {
            serde_json::json!({
                "container_id": h.container_id,
                "exec_id": h.exec_id,
                "stream": stream,
            })
        };
        match self.gate.check(call, input) {
            Ok(()) => true,
            Err(denied) => {
                tracing::warn!(container = %h.container_id, stream, "refused: {denied}");
                false
            }
        }
    }
}

/// Compiles the policy; it must be `package agent_policy`.
fn compile(rego: &str) -> Result<regorus::Engine, String> {
    let mut engine = regorus::Engine::new();
    let package = engine
        .add_policy("policy.rego".into(), rego.into())
        .map_err(|e| format!("the agent policy does not compile: {e}"))?;
    if package != "data.agent_policy" {
        return Err(format!(
            "the agent policy is {package}, not package agent_policy"
        ));
    }
    Ok(engine)
}

/// Whether a container's spec (JSON) names any `startContainer` hook.
pub fn has_start_hooks(spec_json: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(spec_json)
        .ok()
        .and_then(|s| {
            s.get("hooks")?
                .get("startContainer")?
                .as_array()
                .map(|a| !a.is_empty())
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
