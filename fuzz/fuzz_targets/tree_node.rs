//! Recipe tree nodes and entry lists must never panic on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cairn_chunk::recipe::Node::decode(data);
    let _ = cairn_chunk::recipe::decode_entries(data);
});
