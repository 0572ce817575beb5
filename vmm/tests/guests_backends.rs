//! End-to-end tests of `cocoon-vmm`'s I/O devices against real host backends, on this
//! host's /dev/kvm with synthetic PVH guests (see `guest/mod.rs`): vsock to a host unix
//! socket and through a vhost-user backend process, network frames across a real tap,
//! and a FUSE_INIT through virtiofsd.

mod guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use guest::{assemble, can_run, ns, wait_for};
/// A guest that opens a stream to host port 5000, sends "ping\n", and prints the first
/// data packet it gets back.
const VSOCK_GUEST: &str = r#"
    VIRTIO_INIT 0xd0000000, 19
    QUEUE 0xd0000000, 0, 0x210000, 0x211000, 0x212000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    /* Four 4 KiB rx buffers. */
    DESC 0x210000, 0, 0x213000, 4096, 2, 0
    DESC 0x210000, 1, 0x214000, 4096, 2, 0
    DESC 0x210000, 2, 0x215000, 4096, 2, 0
    DESC 0x210000, 3, 0x216000, 4096, 2, 0
    movw $0, 0x211004
    movw $1, 0x211006
    movw $2, 0x211008
    movw $3, 0x21100a
    movw $4, 0x211002
    MMIO_W 0xd0000000, 0x050, 0
    /* REQUEST: cid 3 port 1234 -> cid 2 port 5000. */
    mov $0x223000, %edi
    call vsock_hdr
    movw $1, 0x22301e
    DESC 0x220000, 0, 0x223000, 44, 0, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x212002, 1, response
    cmpw $2, 0x21301e
    je 1f
    PRINT "FAIL no RESPONSE\n"
    jmp reset
    /* RW "ping\n", header and payload in one descriptor. */
1:  mov $0x224000, %edi
    call vsock_hdr
    movw $5, 0x22401e
    movl $5, 0x224018
    movl $0x676e6970, 0x22402c
    movb $0x0a, 0x224030
    DESC 0x220000, 1, 0x224000, 49, 0, 0
    AVAIL 0x221000, 1, 1, 2
    MMIO_W 0xd0000000, 0x050, 1
    /* Wait for rx packets until one is RW; print its payload. */
    mov $2, %ebx
2:  cmp $5, %ebx
    jae 4f
    mov $50000000, %ecx
3:  movzwl 0x212002, %eax
    cmp %ebx, %eax
    jae 5f
    loop 3b
4:  PRINT "TIMEOUT data\n"
    jmp reset
5:  movl 0x212000 + 4 - 8(,%ebx,8), %eax /* used.ring[ebx-1].id */
    shl $12, %eax
    add $0x213000, %eax
    inc %ebx
    cmpw $5, 0x1e(%eax)
    jne 2b
    mov 0x18(%eax), %ecx
    lea 44(%eax), %esi
    call putn
    jmp reset

/* A stream header at EDI with op 0, len 0. */
vsock_hdr:
    push %edi
    push %ecx
    xor %eax, %eax
    mov $11, %ecx
    rep stosl
    pop %ecx
    pop %edi
    movl $3, 0(%edi)
    movl $2, 8(%edi)
    movl $1234, 16(%edi)
    movl $5000, 20(%edi)
    movw $1, 28(%edi)
    movl $65536, 36(%edi)
    ret
"#;

/// The host side of `VSOCK_GUEST`: listens on `<dir>/vsock.sock_5000` (where the guest's
/// connection to host port 5000 lands), reads the guest's 5 bytes and answers "pong\n".
fn pong_on_host_port_5000(g: &guest::Guest) -> std::thread::JoinHandle<[u8; 5]> {
    let listener = UnixListener::bind(g.path("vsock.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("the guest never connected: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong\n").unwrap();
        // Keep the stream open until the guest has had time to read.
        std::thread::sleep(Duration::from_millis(500));
        buf
    })
}

#[test]
fn vsock_round_trip_to_a_host_unix_socket() {
    if !can_run("vsock_round_trip_to_a_host_unix_socket") {
        return;
    }
    let g = assemble(VSOCK_GUEST);
    let uds = g.path("vsock.sock");
    let host = pong_on_host_port_5000(&g);
    let out = g.run(&["--vsock-uds", uds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "pong\n", "{}", out.stderr);
    assert_eq!(&host.join().unwrap(), b"ping\n");
}

/// A guest that sends one Ethernet frame (ethertype 0x88b5) and prints the payload of
/// the first 0x88b5 frame it receives.
const NET_GUEST: &str = r#"
    VIRTIO_INIT 0xd0000000, 1
    QUEUE 0xd0000000, 0, 0x210000, 0x211000, 0x212000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    DESC 0x210000, 0, 0x213000, 2048, 2, 0
    DESC 0x210000, 1, 0x214000, 2048, 2, 0
    DESC 0x210000, 2, 0x215000, 2048, 2, 0
    DESC 0x210000, 3, 0x216000, 2048, 2, 0
    movw $0, 0x211004
    movw $1, 0x211006
    movw $2, 0x211008
    movw $3, 0x21100a
    movw $4, 0x211002
    MMIO_W 0xd0000000, 0x050, 0
    /* virtio_net_hdr (12 zero bytes), broadcast dst, our src, 0x88b5, payload. */
    mov $0x223000, %edi
    xor %eax, %eax
    mov $16, %ecx
    rep stosl
    movl $0xffffffff, 0x22300c
    movw $0xffff, 0x223010
    movl $0x00434302, 0x223012
    movw $0x0000, 0x223016
    movw $0xb588, 0x223018
    movl $0x73657567, 0x22301a /* "gues" */
    movl $0x72662d74, 0x22301e /* "t-fr" */
    movl $0x00656d61, 0x223022 /* "ame" */
    DESC 0x220000, 0, 0x223000, 64, 0, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x222002, 1, tx
    mov $1, %ebx
2:  cmp $5, %ebx
    jae 4f
    mov $80000000, %ecx
3:  movzwl 0x212002, %eax
    cmp %ebx, %eax
    jae 5f
    loop 3b
4:  PRINT "TIMEOUT rx\n"
    jmp reset
5:  mov 0x212000 + 4 - 8(,%ebx,8), %eax /* used.ring[ebx-1].id */
    mov 0x212000 + 8 - 8(,%ebx,8), %ecx /* used.ring[ebx-1].len */
    shl $12, %eax
    add $0x213000, %eax
    inc %ebx
    cmpw $0xb588, 24(%eax)
    jne 2b
    lea 26(%eax), %esi
    mov $10, %ecx /* the host pads its frame to 60 bytes: print just the payload */
    call putn
    PRINT "\n"
    jmp reset
"#;

/// A raw AF_PACKET socket on one interface, for the host side of the tap test.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(ifname: &str) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2) call; the result is checked and then owned.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before filling it in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex;
        // SAFETY: binding our socket to a correctly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn recv(&self, buf: &mut [u8]) -> isize {
        // SAFETY: receiving into a live buffer of the given length.
        unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        }
    }

    fn send(&self, frame: &[u8]) -> isize {
        // SAFETY: sending from a live buffer of the given length.
        unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        }
    }
}

#[test]
fn net_frames_cross_a_real_tap_both_ways() {
    if !can_run("net_frames_cross_a_real_tap_both_ways") {
        return;
    }
    let tap = format!("ccvm{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !std::path::Path::new("/dev/net/tun").exists()
        || !ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])
    {
        guest::skip("net_frames_cross_a_real_tap_both_ways: cannot create a tap (needs root and /dev/net/tun)");
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(tap.clone());
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    assert!(ip(&["link", "set", &tap, "up"]));
    let sock = PacketSocket::open(&tap).unwrap();

    let g = assemble(NET_GUEST);
    let child = g.spawn(&["--net-tap", &tap]);
    // Wait for the guest's frame, then answer with ours.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 2048];
    let got = loop {
        assert!(
            Instant::now() < deadline,
            "no frame from the guest; serial {:?}",
            g.serial()
        );
        let n = sock.recv(&mut buf);
        if n >= 14 && buf[12..14] == [0x88, 0xb5] {
            break buf[14..n as usize].to_vec();
        }
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert!(got.starts_with(b"guest-frame"), "{got:?}");
    assert_eq!(&buf[6..12], &[2, 0x43, 0x43, 0, 0, 0]);
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x88, 0xb5]);
    frame.extend_from_slice(b"host-frame");
    frame.resize(60, 0);
    assert_eq!(sock.send(&frame), 60);
    let out = g.finish(child, Duration::from_secs(15));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "host-frame\n");
}

#[test]
fn vsock_through_a_vhost_user_backend_process() {
    if !can_run("vsock_through_a_vhost_user_backend_process") {
        return;
    }
    // The same guest as the in-process vsock test, but the queues are served by a
    // separate `cocoon-vmm vhost-user-vsock` process over the shared memfd: this drives
    // the vhost-user frontend (memory table, vring handover, kick and call eventfds).
    let g = assemble(VSOCK_GUEST);
    let vhost = g.path("vhost.sock");
    let uds = g.path("vsock.sock");
    let mut backend = std::process::Command::new(guest::BIN)
        .args(["vhost-user-vsock", "--guest-cid", "3", "--socket"])
        .arg(&vhost)
        .arg("--uds-path")
        .arg(&uds)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    g.track(&backend);
    wait_for("vhost-user socket", || vhost.exists());
    // It parses guest data, so it runs jailed like the VMM (as root, where it can).
    if guest::euid_is_root() {
        let pid = backend.id().to_string();
        assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"), "backend not jailed");
        assert_ne!(ns(&pid, "net"), ns("self", "net"), "backend not jailed");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    }
    let host = pong_on_host_port_5000(&g);
    let out = g.run(&["--vsock-vhost-user", vhost.to_str().unwrap()]);
    let _ = backend.kill();
    let _ = g.finish(backend, Duration::from_secs(5));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "pong\n", "{}", out.stderr);
    assert_eq!(&host.join().unwrap(), b"ping\n");
}

#[test]
fn virtio_fs_fuse_init_through_virtiofsd() {
    if !can_run("virtio_fs_fuse_init_through_virtiofsd") {
        return;
    }
    if std::process::Command::new("virtiofsd")
        .arg("--version")
        .output()
        .is_err()
    {
        guest::skip("virtio_fs_fuse_init_through_virtiofsd: virtiofsd is not installed (`cargo install virtiofsd`)");
        return;
    }
    // FUSE_INIT (opcode 26) on the request queue: in_header + fuse_init_in readable,
    // out_header + fuse_init_out writable. virtiofsd answers with major version 7.
    let g = assemble(
        r#"
    VIRTIO_INIT 0xd0000000, 26
    QUEUE 0xd0000000, 0, 0x200000, 0x201000, 0x202000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    mov $0x223000, %edi
    xor %eax, %eax
    mov $64, %ecx
    rep stosl
    movl $104, 0x223000
    movl $26, 0x223004
    movl $1, 0x223008
    movl $7, 0x223028
    movl $31, 0x22302c
    movl $0x20000, 0x223030
    movl $0xffffffff, 0x224004
    DESC 0x220000, 0, 0x223000, 104, 1, 1
    DESC 0x220000, 1, 0x224000, 256, 2, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x222002, 1, fuse_init
    EXPECT32 0x224004, 0, fuse_error
    EXPECT32 0x224010, 7, fuse_major
    PRINT "fuse init ok\n"
    jmp reset
"#,
    );
    let shared = g.path("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = g.path("fs.sock");
    let fsd = std::process::Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&shared)
        .args(["--sandbox", "none", "--log-level", "error"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    g.track(&fsd);
    wait_for("virtiofsd socket", || sock.exists());
    let arg = format!("{}:shared", sock.display());
    let out = g.run(&["--fs", &arg]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "fuse init ok\n", "{}", out.stderr);
    // virtiofsd serves one frontend and exits when it goes away.
    let _ = g.finish(fsd, Duration::from_secs(10));
}
