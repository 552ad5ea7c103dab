//! Repair: rebuild what can be rebuilt, forget only what cannot be read, and report both.
//!
//! Under the exclusive lock, in this order:
//!
//! 1. **Config**: the config and its copy are written again from the one in use.
//! 2. **Index**: runs that fail their checksums are dropped and rebuilt from the containers.
//! 3. **Trailers**: a container whose footer or trailer is damaged is rebuilt from the index
//!    entries that still point into it. Each such segment is read and re-hashed; intact
//!    frames are copied whole into a new container (a frame only some of whose members are
//!    known is decoded and its known members stored again one by one), the index is pointed
//!    at the new container, and only then is the damaged one deleted. A segment that neither
//!    the index knows nor another container holds is reported lost.
//! 4. **Manifests**: a damaged manifest whose recipe root can still be read is written again
//!    from that tree (size and entry count recomputed; name and time salvaged where they can
//!    be read, else marked as recovered); one whose root cannot be read is forgotten.
//!
//! Repair never deletes a container it has not first copied every readable segment out of,
//! and never forgets a snapshot whose recipe it can read. With `dry_run` it only reports.

use std::collections::{BTreeMap, HashMap};

use cairn_chunk::container::ContainerBuilder;
use cairn_chunk::recipe::{Node, TreeRoot};
use cairn_chunk::{EncodedSegment, Encoder, codec};
use cairn_types::{ContainerId, Digest, SnapshotId};

use crate::error::Result;
use crate::index::Location;
use crate::lock::RepoLock;
use crate::manifest::{DamagedSnapshot, SnapshotManifest};
use crate::repo::{Repository, container_key, snapshot_key};

/// What repair did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RepairReport {
    pub config_rewritten: bool,
    /// Index runs dropped and rebuilt.
    pub index_runs_rebuilt: usize,
    /// Containers whose trailer was rebuilt: (old, new, segments kept).
    pub containers_rebuilt: Vec<(ContainerId, ContainerId, usize)>,
    /// Segments of damaged containers that could not be read back.
    pub segments_lost: usize,
    /// Damaged manifests written again from their recipe.
    pub snapshots_rebuilt: Vec<String>,
    /// Damaged manifests forgotten (their recipe cannot be read).
    pub snapshots_forgotten: Vec<String>,
    pub executed: bool,
}

/// Repairs the repository. See the module docs.
pub fn repair(repo: &Repository, dry_run: bool) -> Result<RepairReport> {
    let lock = RepoLock::acquire(repo.store().clone(), true, "repair")?;
    let mut rep = RepairReport::default();
    if repo.check_config_copies().is_err() {
        rep.config_rewritten = true;
        if !dry_run {
            repo.rewrite_config()?;
        }
    }
    rep.index_runs_rebuilt = repo.check_index()?.1.len();
    repo.sync_index()?;
    rebuild_trailers(repo, dry_run, &mut rep)?;
    repair_manifests(repo, dry_run, &mut rep)?;
    rep.executed = !dry_run;
    lock.release()?;
    Ok(rep)
}

fn rebuild_trailers(repo: &Repository, dry_run: bool, rep: &mut RepairReport) -> Result<()> {
    let damaged: Vec<ContainerId> = repo
        .list_containers()?
        .into_iter()
        .filter(|(c, _)| repo.container_records(c).is_err())
        .map(|(c, _)| c)
        .collect();
    if damaged.is_empty() {
        return Ok(());
    }
    // Per damaged container, its index entries by (frame offset, place in the frame).
    type Known = BTreeMap<(u32, u32), (Digest, Location)>;
    let mut known: HashMap<ContainerId, Known> = HashMap::new();
    for (d, l) in repo.index().all_entries()? {
        if damaged.contains(&l.container) {
            known
                .entry(l.container)
                .or_default()
                .insert((l.offset, l.inner), (d, l));
        }
    }
    let mut encoder = Encoder::sealing(repo.config().compression, repo.keys().cloned());
    for c in damaged {
        let entries: Vec<(Digest, Location)> =
            known.remove(&c).unwrap_or_default().into_values().collect();
        let data = repo.store().get(&container_key(&c))?;
        let mut builder = ContainerBuilder::new();
        let mut kept = 0;
        // Entries are in (offset, inner) order: one frame's members are neighbours.
        let mut i = 0;
        while i < entries.len() {
            let off = entries[i].1.offset;
            let j = i + entries[i..]
                .iter()
                .take_while(|e| e.1.offset == off)
                .count();
            kept += copy_frame(&data, &entries[i..j], &mut builder, &mut encoder, rep);
            i = j;
        }
        let new = ContainerId::random();
        rep.containers_rebuilt.push((c, new, kept));
        if dry_run {
            continue;
        }
        let doomed = std::iter::once(c).collect();
        let mut ix = repo.index_mut();
        if !builder.is_empty() {
            let (bytes, records) = builder.finish();
            repo.store().put(&container_key(&new), &bytes)?;
            ix.add_container(new, &records);
        }
        ix.rewrite(&doomed)?;
        drop(ix);
        repo.store().delete(&container_key(&c))?;
    }
    Ok(())
}

/// Copies one frame's readable members (`members`: the index entries of one frame, in order)
/// into `builder`; returns how many it kept.
fn copy_frame(
    data: &[u8],
    members: &[(Digest, Location)],
    builder: &mut ContainerBuilder,
    encoder: &mut Encoder,
    rep: &mut RepairReport,
) -> usize {
    let l = members[0].1;
    let Some(stored) = data.get(l.offset as usize..l.offset as usize + l.stored_len as usize)
    else {
        rep.segments_lost += members.len();
        return 0;
    };
    let keys = encoder.keys().cloned();
    let keys = keys.as_deref();
    let Ok(frame) = codec::decode_frame(keys, l.codec, stored, l.frame_len as usize, &members[0].0)
    else {
        rep.segments_lost += members.len();
        return 0;
    };
    let intact: Vec<&(Digest, Location)> = members
        .iter()
        .filter(|(d, m)| codec::member_of(keys, &frame, m.member(), d).is_ok())
        .collect();
    rep.segments_lost += members.len() - intact.len();
    // A frame whose members are all known and intact is copied whole, bytes unchanged.
    let contiguous = intact.len() == members.len()
        && members.iter().map(|m| m.1.raw_len).sum::<u32>() == l.frame_len
        && members
            .iter()
            .scan(0u32, |at, m| {
                let ok = m.1.inner == *at;
                *at += m.1.raw_len;
                Some(ok)
            })
            .all(|ok| ok);
    if contiguous {
        let list: Vec<(Digest, u32)> = members.iter().map(|(d, m)| (*d, m.raw_len)).collect();
        let seg = EncodedSegment {
            codec: l.codec,
            bytes: stored.to_vec(),
        };
        builder.push_frame(l.kind, &list, &seg);
    } else {
        for (d, m) in &intact {
            let piece = &frame[m.inner as usize..(m.inner + m.raw_len) as usize];
            builder.push_frame(m.kind, &[(*d, m.raw_len)], &encoder.encode(piece));
        }
    }
    intact.len()
}

fn repair_manifests(repo: &Repository, dry_run: bool, rep: &mut RepairReport) -> Result<()> {
    let (_, damaged) = repo.scan_snapshots()?;
    for d in damaged {
        match rebuild_manifest(repo, &d)? {
            Some(m) => {
                rep.snapshots_rebuilt.push(d.id.clone());
                if !dry_run {
                    repo.store().put(&snapshot_key(&m.id), &m.to_stored())?;
                }
            }
            None => {
                rep.snapshots_forgotten.push(d.id.clone());
                if !dry_run {
                    repo.forget_damaged(&d.id)?;
                }
            }
        }
    }
    Ok(())
}

/// A manifest rebuilt from the recipe a damaged one names, if that recipe can be read.
fn rebuild_manifest(repo: &Repository, d: &DamagedSnapshot) -> Result<Option<SnapshotManifest>> {
    let (Some(root), Ok(id)) = (d.root, d.id.parse::<SnapshotId>()) else {
        return Ok(None);
    };
    let Ok(node) = repo.read_node(&root) else {
        return Ok(None);
    };
    let (size, entries) = match &node {
        Node::Leaf(es) => (es.iter().map(|e| u64::from(e.len)).sum(), es.len() as u64),
        Node::Inner { children, .. } => (
            children.iter().map(|c| c.span_bytes).sum(),
            children.iter().map(|c| c.span_entries).sum(),
        ),
    };
    let raw = repo.store().get(&snapshot_key(&id)).unwrap_or_default();
    let salvaged = d.salvaged_fields(&raw);
    let mut m = SnapshotManifest {
        id,
        name: salvaged
            .name
            .unwrap_or_else(|| format!("recovered-{}", &d.id[..8.min(d.id.len())])),
        created: salvaged.created.unwrap_or_else(crate::manifest::now),
        created_ms: 0,
        size,
        root: TreeRoot {
            digest: root,
            level: node.level(),
            size,
            entries,
        },
        chunker: salvaged.chunker.unwrap_or(repo.config().chunker),
        parent: None,
        stats: Default::default(),
        labels: [("recovered".to_string(), "by cairn repo repair".to_string())].into(),
        sealed: None,
        checksum: None,
    };
    m.created_ms = m.created * 1000;
    // The whole tree must read, or the rebuilt manifest would promise what it cannot give.
    if repo.entries(&m).is_err() {
        return Ok(None);
    }
    m.seal();
    Ok(Some(m))
}
