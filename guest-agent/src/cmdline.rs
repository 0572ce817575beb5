//! Parsing of the kernel command line: module parameters (`mod.param=value`)
//! that modprobe would normally pass on, and the agent's own `cocoon.*` keys.

/// Splits a kernel command line into words, honouring double quotes the way
/// the kernel does (`a="b c"` is one word).
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Module parameters for `module` given on the command line, as the
/// space-separated `param=value` string `finit_module` takes. Dashes and
/// underscores in module names are equivalent, as in modprobe.
pub fn module_params(cmdline: &str, module: &str) -> String {
    let want = module.replace('-', "_");
    words(cmdline)
        .into_iter()
        .filter_map(|w| {
            let (name, rest) = w.split_once('.')?;
            if name.replace('-', "_") != want || !rest.contains('=') {
                return None;
            }
            Some(rest.to_string())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Value of `key=value` on the command line (last one wins, like the kernel).
pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_params_are_collected_per_module() {
        let c = "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 \
                 virtio-mmio.device=512@0xfeb00c00:11 vsock.x=1 quiet";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=512@0xfeb00e00:12 device=512@0xfeb00c00:11"
        );
        assert_eq!(module_params(c, "vsock"), "x=1");
        assert_eq!(module_params(c, "overlay"), "");
    }

    #[test]
    fn quoted_words_stay_together() {
        assert_eq!(words(r#"a="b c" d"#), vec!["a=b c", "d"]);
    }

    #[test]
    fn value_takes_the_last_occurrence() {
        assert_eq!(
            value("cocoon.log=info x=1 cocoon.log=debug", "cocoon.log"),
            Some("debug")
        );
        assert_eq!(value("x=1", "cocoon.log"), None);
    }
}
