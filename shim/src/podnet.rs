//! Carries a pod's network into its VM. Kubernetes (through CRI and CNI) prepares a
//! network namespace on the host with one interface (a veth end, `eth0`) holding the
//! pod's MAC, addresses and routes. A VM cannot join that namespace, so, as other VM
//! runtimes do, we create a tap inside it and join the two with `tc`: an ingress qdisc on
//! each, and a `mirred` filter redirecting every frame arriving on one out of the other.
//! The VMM gets the tap's fd; the guest's virtio-net interface gets the same MAC,
//! addresses, routes and MTU from the agent. Nothing in the pod namespace answers for the
//! pod any more (its ingress is redirected before the host's stack sees it): the guest
//! does.
//!
//! The tap is not persistent: it disappears when the last fd (the VMM's) closes. The tc
//! state lives on the CNI interface, which CNI deletes with the namespace; `detach`
//! removes it earlier when the VM stops first.
//!
//! iproute2 (`ip -j`, `tc`) does the work: it is what CNI plugins and operators use on
//! these namespaces, and reading its JSON keeps this module small. It runs from a thread
//! that has entered the pod namespace, so the commands see only that namespace.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_protocol::agent::{Interface, IpAddress, Route};
use serde_json::Value;
use thiserror::Error;

/// The tap's name inside the pod namespace.
pub const TAP_NAME: &str = "cocoon_tap0";

#[derive(Debug, Error)]
pub enum PodNetError {
    #[error("cannot open the pod network namespace {0}")]
    OpenNetns(PathBuf, #[source] std::io::Error),
    #[error("cannot enter the pod network namespace {0}")]
    Setns(PathBuf, #[source] nix::Error),
    #[error("`{command}` failed in the pod network namespace: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run {0} (is iproute2 installed?)")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot read `{command}`'s output: {why}")]
    Parse { command: String, why: String },
    #[error("the pod network namespace has no interface with an address (did CNI set it up?)")]
    NoInterface,
    #[error("cannot create the tap {TAP_NAME} in the pod network namespace")]
    Tap(#[source] std::io::Error),
    #[error("the pod network thread panicked")]
    Thread,
    #[error("cannot listen for port forwards in the pod network namespace")]
    Forward(#[source] std::io::Error),
}

/// The pod's network as the VM needs it.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The tap inside the pod namespace; hand it to the VMM, then drop it.
    pub tap: Option<OwnedFd>,
    /// The CNI interface as the guest should have it (same name, MAC, MTU, addresses).
    pub interface: Interface,
    /// Its routes, less those the guest kernel makes itself for each address.
    pub routes: Vec<Route>,
    /// The loopback listener `PortForward` connections are redirected to (see
    /// `crate::portfwd`); None where nftables could not install the redirect.
    pub forward: Option<std::net::TcpListener>,
}

impl PodNetwork {
    /// Sets up the tap and the redirects in the namespace at `netns` and reads what the
    /// guest must be given. Blocking: it runs commands. Undoes what it did on failure.
    pub fn attach(netns: &Path) -> Result<Self, PodNetError> {
        in_netns(netns, {
            let netns = netns.to_path_buf();
            move || {
                let links = ip_json(&["-j", "addr", "show"])?;
                let interface = pick_interface(&links).ok_or(PodNetError::NoInterface)?;
                let mut routes = Vec::new();
                for (family, v6) in [("-4", false), ("-6", true)] {
                    let v = ip_json(&[family, "-j", "route", "show", "dev", &interface.name])?;
                    routes.extend(parse_routes(&v, &interface.name, v6));
                }
                let tap = open_tap(TAP_NAME).map_err(PodNetError::Tap)?;
                if let Err(e) = redirect(&interface.name, interface.mtu) {
                    remove_redirect(&interface.name);
                    return Err(e);
                }
                let forward = match crate::portfwd::install() {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!("PortForward will not reach this pod: {e}");
                        None
                    }
                };
                Ok(PodNetwork {
                    netns,
                    tap: Some(tap),
                    interface,
                    routes,
                    forward,
                })
            }
        })
    }

    /// Removes the redirect from the CNI interface, if the namespace is still there.
    /// The tap goes by itself with the VMM's fd.
    pub fn detach(&self) {
        detach(&self.netns, &self.interface.name);
    }
}

/// Removes the redirect from interface `dev` in the namespace at `netns`, if both are
/// still there. Blocking.
pub fn detach(netns: &Path, dev: &str) {
    let dev = dev.to_string();
    let result = in_netns(netns, move || {
        remove_redirect(&dev);
        Ok(())
    });
    if let Err(e) = result {
        tracing::debug!("pod network already gone: {e}");
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`: the caller's
/// threads never change namespace, and commands `f` starts inherit the thread's.
fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, PodNetError> + Send + 'static,
) -> Result<T, PodNetError> {
    let ns = File::open(path).map_err(|e| PodNetError::OpenNetns(path.into(), e))?;
    let owned = path.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| PodNetError::Setns(owned, e))?;
        f()
    })
    .join()
    .map_err(|_| PodNetError::Thread)?
}

pub(crate) fn tool(name: &str) -> String {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    name.to_string()
}

fn run(program: &str, args: &[&str]) -> Result<Vec<u8>, PodNetError> {
    let bin = tool(program);
    let out = Command::new(&bin)
        .args(args)
        .output()
        .map_err(|e| PodNetError::Spawn(bin.clone(), e))?;
    if !out.status.success() {
        return Err(PodNetError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn ip_json(args: &[&str]) -> Result<Value, PodNetError> {
    let out = run("ip", args)?;
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out).map_err(|e| PodNetError::Parse {
        command: format!("ip {}", args.join(" ")),
        why: e.to_string(),
    })
}

/// The CNI interface: an Ethernet link, not our tap, with a global address.
pub fn pick_interface(links: &Value) -> Option<Interface> {
    links.as_array()?.iter().find_map(|l| {
        let name = l.get("ifname")?.as_str()?;
        if name == TAP_NAME || l.get("link_type")?.as_str()? != "ether" {
            return None;
        }
        let mut iface = Interface::new();
        iface.name = name.into();
        iface.hw_addr = l.get("address")?.as_str()?.into();
        iface.mtu = l.get("mtu").and_then(Value::as_u64).unwrap_or(1500) as u32;
        iface.up = true;
        for a in l.get("addr_info")?.as_array()? {
            if a.get("scope").and_then(Value::as_str) != Some("global") {
                continue;
            }
            let (Some(local), Some(len)) = (
                a.get("local").and_then(Value::as_str),
                a.get("prefixlen").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let mut ip = IpAddress::new();
            ip.address = local.into();
            ip.prefix_len = len as u32;
            iface.addresses.push(ip);
        }
        (!iface.addresses.is_empty()).then_some(iface)
    })
}

/// Routes through `dev`, less the kernel's own (a subnet route per address) and IPv6
/// link-local and multicast ones, which the guest kernel makes itself. `ip` calls both
/// families' default route `default`; an IPv6 one becomes `::/0`.
pub fn parse_routes(v: &Value, dev: &str, v6: bool) -> Vec<Route> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    let mut routes: Vec<Route> = list
        .iter()
        .filter_map(|r| {
            let dst = r.get("dst")?.as_str()?;
            if r.get("protocol").and_then(Value::as_str) == Some("kernel")
                || dst.starts_with("fe80:")
                || dst.starts_with("ff00:")
                || r.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "unicast")
            {
                return None;
            }
            let mut route = Route::new();
            route.dest = match dst {
                "default" if v6 => "::/0".into(),
                "default" => "0.0.0.0/0".into(),
                other => other.into(),
            };
            route.gateway = r
                .get("gateway")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into();
            route.source = r
                .get("prefsrc")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into();
            route.device = dev.into();
            route.scope = match r.get("scope").and_then(Value::as_str) {
                Some("link") => 253,
                Some("host") => 254,
                _ => 0,
            };
            Some(route)
        })
        .collect();
    // A gateway may be reachable only through a link-scope route (as with Calico's
    // 169.254.1.1): those go in first.
    routes.sort_by_key(|r| r.scope != 253);
    routes
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A new, non-persistent tap (gone with its last fd), in the calling thread's namespace.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an `ifreq` (40 bytes: name, then flags), which
    // `IfReq` lays out; the fd is the tun device just opened.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

/// Joins the CNI interface and the tap: each one's ingress leaves by the other.
fn redirect(dev: &str, mtu: u32) -> Result<(), PodNetError> {
    let mtu = mtu.to_string();
    run("ip", &["link", "set", TAP_NAME, "mtu", &mtu, "up"])?;
    for (from, to) in [(dev, TAP_NAME), (TAP_NAME, dev)] {
        run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

fn remove_redirect(dev: &str) {
    for d in [dev, TAP_NAME] {
        let _ = run("tc", &["qdisc", "del", "dev", d, "ingress"]);
    }
    crate::portfwd::uninstall();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_interface_is_picked_with_its_global_addresses() {
        let links: Value = serde_json::from_str(
            r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
                 "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
                {"ifname":"cocoon_tap0","link_type":"ether","address":"aa:aa:aa:aa:aa:aa","mtu":1500,"addr_info":[]},
                {"ifname":"eth0","link_type":"ether","address":"c2:11:22:33:44:55","mtu":1450,
                 "addr_info":[{"family":"inet","local":"198.18.0.5","prefixlen":24,"scope":"global"},
                              {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
                              {"family":"inet6","local":"fd00::5","prefixlen":64,"scope":"global"}]}]"#,
        )
        .unwrap();
        let i = pick_interface(&links).unwrap();
        assert_eq!(i.name, "eth0");
        assert_eq!(i.hw_addr, "c2:11:22:33:44:55");
        assert_eq!(i.mtu, 1450);
        let addrs: Vec<_> = i
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix_len))
            .collect();
        assert_eq!(addrs, ["198.18.0.5/24", "fd00::5/64"]);
        let none: Value = serde_json::from_str(
            r#"[{"ifname":"eth0","link_type":"ether","address":"c2:11:22:33:44:55","addr_info":[]}]"#,
        )
        .unwrap();
        assert!(pick_interface(&none).is_none());
    }

    #[test]
    fn kernel_and_link_local_routes_are_left_to_the_guest() {
        let v: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"198.18.0.1","flags":[]},
                {"dst":"198.18.0.0/24","protocol":"kernel","scope":"link","prefsrc":"198.18.0.5","flags":[]},
                {"dst":"10.96.0.0/12","gateway":"198.18.0.1","flags":[]},
                {"dst":"fe80::/64","protocol":"kernel","flags":[]},
                {"dst":"169.254.1.1","scope":"link","flags":[]}]"#,
        )
        .unwrap();
        let r = parse_routes(&v, "eth0", false);
        let got: Vec<_> = r
            .iter()
            .map(|r| format!("{} via {} scope {}", r.dest, r.gateway, r.scope))
            .collect();
        assert_eq!(
            got,
            [
                "169.254.1.1 via  scope 253",
                "0.0.0.0/0 via 198.18.0.1 scope 0",
                "10.96.0.0/12 via 198.18.0.1 scope 0",
            ]
        );
        assert!(r.iter().all(|r| r.device == "eth0"));
        let v6: Value =
            serde_json::from_str(r#"[{"dst":"default","gateway":"fd00::1","flags":[]}]"#).unwrap();
        assert_eq!(parse_routes(&v6, "eth0", true)[0].dest, "::/0");
    }
}
