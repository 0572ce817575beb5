//! `auto`, `on` or `off`: the one shape of every optional protection or optimisation
//! the VMM may or may not be able to set up (its jail, huge-page guest RAM).

use serde::{Deserialize, Serialize};

/// Whether to set something up that this host or this process may not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoOnOff {
    /// Where it can be set up, and not otherwise; the choice is logged either way.
    #[default]
    Auto,
    /// Required: failing to set it up fails the boot.
    On,
    /// Not even tried.
    Off,
}

impl std::str::FromStr for AutoOnOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("{s:?} is not one of auto, on, off")),
        }
    }
}

impl std::fmt::Display for AutoOnOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints_and_names_a_bad_value() {
        for v in [AutoOnOff::Auto, AutoOnOff::On, AutoOnOff::Off] {
            assert_eq!(v.to_string().parse::<AutoOnOff>(), Ok(v));
        }
        let e = "yes".parse::<AutoOnOff>().unwrap_err();
        assert!(e.contains("\"yes\"") && e.contains("auto, on, off"), "{e}");
    }
}
