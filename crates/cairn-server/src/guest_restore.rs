//! Restore into the running guest: a file or a directory of a backup written into a running
//! VM through its guest agent — the third target beside a download and a datastore.
//!
//! ```text
//! server ── ReadFileRequest (one piece's extents) ──► storage agent ── vault segments
//!        ◄── the piece's bytes
//!        ── GuestFileWrite (piece, offset, last) ──► manager ──► host agent ──► guest agent
//! ```
//!
//! A file goes in pieces of [`GUEST_FILE_PIECE`] bytes, so neither the server nor the agents
//! hold a whole large file; the storage agent fetches only the segments under each piece. The
//! host agent writes each file beside its target and renames it into place with the last
//! piece, refusing an existing target unless `overwrite` is asked for (see
//! `cairn_hypervisor::qga::files`). File contents pass through the server as for a download
//! (counted in `server_file_restore_bytes`); disk images never do. Symbolic links and special
//! files are counted as skipped: the guest agent has no call that makes them.

use std::sync::atomic::Ordering;

use base64::Engine as _;
use cairn_api::host::{GUEST_FILE_PIECE, GuestFileWrite};
use cairn_api::manager::VmRunState;
use cairn_api::server::{FileRestoredIntoGuest, RestoreFileIntoGuest};
use cairn_api::storage::ReadFileRequest;
use cairn_api::storage::{FileEntry, FileExtent};
use cairn_fileindex::{FileKind, FileRecord};
use cairn_types::CompressedExtent;

use crate::files::{Found, index_err, to_entry};
use crate::{Result, Server, ServerError};
use cairn_api::server::BackupDisk;

/// `entry` cut to the bytes `[off, off + len)`, renumbered from 0.
fn piece(entry: &FileEntry, off: u64, len: u64) -> FileEntry {
    let end = off + len;
    let extents = entry
        .extents
        .iter()
        .filter_map(|x| {
            let s = x.file_offset.max(off);
            let e = (x.file_offset + x.length).min(end);
            (s < e).then(|| FileExtent {
                file_offset: s - off,
                disk_offset: x.disk_offset + (s - x.file_offset),
                length: e - s,
            })
        })
        .collect();
    // A compressed extent keeps its whole compressed range; only the part of its
    // decompressed bytes the piece uses moves.
    let compressed = entry
        .compressed
        .iter()
        .filter_map(|c| {
            let s = c.file_offset.max(off);
            let e = (c.file_offset + c.length).min(end);
            (s < e).then(|| CompressedExtent {
                file_offset: s - off,
                length: e - s,
                skip: c.skip + (s - c.file_offset),
                ..*c
            })
        })
        .collect();
    FileEntry {
        size: len,
        extents,
        compressed,
        inline_data: None,
        ..entry.clone()
    }
}

fn seconds(ns: Option<i64>) -> Option<i64> {
    ns.map(|t| t.div_euclid(1_000_000_000))
}

impl Server {
    /// Writes the file or directory at `r.path` of `r.backup` into the running VM `r.vm`
    /// (default: the backup's VM) at `r.dest`.
    pub fn files_restore_into_guest(
        &self,
        r: &RestoreFileIntoGuest,
    ) -> Result<FileRestoredIntoGuest> {
        if !r.dest.starts_with('/') {
            return Err(ServerError::Invalid(format!(
                "dest {:?}: an absolute path in the guest",
                r.dest
            )));
        }
        let Found {
            b,
            disk,
            volume,
            r: rec,
        } = self.find_file(&r.backup, &r.path)?;
        let vm = r.vm.clone().unwrap_or_else(|| b.vm.clone());
        let loc = self
            .manager
            .vm(&vm)
            .map_err(ServerError::call(format!("locate VM {vm}")))?;
        if loc.state != VmRunState::Running {
            return Err(ServerError::Conflict(format!(
                "VM {vm} is {}: restoring into the guest needs it running with its guest agent",
                loc.state
            )));
        }
        let (d, _) = self.disk_source(&b, &disk)?;
        let mut out = FileRestoredIntoGuest {
            vm: vm.clone(),
            dest: r.dest.clone(),
            files: 0,
            dirs: 0,
            skipped: 0,
            bytes: 0,
            vault_bytes_read: 0,
        };
        let dest = r.dest.trim_end_matches('/');
        let dest = if dest.is_empty() { "/" } else { dest };
        match rec.kind {
            FileKind::File => self.put_file(&vm, d, &rec, dest, r.overwrite, &mut out)?,
            FileKind::Dir => {
                let files = self.files()?;
                let base = rec.path.trim_end_matches('/').len();
                for item in files
                    .walk(&b.id, &disk, &volume, &rec.path)
                    .map_err(index_err)?
                {
                    let f = item.map_err(index_err)?;
                    let rel = f.path.get(base..).unwrap_or("").trim_start_matches('/');
                    let target = match (rel.is_empty(), dest) {
                        (true, _) => dest.to_string(),
                        (false, "/") => format!("/{rel}"),
                        (false, _) => format!("{dest}/{rel}"),
                    };
                    // Only the top directory may exist already; below it all is new.
                    let overwrite = r.overwrite || !rel.is_empty();
                    match f.kind {
                        FileKind::Dir => {
                            self.put(&vm, &dir_request(&f, &target, overwrite))?;
                            out.dirs += 1;
                        }
                        FileKind::File => {
                            self.put_file(&vm, d, &f, &target, r.overwrite, &mut out)?
                        }
                        _ => out.skipped += 1,
                    }
                }
            }
            _ => {
                return Err(ServerError::Invalid(format!(
                    "{} is not a file or directory",
                    r.path
                )));
            }
        }
        Ok(out)
    }

    fn put(&self, vm: &str, w: &GuestFileWrite) -> Result<()> {
        self.manager
            .write_guest_file(vm, w)
            .map_err(ServerError::call(format!("write {} in VM {vm}", w.path)))?;
        Ok(())
    }

    /// One regular file, piece by piece.
    fn put_file(
        &self,
        vm: &str,
        d: &BackupDisk,
        rec: &FileRecord,
        dest: &str,
        overwrite: bool,
        out: &mut FileRestoredIntoGuest,
    ) -> Result<()> {
        let c = self.storage_agent(&d.storage_agent)?;
        let entry = to_entry(rec);
        let size = rec.inline.as_ref().map_or(rec.size, |i| i.len() as u64);
        let step = GUEST_FILE_PIECE as u64;
        let mut off = 0;
        loop {
            let len = (size - off).min(step);
            let data = match &rec.inline {
                Some(inline) => inline[off as usize..(off + len) as usize].to_vec(),
                None if len == 0 => Vec::new(),
                None => {
                    let (data, stats) = c
                        .read_file(&ReadFileRequest {
                            vault: self.config.vault.clone(),
                            snapshot: d.vault_snapshot.clone(),
                            entry: piece(&entry, off, len),
                        })
                        .map_err(ServerError::call(format!("read {}", rec.path)))?;
                    out.vault_bytes_read += stats.bytes;
                    data
                }
            };
            self.file_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let last = off + len >= size;
            self.put(
                vm,
                &GuestFileWrite {
                    path: dest.to_string(),
                    dir: false,
                    offset: off,
                    data_b64: base64::engine::general_purpose::STANDARD.encode(&data),
                    last,
                    mode: rec.mode.map(|m| m & 0o7777),
                    uid: rec.uid,
                    gid: rec.gid,
                    mtime_s: seconds(rec.mtime_ns),
                    overwrite,
                },
            )?;
            off += len;
            if last {
                break;
            }
        }
        out.files += 1;
        out.bytes += size;
        Ok(())
    }
}

fn dir_request(f: &FileRecord, target: &str, overwrite: bool) -> GuestFileWrite {
    GuestFileWrite {
        path: target.to_string(),
        dir: true,
        offset: 0,
        data_b64: String::new(),
        last: true,
        mode: f.mode.map(|m| m & 0o7777),
        uid: f.uid,
        gid: f.gid,
        mtime_s: None,
        overwrite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_keeps_only_its_bytes_renumbered() {
        let mut e = FileEntry::new("/f".into(), FileKind::File, 1);
        e.size = 300;
        e.extents = vec![
            FileExtent {
                file_offset: 0,
                disk_offset: 1000,
                length: 100,
            },
            // 100..200 is a hole.
            FileExtent {
                file_offset: 200,
                disk_offset: 5000,
                length: 100,
            },
        ];
        let p = piece(&e, 50, 200);
        assert_eq!(p.size, 200);
        let x: Vec<_> = p
            .extents
            .iter()
            .map(|x| (x.file_offset, x.disk_offset, x.length))
            .collect();
        assert_eq!(x, [(0, 1050, 50), (150, 5000, 50)]);
        assert!(piece(&e, 100, 100).extents.is_empty(), "all hole");
    }
}
