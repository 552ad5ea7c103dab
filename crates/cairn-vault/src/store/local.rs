//! The local directory store: one file per object.
//!
//! Durability: `put` writes `<key>.tmp-<random>`, fsyncs it, renames it over the key and fsyncs
//! the directory; only then does it return. Temporary files left by a crash are ignored by
//! `list` and removed by [`LocalStore::clean_temporaries`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Capabilities, Key, ObjectMeta, ObjectStore, StoreError, StoreErrorKind};

const TMP_MARK: &str = ".tmp-";

/// An object store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (and creates, if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| StoreError::io(&root.display().to_string(), "create directory", e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Removes temporary files left by interrupted writes, last modified at least `min_age`
    /// ago (a write in progress is younger). Returns how many were removed.
    pub fn clean_temporaries(&self, min_age: std::time::Duration) -> io::Result<usize> {
        let mut n = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for ent in fs::read_dir(&dir)? {
                let ent = ent?;
                let ft = ent.file_type()?;
                if ft.is_dir() {
                    stack.push(ent.path());
                } else if ent.file_name().to_string_lossy().contains(TMP_MARK) {
                    let age = ent.metadata()?.modified()?.elapsed().unwrap_or_default();
                    if age >= min_age {
                        fs::remove_file(ent.path())?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    fn write_tmp(&self, key: &Key, data: &[u8]) -> Result<(PathBuf, PathBuf), StoreError> {
        let path = self.path(key);
        let dir = path.parent().expect("keys have a parent").to_path_buf();
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(key.as_str(), "create directory", e))?;
        let tmp = dir.join(format!(
            "{}{TMP_MARK}{:016x}",
            path.file_name().expect("file name").to_string_lossy(),
            rand::random::<u64>()
        ));
        let res = (|| {
            // Large objects bypass the page cache where the file system allows it.
            let direct = if data.len() >= super::direct::DIRECT_MIN {
                super::direct::create_with(&tmp, data)?
            } else {
                None
            };
            let f = match direct {
                Some(f) => f,
                None => {
                    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                    f.write_all(data)?;
                    f
                }
            };
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(key.as_str(), "write", e));
        }
        Ok((tmp, path))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ObjectStore for LocalStore {
    fn put(&self, key: &Key, data: &[u8]) -> Result<(), StoreError> {
        let (tmp, path) = self.write_tmp(key, data)?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StoreError::io(key.as_str(), "rename", e)
        })?;
        sync_dir(path.parent().expect("parent"))
            .map_err(|e| StoreError::io(key.as_str(), "fsync directory", e))
    }

    fn put_new(&self, key: &Key, data: &[u8]) -> Result<(), StoreError> {
        let (tmp, path) = self.write_tmp(key, data)?;
        // link(2) fails if the target exists: an atomic create-if-absent.
        let r = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        r.map_err(|e| StoreError::io(key.as_str(), "create", e))?;
        sync_dir(path.parent().expect("parent"))
            .map_err(|e| StoreError::io(key.as_str(), "fsync directory", e))
    }

    fn get(&self, key: &Key) -> Result<Vec<u8>, StoreError> {
        fs::read(self.path(key)).map_err(|e| StoreError::io(key.as_str(), "read", e))
    }

    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let f = File::open(self.path(key)).map_err(|e| StoreError::io(key.as_str(), "open", e))?;
        let mut buf = vec![
            0u8;
            usize::try_from(len).map_err(|_| StoreError::new(
                StoreErrorKind::Other,
                key.as_str(),
                "range too large"
            ))?
        ];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::new(
                    StoreErrorKind::Other,
                    key.as_str(),
                    format!("range {offset}+{len} past the end (truncated object?)"),
                )
            } else {
                StoreError::io(key.as_str(), "read", e)
            }
        })?;
        Ok(buf)
    }

    fn size(&self, key: &Key) -> Result<u64, StoreError> {
        fs::metadata(self.path(key))
            .map(|m| m.len())
            .map_err(|e| StoreError::io(key.as_str(), "stat", e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out = Vec::new();
        let start = self.root.join(prefix.trim_end_matches('/'));
        let base = if start.is_dir() {
            start
        } else {
            return Ok(out);
        };
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(prefix, "list", e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| StoreError::io(prefix, "list", e))?;
                let ft = ent
                    .file_type()
                    .map_err(|e| StoreError::io(prefix, "list", e))?;
                let p = ent.path();
                if ft.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.contains(TMP_MARK) {
                    continue;
                }
                let rel = p
                    .strip_prefix(&self.root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned();
                if let Ok(key) = Key::new(rel) {
                    let meta = ent.metadata().ok();
                    let size = meta.as_ref().map_or(0, |m| m.len());
                    let modified = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    out.push(ObjectMeta {
                        key,
                        size,
                        modified,
                    });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &Key) -> Result<(), StoreError> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(key.as_str(), "delete", e)),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exclusive_create: true,
            local: true,
        }
    }

    fn remove_leftovers(&self, min_age: std::time::Duration) -> Result<usize, StoreError> {
        self.clean_temporaries(min_age)
            .map_err(|e| StoreError::io(&self.root.display().to_string(), "remove temporaries", e))
    }

    /// The file system's immutable attribute (`chattr +i`): neither root nor anyone else can
    /// change, rename or delete the file until it is lifted. Needs `CAP_LINUX_IMMUTABLE`
    /// (root) and a file system that has the attribute (ext4, XFS, btrfs); elsewhere `false`.
    fn protect(&self, key: &Key, _until: u64) -> Result<bool, StoreError> {
        set_immutable(&self.path(key), true).map_err(|e| StoreError::io(key.as_str(), "protect", e))
    }

    fn release(&self, key: &Key) -> Result<(), StoreError> {
        match set_immutable(&self.path(key), false) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(key.as_str(), "release", e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// Sets or clears the immutable attribute of `path`; `Ok(false)` where the caller or the file
/// system cannot.
fn set_immutable(path: &Path, on: bool) -> io::Result<bool> {
    use rustix::fs::IFlags;
    let f = File::open(path)?;
    let flags = match rustix::fs::ioctl_getflags(&f) {
        Ok(f) => f,
        Err(e) if unsupported(e) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let want = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    if want == flags {
        return Ok(true);
    }
    match rustix::fs::ioctl_setflags(&f, want) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Errors that mean "no immutable attribute here": not privileged, or not this file system.
fn unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [
        Errno::PERM,
        Errno::ACCESS,
        Errno::NOTTY,
        Errno::OPNOTSUPP,
        Errno::INVAL,
    ]
    .contains(&e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path().join("store")).unwrap();
        crate::store::conformance::run(&s);
        // A crashed write leaves a temporary that list ignores and cleaning removes.
        std::fs::write(dir.path().join("store/a/x.tmp-0001"), b"half").unwrap();
        assert!(
            s.list("a")
                .unwrap()
                .iter()
                .all(|m| !m.key.as_str().contains(".tmp-"))
        );
        assert_eq!(s.clean_temporaries(std::time::Duration::ZERO).unwrap(), 1);
    }
}
