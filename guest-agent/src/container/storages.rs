//! The request's storages (volumes the host hands over as devices or shares),
//! mounted in the agent's namespace before the container is created.

use std::path::PathBuf;

use cocoon_protocol::agent::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::ContainerError;

/// Mounts the request's storages in the agent's namespace.
pub(super) fn mount_storages(storages: &[Storage]) -> Result<Vec<PathBuf>, ContainerError> {
    let mut done = Vec::new();
    for s in storages {
        let target = PathBuf::from(&s.mount_point);
        if !target.is_absolute() {
            unmount_all(&done);
            return Err(ContainerError::Invalid(format!(
                "storage mount point {:?} is not absolute",
                s.mount_point
            )));
        }
        let opts = crate::runtime::mount_options(&s.options);
        let fstype = if s.fstype.is_empty() {
            s.driver.as_str()
        } else {
            s.fstype.as_str()
        };
        let (fstype, flags) = if fstype == "bind" {
            (None, opts.flags | MsFlags::MS_BIND)
        } else {
            (Some(fstype), opts.flags)
        };
        let data = (!opts.data.is_empty()).then(|| opts.data.join(","));
        let r = std::fs::create_dir_all(&target)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|_| {
                mount(
                    Some(s.source.as_str()),
                    &target,
                    fstype,
                    flags,
                    data.as_deref(),
                )
            });
        if let Err(e) = r {
            unmount_all(&done);
            return Err(ContainerError::Storage(s.mount_point.clone(), e));
        }
        done.push(target);
    }
    Ok(done)
}

pub(super) fn unmount_all(targets: &[PathBuf]) {
    for t in targets.iter().rev() {
        if let Err(e) = umount2(t, MntFlags::MNT_DETACH) {
            tracing::warn!(target = %t.display(), "cannot unmount storage: {e}");
        }
    }
}
