//! Durable small-file writes: temp name, fsync, rename, fsync of the directory.
//!
//! After [`write_atomic`] (or [`write_atomic_from`]) returns, the file holds exactly the new
//! bytes, also across a crash; before it returns, the file holds either its old contents or
//! none. This is the workspace's one durable-write helper; other crates call it.

use std::io::{self, Read, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably (creating the parent directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_from(path, &mut &bytes[..]).map(|_| ())
}

/// Replaces `path` with everything `reader` yields, atomically and durably (creating the
/// parent directory); returns the number of bytes written. On error the temporary file is
/// removed and `path` is untouched.
pub fn write_atomic_from(path: &Path, reader: &mut dyn Read) -> io::Result<u64> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let n = io::copy(reader, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(n)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_contents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.json");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
