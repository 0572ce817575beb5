# Cocoon's agent policy for a confidential pod whose init-data carries none: the host
# runs the pod's containers and manages their lifecycle, but cannot look inside them.
package agent_policy

default GetGuestDetailsRequest := true
# Evidence is meant for relying parties; the host only carries it.
default GetEvidenceRequest := true
default CreateSandboxRequest := true
default DestroySandboxRequest := true
default ShutdownRequest := true
default UpdateInterfaceRequest := true
default UpdateRoutesRequest := true
default ListInterfacesRequest := true
default ListRoutesRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default PauseContainerRequest := true
default ResumeContainerRequest := true
default UpdateContainerRequest := true
default StatsContainerRequest := true
default ListPidsRequest := true
default SignalProcessRequest := true
default WaitProcessRequest := true
default TtyWinResizeRequest := true
default CloseStdinRequest := true
default GetOomEventRequest := true
default OnlineCpusRequest := true

# No exec into a container, no attach (its stdin), no reading its output from the host,
# no debug console.
default ExecProcessRequest := false
default WriteStreamRequest := false
default ReadStreamRequest := false
default DebugConsoleRequest := false

# Containers, unprivileged (below), and only from a root filesystem the guest made: an image it pulled by
# digest, or the agent's own pause for a sandbox container (which the agent gives every
# sandbox container of a confidential pod before this policy sees the request). Nothing
# of the host's beyond what every pod has, by allow-list: no storages, the kernel's own
# filesystems, the files kubelet gives every container (shared from the host at
# /run/cocoon/shared/<container>/mounts/<n>), the pod's /dev/shm; and namespaces joined by
# path only those a pod's containers share, never the agent's.
default CreateContainerRequest := false

CreateContainerRequest if {
	input.guest_image != ""
	count(input.storages) == 0
	unprivileged(object.get(input, "oci", {}))
	every m in object.get(input, ["oci", "mounts"], []) {
		allowed_mount(m)
	}
	every ns in object.get(input, ["oci", "linux", "namespaces"], []) {
		allowed_namespace(ns)
	}
	own_mount_namespace(object.get(input, ["oci", "linux", "namespaces"], []))
	some pid in object.get(input, ["oci", "linux", "namespaces"], [])
	pid.type == "pid"
	sysctls_namespaced(object.get(input, ["oci", "linux"], {}))
	masked_as_containerd_does(object.get(input, ["oci", "linux"], {}))
	no_hooks_in_guest(object.get(input, "oci", {}))
}

# No startContainer hook: the host naming a program for the container to run before its
# own is an exec by another name. (The shim runs the other kinds on the host.)
no_hooks_in_guest(oci) if count(object.get(oci, ["hooks", "startContainer"], [])) == 0

# A mount namespace of its own (never one joined by path).
own_mount_namespace(namespaces) if {
	some ns in namespaces
	ns.type == "mount"
	object.get(ns, "path", "") == ""
}

sysctls_namespaced(linux) if object.get(linux, "sysctl", null) == null

sysctls_namespaced(linux) if {
	is_object(linux.sysctl)
	every key, _ in linux.sysctl {
		namespaced_sysctl(key)
	}
}

# Only sysctls the container's own namespaces scope: a global one (kernel.core_pattern)
# would be written into the guest kernel by the runtime before the container drops
# its privileges.
namespaced_sysctl(key) if {
	some prefix in ["net.", "kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue."]
	startswith(key, prefix)
}

# containerd's masked and read-only paths, at least: the guest kernel's knobs stay out
# of a container's reach.
masked_as_containerd_does(linux) if {
	every p in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"] {
		p in object.get(linux, "maskedPaths", [])
	}
	every p in ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"] {
		p in object.get(linux, "readonlyPaths", [])
	}
}

kernel_filesystems := {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}

allowed_mount(m) if {
	m.type in kernel_filesystems
	# A name, never a path: with `bind` in its options a relative source would be a
	# bind of the agent's own tree.
	regex.match(`^[a-z0-9]+$`, m.source)
	every o in object.get(m, "options", []) {
		not o in {"bind", "rbind"}
	}
	read_only_if_sysfs(m)
}

read_only_if_sysfs(m) if m.type != "sysfs"

read_only_if_sysfs(m) if {
	m.type == "sysfs"
	"ro" in object.get(m, "options", [])
}

allowed_mount(m) if {
	m.destination in kubelet_files
	regex.match(`^/run/cocoon/shared/[0-9A-Za-z_.-]+/mounts/[0-9]+$`, m.source)
}

allowed_mount(m) if {
	m.destination == "/dev/shm"
	m.source == "/run/cocoon/pod-shm"
}

# The files CRI gives every container, shared the same way: the host already decides
# the pod's name and network, and the termination log is the container's to write.
kubelet_files := {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log"}

allowed_namespace(ns) if {
	object.get(ns, "path", "") == ""
}

allowed_namespace(ns) if {
	ns.type in {"ipc", "uts", "pid", "network"}
	regex.match(`^/proc/[0-9]+/ns/(ipc|uts|pid|net)$`, ns.path)
	not startswith(ns.path, "/proc/1/")
}

# Not privileged, whatever the host asked: no device nodes, no cgroup rule opening every
# device (or a whole type or major), and no capability beyond those containerd gives a container by
# default (a privileged container could reach the guest kernel, and through it every
# other container's secrets). The process itself (its arguments, environment, user) is
# still the host's to choose: a pod owner who needs to pin it writes a policy of their own.
unprivileged(oci) if {
	# Sets the spec leaves out are sets the runtime leaves alone: for root, all.
	every kind in ["bounding", "effective", "permitted"] {
		is_array(oci.process.capabilities[kind])
	}
	count(object.get(oci, ["linux", "devices"], [])) == 0
	every d in object.get(oci, ["linux", "resources", "devices"], []) {
		not broad_device_rule(d)
	}
	every kind in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
		every c in object.get(oci, ["process", "capabilities", kind], []) {
			c in default_capabilities
		}
	}
}

# A cgroup rule letting the container at every device, or at all of a type or major.
broad_device_rule(d) if {
	d.allow
	object.get(d, "type", "a") == "a"
}

broad_device_rule(d) if {
	d.allow
	object.get(d, "major", -1) == -1
}

broad_device_rule(d) if {
	d.allow
	object.get(d, "minor", -1) == -1
}

default_capabilities := {
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
	"CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
	"CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}
