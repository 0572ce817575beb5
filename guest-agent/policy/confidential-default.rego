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

# No exec into a container, no attach (its stdin), no reading its output from the host,
# no debug console.
default ExecProcessRequest := false
default WriteStreamRequest := false
default ReadStreamRequest := false
default DebugConsoleRequest := false

# Containers, but only from a root filesystem the guest made: an image it pulled by
# digest, or the agent's own pause for a sandbox container (which the agent gives every
# sandbox container of a confidential pod before this policy sees the request); and no
# host-path volumes: a mount whose source is a host directory or file the shim shared into
# the guest (/run/cocoon/shared/<container>/mounts/<n>), but for those kubelet gives
# every container.
default CreateContainerRequest := false

CreateContainerRequest if {
	input.guest_image != ""
	not host_path_mount
}

host_path_mount if {
	some m in input.oci.mounts
	startswith(m.source, "/run/cocoon/shared/")
	contains(m.source, "/mounts/")
	not m.destination in kubelet_files
}

# The files CRI gives every container, shared the same way: the host already decides
# the pod's name and network, and the termination log is the container's to write.
kubelet_files := {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log"}
