//! The vault protocol's binary frames must never panic on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cairn_vault::wire::decode_digests(data);
    let _ = cairn_vault::wire::decode_uploads(data);
    let n = data.first().copied().unwrap_or(0) as usize % 8;
    let _ = cairn_vault::wire::decode_download(data.get(1..).unwrap_or(&[]), n);
});
