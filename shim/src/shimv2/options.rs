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

use std::path::PathBuf;

use protobuf::{CodedInputStream, Message};

/// The message CRI and ctr send for runtimes that are not runc
/// (`containerd/pkg/runtimeoptions/v1`): `type_url` = 1, `config_path` = 2.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The most `start` reads of its stdin.
pub const MAX_OPTIONS: u64 = 64 << 10;

/// The config file `options` (the bytes of `start`'s stdin) name, if any. No options,
/// or options of another kind, name none; options that are not a protobuf `Any` are an
/// error.
pub fn config_path(options: &[u8]) -> Result<Option<PathBuf>, String> {
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
    let mut path = String::new();
    let bad = |e: protobuf::Error| format!("the runtime options ({RUNTIME_OPTIONS}): {e}");
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        let (field, wire) = (tag >> 3, tag & 7);
        if (field, wire) == (2, 2) {
            path = input.read_string().map_err(bad)?;
        } else if field == 3 {
            // containerd 1.7+ sends the handler's whole `options` table (`config_body`)
            // when it names no ConfigPath: keys we do not read.
            tracing::warn!(
                "the handler's options hold keys other than ConfigPath; only ConfigPath is read"
            );
            protobuf::rt::skip_field_for_tag(tag, &mut input).map_err(bad)?;
        } else {
            protobuf::rt::skip_field_for_tag(tag, &mut input).map_err(bad)?;
        }
    }
    if path.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "the runtime's ConfigPath {} is not an absolute path",
            path.display()
        ));
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runtimeoptions.v1.Options` as containerd marshals it, in an `Any`.
    fn options(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut value = Vec::new();
        let mut out = protobuf::CodedOutputStream::vec(&mut value);
        out.write_string(1, "application/toml").unwrap();
        if !config_path.is_empty() {
            out.write_string(2, config_path).unwrap();
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
    fn unreadable_or_relative_options_are_errors() {
        let e = config_path(&options("runtimeoptions.v1.Options", "large.toml")).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        assert!(config_path(b"\xff\xff\xff").is_err());
    }
}
