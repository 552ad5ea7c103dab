//! LVM2 physical volumes: the label and headers as arbitrary bytes, or arbitrary text
//! metadata wrapped in a valid label and header (so the fuzzer reaches the metadata parser
//! and the logical-volume mapping), then a scan and a walk of every volume: never panic,
//! hang, allocate without bound or read outside the image.
#![no_main]

use std::ops::ControlFlow;

/// LVM2's CRC-32: reflected, seeded with 0xf597a6cf, no final inversion.
fn lvm_crc(data: &[u8]) -> u32 {
    let mut c: u32 = 0xf597_a6cf;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    c
}

/// A 4 MiB whole-disk PV whose current metadata is `text`.
fn wrapped(text: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 4 << 20];
    let text = &text[..text.len().min(64 << 10)];
    let label = 512;
    d[label..label + 8].copy_from_slice(b"LABELONE");
    d[label + 8..label + 16].copy_from_slice(&1u64.to_le_bytes());
    d[label + 20..label + 24].copy_from_slice(&32u32.to_le_bytes());
    d[label + 24..label + 32].copy_from_slice(b"LVM2 001");
    let pvh = label + 32;
    d[pvh..pvh + 32].copy_from_slice(&[b'A'; 32]);
    d[pvh + 32..pvh + 40].copy_from_slice(&(4u64 << 20).to_le_bytes());
    // Data area (1 MiB, 0), terminator, metadata area (4096, 1 MiB - 4096), terminator.
    let mut at = pvh + 40;
    for v in [1u64 << 20, 0, 0, 0, 4096, (1 << 20) - 4096, 0, 0] {
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
        at += 8;
    }
    let crc = lvm_crc(&d[label + 20..label + 512]);
    d[label + 16..label + 20].copy_from_slice(&crc.to_le_bytes());
    let mda = 4096;
    d[mda + 4..mda + 20].copy_from_slice(b" LVM2 x[5A%r0N*>");
    d[mda + 20..mda + 24].copy_from_slice(&1u32.to_le_bytes());
    d[mda + 24..mda + 32].copy_from_slice(&4096u64.to_le_bytes());
    d[mda + 32..mda + 40].copy_from_slice(&((1u64 << 20) - 4096).to_le_bytes());
    d[mda + 40..mda + 48].copy_from_slice(&512u64.to_le_bytes());
    d[mda + 48..mda + 56].copy_from_slice(&(text.len() as u64).to_le_bytes());
    d[mda + 56..mda + 60].copy_from_slice(&lvm_crc(text).to_le_bytes());
    let crc = lvm_crc(&d[mda + 4..mda + 512]);
    d[mda..mda + 4].copy_from_slice(&crc.to_le_bytes());
    d[mda + 512..mda + 512 + text.len()].copy_from_slice(text);
    d
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let image = if mode & 1 == 0 {
        let mut d = rest.to_vec();
        d.resize(d.len().max(1 << 20), 0);
        d
    } else {
        wrapped(rest)
    };
    let limits = cairn_fs::Limits {
        max_entries: 2_000,
        max_depth: 32,
        max_extents_per_file: 1_000,
        max_alloc: 4 << 20,
        max_partitions: 16,
        ..cairn_fs::Limits::default()
    };
    let Ok(layout) = cairn_fs::scan_with(&image, &limits) else {
        return;
    };
    for p in &layout.partitions {
        let _ = cairn_fs::walk(&image, p, &limits, |e| {
            let _ = cairn_fs::read_file(&image, &e, &limits);
            ControlFlow::Continue(())
        });
    }
});
