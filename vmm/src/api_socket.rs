//! The VMM's API listener: a socket it binds itself (made under a temporary name and
//! renamed, removed at exit through its directory) or one its parent bound and handed
//! over.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The API listener, and how to remove its socket file at exit (when we made it).
pub struct ApiSocket {
    pub listener: UnixListener,
    /// The socket's directory and name.
    made: Option<(std::os::fd::OwnedFd, std::ffi::OsString)>,
}

impl ApiSocket {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        // Bind under a temporary name and rename: the socket file appears only once it
        // is listening, so a client that waits for the file never sees ECONNREFUSED.
        let mut tmp = path.to_path_buf().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let l = UnixListener::bind(&tmp)?;
        std::fs::rename(&tmp, path)?;
        // The socket is removed at exit through its directory's descriptor, which works
        // from inside the jail too.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Self {
            listener: l,
            made: Some((dir_fd, path.file_name().unwrap_or_default().to_owned())),
        })
    }

    /// Takes over `fd`, which must be a listening socket above stdio.
    pub fn inherited(fd: RawFd) -> std::io::Result<Self> {
        if fd < 3 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "needs an fd above 2",
            ));
        }
        let listener = crate::vsock::muxer::inherited_listener(fd)?;
        // Close-on-exec like everything this process opens itself.
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(Self {
            listener,
            made: None,
        })
    }

    /// Removes the socket file, if this process made it.
    pub fn remove(&self) {
        if let Some((dir, name)) = &self.made {
            let _ = nix::unistd::unlinkat(
                dir,
                name.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}
