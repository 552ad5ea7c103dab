//! Container parsing (footer, trailer, frames and members) must never panic on arbitrary bytes.
//! The bytes are also wrapped as the trailer of a container with a valid footer and checksum,
//! so that the frame parser itself is reached, not only the checksum test.
#![no_main]
use cairn_chunk::format::{CONTAINER_MAGIC, CONTAINER_VERSION};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cairn_chunk::container::parse(data);
    if data.len() >= 40 {
        let (_, tail) = data.split_at(data.len() - 40);
        let _ = cairn_chunk::container::parse_footer(tail, data.len() as u64);
    }
    if data.len() >= 2 {
        // data[0]: frames claimed; data[1]: blob area in 64-byte units; the rest: trailer.
        let (frames, blob, trailer) = (u32::from(data[0]), usize::from(data[1]) * 64, &data[2..]);
        let mut c = CONTAINER_MAGIC.to_vec();
        c.resize(CONTAINER_MAGIC.len() + blob, 0xab);
        let at = c.len() as u64;
        cairn_chunk::container::append_trailer(&mut c, trailer, frames, CONTAINER_VERSION);
        if let Ok(recs) = cairn_chunk::container::parse(&c) {
            // Whatever parses must describe frames inside the blob area whose members add up.
            for r in &recs {
                assert!(r.offset >= 8 && r.offset + u64::from(r.stored_len) <= at);
                assert!(u64::from(r.inner) + u64::from(r.raw_len) <= u64::from(r.frame_len));
            }
        }
    }
});
