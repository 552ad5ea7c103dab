//! Listings: what one backup contains, as one sorted `(path id, record id)` array per volume.
//!
//! Body (framed by [`crate::format::seal`], so zstd-compressed and checksummed):
//!
//! ```text
//! volumes { disk(str) volume(str) count { path_delta record_delta(zz) }*count }*volumes
//! ```
//!
//! `path_delta` is the path id minus the previous entry's (the first is the id itself;
//! ids strictly increase, so deltas after the first are ≥ 1). `record_delta` is the record id
//! minus (previous record id + 1), zigzag-encoded: records stored in path order give runs of
//! zeros, and an unchanged file keeps its record id from the parent backup, so a listing
//! that differs from its parent in 1% of its files compresses to a few bytes per change.

use crate::error::DecodeError;
use crate::format::{MAX_ID, MAX_PACK_ITEMS, MAX_VOLUME_NAME_LEN, MAX_VOLUMES, Reader, Writer};

/// One volume of a listing.
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

/// Checks a disk or volume name.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_VOLUME_NAME_LEN || name.contains(['/', '\0']) {
        return Err(format!("invalid disk or volume name {name:?}"));
    }
    Ok(())
}

pub fn encode(volumes: &[VolumeListing]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(volumes.len() as u64);
    for v in volumes {
        w.str(&v.disk);
        w.str(&v.volume);
        w.u64(v.entries.len() as u64);
        let (mut prev_path, mut prev_rec) = (0u32, 0u32);
        for &(p, r) in &v.entries {
            w.u64(u64::from(p - prev_path));
            w.i64(i64::from(r) - i64::from(prev_rec) - 1);
            (prev_path, prev_rec) = (p, r);
        }
    }
    w.buf
}

pub fn decode(body: &[u8]) -> Result<Vec<VolumeListing>, DecodeError> {
    let mut r = Reader::new(body, 0);
    let n = r.bounded(MAX_VOLUMES, "volume count")?;
    let mut out: Vec<VolumeListing> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let disk = r.str(MAX_VOLUME_NAME_LEN, "disk name")?.to_string();
        let volume = r.str(MAX_VOLUME_NAME_LEN, "volume name")?.to_string();
        check_volume_name(&disk)
            .and(check_volume_name(&volume))
            .map_err(|e| r.err(e))?;
        if out.iter().any(|v| v.disk == disk && v.volume == volume) {
            return Err(r.err(format!("volume {disk}/{volume} listed twice")));
        }
        let count = r.bounded(MAX_PACK_ITEMS, "entry count")?;
        if count > (body.len() - r.pos()) as u64 / 2 {
            return Err(r.err("entry count exceeds the listing"));
        }
        let mut entries = Vec::with_capacity(count as usize);
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
            entries.push((path as u32, rec as u32));
            (prev_path, prev_rec) = (path, rec);
        }
        out.push(VolumeListing {
            disk,
            volume,
            entries,
        });
    }
    if !r.is_empty() {
        return Err(r.err("trailing bytes after listing"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checks() {
        let v = vec![
            VolumeListing {
                disk: "sda".into(),
                volume: "p1".into(),
                entries: vec![(0, 5), (1, 6), (7, 100), (9, 7)],
            },
            VolumeListing {
                disk: "sda".into(),
                volume: "p2".into(),
                entries: vec![],
            },
        ];
        let body = encode(&v);
        assert_eq!(decode(&body).unwrap(), v);
        assert_eq!(v[0].record_of(7), Some(100));
        assert_eq!(v[0].record_of(8), None);
        for n in 0..body.len() {
            assert!(decode(&body[..n]).is_err());
        }
        let dup = vec![v[1].clone(), v[1].clone()];
        assert!(decode(&encode(&dup)).is_err());
    }
}
