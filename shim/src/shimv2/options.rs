//! The runtime's options, as containerd hands them to `start` on its stdin (a protobuf
//! `Any`): for a runtime type that is not runc's, CRI makes them a
//! `runtimeoptions.v1.Options` from the handler's `options` table, and `ctr run
//! --runtime-config-path` makes the same. Its `ConfigPath` names the Cocoon config for
//! that handler, as Kata's and gVisor's shims take theirs: one node can then offer
//! RuntimeClasses of different VM sizes, VMMs or jails, each with its own file.
//!
//! ```toml
//! [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon-large]
//!   runtime_type = "io.containerd.cocoon.v2"
//!   [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon-large.options]
//!     ConfigPath = "/etc/cocoon/large.toml"
//! ```
//!
//! containerd 1.7 and later send an `options` table that names no `ConfigPath` whole, as
//! TOML (`config_body`): that is then the handler's config, inline in containerd's
//! (`[…runtimes.cocoon-large.options.vm] memory_mib = 1024`), laid over the node's
//! config file, with the same keys and checks as a file. containerd 1.6 sends no body:
//! there, name a file.

use std::path::PathBuf;

use protobuf::{CodedInputStream, Message};

/// The message CRI and ctr send for runtimes that are not runc
/// (`containerd/pkg/runtimeoptions/v1`): `type_url` = 1, `config_path` = 2.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The most `start` reads of its stdin.
pub const MAX_OPTIONS: u64 = 64 << 10;

/// Where a handler's config comes from.
#[derive(Debug, PartialEq)]
pub enum HandlerConfig {
    /// A file (`ConfigPath`).
    Path(PathBuf),
    /// The handler's `options` table itself (`config_body`).
    Inline(toml::Table),
}

/// The config `options` (the bytes of `start`'s stdin) name or hold, if any. No
/// options, or options of another kind, name none; options that are not a protobuf
/// `Any` are an error.
pub fn handler_config(options: &[u8]) -> Result<Option<HandlerConfig>, String> {
    if options.is_empty() {
        return Ok(None);
    }
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(options)
        .map_err(|e| format!("the runtime options containerd passed are not readable: {e}"))?;
    let kind = any.type_url.rsplit('/').next().unwrap_or_default();
    if kind != RUNTIME_OPTIONS {
        tracing::warn!(
            "runtime options of type {:?} are not Cocoon's; ignored",
            any.type_url
        );
        return Ok(None);
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let (mut path, mut body) = (String::new(), Vec::new());
    let bad = |e: protobuf::Error| format!("the runtime options ({RUNTIME_OPTIONS}): {e}");
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        match (tag >> 3, tag & 7) {
            (2, 2) => path = input.read_string().map_err(bad)?,
            (3, 2) => body = input.read_bytes().map_err(bad)?,
            _ => protobuf::rt::skip_field_for_tag(tag, &mut input).map_err(bad)?,
        }
    }
    if path.is_empty() {
        return inline(&body);
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "the runtime's ConfigPath {} is not an absolute path",
            path.display()
        ));
    }
    Ok(Some(HandlerConfig::Path(path)))
}

/// `body`'s tables laid over `base`'s (both Cocoon config TOML): a key in `body` wins,
/// tables merge key by key.
pub fn overlay(base: &str, body: toml::Table) -> Result<String, String> {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let mut table: toml::Table =
        toml::from_str(base).map_err(|e| format!("the node's config is not TOML: {e}"))?;
    merge(&mut table, body);
    toml::to_string(&table).map_err(|e| format!("the handler's options (config_body): {e}"))
}

/// A `config_body`: the handler's `options` table, less the keys containerd itself
/// reads there (`TypeUrl`, `ConfigPath`); none when nothing else is in it.
fn inline(body: &[u8]) -> Result<Option<HandlerConfig>, String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| "the handler's options (config_body) are not UTF-8 text".to_owned())?;
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| format!("the handler's options (config_body) are not TOML: {e}"))?;
    table.remove("TypeUrl");
    table.remove("ConfigPath");
    Ok((!table.is_empty()).then_some(HandlerConfig::Inline(table)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_path(options: &[u8]) -> Result<Option<PathBuf>, String> {
        handler_config(options).map(|c| match c {
            Some(HandlerConfig::Path(p)) => Some(p),
            Some(HandlerConfig::Inline(_)) => panic!("not a path"),
            None => None,
        })
    }

    /// `runtimeoptions.v1.Options` as containerd marshals it, in an `Any`.
    fn options(type_url: &str, config_path: &str) -> Vec<u8> {
        options_with(type_url, config_path, b"")
    }

    fn options_with(type_url: &str, config_path: &str, body: &[u8]) -> Vec<u8> {
        let mut value = Vec::new();
        let mut out = protobuf::CodedOutputStream::vec(&mut value);
        out.write_string(1, "application/toml").unwrap();
        if !config_path.is_empty() {
            out.write_string(2, config_path).unwrap();
        }
        if !body.is_empty() {
            out.write_bytes(3, body).unwrap();
        }
        out.write_uint32(7, 9).unwrap();
        out.flush().unwrap();
        drop(out);
        let any = protobuf::well_known_types::any::Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        };
        any.write_to_bytes().unwrap()
    }

    #[test]
    fn a_handlers_config_path_is_read_from_its_options() {
        assert_eq!(
            config_path(&options(
                "runtimeoptions.v1.Options",
                "/etc/cocoon/large.toml"
            )),
            Ok(Some(PathBuf::from("/etc/cocoon/large.toml")))
        );
        assert_eq!(
            config_path(&options(
                "types.containerd.io/runtimeoptions.v1.Options",
                "/etc/cocoon/x.toml"
            )),
            Ok(Some(PathBuf::from("/etc/cocoon/x.toml")))
        );
        assert_eq!(
            config_path(&options("runtimeoptions.v1.Options", "")),
            Ok(None)
        );
        assert_eq!(config_path(&[]), Ok(None));
        assert_eq!(
            config_path(&options("containerd.runc.v1.Options", "/etc/x")),
            Ok(None),
            "runc's options name no config of ours"
        );
        assert_eq!(
            config_path(&options("xruntimeoptions.v1.Options", "/etc/x")),
            Ok(None),
            "another type of a similar name"
        );
    }

    #[test]
    fn an_options_table_without_config_path_is_the_config_itself() {
        // As containerd 1.7+ marshals `[…runtimes.x.options.vm] memory_mib = 1024`.
        let body = b"TypeUrl = \"io.containerd.cocoon.v2.options\"\n[vm]\nmemory_mib = 1024\n";
        let Ok(Some(HandlerConfig::Inline(table))) =
            handler_config(&options_with("runtimeoptions.v1.Options", "", body))
        else {
            panic!("no inline config");
        };
        assert_eq!(table["vm"]["memory_mib"].as_integer(), Some(1024));
        assert!(!table.contains_key("TypeUrl"), "{table}");
        // A ConfigPath wins (containerd sends no body then); a body of nothing else
        // names no config; a body that is not TOML is an error naming it.
        assert_eq!(
            handler_config(&options_with(
                "runtimeoptions.v1.Options",
                "/etc/c.toml",
                body
            )),
            Ok(Some(HandlerConfig::Path("/etc/c.toml".into())))
        );
        assert_eq!(
            handler_config(&options_with(
                "runtimeoptions.v1.Options",
                "",
                b"ConfigPath = \"\"\n"
            )),
            Ok(None)
        );
        let e = handler_config(&options_with("runtimeoptions.v1.Options", "", b"[vm")).unwrap_err();
        assert!(e.contains("config_body") && e.contains("not TOML"), "{e}");
    }

    #[test]
    fn an_inline_config_is_laid_over_the_nodes() {
        let base = "hypervisor = \"qemu\"\n[vm]\nmemory_mib = 256\nvcpus = 1\n[jail]\nlock_file = \"/run/x.lock\"\n";
        let body = toml::from_str("[vm]\nmemory_mib = 1024\n").unwrap();
        let text = overlay(base, body).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["vm"]["memory_mib"].as_integer(), Some(1024));
        assert_eq!(
            t["vm"]["vcpus"].as_integer(),
            Some(1),
            "kept from the node's"
        );
        assert_eq!(t["jail"]["lock_file"].as_str(), Some("/run/x.lock"));
        assert_eq!(t["hypervisor"].as_str(), Some("qemu"));
        assert!(overlay("[vm", toml::Table::new())
            .unwrap_err()
            .contains("node's config"));
    }

    #[test]
    fn unreadable_or_relative_options_are_errors() {
        let e = config_path(&options("runtimeoptions.v1.Options", "large.toml")).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        assert!(config_path(b"\xff\xff\xff").is_err());
    }
}
