//! File data stored compressed (btrfs zlib, zstd and LZO extents).
//!
//! A [`FileExtent`](crate::FileExtent) says "these file bytes are those disk bytes", which
//! compressed data cannot. Such data is listed in [`FileEntry::compressed`] instead: each
//! [`CompressedExtent`] names the compressed disk range (an image byte range, partition
//! offset included), the algorithm, the decompressed length the file system states, and
//! which part of the decompressed bytes the file uses. `copy_file` and `read_file` merge both
//! lists in file order; file systems without compression leave `compressed` empty and are
//! read exactly as before.
//!
//! Bounds: the stored and the decompressed length are at most
//! [`BTRFS_MAX_COMPRESSED`](crate::format::BTRFS_MAX_COMPRESSED) each, and data that
//! inflates past its stated decompressed length is an error.

use crate::format::{BTRFS_MAX_COMPRESSED, BTRFS_ZSTD_WINDOW_LOG_MAX};
pub use cairn_types::{CompressedExtent, Compression};

use crate::{Error, FileEntry, ReadAt, Result};

fn bounded(what: &str, n: u64) -> Result<usize> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n as u64 <= BTRFS_MAX_COMPRESSED)
        .ok_or_else(|| Error::limit(format!("{what}: {n} bytes of compressed extent")))
}

/// Decompresses `input` to at most `max` bytes.
pub(crate) fn decompress(c: Compression, input: &[u8], max: usize) -> Result<Vec<u8>> {
    let past = || Error::corrupt(format!("{c:?} data inflates past its stated {max} bytes"));
    match c {
        Compression::Zlib => miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(input, max)
            .map_err(|e| {
                if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput {
                    past()
                } else {
                    Error::corrupt(format!("zlib data: {:?}", e.status))
                }
            }),
        Compression::Zstd => {
            use std::io::Read;
            let zerr = |e: std::io::Error| Error::corrupt(format!("zstd data: {e}"));
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(zerr)?
                .single_frame();
            d.window_log_max(BTRFS_ZSTD_WINDOW_LOG_MAX).map_err(zerr)?;
            let mut out = Vec::new();
            d.take(max as u64 + 1).read_to_end(&mut out).map_err(zerr)?;
            if out.len() > max {
                return Err(past());
            }
            Ok(out)
        }
        Compression::BtrfsLzo { sector } => crate::btrfs::lzo::btrfs_lzo(input, sector, max),
    }
}

/// The file bytes `x` stands for: exactly `x.length` bytes.
pub(crate) fn read_extent(r: &dyn ReadAt, x: &CompressedExtent, path: &str) -> Result<Vec<u8>> {
    let disk_len = bounded(path, x.disk_length)?;
    let max = bounded(path, x.decompressed_len)?;
    if x.skip
        .checked_add(x.length)
        .is_none_or(|e| e > x.decompressed_len)
    {
        return Err(Error::corrupt(format!(
            "{path}: compressed extent {x:?} uses bytes past its decompressed length"
        )));
    }
    let mut input = vec![0u8; disk_len];
    crate::util::read_exact(r, &mut input, x.disk_offset, &|| {
        format!("compressed data of {path}")
    })?;
    let mut out = decompress(x.compression, &input, max)
        .map_err(|e| Error::new(e.kind, format!("{path}: {}", e.context)))?;
    out.resize(max, 0);
    // skip + length <= decompressed_len == out.len(), checked above.
    #[allow(clippy::cast_possible_truncation)]
    let (a, b) = (x.skip as usize, (x.skip + x.length) as usize);
    Ok(out[a..b].to_vec())
}

/// One run of a file in file order: plain bytes or compressed bytes.
pub(crate) enum Run<'a> {
    Plain(&'a crate::FileExtent),
    Compressed(&'a CompressedExtent),
}

impl Run<'_> {
    pub(crate) fn file_range(&self) -> (u64, u64) {
        match self {
            Run::Plain(x) => (x.file_offset, x.length),
            Run::Compressed(x) => (x.file_offset, x.length),
        }
    }
}

/// The extents and compressed extents of `e` merged in file order. Without compressed
/// extents the plain ones keep their listed order (`copy_file` refuses an unordered list).
pub(crate) fn runs(e: &FileEntry) -> Vec<Run<'_>> {
    let mut v: Vec<Run> = e.extents.iter().map(Run::Plain).collect();
    if !e.compressed.is_empty() {
        v.extend(e.compressed.iter().map(Run::Compressed));
        v.sort_by_key(|r| r.file_range().0);
    }
    v
}
