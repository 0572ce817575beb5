//! The protocol shared by the Cocoon host side (shim, `cocoon`) and the guest
//! agent: generated protobuf messages and async ttrpc stubs, plus the few
//! constants both ends must agree on.

pub mod hook;

/// Generated protobuf messages.
#[allow(
    clippy::all,
    unused,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated async ttrpc clients and servers.
#[allow(
    clippy::all,
    unused,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use ttrpc;

/// vsock port the agent's ttrpc server listens on.
pub const AGENT_PORT: u32 = 1024;

/// vsock port the agent accepts stdio streams on (see `StdioStreams`).
pub const STDIO_PORT: u32 = 1025;

/// vsock port the agent accepts port-forward connections on: the host writes
/// `TCP <port>\n`, the agent connects to `127.0.0.1:<port>` in the pod's network and
/// answers `OK\n` (then bytes flow both ways) or `ERR <why>\n`.
pub const FORWARD_PORT: u32 = 1026;

/// vsock port of the debug console (only with `cocoon.debug=1` on the guest's command
/// line): the host writes one line, empty for an interactive shell on a pty, or a
/// command for `sh -c` whose stdio is the connection; the connection closes when the
/// shell ends.
pub const DEBUG_PORT: u32 = 1027;

/// The start of the line the agent prints on the guest's console once its ttrpc server
/// listens (`<READY_LINE> <AGENT_PORT>`). The shim, which copies QEMU's console, connects
/// as soon as it sees it instead of at its next retry. Anything in the guest can print
/// it: it only makes the host try to connect, which a guest can never make succeed early.
pub const READY_LINE: &str = "cocoon-agent: ready on vsock port";

/// The pod's shared memory in the guest: a tmpfs the agent mounts at CreateSandbox.
/// Kubernetes containers of one pod share `/dev/shm`; their specs name a host tmpfs
/// (containerd's per-sandbox `shm`), which the shim replaces with this.
pub const GUEST_POD_SHM: &str = "/run/cocoon/pod-shm";
/// Its size, as containerd's default for a pod's `/dev/shm`.
pub const GUEST_POD_SHM_SIZE: &str = "64m";

/// The guest image that names the agent's own pause program (`CreateContainerRequest`'s
/// `guest_image`): a CRI sandbox container run from the guest image, with no root
/// filesystem from the host. A confidential agent gives it to every sandbox container.
pub const BUILTIN_PAUSE: &str = "cocoon:pause";

/// Bumped on incompatible protocol changes; reported by `Health.Version`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The guest-assigned context id of every Cocoon VM (one VM per vsock device).
pub const GUEST_CID: u64 = 3;

/// The per-network-namespace sysctls a new namespace computes for itself (from the TCP
/// hash size) where others are copied from the first one. The host gives the guest's
/// first namespace its own values at boot; the agent copies them into a container's new
/// network namespace, as a container on runc would read the host's.
pub const NETNS_COPIED_SYSCTLS: &[&str] = &[
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_max_syn_backlog",
];

/// The OCI mount options the agent takes as flags, propagation or recursive attributes
/// (anything else is the filesystem's data), as runc names them. The shim reports them
/// to containerd (`-info`), whose CRI offers a recursively read-only volume only to a
/// runtime that lists `rro`; the agent's tests check that it knows each one.
pub const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "tmpcopyup",
    "unbindable",
    "ratime",
    "rdev",
    "rdiratime",
    "rexec",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "rrelatime",
    "rro",
    "rrw",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
];

/// Whether a mount with these OCI options ends up read-only: `ro` (or `rw`), unless a
/// recursive `rro` (or `rrw`) follows it, as runc applies them (the recursive
/// attributes last). containerd 2's CRI asks for a recursively read-only volume with
/// `rro` and no `ro` at all. One rule for the shim (the share, the copied volumes) and
/// the agent (the copied volumes).
pub fn read_only<S: AsRef<str>>(options: &[S]) -> bool {
    let (mut plain, mut recursive) = (false, None);
    for o in options {
        match o.as_ref() {
            "ro" => plain = true,
            "rw" => plain = false,
            "rro" => recursive = Some(true),
            "rrw" => recursive = Some(false),
            _ => {}
        }
    }
    recursive.unwrap_or(plain)
}

#[cfg(test)]
mod tests {
    use super::read_only;

    #[test]
    fn read_only_is_ro_or_a_recursive_rro_applied_last() {
        assert!(read_only(&["rbind", "ro"]));
        assert!(
            read_only(&["rbind", "rprivate", "rro"]),
            "containerd 2's recursive read-only"
        );
        assert!(read_only(&["rbind", "rw", "rro"]));
        assert!(
            !read_only(&["rbind", "ro", "rrw"]),
            "rrw clears it all the way down"
        );
        assert!(!read_only(&["rbind", "ro", "rw"]));
        assert!(!read_only(&["rbind", "rnoexec"]));
    }
}
