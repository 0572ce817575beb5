//! The pod's network inside the guest: the host hands over what CNI gave the pod (the
//! interface's MAC, MTU and addresses, and its routes) and the agent configures the
//! guest's virtio-net interface with the same, through rtnetlink. Containers of a pod
//! share the agent's network namespace, so they all see this interface and one loopback.
//!
//! A pod with a user namespace of its own (`hostUsers: false`) is the exception: its
//! network namespace must belong to that user namespace, as under runc, so its sandbox
//! makes one and the agent moves the pod's interfaces there (`move_into`), configured
//! again as the host asked. From then on every call here, and port forwarding, works in
//! that namespace (`in_pod_netns`).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use cocoon_protocol::agent::{Interface, IpAddress, Route, Routes};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("no interface with hardware address {0}")]
    NoSuchInterface(String),
    #[error("no interface named {0:?} for a route")]
    NoSuchDevice(String),
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot enter the pod's network namespace")]
    Enter(#[source] std::io::Error),
    #[error("netlink: cannot {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetError {
    /// The ttrpc code: a request naming something that does not parse or exist is the
    /// caller's mistake; a netlink refusal is the guest's.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            NetError::Invalid { .. } | NetError::NoSuchInterface(_) | NetError::NoSuchDevice(_) => {
                ttrpc::Code::INVALID_ARGUMENT
            }
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

fn invalid(what: &'static str, value: &str) -> NetError {
    NetError::Invalid {
        what,
        value: value.into(),
    }
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// `aa:bb:cc:dd:ee:ff` as six bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(|| invalid("hardware address", s))?;
        if p.len() != 2 {
            return Err(invalid("hardware address", s));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| invalid("hardware address", s))?;
    }
    if parts.next().is_some() {
        return Err(invalid("hardware address", s));
    }
    Ok(mac)
}

fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `10.0.0.0/24`, `default`, or a bare address (a host route), as address and prefix.
pub fn parse_prefix(s: &str) -> Result<(IpAddr, u8), NetError> {
    match s {
        "default" | "0.0.0.0/0" | "" => return Ok((IpAddr::from([0u8; 4]), 0)),
        "::/0" => return Ok((IpAddr::from([0u16; 8]), 0)),
        _ => {}
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| invalid("destination", s))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().map_err(|_| invalid("prefix length", s))?,
        None => max,
    };
    if len > max {
        return Err(invalid("prefix length", s));
    }
    Ok((ip, len))
}

/// What the host configured: each interface as last asked, and each set of routes.
/// Kept to configure them again once they move into the pod's own network namespace.
#[derive(Default)]
struct Configured {
    interfaces: Vec<Interface>,
    routes: Vec<Routes>,
}

static CONFIGURED: Mutex<Configured> = Mutex::new(Configured {
    interfaces: Vec::new(),
    routes: Vec::new(),
});

/// The most route sets kept to configure again (the oldest go first).
const MAX_ROUTE_SETS: usize = 16;
/// The most interfaces kept to configure again (the oldest go first).
const MAX_INTERFACES: usize = 16;

/// The pod's own network namespace, once its interfaces moved there.
static POD_NETNS: Mutex<Option<Arc<File>>> = Mutex::new(None);

fn pod_netns() -> Option<Arc<File>> {
    POD_NETNS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `f` in the pod's network namespace (on a thread of its own, which enters it),
/// or here when the pod has none of its own. A socket `f` makes belongs to the
/// namespace it was made in for its whole life.
pub fn in_pod_netns<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let Some(ns) = pod_netns() else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn_scoped(s, || {
                nix::sched::setns(ns.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })?
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread panicked")))
    })
}

async fn connect() -> Result<Handle, NetError> {
    // The socket registers with this runtime's reactor wherever it is made.
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = in_pod_netns(|| {
        let _entered = rt.enter();
        rtnetlink::new_connection()
    })
    .map_err(NetError::Enter)?
    .map_err(NetError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Held by every change of the pod's interfaces and by their move, one at a time: an
/// update finished between the move's reading of what is configured and the move
/// itself would be lost.
static CHANGING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Moves the interfaces the host configured into the network namespace of process
/// `pid` (a pod's sandbox, in a user namespace of the pod's own), and configures them
/// there again as the host asked: a move takes an interface's addresses and routes.
/// Once per guest. On failure they are moved back and configured again where they
/// were, so the guest's own namespace keeps the pod's network.
pub async fn move_into(pid: i32) -> Result<(), NetError> {
    let _one_at_a_time = CHANGING.lock().await;
    if pod_netns().is_some() {
        return Err(invalid("second pod network namespace", &pid.to_string()));
    }
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(NetError::Enter)?;
    let own = File::open("/proc/self/ns/net").map_err(NetError::Enter)?;
    let (interfaces, routes) = {
        let c = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
        (c.interfaces.clone(), c.routes.clone())
    };
    let moved = move_links(&interfaces, &ns).await;
    *POD_NETNS.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ns));
    let configured = match moved {
        Ok(()) => configure_all(&interfaces, &routes).await,
        Err(e) => Err(e),
    };
    if let Err(e) = configured {
        // Whatever moved goes back (from the pod's namespace, where it now is).
        let _ = move_links(&interfaces, &own).await;
        *POD_NETNS.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = configure_all(&interfaces, &routes).await;
        return Err(e);
    }
    Ok(())
}

/// Moves each of `interfaces` found in the current namespace into `to`.
async fn move_links(interfaces: &[Interface], to: &File) -> Result<(), NetError> {
    let handle = connect().await?;
    let all = links(&handle).await?;
    for want in interfaces {
        let mac = parse_mac(&want.hw_addr)?;
        let Some(link) = all.iter().find(|l| link_mac(l) == Some(&mac[..])) else {
            return Err(NetError::NoSuchInterface(want.hw_addr.clone()));
        };
        let msg = LinkUnspec::new_with_index(link.header.index)
            .setns_by_fd(to.as_raw_fd())
            .build();
        handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(netlink(format!("move interface {}", want.hw_addr)))?;
    }
    Ok(())
}

async fn configure_all(interfaces: &[Interface], routes: &[Routes]) -> Result<(), NetError> {
    loopback_up().await?;
    for want in interfaces {
        configure_interface(want, "").await?;
    }
    for r in routes {
        add_routes(r).await?;
    }
    Ok(())
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list links"))
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

async fn set_up(handle: &Handle, index: u32) -> Result<(), NetError> {
    let msg = LinkUnspec::new_with_index(index).up().build();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(netlink(format!("bring link {index} up")))
}

/// Brings the loopback up: the pod's containers talk over it.
pub async fn loopback_up() -> Result<(), NetError> {
    let handle = connect().await?;
    let lo = links(&handle)
        .await?
        .into_iter()
        .find(|l| link_name(l) == Some("lo"))
        .ok_or_else(|| NetError::NoSuchDevice("lo".into()))?;
    set_up(&handle, lo.header.index).await
}

/// Configures the interface whose MAC is `want.hw_addr` (or `current_mac`, when given:
/// it then gets `want.hw_addr`): name, MTU, addresses, up.
pub async fn update_interface(want: &Interface, current_mac: &str) -> Result<Interface, NetError> {
    let _one_at_a_time = CHANGING.lock().await;
    let got = configure_interface(want, current_mac).await?;
    // Known by its MAC, the old one too when it changed.
    let gone = [parse_mac(&want.hw_addr).ok(), parse_mac(current_mac).ok()];
    let mut c = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
    c.interfaces
        .retain(|i| !gone.contains(&parse_mac(&i.hw_addr).ok()));
    // Only interfaces that exist get here; a host that renames one over and over
    // cannot grow this past what the guest has.
    if c.interfaces.len() >= MAX_INTERFACES {
        c.interfaces.remove(0);
    }
    c.interfaces.push(want.clone());
    Ok(got)
}

async fn configure_interface(want: &Interface, current_mac: &str) -> Result<Interface, NetError> {
    let mac = parse_mac(&want.hw_addr)?;
    let find = if current_mac.is_empty() {
        mac
    } else {
        parse_mac(current_mac)?
    };
    let mut addrs = Vec::new();
    for a in &want.addresses {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|_| invalid("address", &a.address))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if a.prefix_len > max {
            return Err(invalid("prefix length", &a.prefix_len.to_string()));
        }
        addrs.push((ip, a.prefix_len as u8));
    }
    if !want.name.is_empty() && (want.name.len() > 15 || want.name.contains(['/', '\0', ' '])) {
        return Err(invalid("interface name", &want.name));
    }
    let handle = connect().await?;
    let all = links(&handle).await?;
    let link = all
        .iter()
        .find(|l| link_mac(l) == Some(&find[..]))
        .ok_or_else(|| NetError::NoSuchInterface(format_mac(&find)))?;
    let index = link.header.index;
    let mut b = LinkUnspec::new_with_index(index).down();
    if find != mac {
        b = b.address(mac.to_vec());
    }
    if want.mtu > 0 {
        b = b.mtu(want.mtu);
    }
    if !want.name.is_empty() && link_name(link) != Some(want.name.as_str()) {
        b = b.name(want.name.clone());
    }
    handle
        .link()
        .set(b.build())
        .execute()
        .await
        .map_err(netlink(format!("set up interface {}", want.hw_addr)))?;
    for (ip, len) in addrs {
        handle
            .address()
            .add(index, ip, len)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add address {ip}/{len}")))?;
    }
    set_up(&handle, index).await?;
    loopback_up().await?;
    describe(&handle, index).await
}

/// The interface `index` as the protocol describes it.
async fn describe(handle: &Handle, index: u32) -> Result<Interface, NetError> {
    let link = links(handle)
        .await?
        .into_iter()
        .find(|l| l.header.index == index)
        .ok_or_else(|| NetError::NoSuchDevice(index.to_string()))?;
    let mut out = Interface::new();
    out.name = link_name(&link).unwrap_or_default().into();
    out.hw_addr = link_mac(&link).map(format_mac).unwrap_or_default();
    out.up = link.header.flags.contains(LinkFlags::Up);
    out.mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0);
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list addresses"))?;
    for a in addrs {
        for attr in &a.attributes {
            if let AddressAttribute::Address(ip) = attr {
                let mut x = IpAddress::new();
                x.address = ip.to_string();
                x.prefix_len = a.header.prefix_len.into();
                out.addresses.push(x);
            }
        }
    }
    Ok(out)
}

/// Every interface of the guest, described.
pub async fn list_interfaces() -> Result<Vec<Interface>, NetError> {
    let handle = connect().await?;
    let mut out = Vec::new();
    for l in links(&handle).await? {
        out.push(describe(&handle, l.header.index).await?);
    }
    Ok(out)
}

/// Adds (or replaces) each route; a route's device is an interface name in the guest.
pub async fn update_routes(routes: &Routes) -> Result<Routes, NetError> {
    let _one_at_a_time = CHANGING.lock().await;
    let got = add_routes(routes).await?;
    let mut c = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
    // The host sends one set per pod; a host that sends more cannot grow this.
    if c.routes.len() >= MAX_ROUTE_SETS {
        c.routes.remove(0);
    }
    c.routes.push(routes.clone());
    Ok(got)
}

async fn add_routes(routes: &Routes) -> Result<Routes, NetError> {
    let handle = connect().await?;
    let all = links(&handle).await?;
    for r in &routes.routes {
        let msg = route_message(r, &all)?;
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add route to {:?}", r.dest)))?;
    }
    list_routes_with(&handle, &all).await
}

fn route_message(
    r: &Route,
    links: &[LinkMessage],
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetError> {
    let (dest, len) = parse_prefix(&r.dest)?;
    let bad = |_| invalid("route", &r.dest);
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, len)
        .map_err(bad)?;
    if !r.gateway.is_empty() {
        let gw: IpAddr = r
            .gateway
            .parse()
            .map_err(|_| invalid("gateway", &r.gateway))?;
        b = b.gateway(gw).map_err(|_| invalid("gateway", &r.gateway))?;
    }
    if !r.source.is_empty() {
        let src: IpAddr = r.source.parse().map_err(|_| invalid("source", &r.source))?;
        b = b
            .pref_source(src)
            .map_err(|_| invalid("source", &r.source))?;
    }
    if !r.device.is_empty() {
        let index = links
            .iter()
            .find(|l| link_name(l) == Some(r.device.as_str()))
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::NoSuchDevice(r.device.clone()))?;
        b = b.output_interface(index);
    }
    let scope = match r.scope {
        0 => RouteScope::Universe,
        253 => RouteScope::Link,
        254 => RouteScope::Host,
        other => return Err(invalid("route scope", &other.to_string())),
    };
    Ok(b.scope(scope).build())
}

async fn list_routes_with(handle: &Handle, links: &[LinkMessage]) -> Result<Routes, NetError> {
    let mut out = Routes::new();
    for family in [
        RouteMessageBuilder::<IpAddr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<_> = handle
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("list routes"))?;
        for m in msgs {
            let mut r = Route::new();
            let mut dest = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dest = Some(route_addr(d)),
                    RouteAttribute::Gateway(g) => r.gateway = route_addr(g),
                    RouteAttribute::PrefSource(s) => r.source = route_addr(s),
                    RouteAttribute::Oif(i) => {
                        r.device = links
                            .iter()
                            .find(|l| l.header.index == *i)
                            .and_then(link_name)
                            .unwrap_or_default()
                            .into()
                    }
                    _ => {}
                }
            }
            r.dest = match dest {
                Some(d) => format!("{d}/{}", m.header.destination_prefix_length),
                None => "default".into(),
            };
            r.scope = u8::from(m.header.scope).into();
            out.routes.push(r);
        }
    }
    Ok(out)
}

fn route_addr(a: &rtnetlink::packet_route::route::RouteAddress) -> String {
    use rtnetlink::packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => v4.to_string(),
        RouteAddress::Inet6(v6) => v6.to_string(),
        other => format!("{other:?}"),
    }
}

/// The guest's routes (main table), described.
pub async fn list_routes() -> Result<Routes, NetError> {
    let handle = connect().await?;
    let all = links(&handle).await?;
    list_routes_with(&handle, &all).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:42:c6:12:00:05").unwrap(),
            [2, 0x42, 0xc6, 0x12, 0, 5]
        );
        for bad in [
            "",
            "02:42",
            "02:42:c6:12:00:05:07",
            "2:42:c6:12:00:05",
            "zz:42:c6:12:00:05",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            format_mac(&[2, 0x42, 0xc6, 0x12, 0, 5]),
            "02:42:c6:12:00:05"
        );
    }

    #[test]
    fn prefixes_parse_with_defaults_and_limits() {
        assert_eq!(parse_prefix("default").unwrap().1, 0);
        assert_eq!(
            parse_prefix("198.18.0.0/24").unwrap(),
            ("198.18.0.0".parse().unwrap(), 24)
        );
        assert_eq!(parse_prefix("198.18.0.7").unwrap().1, 32);
        assert_eq!(parse_prefix("fd00::/64").unwrap().1, 64);
        for bad in ["198.18.0.0/33", "fd00::/129", "nope/8", "1.2.3.4/x"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }
}
