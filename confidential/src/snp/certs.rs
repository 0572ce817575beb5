//! The certificate table of an SEV-SNP extended report (the `auxblob` of a configfs-tsm
//! report, or `SNP_GET_EXT_REPORT`'s buffer): entries of a GUID, an offset and a length,
//! ended by an all-zero entry, then the certificates they point at (GHCB specification,
//! "SNP Extended Guest Request"). The host's firmware fills it, so every offset and
//! length is checked against the blob; the VCEK found here is only a hint for the
//! verifier, which checks its chain.

/// The GUID of the VCEK's entry, as stored (mixed-endian, as in the table).
const VCEK_GUID: [u8; 16] = guid_bytes(
    0x63da758d,
    0xe664,
    0x4564,
    *b"\xad\xc5\xf4\xb9\x3b\xe8\xac\xcd",
);
const ENTRY: usize = 24;

const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("the certificate table has no terminating entry within its {0} bytes")]
    Unterminated(usize),
    #[error("a certificate table entry points past the table's {len} bytes ({offset} + {size})")]
    OutOfBounds { offset: u32, size: u32, len: usize },
}

/// The VCEK's DER bytes, if the table has one.
pub fn vcek(table: &[u8]) -> Result<Option<&[u8]>, TableError> {
    for entry in table.chunks(ENTRY) {
        if entry.len() < ENTRY {
            break;
        }
        if entry.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        if entry[..16] != VCEK_GUID {
            continue;
        }
        let offset = u32::from_le_bytes(entry[16..20].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(entry[20..24].try_into().expect("4 bytes"));
        let start = offset as usize;
        return match start
            .checked_add(size as usize)
            .and_then(|end| table.get(start..end))
        {
            Some(der) => Ok(Some(der)),
            None => Err(TableError::OutOfBounds {
                offset,
                size,
                len: table.len(),
            }),
        };
    }
    Err(TableError::Unterminated(table.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(guid: [u8; 16], offset: u32, size: u32) -> Vec<u8> {
        let mut e = guid.to_vec();
        e.extend_from_slice(&offset.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e
    }

    #[test]
    fn the_vcek_entry_is_found_among_others() {
        // An ARK entry (c0b406a4-a803-4952-9743-3fb6014cd0ae), the VCEK, the terminator.
        let ark = guid_bytes(
            0xc0b406a4,
            0xa803,
            0x4952,
            *b"\x97\x43\x3f\xb6\x01\x4c\xd0\xae",
        );
        let mut t = entry(ark, 72, 3);
        t.extend(entry(VCEK_GUID, 75, 4));
        t.extend([0u8; ENTRY]);
        t.extend(b"arkVCEK");
        assert_eq!(vcek(&t), Ok(Some(&b"VCEK"[..])));
        // The GUID's text form, as the GHCB specification writes it, maps to these bytes.
        assert_eq!(hex::encode(VCEK_GUID), "8d75da6364e66445adc5f4b93be8accd");
    }

    #[test]
    fn a_table_without_a_vcek_or_with_bad_bounds() {
        assert_eq!(vcek(&[0u8; ENTRY]), Ok(None));
        let bad = [entry(VCEK_GUID, 48, 100), vec![0u8; ENTRY]].concat();
        assert_eq!(
            vcek(&bad),
            Err(TableError::OutOfBounds {
                offset: 48,
                size: 100,
                len: 48
            })
        );
        let wraps = [entry(VCEK_GUID, u32::MAX, u32::MAX), vec![0u8; ENTRY]].concat();
        assert!(matches!(vcek(&wraps), Err(TableError::OutOfBounds { .. })));
        assert_eq!(
            vcek(&entry(VCEK_GUID, 0, 0)[..20]),
            Err(TableError::Unterminated(20))
        );
    }
}
