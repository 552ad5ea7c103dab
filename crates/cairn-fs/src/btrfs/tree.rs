//! B-tree search: the items of one tree whose keys lie in a range, in key order.
//!
//! Bounds on hostile trees: a child must have exactly its parent's level minus one (so a
//! descent is at most 8 nodes deep and cannot loop back up), one search never enters a node
//! twice (a node shared by several pointers is a loop or a fan-in bomb), and item counts,
//! offsets and sizes are checked against the node before they are used.

use std::collections::HashSet;
use std::ops::ControlFlow;

use super::volume::Volume;
use crate::format::*;
use crate::util::{le32, le64};
use crate::{Error, Result};

/// A btrfs key; keys sort by (objectid, type, offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub objectid: u64,
    pub ty: u8,
    pub offset: u64,
}

impl Key {
    pub(crate) const fn new(objectid: u64, ty: u8, offset: u64) -> Self {
        Self {
            objectid,
            ty,
            offset,
        }
    }

    /// The key at the start of `b` (missing bytes read as zero).
    pub(crate) fn parse(b: &[u8]) -> Self {
        Self {
            objectid: le64(b, 0),
            ty: b.get(8).copied().unwrap_or(0),
            offset: le64(b, 9),
        }
    }

    /// Every key of `objectid` and type `ty`.
    pub(crate) fn all(objectid: u64, ty: u8) -> (Self, Self) {
        (
            Self::new(objectid, ty, 0),
            Self::new(objectid, ty, u64::MAX),
        )
    }
}

/// What a visitor of [`range`] returns: continue, stop, or fail the search.
pub(crate) type Visit = Result<ControlFlow<()>>;

/// Where an item's data lies: the logical address of its leaf and the data's offset in the
/// leaf node (header included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub leaf: u64,
    pub offset: usize,
}

/// A visitor of [`range`]: each item's key, data and place.
pub(crate) type Visitor<'a> = dyn FnMut(Key, &[u8], Place) -> Visit + 'a;

/// Calls `f` with each leaf item whose key is in `[lo, hi]`, in key order, in the tree whose
/// root node is at `root` (level `level`).
pub(crate) fn range(
    vol: &Volume,
    root: u64,
    level: u8,
    lo: Key,
    hi: Key,
    f: &mut Visitor<'_>,
) -> Result<()> {
    if level > BTRFS_MAX_LEVEL {
        return Err(Error::corrupt(format!(
            "btrfs tree root {root}: level {level}"
        )));
    }
    let mut seen = HashSet::new();
    let _ = visit(vol, root, level, lo, hi, f, &mut seen)?;
    Ok(())
}

fn visit(
    vol: &Volume,
    at: u64,
    level: u8,
    lo: Key,
    hi: Key,
    f: &mut Visitor<'_>,
    seen: &mut HashSet<u64>,
) -> Visit {
    if !seen.insert(at) {
        return Err(Error::corrupt(format!(
            "btrfs tree node {at} is reached twice in one search"
        )));
    }
    let node = vol.node(at)?;
    let b = node.as_slice();
    if b[0x64] != level {
        return Err(Error::corrupt(format!(
            "btrfs tree node {at}: level {} where {level} was expected",
            b[0x64]
        )));
    }
    let n = le32(b, 0x60) as usize;
    let each = if level == 0 {
        BTRFS_ITEM_LEN
    } else {
        BTRFS_KEY_PTR_LEN
    };
    if n.checked_mul(each)
        .is_none_or(|l| BTRFS_HEADER_LEN + l > b.len())
    {
        return Err(Error::corrupt(format!(
            "btrfs tree node {at}: {n} items do not fit"
        )));
    }
    let body = &b[BTRFS_HEADER_LEN..];
    // Keys are sorted: binary search for the first item at or after `lo` (a leaf), or the
    // last pointer at or before it (a node). On a hostile, unsorted node this only changes
    // where the bounded scan starts.
    let each_key = |i: usize| Key::parse(&body[i * each..]);
    let first = {
        let (mut a, mut z) = (0, n);
        while a < z {
            let m = a + (z - a) / 2;
            if each_key(m) < lo { a = m + 1 } else { z = m }
        }
        a
    };
    if level == 0 {
        for i in first..n {
            let h = &body[i * BTRFS_ITEM_LEN..];
            let key = Key::parse(h);
            if key < lo {
                continue;
            }
            if key > hi {
                return Ok(ControlFlow::Break(()));
            }
            let (off, size) = (le32(h, 17) as usize, le32(h, 21) as usize);
            let data = off
                .checked_add(size)
                .and_then(|end| body.get(off..end))
                .ok_or_else(|| {
                    Error::corrupt(format!("btrfs leaf {at}: item {i} lies outside the leaf"))
                })?;
            let place = Place {
                leaf: at,
                offset: BTRFS_HEADER_LEN + off,
            };
            if f(key, data, place)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        return Ok(ControlFlow::Continue(()));
    }
    // The child that may hold `lo` is the last whose key is at or below it.
    let start = if first < n && each_key(first) == lo {
        first
    } else {
        first.saturating_sub(1)
    };
    for i in start..n {
        let p = &body[i * BTRFS_KEY_PTR_LEN..];
        let key = Key::parse(p);
        if key > hi {
            return Ok(ControlFlow::Break(()));
        }
        // Child i holds keys below the next pointer's key.
        if i + 1 < n && Key::parse(&body[(i + 1) * BTRFS_KEY_PTR_LEN..]) <= lo {
            continue;
        }
        let child = le64(p, BTRFS_KEY_LEN);
        if visit(vol, child, level - 1, lo, hi, f, seen)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// The items with keys in `[lo, hi]`, at most `max` of them and `max_bytes` of data.
pub(crate) fn items(
    vol: &Volume,
    root: (u64, u8),
    (lo, hi): (Key, Key),
    max: usize,
    max_bytes: u64,
) -> Result<Vec<(Key, Vec<u8>, Place)>> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    range(vol, root.0, root.1, lo, hi, &mut |k, d, place| {
        bytes += d.len() as u64;
        if out.len() >= max || bytes > max_bytes {
            return Err(Error::limit(format!(
                "btrfs: more than {max} items or {max_bytes} bytes for key {}",
                lo.objectid
            )));
        }
        out.push((k, d.to_vec(), place));
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(out)
}

/// The first item with a key in `[lo, hi]`.
pub(crate) fn first(
    vol: &Volume,
    root: (u64, u8),
    lo: Key,
    hi: Key,
) -> Result<Option<(Key, Vec<u8>)>> {
    let mut out = None;
    range(vol, root.0, root.1, lo, hi, &mut |k, d, _| {
        out = Some((k, d.to_vec()));
        Ok(ControlFlow::Break(()))
    })?;
    Ok(out)
}
