//! Verify: re-read every container, re-hash every blob, and walk every snapshot's tree, naming
//! the snapshots that reach damaged or missing data.

use std::collections::{HashMap, HashSet};

use cairn_chunk::recipe::Node;
use cairn_chunk::{EntryKind, FrameCache};
use cairn_types::{ContainerId, Digest, SnapshotId};

use crate::error::Result;
use crate::index::Location;
use crate::repo::{Repository, container_key, segment_error};

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    pub container: Option<ContainerId>,
    pub digest: Option<Digest>,
    pub problem: String,
}

/// What verify found.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub containers: usize,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub damage: Vec<Damage>,
    /// Snapshots that reach damaged or missing data, with their names.
    pub damaged_snapshots: Vec<(SnapshotId, String)>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damage.is_empty() && self.damaged_snapshots.is_empty()
    }
}

/// Verifies the repository. With `read_data`, every blob of every container is decoded and
/// re-hashed; without, only container trailers and trees are checked.
pub fn verify(repo: &Repository, read_data: bool) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    let mut bad: HashSet<Digest> = HashSet::new();
    let mut good: HashMap<Digest, Location> = HashMap::new();
    let containers = repo.list_containers()?;
    rep.containers = containers.len();
    for (c, _) in &containers {
        let recs = match repo.container_records(c) {
            Ok(r) => r,
            Err(e) => {
                rep.damage.push(Damage {
                    container: Some(*c),
                    digest: None,
                    problem: e.to_string(),
                });
                continue;
            }
        };
        let data = if read_data {
            match repo.store().get(&container_key(c)) {
                Ok(b) => Some(b),
                Err(e) => {
                    rep.damage.push(Damage {
                        container: Some(*c),
                        digest: None,
                        problem: e.to_string(),
                    });
                    recs.iter().for_each(|r| {
                        bad.insert(r.digest);
                    });
                    continue;
                }
            }
        } else {
            None
        };
        // Each frame is decoded once for all its members.
        let mut frames = FrameCache::new();
        for r in &recs {
            let loc = Location::from_record(*c, r);
            if let Some(bytes) = &data {
                let blob = &bytes[r.offset as usize..(r.offset + u64::from(r.stored_len)) as usize];
                rep.blobs_checked += 1;
                rep.bytes_checked += u64::from(r.raw_len);
                let got = frames
                    .member(r.offset, r.codec, blob, r.member(), &r.digest)
                    .map_err(|e| segment_error(&r.digest, &loc, e));
                if let Err(e) = got {
                    rep.damage.push(Damage {
                        container: Some(*c),
                        digest: Some(r.digest),
                        problem: e.to_string(),
                    });
                    bad.insert(r.digest);
                    continue;
                }
            }
            good.insert(r.digest, loc);
        }
    }
    // A digest with one good copy is fine even if another copy is damaged.
    bad.retain(|d| !good.contains_key(d));

    let snaps = repo.list_snapshots()?;
    rep.snapshots = snaps.len();
    let mut memo: HashMap<Digest, bool> = HashMap::new();
    for s in &snaps {
        if !tree_ok(
            repo,
            &s.root.digest,
            &good,
            &bad,
            &mut memo,
            &mut rep.damage,
        ) {
            rep.damaged_snapshots.push((s.id, s.name.clone()));
        }
    }
    rep.damage.sort_by(|a, b| a.problem.cmp(&b.problem));
    rep.damage.dedup();
    Ok(rep)
}

/// Whether the subtree below `d` is intact; memoised, so shared subtrees are checked once.
fn tree_ok(
    repo: &Repository,
    d: &Digest,
    good: &HashMap<Digest, Location>,
    bad: &HashSet<Digest>,
    memo: &mut HashMap<Digest, bool>,
    damage: &mut Vec<Damage>,
) -> bool {
    if let Some(&ok) = memo.get(d) {
        return ok;
    }
    let ok = match repo.read_node(d) {
        Ok(Node::Leaf(es)) => {
            let mut ok = true;
            for e in es.iter().filter(|e| e.kind == EntryKind::Data) {
                if !good.contains_key(&e.digest) || bad.contains(&e.digest) {
                    damage.push(Damage {
                        container: None,
                        digest: Some(e.digest),
                        problem: "segment missing or damaged".into(),
                    });
                    ok = false;
                }
            }
            ok
        }
        Ok(Node::Inner { children, .. }) => {
            let mut ok = true;
            for c in children {
                ok &= tree_ok(repo, &c.digest, good, bad, memo, damage);
            }
            ok
        }
        Err(e) => {
            damage.push(Damage {
                container: None,
                digest: Some(*d),
                problem: format!("tree node: {e}"),
            });
            false
        }
    };
    memo.insert(*d, ok);
    ok
}
