//! Every on-disk magic number, version, fixed size and hard limit of the file index, in one
//! place, plus the framing shared by all its files.
//!
//! All fixed-width integers are little-endian. Variable-length integers are LEB128
//! (`varint`: 7 bits per byte, low bits first, at most 10 bytes for a `u64`); signed values
//! are zigzag-encoded first. Strings are a varint length followed by UTF-8 bytes.
//!
//! Every file is framed the same way:
//!
//! ```text
//! magic(8) version(u32) flags(u32)  body ...  checksum(16)
//! ```
//!
//! `checksum` is the first 16 bytes of BLAKE3 over everything before it. Record packs differ
//! only in that their body is a sequence of independently checksummed blocks followed by a
//! block table, so that one record can be read without reading the whole pack (see
//! [`crate::pack`]); their final 16 bytes checksum the header, table and footer.

use crate::error::DecodeError;

/// The manifest: the list of live files and backups. Replaced atomically on every commit.
pub const MANIFEST_MAGIC: [u8; 8] = *b"CFIMANI1";
/// A path pack: the names of new paths, appended by one `add_backup`.
pub const PATHS_MAGIC: [u8; 8] = *b"CFIPATH1";
/// A record pack: new file records, appended by one `add_backup`.
pub const RECORDS_MAGIC: [u8; 8] = *b"CFIRECS1";
/// Last 8 bytes of a record pack.
pub const RECORDS_END_MAGIC: [u8; 8] = *b"CFIRECND";
/// A listing: one backup's sorted (path id, record id) arrays, one per volume.
pub const LISTING_MAGIC: [u8; 8] = *b"CFILIST1";

/// Layout version of all files above. A reader refuses any other version.
pub const FORMAT_VERSION: u32 = 1;

/// `magic(8) version(4) flags(4)`.
pub const HEADER_LEN: usize = 16;
/// Truncated BLAKE3 checksum length.
pub const CHECKSUM_LEN: usize = 16;
/// One block-table entry of a record pack:
/// offset(u64) stored_len(u32) raw_len(u32) first_index(u32) count(u32) checksum(16).
pub const BLOCK_ENTRY_LEN: usize = 40;
/// Record-pack footer: table_offset(u64) first_id(u64) count(u32) blocks(u32)
/// checksum(16) end_magic(8).
pub const RECORDS_FOOTER_LEN: usize = 48;

const _: () = assert!(HEADER_LEN == 8 + 4 + 4);
const _: () = assert!(BLOCK_ENTRY_LEN == 8 + 4 + 4 + 4 + 4 + 16);
const _: () = assert!(RECORDS_FOOTER_LEN == 8 + 8 + 4 + 4 + 16 + 8);

/// A record-pack block is closed once its raw size reaches this.
pub const BLOCK_TARGET_RAW: usize = 64 << 10;
/// zstd level for every compressed section.
pub const ZSTD_LEVEL: i32 = 3;

// Hard limits, checked on write (as `Invalid`) and on read (as `Corrupt`).

/// Longest path (bytes) within a volume.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single path component (bytes); NTFS names reach 765 UTF-8 bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest disk or volume name.
pub const MAX_VOLUME_NAME_LEN: usize = 255;
/// Longest backup id or VM name.
pub const MAX_ID_LEN: usize = 1024;
/// Longest symlink target.
pub const MAX_LINK_LEN: usize = 4096;
/// Largest opaque security descriptor / ACL.
pub const MAX_SECURITY_LEN: usize = 64 << 10;
/// Largest inline content.
pub const MAX_INLINE_LEN: usize = 64 << 10;
/// Most extents of one file.
pub const MAX_EXTENTS: usize = 1 << 20;
/// Largest encoded record.
pub const MAX_RECORD_LEN: usize = 24 << 20;
/// Largest decompressed record-pack block (a block holds at least one record).
pub const MAX_BLOCK_RAW: usize = MAX_RECORD_LEN + (1 << 20);
/// Most records or paths in one pack, and most entries in one volume listing.
pub const MAX_PACK_ITEMS: u64 = 1 << 26;
/// Most blocks in one record pack.
pub const MAX_BLOCKS: u64 = 1 << 22;
/// Most volumes in one backup.
pub const MAX_VOLUMES: u64 = 4096;
/// Most backups in the index, and most packs of each kind.
pub const MAX_BACKUPS: u64 = 1 << 24;
/// Largest decompressed body of a manifest, path pack or listing.
pub const MAX_BODY_RAW: usize = 1 << 30;
/// Largest id of any kind in a file (ids are u32; `u32::MAX` is reserved).
pub const MAX_ID: u64 = u32::MAX as u64 - 1;
/// Path ids stay below this (the path table lives in memory: 2^28 paths is tens of GiB).
pub const MAX_PATH_IDS: u64 = 1 << 28;
/// Record ids stay below this (garbage collection keeps one flag per id).
pub const MAX_RECORD_IDS: u64 = 1 << 30;

/// BLAKE3 truncated to [`CHECKSUM_LEN`] bytes.
pub fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = blake3::hash(data);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&h.as_bytes()[..CHECKSUM_LEN]);
    out
}

/// The common header.
pub fn header(magic: [u8; 8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN);
    v.extend_from_slice(&magic);
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// Checks magic and version of a header.
pub fn check_header(data: &[u8], magic: [u8; 8]) -> Result<(), DecodeError> {
    if data.len() < HEADER_LEN {
        return Err(DecodeError::new(0, "shorter than the header"));
    }
    if data[..8] != magic {
        return Err(DecodeError::new(0, "bad magic"));
    }
    let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if version != FORMAT_VERSION {
        return Err(DecodeError::new(
            8,
            format!("unsupported version {version}"),
        ));
    }
    Ok(())
}

/// Frames a whole-file body: header, zstd-compressed body, checksum.
pub fn seal(magic: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = header(magic);
    let compressed = zstd::bulk::compress(body, ZSTD_LEVEL).expect("in-memory zstd compression");
    out.extend_from_slice(&compressed);
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    out
}

/// Verifies a framed file and returns its decompressed body.
pub fn unseal(data: &[u8], magic: [u8; 8]) -> Result<Vec<u8>, DecodeError> {
    check_header(data, magic)?;
    if data.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(DecodeError::new(0, "shorter than header and checksum"));
    }
    let (framed, sum) = data.split_at(data.len() - CHECKSUM_LEN);
    if checksum(framed) != sum {
        return Err(DecodeError::new(framed.len() as u64, "checksum mismatch"));
    }
    decompress(&framed[HEADER_LEN..], MAX_BODY_RAW, HEADER_LEN as u64)
}

/// Decompresses one zstd frame whose content must not exceed `limit` bytes.
pub fn decompress(data: &[u8], limit: usize, offset: u64) -> Result<Vec<u8>, DecodeError> {
    match zstd::bulk::Decompressor::upper_bound(data) {
        Some(n) if n > limit => {
            return Err(DecodeError::new(
                offset,
                format!("declares {n} decompressed bytes, limit {limit}"),
            ));
        }
        _ => {}
    }
    let mut out = Vec::new();
    let mut dec = zstd::stream::read::Decoder::new(data)
        .map_err(|e| DecodeError::new(offset, format!("zstd: {e}")))?;
    let mut limited = std::io::Read::take(&mut dec, limit as u64 + 1);
    std::io::Read::read_to_end(&mut limited, &mut out)
        .map_err(|e| DecodeError::new(offset, format!("zstd: {e}")))?;
    if out.len() > limit {
        return Err(DecodeError::new(
            offset,
            format!("decompresses beyond {limit} bytes"),
        ));
    }
    Ok(out)
}

/// Appends LEB128 varints, zigzag ints and length-prefixed strings.
#[derive(Default, Debug)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    pub fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// Reads what [`Writer`] wrote; every read is bounds-checked and reports its offset.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Added to `pos` in error offsets (position of `data` in its file).
    base: u64,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8], base: u64) -> Self {
        Self { data, pos: 0, base }
    }

    pub fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::new(self.base + self.pos as u64, reason)
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(self.err("varint overflows u64"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint too long"))
    }

    /// A varint that must be at most `max`.
    pub fn bounded(&mut self, max: u64, what: &str) -> Result<u64, DecodeError> {
        let v = self.u64()?;
        if v > max {
            return Err(self.err(format!("{what} {v} exceeds limit {max}")));
        }
        Ok(v)
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let n = self.bounded(max as u64, what)? as usize;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err(format!("{what} runs past the end")))?;
        let b = &self.data[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    pub fn str(&mut self, max: usize, what: &str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let b = self.bytes(max, what)?;
        std::str::from_utf8(b)
            .map_err(|_| DecodeError::new(self.base + start as u64, format!("{what} is not UTF-8")))
    }

    pub fn u32_bounded(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(self.bounded(MAX_ID, what)? as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_roundtrip() {
        let mut w = Writer::default();
        let vals = [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX];
        for v in vals {
            w.u64(v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            w.i64(v);
        }
        w.str("héllo");
        let mut r = Reader::new(&w.buf, 0);
        for v in vals {
            assert_eq!(r.u64().unwrap(), v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(r.i64().unwrap(), v);
        }
        assert_eq!(r.str(10, "s").unwrap(), "héllo");
        assert!(r.is_empty());
        assert!(r.u8().is_err());
    }

    #[test]
    fn bad_varints_and_frames() {
        assert!(Reader::new(&[0xff; 11], 0).u64().is_err());
        assert!(
            Reader::new(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                0
            )
            .u64()
            .is_err()
        );
        let sealed = seal(LISTING_MAGIC, b"body");
        assert_eq!(unseal(&sealed, LISTING_MAGIC).unwrap(), b"body");
        assert!(unseal(&sealed, PATHS_MAGIC).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(unseal(&bad, LISTING_MAGIC).is_err(), "flip at {i}");
        }
        assert!(unseal(&sealed[..sealed.len() - 1], LISTING_MAGIC).is_err());
    }
}
