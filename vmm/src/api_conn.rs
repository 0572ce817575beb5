//! One connection to the VMM's API: newline-delimited JSON requests, each with the
//! descriptors that came with its bytes (SCM_RIGHTS), as `attach_disk` needs. Bounded:
//! a line of at most [`MAX_LINE`] bytes, at most [`MAX_FDS`] descriptors waiting.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// One API connection: what it sent up to the next newline, and the descriptors that
/// came with those bytes (SCM_RIGHTS). A descriptor belongs to the request whose bytes
/// it came with; those a request does not take are closed.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors, each with the index in `buf` of the last byte that came with it.
    fds: Vec<(usize, OwnedFd)>,
}

/// The longest request line.
pub const MAX_LINE: usize = 1 << 20;
/// The most descriptors one connection may have waiting.
pub const MAX_FDS: usize = 4;
/// The most descriptors one message can carry (the kernel's SCM_MAX_FD): room for them
/// all, so the control data is never cut short (descriptors the kernel installed in a
/// cut message could not be found to close).
const SCM_MAX_FD: usize = 253;

impl Client {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Reads what the peer sent. False: it is gone, or sent a line over [`MAX_LINE`].
    pub fn fill(&mut self) -> bool {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut chunk = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
        let msg = match recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return true,
            Err(_) => return false,
        };
        let n = msg.bytes;
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(got) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    fds.extend(
                        got.into_iter()
                            .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        if n == 0 {
            return false;
        }
        // A read ends with the message that carried descriptors (the kernel stops
        // there), so they belong to the line holding the read's last byte.
        let at = self.buf.len() + n - 1;
        for fd in fds {
            // Beyond the bound, dropped: closed.
            if self.fds.len() < MAX_FDS {
                self.fds.push((at, fd));
            }
        }
        self.buf.extend_from_slice(&chunk[..n]);
        self.buf.len() <= MAX_LINE || self.buf.contains(&b'\n')
    }

    /// The next whole line, with the descriptors that came with it.
    pub fn next_line(&mut self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let end = self.buf.iter().position(|b| *b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        let (mine, rest): (Vec<_>, Vec<_>) = self.fds.drain(..).partition(|(at, _)| *at <= end);
        self.fds = rest
            .into_iter()
            .map(|(at, fd)| (at - end - 1, fd))
            .collect();
        Some((line, mine.into_iter().map(|(_, fd)| fd).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::Write;

    fn send_fd(s: &UnixStream, bytes: &[u8], fd: RawFd) {
        let iov = [std::io::IoSlice::new(bytes)];
        let fds = [fd];
        sendmsg::<()>(
            s.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    fn inode(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn each_descriptor_goes_with_the_line_it_came_with() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(b);
        let disk = tempfile::tempfile().unwrap();
        let want = nix::sys::stat::fstat(&disk).unwrap().st_ino;
        a.write_all(b"{\"action\":\"state\"}\n{\"act").unwrap();
        assert!(c.fill());
        let (line, fds) = c.next_line().unwrap();
        assert_eq!(line, b"{\"action\":\"state\"}\n");
        assert!(fds.is_empty());
        assert!(c.next_line().is_none(), "half a line waits");
        // The descriptor rides with the rest of the line it belongs to.
        send_fd(&a, b"ion\":\"attach\"}\n", disk.as_raw_fd());
        assert!(c.fill());
        a.write_all(b"{\"action\":\"disks\"}\n").unwrap();
        assert!(c.fill());
        let (line, fds) = c.next_line().unwrap();
        assert_eq!(line, b"{\"action\":\"attach\"}\n");
        assert_eq!(fds.len(), 1);
        assert_eq!(inode(&fds[0]), want);
        let (line, fds) = c.next_line().unwrap();
        assert_eq!(line, b"{\"action\":\"disks\"}\n");
        assert!(fds.is_empty(), "the next line gets none of it");
        // Pipelined: a line without and a line with a descriptor, read at once.
        a.write_all(b"{\"x\":1}\n").unwrap();
        send_fd(&a, b"{\"y\":2}\n", disk.as_raw_fd());
        assert!(c.fill());
        let (line, fds) = c.next_line().unwrap();
        assert_eq!((line.as_slice(), fds.len()), (&b"{\"x\":1}\n"[..], 0));
        let (line, fds) = c.next_line().unwrap();
        assert_eq!((line.as_slice(), fds.len()), (&b"{\"y\":2}\n"[..], 1));
    }

    /// How many descriptors this process has open on `file` (other tests' are not).
    fn open_on(file: &std::fs::File) -> usize {
        let want = nix::sys::stat::fstat(file).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| nix::sys::stat::stat(&e.path()).ok())
            .filter(|s| s.st_ino == want.st_ino && s.st_dev == want.st_dev)
            .count()
    }

    #[test]
    fn descriptors_beyond_the_bound_are_closed_and_long_lines_end_the_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(b);
        let disk = tempfile::tempfile().unwrap();
        for _ in 0..MAX_FDS + 3 {
            send_fd(&a, b" ", disk.as_raw_fd());
            assert!(c.fill());
        }
        send_fd(&a, b"\n", disk.as_raw_fd());
        assert!(c.fill());
        let (_, fds) = c.next_line().unwrap();
        assert_eq!(fds.len(), MAX_FDS);
        drop(fds);
        // Many in one message: none kept beyond the bound, none left open.
        let before = open_on(&disk);
        let many = vec![disk.as_raw_fd(); 40];
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[std::io::IoSlice::new(b"{}\n")],
            &[ControlMessage::ScmRights(&many)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(c.fill());
        let (_, fds) = c.next_line().unwrap();
        assert_eq!(fds.len(), MAX_FDS);
        drop(fds);
        assert_eq!(open_on(&disk), before, "descriptors left open");

        let (mut a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(b);
        let chunk = vec![b'x'; 4096];
        let mut open = true;
        for _ in 0..(MAX_LINE / 4096 + 2) {
            a.write_all(&chunk).unwrap();
            open = c.fill();
            if !open {
                break;
            }
        }
        assert!(!open, "a line over the bound ends the connection");
        drop(a);
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(b);
        assert!(c.fill(), "nothing to read yet is not an end");
        drop(a);
        assert!(!c.fill(), "a closed peer is");
    }
}
