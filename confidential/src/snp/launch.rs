//! An SEV-SNP launch as a list of page updates, in the order the firmware receives them:
//! the firmware image, then its SEV metadata sections (zero, secrets, CPUID and kernel
//! hashes pages), then one VMSA per vCPU. The same list is what a VMM hands to
//! `SNP_LAUNCH_UPDATE` and what `cocoon measure snp` folds into the expected digest, so
//! the two cannot drift apart.

use super::gctx::{page_digest, Gctx, PageType, LD_SIZE, VMSA_GPA};
use super::hashes::SevHashes;
use super::ovmf::{Ovmf, OvmfError, SectionType};
use super::vmsa::{self, Reset, VmmType, BSP_EIP};
use super::PAGE_SIZE;

/// What a launch is made of.
pub struct LaunchInputs<'a> {
    pub firmware: &'a Ovmf,
    /// Hashes of the kernel, initrd and command line OVMF will boot (direct boot).
    pub hashes: Option<SevHashes>,
    pub vcpus: u32,
    /// CPUID Fn0000_0001 EAX of the guest's vCPUs (QEMU passes it in RDX at reset).
    pub vcpu_sig: u64,
    /// The VMSA's SEV_FEATURES (bit 0: SNP active).
    pub guest_features: u64,
    pub vmm: VmmType,
}

/// A launch cannot be built from these inputs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error(transparent)]
    Firmware(#[from] OvmfError),
    #[error("a kernel was given, but the firmware's SEV metadata has no SNP_KERNEL_HASHES section (it cannot check a kernel it is handed)")]
    NoHashesSection,
    #[error("the firmware's SNP_KERNEL_HASHES section is {0} bytes, not one page")]
    HashesSectionSize(u32),
    #[error("the kernel hashes table at {0:#x} does not fit in its page")]
    HashesTableOffset(u32),
    #[error("the firmware's {kind:?} section at {gpa:#x} is {size} bytes, not whole pages")]
    SectionSize {
        kind: SectionType,
        gpa: u32,
        size: u32,
    },
    #[error("a launch needs at least one vCPU")]
    NoVcpus,
    #[error("{0} vCPUs, but the firmware has no SEV-ES reset vector for application processors")]
    NoApResetVector(u32),
}

/// One page the launch hands to the firmware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageUpdate {
    pub kind: PageType,
    pub gpa: u64,
    /// The page's bytes (NORMAL and VMSA pages); the other types carry none.
    pub data: Option<Vec<u8>>,
}

impl PageUpdate {
    fn empty(kind: PageType, gpa: u64) -> Self {
        PageUpdate {
            kind,
            gpa,
            data: None,
        }
    }

    /// What the firmware folds into the digest for this page.
    pub fn contents_digest(&self) -> [u8; LD_SIZE] {
        match &self.data {
            Some(d) => page_digest(d),
            None => [0; LD_SIZE],
        }
    }
}

/// The pages of one launch, in order.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    pub updates: Vec<PageUpdate>,
    /// How many of the first updates are the firmware image's own pages.
    pub firmware_pages: usize,
}

impl LaunchPlan {
    pub fn build(inputs: &LaunchInputs) -> Result<LaunchPlan, LaunchError> {
        let fw = inputs.firmware;
        if inputs.vcpus == 0 {
            return Err(LaunchError::NoVcpus);
        }
        let mut updates: Vec<PageUpdate> = fw
            .data()
            .chunks(PAGE_SIZE)
            .enumerate()
            .map(|(i, page)| PageUpdate {
                kind: PageType::Normal,
                gpa: fw.gpa() + (i * PAGE_SIZE) as u64,
                data: Some(page.to_vec()),
            })
            .collect();
        let firmware_pages = updates.len();
        if inputs.hashes.is_some() && !fw.has_section(SectionType::SnpKernelHashes) {
            return Err(LaunchError::NoHashesSection);
        }
        for s in fw.sections() {
            let gpa = u64::from(s.gpa);
            let pages = |kind: PageType| -> Result<Vec<PageUpdate>, LaunchError> {
                if !(s.size as usize).is_multiple_of(PAGE_SIZE) {
                    return Err(LaunchError::SectionSize {
                        kind: s.kind,
                        gpa: s.gpa,
                        size: s.size,
                    });
                }
                Ok((0..u64::from(s.size))
                    .step_by(PAGE_SIZE)
                    .map(|off| PageUpdate::empty(kind, gpa + off))
                    .collect())
            };
            match s.kind {
                // GCE leaves these unmeasured.
                SectionType::SnpSecMemory if inputs.vmm == VmmType::Gce => {
                    updates.extend(pages(PageType::Unmeasured)?)
                }
                SectionType::SnpSecMemory | SectionType::SvsmCaa => {
                    updates.extend(pages(PageType::Zero)?)
                }
                SectionType::SnpSecrets => updates.push(PageUpdate::empty(PageType::Secrets, gpa)),
                // EC2 adds the CPUID pages after all the others.
                SectionType::Cpuid if inputs.vmm == VmmType::Ec2 => {}
                SectionType::Cpuid => updates.push(PageUpdate::empty(PageType::Cpuid, gpa)),
                SectionType::SnpKernelHashes => match &inputs.hashes {
                    Some(h) => {
                        if s.size as usize != PAGE_SIZE {
                            return Err(LaunchError::HashesSectionSize(s.size));
                        }
                        let table = fw.hashes_table_gpa()?;
                        let page = h
                            .page(table as usize & (PAGE_SIZE - 1))
                            .ok_or(LaunchError::HashesTableOffset(table))?;
                        updates.push(PageUpdate {
                            kind: PageType::Normal,
                            gpa,
                            data: Some(page),
                        });
                    }
                    None => updates.extend(pages(PageType::Zero)?),
                },
            }
        }
        if inputs.vmm == VmmType::Ec2 {
            for s in fw
                .sections()
                .iter()
                .filter(|s| s.kind == SectionType::Cpuid)
            {
                updates.push(PageUpdate::empty(PageType::Cpuid, u64::from(s.gpa)));
            }
        }
        let ap_eip = fw.sev_es_reset_eip()?;
        if inputs.vcpus > 1 && ap_eip == 0 {
            return Err(LaunchError::NoApResetVector(inputs.vcpus));
        }
        let reset = |eip| Reset {
            eip,
            vcpu_sig: inputs.vcpu_sig,
            sev_features: inputs.guest_features,
            vmm: inputs.vmm,
        };
        let (bsp, ap) = (vmsa::page(&reset(BSP_EIP)), vmsa::page(&reset(ap_eip)));
        for i in 0..inputs.vcpus {
            updates.push(PageUpdate {
                kind: PageType::Vmsa,
                gpa: VMSA_GPA,
                data: Some(if i == 0 { bsp.clone() } else { ap.clone() }),
            });
        }
        Ok(LaunchPlan {
            updates,
            firmware_pages,
        })
    }

    /// The launch digest the firmware will report.
    pub fn digest(&self) -> [u8; LD_SIZE] {
        fold(Gctx::default(), &self.updates)
    }

    /// The same, from a precomputed digest of the firmware's pages.
    pub fn digest_from_firmware(&self, firmware_ld: [u8; LD_SIZE]) -> [u8; LD_SIZE] {
        fold(
            Gctx::with_seed(firmware_ld),
            &self.updates[self.firmware_pages..],
        )
    }
}

/// The digest of a firmware image's pages alone (`--snp-ovmf-hash` takes it).
pub fn firmware_digest(fw: &Ovmf) -> [u8; LD_SIZE] {
    let mut g = Gctx::default();
    for (i, page) in fw.data().chunks(PAGE_SIZE).enumerate() {
        g.update(
            PageType::Normal,
            fw.gpa() + (i * PAGE_SIZE) as u64,
            &page_digest(page),
        );
    }
    g.ld()
}

fn fold(mut g: Gctx, updates: &[PageUpdate]) -> [u8; LD_SIZE] {
    for u in updates {
        g.update(u.kind, u.gpa, &u.contents_digest());
    }
    g.ld()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::ovmf::test_image;

    fn inputs(fw: &Ovmf, vmm: VmmType, vcpus: u32, hashes: Option<SevHashes>) -> LaunchInputs<'_> {
        LaunchInputs {
            firmware: fw,
            hashes,
            vcpus,
            vcpu_sig: 0xa00f11,
            guest_features: 1,
            vmm,
        }
    }

    #[test]
    fn order_and_kinds_follow_the_metadata() {
        let fw = Ovmf::parse(test_image(&[
            (0x80_0000, 0x2000, 1),
            (0x80_2000, 0x1000, 2),
            (0x80_3000, 0x1000, 3),
            (0x80_4000, 0x1000, 0x10),
        ]))
        .unwrap();
        let kinds = |vmm| -> Vec<(PageType, u64)> {
            let plan = LaunchPlan::build(&inputs(&fw, vmm, 2, None)).unwrap();
            assert_eq!(plan.firmware_pages, 8);
            plan.updates[8..].iter().map(|u| (u.kind, u.gpa)).collect()
        };
        use PageType::*;
        assert_eq!(
            kinds(VmmType::Qemu),
            [
                (Zero, 0x80_0000),
                (Zero, 0x80_1000),
                (Secrets, 0x80_2000),
                (Cpuid, 0x80_3000),
                (Zero, 0x80_4000),
                (Vmsa, VMSA_GPA),
                (Vmsa, VMSA_GPA)
            ]
        );
        assert_eq!(
            kinds(VmmType::Gce)[..2],
            [(Unmeasured, 0x80_0000), (Unmeasured, 0x80_1000)]
        );
        let ec2 = kinds(VmmType::Ec2);
        assert_eq!(ec2[3..5], [(Zero, 0x80_4000), (Cpuid, 0x80_3000)]);
    }

    #[test]
    fn the_firmware_seed_replaces_its_pages() {
        let fw = Ovmf::parse(test_image(&[(0x80_0000, 0x1000, 3)])).unwrap();
        let plan = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 1, None)).unwrap();
        assert_eq!(
            plan.digest_from_firmware(firmware_digest(&fw)),
            plan.digest()
        );
    }

    #[test]
    fn bad_launches_are_named() {
        let fw = Ovmf::parse(test_image(&[(0x80_0000, 0x1000, 3)])).unwrap();
        let hashes = Some(SevHashes::new(b"k", None, None));
        let e = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 1, hashes.clone())).unwrap_err();
        assert_eq!(e, LaunchError::NoHashesSection);
        let e = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 0, None)).unwrap_err();
        assert_eq!(e, LaunchError::NoVcpus);
        let fw = Ovmf::parse(test_image(&[(0x80_0000, 0x2000, 0x10)])).unwrap();
        let e = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 1, hashes)).unwrap_err();
        assert_eq!(e, LaunchError::HashesSectionSize(0x2000));
        let fw = Ovmf::parse(test_image(&[(0x80_0000, 0x800, 1)])).unwrap();
        let e = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 1, None)).unwrap_err();
        assert!(e.to_string().contains("not whole pages"), "{e}");
    }

    #[test]
    fn the_hashes_page_carries_the_table_at_its_offset() {
        let fw = Ovmf::parse(test_image(&[(0x80_0000, 0x1000, 0x10)])).unwrap();
        let h = SevHashes::new(b"kernel", Some(b"initrd"), Some(b"console=ttyS0"));
        let plan = LaunchPlan::build(&inputs(&fw, VmmType::Qemu, 1, Some(h.clone()))).unwrap();
        let page = plan.updates[8].data.as_ref().unwrap();
        // The test image's table entry says 0x800c00.
        assert_eq!(&page[0xc00..0xc00 + 176], &h.table()[..]);
        assert!(page[..0xc00].iter().all(|b| *b == 0));
    }
}
