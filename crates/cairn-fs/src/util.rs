//! Small shared pieces: bounded reads, little/big-endian field access, CRC-32, the entry
//! sink every walker reports through.

use std::ops::ControlFlow;

use cairn_types::ReadAt;

use crate::{Error, FileEntry, Limits, Result, WalkReport};

/// Reads exactly `buf.len()` bytes at `offset` of the image; a short read is `Corrupt`.
pub(crate) fn read_exact(
    r: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
    what: &dyn Fn() -> String,
) -> Result<()> {
    r.read_exact_at(buf, offset)
        .map_err(|e| Error::io(format!("{} at byte {offset}", what()), e))
}

/// Allocates a zeroed buffer of `len` bytes unless that exceeds `limits.max_alloc`.
pub(crate) fn alloc(len: u64, limits: &Limits, what: &str) -> Result<Vec<u8>> {
    match usize::try_from(len) {
        Ok(n) if n <= limits.max_alloc => Ok(vec![0u8; n]),
        _ => Err(Error::limit(format!(
            "{what}: {len} bytes exceeds max_alloc {}",
            limits.max_alloc
        ))),
    }
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
        .unwrap_or(0)
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

/// Decodes little-endian UTF-16 (unpaired surrogates become U+FFFD).
pub(crate) fn utf16le(b: &[u8]) -> String {
    let units = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// A GUID in its canonical text form (first three fields little-endian on disk).
pub(crate) fn guid(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, idx) in [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        .iter()
        .enumerate()
    {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{:02x}", b.get(*idx).copied().unwrap_or(0)));
    }
    s
}

/// The byte table of a reflected CRC-32 with polynomial `poly` (built at compile time).
const fn crc_table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)] // below 256
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses it.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// The CRC-32 register after `data`, from `crc` and without the final inversion (LVM2 seeds
/// it with its own initial value and stores the register as is).
pub(crate) fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = crc_table(0xEDB8_8320);
    let mut c = crc;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial and final value all ones),
/// as XFS v5 and btrfs metadata use it.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// The CRC-32C register after `data`, from `crc` (no inversions): slicing by 8, eight bytes
/// per step through eight tables built at compile time.
pub(crate) fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    const T: [[u32; 256]; 8] = {
        let mut t = [[0u32; 256]; 8];
        t[0] = crc_table(0x82F6_3B78);
        let mut s = 1;
        while s < 8 {
            let mut i = 0;
            while i < 256 {
                let prev = t[s - 1][i];
                t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                i += 1;
            }
            s += 1;
        }
        t
    };
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let one = crc ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let two = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        crc = T[7][(one & 0xff) as usize]
            ^ T[6][((one >> 8) & 0xff) as usize]
            ^ T[5][((one >> 16) & 0xff) as usize]
            ^ T[4][(one >> 24) as usize]
            ^ T[3][(two & 0xff) as usize]
            ^ T[2][((two >> 8) & 0xff) as usize]
            ^ T[1][((two >> 16) & 0xff) as usize]
            ^ T[0][(two >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = T[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Joins a directory path and an entry name, refusing names that would break the path
/// (empty, `.`, `..`, containing `/` or NUL) and paths over `max_path_len`.
pub(crate) fn join(parent: &str, name: &str, limits: &Limits) -> Result<String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Error::corrupt(format!("invalid name {name:?} in {parent}")));
    }
    let len = parent.len() + 1 + name.len();
    if len > limits.max_path_len {
        return Err(Error::limit(format!(
            "path of {len} bytes under {parent} exceeds max_path_len"
        )));
    }
    let mut p = String::with_capacity(len);
    p.push_str(parent);
    if !parent.ends_with('/') {
        p.push('/');
    }
    p.push_str(name);
    Ok(p)
}

/// Where walkers send entries: counts them, enforces `max_entries`, remembers a stop.
pub(crate) struct Sink<'a> {
    visitor: &'a mut dyn FnMut(FileEntry) -> ControlFlow<()>,
    pub(crate) limits: &'a Limits,
    pub(crate) report: WalkReport,
    /// When looking up one path: only its ancestors need to be listed.
    pub(crate) target: Option<String>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(
        visitor: &'a mut dyn FnMut(FileEntry) -> ControlFlow<()>,
        limits: &'a Limits,
    ) -> Self {
        Self {
            visitor,
            limits,
            report: WalkReport::default(),
            target: None,
        }
    }

    /// Whether the walk should list directory `dir`: always, unless it is looking up one
    /// path that does not lie below `dir`.
    pub(crate) fn descend(&self, dir: &str) -> bool {
        match &self.target {
            None => true,
            Some(t) => t.len() > dir.len() && t.starts_with(dir) && t.as_bytes()[dir.len()] == b'/',
        }
    }

    /// Hands one entry to the visitor; `Break` means the walk must end now.
    pub(crate) fn emit(&mut self, e: FileEntry) -> ControlFlow<()> {
        if self.report.entries >= self.limits.max_entries {
            let err = Error::limit(format!("more than max_entries {}", self.limits.max_entries));
            self.report.error(self.limits, &e.path, err);
            return ControlFlow::Break(());
        }
        self.report.entries += 1;
        if (self.visitor)(e).is_break() {
            self.report.stopped = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    pub(crate) fn error(&mut self, path: &str, e: Error) {
        self.report.error(self.limits, path, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_check_value_at_every_split() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let mut bytewise = !0u32;
        for b in &data {
            bytewise = crc32c_update(bytewise, std::slice::from_ref(b));
        }
        assert_eq!(!bytewise, crc32c(&data));
        for split in [0, 1, 7, 8, 9, 500, 999] {
            let c = crc32c_update(!0, &data[..split]);
            assert_eq!(!crc32c_update(c, &data[split..]), crc32c(&data));
        }
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guid_text_is_mixed_endian() {
        // The Linux filesystem data GUID as stored on disk.
        let raw = [
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ];
        assert_eq!(guid(&raw), "0fc63daf-8483-4772-8e79-3d69d8477de4");
    }

    #[test]
    fn join_refuses_bad_names() {
        let l = Limits::default();
        assert_eq!(join("/", "a", &l).unwrap(), "/a");
        assert_eq!(join("/a", "b", &l).unwrap(), "/a/b");
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(join("/", bad, &l).is_err(), "{bad:?}");
        }
    }
}
