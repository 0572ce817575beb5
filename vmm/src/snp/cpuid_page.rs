//! The SNP CPUID page: the CPUID results the guest will trust, which the firmware checks
//! against what the hardware allows when the page is handed over (`SNP_LAUNCH_UPDATE`
//! with the CPUID type). Its contents are not measured. Layout (SEV-SNP firmware ABI,
//! "CPUID Reporting"): a count, 12 reserved bytes, then up to 64 entries of 48 bytes
//! (EAX and ECX in, XCR0 and XSS in, EAX EBX ECX EDX out, 8 reserved).

use cocoon_confidential::snp::PAGE_SIZE;
use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The most entries the page holds.
pub const MAX_ENTRIES: usize = 64;
const HEADER: usize = 16;
const ENTRY: usize = 48;

/// The page for `entries` (the vCPUs' CPUID as KVM will report it).
pub fn table(entries: &[kvm_cpuid_entry2]) -> Result<[u8; PAGE_SIZE], super::SnpError> {
    if entries.len() > MAX_ENTRIES {
        return Err(super::SnpError::Host(format!(
            "{} CPUID entries; the SNP CPUID page holds {MAX_ENTRIES}",
            entries.len()
        )));
    }
    let mut page = [0u8; PAGE_SIZE];
    page[..4].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = HEADER + i * ENTRY;
        let index = if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
            e.index
        } else {
            0
        };
        // Leaf 0xD's XSAVE sizes depend on XCR0: the entry is the one for XCR0 = x87
        // (the guest's state at reset), whose area is the legacy 512 bytes and the
        // 64-byte header, as QEMU fills it (the firmware checks the page).
        let xsave = e.function == 0xd && index <= 1;
        let xcr0_in: u64 = if xsave { 0x1 } else { 0 };
        let ebx = if xsave { 0x240 } else { e.ebx };
        let mut put = |off: usize, bytes: &[u8]| {
            page[at + off..at + off + bytes.len()].copy_from_slice(bytes)
        };
        put(0, &e.function.to_le_bytes());
        put(4, &index.to_le_bytes());
        put(8, &xcr0_in.to_le_bytes());
        put(16, &0u64.to_le_bytes());
        put(24, &e.eax.to_le_bytes());
        put(28, &ebx.to_le_bytes());
        put(32, &e.ecx.to_le_bytes());
        put(36, &e.edx.to_le_bytes());
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_laid_out_and_bounded() {
        let e = |function, index, flags| kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: 0x11,
            ebx: 0x22,
            ecx: 0x33,
            edx: 0x44,
            ..Default::default()
        };
        let page = table(&[e(0, 5, 0), e(7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX)]).unwrap();
        assert_eq!(page[..4], 2u32.to_le_bytes());
        // The first entry's index is not significant: zero.
        assert_eq!(page[16 + 4..16 + 8], 0u32.to_le_bytes());
        let second = &page[16 + 48..16 + 96];
        assert_eq!(second[..8], [7, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            second[24..40],
            [0x11, 0, 0, 0, 0x22, 0, 0, 0, 0x33, 0, 0, 0, 0x44, 0, 0, 0]
        );
        assert!(page[16 + 96..].iter().all(|b| *b == 0));
        let too_many = vec![e(1, 0, 0); 65];
        assert!(table(&too_many)
            .unwrap_err()
            .to_string()
            .contains("holds 64"));
    }
}
