//! A deterministic writer (and a checking reader) for the `newc` cpio format that the
//! kernel unpacks as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//! Entries are written sorted by path with fixed owners, times and inode numbers, so the
//! same inputs always give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

use thiserror::Error;

/// `newc` header magic (no checksums).
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
/// Fixed header length: magic plus 13 eight-digit hex fields.
pub const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;
const PERM_MASK: u32 = 0o7777;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("Archive path '{0}' is not a clean relative path")]
    BadPath(String),
    #[error("Archive path '{0}' is added twice")]
    Duplicate(String),
    #[error("Archive path '{0}' needs a parent directory where a non-directory entry exists")]
    ParentNotDirectory(String),
    #[error("Archive file '{0}' is larger than the 4 GiB newc limit")]
    TooLarge(String),
    #[error("Archive is truncated at byte {0}")]
    Truncated(usize),
    #[error("Archive has a bad header at byte {0}")]
    BadHeader(usize),
    #[error("Archive has non-zero padding at byte {0}")]
    BadPadding(usize),
    #[error("Archive ends without a {TRAILER} entry")]
    MissingTrailer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    perm: u32,
}

/// An in-memory archive; parents of every entry are added as `0755` directories.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory, or sets the mode of one already implied by a child.
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        let path = clean_path(path)?;
        self.add_parents(&path)?;
        match self.entries.get_mut(&path) {
            Some(Entry {
                kind: Kind::Dir,
                perm: p,
            }) => {
                *p = perm & PERM_MASK;
                Ok(())
            }
            Some(_) => Err(CpioError::Duplicate(path)),
            None => {
                self.entries.insert(
                    path,
                    Entry {
                        kind: Kind::Dir,
                        perm: perm & PERM_MASK,
                    },
                );
                Ok(())
            }
        }
    }

    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), CpioError> {
        let path = clean_path(path)?;
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(path));
        }
        self.insert_new(
            path,
            Entry {
                kind: Kind::File(data),
                perm: perm & PERM_MASK,
            },
        )
    }

    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let path = clean_path(path)?;
        self.insert_new(
            path,
            Entry {
                kind: Kind::CharDevice { major, minor },
                perm: perm & PERM_MASK,
            },
        )
    }

    fn insert_new(&mut self, path: String, entry: Entry) -> Result<(), CpioError> {
        if self.entries.contains_key(&path) {
            return Err(CpioError::Duplicate(path));
        }
        self.add_parents(&path)?;
        self.entries.insert(path, entry);
        Ok(())
    }

    fn add_parents(&mut self, path: &str) -> Result<(), CpioError> {
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => return Err(CpioError::ParentNotDirectory(path.to_owned())),
                None => {
                    self.entries.insert(
                        parent.to_owned(),
                        Entry {
                            kind: Kind::Dir,
                            perm: 0o755,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes the archive. Byte order of paths puts every directory before its children.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<u64> {
        let mut written = 0u64;
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, nlink, data, rdev) = match &entry.kind {
                Kind::Dir => (S_IFDIR | entry.perm, 2, &[][..], (0, 0)),
                Kind::File(data) => (S_IFREG | entry.perm, 1, data.as_slice(), (0, 0)),
                Kind::CharDevice { major, minor } => {
                    (S_IFCHR | entry.perm, 1, &[][..], (*major, *minor))
                }
            };
            // Inode 0 is avoided; some unpackers treat it as "no inode".
            let header = Header {
                ino: ino as u32 + 1,
                mode,
                nlink,
                filesize: data.len() as u32,
                rdev,
            };
            written += write_entry(w, &header, path, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev: (0, 0),
        };
        written += write_entry(w, &trailer, TRAILER, &[])?;
        Ok(written)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

fn write_entry<W: Write>(w: &mut W, h: &Header, name: &str, data: &[u8]) -> io::Result<u64> {
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        h.ino, h.mode, 0, 0, h.nlink, 0, h.filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
    ];
    let mut head = Vec::with_capacity(HEADER_LEN + name.len() + 4);
    head.extend_from_slice(NEWC_MAGIC);
    for f in fields {
        head.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    head.resize(align4(head.len()), 0);
    w.write_all(&head)?;
    w.write_all(data)?;
    let pad = align4(data.len()) - data.len();
    w.write_all(&[0u8; 3][..pad])?;
    Ok((head.len() + data.len() + pad) as u64)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn clean_path(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/');
    let ok = !trimmed.is_empty()
        && !trimmed.contains('\0')
        && trimmed != TRAILER
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(CpioError::BadPath(path.to_owned()))
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

impl ParsedEntry {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_char_device(&self) -> bool {
        self.mode & S_IFMT == S_IFCHR
    }
    pub fn perm(&self) -> u32 {
        self.mode & PERM_MASK
    }
}

/// Reads a `newc` archive strictly: padding must be zero and the trailer must be present.
/// The trailer itself is not returned.
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        let head = bytes
            .get(off..off + HEADER_LEN)
            .ok_or(CpioError::Truncated(off))?;
        if &head[..6] != NEWC_MAGIC {
            return Err(CpioError::BadHeader(off));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = &head[6 + i * 8..14 + i * 8];
            let hex = std::str::from_utf8(hex).map_err(|_| CpioError::BadHeader(off))?;
            *f = u32::from_str_radix(hex, 16).map_err(|_| CpioError::BadHeader(off))?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, _, _, rdev_major, rdev_minor, namesize, _] =
            fields;
        let name_start = off + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name = bytes
            .get(name_start..name_end)
            .ok_or(CpioError::Truncated(name_start))?;
        let Some((0, name)) = name.split_last().map(|(l, n)| (*l, n)) else {
            return Err(CpioError::BadHeader(off));
        };
        let name = String::from_utf8(name.to_vec()).map_err(|_| CpioError::BadHeader(off))?;
        let data_start = align4(name_end);
        check_padding(bytes, name_end, data_start)?;
        let data_end = data_start + filesize as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(CpioError::Truncated(data_start))?;
        let next = align4(data_end);
        check_padding(bytes, data_end, next)?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(ParsedEntry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data: data.to_vec(),
        });
        off = next;
        if off >= bytes.len() {
            return Err(CpioError::MissingTrailer);
        }
    }
}

fn check_padding(bytes: &[u8], from: usize, to: usize) -> Result<(), CpioError> {
    let pad = bytes.get(from..to).ok_or(CpioError::Truncated(from))?;
    match pad.iter().position(|&b| b != 0) {
        Some(i) => Err(CpioError::BadPadding(from + i)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add_file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        a.add_file("/lib/modules/r/virtio.ko", 0o644, vec![7u8; 5])
            .unwrap();
        a.add_dir("/proc", 0o555).unwrap();
        a.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        a.add_file("/etc/cocoon/modules", 0o644, Vec::new())
            .unwrap();
        a
    }

    #[test]
    fn round_trips_sorted_entries_with_fixed_metadata() {
        let bytes = sample().to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/cocoon",
                "etc/cocoon/modules",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/r",
                "lib/modules/r/virtio.ko",
                "proc"
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.ino, i as u32 + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
        }
        let init = entries.iter().find(|e| e.name == "init").unwrap();
        assert!(init.is_file());
        assert_eq!(init.perm(), 0o755);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        let console = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert!(console.is_char_device());
        assert_eq!(
            (console.rdev_major, console.rdev_minor, console.perm()),
            (5, 1, 0o600)
        );
        let proc_dir = entries.iter().find(|e| e.name == "proc").unwrap();
        assert!(proc_dir.is_dir());
        assert_eq!((proc_dir.perm(), proc_dir.nlink), (0o555, 2));
        assert_eq!(
            entries.iter().find(|e| e.name == "lib").unwrap().perm(),
            0o755
        );
    }

    #[test]
    fn header_layout_and_padding_match_newc() {
        let mut a = Archive::new();
        a.add_file("ab", 0o644, b"xyzzy".to_vec()).unwrap();
        let bytes = a.to_bytes();
        let head = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        let expected = [
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000005", "00000000", "00000000", "00000000", "00000000", "00000003", "00000000",
        ]
        .concat();
        assert_eq!(head, expected);
        // 110 + "ab\0" = 113 → padded to 116; data 5 → padded to 8.
        assert_eq!(&bytes[110..116], b"ab\0\0\0\0");
        assert_eq!(&bytes[116..124], b"xyzzy\0\0\0");
        assert_eq!(&bytes[124..130], NEWC_MAGIC);
        assert_eq!(
            &bytes[124 + HEADER_LEN..124 + HEADER_LEN + 11],
            b"TRAILER!!!\0"
        );
    }

    #[test]
    fn output_is_independent_of_insertion_order() {
        let mut b = Archive::new();
        b.add_file("/etc/cocoon/modules", 0o644, Vec::new())
            .unwrap();
        b.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        b.add_dir("proc", 0o555).unwrap();
        b.add_file("lib/modules/r/virtio.ko", 0o644, vec![7u8; 5])
            .unwrap();
        b.add_file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        assert_eq!(b.to_bytes(), sample().to_bytes());
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut a = Archive::new();
        for bad in ["", "/", "a/../b", "a//b", "./a", "TRAILER!!!", "a\0b"] {
            assert_eq!(
                a.add_dir(bad, 0o755),
                Err(CpioError::BadPath(bad.to_owned())),
                "{bad:?}"
            );
        }
        a.add_file("x", 0o644, vec![]).unwrap();
        assert_eq!(
            a.add_file("/x", 0o644, vec![]),
            Err(CpioError::Duplicate("x".into()))
        );
        assert_eq!(
            a.add_file("x/y", 0o644, vec![]),
            Err(CpioError::ParentNotDirectory("x/y".into()))
        );
        assert_eq!(a.add_dir("x", 0o755), Err(CpioError::Duplicate("x".into())));
    }

    #[test]
    fn reader_rejects_damaged_archives() {
        let bytes = sample().to_bytes();
        let without_trailer = &bytes[..bytes.len() - 124];
        assert_eq!(parse(without_trailer), Err(CpioError::MissingTrailer));
        assert!(matches!(
            parse(&bytes[..bytes.len() - 3]),
            Err(CpioError::Truncated(_))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert_eq!(parse(&bad), Err(CpioError::BadHeader(0)));
        let mut bad_pad = Archive::new();
        bad_pad.add_file("a", 0o644, b"x".to_vec()).unwrap();
        let mut bad_pad = bad_pad.to_bytes();
        bad_pad[HEADER_LEN + 4 + 1] = 1;
        assert!(matches!(parse(&bad_pad), Err(CpioError::BadPadding(_))));
    }
}
