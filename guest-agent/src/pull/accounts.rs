//! The accounts of a pulled image (`/etc/passwd`, `/etc/group` of its root), for the
//! policy: containerd turns the image's `User` and the pod's ids into the process's
//! user, group and supplementary groups through them, so a policy that pins those must
//! read them too. The image is the digest-checked one the guest unpacked; its files are
//! still opened inside its root (`RESOLVE_IN_ROOT`: an absolute link in it resolves in
//! it, as containerd resolves it), never blocking on what is not a regular file, and
//! bounded.

use std::io::Read;
use std::path::Path;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use serde_json::{json, Value};

/// The most either file may hold.
const MAX_FILE: u64 = 1 << 20;
/// The most entries either file may give.
const MAX_ENTRIES: usize = 16_384;

/// `{"users": [{name, uid, gid}], "groups": [{name, gid, members}]}` of the image whose
/// root is `rootfs`, in the files' order; a file the image lacks gives no entries.
pub fn of_rootfs(rootfs: &Path) -> Result<Value, String> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the image's root {}: {e}", rootfs.display()))?;
    let read = |name: &str| -> Result<String, String> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match openat2(&root, name, how) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT | nix::Error::ENOTDIR) => return Ok(String::new()),
            Err(e) => return Err(format!("cannot open the image's /{name}: {e}")),
        };
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| format!("the image's /{name}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("the image's /{name} is not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the image's /{name}: {e}"))?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(format!("the image's /{name} is over {MAX_FILE} bytes"));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let users = parse(&read("etc/passwd")?, "/etc/passwd", |f| {
        Ok(json!({"name": field(f, 0), "uid": id(f, 2)?, "gid": id(f, 3)?}))
    })?;
    let groups = parse(&read("etc/group")?, "/etc/group", |f| {
        let members: Vec<&str> = match field(f, 3) {
            "" => Vec::new(),
            list => list.split(',').collect(),
        };
        Ok(json!({"name": field(f, 0), "gid": id(f, 2)?, "members": members}))
    })?;
    Ok(json!({"users": users, "groups": groups}))
}

/// The entries of a colon-separated account file, as `entry` makes them of each line's
/// fields, read as containerd's parser (runc's and moby's `user` package) reads them:
/// only blank lines are skipped (a `#` line is an entry), a missing field is empty, an
/// id that is not a number is 0. An id that number cannot hold (negative, over 32
/// bits), or more than `MAX_ENTRIES` entries, is an error: what containerd would make
/// of them is not modelled, so the policy gets no accounts and refuses.
fn parse(
    text: &str,
    file: &str,
    entry: impl Fn(&[&str]) -> Result<Value, String>,
) -> Result<Vec<Value>, String> {
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if n == MAX_ENTRIES {
            return Err(format!("the image's {file} has over {MAX_ENTRIES} entries"));
        }
        let fields: Vec<&str> = line.split(':').collect();
        out.push(entry(&fields).map_err(|e| format!("the image's {file}: {e}"))?);
    }
    Ok(out)
}

fn field<'a>(fields: &[&'a str], i: usize) -> &'a str {
    fields.get(i).copied().unwrap_or_default()
}

/// Field `i` as an id: Go's `strconv.Atoi` with its error ignored (0), within 32 bits.
fn id(fields: &[&str], i: usize) -> Result<u32, String> {
    let Ok(n) = field(fields, i).parse::<i64>() else {
        return Ok(0);
    };
    u32::try_from(n).map_err(|_| format!("id {n} of {:?} is out of range", field(fields, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_accounts_are_read_inside_its_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n\n  nginx:x:101:102::/:/bin/false\r\nbad:x:y:1\nshort\n",
        )
        .unwrap();
        std::fs::write(t.path().join("host-group"), "wheel:x:10:nginx\n").unwrap();
        // An absolute link resolves inside the image's root, never to the host's file.
        std::os::unix::fs::symlink(t.path().join("host-group"), root.join("etc/group")).unwrap();
        let a = of_rootfs(&root).unwrap();
        assert_eq!(
            a["users"],
            json!([{"name": "root", "uid": 0, "gid": 0}, {"name": "nginx", "uid": 101, "gid": 102},
                   {"name": "bad", "uid": 0, "gid": 1}, {"name": "short", "uid": 0, "gid": 0}]),
            "as containerd reads them: a bad id is 0, a missing field empty"
        );
        assert_eq!(a["groups"], json!([]), "the link left the image's root");
        std::fs::remove_file(root.join("etc/group")).unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\n# c\nweb:x:0102:nginx,other\n",
        )
        .unwrap();
        let a = of_rootfs(&root).unwrap();
        assert_eq!(
            a["groups"],
            json!([{"name": "root", "gid": 0, "members": []},
                   {"name": "# c", "gid": 0, "members": []},
                   {"name": "web", "gid": 102, "members": ["nginx", "other"]}])
        );
    }

    #[test]
    fn what_is_no_account_file_is_refused_or_empty() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert_eq!(of_rootfs(root).unwrap(), json!({"users": [], "groups": []}));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        nix::unistd::mkfifo(&root.join("etc/passwd"), Mode::from_bits_truncate(0o600)).unwrap();
        let e = of_rootfs(root).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::write(root.join("etc/passwd"), vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        let e = of_rootfs(root).unwrap_err();
        assert!(e.contains("over"), "{e}");
        std::fs::write(root.join("etc/passwd"), "x:x:-1:0\n").unwrap();
        let e = of_rootfs(root).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        std::fs::write(root.join("etc/passwd"), "u:x:1:1\n".repeat(MAX_ENTRIES + 1)).unwrap();
        let e = of_rootfs(root).unwrap_err();
        assert!(e.contains("entries"), "{e}");
    }
}
