//! The confidential crate's fuzz targets (`cocoon_confidential::fuzz`) on stable, seeded
//! with valid examples to mutate. `make fuzz` runs a million each.

use cocoon_confidential::fuzz::TARGETS;
use cocoon_confidential::kbs::jwe::{seal, TeeKey};

/// A small TDVF image: one measured section of one page and a HOB, the descriptor at
/// 0x100, the GUIDed table before the last 32 bytes.
fn tdvf_image() -> Vec<u8> {
    let mut d = vec![0u8; 8192];
    d[0x100..0x104].copy_from_slice(b"TDVF");
    for (at, v) in [(0x104, 80u32), (0x108, 1), (0x10c, 2)] {
        d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let sections: [(u32, u32, u64, u64, u32, u32); 2] = [
        (0x1000, 0x1000, 0xffff_f000, 0x1000, 0, 1),
        (0, 0, 0x80_0000, 0x1000, 2, 0),
    ];
    for (i, s) in sections.iter().enumerate() {
        let at = 0x110 + 32 * i;
        d[at..at + 4].copy_from_slice(&s.0.to_le_bytes());
        d[at + 4..at + 8].copy_from_slice(&s.1.to_le_bytes());
        d[at + 8..at + 16].copy_from_slice(&s.2.to_le_bytes());
        d[at + 16..at + 24].copy_from_slice(&s.3.to_le_bytes());
        d[at + 24..at + 28].copy_from_slice(&s.4.to_le_bytes());
        d[at + 28..at + 32].copy_from_slice(&s.5.to_le_bytes());
    }
    let guid = |s: &str| cocoon_confidential::snp::ovmf::guid(s);
    let (footer, entry) = (8192 - 32 - 18, 8192 - 32 - 18 - 22);
    d[entry..entry + 4].copy_from_slice(&(8192u32 - 0x100).to_le_bytes());
    d[entry + 4..entry + 6].copy_from_slice(&22u16.to_le_bytes());
    d[entry + 6..entry + 22].copy_from_slice(&guid("e47a6535-984a-4798-865e-4685a7bf8ec2"));
    d[footer..footer + 2].copy_from_slice(&40u16.to_le_bytes());
    d[footer + 2..footer + 18].copy_from_slice(&guid("96b582de-1fb2-45f7-baea-a366c55a082d"));
    cocoon_confidential::tdx::tdvf::Tdvf::parse(d.clone()).expect("the seed is valid TDVF");
    d
}

#[test]
fn fuzz_targets_survive_random_inputs() {
    let tdvf = tdvf_image();
    let sealed = seal(&TeeKey::generate().public(), b"secret").unwrap();
    let mut reply =
        b"HTTP/1.1 200 OK\r\nSet-Cookie: kbs-session-id=s1\r\nContent-Length: ".to_vec();
    reply.extend(format!("{}\r\n\r\n", sealed.len()).as_bytes());
    reply.extend(&sealed);
    let mut table = hex::decode("8d75da6364e66445adc5f4b93be8accd").unwrap();
    table.extend(48u32.to_le_bytes());
    table.extend(4u32.to_le_bytes());
    table.extend([0u8; 24]);
    table.extend(b"VCEK");
    let seeds: &[&[u8]] = &[
        &reply,
        &sealed,
        br#"{"nonce":"abc","extra-params":{"selected-hash-algorithm":"sha384"}}"#,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        &table,
        &tdvf,
    ];
    let iters = cocoon_nested::fuzzing::iterations();
    for (name, target) in TARGETS {
        cocoon_nested::fuzzing::run(name, *target, seeds, iters);
    }
}
