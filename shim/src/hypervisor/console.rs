//! The guest's serial console and the messages of a VM's host processes, bounded: each
//! is a pipe the process writes (QEMU's console is its stdout, cocoon-vmm's a pipe it is
//! handed with `--serial-out-fd`; every VMM's and backend's stderr), which the shim
//! copies into a file of the run directory, rotated at a limit: the current file and one
//! older (`console.log.1`), never more than twice the limit in all. A guest that writes
//! faster than this copies is slowed down by the pipe, not buffered in the host, and a
//! process the guest took over cannot write more than that either: it holds no file.
//!
//! The copy runs on a thread of its own, blocking on the pipe. As a task on the shim's
//! async runtime it could wait behind other work, and a guest's console write waits on
//! a full pipe: that is the likeliest cause of the boot hangs seen when the pipe was
//! first tried (docs/notes.md).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The most one console file holds before it is rotated.
pub const CONSOLE_LIMIT: u64 = 2 * 1024 * 1024;

/// A file that rotates to `<path>.1` when it would grow past its limit.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
    /// Appended to (a log URI's file, which may hold earlier runs), not truncated.
    append: bool,
    /// False for what is not a regular file (`file:///dev/null`, a FIFO): it is written
    /// and never renamed, which would take it from everyone else who uses it.
    rotates: bool,
}

impl RotatingFile {
    /// A fresh file (a VM's console), emptied if it exists.
    pub fn create(path: &Path, limit: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size: 0,
            limit,
            append: false,
            rotates: true,
        })
    }

    /// A file appended to where it ends (mode 0640 if new; a link in its last component
    /// is refused; a FIFO without a reader is an error, not a wait), its size counted
    /// from there: a file already past `limit` is rotated at the first write.
    pub fn append(path: &Path, limit: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        // Opened without waiting; written as any file is, blocking.
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
        let mut flags = nix::fcntl::OFlag::from_bits_retain(flags);
        flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let meta = file.metadata()?;
        Ok(Self {
            path: path.to_path_buf(),
            size: meta.len(),
            file,
            limit,
            append: true,
            rotates: meta.file_type().is_file(),
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        if !self.rotates {
            return self.file.write_all(data);
        }
        while !data.is_empty() {
            if self.size >= self.limit {
                self.rotate()?;
                if !self.rotates {
                    return self.file.write_all(data);
                }
            }
            // Reopened, the file may already hold more than the limit (someone else
            // wrote there): then it is rotated again.
            let room = self.limit.saturating_sub(self.size).min(data.len() as u64) as usize;
            self.file.write_all(&data[..room])?;
            self.size += room as u64;
            data = &data[room..];
        }
        Ok(())
    }

    /// Renames the file to `<path>.1` if the path still names the file held (a log
    /// rotator may have moved it, or put another there), then opens the path afresh.
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let held = self.file.metadata()?;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {
                std::fs::rename(&self.path, &old)?
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        *self = if self.append {
            Self::append(&self.path, self.limit)?
        } else {
            Self::create(&self.path, self.limit)?
        };
        Ok(())
    }
}

/// The most one file of a VMM's or backend's own messages (`qemu.log`, `vmm.log`,
/// `vsock-backend.log`, `virtiofsd.log`: their stderr, copied the same way) holds before
/// it is rotated.
pub const VMM_LOG_LIMIT: u64 = 1024 * 1024;

/// The end of one copy [`spawn_copier`] runs. A process's last words are in the file
/// only once the copy has read them: a report of its exit waits for that (bounded), and
/// so does the removal of the run directory (a copy still rotating would put a file
/// back in it).
#[derive(Clone, Debug, Default)]
pub struct Copied(std::sync::Arc<CopyEnd>);

#[derive(Debug, Default)]
pub struct CopyEnd {
    done: std::sync::atomic::AtomicBool,
    ended: tokio::sync::Notify,
}

impl Copied {
    fn finish(&self) {
        self.0
            .done
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.ended.notify_waiters();
    }

    /// Whether the copy has ended: every writer closed the pipe, or the copy gave up.
    pub fn is_done(&self) -> bool {
        self.0.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits, without holding up the runtime's threads, for the copy to end or `until`
    /// to pass; whether it ended. Woken by the end itself: a VM's stop settles each of
    /// its copies in turn, and polling every 5 ms cost it 12-18 ms under TCG here.
    pub async fn settled(&self, until: std::time::Instant) -> bool {
        let ended = self.0.ended.notified();
        tokio::pin!(ended);
        // Registered before the flag is read, so an end between the two still wakes it.
        ended.as_mut().enable();
        if !self.is_done() {
            let until = tokio::time::Instant::from_std(until);
            let _ = tokio::time::timeout_at(until, ended).await;
        }
        self.is_done()
    }
}

/// How long a report of a process's exit waits for the copy of its output to catch up.
pub const COPY_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Marks its copy finished however the copy ends.
struct FinishOnDrop(Copied);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// A line to watch the console for: `seen` is notified (once) when `marker` goes by.
pub struct ConsoleWatch {
    pub marker: &'static [u8],
    pub seen: std::sync::Arc<tokio::sync::Notify>,
}

/// Finds a marker in a stream read in chunks, also where it straddles two of them.
struct Scanner {
    marker: &'static [u8],
    /// The last `marker.len() - 1` bytes seen (at most).
    tail: Vec<u8>,
}

impl Scanner {
    fn new(marker: &'static [u8]) -> Self {
        Scanner {
            marker,
            tail: Vec::with_capacity(marker.len()),
        }
    }

    /// Whether the marker ends in this chunk (it may begin in the ones before).
    fn feed(&mut self, chunk: &[u8]) -> bool {
        let m = self.marker.len();
        let mut seen = std::mem::take(&mut self.tail);
        seen.extend_from_slice(chunk);
        if m == 0 || seen.windows(m).any(|w| w == self.marker) {
            return true;
        }
        self.tail = seen.split_off(seen.len().saturating_sub(m - 1));
        false
    }
}

/// Copies a pipe of the VMM (its console, its stderr) into `path`, rotated at `limit`,
/// until the VMM closes it, on a thread; with `watch`, notifies when its marker passes.
pub fn spawn_copier(
    pipe: std::io::Result<std::os::fd::OwnedFd>,
    path: PathBuf,
    limit: u64,
    watch: Option<ConsoleWatch>,
) -> Copied {
    let copied = Copied::default();
    let fd = match pipe {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("no copy to {}: {e}", path.display());
            copied.finish();
            return copied;
        }
    };
    let done = FinishOnDrop(copied.clone());
    let spawned = std::thread::Builder::new()
        .name("console-copy".into())
        .spawn(move || {
            let _done = done;
            copy_blocking(fd, &path, limit, watch)
        });
    if let Err(e) = spawned {
        // The closure, and with it the marker, was dropped: the copy counts as ended.
        tracing::warn!("no console copy thread: {e}");
    }
    copied
}

/// A pipe whose write end `cmd` gets as stdout and stderr, copied into `log` (rotated at
/// `VMM_LOG_LIMIT`) until every writer has closed it.
pub fn log_to_pipe(cmd: &mut tokio::process::Command, log: &Path) -> std::io::Result<Copied> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    cmd.stdout(write.try_clone()?).stderr(write);
    Ok(spawn_copier(
        Ok(read),
        log.to_path_buf(),
        VMM_LOG_LIMIT,
        None,
    ))
}

fn copy_blocking(
    fd: std::os::fd::OwnedFd,
    path: &Path,
    limit: u64,
    mut watch: Option<ConsoleWatch>,
) {
    use std::io::Read;
    let mut pipe = File::from(fd);
    // tokio left the pipe non-blocking; this thread blocks on it.
    if let Err(e) = set_blocking(&pipe) {
        tracing::warn!("console pipe: {e}");
        return;
    }
    // Without a file the pipe is still drained, into nothing.
    let mut out = RotatingFile::create(path, limit)
        .inspect_err(|e| tracing::warn!("cannot write {}: {e}", path.display()))
        .ok();
    let mut scanner = watch.as_ref().map(|w| Scanner::new(w.marker));
    let mut buf = vec![0u8; 64 * 1024];
    let mut failures = 0u64;
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if scanner.as_mut().is_some_and(|sc| sc.feed(&buf[..n])) {
                    // Once: a guest printing it again changes nothing.
                    scanner = None;
                    if let Some(w) = watch.take() {
                        w.seen.notify_one();
                    }
                }
                // A write that fails (the disk is full) drops this chunk and keeps
                // draining: the writer never blocks on, or dies of, a pipe nobody reads.
                let Some(out) = out.as_mut() else { continue };
                if let Err(e) = out.write(&buf[..n]) {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!("{}: {e} ({failures} chunks dropped)", path.display());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn set_blocking(f: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL)?);
    fcntl(f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_found_whole_or_split_across_reads() {
        let marker: &'static [u8] = b"agent: ready";
        let text = b"[ 0.5] boot\nagent: ready 1024\n";
        for split in 0..=text.len() {
            let mut sc = Scanner::new(marker);
            let (a, b) = text.split_at(split);
            assert!(sc.feed(a) || sc.feed(b), "split at {split}");
        }
        // In single bytes, and not before its last byte.
        let mut sc = Scanner::new(marker);
        let end = text
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap()
            + marker.len();
        for (i, b) in text.iter().enumerate() {
            assert_eq!(sc.feed(&[*b]), i + 1 == end, "byte {i}");
            if i + 1 == end {
                break;
            }
        }
        // Near misses are not hits; the marker completed by a later piece is.
        let mut sc = Scanner::new(marker);
        let hits: Vec<bool> = [&b"agent: rea"[..], b"", b"Dy-not", b"agent: read", b"y? no"]
            .iter()
            .map(|p| sc.feed(p))
            .collect();
        assert_eq!(hits, [false, false, false, false, true]);
    }

    #[test]
    fn a_file_moved_away_is_started_again_at_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut f = RotatingFile::append(&path, 10).unwrap();
        f.write(b"01234567").unwrap();
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        f.write(b"89abcdef").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("moved")).unwrap(),
            b"0123456789"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
    }

    /// `file:///dev/null` is written, never renamed however much goes by.
    #[test]
    fn what_is_not_a_regular_file_is_never_rotated() {
        let mut f = RotatingFile::append(Path::new("/dev/null"), 16).unwrap();
        for _ in 0..4 {
            f.write(b"0123456789abcdefghij").unwrap();
        }
        assert!(!Path::new("/dev/null.1").exists());
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No reader: an error at once, not a wait.
        assert!(RotatingFile::append(&fifo, 16).is_err());
    }

    /// A rotator that put a file of its own in place: neither it nor the one held is
    /// renamed onto `.1` at the limit; the shim goes on in the new one.
    #[test]
    fn a_file_put_in_place_is_taken_up_not_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut f = RotatingFile::append(&path, 10).unwrap();
        f.write(b"0123456789").unwrap();
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::fs::write(&path, "x\n").unwrap();
        f.write(b"ab").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("moved")).unwrap(),
            b"0123456789"
        );
        assert!(!dir.path().join("c.log.1").exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"x\nab");
    }

    #[test]
    fn a_flood_is_bounded_and_the_newest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = RotatingFile::create(&path, 1000).unwrap();
        for i in 0..1000 {
            f.write(format!("line {i:05}\n").as_bytes()).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(current.len() <= 1000 && older.len() == 1000);
        assert!(current.ends_with("line 00999\n"), "{current}");
        // Nothing else was written: two files, whatever the flood.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // The older file ends where the current one begins.
        let joined = older + &current;
        assert!(joined.contains("line 00998\nline 00999\n"));
    }

    /// A process's messages go through a pipe into a bounded file; once it exited, the
    /// handle says when its last words are in, and a flood leaves two files at most.
    #[tokio::test]
    async fn a_process_log_is_a_bounded_copy_that_catches_up_with_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            "head -c 3000000 /dev/zero | tr '\\0' y >&2; echo; echo last words >&2",
        ]);
        let copied = log_to_pipe(&mut cmd, &log).unwrap();
        let status = cmd.spawn().unwrap().wait().await.unwrap();
        drop(cmd);
        assert!(status.success());
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        assert!(copied.settled(until).await, "the copy never ended");
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let older = dir.path().join("vmm.log.1");
        assert!(size(&log) <= VMM_LOG_LIMIT && size(&older) == VMM_LOG_LIMIT);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let current = std::fs::read_to_string(&log).unwrap();
        assert!(
            current.ends_with("\nlast words\n"),
            "{:?}",
            &current[current.len() - 40..]
        );
        // A copy with no pipe at all counts as ended at once.
        let none = spawn_copier(
            Err(std::io::Error::other("no pipe")),
            dir.path().join("x"),
            1,
            None,
        );
        assert!(none.is_done());
    }
}
