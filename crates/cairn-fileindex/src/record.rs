//! The file record and its compact binary encoding.
//!
//! A record describes one file of one volume as a backup saw it. Its encoding leaves out the
//! path (paths live in the path table), so two backups in which a file did not change produce
//! byte-identical encodings, and the record store keeps it once (keyed by BLAKE3 of the
//! encoding).
//!
//! Encoding (all integers varint, see [`crate::format`]):
//!
//! ```text
//! kind(u8) present(varint bit set) size
//! [mode] [uid] [gid] [mtime_ns zz] [atime_ns zz] [ctime_ns zz] [crtime_ns zz]
//! [nlink] [inode] [attributes] [link_target str] [security bytes]
//! extent_count { file_offset disk_offset length }*  [inline bytes]
//! [compressed_count { file_offset length disk_offset disk_length
//!                     algorithm(0 zlib, 1 zstd, 2 btrfs-lzo) [lzo sector] decompressed skip }*]
//! ```
//!
//! Optional fields appear only when their bit in `present` is set (bit order as listed).
//! A record is *tombstoned* by garbage collection: then it is the single byte
//! [`TOMBSTONE`], and no live listing refers to it.

use crate::error::DecodeError;
use crate::format::{
    MAX_EXTENTS, MAX_INLINE_LEN, MAX_LINK_LEN, MAX_NAME_LEN, MAX_PATH_LEN, MAX_SECURITY_LEN,
    Reader, Writer,
};

/// Byte that stands for a record removed by garbage collection.
pub const TOMBSTONE: u8 = 0xff;

pub use cairn_types::{CompressedExtent, Compression, FileExtent, FileKind};

/// The kind's byte in a record.
fn kind_to_u8(k: FileKind) -> u8 {
    match k {
        FileKind::File => 0,
        FileKind::Dir => 1,
        FileKind::Symlink => 2,
        FileKind::Other => 3,
    }
}

fn kind_from_u8(v: u8) -> Option<FileKind> {
    Some(match v {
        0 => FileKind::File,
        1 => FileKind::Dir,
        2 => FileKind::Symlink,
        3 => FileKind::Other,
        _ => return None,
    })
}

/// One file of a volume as a backup saw it.
///
/// `path` is absolute within its volume and `/`-separated (`/` is the volume root); it has no
/// empty, `.` or `..` components and no NUL. Times are nanoseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime_ns: Option<i64>,
    pub atime_ns: Option<i64>,
    pub ctime_ns: Option<i64>,
    pub crtime_ns: Option<i64>,
    pub nlink: Option<u64>,
    pub inode: Option<u64>,
    /// FAT/NTFS attribute bits.
    pub attributes: Option<u32>,
    pub link_target: Option<String>,
    /// POSIX ACL or NTFS security descriptor, opaque.
    pub security: Option<Vec<u8>>,
    pub extents: Vec<FileExtent>,
    /// Content of tiny files kept in the file system's metadata.
    pub inline: Option<Vec<u8>>,
    /// Data the file system stores compressed (btrfs), merged with `extents` in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compressed: Vec<CompressedExtent>,
}

impl FileRecord {
    /// A directory with nothing but a path (used for directories the input implied).
    pub fn dir(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            kind: FileKind::Dir,
            ..Self::default()
        }
    }

    /// The last path component (`""` for the root).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// Checks a volume-relative path and returns its components (none for `/`).
pub fn split_path(path: &str) -> Result<Vec<&str>, String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} is not absolute"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!(
            "path of {} bytes exceeds {MAX_PATH_LEN}",
            path.len()
        ));
    }
    if path == "/" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for c in path[1..].split('/') {
        if c.is_empty() || c == "." || c == ".." || c.contains('\0') || c.len() > MAX_NAME_LEN {
            return Err(format!("path {path:?} has an invalid component {c:?}"));
        }
        out.push(c);
    }
    Ok(out)
}

/// Encodes everything but the path. Fails if a field exceeds its limit.
pub fn encode(r: &FileRecord, w: &mut Writer) -> Result<(), String> {
    if r.link_target
        .as_ref()
        .is_some_and(|l| l.len() > MAX_LINK_LEN)
    {
        return Err(format!(
            "{}: link target exceeds {MAX_LINK_LEN} bytes",
            r.path
        ));
    }
    if r.security
        .as_ref()
        .is_some_and(|s| s.len() > MAX_SECURITY_LEN)
    {
        return Err(format!(
            "{}: security data exceeds {MAX_SECURITY_LEN} bytes",
            r.path
        ));
    }
    if r.inline.as_ref().is_some_and(|s| s.len() > MAX_INLINE_LEN) {
        return Err(format!(
            "{}: inline data exceeds {MAX_INLINE_LEN} bytes",
            r.path
        ));
    }
    if r.extents.len() > MAX_EXTENTS || r.compressed.len() > MAX_EXTENTS {
        return Err(format!("{}: more than {MAX_EXTENTS} extents", r.path));
    }
    w.buf.push(kind_to_u8(r.kind));
    let flags = [
        r.mode.is_some(),
        r.uid.is_some(),
        r.gid.is_some(),
        r.mtime_ns.is_some(),
        r.atime_ns.is_some(),
        r.ctime_ns.is_some(),
        r.crtime_ns.is_some(),
        r.nlink.is_some(),
        r.inode.is_some(),
        r.attributes.is_some(),
        r.link_target.is_some(),
        r.security.is_some(),
        r.inline.is_some(),
        !r.compressed.is_empty(),
    ];
    let present = flags
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, &f)| acc | (u64::from(f) << i));
    w.u64(present);
    w.u64(r.size);
    for v in [r.mode, r.uid, r.gid].into_iter().flatten() {
        w.u64(u64::from(v));
    }
    for v in [r.mtime_ns, r.atime_ns, r.ctime_ns, r.crtime_ns]
        .into_iter()
        .flatten()
    {
        w.i64(v);
    }
    for v in [r.nlink, r.inode].into_iter().flatten() {
        w.u64(v);
    }
    if let Some(a) = r.attributes {
        w.u64(u64::from(a));
    }
    if let Some(l) = &r.link_target {
        w.str(l);
    }
    if let Some(s) = &r.security {
        w.bytes(s);
    }
    w.u64(r.extents.len() as u64);
    for e in &r.extents {
        w.u64(e.file_offset);
        w.u64(e.disk_offset);
        w.u64(e.length);
    }
    if let Some(i) = &r.inline {
        w.bytes(i);
    }
    if !r.compressed.is_empty() {
        w.u64(r.compressed.len() as u64);
        for c in &r.compressed {
            for v in [c.file_offset, c.length, c.disk_offset, c.disk_length] {
                w.u64(v);
            }
            match c.compression {
                Compression::Zlib => w.u64(0),
                Compression::Zstd => w.u64(1),
                Compression::BtrfsLzo { sector } => {
                    w.u64(2);
                    w.u64(u64::from(sector));
                }
            }
            w.u64(c.decompressed_len);
            w.u64(c.skip);
        }
    }
    Ok(())
}

/// The fields a search hit needs, decoded without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub kind: FileKind,
    pub size: u64,
    pub mtime_ns: Option<i64>,
}

const PRESENT_BITS: u32 = 14;

fn header(r: &mut Reader<'_>) -> Result<(FileKind, u64, u64), DecodeError> {
    let k = r.u8()?;
    if k == TOMBSTONE {
        return Err(r.err("record was removed by garbage collection"));
    }
    let kind = kind_from_u8(k).ok_or_else(|| r.err(format!("unknown file kind {k}")))?;
    let present = r.bounded((1 << PRESENT_BITS) - 1, "presence bits")?;
    let size = r.u64()?;
    Ok((kind, present, size))
}

fn u32_field(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    let v = r.u64()?;
    u32::try_from(v).map_err(|_| r.err("field exceeds u32"))
}

/// Decodes the summary fields of an encoded record.
pub fn decode_summary(data: &[u8]) -> Result<Summary, DecodeError> {
    let mut r = Reader::new(data, 0);
    let (kind, present, size) = header(&mut r)?;
    for bit in 0..3 {
        if present & (1 << bit) != 0 {
            u32_field(&mut r)?;
        }
    }
    let mtime_ns = if present & (1 << 3) != 0 {
        Some(r.i64()?)
    } else {
        None
    };
    Ok(Summary {
        kind,
        size,
        mtime_ns,
    })
}

/// Decodes an encoded record; `path` is filled in by the caller.
pub fn decode(data: &[u8], path: String) -> Result<FileRecord, DecodeError> {
    let mut r = Reader::new(data, 0);
    let (kind, present, size) = header(&mut r)?;
    let has = |bit: u32| present & (1 << bit) != 0;
    let mut rec = FileRecord {
        path,
        kind,
        size,
        ..FileRecord::default()
    };
    rec.mode = if has(0) {
        Some(u32_field(&mut r)?)
    } else {
        None
    };
    rec.uid = if has(1) {
        Some(u32_field(&mut r)?)
    } else {
        None
    };
    rec.gid = if has(2) {
        Some(u32_field(&mut r)?)
    } else {
        None
    };
    rec.mtime_ns = if has(3) { Some(r.i64()?) } else { None };
    rec.atime_ns = if has(4) { Some(r.i64()?) } else { None };
    rec.ctime_ns = if has(5) { Some(r.i64()?) } else { None };
    rec.crtime_ns = if has(6) { Some(r.i64()?) } else { None };
    rec.nlink = if has(7) { Some(r.u64()?) } else { None };
    rec.inode = if has(8) { Some(r.u64()?) } else { None };
    rec.attributes = if has(9) {
        Some(u32_field(&mut r)?)
    } else {
        None
    };
    if has(10) {
        rec.link_target = Some(r.str(MAX_LINK_LEN, "link target")?.to_string());
    }
    if has(11) {
        rec.security = Some(r.bytes(MAX_SECURITY_LEN, "security data")?.to_vec());
    }
    let n = r.bounded(MAX_EXTENTS as u64, "extent count")? as usize;
    // Each extent takes at least 3 bytes; refuse counts the remaining bytes cannot hold
    // before allocating.
    if n > data.len() / 3 {
        return Err(r.err("extent count exceeds the record"));
    }
    rec.extents.reserve_exact(n);
    for _ in 0..n {
        rec.extents.push(FileExtent {
            file_offset: r.u64()?,
            disk_offset: r.u64()?,
            length: r.u64()?,
        });
    }
    if has(12) {
        rec.inline = Some(r.bytes(MAX_INLINE_LEN, "inline data")?.to_vec());
    }
    if has(13) {
        let n = r.bounded(MAX_EXTENTS as u64, "compressed extent count")? as usize;
        if n > data.len() / 7 {
            return Err(r.err("compressed extent count exceeds the record"));
        }
        rec.compressed.reserve_exact(n);
        for _ in 0..n {
            let (file_offset, length, disk_offset, disk_length) =
                (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let compression = match r.u64()? {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                2 => Compression::BtrfsLzo {
                    sector: u32_field(&mut r)?,
                },
                a => return Err(r.err(format!("unknown compression {a}"))),
            };
            rec.compressed.push(CompressedExtent {
                file_offset,
                length,
                disk_offset,
                disk_length,
                compression,
                decompressed_len: r.u64()?,
                skip: r.u64()?,
            });
        }
    }
    if !r.is_empty() {
        return Err(r.err("trailing bytes after record"));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> FileRecord {
        FileRecord {
            path: "/etc/passwd".into(),
            kind: FileKind::Symlink,
            size: 1234,
            mode: Some(0o100644),
            uid: Some(0),
            gid: Some(u32::MAX),
            mtime_ns: Some(-5),
            atime_ns: Some(i64::MAX),
            ctime_ns: Some(i64::MIN),
            crtime_ns: Some(7),
            nlink: Some(2),
            inode: Some(u64::MAX),
            attributes: Some(0x20),
            link_target: Some("../x".into()),
            security: Some(vec![1, 2, 3]),
            extents: vec![FileExtent {
                file_offset: 0,
                disk_offset: 1 << 40,
                length: 4096,
            }],
            inline: Some(b"hi".to_vec()),
            compressed: [
                Compression::Zlib,
                Compression::Zstd,
                Compression::BtrfsLzo { sector: 4096 },
            ]
            .into_iter()
            .enumerate()
            .map(|(i, compression)| CompressedExtent {
                file_offset: 4096 * (i as u64 + 1),
                length: 4096,
                disk_offset: 1 << 30,
                disk_length: 700,
                compression,
                decompressed_len: 131072,
                skip: 8192,
            })
            .collect(),
        }
    }

    #[test]
    fn roundtrip_full_and_empty() {
        for rec in [full(), FileRecord::dir("/"), FileRecord::default()] {
            let mut w = Writer::default();
            encode(&rec, &mut w).unwrap();
            let back = decode(&w.buf, rec.path.clone()).unwrap();
            assert_eq!(back, rec);
            let s = decode_summary(&w.buf).unwrap();
            assert_eq!(
                (s.kind, s.size, s.mtime_ns),
                (rec.kind, rec.size, rec.mtime_ns)
            );
        }
    }

    #[test]
    fn truncated_and_trailing_bytes_fail() {
        let mut w = Writer::default();
        encode(&full(), &mut w).unwrap();
        for n in 0..w.buf.len() {
            assert!(decode(&w.buf[..n], String::new()).is_err(), "prefix {n}");
        }
        w.buf.push(0);
        assert!(decode(&w.buf, String::new()).is_err());
        assert!(decode(&[TOMBSTONE], String::new()).is_err());
    }

    #[test]
    fn paths_are_checked() {
        assert_eq!(split_path("/").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("/a/b").unwrap(), vec!["a", "b"]);
        for bad in ["", "a", "/a/", "//", "/a/../b", "/./a", "/a\0"] {
            assert!(split_path(bad).is_err(), "{bad:?}");
        }
    }
}
