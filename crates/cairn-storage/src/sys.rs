//! The only module with `unsafe` code: three Linux calls the standard library lacks.
//!
//! | call | what for |
//! |---|---|
//! | `ioctl(FICLONE)` | a reflink clone: the destination shares every extent of the source |
//! | `ioctl(FS_IOC_FIEMAP)` | a file's extent map (logical → physical), synced first |
//! | `statfs` | the file-system type of a storage unit |
//!
//! Every kernel structure is declared here with its size asserted and is decoded field by field
//! with explicit native-endian reads, never through pointer casts. This module also owns the
//! ioctl numbers and FIEMAP flag values.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_FLAG_SYNC`: write dirty data back before mapping (delayed allocation and
/// copy-on-write forks otherwise hide recent writes).
const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// `sizeof(struct fiemap)` without the extents.
const FIEMAP_HEADER_LEN: usize = 32;
/// `sizeof(struct fiemap_extent)`.
const FIEMAP_EXTENT_LEN: usize = 56;
const _: () = assert!(FIEMAP_HEADER_LEN.is_multiple_of(8) && FIEMAP_EXTENT_LEN.is_multiple_of(8));
/// Extents asked for per call.
const FIEMAP_BATCH: usize = 512;
/// Hard limit on the extents of one file (a fragmented 64 GiB file has far fewer).
pub const FIEMAP_MAX_EXTENTS: usize = 4 << 20;

/// FIEMAP extent flags (`linux/fiemap.h`).
pub mod flags {
    pub const LAST: u32 = 0x1;
    pub const UNKNOWN: u32 = 0x2;
    pub const DELALLOC: u32 = 0x4;
    pub const ENCODED: u32 = 0x8;
    pub const DATA_ENCRYPTED: u32 = 0x80;
    pub const NOT_ALIGNED: u32 = 0x100;
    pub const DATA_INLINE: u32 = 0x200;
    pub const DATA_TAIL: u32 = 0x400;
    pub const UNWRITTEN: u32 = 0x800;
    pub const MERGED: u32 = 0x1000;
    pub const SHARED: u32 = 0x2000;
    /// Flags under which the physical address does not identify the data: such extents are
    /// always treated as changed.
    pub const UNSTABLE: u32 =
        UNKNOWN | DELALLOC | ENCODED | DATA_ENCRYPTED | NOT_ALIGNED | DATA_INLINE | DATA_TAIL;
}

pub use cairn_api::storage::PhysExtent;

/// Makes `dst` a reflink clone of `src` (both on the same file system).
pub fn ficlone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and reads no
    // memory of ours; both descriptors are open for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn word_at(buf: &[u64], byte: usize) -> u64 {
    buf[byte / 8]
}

fn u32_at(buf: &[u64], byte: usize) -> u32 {
    let w = buf[byte / 8].to_ne_bytes();
    let o = byte % 8;
    u32::from_ne_bytes([w[o], w[o + 1], w[o + 2], w[o + 3]])
}

/// The extent map of `file` (synced first). Holes are absent.
pub fn fiemap(file: &File) -> io::Result<Vec<PhysExtent>> {
    let words = (FIEMAP_HEADER_LEN + FIEMAP_BATCH * FIEMAP_EXTENT_LEN) / 8;
    let mut out: Vec<PhysExtent> = Vec::new();
    let mut start = 0u64;
    loop {
        // A u64 buffer keeps the structure 8-byte aligned.
        let mut buf = vec![0u64; words];
        buf[0] = start; // fm_start
        buf[1] = u64::MAX - start; // fm_length
        // fm_flags (low half of word 2) and fm_extent_count (low half of word 3), native order.
        let mut w2 = [0u8; 8];
        w2[..4].copy_from_slice(&FIEMAP_FLAG_SYNC.to_ne_bytes());
        buf[2] = u64::from_ne_bytes(w2);
        let mut w3 = [0u8; 8];
        w3[..4].copy_from_slice(&(FIEMAP_BATCH as u32).to_ne_bytes());
        buf[3] = u64::from_ne_bytes(w3);
        // SAFETY: `buf` is a writable, 8-byte aligned buffer of FIEMAP_HEADER_LEN +
        // FIEMAP_BATCH * FIEMAP_EXTENT_LEN bytes, and fm_extent_count tells the kernel it may
        // write at most FIEMAP_BATCH extents after the header; it lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = u32_at(&buf, 20) as usize; // fm_mapped_extents
        if mapped > FIEMAP_BATCH {
            return Err(io::Error::other(
                "FIEMAP returned more extents than asked for",
            ));
        }
        if mapped == 0 {
            return Ok(out);
        }
        let mut last = false;
        for i in 0..mapped {
            let b = FIEMAP_HEADER_LEN + i * FIEMAP_EXTENT_LEN;
            let e = PhysExtent {
                logical: word_at(&buf, b),
                physical: word_at(&buf, b + 8),
                len: word_at(&buf, b + 16),
                flags: u32_at(&buf, b + 40),
            };
            last |= e.flags & flags::LAST != 0;
            start = e.end();
            out.push(e);
        }
        if out.len() > FIEMAP_MAX_EXTENTS {
            return Err(io::Error::other(format!(
                "file has more than {FIEMAP_MAX_EXTENTS} extents"
            )));
        }
        if last {
            return Ok(out);
        }
    }
}

/// `statfs(path).f_type`, the file-system magic number (e.g. `0x58465342` for XFS).
pub fn fs_magic(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C structure.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs, both live across the
    // call; statfs writes only into `st`.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fiemap_of_a_written_file_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        drop(f);
        let f = File::open(&p).unwrap();
        let m = fiemap(&f).unwrap();
        let total: u64 = m.iter().map(|e| e.len).sum();
        assert_eq!(total, 1 << 20, "{m:?}");
        assert!(fs_magic(dir.path()).unwrap() != 0);
    }
}
