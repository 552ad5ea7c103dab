//! The file index's files (manifest, path packs, record packs, listings, records) must never
//! panic on arbitrary bytes, sealed or as bare bodies; neither may search patterns.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cairn_fileindex::decode_any(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = cairn_fileindex::Pattern::new(text)
    {
        let _ = p.matches("/etc/ssh/sshd_config");
        let _ = p.matches(text);
        let p = p.case_insensitive();
        let _ = p.matches(&text.to_lowercase());
    }
});
