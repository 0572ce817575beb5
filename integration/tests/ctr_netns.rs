//! `ctr run --with-ns network:<path>`: a network namespace prepared on the host (by
//! hand, or by `cnitool`, as firecracker-containerd's users do) is the container's
//! network. runc's container joins it; Cocoon's VM takes its interface as a pod's from
//! CNI (`shim/src/podnet.rs`). Any other host namespace, the host's own network
//! namespace, `--net-host` and a spec without a PID or IPC namespace are refused,
//! naming what was asked.

mod ctr_common;

use std::process::Command;

use ctr_common::*;

/// A network namespace holding `eth0` (198.19.7.2/30), one end of a veth pair whose
/// other end stays on the host (198.19.7.1/30). Removed, with the pair, when dropped.
struct Netns {
    name: String,
    path: String,
}

fn ip(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("ip");
    assert!(o.status.success(), "ip {args:?}: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Netns {
    fn new() -> Self {
        let pid = std::process::id();
        let name = format!("cocoon-test-{pid}");
        let host_end = format!("cn{}", pid % 1_000_000);
        ip(&["netns", "add", &name]);
        let ns = Netns {
            path: format!("/var/run/netns/{name}"),
            name,
        };
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        ip(&["addr", "add", "198.19.7.1/30", "dev", &host_end]);
        ip(&["link", "set", &host_end, "up"]);
        ns.exec(&["ip", "addr", "add", "198.19.7.2/30", "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A name under /var/run/netns for the host's own network namespace; the name alone
/// is removed when dropped.
struct HostNetnsName(String);

impl HostNetnsName {
    fn new() -> Self {
        let name = format!("cocoon-host-{}", std::process::id());
        // This test's own namespace is the host's, as the shim's is.
        ip(&["netns", "attach", &name, &std::process::id().to_string()]);
        HostNetnsName(name)
    }
}

impl Drop for HostNetnsName {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_network_namespace_given_by_path_is_the_containers_network() {
    let ns = Netns::new();
    let env = env();
    let with = format!("network:{}", ns.path);
    // The interfaces by name (a veth's shows its peer after '@'; the host's fallback
    // tunnels are left out, see the next test), then eth0's address.
    let script = "ip -o link | awk '{print $2}' | grep -v @NONE | cut -d@ -f1 | tr -d :; \
                  ip -o -4 addr show eth0 | awk '{print $2, $4}'; \
                  ping -c 1 -W 10 198.19.7.1 > /dev/null && echo reached";
    let out = same_in(&env, "netns", &["--with-ns", &with], &["sh", "-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "lo\neth0\neth0 198.19.7.2/30\nreached\n",
        "{}",
        show(&out)
    );
    // The VM's tap and the redirects on eth0 went with the container; the namespace
    // and its interface stay, as under runc.
    let links = ns.exec(&["ip", "-o", "link"]);
    assert!(!links.contains(cocoon_shim::podnet::TAP_NAME), "{links}");
    let qdiscs = ns.exec(&["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    assert!(ns
        .exec(&["ip", "-o", "-4", "addr"])
        .contains("198.19.7.2/30"));
    assert_clean(&env);
}

/// A container's network namespace of its own holds loopback alone, as under runc: no
/// `sit0` from the guest kernel's built-in SIT (`fb_tunnels=none` on its command line).
/// A host with `sit` or `ipip` loaded gives each of its new namespaces such a tunnel
/// (`sit0@NONE`, `tunl0@NONE`), so runc is compared without them, and Cocoon is held
/// to none.
#[test]
fn a_containers_own_network_namespace_has_loopback_alone() {
    let env = env();
    let out = same_in(
        &env,
        "own-netns",
        &[],
        &["sh", "-c", "ip -o link | awk '{print $2}' | grep -v @NONE"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "lo:\n",
        "{}",
        show(&out)
    );
    let all = ctr_run(
        &env,
        COCOON,
        "own-netns-all",
        &[],
        &["sh", "-c", "ip -o link | awk '{print $2}'"],
    );
    assert_eq!(
        String::from_utf8_lossy(&all.stdout),
        "lo:\n",
        "{}",
        show(&all)
    );
    assert_clean(&env);
}

/// What a VM cannot share with the host is refused at Create, before any VM boots, with
/// an error naming what was asked: runc's container would share it.
#[test]
fn host_namespaces_are_refused_naming_what_was_asked() {
    let env = env();
    let refused = |o: std::process::Output, words: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(words),
            "wanted a refusal naming {words:?}: {}",
            show(&o)
        );
    };
    // The host's PID namespace, by path.
    refused(
        ctr_run(
            &env,
            COCOON,
            "joins-pid",
            &["--with-ns", "pid:/proc/1/ns/pid"],
            &["true"],
        ),
        "host's pid namespace \"/proc/1/ns/pid\"",
    );
    // The host's own network namespace (here by a name `ip netns attach` gives it): its
    // interface would be the VM's, the host's traffic redirected into the guest.
    let host = HostNetnsName::new();
    let with = format!("network:/var/run/netns/{}", host.0);
    refused(
        ctr_run(
            &env,
            COCOON,
            "joins-host-net",
            &["--with-ns", &with],
            &["true"],
        ),
        "host's network namespace",
    );
    // --net-host: runc's container is on the host's network, which a VM cannot be.
    refused(
        ctr_run(&env, COCOON, "net-host", &["--net-host"], &["true"]),
        "shares the host's network",
    );
    // No PID or IPC namespace in the spec (nerdctl's and Docker's --pid=host,
    // --ipc=host): runc's container sees the host's processes or IPC objects; here it
    // would see the guest's, the agent's among them.
    for kind in ["pid", "ipc"] {
        let id = format!("host-{kind}");
        let spec = spec_file(&env, &id, |s| {
            s["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .retain(|n| n["type"] != kind)
        });
        refused(
            env.containerd
                .ctr(&["run", "--rm", "--runtime", COCOON, "--config", &spec, &id]),
            &format!("shares the host's {kind} namespace"),
        );
    }
    assert_clean(&env);
}
