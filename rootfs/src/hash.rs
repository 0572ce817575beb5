//! SHA-256 helpers shared by the manifest, the download check and the image id.

use std::fs::File;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The image id: SHA-256 over a version tag and the length-prefixed kernel and initramfs
/// bytes, so it names exactly what the VMM boots and nothing about how it was made.
pub fn image_id(kernel: &[u8], initramfs: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"cocoon-image-v1\n");
    for part in [kernel, initramfs] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_separates_the_parts() {
        assert_ne!(image_id(b"ab", b"c"), image_id(b"a", b"bc"));
        assert_eq!(image_id(b"k", b"i"), image_id(b"k", b"i"));
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
