//! Durable small-file writes: temp name, fsync, rename, fsync of the directory.
//!
//! After [`write_atomic`] (or [`write_atomic_from`], [`write_atomic_private`]) returns, the
//! file holds exactly the new bytes, also across a crash; before it returns, the file holds
//! either its old contents or none. A commit of several files at once writes each with
//! [`write_synced`] under a temporary name, renames them, then calls [`sync_dir`] once. This
//! is the workspace's one durable-write helper; other crates call it.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably (creating the parent directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_from(path, &mut &bytes[..]).map(|_| ())
}

/// As [`write_atomic`], for a file only its owner may read (mode 0600 from its creation:
/// keys, tokens).
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, &mut &bytes[..], 0o600).map(|_| ())
}

/// Replaces `path` with everything `reader` yields, atomically and durably (creating the
/// parent directory); returns the number of bytes written. On error the temporary file is
/// removed and `path` is untouched.
pub fn write_atomic_from(path: &Path, reader: &mut dyn Read) -> io::Result<u64> {
    write_atomic_mode(path, reader, 0o666)
}

/// Writes `bytes` to `path` (created or truncated) and fsyncs the file, not its directory:
/// one file of a commit that renames several, then calls [`sync_dir`].
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes the renames and creations in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn write_atomic_mode(path: &Path, reader: &mut dyn Read, mode: u32) -> io::Result<u64> {
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
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        let n = io::copy(reader, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)?;
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

    #[test]
    fn a_private_file_is_private_from_its_creation() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        super::write_atomic_private(&p, b"secret").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
    }
}
