//! Container parsing (footer, trailer, records) must never panic on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cairn_chunk::container::parse(data);
    if data.len() >= 40 {
        let (_, tail) = data.split_at(data.len() - 40);
        let _ = cairn_chunk::container::parse_footer(tail, data.len() as u64);
    }
});
