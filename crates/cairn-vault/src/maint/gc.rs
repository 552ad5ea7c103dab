//! Garbage collection: mark every blob reachable from a snapshot, then sweep containers.
//!
//! 1. **Plan** (under the exclusive lock): mark from every manifest; for every container count
//!    live and dead bytes. A container with no live blob is deleted; one whose live part is
//!    below half is repacked (its live blobs copied into new containers, then deleted).
//! 2. **Execute**: write repacked containers (durable), rewrite the index without the doomed
//!    containers, then delete them. A crash at any point leaves every snapshot intact: doomed
//!    containers are deleted only after nothing in the index points at them.
//!
//! A frame is live while any of its segments is: repacking copies live frames whole, with all
//! their members, so a frame's bytes are never re-encoded.
//!
//! GC takes the exclusive repository lock, so it never runs beside a backup session (which
//! might otherwise reuse a blob GC is about to delete); it fails fast if one is running.

use std::collections::{HashMap, HashSet};

use cairn_chunk::EncodedSegment;
use cairn_chunk::container::{ContainerBuilder, frames};
use cairn_chunk::format::CONTAINER_TARGET_LEN;
use cairn_types::{ContainerId, Digest};

use crate::error::Result;
use crate::lock::RepoLock;
use crate::repo::{Repository, container_key};

/// What GC will do or did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcPlan {
    pub snapshots: usize,
    pub live_blobs: usize,
    pub containers_total: usize,
    pub delete: Vec<ContainerId>,
    pub repack: Vec<ContainerId>,
    pub bytes_freed_estimate: u64,
    pub executed: bool,
}

/// Plans and (unless `dry_run`) runs a GC.
pub fn gc(repo: &Repository, dry_run: bool) -> Result<GcPlan> {
    let lock = RepoLock::acquire(repo.store().clone(), true, "gc")?;
    repo.sync_index()?;
    let snaps = repo.list_snapshots()?;
    let mut live: HashSet<Digest> = HashSet::new();
    for s in &snaps {
        repo.reachable(s, &mut live)?;
    }
    let mut plan = GcPlan {
        snapshots: snaps.len(),
        live_blobs: live.len(),
        ..Default::default()
    };
    let containers = repo.list_containers()?;
    plan.containers_total = containers.len();
    let mut repack_records = HashMap::new();
    for (c, size) in &containers {
        let recs = match repo.container_records(c) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("gc: leaving unreadable container {c} alone: {e}");
                continue;
            }
        };
        let live_bytes: u64 = frames(&recs)
            .filter(|f| f.iter().any(|r| live.contains(&r.digest)))
            .map(|f| u64::from(f[0].stored_len))
            .sum();
        if live_bytes == 0 {
            plan.delete.push(*c);
            plan.bytes_freed_estimate += size;
        } else if live_bytes * 2 < *size {
            plan.repack.push(*c);
            plan.bytes_freed_estimate += size - live_bytes;
            repack_records.insert(*c, recs);
        }
    }
    if dry_run {
        return Ok(plan);
    }
    // Repack: copy live blobs (still encoded) into new containers.
    let mut builder = ContainerBuilder::new();
    let mut new_containers = Vec::new();
    let mut copied: HashSet<Digest> = HashSet::new();
    let flush = |b: ContainerBuilder, out: &mut Vec<_>| -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        let id = ContainerId::random();
        let (bytes, records) = b.finish();
        repo.store().put(&container_key(&id), &bytes)?;
        out.push((id, records));
        Ok(())
    };
    for c in &plan.repack {
        let data = repo.store().get(&container_key(c))?;
        for f in frames(&repack_records[c]) {
            let wanted = f
                .iter()
                .any(|r| live.contains(&r.digest) && !copied.contains(&r.digest));
            if !wanted {
                continue;
            }
            copied.extend(f.iter().map(|r| r.digest));
            let r = f[0];
            let blob = &data[r.offset as usize..(r.offset + u64::from(r.stored_len)) as usize];
            let seg = EncodedSegment {
                codec: r.codec,
                bytes: blob.to_vec(),
            };
            let members: Vec<(Digest, u32)> = f.iter().map(|m| (m.digest, m.raw_len)).collect();
            builder.push_frame(r.kind, &members, &seg);
            if builder.len() >= CONTAINER_TARGET_LEN {
                flush(std::mem::take(&mut builder), &mut new_containers)?;
            }
        }
    }
    flush(builder, &mut new_containers)?;
    let doomed: HashSet<ContainerId> = plan.delete.iter().chain(&plan.repack).copied().collect();
    {
        let mut ix = repo.index_mut();
        for (id, recs) in &new_containers {
            ix.add_container(*id, recs);
        }
        // Stale locations of copied blobs live in doomed containers and are dropped here.
        ix.rewrite(&doomed)?;
    }
    for c in &doomed {
        repo.store().delete(&container_key(c))?;
    }
    plan.executed = true;
    lock.release()?;
    Ok(plan)
}
