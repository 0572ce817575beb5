//! Guest RAM on its own huge-page tmpfs (`vstate::ram_file`): it gets 2 MiB pages even
//! where the host's shmem THP policy is `never` (the distribution default, and this
//! machine's), its size is bounded, and it leaves no mount behind.

use std::os::unix::fs::FileExt;

use cocoon_vmm::vstate::memory::{create_from, RamSource};
use cocoon_vmm::vstate::ram_file::HugePages;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

mod guest;

/// `field` (in kB) of the smaps entry of the mapping that starts at `start`.
fn smaps_kb(start: usize, field: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let head = format!("{start:x}-");
    let entry = smaps
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| !is_mapping_header(l))
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} for the mapping at {start:#x}"));
    entry
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// `7f00-7f20 rw-s ...`: the first line of a mapping's entry.
fn is_mapping_header(line: &str) -> bool {
    let range = line.split_whitespace().next().unwrap_or("");
    range.split_once('-').is_some_and(|(a, b)| {
        u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
    })
}

#[test]
fn guest_ram_gets_huge_pages_whatever_the_host_shmem_policy() {
    if !guest::euid_is_root() {
        guest::skip("guest_ram_gets_huge_pages: mounting a tmpfs needs root");
        return;
    }
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let size = 32u64 << 20;
    let gm = create_from(size, RamSource::Make(HugePages::On)).unwrap();
    let region = gm.mem.iter().next().unwrap();
    assert_eq!(region.len(), size);
    let host = region.as_ptr();
    // Touch every 4 KiB page, as a booting guest would.
    for off in (0..size as usize).step_by(4096) {
        // SAFETY: inside the region's live mapping.
        unsafe { host.add(off).write_volatile(1) };
    }
    let pmd = smaps_kb(host as usize, "ShmemPmdMapped");
    // All of it, but for 2 MiB pages the host could not find (fragmentation).
    assert!(
        pmd >= (size >> 10) / 2,
        "only {pmd} kB of {} kB mapped with huge pages",
        size >> 10
    );

    // The filesystem holds the guest's RAM and nothing more: a write past it fails.
    let err = gm.memfd.write_at(&[1], size + (2 << 20)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Detached: no mount appeared anywhere.
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(mounts_before, mounts_after);
}

#[test]
fn off_is_a_memfd_without_huge_pages_asked() {
    let gm = create_from(4 << 20, RamSource::Make(HugePages::Off)).unwrap();
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&gm.memfd)
    ))
    .unwrap();
    assert!(
        link.to_string_lossy()
            .starts_with("/memfd:cocoon-guest-ram"),
        "{}",
        link.display()
    );
}

/// `jail-exec --huge-tmpfs` (a jailed QEMU's guest RAM): a tmpfs of the jail's own that
/// the jailed uid writes its one file in, in 2 MiB pages, never past its size, with room
/// for no second file, and nowhere in the host's mount table.
#[test]
fn jail_exec_mounts_a_bounded_huge_tmpfs_for_the_program() {
    if !guest::is_root("jail_exec_mounts_a_bounded_huge_tmpfs_for_the_program") {
        return;
    }
    let host_mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let before = host_mounts();
    // 4 MiB of room: a 4 MiB file fits (two huge pages), one byte more does not; the
    // file's pages are counted while the program still runs.
    let script = "cd /guest-ram && echo uid=$(id -u) && \
        head -c 4194304 /dev/zero > ram && echo wrote=$(wc -c < ram) && \
        (head -c 1 /dev/zero >> ram 2>/dev/null && echo grew || echo full) && \
        (true > second 2>/dev/null && echo second || echo no-second) && \
        (echo x > /usr/x 2>/dev/null && echo root-writable || echo root-ro)";
    let out = guest::jailed_with(
        &[
            "--keep-dev",
            "/dev/zero",
            "--keep-dev",
            "/dev/null",
            "--huge-tmpfs",
            "/guest-ram=4194304",
        ],
        &["/bin/sh", "-c", script],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout,
        format!(
            "uid={}\nwrote=4194304\nfull\nno-second\nroot-ro\n",
            guest::JAIL_UID
        ),
        "{out:?}"
    );
    assert_eq!(host_mounts(), before, "the jail's tmpfs showed on the host");

    // A tmpfs over a kept path would hide it (or, writable, be made on the host): refused
    // before anything is set up.
    let out = guest::jailed_with(&["--huge-tmpfs", "/usr/lib=4194304"], &["/bin/true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/usr/lib") && stderr.contains("overlap"),
        "{out:?}"
    );
}
