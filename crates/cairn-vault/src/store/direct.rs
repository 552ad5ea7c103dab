//! Direct (`O_DIRECT`) writes of large new files, for the local store.
//!
//! Why: a container is written once and read rarely (a restore, a verify). A buffered write
//! copies it into fresh page-cache pages, which costs CPU on the backup's critical path and
//! evicts what the host's guests and the source images had cached. On the project's micro-VM
//! the copy was the biggest single cost of an incremental (page-cache pages are new guest
//! memory, which the hypervisor backs only on first touch); see `docs/BENCHMARKS.md`.
//!
//! How: the data is copied into an aligned bounce buffer (kept for the next write: reused
//! memory is cheap, fresh memory is not), padded with zeros to a whole number of blocks,
//! written with `O_DIRECT`, and the file is cut back to its real length. A file system that
//! refuses direct I/O (tmpfs, some FUSE and network file systems) gets `Ok(false)` and nothing
//! left behind; the caller then writes the ordinary way. Durability is unchanged: the caller
//! still fsyncs (for the length and the device cache).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

/// Alignment of buffer address, file offset and length. 4 KiB covers every common logical
/// block size (512 B and 4 KiB sectors).
const ALIGN: usize = 4096;

/// Smaller objects (manifests, locks, small index runs) are written the ordinary way.
pub(super) const DIRECT_MIN: usize = 256 << 10;

/// Bounce buffers kept for reuse (one per concurrent writer is plenty).
const KEEP: usize = 2;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn take(len: usize) -> Vec<u8> {
    let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = match spare.iter().position(|b| b.capacity() >= len) {
        Some(i) => spare.swap_remove(i),
        None => spare.pop().unwrap_or_default(),
    };
    drop(spare);
    buf.resize(len, 0);
    buf
}

fn give_back(buf: Vec<u8>) {
    let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
    if spare.len() < KEEP {
        spare.push(buf);
    }
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Creates `path` (which must not exist) holding `data`, written with `O_DIRECT`. Returns the
/// open file, or `None` if this file system does not do direct I/O (then `path` does not
/// exist). On an error `path` may exist; the caller removes it.
pub(super) fn create_with(path: &Path, data: &[u8]) -> io::Result<Option<File>> {
    let f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if unsupported(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let padded = data.len().next_multiple_of(ALIGN);
    let mut raw = take(padded + ALIGN);
    let at = raw.as_ptr().align_offset(ALIGN);
    let window = &mut raw[at..at + padded];
    window[..data.len()].copy_from_slice(data);
    window[data.len()..].fill(0);
    let written = f.write_all_at(window, 0);
    give_back(raw);
    match written {
        Ok(()) => {}
        // Some file systems take the flag but not the alignment (or not this device's).
        Err(e) if unsupported(&e) => {
            drop(f);
            std::fs::remove_file(path)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    if padded != data.len() {
        f.set_len(data.len() as u64)?;
    }
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_exact_bytes_of_any_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [1usize, ALIGN - 1, ALIGN, ALIGN + 1, DIRECT_MIN + 12345] {
            let data: Vec<u8> = (0..len)
                .map(|i| u8::try_from((i * 7 + len) % 256).unwrap())
                .collect();
            let p = dir.path().join(format!("f{len}"));
            let f = create_with(&p, &data).unwrap();
            // tempdir may sit on tmpfs, which refuses O_DIRECT: then nothing is left behind.
            if f.is_none() {
                assert!(!p.exists());
                continue;
            }
            drop(f);
            assert_eq!(std::fs::read(&p).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"old").unwrap();
        assert!(create_with(&p, &[1u8; 10]).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
