//! Garbage collection: mark every blob reachable from a snapshot, condemn the containers
//! that hold nothing live, and delete them once no backup session can still be using them.
//!
//! GC runs beside backup sessions (its lock excludes only other GCs and exclusive
//! maintenance, [`crate::lock`]). A session may build on any segment it found in the index
//! when it asked, including one that no snapshot references yet or any more, so a container
//! that looks dead may be in use by a session that has not committed. Hence two steps:
//!
//! 1. **Mark and condemn.** Mark from every manifest; a frame is live when it is where the
//!    index locates a live blob. A container with no live frame is condemned; one whose live
//!    part is below half is repacked (its live frames copied into new containers, which the
//!    index then prefers) and condemned. The condemned set is written to the store
//!    ([`crate::repo::Condemned`]) before anything else: from then on no session that begins
//!    deduplicates against those containers, but they stay readable.
//! 2. **Settle.** A condemned container is deleted once (a) every backup session that held
//!    its lock when the container was condemned (up to [`GC_CLOCK_MARGIN`] later) has ended,
//!    (b) the grace period has passed ([`GcOptions::grace_secs`]; on object storage it covers
//!    listings that lag behind writes), and (c) a mark that includes every snapshot
//!    committed since still finds nothing live in it. One that has become live again (a
//!    session that began earlier committed a snapshot using it) is revived: it leaves the
//!    condemned set and is judged afresh by the next GC. Settling runs at the end of every
//!    GC, so with no session running a single GC frees everything at once.
//!
//! A crash at any point leaves every snapshot intact: a container is deleted only after
//! nothing in the index points at it and no live blob lies only there; a container deleted
//! but still named in the condemned set is dropped from it by the next GC.
//!
//! Liveness is by location, not by digest: a segment stored twice (two backups that raced,
//! a repack that a crash interrupted, a damaged copy healed by a later backup, a segment a
//! session stored again because its copy was condemned) keeps only the copy the index names,
//! and the other becomes garbage. Where the index cannot vouch for a live blob (it lacks it,
//! or names a place no container record confirms), every copy of it stays live, so a
//! damaged index never makes GC delete the only copy.
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
//! GC also removes what interrupted writes left in the store ([`LEFTOVER_MIN_AGE`]).

use std::collections::{HashMap, HashSet};

use cairn_chunk::container::{ContainerBuilder, Record, frames};
use cairn_chunk::format::CONTAINER_TARGET_LEN;
use cairn_chunk::{EncodedSegment, Encoder, codec};
use cairn_types::{ContainerId, Digest};

use crate::error::{Result, VaultError};
use crate::lock::{RepoLock, session_starts};
use crate::manifest::now;
use crate::repo::{Condemned, Repository, container_key};

/// Temporary objects at least this old are left by interrupted writes (a write in progress
/// is younger) and are removed by GC.
pub const LEFTOVER_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How long condemned containers wait at least, by default, on stores whose listings may
/// lag behind writes (object storage): a snapshot committed, or a session's lock written,
/// just before a GC might be missing from its listings for a while. Local directories list
/// what they hold and wait for nothing but the sessions.
pub const GC_GRACE_REMOTE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How far the clocks of two hosts sharing a repository may disagree (seconds): a session
/// whose lock is dated up to this long after a container was condemned counts as one that
/// may have seen it reusable.
pub const GC_CLOCK_MARGIN: u64 = 60;

/// How to run a GC.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcOptions {
    /// Plan only: nothing is condemned, written or deleted.
    #[serde(default)]
    pub dry_run: bool,
    /// How long a condemned container waits at least before it is deleted (seconds);
    /// `None`: 0 on a local directory, [`GC_GRACE_REMOTE`] on object storage.
    #[serde(default)]
    pub grace_secs: Option<u64>,
}

impl GcOptions {
    /// A GC that runs (not a dry run) with the store's default grace.
    pub fn run() -> Self {
        Self::default()
    }

    /// A GC that deletes what it condemns as soon as no session that began earlier runs.
    pub fn without_grace() -> Self {
        Self {
            grace_secs: Some(0),
            ..Self::default()
        }
    }

    /// A plan only.
    pub fn dry_run() -> Self {
        Self {
            dry_run: true,
            ..Self::default()
        }
    }

    /// The grace period on `repo`'s store.
    pub fn grace(&self, repo: &Repository) -> u64 {
        self.grace_secs
            .unwrap_or(if repo.store().capabilities().local {
                0
            } else {
                GC_GRACE_REMOTE.as_secs()
            })
    }
}

/// What GC will do or did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcPlan {
    pub snapshots: usize,
    pub live_blobs: usize,
    pub containers_total: usize,
    /// Containers found dead by this GC (condemned; deleted unless still waiting).
    pub delete: Vec<ContainerId>,
    /// Containers repacked by this GC (condemned likewise once their live part is copied).
    pub repack: Vec<ContainerId>,
    pub bytes_freed_estimate: u64,
    /// Containers deleted by this GC: found dead now or condemned by an earlier GC.
    #[serde(default)]
    pub deleted: Vec<ContainerId>,
    /// Condemned containers left waiting for backup sessions that began before they were
    /// condemned, or for the grace period; a later GC deletes them.
    #[serde(default)]
    pub waiting: usize,
    /// Containers left unjudged because a backup session that is still running may have
    /// written them (a later GC judges them).
    #[serde(default)]
    pub young: usize,
    /// Condemned containers found live again (a session that began before they were
    /// condemned committed a snapshot using them): kept.
    #[serde(default)]
    pub revived: usize,
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
        let mut me = Self {
            live: HashSet::new(),
            frames: HashSet::with_capacity(live.len()),
            unconfirmed: HashMap::with_capacity(live.len()),
            unlocated: HashSet::new(),
        };
        me.add(repo, live)?;
        Ok(me)
    }

    /// Counts more blobs live (those of snapshots committed since the first mark).
    fn add(&mut self, repo: &Repository, live: HashSet<Digest>) -> Result<()> {
        let digests: Vec<Digest> = live.iter().copied().collect();
        let locs = repo.index().get_many(&digests)?;
        for (d, l) in digests.iter().zip(locs) {
            match l {
                Some(l) => {
                    self.frames.insert((l.container, u64::from(l.offset)));
                    self.unconfirmed
                        .insert(*d, (l.container, u64::from(l.offset)));
                }
                None => {
                    self.unlocated.insert(*d);
                }
            }
        }
        self.live.extend(live);
        Ok(())
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

/// Marks what the snapshots not in `marked` reach, adding them to `marked` and their blobs
/// to `live`. Returns how many were marked and how many of them were damaged.
fn mark(
    repo: &Repository,
    marked: &mut HashSet<String>,
    live: &mut HashSet<Digest>,
) -> Result<(usize, usize)> {
    // Manifests never change: those marked already are not read again.
    let (snaps, damaged) = repo.scan_snapshots_but(|id| marked.contains(id))?;
    let (mut n, mut n_damaged) = (0, 0);
    for s in &snaps {
        if marked.insert(s.id.to_string()) {
            repo.reachable(s, live)?;
            n += 1;
        }
    }
    for d in &damaged {
        if !marked.insert(d.id.to_string()) {
            continue;
        }
        let root = d.root.filter(|r| repo.locate(r).ok().flatten().is_some());
        let Some(root) = root else {
            return Err(VaultError::Invalid(format!(
                "snapshot {} is damaged ({}) and names no readable recipe: GC would lose \
                 its data; forget it (`cairn repo forget {}`) or restore its manifest first",
                d.id, d.problem, d.id
            )));
        };
        tracing::warn!("gc: keeping the data of damaged snapshot {}", d.id);
        repo.reachable_from(&root, live)?;
        n_damaged += 1;
    }
    Ok((n, n_damaged))
}

/// Plans and (unless [`GcOptions::dry_run`]) runs a GC.
pub fn gc(repo: &Repository, opts: &GcOptions) -> Result<GcPlan> {
    let lock = RepoLock::acquire_gc(repo.store().clone())?;
    // Also reads the condemned set a GC elsewhere may have changed.
    repo.refresh_index()?;
    let condemned = repo.condemned();
    // A container written since the oldest running session began may be that session's,
    // referenced by no snapshot yet: it is left for a later GC rather than condemned (which
    // would make the session store its own segments again).
    let young_from = session_starts(repo.store().as_ref())?
        .into_iter()
        .min()
        .map(|b| b.saturating_sub(GC_CLOCK_MARGIN));
    let mut marked = HashSet::new();
    let mut live: HashSet<Digest> = HashSet::new();
    let (snapshots, damaged) = mark(repo, &mut marked, &mut live)?;
    let mut plan = GcPlan {
        snapshots,
        live_blobs: live.len(),
        damaged_snapshots_kept: damaged,
        ..Default::default()
    };
    let mut liveness = Liveness::new(repo, live)?;
    let containers = repo.list_containers_dated()?;
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
    for (c, size, written) in &containers {
        let recs = match repo.container_records(c) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("gc: leaving unreadable container {c} alone: {e}");
                continue;
            }
        };
        liveness.confirm(c, &recs);
        // Condemned ones are judged when they settle.
        if locked.contains(c) || condemned.contains_key(c) {
            continue;
        }
        if young_from.is_some_and(|y| written.is_some_and(|w| w >= y)) {
            plan.young += 1;
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
    if opts.dry_run {
        plan.waiting = condemned.len();
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
    {
        // The copies are newer than the originals: the index prefers them from now on.
        let mut ix = repo.index_mut();
        for (id, recs) in &new_containers {
            ix.add_container_preferred(*id, recs);
        }
        ix.flush()?;
    }
    let mut set = condemned;
    let t = now();
    for c in plan.delete.iter().chain(&plan.repack) {
        set.insert(*c, t);
    }
    repo.set_condemned(set)?;
    cairn_types::fault::point("vault.gc.after_condemn");
    let present: HashSet<ContainerId> = containers.iter().map(|(c, ..)| *c).collect();
    settle(
        repo,
        opts.grace(repo),
        &present,
        &locked,
        &mut liveness,
        &mut marked,
        &mut plan,
    )?;
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

/// Deletes the condemned containers whose time has come (see the module docs), revives
/// those found live again, and leaves the others waiting.
fn settle(
    repo: &Repository,
    grace: u64,
    present: &HashSet<ContainerId>,
    locked: &HashSet<ContainerId>,
    liveness: &mut Liveness,
    marked: &mut HashSet<String>,
    plan: &mut GcPlan,
) -> Result<()> {
    // The sessions first, then the snapshots: a session that ends in between has committed
    // by the time the snapshots are listed.
    let sessions = session_starts(repo.store().as_ref())?;
    let mut newly_live = HashSet::new();
    mark(repo, marked, &mut newly_live)?;
    newly_live.retain(|d| !liveness.live.contains(d));
    liveness.add(repo, newly_live)?;
    let t = now();
    let before: Condemned = repo.condemned();
    let mut set = before.clone();
    let mut doomed = HashSet::new();
    for (c, since) in &before {
        if !present.contains(c) {
            set.remove(c); // deleted by a GC that stopped before it could say so
            continue;
        }
        let waited = t.saturating_sub(*since) >= grace;
        let unseen = sessions.iter().all(|&b| b > since + GC_CLOCK_MARGIN);
        if !(waited && unseen) {
            continue;
        }
        let recs = match repo.container_records(c) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("gc: leaving unreadable condemned container {c} alone: {e}");
                continue;
            }
        };
        if locked.contains(c) || still_needed(repo, &liveness.live, c, &recs)? {
            tracing::info!("gc: condemned container {c} is in use again; kept");
            set.remove(c);
            plan.revived += 1;
        } else {
            doomed.insert(*c);
        }
    }
    if !doomed.is_empty() {
        {
            let mut ix = repo.index_mut();
            repo.note_gone(&doomed);
            ix.rewrite(&doomed)?;
        }
        cairn_types::fault::point("vault.gc.after_index");
        for c in &doomed {
            // Protected while a lock (now expired) held its data.
            repo.store().release(&container_key(c))?;
            repo.store().delete(&container_key(c))?;
        }
        repo.drop_cached_nodes(doomed.iter().copied());
        set.retain(|c, _| !doomed.contains(c));
    }
    plan.waiting = set.len();
    let mut deleted: Vec<ContainerId> = doomed.into_iter().collect();
    deleted.sort_unstable();
    plan.deleted = deleted;
    if set != before {
        repo.set_condemned(set)?;
    }
    Ok(())
}

/// Does a live blob depend on this condemned container? Asked of the index as it is now
/// (after repacks, and after sessions that stored segments again): a live blob the index
/// locates here, or nowhere, or in a container known to be deleted, keeps it.
fn still_needed(
    repo: &Repository,
    live: &HashSet<Digest>,
    c: &ContainerId,
    recs: &[Record],
) -> Result<bool> {
    let digests: Vec<Digest> = recs
        .iter()
        .map(|r| r.digest)
        .filter(|d| live.contains(d))
        .collect();
    if digests.is_empty() {
        return Ok(false);
    }
    let locs = repo.index().get_many(&digests)?;
    Ok(locs
        .iter()
        .any(|l| l.is_none_or(|l| l.container == *c || repo.is_gone(&l.container))))
}
