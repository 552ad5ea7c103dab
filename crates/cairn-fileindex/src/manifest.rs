//! The manifest: the single source of truth of what the index holds.
//!
//! Readers see exactly the files and backups the current `MANIFEST` names; every other file
//! in the directory is either garbage from an interrupted operation or about to be
//! committed. A commit writes `MANIFEST.tmp`, fsyncs it, renames it over `MANIFEST` and
//! fsyncs the directory.
//!
//! Body (framed by [`crate::format::seal`]):
//!
//! ```text
//! generation next_seq next_path_id next_record_id
//! path_packs   { seq first_id count }*
//! record_packs { seq first_id count }*
//! backups      { backup_id(str) vm(str) created_ms(zz) has_parent(u8) [parent(str)]
//!                listing_seq has_base(u8) [base_seq] files listing_bytes }*
//! ```
//!
//! File names derive from sequence numbers: `paths-<seq>.cfp`, `records-<seq>.cfr`,
//! `listing-<seq>.cfl` (seq as 16 hex digits). Sequence numbers only grow.

use std::collections::HashSet;

use crate::error::DecodeError;
use crate::format::{
    MAX_BACKUPS, MAX_ID, MAX_ID_LEN, MAX_PACK_ITEMS, MAX_PATH_IDS, MAX_RECORD_IDS, Reader, Writer,
};
use crate::listing::MAX_CHAIN_READ;

/// A pack named by the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackRef {
    pub seq: u64,
    pub first_id: u32,
    pub count: u32,
}

/// A backup named by the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRef {
    pub backup_id: String,
    pub vm: String,
    pub created_ms: i64,
    pub parent: Option<String>,
    pub listing_seq: u64,
    /// For a delta listing: the listing (of another backup) it is based on.
    pub base: Option<u64>,
    pub files: u64,
    pub listing_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub generation: u64,
    pub next_seq: u64,
    /// One past the largest path id ever assigned (ids start at 1; 0 is the root).
    pub next_path_id: u32,
    /// One past the largest record id ever assigned (ids start at 1).
    pub next_record_id: u32,
    pub path_packs: Vec<PackRef>,
    pub record_packs: Vec<PackRef>,
    pub backups: Vec<BackupRef>,
}

pub fn paths_file(seq: u64) -> String {
    format!("paths-{seq:016x}.cfp")
}

pub fn records_file(seq: u64) -> String {
    format!("records-{seq:016x}.cfr")
}

pub fn listing_file(seq: u64) -> String {
    format!("listing-{seq:016x}.cfl")
}

/// Whether a directory entry is one of the index's data files (a candidate for cleanup).
pub fn is_data_file(name: &str) -> bool {
    let sans_tmp = name.strip_suffix(".tmp").unwrap_or(name);
    ["paths-", "records-", "listing-"]
        .iter()
        .any(|p| sans_tmp.starts_with(p))
        && [".cfp", ".cfr", ".cfl"]
            .iter()
            .any(|s| sans_tmp.ends_with(s))
}

impl Manifest {
    pub fn empty() -> Self {
        Self {
            next_path_id: 1,
            next_record_id: 1,
            ..Self::default()
        }
    }

    /// Names of every file this manifest references.
    pub fn files(&self) -> HashSet<String> {
        let mut s = HashSet::new();
        s.extend(self.path_packs.iter().map(|p| paths_file(p.seq)));
        s.extend(self.record_packs.iter().map(|p| records_file(p.seq)));
        s.extend(self.backups.iter().map(|b| listing_file(b.listing_seq)));
        s
    }

    pub fn backup(&self, id: &str) -> Option<&BackupRef> {
        self.backups.iter().find(|b| b.backup_id == id)
    }

    /// The backup whose listing has sequence number `seq`.
    pub fn by_listing(&self, seq: u64) -> Option<&BackupRef> {
        self.backups.iter().find(|b| b.listing_seq == seq)
    }

    /// Number of delta listings from `b` down to its full listing (0 for a full one); fails
    /// on a missing base or a chain longer than [`MAX_CHAIN_READ`] (which includes cycles).
    pub fn chain_len(&self, b: &BackupRef) -> Result<u32, String> {
        let mut cur = b;
        let mut n = 0;
        while let Some(base) = cur.base {
            n += 1;
            if n > MAX_CHAIN_READ {
                return Err("delta chain too long or cyclic".into());
            }
            cur = self
                .by_listing(base)
                .ok_or_else(|| format!("base listing {base} is not in the manifest"))?;
        }
        Ok(n)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.generation);
        w.u64(self.next_seq);
        w.u64(u64::from(self.next_path_id));
        w.u64(u64::from(self.next_record_id));
        for packs in [&self.path_packs, &self.record_packs] {
            w.u64(packs.len() as u64);
            for p in packs {
                w.u64(p.seq);
                w.u64(u64::from(p.first_id));
                w.u64(u64::from(p.count));
            }
        }
        w.u64(self.backups.len() as u64);
        for b in &self.backups {
            w.str(&b.backup_id);
            w.str(&b.vm);
            w.i64(b.created_ms);
            match &b.parent {
                Some(p) => {
                    w.buf.push(1);
                    w.str(p);
                }
                None => w.buf.push(0),
            }
            w.u64(b.listing_seq);
            match b.base {
                Some(s) => {
                    w.buf.push(1);
                    w.u64(s);
                }
                None => w.buf.push(0),
            }
            w.u64(b.files);
            w.u64(b.listing_bytes);
        }
        w.buf
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, 0);
        let mut m = Manifest {
            generation: r.u64()?,
            next_seq: r.u64()?,
            next_path_id: r.bounded(MAX_PATH_IDS, "next path id")? as u32,
            next_record_id: r.bounded(MAX_RECORD_IDS, "next record id")? as u32,
            ..Manifest::default()
        };
        if m.next_path_id == 0 || m.next_record_id == 0 {
            return Err(r.err("next ids must be at least 1"));
        }
        let mut seqs = HashSet::new();
        for (kind, next_id) in [(0, m.next_path_id), (1, m.next_record_id)] {
            let n = r.bounded(MAX_BACKUPS, "pack count")?;
            let mut packs = Vec::with_capacity(n.min(body.len() as u64) as usize);
            let mut next_free = 1u64;
            for _ in 0..n {
                let p = PackRef {
                    seq: r.u64()?,
                    first_id: r.bounded(MAX_ID, "first id")? as u32,
                    count: r.bounded(MAX_PACK_ITEMS, "pack size")? as u32,
                };
                let end = u64::from(p.first_id) + u64::from(p.count);
                if u64::from(p.first_id) < next_free || end > u64::from(next_id) {
                    return Err(r.err("packs overlap or exceed the next id"));
                }
                if p.seq >= m.next_seq || !seqs.insert(p.seq) {
                    return Err(r.err(format!("bad file sequence number {}", p.seq)));
                }
                next_free = end;
                packs.push(p);
            }
            if kind == 0 {
                m.path_packs = packs;
            } else {
                m.record_packs = packs;
            }
        }
        let n = r.bounded(MAX_BACKUPS, "backup count")?;
        let mut ids = HashSet::new();
        for _ in 0..n {
            let backup_id = r.str(MAX_ID_LEN, "backup id")?.to_string();
            let vm = r.str(MAX_ID_LEN, "vm")?.to_string();
            let created_ms = r.i64()?;
            let parent = match r.u8()? {
                0 => None,
                1 => Some(r.str(MAX_ID_LEN, "parent id")?.to_string()),
                x => return Err(r.err(format!("bad parent flag {x}"))),
            };
            let listing_seq = r.u64()?;
            if listing_seq >= m.next_seq || !seqs.insert(listing_seq) {
                return Err(r.err(format!("bad file sequence number {listing_seq}")));
            }
            if !ids.insert(backup_id.clone()) {
                return Err(r.err(format!("backup {backup_id:?} listed twice")));
            }
            let base = match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                x => return Err(r.err(format!("bad base flag {x}"))),
            };
            m.backups.push(BackupRef {
                backup_id,
                vm,
                created_ms,
                parent,
                listing_seq,
                base,
                files: r.u64()?,
                listing_bytes: r.u64()?,
            });
        }
        if !r.is_empty() {
            return Err(r.err("trailing bytes after manifest"));
        }
        for b in &m.backups {
            m.chain_len(b)
                .map_err(|e| r.err(format!("backup {:?}: {e}", b.backup_id)))?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checks() {
        let m = Manifest {
            generation: 3,
            next_seq: 10,
            next_path_id: 50,
            next_record_id: 40,
            path_packs: vec![PackRef {
                seq: 1,
                first_id: 1,
                count: 49,
            }],
            record_packs: vec![
                PackRef {
                    seq: 2,
                    first_id: 1,
                    count: 20,
                },
                PackRef {
                    seq: 5,
                    first_id: 21,
                    count: 19,
                },
            ],
            backups: vec![BackupRef {
                backup_id: "b1".into(),
                vm: "web".into(),
                created_ms: 1_700_000_000_000,
                parent: Some("b0".into()),
                listing_seq: 3,
                base: None,
                files: 49,
                listing_bytes: 100,
            }],
        };
        let body = m.encode();
        assert_eq!(Manifest::decode(&body).unwrap(), m);
        assert_eq!(m.files().len(), 4);
        let mut overlap = m.clone();
        overlap.record_packs[1].first_id = 20;
        assert!(Manifest::decode(&overlap.encode()).is_err());
        let mut seq = m.clone();
        seq.backups[0].listing_seq = 2;
        assert!(Manifest::decode(&seq.encode()).is_err());
        let mut cyclic = m.clone();
        cyclic.backups[0].base = Some(3);
        assert!(Manifest::decode(&cyclic.encode()).is_err());
        let mut dangling = m.clone();
        dangling.backups[0].base = Some(4);
        assert!(Manifest::decode(&dangling.encode()).is_err());
        assert!(is_data_file("records-0000000000000001.cfr.tmp"));
        assert!(!is_data_file("MANIFEST"));
    }
}
