//! The host's mount table as the watcher reads it: `/proc/self/mountinfo`, taken as
//! bytes (a mount point may be any bytes but `/` and NUL: a guest with an rw volume can
//! rename a directory above a host mount to a name that is not UTF-8).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One mount of the table, told apart from a later one that reuses its id (the kernel
/// hands out the lowest free id): the id with the filesystem's device, the root of the
/// mount in it, and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mount {
    pub id: u64,
    pub dev: String,
    pub root: OsString,
    pub point: PathBuf,
}

/// The mounts of a `mountinfo` text, in its order (a mount after the one it is mounted
/// on). Malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<Mount> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|b| *b == b' ');
            let id = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
            let _parent = f.next()?;
            let dev = String::from_utf8(f.next()?.to_vec()).ok()?;
            let root = unescape(f.next()?);
            let point = PathBuf::from(unescape(f.next()?));
            Some(Mount {
                id,
                dev,
                root,
                point,
            })
        })
        .collect()
}

/// The kernel's octal escapes of a mount table field (`\040` for a space, and so on).
pub fn unescape(b: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// The mounts strictly beneath `source` and outside `excluded`, with their places
/// relative to `source`, parents before children (mounts stacked on one point keep the
/// table's order).
pub fn beneath<'a>(
    table: &'a [Mount],
    source: &Path,
    excluded: &BTreeSet<PathBuf>,
) -> Vec<(&'a Mount, PathBuf)> {
    let mut found: Vec<(&Mount, PathBuf)> = table
        .iter()
        .filter(|m| !excluded.iter().any(|x| m.point.starts_with(x)))
        .filter_map(|m| {
            let rel = m.point.strip_prefix(source).ok()?;
            (!rel.as_os_str().is_empty()).then(|| (m, rel.to_path_buf()))
        })
        .collect();
    found.sort_by_key(|(_, rel)| rel.components().count());
    found
}

/// `rel` as bytes, for messages about names that may not be UTF-8.
pub fn show(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, point: &str) -> Mount {
        Mount {
            id,
            dev: "0:1".into(),
            root: "/".into(),
            point: point.into(),
        }
    }

    #[test]
    fn the_table_is_read_as_bytes_with_its_escapes() {
        let t = b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                  40 22 0:5 /sub /a\\040b\\134c rw - tmpfs t rw\n\
                  41 22 0:6 / /x\xff\\012y rw - tmpfs t rw\n\
                  garbage\n";
        let got = parse(t);
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].id, got[0].dev.as_str()), (22, "0:21"));
        assert_eq!(got[1].point, PathBuf::from("/a b\\c"));
        assert_eq!(got[1].root, OsString::from("/sub"));
        assert_eq!(got[2].point.as_os_str().as_bytes(), b"/x\xff\ny");
        assert_eq!(unescape(b"\\04"), OsString::from("\\04"));
        assert_eq!(unescape(b"\\777"), OsString::from("\\777"));
    }

    #[test]
    fn only_mounts_strictly_beneath_and_outside_the_run_dir_count() {
        let table = [
            m(1, "/"),
            m(2, "/vol"),
            m(3, "/vol/a/b"),
            m(4, "/vol/a"),
            m(5, "/volume"),
            m(6, "/run/cocoon/shares/x"),
            m(7, "/vol/a"),
        ];
        let none = BTreeSet::new();
        let ids = |v: Vec<(&Mount, PathBuf)>| {
            v.iter().map(|(m, r)| (m.id, r.clone())).collect::<Vec<_>>()
        };
        assert_eq!(
            ids(beneath(&table, Path::new("/vol"), &none)),
            vec![(4, "a".into()), (7, "a".into()), (3, "a/b".into())]
        );
        let run: BTreeSet<PathBuf> = [PathBuf::from("/run/cocoon")].into();
        let all = ids(beneath(&table, Path::new("/"), &run));
        assert!(all.iter().all(|(id, _)| *id != 6 && *id != 1), "{all:?}");
        assert_eq!(all.len(), 5);
    }
}
