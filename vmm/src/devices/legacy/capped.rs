//! The serial console's output, bounded. What the guest writes to its console lands in
//! a host file, and the guest is untrusted: past `SERIAL_OUT_LIMIT` bytes the rest is
//! dropped (after one line saying so), so a guest cannot fill the host's disk. The
//! start of a console (the boot, the first errors) is what diagnosis needs most.

use std::io::{self, Write};

/// The most console output written to the host.
pub const SERIAL_OUT_LIMIT: u64 = 4 * 1024 * 1024;

pub struct CappedWriter<W: Write> {
    inner: W,
    written: u64,
    limit: u64,
    told: bool,
}

impl<W: Write> CappedWriter<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            written: 0,
            limit,
            told: false,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written) as usize;
        if room == 0 {
            if !self.told {
                self.told = true;
                let _ = self.inner.write_all(
                    format!(
                        "\n[cocoon-vmm: console output beyond {} bytes dropped]\n",
                        self.limit
                    )
                    .as_bytes(),
                );
            }
            // Accepted and dropped: the guest's UART must not stall on a full console.
            return Ok(buf.len());
        }
        let n = self.inner.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_after_one_notice() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        for _ in 0..100 {
            w.write_all(b"0123456").unwrap();
        }
        let text = String::from_utf8(w.inner).unwrap();
        assert!(text.starts_with("0123456012"), "{text}");
        assert_eq!(text.matches("dropped").count(), 1, "{text}");
        assert!(text.len() < 100, "{text}");
    }
}
