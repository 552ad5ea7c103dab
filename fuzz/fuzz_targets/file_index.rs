//! The file index's files (manifest, path packs, record packs, listings, records) must never
//! panic on arbitrary bytes, sealed or as bare bodies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_fileindex::decode_any(data);
});
