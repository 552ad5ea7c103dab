//! Positional reads, the one interface through which disk images are read.

use std::fs::File;
use std::io;

/// A random-access byte source: a file, a vault snapshot, an NBD export.
///
/// `read_at` may return fewer bytes than asked only at the end of the source.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Size of the source in bytes.
    fn size(&self) -> io::Result<u64>;

    /// The parts of `[offset, offset + len)` that may hold data, sorted; everything else reads
    /// as zeros (holes of a sparse file). `None` when the source cannot tell.
    fn data_ranges(&self, _offset: u64, _len: u64) -> Option<Vec<crate::Extent>> {
        None
    }

    /// Hints that `[offset, offset + len)` will be read soon (lets the kernel read ahead in
    /// parallel). The default does nothing.
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// Hints that reads from now on are scattered: no read-ahead beyond what is read or
    /// prefetched. The default does nothing.
    fn expect_scattered_reads(&self) {}

    /// Fills `buf` completely or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, offset)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read at offset {offset}"),
                ));
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match std::os::unix::fs::FileExt::read_at(self, buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(
            self,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
    }

    fn expect_scattered_reads(&self) {
        let _ = rustix::fs::fadvise(self, 0, None, rustix::fs::Advice::Random);
    }

    fn data_ranges(&self, offset: u64, len: u64) -> Option<Vec<crate::Extent>> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.checked_add(len)?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(self, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break, // no data after pos
                Err(_) => return None,                 // no SEEK_DATA support: unknown
            };
            if data >= end {
                break;
            }
            let hole = seek(self, SeekFrom::Hole(data)).ok()?.min(end);
            if hole <= data {
                return None;
            }
            out.push(crate::Extent::new(data, hole - data));
            pos = hole;
        }
        Some(out)
    }

    fn size(&self) -> io::Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let md = self.metadata()?;
        if md.file_type().is_block_device() {
            // Block devices report 0 in metadata; seek to the end instead.
            use std::io::Seek;
            let mut f = self.try_clone()?;
            return f.seek(io::SeekFrom::End(0));
        }
        Ok(md.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> Option<Vec<crate::Extent>> {
        (**self).data_ranges(offset, len)
    }

    fn prefetch(&self, offset: u64, len: u64) {
        (**self).prefetch(offset, len)
    }

    fn expect_scattered_reads(&self) {
        (**self).expect_scattered_reads()
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_reports_its_data_ranges() {
        let dir = std::env::temp_dir().join(format!("cairn-types-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sparse");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 8192], 1 << 20).unwrap();
        let r = f.data_ranges(0, 8 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
        if let Some(r) = r {
            // File systems may round to their allocation unit, but must cover the data.
            assert!(
                r.iter()
                    .any(|e| e.offset <= 1 << 20 && e.end() >= (1 << 20) + 8192),
                "{r:?}"
            );
            assert!(r.iter().map(|e| e.len).sum::<u64>() < 8 << 20);
        }
    }
}
