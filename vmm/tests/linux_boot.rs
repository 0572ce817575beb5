//! Real Linux on cocoon-vmm: the guest image (`make image`) with its agent answering real
//! RPCs over hybrid vsock, and a busybox guest driving virtio-blk, virtio-net (a tap) and
//! virtio-fs (a real virtiofsd) through the kernel's own drivers. These need hardware
//! KVM; on a host without it (PVM here) each test reruns itself inside an L1 guest whose
//! emulated SVM gives it one (`cocoon-nested`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_nested::testing::{hardware_kvm, missing, Place};
use cocoon_shim::agent_client::AgentClient;

const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k pci=off";

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/image")
        .join(name)
}

/// The guest image where this test's body should run now: None when it already ran
/// inside L1 (no hardware KVM here) or after reporting the image missing.
fn guest_image(test: &str) -> Option<(PathBuf, PathBuf)> {
    if hardware_kvm(test) == Place::Done {
        return None;
    }
    let (kernel, initrd) = (image("vmlinuz"), image("initramfs.cpio"));
    if kernel.exists() && initrd.exists() {
        return Some((kernel, initrd));
    }
    missing(
        test,
        &format!(
            "{} or {} missing (run `make image` at the repo root)",
            kernel.display(),
            initrd.display()
        ),
    );
    None
}

/// Kills and reaps the VMM when dropped (after a failed assertion too).
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Vmm {
    /// Waits for the VMM to exit by itself, up to `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn cocoon_vmm(kernel: &Path, initrd: &Path, serial: &Path, extra: &[&str]) -> Vmm {
    Vmm(Command::new(env!("CARGO_BIN_EXE_cocoon-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", GUEST_CMDLINE])
        .arg("--serial-out")
        .arg(serial)
        .args(extra)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap())
}

#[test]
fn linux_boots_and_the_agent_answers_over_vsock() {
    const TEST: &str = "linux_boots_and_the_agent_answers_over_vsock";
    let Some((kernel, initrd)) = guest_image(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let serial = dir.path().join("serial.log");
    let mut vmm = cocoon_vmm(
        &kernel,
        &initrd,
        &serial,
        &[
            "--mem-mib",
            "512",
            "--vcpus",
            "2",
            "--vsock-uds",
            &uds.to_string_lossy(),
            // As shipped: here (root) that is guest RAM on a huge-page tmpfs.
            "--huge-pages",
            "auto",
        ],
    );
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let agent = agent_at(&uds, &mut vmm, &serial, Duration::from_secs(120)).await;
        // A real RPC with real content: the guest's own view of itself.
        let d = agent.guest_details().await.unwrap();
        assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
        assert_eq!(d.online_cpus, 2, "the guest saw {} vCPUs", d.online_cpus);
        assert!(
            d.mem_total_bytes > (256 << 20) && d.mem_total_bytes <= (512 << 20),
            "{}",
            d.mem_total_bytes
        );
        assert!(d.kernel_cmdline.contains("pci=off"), "{}", d.kernel_cmdline);
        // The booted guest's RAM is in 2 MiB pages, though L1 leaves shmem THP at its
        // default `never` (where a memfd gets none): every 4 KiB first touch would
        // otherwise be a nested page fault.
        let huge = cocoon_nested::testing::shmem_huge_kb(vmm.0.id());
        assert!(huge >= 2048, "guest RAM has {huge} kB in huge pages");
        agent.shutdown().await.unwrap();
    });
    // The agent powers off through ACPI S5; the VMM exits 0.
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "VMM did not power off cleanly ({st:?}); serial:\n{}",
        serial_text()
    );
}

/// The L2 guest's init for the device test: loads the image's modules, then drives each
/// device and prints one result line per device.
const DEVICE_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
while read -r name path; do $B insmod "$path" 2>/dev/null; done < /etc/cocoon/modules
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do $B sleep 0.1; n=$((n+1)); done
echo "blk-read=$($B dd if=/dev/vda bs=16 count=1 2>/dev/null)"
echo cocoon-blk-guest | $B dd of=/dev/vda bs=4096 seek=1 conv=notrunc,fsync 2>/dev/null
echo "blk-write=$?"
$B ip link set eth0 up && $B ip addr add 198.18.0.2/24 dev eth0
echo "mac=$($B cat /sys/class/net/eth0/address)"
$B ping -c 1 -W 10 198.18.0.1 >/dev/null 2>&1 && echo "ping=ok" || echo "ping=failed"
$B mkdir -p /mnt
$B mount -t virtiofs share /mnt && echo "fs-read=$($B cat /mnt/from-host)"
echo from-guest > /mnt/from-guest && $B sync && echo "fs-write=ok"
$B umount /mnt
echo cocoon-devices-done
$B poweroff -f
"#;

/// A virtiofsd serving `share` on `socket`, listening when this returns.
fn virtiofsd(share: &Path, socket: &Path) -> Vmm {
    let d = Vmm(Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(share)
        .stderr(Stdio::null())
        .spawn()
        .expect("virtiofsd (cargo install virtiofsd)"));
    let end = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < end, "virtiofsd never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

/// A tap on this (L1) host with the address the guest pings; removed when dropped.
struct Tap(String);

impl Tap {
    fn new(name: String, addr: &str) -> Tap {
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap(name);
        ip(&["addr", "add", addr, "dev", &tap.0]);
        ip(&["link", "set", &tap.0, "up"]);
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn virtio_blk_net_and_fs_under_the_linux_drivers() {
    const TEST: &str = "virtio_blk_net_and_fs_under_the_linux_drivers";
    let Some((kernel, image_initrd)) = guest_image(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The L2 initramfs: busybox, our init, and the guest image's modules with their list.
    let mut cpio = cocoon_rootfs::cpio::Archive::new();
    let image_entries = cocoon_rootfs::cpio::parse(&std::fs::read(&image_initrd).unwrap()).unwrap();
    for e in image_entries.into_iter().filter(|e| e.is_file()) {
        if e.name.starts_with("lib/modules/") || e.name == "etc/cocoon/modules" {
            cpio.add_file(&e.name, 0o644, e.data).unwrap();
        }
    }
    cpio.add_file("bin/busybox", 0o755, std::fs::read("/bin/busybox").unwrap())
        .unwrap();
    cpio.add_file("init", 0o755, DEVICE_INIT.as_bytes().to_vec())
        .unwrap();
    cpio.add_char_device("dev/console", 0o600, 5, 1).unwrap();
    let initrd = dir.path().join("devices.cpio");
    std::fs::write(&initrd, cpio.to_bytes()).unwrap();

    let disk = dir.path().join("disk.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(b"cocoon-blk-host\n");
    std::fs::write(&disk, &bytes).unwrap();

    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("from-host"), "from-host\n").unwrap();
    let fs_sock = dir.path().join("fs.sock");
    let virtiofsd = virtiofsd(&share, &fs_sock);

    let tap = Tap::new(
        format!("ccl2{}", std::process::id() % 100_000),
        "198.18.0.1/24",
    );
    let serial = dir.path().join("serial.log");
    let mut vmm = cocoon_vmm(
        &kernel,
        &initrd,
        &serial,
        &[
            "--mem-mib",
            "256",
            "--disk",
            &disk.to_string_lossy(),
            "--net-tap",
            &tap.0,
            "--fs",
            &format!("{}:share", fs_sock.display()),
            // virtiofsd maps the huge-page tmpfs file as guest RAM.
            "--huge-pages",
            "on",
        ],
    );
    let st = vmm.wait_exit(Duration::from_secs(180));
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("cocoon-devices-done"),
        "the device guest did not finish ({st:?}); serial:\n{out}"
    );
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the serial output:\n{out}"))
            .to_owned()
    };
    assert_eq!(line("blk-read="), "cocoon-blk-host", "{out}");
    assert_eq!(line("blk-write="), "0", "{out}");
    let written = std::fs::read(&disk).unwrap();
    assert_eq!(&written[4096..4113], b"cocoon-blk-guest\n");
    assert_eq!(line("ping="), "ok", "virtio-net: {out}");
    assert_eq!(line("fs-read="), "from-host", "virtio-fs: {out}");
    assert_eq!(line("fs-write="), "ok", "virtio-fs: {out}");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest")).unwrap(),
        "from-guest\n"
    );
    drop(virtiofsd);
}

/// Connects to the agent behind `uds` and checks its health, within `limit`.
async fn agent_at(uds: &Path, vmm: &mut Vmm, serial: &Path, limit: Duration) -> AgentClient {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = vmm.0.try_wait().unwrap() {
            panic!(
                "VM exited ({st}) before the agent answered; its log:\n{}\nserial:\n{}",
                std::fs::read_to_string(serial.with_extension("err")).unwrap_or_default(),
                std::fs::read_to_string(serial).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent never answered; serial:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        match AgentClient::connect(uds, Duration::from_secs(2), Duration::from_secs(10)).await {
            Ok(agent) if agent.check().await.is_ok() => return agent,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A VM template of the real guest, shaped like a pod's (vsock, virtio-fs through
/// virtiofsd, 2 vCPUs): the image boots until its agent prints its ready line (no
/// host connection yet), is paused and saved, and two VMs restored from it at once
/// each answer on their own vsock socket with the template's guest (the same agent
/// process, started at the same boot time, no second boot), mount their own
/// virtiofsd's share through the saved rings (the sandbox set-up), then power off
/// cleanly. Prints cold boot against restore.
#[test]
fn linux_template_restores_to_a_ready_agent() {
    use cocoon_vmm::vmm::api_call;
    const TEST: &str = "linux_template_restores_to_a_ready_agent";
    let Some((kernel, initrd)) = guest_image(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let snap = path("template");
    let api = path("api.sock");
    let serial = path("serial.log");
    let share = |name: &str| {
        let d = path(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("owner"), name).unwrap();
        let sock = path(&format!("{name}.sock"));
        (virtiofsd(&d, &sock), format!("{}:cocoon", sock.display()))
    };
    let (_template_fs, fs_arg) = share("template-share");
    let cold = Instant::now();
    let mut vmm = cocoon_vmm(
        &kernel,
        &initrd,
        &serial,
        &[
            "--mem-mib",
            "256",
            "--vcpus",
            "2",
            "--vsock-uds",
            &path("template.vsock").to_string_lossy(),
            "--fs",
            &fs_arg,
            "--api-sock",
            &api.to_string_lossy(),
            "--snapshot-to",
            &snap.to_string_lossy(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains(cocoon_protocol::READY_LINE)
    {
        assert!(vmm.0.try_wait().unwrap().is_none(), "template VM exited");
        assert!(Instant::now() < deadline, "the agent never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cold_ms = cold.elapsed().as_millis();
    let call = |req: &str| {
        let r = api_call(&api, req).unwrap();
        assert!(r.ok, "{req}: {r:?}");
    };
    call(r#"{"action":"pause"}"#);
    let saving = Instant::now();
    call(r#"{"action":"snapshot"}"#);
    let save_ms = saving.elapsed().as_millis();
    call(r#"{"action":"shutdown"}"#);
    assert!(vmm
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut clones: Vec<_> = (0..2)
        .map(|i| {
            let uds = path(&format!("clone{i}.vsock"));
            let serial = path(&format!("clone{i}.log"));
            let (fs, fs_arg) = share(&format!("clone{i}-share"));
            let err = std::fs::File::create(path(&format!("clone{i}.err"))).unwrap();
            let started = Instant::now();
            let vmm = Vmm(Command::new(env!("CARGO_BIN_EXE_cocoon-vmm"))
                .args(["run", "--restore"])
                .arg(&snap)
                .arg("--serial-out")
                .arg(&serial)
                .arg("--vsock-uds")
                .arg(&uds)
                .args(["--fs", &fs_arg])
                .stderr(err)
                .spawn()
                .unwrap());
            (uds, serial, started, (vmm, fs))
        })
        .collect();
    let mut agent_starts = Vec::new();
    for (i, (uds, serial, started, (vmm, _fs))) in clones.iter_mut().enumerate() {
        rt.block_on(async {
            let agent = agent_at(uds, vmm, serial, Duration::from_secs(60)).await;
            let ready_ms = started.elapsed().as_millis();
            let d = agent.guest_details().await.unwrap();
            assert_eq!(d.online_cpus, 2, "the clone saw {} vCPUs", d.online_cpus);
            agent_starts.push(d.agent_start_boottime_ns);
            // The sandbox set-up mounts the share: FUSE requests through the rings
            // the template's driver set up, served by this clone's virtiofsd.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            agent
                .create_sandbox(cocoon_protocol::agent::CreateSandboxRequest {
                    sandbox_id: format!("clone{i}"),
                    hostname: format!("clone{i}"),
                    shared_fs_tag: "cocoon".into(),
                    host_realtime_ns: now.as_nanos() as i64,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("clone {i}: sandbox set-up: {e}"));
            eprintln!(
                "{}{TEST}: cold boot to the ready line {cold_ms} ms, snapshot {save_ms} ms, \
                 clone {i}: restore to a healthy agent {ready_ms} ms",
                cocoon_nested::testing::NOTE_PREFIX
            );
            agent.shutdown().await.unwrap();
        });
        let st = vmm.wait_exit(Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()),
            "clone {i} did not power off cleanly ({st:?}); serial:\n{}",
            std::fs::read_to_string(serial.as_path()).unwrap_or_default()
        );
        let text = std::fs::read_to_string(serial.as_path()).unwrap_or_default();
        assert!(
            !text.contains("Linux version"),
            "clone {i} booted again:\n{text}"
        );
        let log = std::fs::read_to_string(path(&format!("clone{i}.err"))).unwrap();
        assert!(
            log.contains("of the template's copied"),
            "clone {i}:\n{log}"
        );
    }
    assert!(agent_starts[0] > 0);
    assert_eq!(
        agent_starts[0], agent_starts[1],
        "both clones run the template's agent"
    );
}

/// A pod's memory grows in place (a Kubernetes in-place resize): the real guest boots
/// with a virtio-mem region and none of it plugged; asked over the API for 256 MiB, its
/// driver plugs that much, and the kernel onlines it (the agent sees MemTotal grow).
/// Asked for 0 again, it gives most of it back (unplugging is best effort).
#[test]
fn linux_memory_grows_through_virtio_mem() {
    use cocoon_vmm::vmm::{api_call, MemoryReport};
    const TEST: &str = "linux_memory_grows_through_virtio_mem";
    let Some((kernel, initrd)) = guest_image(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("vsock.sock");
    let serial = dir.path().join("serial.log");
    let mut vmm = cocoon_vmm(
        &kernel,
        &initrd,
        &serial,
        &[
            "--mem-mib",
            "256",
            "--vcpus",
            "2",
            "--vsock-uds",
            &uds.to_string_lossy(),
            "--hotplug-mib",
            "512",
            "--api-sock",
            &api.to_string_lossy(),
        ],
    );
    let serial_text = || std::fs::read_to_string(&serial).unwrap_or_default();
    let memory = |req: &str| {
        let r = api_call(&api, req).unwrap();
        assert!(r.ok, "{req}: {r:?}");
        r.memory.expect("the memory figures")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let agent = agent_at(&uds, &mut vmm, &serial, Duration::from_secs(120)).await;
        let before = agent.guest_details().await.unwrap().mem_total_bytes;
        assert_eq!(
            memory(r#"{"action":"memory"}"#),
            MemoryReport {
                region_mib: 512,
                requested_mib: 0,
                plugged_mib: 0
            }
        );
        let asked = Instant::now();
        let r = memory(r#"{"action":"resize_memory","requested_mib":256}"#);
        assert_eq!((r.region_mib, r.requested_mib), (512, 256));
        let deadline = asked + Duration::from_secs(120);
        loop {
            let m = memory(r#"{"action":"memory"}"#);
            if m.plugged_mib == 256 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the guest plugged {m:?}; serial:\n{}",
                serial_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let plugged_ms = asked.elapsed().as_millis();
        // Onlined, not just plugged: the guest's own MemTotal grew by about as much
        // (less what the kernel keeps for the new memory's page structures).
        let grown = loop {
            let now = agent.guest_details().await.unwrap().mem_total_bytes;
            if now >= before + (224 << 20) {
                break now - before;
            }
            assert!(
                Instant::now() < deadline,
                "MemTotal went from {before} to {now} bytes; serial:\n{}",
                serial_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(grown <= 256 << 20, "MemTotal grew by {grown} bytes");
        // And shrinks: the driver offlines what it can and unplugs it, the VMM giving
        // the pages back (MADV_REMOVE from the vCPU thread, under its filter). Best
        // effort by design: a block the kernel has put its own allocations in stays
        // (seen in CI: 4 MiB of 256 left after two minutes), so most, not all.
        let asked = Instant::now();
        memory(r#"{"action":"resize_memory","requested_mib":0}"#);
        let deadline = asked + Duration::from_secs(120);
        let left = loop {
            let m = memory(r#"{"action":"memory"}"#);
            if m.plugged_mib <= 64 {
                break m.plugged_mib;
            }
            assert!(
                Instant::now() < deadline,
                "the guest still has {m:?}; serial:\n{}",
                serial_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "{}{TEST}: 256 MiB plugged {plugged_ms} ms after the request, MemTotal +{} MiB; \
             {left} MiB still plugged {} ms after asking for 0",
            cocoon_nested::testing::NOTE_PREFIX,
            grown >> 20,
            asked.elapsed().as_millis()
        );
        agent.shutdown().await.unwrap();
    });
    let st = vmm.wait_exit(Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "VMM did not power off cleanly ({st:?}); serial:\n{}",
        serial_text()
    );
}
