//! Bounds on what the guest agent may answer. The guest is hostile: protobuf decoding and
//! ttrpc's 4 MiB frame limit bound a reply's bytes, not what the shim then does with it
//! (a list it hands to containerd, a string it logs or publishes). Every reply is checked
//! against limits well above what a real guest sends; one over them fails that call
//! alone, naming the field, and the connection goes on serving the next.

use cocoon_protocol::agent::{
    CreateContainerResponse, Empty, ExecProcessResponse, GetEvidenceResponse, GuestDetailsResponse,
    HealthCheckResponse, Interface, Interfaces, ListPidsResponse, OnlineCpusResponse, OomEvent,
    Routes, SetInitDataResponse, StatsContainerResponse, VersionCheckResponse, WaitProcessResponse,
};

/// Any one string in a reply (names, versions, a kernel command line, an id).
pub const MAX_STRING: usize = 4096;
/// Processes in one container's `ListPids` (containerd's `ctr task ps`).
pub const MAX_PIDS: usize = 131_072;
/// Network interfaces (with their statistics), and addresses per interface.
pub const MAX_INTERFACES: usize = 64;
pub const MAX_ADDRESSES: usize = 64;
/// Routes in one routing table reply.
pub const MAX_ROUTES: usize = 1024;
/// Kernel modules the guest lists as loaded.
pub const MAX_MODULES: usize = 1024;
/// Entries of a container's `memory.stat`.
pub const MAX_MEMORY_STAT: usize = 256;
/// Events of the guest's timeline (the agent keeps 256).
pub const MAX_TIMELINE: usize = 256;
/// Hardware evidence: an SEV-SNP report is 1 184 bytes, a TDX quote with its
/// certification data a few KiB.
pub const MAX_EVIDENCE: usize = 64 * 1024;
/// An init-data digest (SHA-512 at most).
pub const MAX_DIGEST: usize = 64;
/// The text of an error the agent returns, as kept and passed on (longer is cut).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// A reply the shim can check before using it.
pub trait Bounded {
    /// What is over its bound, if anything.
    fn check(&self) -> Result<(), String>;
}

fn string(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_STRING {
        return Err(format!(
            "{what} is {} bytes (at most {MAX_STRING})",
            s.len()
        ));
    }
    Ok(())
}

fn count(what: &str, n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("{n} {what} (at most {max})"));
    }
    Ok(())
}

fn strings<'a>(what: &str, all: impl IntoIterator<Item = &'a String>) -> Result<(), String> {
    all.into_iter().try_for_each(|s| string(what, s))
}

/// `message`, cut to `MAX_ERROR_MESSAGE` bytes at a character boundary, its control
/// characters escaped (`\n`, `\u{1b}`): the text is the guest's, and it goes into the
/// shim's log lines and containerd's errors, where a raw newline would forge a line.
pub fn error_message(message: &str) -> String {
    let kept = cut(message, MAX_ERROR_MESSAGE);
    let mut out = escape_controls(kept);
    if kept.len() < message.len() {
        out.push_str(&format!("… ({} bytes cut)", message.len() - kept.len()));
    }
    out
}

/// The longest start of `s` of at most `max` bytes that ends at a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` with its control characters written as Rust escapes, the rest as it is.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

macro_rules! unbounded {
    ($($t:ty),*) => {$(
        /// Nothing but fixed-size numbers.
        impl Bounded for $t {
            fn check(&self) -> Result<(), String> {
                Ok(())
            }
        }
    )*};
}

unbounded!(
    Empty,
    HealthCheckResponse,
    WaitProcessResponse,
    OnlineCpusResponse
);

/// The most a Linux pid can be (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PID: u32 = 4 * 1024 * 1024;

/// A container's or exec's pid as the guest reports it: containerd passes it on (task
/// lists, events, `ctr run --cni`), so it must at least be a pid a process can have in a
/// guest whose PID 1 is the agent.
fn process_pid(pid: u32) -> Result<(), String> {
    if (2..=MAX_PID).contains(&pid) {
        Ok(())
    } else {
        Err(format!(
            "pid {pid} is not a container process's (2..={MAX_PID})"
        ))
    }
}

impl Bounded for CreateContainerResponse {
    fn check(&self) -> Result<(), String> {
        process_pid(self.pid)
    }
}

impl Bounded for ExecProcessResponse {
    fn check(&self) -> Result<(), String> {
        process_pid(self.pid)
    }
}

impl Bounded for VersionCheckResponse {
    fn check(&self) -> Result<(), String> {
        string("agent_version", &self.agent_version)?;
        string("build_id", &self.build_id)
    }
}

impl Bounded for GuestDetailsResponse {
    fn check(&self) -> Result<(), String> {
        string("kernel_release", &self.kernel_release)?;
        string("kernel_cmdline", &self.kernel_cmdline)?;
        string("agent_version", &self.agent_version)?;
        string("cgroup_version", &self.cgroup_version)?;
        count("loaded modules", self.loaded_modules.len(), MAX_MODULES)?;
        strings("a module name", &self.loaded_modules)?;
        count("timeline events", self.timeline.len(), MAX_TIMELINE)?;
        for e in &self.timeline {
            string("a timeline stage", &e.stage)?;
            string("a timeline container id", &e.container_id)?;
        }
        Ok(())
    }
}

impl Bounded for GetEvidenceResponse {
    fn check(&self) -> Result<(), String> {
        string("provider", &self.provider)?;
        count("evidence bytes", self.evidence.len(), MAX_EVIDENCE)?;
        count("report data bytes", self.report_data.len(), 64)
    }
}

impl Bounded for SetInitDataResponse {
    fn check(&self) -> Result<(), String> {
        count("digest bytes", self.digest.len(), MAX_DIGEST)
    }
}

impl Bounded for OomEvent {
    fn check(&self) -> Result<(), String> {
        string("container_id", &self.container_id)
    }
}

impl Bounded for Interface {
    fn check(&self) -> Result<(), String> {
        string("interface name", &self.name)?;
        string("hw_addr", &self.hw_addr)?;
        count("addresses", self.addresses.len(), MAX_ADDRESSES)?;
        strings("an address", self.addresses.iter().map(|a| &a.address))
    }
}

impl Bounded for Interfaces {
    fn check(&self) -> Result<(), String> {
        count("interfaces", self.interfaces.len(), MAX_INTERFACES)?;
        self.interfaces.iter().try_for_each(Bounded::check)
    }
}

impl Bounded for Routes {
    fn check(&self) -> Result<(), String> {
        count("routes", self.routes.len(), MAX_ROUTES)?;
        self.routes
            .iter()
            .try_for_each(|r| strings("a route field", [&r.dest, &r.gateway, &r.device, &r.source]))
    }
}

impl Bounded for StatsContainerResponse {
    fn check(&self) -> Result<(), String> {
        if let Some(m) = self.memory.as_ref() {
            count("memory.stat entries", m.stat.len(), MAX_MEMORY_STAT)?;
            strings("a memory.stat key", m.stat.keys())?;
        }
        count("network interfaces", self.network.len(), MAX_INTERFACES)?;
        strings("an interface name", self.network.iter().map(|n| &n.name))
    }
}

impl Bounded for ListPidsResponse {
    fn check(&self) -> Result<(), String> {
        count("processes", self.processes.len(), MAX_PIDS)?;
        strings("an exec id", self.processes.iter().map(|p| &p.exec_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::agent::{IpAddress, MemoryStats, ProcessInfo, Route};

    #[test]
    fn replies_within_bounds_pass() {
        let mut pids = ListPidsResponse::new();
        pids.processes = (0..MAX_PIDS as u32)
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        assert_eq!(pids.check(), Ok(()));
        let mut d = GuestDetailsResponse::new();
        d.kernel_cmdline = "x".repeat(MAX_STRING);
        assert_eq!(d.check(), Ok(()));
    }

    #[test]
    fn each_bound_names_its_field() {
        let mut pids = ListPidsResponse::new();
        pids.processes = vec![ProcessInfo::new(); MAX_PIDS + 1];
        assert!(pids.check().unwrap_err().contains("processes"));

        let mut v = VersionCheckResponse::new();
        v.build_id = "b".repeat(MAX_STRING + 1);
        assert!(v.check().unwrap_err().contains("build_id"));

        let mut d = GuestDetailsResponse::new();
        d.loaded_modules = vec!["m".into(); MAX_MODULES + 1];
        assert!(d.check().unwrap_err().contains("loaded modules"));

        let mut i = Interface::new();
        i.addresses = vec![IpAddress::new(); MAX_ADDRESSES + 1];
        let mut all = Interfaces::new();
        all.interfaces = vec![i];
        assert!(all.check().unwrap_err().contains("addresses"));

        let mut r = Routes::new();
        let mut route = Route::new();
        route.gateway = "g".repeat(MAX_STRING + 1);
        r.routes = vec![route];
        assert!(r.check().unwrap_err().contains("route field"));

        let mut s = StatsContainerResponse::new();
        let mut m = MemoryStats::new();
        m.stat = (0..=MAX_MEMORY_STAT).map(|i| (i.to_string(), 1)).collect();
        s.memory = Some(m).into();
        assert!(s.check().unwrap_err().contains("memory.stat"));

        let mut o = OomEvent::new();
        o.container_id = "c".repeat(MAX_STRING + 1);
        assert!(o.check().unwrap_err().contains("container_id"));

        let mut digest = SetInitDataResponse::new();
        digest.digest = vec![0; MAX_DIGEST + 1];
        assert!(digest.check().unwrap_err().contains("digest"));
    }

    #[test]
    fn a_process_pid_is_one_a_guest_process_can_have() {
        for pid in [0, 1, MAX_PID + 1, u32::MAX] {
            let mut c = CreateContainerResponse::new();
            c.pid = pid;
            assert!(c.check().unwrap_err().contains(&format!("pid {pid}")));
            let mut e = ExecProcessResponse::new();
            e.pid = pid;
            assert!(e.check().is_err(), "{pid}");
        }
        for pid in [2, 4242, MAX_PID] {
            let mut c = CreateContainerResponse::new();
            c.pid = pid;
            assert_eq!(c.check(), Ok(()));
        }
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character() {
        assert_eq!(error_message("short"), "short");
        assert_eq!(
            error_message("no such file \"x\"\nlevel=info msg=forged\r\u{1b}[2J"),
            "no such file \"x\"\\nlevel=info msg=forged\\r\\u{1b}[2J"
        );
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let cut = error_message(&long);
        assert!(cut.len() < MAX_ERROR_MESSAGE + 32, "{}", cut.len());
        assert!(cut.ends_with("bytes cut)"), "{cut}");
    }
}
