//! Restore of a snapshot to a file or block device (see the module docs of [`super`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use cairn_chunk::{Entry, EntryKind};
use cairn_types::Digest;

use super::{BATCH_BYTES, Progress};
use crate::api::Vault;
use crate::error::{Result, VaultError};

/// A restore starts writeback after every this many bytes written.
const FLUSH_EVERY: u64 = 64 << 20;

/// Options of one restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub threads: usize,
}

/// Result of a restore.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreStats {
    pub snapshot: String,
    pub bytes: u64,
    pub bytes_written: u64,
    pub zero_bytes: u64,
    pub duration_ms: u64,
}

/// What a partial restore's file name ends with: `.NAME` + this, beside `NAME`. A restore
/// renames it to `NAME` only when complete; one that is found at start-up was left by a
/// process that died (see `StorageAgent::remove_partial_restores`).
pub const PARTIAL_SUFFIX: &str = ".cairn-partial";

/// The name a restore into `output` writes under until it is complete.
pub fn partial_path(output: &Path) -> Option<PathBuf> {
    let name = output.file_name()?;
    Some(output.with_file_name(format!(".{}{PARTIAL_SUFFIX}", name.to_string_lossy())))
}

/// Restores snapshot `spec` to `output` (a file, created or replaced atomically; or a block
/// device, written in place). Anything else that exists at `output` (a directory, a
/// character device, a FIFO, a socket) is refused before anything is read: the atomic
/// replace would put a regular file in its place.
pub fn restore(
    vault: &dyn Vault,
    spec: &str,
    output: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let started = Instant::now();
    let existing = std::fs::metadata(output).ok().map(|m| m.file_type());
    let is_dev = existing.is_some_and(|t| t.is_block_device());
    if existing.is_some_and(|t| !t.is_file() && !is_dev) {
        return Err(VaultError::Invalid(format!(
            "{} exists and is neither a regular file nor a block device: not replacing it",
            output.display()
        )));
    }
    let snap = vault.find(spec)?;
    let entries = vault.entries(&snap)?;
    let target: PathBuf = if is_dev {
        output.to_path_buf()
    } else {
        partial_path(output).ok_or_else(|| {
            VaultError::Invalid(format!("{} is not a file path", output.display()))
        })?
    };
    let io = |what| {
        let t = target.display().to_string();
        move |e| VaultError::io(t, what, e)
    };
    let file = if is_dev {
        OpenOptions::new()
            .write(true)
            .open(&target)
            .map_err(io("open"))?
    } else {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
            .map_err(io("create"))?;
        f.set_len(snap.size).map_err(io("set length"))?;
        f
    };
    let result = restore_into(vault, &entries, &file, is_dev, snap.size, opts, progress);
    let (written, zeros) = match result {
        Ok(x) => x,
        Err(e) => {
            if !is_dev {
                let _ = std::fs::remove_file(&target);
            }
            return Err(e);
        }
    };
    file.sync_all().map_err(io("fsync"))?;
    if !is_dev {
        std::fs::rename(&target, output).map_err(io("rename"))?;
    }
    Ok(RestoreStats {
        snapshot: snap.id.to_string(),
        bytes: snap.size,
        bytes_written: written,
        zero_bytes: zeros,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

fn restore_into(
    vault: &dyn Vault,
    entries: &[Entry],
    file: &File,
    write_zeros: bool,
    size: u64,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    // Batches of (image offset, entry) with about BATCH_BYTES of data each.
    let mut batches: Vec<Vec<(u64, Entry)>> = vec![Vec::new()];
    let mut bytes = 0usize;
    let mut off = 0u64;
    let mut zeros = 0u64;
    for e in entries {
        if e.kind == EntryKind::Zero {
            zeros += u64::from(e.len);
            if write_zeros {
                batches.last_mut().expect("one batch").push((off, *e));
            }
        } else {
            if bytes >= 2 * BATCH_BYTES {
                batches.push(Vec::new());
                bytes = 0;
            }
            bytes += e.len as usize;
            batches.last_mut().expect("one batch").push((off, *e));
        }
        off += u64::from(e.len);
    }
    let threads = if opts.threads == 0 {
        vault.read_parallelism()
    } else {
        opts.threads
    };
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    let error: Mutex<Option<VaultError>> = Mutex::new(None);
    // Writeback as the restore goes: a worker that carries `written` past a multiple of
    // FLUSH_EVERY wakes the flusher, so the final fsync that makes the image durable has
    // little left to wait for. The flusher ends when the last worker drops its sender.
    let flush_step = AtomicU64::new(0);
    let (wake, woken) = crossbeam_channel::bounded::<()>(1);
    std::thread::scope(|sc| {
        sc.spawn(move || {
            for () in woken {
                let _ = file.sync_data();
            }
        });
        for _ in 0..threads {
            let wake = wake.clone();
            let (next, written, error, flush_step, batches) =
                (&next, &written, &error, &flush_step, &batches);
            sc.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= batches.len() || error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        break;
                    }
                    if let Err(e) = restore_batch(vault, &batches[i], file, written) {
                        error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                    let w = written.load(Ordering::Relaxed);
                    let step = w / FLUSH_EVERY;
                    if flush_step.fetch_max(step, Ordering::Relaxed) < step {
                        let _ = wake.try_send(()); // a flush already pending covers this one
                    }
                    progress.update(w + zeros, size);
                }
            });
        }
        drop(wake);
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((written.load(Ordering::Relaxed), zeros))
}

fn restore_batch(
    vault: &dyn Vault,
    batch: &[(u64, Entry)],
    file: &File,
    written: &AtomicU64,
) -> Result<()> {
    let digests: Vec<Digest> = batch
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::Data)
        .map(|(_, e)| e.digest)
        .collect();
    let datas = vault.fetch(&digests).map_err(|e| {
        let (a, b) = (
            batch.first().map(|x| x.0).unwrap_or(0),
            batch.last().map(|x| x.0 + u64::from(x.1.len)).unwrap_or(0),
        );
        VaultError::Corrupt(format!("cannot restore image bytes {a}..{b}: {e}"))
    })?;
    let mut it = datas.into_iter();
    let zero = vec![0u8; 1 << 16];
    // Consecutive data segments are written with one call: fewer syscalls, less contention
    // on the output's inode lock between restore threads.
    let mut run: Vec<u8> = Vec::new();
    let mut run_at = 0u64;
    let flush = |run: &mut Vec<u8>, at: u64| -> Result<()> {
        if !run.is_empty() {
            file.write_all_at(run, at)
                .map_err(|err| VaultError::io(format!("output at offset {at}"), "write", err))?;
            written.fetch_add(run.len() as u64, Ordering::Relaxed);
            run.clear();
        }
        Ok(())
    };
    for (off, e) in batch {
        match e.kind {
            EntryKind::Data => {
                let data = it
                    .next()
                    .ok_or_else(|| VaultError::Corrupt("vault returned too few segments".into()))?;
                if data.len() != e.len as usize {
                    return Err(VaultError::Corrupt(format!(
                        "segment {:?} for image bytes {off}..{} has {} bytes",
                        e.digest,
                        off + u64::from(e.len),
                        data.len()
                    )));
                }
                if run_at + run.len() as u64 != *off {
                    flush(&mut run, run_at)?;
                    run_at = *off;
                }
                run.extend_from_slice(&data);
            }
            EntryKind::Zero => {
                flush(&mut run, run_at)?;
                let mut done = 0usize;
                while done < e.len as usize {
                    let n = (e.len as usize - done).min(zero.len());
                    file.write_all_at(&zero[..n], off + done as u64)
                        .map_err(|err| VaultError::io("output", "write", err))?;
                    done += n;
                }
            }
        }
    }
    flush(&mut run, run_at)?;
    Ok(())
}
