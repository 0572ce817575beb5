//! `cocoon measure`: the launch digest a relying party should expect, from the same
//! inputs and flags as the reference tool (`sev-snp-measure --mode snp`). It prints the
//! digest and nothing else.

use std::path::{Path, PathBuf};

use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};

use crate::snp::hashes::SevHashes;
use crate::snp::launch::{firmware_digest, LaunchError, LaunchInputs, LaunchPlan};
use crate::snp::ovmf::{Ovmf, OvmfError};
use crate::snp::vmsa::{cpu_sig, cpu_type_sig, VmmType, CPU_TYPES};

#[derive(Subcommand)]
pub enum MeasureCmd {
    /// The SEV-SNP launch digest (what `sev-snp-measure --mode snp` prints).
    Snp(SnpArgs),
    /// The TDX MRTD of a launch of this TDVF firmware (hex); with a direct boot's kernel,
    /// initrd and command line, also the RTMR1 and RTMR2 the firmware extends, as
    /// `MRTD:`, `RTMR1:` and `RTMR2:` lines. RTMR0 (QEMU's ACPI tables) is not computed.
    Tdx(TdxArgs),
    /// An ID block and its authentication structure for this launch (`SNP_LAUNCH_FINISH`,
    /// QEMU's `id-block`/`id-auth`): the launch digest of the same arguments as `snp`,
    /// signed with the owner's ID key (and the ID key with an author key). Prints
    /// `id-block:` and `id-auth:` (base64), `id-key-digest:` and `author-key-digest:`
    /// (hex, what attestation reports carry).
    #[cfg(feature = "verify")]
    SnpIdBlock(SnpIdBlockArgs),
    /// The digest of the firmware's pages alone, for `--snp-ovmf-hash`.
    SnpOvmfHash {
        #[arg(long)]
        ovmf: PathBuf,
    },
    /// What an init-data document binds into the evidence: HOST_DATA (SEV-SNP, 32
    /// bytes) or MRCONFIGID (TDX, 48 bytes), hex.
    InitData {
        /// The init-data TOML (what `io.cocoon.init-data` carries, decoded).
        file: PathBuf,
        #[arg(long = "for", value_parser = ["snp", "tdx"])]
        tee: String,
    },
}

#[derive(Args)]
pub struct TdxArgs {
    /// The firmware image (TDVF: OVMF built with TDX support, e.g. Debian's OVMF.fd).
    #[arg(long)]
    pub ovmf: PathBuf,
    /// The kernel of a direct boot (an EFI-stub bzImage, as QEMU's `-kernel`).
    #[arg(long, requires_all = ["initrd", "append"])]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (QEMU's `-append`).
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// The guest's memory in MiB, when the firmware measures the kernel as QEMU patched
    /// its setup header (TDVF before edk2-stable202505; the initrd's place in it depends
    /// on the memory). Without it the kernel is measured as it is.
    #[arg(long, requires = "kernel")]
    pub patched_setup_header_memory_mib: Option<u64>,
}

#[derive(Args)]
pub struct SnpArgs {
    /// The firmware image (OVMF.fd with SEV metadata).
    #[arg(long)]
    pub ovmf: PathBuf,
    /// Kernel for direct boot; its hash, the initrd's and the command line's are measured.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    pub append: Option<String>,
    #[arg(long)]
    pub vcpus: u32,
    /// QEMU's CPU model name (EPYC, EPYC-Milan, EPYC-Genoa...).
    #[arg(long, value_parser = parse_vcpu_type)]
    pub vcpu_type: Option<String>,
    /// The CPUID signature itself (e.g. 0xa00f11).
    #[arg(long, value_parser = parse_int)]
    pub vcpu_sig: Option<u64>,
    #[arg(long, requires_all = ["vcpu_model", "vcpu_stepping"])]
    pub vcpu_family: Option<u32>,
    #[arg(long)]
    pub vcpu_model: Option<u32>,
    #[arg(long)]
    pub vcpu_stepping: Option<u32>,
    /// The VMSA's SEV_FEATURES.
    #[arg(long, value_parser = parse_int, default_value = "0x1")]
    pub guest_features: u64,
    #[arg(long, value_parser = parse_vmm, default_value = "qemu")]
    pub vmm_type: VmmType,
    #[arg(long, value_enum, default_value_t = OutputFormat::Hex)]
    pub output_format: OutputFormat,
    /// The firmware pages' digest, precomputed (`cocoon measure snp-ovmf-hash`).
    #[arg(long)]
    pub snp_ovmf_hash: Option<String>,
}

#[cfg(feature = "verify")]
#[derive(Args)]
pub struct SnpIdBlockArgs {
    #[command(flatten)]
    pub launch: SnpArgs,
    /// The ID key: an EC P-384 private key, PEM (`openssl ecparam -name secp384r1
    /// -genkey -noout`, or PKCS#8).
    #[arg(long)]
    pub id_key: PathBuf,
    /// An author key signing the ID key (the same format).
    #[arg(long)]
    pub author_key: Option<PathBuf>,
    /// FAMILY_ID, 16 bytes in hex (zeros by default).
    #[arg(long, value_parser = parse_id, default_value = "00000000000000000000000000000000")]
    pub family_id: [u8; 16],
    /// IMAGE_ID, 16 bytes in hex (zeros by default).
    #[arg(long, value_parser = parse_id, default_value = "00000000000000000000000000000000")]
    pub image_id: [u8; 16],
    #[arg(long, default_value_t = 0)]
    pub guest_svn: u32,
    /// The guest policy the launch will have (Cocoon's default: 0x30000).
    #[arg(long, value_parser = parse_int, default_value = "0x30000")]
    pub policy: u64,
}

#[cfg(feature = "verify")]
fn parse_id(s: &str) -> Result<[u8; 16], String> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{s:?} is not 16 bytes in hex"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Hex,
    Base64,
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Firmware(PathBuf, #[source] OvmfError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("the vCPU signature is missing: give --vcpu-type, --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping")]
    NoSignature,
    #[error("{0}")]
    InitData(PathBuf, #[source] crate::initdata::InitDataError),
    #[error("{0}")]
    Tdvf(PathBuf, #[source] crate::tdx::tdvf::TdvfError),
    #[error("{0}")]
    Kernel(PathBuf, #[source] crate::tdx::rtmr::RtmrError),
    #[cfg(feature = "verify")]
    #[error(transparent)]
    IdBlock(#[from] crate::snp::idblock::IdBlockError),
    #[error("--snp-ovmf-hash must be 96 hex digits (a SHA-384)")]
    Seed,
}

/// Runs a measure command; returns the line to print.
pub fn run(cmd: &MeasureCmd) -> Result<String, MeasureError> {
    match cmd {
        MeasureCmd::Snp(args) => snp(args),
        MeasureCmd::Tdx(args) => tdx(args),
        #[cfg(feature = "verify")]
        MeasureCmd::SnpIdBlock(args) => snp_id_block(args),
        MeasureCmd::SnpOvmfHash { ovmf } => Ok(hex::encode(firmware_digest(&firmware(ovmf)?))),
        MeasureCmd::InitData { file, tee } => {
            let d = crate::initdata::InitData::parse(&read(file)?)
                .map_err(|e| MeasureError::InitData(file.clone(), e))?;
            Ok(match tee.as_str() {
                "snp" => hex::encode(d.host_data()),
                _ => hex::encode(d.mr_config_id()),
            })
        }
    }
}

/// MRTD alone, or with a direct boot's kernel the `MRTD:`, `RTMR1:`, `RTMR2:` lines.
fn tdx(args: &TdxArgs) -> Result<String, MeasureError> {
    use crate::tdx::rtmr;
    let fw = crate::tdx::tdvf::Tdvf::parse(read(&args.ovmf)?)
        .map_err(|e| MeasureError::Tdvf(args.ovmf.clone(), e))?;
    let mrtd = hex::encode(fw.mrtd());
    let (Some(kernel), Some(initrd), Some(append)) = (&args.kernel, &args.initrd, &args.append)
    else {
        return Ok(mrtd);
    };
    let initrd_bytes = read(initrd)?;
    let how = match args.patched_setup_header_memory_mib {
        Some(mib) => rtmr::Kernel::Patched { memory: mib << 20 },
        None => rtmr::Kernel::AsIs,
    };
    let rtmr1 = rtmr::rtmr1(&read(kernel)?, initrd_bytes.len(), how)
        .map_err(|e| MeasureError::Kernel(kernel.clone(), e))?;
    let rtmr2 =
        rtmr::rtmr2(append, &initrd_bytes).map_err(|e| MeasureError::Kernel(initrd.clone(), e))?;
    Ok(format!(
        "MRTD: {mrtd}\nRTMR1: {}\nRTMR2: {}",
        hex::encode(rtmr1),
        hex::encode(rtmr2)
    ))
}

fn read(path: &Path) -> Result<Vec<u8>, MeasureError> {
    std::fs::read(path).map_err(|e| MeasureError::Read(path.to_path_buf(), e))
}

fn firmware(path: &Path) -> Result<Ovmf, MeasureError> {
    Ovmf::parse(read(path)?).map_err(|e| MeasureError::Firmware(path.to_path_buf(), e))
}

/// The ID block lines for `args` (`MeasureCmd::SnpIdBlock`).
#[cfg(feature = "verify")]
fn snp_id_block(args: &SnpIdBlockArgs) -> Result<String, MeasureError> {
    use crate::snp::idblock::{id_auth, key_digest, signing_key, IdBlock};
    let key = |path: &PathBuf| -> Result<_, MeasureError> {
        let pem = String::from_utf8_lossy(&read(path)?).into_owned();
        Ok(signing_key(&pem, &path.display().to_string())?)
    };
    let id_key = key(&args.id_key)?;
    let author_key = args.author_key.as_ref().map(key).transpose()?;
    let block = IdBlock {
        launch_digest: snp_digest(&args.launch)?,
        family_id: args.family_id,
        image_id: args.image_id,
        guest_svn: args.guest_svn,
        policy: args.policy,
    };
    let auth = id_auth(&block, &id_key, author_key.as_ref());
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut out = format!(
        "id-block: {}\nid-auth: {}\nid-key-digest: {}",
        b64(&block.to_bytes()),
        b64(&auth),
        hex::encode(key_digest(id_key.verifying_key()))
    );
    if let Some(a) = &author_key {
        out.push_str(&format!(
            "\nauthor-key-digest: {}",
            hex::encode(key_digest(a.verifying_key()))
        ));
    }
    Ok(out)
}

/// The SNP digest for `args`.
pub fn snp(args: &SnpArgs) -> Result<String, MeasureError> {
    let ld = snp_digest(args)?;
    Ok(match args.output_format {
        OutputFormat::Hex => hex::encode(ld),
        OutputFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(ld),
    })
}

/// The SNP launch digest for `args`, as bytes.
fn snp_digest(args: &SnpArgs) -> Result<[u8; 48], MeasureError> {
    let fw = firmware(&args.ovmf)?;
    let hashes = match &args.kernel {
        Some(k) => {
            let initrd = args.initrd.as_deref().map(read).transpose()?;
            Some(SevHashes::new(
                &read(k)?,
                initrd.as_deref(),
                args.append.as_deref().map(str::as_bytes),
            ))
        }
        None => None,
    };
    let plan = LaunchPlan::build(&LaunchInputs {
        firmware: &fw,
        hashes,
        vcpus: args.vcpus,
        vcpu_sig: signature(args)?,
        guest_features: args.guest_features,
        vmm: args.vmm_type,
    })?;
    let ld = match &args.snp_ovmf_hash {
        Some(h) => {
            let seed = hex::decode(h.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(MeasureError::Seed)?;
            plan.digest_from_firmware(seed)
        }
        None => plan.digest(),
    };
    Ok(ld)
}

/// The vCPU signature, by the reference's precedence: family/model/stepping, then the
/// signature, then the type. A zero family or signature counts as not given. GCE and
/// EC2 do not use it (RDX is fixed there).
fn signature(args: &SnpArgs) -> Result<u64, MeasureError> {
    if let (Some(f), Some(m), Some(s)) = (args.vcpu_family, args.vcpu_model, args.vcpu_stepping) {
        if f != 0 {
            return Ok(cpu_sig(f, m, s));
        }
    }
    if let Some(sig) = args.vcpu_sig.filter(|s| *s != 0) {
        return Ok(sig);
    }
    if let Some(t) = &args.vcpu_type {
        return Ok(cpu_type_sig(t).expect("checked when parsed"));
    }
    match args.vmm_type {
        VmmType::Qemu => Err(MeasureError::NoSignature),
        VmmType::Gce | VmmType::Ec2 => Ok(0),
    }
}

fn parse_vcpu_type(s: &str) -> Result<String, String> {
    match cpu_type_sig(s) {
        Some(_) => Ok(s.to_owned()),
        None => Err(format!(
            "unknown vCPU type; one of: {}",
            CPU_TYPES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn parse_vmm(s: &str) -> Result<VmmType, String> {
    match s.to_ascii_lowercase().as_str() {
        "qemu" => Ok(VmmType::Qemu),
        "gce" => Ok(VmmType::Gce),
        "ec2" => Ok(VmmType::Ec2),
        _ => Err("one of qemu, gce, ec2".into()),
    }
}

/// An unsigned integer as Python's `int(s, 0)` reads one: decimal, or 0x, 0o, 0b
/// prefixed, with `_` between digits.
pub fn parse_int(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, radix) = if let Some(r) = t.strip_prefix("0x") {
        (r, 16)
    } else if let Some(r) = t.strip_prefix("0o") {
        (r, 8)
    } else if let Some(r) = t.strip_prefix("0b") {
        (r, 2)
    } else {
        if t.len() > 1 && t.starts_with('0') && t.bytes().any(|b| b != b'0' && b != b'_') {
            return Err(format!("{s:?}: a decimal number cannot start with 0"));
        }
        (t.as_str(), 10)
    };
    let digits = digits.strip_prefix('_').unwrap_or(digits);
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return Err(format!("{s:?} is not a number"));
    }
    u64::from_str_radix(&digits.replace('_', ""), radix)
        .map_err(|e| format!("{s:?} is not a 64-bit unsigned number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_read_like_pythons() {
        assert_eq!(parse_int("0x1"), Ok(1));
        assert_eq!(parse_int("0X_ff"), Ok(255));
        assert_eq!(parse_int("10"), Ok(10));
        assert_eq!(parse_int("0"), Ok(0));
        assert_eq!(parse_int("0b101"), Ok(5));
        assert_eq!(parse_int("1_000"), Ok(1000));
        assert!(parse_int("010").is_err());
        assert!(parse_int("0x").is_err());
        assert!(parse_int("-1").is_err());
        assert!(parse_int("1__0").is_err());
        assert!(parse_int("0x1_0000_0000_0000_0000").is_err());
    }
}
