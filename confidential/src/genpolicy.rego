# The generic rules of `cocoon policy generate` (genpolicy.rs): `legacy_group_lookup`
# and `pinned` (the containers' data) come before them in the generated policy.
# Each container, by its name in the pod, as its manifest and its pulled image say.
default CreateContainerImageRequest := false

CreateContainerImageRequest if {
	c := pinned[input.oci.annotations["io.kubernetes.cri.container-name"]]
	input.guest_image == c.image
	process := input.oci.process
	process.args == pinned_args(c)
	process.cwd == pinned_cwd(c)
	env := object.get(process, "env", [])
	every e in env {
		pinned_env_allows(c, e)
	}
	every e in c.env {
		e in env
	}
	# One entry per name: programs differ on which of two they read.
	names := [split(e, "=")[0] | some e in env]
	count({n | some n in names}) == count(names)
	# The image's own variables stay, unless the manifest sets the name.
	every e in image_list("Env") {
		image_env_kept(c, e, env)
	}
	# Users and groups need the image's accounts: without them, nothing passes.
	is_array(input.image_accounts.users)
	is_array(input.image_accounts.groups)
	count(split(image_string("User"), ":")) <= 2
	process.user.uid == expected_uid(c)
	process.user.gid == expected_gid(c)
	# Exactly containerd's groups: one left out can be one a file denies access to.
	gids := object.get(process.user, "additionalGids", [])
	is_array(gids)
	{g | some g in gids} == additional_gids(c)
	not root_refused(c, process.user.uid)
	pinned_security(c, input.oci)
	object.get(input.oci.annotations, "io.cocoon.kbs-secrets", "") == c.kbs_secrets
	every m in object.get(input.oci, "mounts", []) {
		m.destination in allowed_destinations
	}
	every p in object.get(input.oci, ["linux", "maskedPaths"], []) {
		p in kubelet_masked_paths
	}
	every p in object.get(input.oci, ["linux", "readonlyPaths"], []) {
		p in kubelet_readonly_paths
	}
	not seccomp_fakes_success(object.get(input.oci, ["linux", "seccomp"], {}))
	# A startContainer hook would run a program of the host's choosing in the container.
	count(object.get(input.oci, ["hooks", "startContainer"], [])) == 0
}

# The image's config as the guest read it; a field it leaves null is absent.
image_list(key) := v if {
	v := object.get(input.image_config, key, [])
	is_array(v)
}

image_list(key) := [] if not is_array(object.get(input.image_config, key, []))

image_string(key) := v if {
	v := object.get(input.image_config, key, "")
	is_string(v)
}

image_string(key) := "" if not is_string(object.get(input.image_config, key, ""))

pinned_args(c) := array.concat(c.command, c.args) if count(c.command) > 0

pinned_args(c) := array.concat(image_list("Entrypoint"), c.args) if {
	count(c.command) == 0
	count(c.args) > 0
}

pinned_args(c) := array.concat(image_list("Entrypoint"), image_list("Cmd")) if {
	count(c.command) == 0
	count(c.args) == 0
}

pinned_cwd(c) := c.working_dir if c.working_dir != ""

pinned_cwd(c) := image_string("WorkingDir") if {
	c.working_dir == ""
	image_string("WorkingDir") != ""
}

pinned_cwd(c) := "/" if {
	c.working_dir == ""
	image_string("WorkingDir") == ""
}

pinned_env_allows(c, e) if e in c.env

pinned_env_allows(c, e) if e in image_list("Env")

pinned_env_allows(c, e) if split(e, "=")[0] in c.env_from_elsewhere

# The pod's hostname: the host's to choose in any case (it runs the UTS namespace).
pinned_env_allows(_, e) if regex.match(`^HOSTNAME=[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`, e)

# containerd's own PATH, which stays when the image gives none.
pinned_env_allows(_, e) if {
	e == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	not image_sets("PATH")
}

# Service links, as kubelet writes them (addresses, ports, protocols only), for names
# neither the manifest nor the image sets; with enableServiceLinks false, only the API
# server's own.
pinned_env_allows(c, e) if {
	name := split(e, "=")[0]
	not manifest_sets(c, name)
	not image_sets(name)
	service_link(e)
	link_allowed(c, name)
}

link_allowed(c, _) if c.service_links == true

link_allowed(_, name) if startswith(name, "KUBERNETES_")

service_link(e) if regex.match(`^[A-Z0-9_]+_SERVICE_HOST=[0-9a-f.:]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_SERVICE_PORT(_[A-Z0-9_]+)?=[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT=(tcp|udp|sctp)://[0-9a-f.:\[\]]+:[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)=(tcp|udp|sctp)://[0-9a-f.:\[\]]+:[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_PROTO=(tcp|udp|sctp)$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_PORT=[0-9]+$`, e)

service_link(e) if regex.match(`^[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)_ADDR=[0-9a-f.:]+$`, e)

manifest_sets(c, name) if name in c.env_from_elsewhere

manifest_sets(c, name) if {
	some e in c.env
	split(e, "=")[0] == name
}

image_sets(name) if {
	some e in image_list("Env")
	split(e, "=")[0] == name
}

image_env_kept(_, e, env) if e in env

image_env_kept(c, e, _) if manifest_sets(c, split(e, "=")[0])

# The user, group and supplementary groups containerd gives the process, from the
# manifest's ids, the image's User ("user", "user:group", names or numbers) and the
# image's accounts as the guest read them (`input.image_accounts`, in file order: the
# first entry of a name or id counts, as in containerd).
image_users := input.image_accounts.users

image_groups := input.image_accounts.groups

image_user := split(image_string("User"), ":")[0]

image_user_group := g if {
	parts := split(image_string("User"), ":")
	count(parts) == 2
	g := parts[1]
}

# A number as Go's strconv.Atoi reads it (a sign, leading zeros).
numeric(s) if regex.match(`^[+]?[0-9]+$`, s)

atoi(s) := 0 if trim_left(s, "+0") == ""

atoi(s) := to_number(trim_left(s, "+0")) if trim_left(s, "+0") != ""

# containerd's user part: empty is uid 0, a number itself, else the account's.
uid_named(s) := 0 if s == ""

uid_named(s) := atoi(s) if numeric(s)

uid_named(s) := [u.uid | some u in image_users; u.name == s][0] if {
	s != ""
	not numeric(s)
}

gid_named(s) := 0 if s == ""

gid_named(s) := atoi(s) if numeric(s)

gid_named(s) := [g.gid | some g in image_groups; g.name == s][0] if {
	s != ""
	not numeric(s)
}

# The account's group, or root's when the image has no account of that uid.
primary_gid(uid) := [u.gid | some u in image_users; u.uid == uid][0]

primary_gid(uid) := 0 if count([u | some u in image_users; u.uid == uid]) == 0

expected_uid(c) := c.uid if c.uid != null

expected_uid(c) := uid_named(image_user) if c.uid == null

expected_gid(c) := c.gid if c.gid != null

# The manifest's uid: its account's group.
expected_gid(c) := primary_gid(c.uid) if {
	c.gid == null
	c.uid != null
}

# No user in the image: containerd's default, root.
expected_gid(c) := 0 if {
	c.gid == null
	c.uid == null
	image_string("User") == ""
}

# "user:group": the group as given.
expected_gid(c) := gid_named(image_user_group) if {
	c.gid == null
	c.uid == null
	image_string("User") != ""
}

# "user" alone: its account's group (a named one must exist).
expected_gid(c) := primary_gid(uid_named(image_user)) if {
	c.gid == null
	c.uid == null
	image_string("User") != ""
	not image_user_group
}

# The user containerd looks supplementary groups up for: the manifest's uid, else the
# image's user (root, before containerd 1.6.22 and 1.7.3: `legacy_group_lookup`).
lookup_uid(c) := c.uid if c.uid != null

lookup_uid(c) := 0 if {
	c.uid == null
	legacy_group_lookup
}

lookup_uid(c) := uid_named(image_user) if {
	c.uid == null
	not legacy_group_lookup
	lookup_by_uid(image_user)
}

lookup_by_uid(s) if s == ""

lookup_by_uid(s) if numeric(s)

user_name(c) := [u.name | some u in image_users; u.uid == lookup_uid(c)][0]

user_name(c) := image_user if {
	c.uid == null
	not legacy_group_lookup
	not lookup_by_uid(image_user)
}

# The process's own group, the image's groups that list its user (not the one named
# as the user), and the pod's supplementalGroups and fsGroup.
additional_gids(c) := (({expected_gid(c)} | image_groups_of(c)) | {x | some x in c.supplemental_groups})

image_groups_of(c) := {g.gid |
	name := user_name(c)
	some g in image_groups
	g.name != name
	name in g.members
}

root_refused(c, uid) if {
	c.run_as_non_root
	uid == 0
}

# allowPrivilegeEscalation: false, readOnlyRootFilesystem and the capabilities the
# manifest drops, as kubelet turns them into the spec.
pinned_security(c, oci) if {
	nnp_as_manifest(c, oci.process)
	read_only_as_manifest(c, oci)
	caps_as_manifest(c, oci)
}

nnp_as_manifest(c, _) if c.no_new_privileges == false

nnp_as_manifest(c, process) if {
	c.no_new_privileges == true
	object.get(process, "noNewPrivileges", false) == true
}

read_only_as_manifest(c, _) if c.read_only_root == false

read_only_as_manifest(c, oci) if {
	c.read_only_root == true
	object.get(oci, ["root", "readonly"], false) == true
}

caps_as_manifest(c, oci) if {
	every kind in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
		every cap in object.get(oci.process, ["capabilities", kind], []) {
			cap_allowed(c, cap)
		}
	}
}

cap_allowed(c, cap) if {
	not c.drop_all
	not cap in c.caps_dropped
}

cap_allowed(c, cap) if {
	c.drop_all
	cap in c.caps_added
}

# A syscall made to return 0 without running (a privilege drop that never happens).
seccomp_fakes_success(s) if object.get(s, "defaultErrnoRet", 1) == 0

seccomp_fakes_success(s) if {
	some r in object.get(s, "syscalls", [])
	object.get(r, "errnoRet", 1) == 0
}

allowed_destinations := {
	"/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm",
	"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log",
}

# kubelet's and containerd's defaults: more would hide files of the image.
kubelet_masked_paths := {
	"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
	"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
	"/sys/firmware", "/sys/devices/virtual/powercap",
}

kubelet_readonly_paths := {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
