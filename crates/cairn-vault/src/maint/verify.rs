//! Verify: check every kind of object the repository holds and name what is damaged.
//!
//! | object | check |
//! |---|---|
//! | config | parses, and its backup copy (if any) agrees |
//! | containers | footer and trailer checksum; with `read_data`, every frame decoded and every segment re-hashed |
//! | sealed frames (encrypted) | always, without the key: layout and keyless checksum of every frame; with `read_data` and the key: every frame opened and every segment's keyed fingerprint checked |
//! | index (local cache) | every page against its checksum; every entry names a frame some container record confirms; every container record is findable. A damaged run is rebuilt from the containers |
//! | snapshot manifests | parse, checksum, size against the recipe, id against the object's name |
//! | recipe trees | every node decodes, every segment it names has an intact copy |
//!
//! A container whose trailer is damaged is still read through the index entries that point
//! into it (a restore can still read them; `cairn repo repair` rebuilds the trailer). Damaged
//! segment copies found with `read_data` are *marked*, so that the next backup that has their
//! data stores them again and heals every snapshot that needs them (see [`crate::repo`]).
//! The report names each damaged object once, and each snapshot with what it lacks.

use std::collections::{HashMap, HashSet};

use cairn_chunk::FrameCache;
use cairn_chunk::format::CONTAINER_MAGIC;
use cairn_types::{ContainerId, Digest};

use crate::error::{Result, VaultError};
use crate::index::Location;
use crate::repo::{Repository, container_key, segment_error};

/// One damaged object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    pub container: Option<ContainerId>,
    pub digest: Option<Digest>,
    pub problem: String,
}

/// What verify found about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotCheck {
    /// The snapshot's id (for a damaged manifest, the id its object is named after).
    pub id: String,
    pub name: String,
    pub ok: bool,
    /// Segments and tree nodes it reaches that have no intact copy.
    pub missing: u64,
    pub problem: Option<String>,
}

/// What verify found.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub containers: usize,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub index_entries_checked: u64,
    pub damage: Vec<Damage>,
    /// Snapshots that reach damaged or missing data, or whose manifest is damaged.
    pub damaged_snapshots: Vec<(String, String)>,
    /// Every snapshot, intact or not.
    #[serde(default)]
    pub per_snapshot: Vec<SnapshotCheck>,
    /// Digests of every damaged segment copy found (for scripts; the text report groups
    /// them per container).
    #[serde(default)]
    pub damaged_segments: Vec<Digest>,
    /// Damaged segment copies marked for healing by the next backup.
    #[serde(default)]
    pub marked: usize,
    /// Damaged copies that have an intact copy elsewhere (GC collects them).
    #[serde(default)]
    pub superseded: usize,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damage.is_empty() && self.damaged_snapshots.is_empty()
    }

    fn damage(&mut self, container: Option<ContainerId>, problem: impl Into<String>) {
        self.damage.push(Damage {
            container,
            digest: None,
            problem: problem.into(),
        });
    }
}

/// Verifies the repository. With `read_data`, every blob of every container is decoded and
/// re-hashed; without, only container trailers, the index and trees are checked. In an
/// encrypted repository every sealed frame's ciphertext is checked in any case (no key
/// needed); its plaintext only with `read_data` and the key.
pub fn verify(repo: &Repository, read_data: bool) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    check_config(repo, &mut rep);
    check_index_pages(repo, &mut rep)?;
    let containers = repo.list_containers()?;
    rep.containers = containers.len();
    let listed: HashSet<ContainerId> = containers.iter().map(|c| c.0).collect();
    // Index entries by container, for containers whose trailer cannot be read.
    let mut by_container: Option<HashMap<ContainerId, Vec<(Digest, Location)>>> = None;
    let mut bad: Vec<(Digest, Location)> = Vec::new();
    let mut good: HashMap<Digest, Location> = HashMap::new();
    let mut records_seen: HashSet<(Digest, ContainerId, u32)> = HashSet::new();
    for (c, _) in &containers {
        let recs: Vec<(Digest, Location)> = match repo.container_records(c) {
            Ok(r) => r
                .iter()
                .map(|r| (r.digest, Location::from_record(*c, r)))
                .collect(),
            Err(e) => {
                let map = match &mut by_container {
                    Some(m) => m,
                    None => by_container.insert(entries_by_container(repo)?),
                };
                let known = map.remove(c).unwrap_or_default();
                rep.damage(
                    Some(*c),
                    format!(
                        "{e}; {} of its segments are known to the index (`cairn repo repair` \
                         rebuilds the trailer)",
                        known.len()
                    ),
                );
                known
            }
        };
        let data = if read_data || repo.is_encrypted() {
            match repo.store().get(&container_key(c)) {
                Ok(b) => Some(b),
                Err(e) => {
                    rep.damage(Some(*c), e.to_string());
                    bad.extend(recs.iter().copied());
                    continue;
                }
            }
        } else {
            None
        };
        if let Some(bytes) = &data
            && let Err(why) = check_layout(bytes, &recs)
        {
            rep.damage(Some(*c), why);
        }
        let mut frames = FrameCache::new();
        let open = read_data && repo.keys().is_some();
        let mut damaged_here = 0u64;
        for (d, loc) in &recs {
            records_seen.insert((*d, *c, loc.offset));
            if let Some(bytes) = &data {
                let (from, to) = (
                    loc.offset as usize,
                    loc.offset as usize + loc.stored_len as usize,
                );
                let got = match bytes.get(from..to) {
                    Some(blob) if loc.codec.is_sealed() && !open => {
                        cairn_chunk::crypto::check_sealed(blob)
                            .map(|_| Vec::new())
                            .map_err(|source| VaultError::Format {
                                container: *c,
                                source,
                            })
                    }
                    Some(blob) => frames
                        .member(
                            repo.keys().map(|k| &**k),
                            (loc.container, loc.offset),
                            loc.codec,
                            blob,
                            loc.member(),
                            d,
                        )
                        .map_err(|e| segment_error(d, loc, e)),
                    None => Err(VaultError::Corrupt(format!(
                        "segment {d:?} lies past the end of its container"
                    ))),
                };
                rep.blobs_checked += 1;
                rep.bytes_checked += u64::from(loc.raw_len);
                if got.is_err() {
                    damaged_here += 1;
                    bad.push((*d, *loc));
                    continue;
                }
            }
            good.insert(*d, *loc);
        }
        if damaged_here > 0 {
            rep.damage(
                Some(*c),
                format!("{damaged_here} segments fail their checksums"),
            );
        }
    }
    check_index_entries(repo, &listed, &records_seen, &mut rep)?;
    rep.damaged_segments = bad.iter().map(|(d, _)| *d).collect();
    rep.damaged_segments.sort();
    rep.damaged_segments.dedup();
    // A digest with one good copy is fine even if another copy is damaged.
    let (superseded, lost): (Vec<_>, Vec<_>) =
        bad.into_iter().partition(|(d, _)| good.contains_key(d));
    rep.superseded = superseded.len();
    if !lost.is_empty() {
        rep.marked = lost.len();
        repo.mark_damaged(&lost)?;
    }
    check_snapshots(repo, &good, &mut rep)?;
    Ok(rep)
}

/// The bytes no record covers: the header must be intact and the frames must follow it and
/// each other without a gap (as every writer lays them out).
fn check_layout(bytes: &[u8], recs: &[(Digest, Location)]) -> std::result::Result<(), String> {
    if !bytes.starts_with(&CONTAINER_MAGIC) {
        return Err("container header is damaged".into());
    }
    let mut at = CONTAINER_MAGIC.len() as u64;
    let mut last = None;
    for (_, l) in recs {
        if last == Some(l.offset) {
            continue; // another member of the same frame
        }
        if u64::from(l.offset) != at {
            return Err(format!(
                "{} bytes between frames at offset {at} are not accounted for",
                u64::from(l.offset).abs_diff(at)
            ));
        }
        at += u64::from(l.stored_len);
        last = Some(l.offset);
    }
    Ok(())
}

fn check_config(repo: &Repository, rep: &mut VerifyReport) {
    if let Err(e) = repo.check_config_copies() {
        rep.damage(None, e.to_string());
    }
}

/// Reads every index page; a damaged run is reported and rebuilt from the containers.
fn check_index_pages(repo: &Repository, rep: &mut VerifyReport) -> Result<()> {
    let (entries, rebuilt) = repo.check_index()?;
    rep.index_entries_checked = entries;
    for (path, what) in rebuilt {
        rep.damage(
            None,
            format!("index run {path}: {what} (rebuilt from the containers)"),
        );
    }
    Ok(())
}

/// Every index entry must name a frame a container record confirms, in a container that
/// exists.
fn check_index_entries(
    repo: &Repository,
    listed: &HashSet<ContainerId>,
    records: &HashSet<(Digest, ContainerId, u32)>,
    rep: &mut VerifyReport,
) -> Result<()> {
    let entries = repo.index().all_entries()?;
    let mut missing_containers: HashMap<ContainerId, u64> = HashMap::new();
    let mut wrong = 0u64;
    for (d, l) in &entries {
        if !listed.contains(&l.container) {
            *missing_containers.entry(l.container).or_default() += 1;
        } else if !records.contains(&(*d, l.container, l.offset)) {
            wrong += 1;
        }
    }
    for (c, n) in missing_containers {
        rep.damage(
            Some(c),
            format!("container is missing ({n} index entries name it)"),
        );
    }
    if wrong > 0 {
        rep.damage(
            None,
            format!(
                "{wrong} index entries name no segment of their container (run `cairn repo \
                 repair` to rebuild the index)"
            ),
        );
    }
    Ok(())
}

fn entries_by_container(
    repo: &Repository,
) -> Result<HashMap<ContainerId, Vec<(Digest, Location)>>> {
    let mut m: HashMap<ContainerId, Vec<(Digest, Location)>> = HashMap::new();
    let mut seen = HashSet::new();
    for (d, l) in repo.index().all_entries()? {
        if seen.insert((d, l.container, l.offset)) {
            m.entry(l.container).or_default().push((d, l));
        }
    }
    Ok(m)
}

fn check_snapshots(
    repo: &Repository,
    good: &HashMap<Digest, Location>,
    rep: &mut VerifyReport,
) -> Result<()> {
    let (snaps, damaged) = repo.scan_snapshots()?;
    rep.snapshots = snaps.len() + damaged.len();
    let mut memo: HashMap<Digest, u64> = HashMap::new();
    let mut node_damage: Vec<Damage> = Vec::new();
    for s in &snaps {
        let missing = tree_missing(repo, &s.root.digest, good, &mut memo, &mut node_damage);
        let ok = missing == 0;
        if !ok {
            rep.damaged_snapshots
                .push((s.id.to_string(), s.name.clone()));
        }
        rep.per_snapshot.push(SnapshotCheck {
            id: s.id.to_string(),
            name: s.name.clone(),
            ok,
            missing,
            problem: (!ok).then(|| format!("{missing} segments or tree nodes have no intact copy")),
        });
    }
    for d in damaged {
        rep.damage(None, format!("snapshot manifest {}: {}", d.id, d.problem));
        rep.damaged_snapshots.push((d.id.clone(), String::new()));
        rep.per_snapshot.push(SnapshotCheck {
            id: d.id.clone(),
            name: String::new(),
            ok: false,
            missing: 0,
            problem: Some(format!(
                "manifest damaged: {} (`cairn repo forget {}` removes it)",
                d.problem, d.id
            )),
        });
    }
    node_damage.sort_by(|a, b| a.problem.cmp(&b.problem));
    node_damage.dedup();
    rep.damage.extend(node_damage);
    Ok(())
}

/// How many blobs below `d` have no intact copy; memoised, so shared subtrees are checked
/// once. Without `read_data`, a segment counts as intact when some container lists it.
fn tree_missing(
    repo: &Repository,
    d: &Digest,
    good: &HashMap<Digest, Location>,
    memo: &mut HashMap<Digest, u64>,
    damage: &mut Vec<Damage>,
) -> u64 {
    if let Some(&n) = memo.get(d) {
        return n;
    }
    let n = match repo.node_refs(d) {
        Ok((0, data)) => data.iter().filter(|d| !good.contains_key(d)).count() as u64,
        Ok((_, children)) => children
            .iter()
            .map(|c| tree_missing(repo, c, good, memo, damage))
            .sum(),
        Err(e) => {
            damage.push(Damage {
                container: None,
                digest: Some(*d),
                problem: format!("tree node: {e}"),
            });
            1
        }
    };
    memo.insert(*d, n);
    n
}
