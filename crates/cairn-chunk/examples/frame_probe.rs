//! Measures stored bytes and compression time of an image's segments when consecutive
//! segments are compressed together in frames of a given size (research helper).
//!   cargo run --release -p cairn-chunk --example frame_probe -- IMAGE
use std::time::Instant;

use cairn_chunk::{Chunker, ChunkerParams, fingerprint, is_zero};

fn main() {
    let path = std::env::args().nth(1).expect("IMAGE");
    let data = std::fs::read(&path).expect("read image");
    let chunker = Chunker::new(ChunkerParams::parse("cdc:2k,8k,32k").unwrap());
    let cuts = chunker.cuts(&data);
    let mut segs = Vec::new();
    let mut pos = 0;
    let mut seen = std::collections::HashSet::new();
    for c in cuts {
        let s = &data[pos..pos + c];
        pos += c;
        if is_zero(s) || !seen.insert(fingerprint(s)) {
            continue;
        }
        segs.push(s);
    }
    let raw: usize = segs.iter().map(|s| s.len()).sum();
    println!("{} unique non-zero segments, {} bytes", segs.len(), raw);
    for level in [1, 2, 3] {
        for frame in [0usize, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20] {
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            let t = Instant::now();
            let mut stored = 0usize;
            let mut buf: Vec<u8> = Vec::new();
            let mut flush = |buf: &mut Vec<u8>, stored: &mut usize| {
                if buf.is_empty() {
                    return;
                }
                let out = c.compress(buf).unwrap();
                *stored += if out.len() + buf.len() / 32 < buf.len() {
                    out.len()
                } else {
                    buf.len()
                };
                buf.clear();
            };
            for s in &segs {
                buf.extend_from_slice(s);
                if buf.len() >= frame {
                    flush(&mut buf, &mut stored);
                }
            }
            flush(&mut buf, &mut stored);
            println!(
                "level {level} frame {:>7}: stored {:>6.1} MB in {:.2} s",
                frame,
                stored as f64 / 1e6,
                t.elapsed().as_secs_f64()
            );
        }
    }
}
