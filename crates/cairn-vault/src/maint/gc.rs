//! Garbage collection: mark every blob reachable from a snapshot, then sweep containers.
//!
//! 1. **Plan** (under the exclusive lock): mark from every manifest; a frame is live when it
//!    is where the index locates a live blob. For every container count live and dead bytes.
//!    A container with no live frame is deleted; one whose live part is below half is
//!    repacked (its live frames copied into new containers, then deleted).
//! 2. **Execute**: write repacked containers (durable), rewrite the index without the doomed
//!    containers, then delete them. A crash at any point leaves every snapshot intact: doomed
//!    containers are deleted only after nothing in the index points at them.
//!
//! Liveness is by location, not by digest: a segment stored twice (two backups that raced,
//! a repack that a crash interrupted, a damaged copy healed by a later backup) keeps only the
//! copy the index names, and the other becomes garbage. Where the index cannot vouch for a
//! live blob (it lacks it, or names a place no container record confirms), every copy of it
//! stays live, so a damaged index never makes GC delete the only copy.
//!
//! A container holding a copy marked damaged is repacked as soon as that copy is dead (a
//! later backup stored the segment again), whatever its live share.
//!
//! A frame is live while any of its segments is: repacking copies live frames whole, with all
//! their members, so a frame's bytes are never re-encoded.
//!
//! Snapshots whose manifests are damaged keep the data their salvaged recipe root reaches;
//! when no root can be salvaged from one, GC refuses to run until it is forgotten or repaired.
//!
//! GC takes the exclusive repository lock, so it never runs beside a backup session (which
//! might otherwise reuse a blob GC is about to delete); it fails fast if one is running. It
//! also removes what interrupted writes left in the store ([`LEFTOVER_MIN_AGE`]).

use std::collections::{HashMap, HashSet};

use cairn_chunk::container::{ContainerBuilder, Record, frames};
use cairn_chunk::format::CONTAINER_TARGET_LEN;
use cairn_chunk::{EncodedSegment, Encoder, codec};
use cairn_types::{ContainerId, Digest};

use crate::error::{Result, VaultError};
use crate::lock::RepoLock;
use crate::repo::{Repository, container_key};

/// Temporary objects at least this old are left by interrupted writes (a write in progress
/// is younger) and are removed by GC.
pub const LEFTOVER_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// What GC will do or did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcPlan {
    pub snapshots: usize,
    pub live_blobs: usize,
    pub containers_total: usize,
    pub delete: Vec<ContainerId>,
    pub repack: Vec<ContainerId>,
    pub bytes_freed_estimate: u64,
    /// Damaged manifests whose data GC kept (by their salvaged recipe roots).
    #[serde(default)]
    pub damaged_snapshots_kept: usize,
    /// Containers left whole because they hold data of a snapshot under a retention lock.
    #[serde(default)]
    pub locked_containers: usize,
    /// Leftovers of interrupted writes removed.
    #[serde(default)]
    pub leftovers_removed: usize,
    pub executed: bool,
}

/// The live blobs and where the index locates them.
struct Liveness {
    live: HashSet<Digest>,
    /// (container, frame offset) of every live blob's indexed copy.
    frames: HashSet<(ContainerId, u64)>,
    /// Live blobs whose indexed copy no container record has confirmed yet.
    unconfirmed: HashMap<Digest, (ContainerId, u64)>,
    /// Live blobs the index lacks: every copy stays live.
    unlocated: HashSet<Digest>,
}

impl Liveness {
    fn new(repo: &Repository, live: HashSet<Digest>) -> Result<Self> {
        let digests: Vec<Digest> = live.iter().copied().collect();
        let locs = repo.index().get_many(&digests)?;
        let mut frames = HashSet::with_capacity(digests.len());
        let mut unconfirmed = HashMap::with_capacity(digests.len());
        let mut unlocated = HashSet::new();
        for (d, l) in digests.iter().zip(locs) {
            match l {
                Some(l) => {
                    frames.insert((l.container, u64::from(l.offset)));
                    unconfirmed.insert(*d, (l.container, u64::from(l.offset)));
                }
                None => {
                    unlocated.insert(*d);
                }
            }
        }
        Ok(Self {
            live,
            frames,
            unconfirmed,
            unlocated,
        })
    }

    /// Notes the records of one container: confirms indexed copies found there.
    fn confirm(&mut self, c: &ContainerId, recs: &[Record]) {
        for r in recs {
            if self.unconfirmed.get(&r.digest) == Some(&(*c, r.offset)) {
                self.unconfirmed.remove(&r.digest);
            }
        }
    }

    /// Is this frame (all its member records) live? With `unvouched`, a frame also is when
    /// it holds a live blob the index cannot vouch for.
    fn frame_live(&self, c: &ContainerId, f: &[Record], unvouched: bool) -> bool {
        self.frames.contains(&(*c, f[0].offset)) && f.iter().any(|r| self.live.contains(&r.digest))
            || unvouched
                && f.iter().any(|r| {
                    self.unlocated.contains(&r.digest) || self.unconfirmed.contains_key(&r.digest)
                })
    }

    /// Stored bytes of a container's live frames.
    fn live_bytes(&self, c: &ContainerId, recs: &[Record], unvouched: bool) -> u64 {
        frames(recs)
            .filter(|f| self.frame_live(c, f, unvouched))
            .map(|f| u64::from(f[0].stored_len))
            .sum()
    }
}

/// Plans and (unless `dry_run`) runs a GC.
pub fn gc(repo: &Repository, dry_run: bool) -> Result<GcPlan> {
    let lock = RepoLock::acquire(repo.store().clone(), true, "gc")?;
    repo.sync_index()?;
    let (snaps, damaged) = repo.scan_snapshots()?;
    let mut live: HashSet<Digest> = HashSet::new();
    for s in &snaps {
        repo.reachable(s, &mut live)?;
    }
    for d in &damaged {
        let root = d.root.filter(|r| repo.locate(r).ok().flatten().is_some());
        let Some(root) = root else {
            return Err(VaultError::Invalid(format!(
                "snapshot {} is damaged ({}) and names no readable recipe: GC would lose \
                 its data; forget it (`cairn repo forget {}`) or restore its manifest first",
                d.id, d.problem, d.id
            )));
        };
        tracing::warn!("gc: keeping the data of damaged snapshot {}", d.id);
        repo.reachable_from(&root, &mut live)?;
    }
    let mut plan = GcPlan {
        snapshots: snaps.len(),
        live_blobs: live.len(),
        damaged_snapshots_kept: damaged.len(),
        ..Default::default()
    };
    let mut liveness = Liveness::new(repo, live)?;
    let containers = repo.list_containers()?;
    plan.containers_total = containers.len();
    // Pass 1 judges each container by the indexed copies alone and keeps the records of
    // those that may go; once every record has been seen, those few are judged again with
    // the blobs no record confirmed counted live wherever they lie (that only adds live
    // frames, so a container kept in pass 1 stays kept).
    // Containers holding a copy marked damaged are repacked as soon as that copy is
    // superseded (the index names another copy); its frame is then decoded and only its
    // other, intact members are kept.
    let superseded: HashSet<(ContainerId, u64)> = repo
        .marks_located()?
        .into_iter()
        .filter(|(m, l)| l.is_some_and(|l| (l.container, l.offset) != (m.1, m.2)))
        .map(|(m, _)| (m.1, u64::from(m.2)))
        .collect();
    let dead_marks: HashSet<ContainerId> = superseded.iter().map(|f| f.0).collect();
    // Containers holding data of a locked snapshot stay whole: the store may hold them
    // immutable, and their live data must not move (crate::retention).
    let locked = repo.locked_containers()?;
    plan.locked_containers = locked.len();
    let mut candidates: Vec<(ContainerId, u64, Vec<Record>)> = Vec::new();
    for (c, size) in &containers {
        let recs = match repo.container_records(c) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("gc: leaving unreadable container {c} alone: {e}");
                continue;
            }
        };
        liveness.confirm(c, &recs);
        if locked.contains(c) {
            continue;
        }
        if liveness.live_bytes(c, &recs, false) * 2 < *size || dead_marks.contains(c) {
            candidates.push((*c, *size, recs));
        }
    }
    let mut repack_records = HashMap::new();
    for (c, size, recs) in candidates {
        let live_bytes = liveness.live_bytes(&c, &recs, true);
        if live_bytes == 0 {
            plan.delete.push(c);
            plan.bytes_freed_estimate += size;
        } else if live_bytes * 2 < size || dead_marks.contains(&c) {
            plan.repack.push(c);
            plan.bytes_freed_estimate += size - live_bytes;
            repack_records.insert(c, recs);
        }
    }
    if dry_run {
        return Ok(plan);
    }
    // Repack: copy live blobs (still encoded) into new containers.
    let mut builder = ContainerBuilder::new();
    let mut encoder = Encoder::sealing(repo.config().compression, repo.keys().cloned());
    let keys = repo.keys().map(|k| &**k);
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
            let wanted = liveness.frame_live(c, f, true)
                && f.iter()
                    .any(|r| liveness.live.contains(&r.digest) && !copied.contains(&r.digest));
            if !wanted {
                continue;
            }
            let r = f[0];
            let blob = usize::try_from(r.offset)
                .ok()
                .and_then(|o| data.get(o..)?.get(..r.stored_len as usize))
                .ok_or_else(|| {
                    VaultError::Corrupt(format!(
                        "container {c}: frame at {} lies past its {} bytes",
                        r.offset,
                        data.len()
                    ))
                })?;
            // A sealed frame is sorted out only with the key; without it, it is kept whole.
            if superseded.contains(&(*c, r.offset)) && (!r.codec.is_sealed() || keys.is_some()) {
                // Damaged here, stored again elsewhere: keep only the intact members.
                let Ok(plain) =
                    codec::decode_frame(keys, r.codec, blob, r.frame_len as usize, &r.digest)
                else {
                    continue;
                };
                for m in f {
                    let Ok(piece) = codec::member_of(keys, &plain, m.member(), &m.digest) else {
                        continue;
                    };
                    if liveness.live.contains(&m.digest) && copied.insert(m.digest) {
                        builder.push_frame(
                            m.kind,
                            &[(m.digest, m.raw_len)],
                            &encoder.encode(piece),
                        );
                    }
                }
            } else {
                copied.extend(f.iter().map(|r| r.digest));
                let seg = EncodedSegment {
                    codec: r.codec,
                    bytes: blob.to_vec(),
                };
                let members: Vec<(Digest, u32)> = f.iter().map(|m| (m.digest, m.raw_len)).collect();
                builder.push_frame(r.kind, &members, &seg);
            }
            if builder.len() >= CONTAINER_TARGET_LEN {
                flush(std::mem::take(&mut builder), &mut new_containers)?;
            }
        }
    }
    flush(builder, &mut new_containers)?;
    cairn_types::fault::point("vault.gc.after_repack");
    let doomed: HashSet<ContainerId> = plan.delete.iter().chain(&plan.repack).copied().collect();
    {
        let mut ix = repo.index_mut();
        for (id, recs) in &new_containers {
            ix.add_container(*id, recs);
        }
        // Stale locations of copied blobs live in doomed containers and are dropped here.
        ix.rewrite(&doomed)?;
    }
    cairn_types::fault::point("vault.gc.after_index");
    for c in &doomed {
        // Protected while a lock (now expired) held its data.
        repo.store().release(&container_key(c))?;
        repo.store().delete(&container_key(c))?;
    }
    // Marks of damaged copies in containers that are gone are dropped.
    let remaining: HashSet<ContainerId> = repo
        .list_containers()?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    repo.drop_marks_outside(&remaining)?;
    plan.leftovers_removed = repo.store().remove_leftovers(LEFTOVER_MIN_AGE)?;
    plan.executed = true;
    lock.release()?;
    Ok(plan)
}
