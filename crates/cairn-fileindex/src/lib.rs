//! The file index of Cairn's file catalog: which files every backup of every VM holds, stored
//! so that unchanged files cost almost nothing and a search covers all backups at once.
//!
//! After a backup is committed, the server parses its disk images and hands each volume's
//! files to [`FileIndex::add_backup`]. Operators then [`list`](FileIndex::list) directories,
//! [`get`](FileIndex::get) and [`walk`](FileIndex::walk) files for restores,
//! [`find`](FileIndex::find) files by glob or substring across all backups, and see a file's
//! [`versions`](FileIndex::versions). This crate stores and queries listings; it does not
//! parse disks.
//!
//! # Model
//!
//! A backup (`backup_id`, `vm`, `created_ms`, `parent`) holds volumes named
//! `(disk, volume)` (e.g. `("sda", "p1")` or `("vda", "whole")`); a volume holds
//! [`FileRecord`]s with absolute, `/`-separated paths. Queries take the volume as
//! arguments; [`FileIndex::volumes`] lists a backup's volumes.
//!
//! # Storage
//!
//! | file | holds | written |
//! |---|---|---|
//! | `MANIFEST` | live files, backups, next ids ([`manifest`]) | replaced on every commit |
//! | `paths-<seq>.cfp` | new distinct paths as `(parent id, name)` ([`paths`]) | once, by an add |
//! | `records-<seq>.cfr` | new distinct records in checksummed zstd blocks ([`pack`]) | once, by an add |
//! | `listing-<seq>.cfl` | one backup: sorted `(path id, record id)` per volume, in full or as a delta from the parent's ([`listing`]) | once, by an add |
//! | `LOCK` | the process lock | never |
//!
//! Paths and records are shared by all backups: a record is stored once per distinct
//! encoding (BLAKE3), and a backup's listing is stored as its difference from the parent
//! backup's (at most 16 deltas in a row), so a file unchanged since the parent costs
//! nothing. Garbage collection is planned, then executed ([`gc`]). All formats are in
//! [`format`](mod@format); `docs/FILE-CATALOG.md` has the whole picture and the measured figures.
//!
//! # Invariants
//!
//! * The manifest names exactly the visible state. Data files are immutable once named; a
//!   commit (add or removal) writes new files, fsyncs them, renames them into place, fsyncs
//!   the directory, then replaces the manifest the same way. A crash before the manifest's
//!   rename leaves the previous state; files it left behind are deleted by the next
//!   [`FileIndex::open`], and a retried add writes them again.
//! * Ids never move and are never reused: path id 0 is the root of every volume, other path
//!   ids and record ids start at 1 and only grow. Garbage collection tombstones dead items
//!   or deletes whole packs, so listings stay valid.
//! * Every listed path's parent directory is listed too (missing ones are added as bare
//!   directory records and counted in [`AddReport::dirs_implied`]).
//! * Everything read from disk is checked: magic, version, BLAKE3 checksums, limits, id
//!   ranges and ordering. A bad file yields [`IndexError::Corrupt`] naming it.
//!
//! # Concurrency
//!
//! | who | may |
//! |---|---|
//! | one process | open the index; `open` takes an exclusive `flock` on `LOCK` and fails with [`IndexError::Locked`] otherwise |
//! | threads of that process | query concurrently through `&FileIndex`; adds and removals are serialised by an internal mutex |
//! | a query | sees one consistent state (a snapshot taken when it starts), never a half-added backup |
//!
//! A query racing the removal of the very backup it reads may fail with an I/O error.

pub mod error;
pub mod format;
pub mod gc;
pub mod glob;
mod index;
pub mod listing;
pub mod manifest;
pub mod pack;
pub mod paths;
pub mod record;
mod store;

pub use error::{ErrorKind, IndexError, Result};
pub use gc::{GcPlan, PackAction};
pub use glob::{Pattern, PatternError};
pub use index::{
    AddReport, BackupInfo, BackupMeta, FileIndex, FindOptions, Hit, IndexStats, Version,
    VolumeInfo, Walk,
};
pub use record::{FileExtent, FileKind, FileRecord};

/// Decodes `data` as every kind of index file, sealed or as a bare body; for the fuzz
/// target. Never panics.
pub fn decode_any(data: &[u8]) {
    use format::{LISTING_MAGIC, MANIFEST_MAGIC, PATHS_MAGIC, unseal};
    let paths = |body: &[u8]| {
        // A pack may start at any id below 2^28; the table fills the gap with dead ids,
        // which is legitimate but too slow for a fuzzer, so only small gaps are replayed.
        if let Ok(pack) = paths::PathPack::decode(body)
            && pack.first_id < 1 << 16
        {
            let _ = paths::PathTable::new().extend(&pack);
        }
    };
    let listing = |body: &[u8]| {
        if let Ok(l) = listing::ListingFile::decode(body) {
            // Resolve against nothing and against itself (as its own base).
            if let Ok(base) = l.resolve(&[]) {
                let _ = l.resolve(&base);
            }
        }
    };
    if let Ok(body) = unseal(data, MANIFEST_MAGIC) {
        let _ = manifest::Manifest::decode(&body);
    }
    if let Ok(body) = unseal(data, PATHS_MAGIC) {
        paths(&body);
    }
    if let Ok(body) = unseal(data, LISTING_MAGIC) {
        listing(&body);
    }
    // The bare bodies too, so the fuzzer need not forge checksums.
    let _ = manifest::Manifest::decode(data);
    paths(data);
    listing(data);
    let _ = record::decode(data, String::new());
    let _ = record::decode_summary(data);
    if let Ok((_, records)) = pack::parse_all(data) {
        for r in records {
            let _ = record::decode(&r, String::new());
        }
    }
}
