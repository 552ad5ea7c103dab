//! Feeds arbitrary server bytes through the transmission-phase reply path (framing, chunk
//! parsing, per-request validation and reassembly). The first byte picks whether structured
//! replies count as negotiated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((first, rest)) = data.split_first() {
        let _ = cairn_nbd::codec::simulate_replies(rest, first & 1 == 1);
    }
});
