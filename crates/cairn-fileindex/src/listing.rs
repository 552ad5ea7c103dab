//! Listings: what one backup contains, as one sorted `(path id, record id)` array per volume,
//! stored either in full or as the difference from the parent backup's listing.
//!
//! Body (framed by [`crate::format::seal`], so zstd-compressed and checksummed):
//!
//! ```text
//! kind(u8: 0 full, 1 delta)
//! volumes { disk(str) volume(str)
//!           removed_count { path_delta }*       (delta only; full listings write 0)
//!           upsert_count  { path_delta record_delta(zz) }* }*
//! ```
//!
//! A full listing's upserts are its entries. A delta listing is based on the listing the
//! manifest names as its base; each of its volumes is the base's volume of the
//! same name (or nothing) minus `removed` paths, with `upserts` added or replaced. A delta
//! is written when the parent's chain is shorter than [`MAX_CHAIN`] and the difference is
//! at most a quarter of the entries, so reading a listing touches at most `MAX_CHAIN`
//! files, and an unchanged file costs nothing at all in a delta.
//!
//! `path_delta` is the path id minus the previous one in the same list (ids strictly
//! increase; the first is the id itself). `record_delta` is the record id minus (previous
//! record id + 1): records stored in path order give runs of zeros.

use crate::error::DecodeError;
use crate::format::{MAX_ID, MAX_PACK_ITEMS, MAX_VOLUME_NAME_LEN, MAX_VOLUMES, Reader, Writer};

/// Longest chain of delta listings written (the base of the chain is a full listing).
pub const MAX_CHAIN: u32 = 16;
/// Longest chain accepted when reading.
pub const MAX_CHAIN_READ: u32 = 64;

/// One volume of a resolved listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeListing {
    pub disk: String,
    pub volume: String,
    /// Sorted by path id, unique path ids.
    pub entries: Vec<(u32, u32)>,
}

impl VolumeListing {
    /// The record id of `path_id`, if listed.
    pub fn record_of(&self, path_id: u32) -> Option<u32> {
        self.entries
            .binary_search_by_key(&path_id, |e| e.0)
            .ok()
            .map(|i| self.entries[i].1)
    }
}

/// One volume of a listing file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeDiff {
    pub disk: String,
    pub volume: String,
    /// Sorted path ids removed from the base (empty in full listings).
    pub removed: Vec<u32>,
    /// Sorted entries added or replaced.
    pub upserts: Vec<(u32, u32)>,
}

/// A decoded listing file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListingFile {
    /// Whether this is a delta from a base listing (named by the manifest, not here, so a
    /// base can be renumbered without touching its deltas).
    pub delta: bool,
    pub volumes: Vec<VolumeDiff>,
}

/// Checks a disk or volume name.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_VOLUME_NAME_LEN || name.contains(['/', '\0']) {
        return Err(format!("invalid disk or volume name {name:?}"));
    }
    Ok(())
}

impl ListingFile {
    /// A full listing of `volumes`.
    pub fn full(volumes: &[VolumeListing]) -> Self {
        Self {
            delta: false,
            volumes: volumes
                .iter()
                .map(|v| VolumeDiff {
                    disk: v.disk.clone(),
                    volume: v.volume.clone(),
                    removed: Vec::new(),
                    upserts: v.entries.clone(),
                })
                .collect(),
        }
    }

    /// The difference of `volumes` from `base`.
    pub fn delta(base: &[VolumeListing], volumes: &[VolumeListing]) -> Self {
        let mut out = Self {
            delta: true,
            volumes: Vec::with_capacity(volumes.len()),
        };
        for v in volumes {
            let old = base
                .iter()
                .find(|b| b.disk == v.disk && b.volume == v.volume)
                .map_or(&[][..], |b| b.entries.as_slice());
            let mut d = VolumeDiff {
                disk: v.disk.clone(),
                volume: v.volume.clone(),
                ..VolumeDiff::default()
            };
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < v.entries.len() {
                match (old.get(i), v.entries.get(j)) {
                    (Some(o), Some(n)) if o.0 == n.0 => {
                        if o.1 != n.1 {
                            d.upserts.push(*n);
                        }
                        i += 1;
                        j += 1;
                    }
                    (Some(o), Some(n)) if o.0 < n.0 => {
                        d.removed.push(o.0);
                        i += 1;
                    }
                    (Some(o), None) => {
                        d.removed.push(o.0);
                        i += 1;
                    }
                    (_, Some(n)) => {
                        d.upserts.push(*n);
                        j += 1;
                    }
                    (None, None) => unreachable!("loop condition"),
                }
            }
            out.volumes.push(d);
        }
        out
    }

    /// Number of items stored (removals plus upserts).
    pub fn items(&self) -> usize {
        self.volumes
            .iter()
            .map(|v| v.removed.len() + v.upserts.len())
            .sum()
    }

    /// The listing this file describes, given its base's (empty for a full listing).
    pub fn resolve(&self, base: &[VolumeListing]) -> Result<Vec<VolumeListing>, String> {
        let mut out = Vec::with_capacity(self.volumes.len());
        for d in &self.volumes {
            let old = base
                .iter()
                .find(|b| b.disk == d.disk && b.volume == d.volume)
                .map_or(&[][..], |b| b.entries.as_slice());
            let mut entries = Vec::with_capacity(old.len() + d.upserts.len());
            let (mut i, mut j, mut k) = (0, 0, 0);
            while i < old.len() || j < d.upserts.len() {
                let o = old.get(i).copied();
                let u = d.upserts.get(j).copied();
                match (o, u) {
                    (Some(o), u) if u.is_none_or(|u| o.0 < u.0) => {
                        if d.removed.get(k).is_some_and(|&r| r < o.0) {
                            return Err(format!(
                                "removed path {} is not in the base",
                                d.removed[k]
                            ));
                        }
                        if d.removed.get(k) == Some(&o.0) {
                            k += 1;
                        } else {
                            entries.push(o);
                        }
                        i += 1;
                    }
                    (o, Some(u)) => {
                        if o.is_some_and(|o| o.0 == u.0) {
                            if d.removed.get(k) == Some(&u.0) {
                                return Err(format!("path {} both removed and replaced", u.0));
                            }
                            i += 1;
                        }
                        entries.push(u);
                        j += 1;
                    }
                    (None, None) => unreachable!("loop condition"),
                    (Some(_), None) => unreachable!("guard is true when u is none"),
                }
            }
            if k != d.removed.len() {
                return Err(format!("removed path {} is not in the base", d.removed[k]));
            }
            out.push(VolumeListing {
                disk: d.disk.clone(),
                volume: d.volume.clone(),
                entries,
            });
        }
        Ok(out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.buf.push(u8::from(self.delta));
        w.u64(self.volumes.len() as u64);
        for v in &self.volumes {
            w.str(&v.disk);
            w.str(&v.volume);
            w.u64(v.removed.len() as u64);
            let mut prev = 0;
            for &p in &v.removed {
                w.u64(u64::from(p - prev));
                prev = p;
            }
            w.u64(v.upserts.len() as u64);
            let (mut prev_path, mut prev_rec) = (0u32, 0u32);
            for &(p, r) in &v.upserts {
                w.u64(u64::from(p - prev_path));
                w.i64(i64::from(r) - i64::from(prev_rec) - 1);
                (prev_path, prev_rec) = (p, r);
            }
        }
        w.buf
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, 0);
        let delta = match r.u8()? {
            0 => false,
            1 => true,
            k => return Err(r.err(format!("unknown listing kind {k}"))),
        };
        let n = r.bounded(MAX_VOLUMES, "volume count")?;
        let mut out = Self {
            delta,
            volumes: Vec::with_capacity(n as usize),
        };
        for _ in 0..n {
            let disk = r.str(MAX_VOLUME_NAME_LEN, "disk name")?.to_string();
            let volume = r.str(MAX_VOLUME_NAME_LEN, "volume name")?.to_string();
            check_volume_name(&disk)
                .and(check_volume_name(&volume))
                .map_err(|e| r.err(e))?;
            if out
                .volumes
                .iter()
                .any(|v| v.disk == disk && v.volume == volume)
            {
                return Err(r.err(format!("volume {disk}/{volume} listed twice")));
            }
            let count = r.bounded(MAX_PACK_ITEMS, "removal count")?;
            if count > (body.len() - r.pos()) as u64 || (!delta && count > 0) {
                return Err(r.err("bad removal count"));
            }
            let mut removed = Vec::with_capacity(count as usize);
            let mut prev = 0u64;
            for i in 0..count {
                let d = r.bounded(MAX_ID, "path delta")?;
                if i > 0 && d == 0 || prev + d > MAX_ID {
                    return Err(r.err("removed path ids do not increase"));
                }
                prev += d;
                removed.push(prev as u32);
            }
            let count = r.bounded(MAX_PACK_ITEMS, "entry count")?;
            if count > (body.len() - r.pos()) as u64 / 2 {
                return Err(r.err("entry count exceeds the listing"));
            }
            let mut upserts = Vec::with_capacity(count as usize);
            let (mut prev_path, mut prev_rec) = (0i64, 0i64);
            for i in 0..count {
                let delta = r.bounded(MAX_ID, "path delta")? as i64;
                if i > 0 && delta == 0 {
                    return Err(r.err("path ids do not increase"));
                }
                let path = prev_path + delta;
                let rec = prev_rec + 1 + r.i64()?.clamp(-(1 << 40), 1 << 40);
                if path > MAX_ID as i64 || !(1..=MAX_ID as i64).contains(&rec) {
                    return Err(r.err(format!("entry {i}: id out of range")));
                }
                upserts.push((path as u32, rec as u32));
                (prev_path, prev_rec) = (path, rec);
            }
            out.volumes.push(VolumeDiff {
                disk,
                volume,
                removed,
                upserts,
            });
        }
        if !r.is_empty() {
            return Err(r.err("trailing bytes after listing"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, entries: Vec<(u32, u32)>) -> VolumeListing {
        VolumeListing {
            disk: "sda".into(),
            volume: name.into(),
            entries,
        }
    }

    #[test]
    fn full_roundtrip_and_checks() {
        let v = vec![
            vol("p1", vec![(0, 5), (1, 6), (7, 100), (9, 7)]),
            vol("p2", vec![]),
        ];
        let file = ListingFile::full(&v);
        let body = file.encode();
        let back = ListingFile::decode(&body).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.resolve(&[]).unwrap(), v);
        assert_eq!(v[0].record_of(7), Some(100));
        assert_eq!(v[0].record_of(8), None);
        for n in 0..body.len() {
            assert!(ListingFile::decode(&body[..n]).is_err());
        }
        let dup = ListingFile::full(&[v[1].clone(), v[1].clone()]);
        assert!(ListingFile::decode(&dup.encode()).is_err());
    }

    #[test]
    fn delta_roundtrip() {
        let base = vec![
            vol("p1", vec![(0, 1), (2, 2), (3, 3), (5, 4)]),
            vol("gone", vec![(1, 1)]),
        ];
        let new = vec![
            vol("p1", vec![(0, 1), (3, 9), (4, 10), (5, 4), (8, 11)]),
            vol("p2", vec![(1, 1)]),
        ];
        let d = ListingFile::delta(&base, &new);
        assert_eq!(d.volumes[0].removed, vec![2]);
        assert_eq!(d.volumes[0].upserts, vec![(3, 9), (4, 10), (8, 11)]);
        let back = ListingFile::decode(&d.encode()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.resolve(&base).unwrap(), new);
        // Against the wrong base, removals that do not exist are refused.
        assert!(back.resolve(&[]).is_err());
    }
}
