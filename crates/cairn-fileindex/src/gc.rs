//! Removing backups and collecting what no remaining backup refers to, planned then executed.
//!
//! A record is live if a remaining listing names it; a path is live if a remaining listing
//! names it or one of its descendants. Packs with no live item are deleted; packs with at
//! least [`REWRITE_DEAD_FRACTION`] dead items are rewritten with dead items tombstoned (ids
//! never move, so listings stay valid); other packs keep their dead items until later.
//!
//! Execution writes the rewritten packs, commits a manifest without the removed backups and
//! the replaced packs, then deletes the files no longer named. A crash at any point leaves
//! either the old or the new manifest, both complete; leftovers are deleted on the next open.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::error::{IndexError, Result};
use crate::format::{LISTING_MAGIC, PATHS_MAGIC, seal, unseal};
use crate::index::FileIndex;
use crate::listing::ListingFile;
use crate::manifest::{PackRef, listing_file, paths_file, records_file};
use crate::pack::PackWriter;
use crate::paths::PathPack;
use crate::record::TOMBSTONE;
use crate::store::{self, State};

/// A pack is rewritten once this share of its items is dead.
pub const REWRITE_DEAD_FRACTION: f64 = 0.25;

/// What to do with one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackAction {
    Delete,
    /// Rewrite with dead items tombstoned.
    Rewrite,
}

/// A printable plan of a removal; execute it with [`FileIndex::execute_gc`].
#[derive(Debug, Clone, PartialEq)]
pub struct GcPlan {
    /// Generation of the manifest the plan was made against; execution refuses a newer one.
    pub generation: u64,
    pub remove_backups: Vec<String>,
    pub record_packs: Vec<(u64, PackAction)>,
    pub path_packs: Vec<(u64, PackAction)>,
    /// Remaining backups whose delta listing is based on a removed one: rewritten in full.
    pub rewrite_listings: Vec<String>,
    pub dead_records: u64,
    pub dead_paths: u64,
    /// Bytes of listings and packs deleted (rewritten packs not counted).
    pub bytes_deleted: u64,
}

impl fmt::Display for GcPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "remove {} backup(s): {}",
            self.remove_backups.len(),
            self.remove_backups.join(", ")
        )?;
        let count = |v: &[(u64, PackAction)], a| v.iter().filter(|x| x.1 == a).count();
        if !self.rewrite_listings.is_empty() {
            writeln!(
                f,
                "rewrite {} listing(s) in full: {}",
                self.rewrite_listings.len(),
                self.rewrite_listings.join(", ")
            )?;
        }
        writeln!(
            f,
            "records: {} dead; {} pack(s) deleted, {} rewritten",
            self.dead_records,
            count(&self.record_packs, PackAction::Delete),
            count(&self.record_packs, PackAction::Rewrite)
        )?;
        writeln!(
            f,
            "paths: {} dead; {} pack(s) deleted, {} rewritten",
            self.dead_paths,
            count(&self.path_packs, PackAction::Delete),
            count(&self.path_packs, PackAction::Rewrite)
        )?;
        write!(f, "{} bytes deleted", self.bytes_deleted)
    }
}

fn file_len(st: &State, name: &str) -> u64 {
    std::fs::metadata(st.dir.join(name)).map_or(0, |m| m.len())
}

struct Liveness {
    records: Vec<bool>,
    paths: Vec<bool>,
}

impl FileIndex {
    fn liveness(&self, st: &State, remove: &HashSet<&str>) -> Result<Liveness> {
        let mut records = vec![false; st.manifest.next_record_id as usize];
        let mut paths = vec![false; st.paths.next_id() as usize];
        paths[0] = true;
        for b in st
            .manifest
            .backups
            .iter()
            .filter(|b| !remove.contains(b.backup_id.as_str()))
        {
            for v in self.listing_of(st, b)?.iter() {
                for &(p, r) in &v.entries {
                    records[r as usize] = true;
                    let mut p = p;
                    while !paths[p as usize] {
                        paths[p as usize] = true;
                        p = st.paths.parent(p).unwrap_or(0);
                    }
                }
            }
        }
        Ok(Liveness { records, paths })
    }

    /// Plans the removal of `backup_ids` and the collection of what only they used.
    pub fn plan_remove(&self, backup_ids: &[&str]) -> Result<GcPlan> {
        let st = self.snapshot();
        for id in backup_ids {
            if st.manifest.backup(id).is_none() {
                return Err(IndexError::NotFound((*id).to_string()));
            }
        }
        let remove: HashSet<&str> = backup_ids.iter().copied().collect();
        let live = self.liveness(&st, &remove)?;
        let mut plan = GcPlan {
            generation: st.manifest.generation,
            remove_backups: remove.iter().map(|s| s.to_string()).collect(),
            record_packs: Vec::new(),
            path_packs: Vec::new(),
            dead_records: 0,
            dead_paths: 0,
            rewrite_listings: Vec::new(),
            bytes_deleted: 0,
        };
        plan.remove_backups.sort();
        for b in st
            .manifest
            .backups
            .iter()
            .filter(|b| remove.contains(b.backup_id.as_str()))
        {
            plan.bytes_deleted += file_len(&st, &listing_file(b.listing_seq));
        }
        let removed_seqs: HashSet<u64> = st
            .manifest
            .backups
            .iter()
            .filter(|b| remove.contains(b.backup_id.as_str()))
            .map(|b| b.listing_seq)
            .collect();
        for b in &st.manifest.backups {
            if !remove.contains(b.backup_id.as_str())
                && b.base.is_some_and(|s| removed_seqs.contains(&s))
            {
                plan.rewrite_listings.push(b.backup_id.clone());
            }
        }
        for pack in &st.packs {
            let l = &pack.layout;
            let range = l.first_id as usize..(l.first_id + l.count) as usize;
            let live_n = live.records[range.clone()].iter().filter(|&&x| x).count();
            // Already-tombstoned records are dead too; count only what this plan frees.
            let mut dead_new = 0;
            for (b, e) in l.blocks.iter().enumerate() {
                let block = pack.block(b)?;
                for i in 0..e.count {
                    let id = (l.first_id + e.first_index + i) as usize;
                    if !live.records[id] && block.get(i as usize) != Some(&[TOMBSTONE]) {
                        dead_new += 1;
                    }
                }
            }
            plan.dead_records += dead_new;
            if live_n == 0 {
                plan.record_packs.push((pack.seq, PackAction::Delete));
                plan.bytes_deleted += pack.file_len;
            } else if dead_new > 0
                && (l.count as usize - live_n) as f64 >= REWRITE_DEAD_FRACTION * f64::from(l.count)
            {
                plan.record_packs.push((pack.seq, PackAction::Rewrite));
            }
        }
        for p in &st.manifest.path_packs {
            let range = p.first_id as usize..(p.first_id + p.count) as usize;
            let live_n = live.paths[range.clone()].iter().filter(|&&x| x).count();
            let dead_new = range
                .clone()
                .filter(|&i| !live.paths[i] && st.paths.is_live(i as u32))
                .count();
            plan.dead_paths += dead_new as u64;
            if live_n == 0 {
                plan.path_packs.push((p.seq, PackAction::Delete));
                plan.bytes_deleted += file_len(&st, &paths_file(p.seq));
            } else if dead_new > 0
                && (p.count as usize - live_n) as f64 >= REWRITE_DEAD_FRACTION * f64::from(p.count)
            {
                plan.path_packs.push((p.seq, PackAction::Rewrite));
            }
        }
        Ok(plan)
    }

    /// Executes a plan made by [`FileIndex::plan_remove`] against the current generation.
    pub fn execute_gc(&self, plan: &GcPlan) -> Result<()> {
        let mut writer = self.writer.lock().expect("writer lock");
        let st = self.snapshot();
        if st.manifest.generation != plan.generation {
            return Err(IndexError::invalid(
                "the index changed since the plan was made",
            ));
        }
        let remove: HashSet<&str> = plan.remove_backups.iter().map(String::as_str).collect();
        let live = self.liveness(&st, &remove)?;
        let mut m = st.manifest.clone();
        let mut seq = m.next_seq;
        let mut written = Vec::new();
        let mut obsolete: Vec<String> = Vec::new();
        let result = (|| -> Result<()> {
            for &(old, action) in &plan.record_packs {
                let pos = m
                    .record_packs
                    .iter()
                    .position(|p| p.seq == old)
                    .ok_or_else(|| IndexError::invalid("plan names an unknown pack"))?;
                obsolete.push(records_file(old));
                if action == PackAction::Delete {
                    m.record_packs.remove(pos);
                    continue;
                }
                let pack = st
                    .packs
                    .iter()
                    .find(|p| p.seq == old)
                    .expect("state matches manifest");
                let tmp = self.dir.join(format!("{}.tmp", records_file(seq)));
                written.push(tmp.clone());
                let mut w = PackWriter::create(&tmp, pack.layout.first_id)?;
                for (b, e) in pack.layout.blocks.iter().enumerate() {
                    let block = pack.block(b)?;
                    for i in 0..e.count {
                        let id = pack.layout.first_id + e.first_index + i;
                        let bytes = block.get(i as usize).unwrap_or(&[TOMBSTONE]);
                        w.push(if live.records[id as usize] {
                            bytes
                        } else {
                            &[TOMBSTONE]
                        })?;
                    }
                }
                w.finish()?;
                let dst = self.dir.join(records_file(seq));
                store::rename(&tmp, &dst)?;
                written.push(dst);
                m.record_packs[pos] = PackRef {
                    seq,
                    ..m.record_packs[pos]
                };
                seq += 1;
            }
            for &(old, action) in &plan.path_packs {
                let pos = m
                    .path_packs
                    .iter()
                    .position(|p| p.seq == old)
                    .ok_or_else(|| IndexError::invalid("plan names an unknown pack"))?;
                obsolete.push(paths_file(old));
                if action == PackAction::Delete {
                    m.path_packs.remove(pos);
                    continue;
                }
                let name = paths_file(old);
                let data = std::fs::read(self.dir.join(&name))
                    .map_err(|e| IndexError::io(self.dir.join(&name), "read", e))?;
                let body = unseal(&data, PATHS_MAGIC).map_err(|e| e.in_file(&name))?;
                let mut pack = PathPack::decode(&body).map_err(|e| e.in_file(&name))?;
                for (i, entry) in pack.entries.iter_mut().enumerate() {
                    if !live.paths[pack.first_id as usize + i] {
                        *entry = (0, String::new());
                    }
                }
                let tmp = store::write_tmp(
                    &self.dir,
                    &paths_file(seq),
                    &seal(PATHS_MAGIC, &pack.encode()),
                )?;
                written.push(tmp.clone());
                let dst = self.dir.join(paths_file(seq));
                store::rename(&tmp, &dst)?;
                written.push(dst);
                m.path_packs[pos] = PackRef {
                    seq,
                    ..m.path_packs[pos]
                };
                seq += 1;
            }
            // Listings based on a removed one are rewritten in full; later deltas based on a
            // rewritten listing follow it to its new sequence number (same content).
            let mut renumbered = HashMap::new();
            for id in &plan.rewrite_listings {
                let b = st
                    .manifest
                    .backup(id)
                    .ok_or_else(|| IndexError::invalid("plan names an unknown backup"))?;
                let vols = self.listing_of(&st, b)?;
                let bytes = seal(LISTING_MAGIC, &ListingFile::full(&vols).encode());
                let tmp = store::write_tmp(&self.dir, &listing_file(seq), &bytes)?;
                written.push(tmp.clone());
                let dst = self.dir.join(listing_file(seq));
                store::rename(&tmp, &dst)?;
                written.push(dst);
                obsolete.push(listing_file(b.listing_seq));
                renumbered.insert(b.listing_seq, seq);
                let e = m
                    .backups
                    .iter_mut()
                    .find(|x| x.backup_id == *id)
                    .expect("backup in manifest");
                (e.listing_seq, e.base, e.listing_bytes) = (seq, None, bytes.len() as u64);
                seq += 1;
            }
            for b in m.backups.iter_mut() {
                if let Some(new) = b.base.and_then(|s| renumbered.get(&s)) {
                    b.base = Some(*new);
                }
            }
            for b in m
                .backups
                .iter()
                .filter(|b| remove.contains(b.backup_id.as_str()))
            {
                obsolete.push(listing_file(b.listing_seq));
            }
            m.backups.retain(|b| !remove.contains(b.backup_id.as_str()));
            m.next_seq = seq;
            m.generation += 1;
            store::sync_dir(&self.dir)?;
            store::commit_manifest(&self.dir, &m)?;
            Ok(())
        })();
        if let Err(e) = result {
            for p in written {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        // Committed. Reload from disk (ids of dead paths and records are gone) and delete
        // what the new manifest no longer names; a failure here leaves files the next open
        // deletes.
        let next = State::load(&self.dir, m, st.blocks.clone())?;
        {
            let mut cache = self.listings.lock().expect("cache lock");
            for b in &st.manifest.backups {
                cache.remove(b.listing_seq);
            }
        }
        *self.state.write().expect("state lock") = Arc::new(next);
        writer.hashes = None;
        for name in obsolete {
            let p = self.dir.join(name);
            std::fs::remove_file(&p).map_err(|e| IndexError::io(&p, "remove", e))?;
        }
        store::sync_dir(&self.dir)
    }

    /// Removes one backup and collects what only it used.
    pub fn remove_backup(&self, backup_id: &str) -> Result<GcPlan> {
        let plan = self.plan_remove(&[backup_id])?;
        self.execute_gc(&plan)?;
        Ok(plan)
    }
}
