//! Who holds a fifo open: for the error of an output fifo that nobody opened for
//! reading in time, so that such a failure says whether containerd still had the
//! fifo, had only taken its `O_PATH` handle (its fifo package takes one, then opens
//! the fifo through `/proc/self/fd` on a goroutine of its own), or had let it go.
//!
//! Only the error path calls this, so a walk over every process's descriptors is
//! affordable. It reads only procfs: never the fifo (an open would make this process
//! the reader it is looking for), and never a stat through a descriptor's link, which
//! would ask that file's filesystem (a hung NFS or FUSE mount held by any process on
//! the node would hang the call). A descriptor is the fifo's when its link reads as
//! the fifo's path and its fdinfo names the fifo's inode.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `O_PATH` in `/proc/<pid>/fdinfo/<fd>`'s octal `flags`.
const O_PATH: u32 = 0o10_000_000;

/// One line naming the fifo's state and every descriptor on it: `comm[pid] fd N
/// (mode)`, mode being `O_PATH`, `read`, `write` or `read-write`.
pub fn describe(path: &Path) -> String {
    let ino = match std::fs::symlink_metadata(path) {
        Ok(m) => m.ino(),
        Err(e) => return format!("the fifo is not there ({e})"),
    };
    let names = [Some(path.to_path_buf()), std::fs::canonicalize(path).ok()];
    let mut held = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return "/proc cannot be read".into();
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !names.iter().flatten().any(|n| *n == link) {
                continue;
            }
            let fd = fd.file_name().to_string_lossy().into_owned();
            let Ok(info) = std::fs::read_to_string(p.path().join("fdinfo").join(&fd)) else {
                continue;
            };
            // Kernels before 5.14 write no `ino:`: the link's path alone decides there.
            if fdinfo_field(&info, "ino:").is_some_and(|v| v.parse::<u64>().ok() != Some(ino)) {
                continue;
            }
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let flags = fdinfo_field(&info, "flags:").and_then(|v| u32::from_str_radix(v, 8).ok());
            held.push(format!(
                "{}[{pid}] fd {fd} ({})",
                comm.trim(),
                flags.map_or("mode unknown", mode)
            ));
        }
    }
    if held.is_empty() {
        "the fifo is there and no process holds it".into()
    } else {
        format!("the fifo is held by {}", held.join(", "))
    }
}

/// A field of an fdinfo file (`flags:` is octal, `ino:` decimal), trimmed.
fn fdinfo_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
}

fn mode(flags: u32) -> &'static str {
    if flags & O_PATH != 0 {
        return "O_PATH";
    }
    match flags & libc::O_ACCMODE as u32 {
        0 => "read",
        1 => "write",
        _ => "read-write",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn names_each_holder_and_how_it_holds_the_fifo() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("stderr");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(describe(&path), "the fifo is there and no process holds it");

        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .unwrap();
        let me = std::process::id();
        let only_handle = describe(&path);
        assert!(
            only_handle.contains(&format!("[{me}] fd ")),
            "{only_handle}"
        );
        assert!(only_handle.ends_with("(O_PATH)"), "{only_handle}");

        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let both = describe(&path);
        assert_eq!(both.matches(&format!("[{me}]")).count(), 2, "{both}");
        assert!(both.contains("(read)"), "{both}");
        drop((handle, reader));

        std::fs::remove_file(&path).unwrap();
        let gone = describe(&path);
        assert!(gone.starts_with("the fifo is not there ("), "{gone}");
    }

    #[test]
    fn reads_the_fields_of_fdinfo() {
        let info = "pos:\t0\nflags:\t012100000\nmnt_id:\t30\nino:\t7\n";
        assert_eq!(fdinfo_field(info, "flags:"), Some("012100000"));
        assert_eq!(fdinfo_field(info, "ino:"), Some("7"));
        assert_eq!(mode(0o12100000), "O_PATH");
        assert_eq!(mode(0o2000001), "write");
        assert_eq!(mode(0o100000), "read");
        assert_eq!(mode(0o100002), "read-write");
        assert_eq!(fdinfo_field("pos:\t0\n", "flags:"), None);
    }
}
