//! The path table: every distinct volume-relative path ever indexed, as a tree of names.
//!
//! Path id 0 is the root `/` of every volume and is not stored. Every other id names
//! `(parent id, name)` with `parent < id`, which makes the tree acyclic by construction and
//! lets a reader check it in one pass. Paths are shared by all volumes, backups and VMs:
//! `/etc/passwd` has one id everywhere, so a search matches each distinct path once.
//!
//! Path pack file body (framed and checksummed by [`crate::format::seal`]):
//!
//! ```text
//! first_id count { parent name(str) }*count
//! ```
//!
//! An empty name marks a path removed by garbage collection (a tombstone); its id is never
//! reused.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use crate::error::DecodeError;
use crate::format::{
    MAX_ID, MAX_NAME_LEN, MAX_PACK_ITEMS, MAX_PATH_IDS, MAX_PATH_LEN, Reader, Writer,
};

/// Parent value of an id that is not (or no longer) a path.
const DEAD: u32 = u32::MAX;

/// One decoded path pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPack {
    pub first_id: u32,
    /// `(parent, name)`; an empty name is a tombstone.
    pub entries: Vec<(u32, String)>,
}

impl PathPack {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(u64::from(self.first_id));
        w.u64(self.entries.len() as u64);
        for (parent, name) in &self.entries {
            w.u64(u64::from(*parent));
            w.str(name);
        }
        w.buf
    }

    /// Decodes a pack body and checks what one pack can check: limits and `parent < id`.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, 0);
        let first_id = r.bounded(MAX_ID, "first path id")?;
        if first_id == 0 {
            return Err(r.err("path id 0 is the implicit root"));
        }
        let count = r.bounded(MAX_PACK_ITEMS, "path count")?;
        if first_id + count > MAX_PATH_IDS {
            return Err(r.err("path ids exceed the id space"));
        }
        // Each entry takes at least 2 bytes.
        if count > body.len() as u64 / 2 {
            return Err(r.err("path count exceeds the pack"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            let id = first_id + i;
            let parent = r.bounded(MAX_ID, "parent id")?;
            let name = r.str(MAX_NAME_LEN, "name")?;
            if !name.is_empty() && (parent >= id || name.contains('/') || name.contains('\0')) {
                return Err(r.err(format!("path {id}: bad parent {parent} or name {name:?}")));
            }
            entries.push((parent as u32, name.to_string()));
        }
        if !r.is_empty() {
            return Err(r.err("trailing bytes after paths"));
        }
        Ok(Self {
            first_id: first_id as u32,
            entries,
        })
    }
}

fn hash_of(s: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// All paths in memory: parents, materialised full paths, a lookup by full path, and the
/// children of each directory.
#[derive(Debug, Clone)]
pub struct PathTable {
    parent: Vec<u32>,
    /// Full path of id `i` is `full[off[i]..off[i + 1]]`.
    full: String,
    off: Vec<usize>,
    /// Hash of a full path → id; the rare colliding paths go to `collided`.
    by_hash: HashMap<u64, u32>,
    collided: HashMap<Box<str>, u32>,
    children: HashMap<u32, Vec<u32>>,
    lower: OnceLock<(String, Vec<usize>)>,
    /// Position of every id in path order, computed on first use.
    rank: OnceLock<Vec<u32>>,
}

impl Default for PathTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PathTable {
    /// A table holding only the root.
    pub fn new() -> Self {
        let mut t = Self {
            parent: vec![0],
            full: "/".to_string(),
            off: vec![0, 1],
            by_hash: HashMap::new(),
            collided: HashMap::new(),
            children: HashMap::new(),
            lower: OnceLock::new(),
            rank: OnceLock::new(),
        };
        t.by_hash.insert(hash_of("/"), 0);
        t
    }

    /// One past the largest id.
    pub fn next_id(&self) -> u32 {
        self.parent.len() as u32
    }

    pub fn is_live(&self, id: u32) -> bool {
        self.parent.get(id as usize).is_some_and(|&p| p != DEAD)
    }

    /// Full path of a live id (`""` for dead or unknown ids).
    pub fn path(&self, id: u32) -> &str {
        let i = id as usize;
        if i + 1 >= self.off.len() {
            return "";
        }
        &self.full[self.off[i]..self.off[i + 1]]
    }

    pub fn parent(&self, id: u32) -> Option<u32> {
        match self.parent.get(id as usize) {
            Some(&p) if p != DEAD && id != 0 => Some(p),
            _ => None,
        }
    }

    /// Children ids of a directory, in insertion order.
    pub fn children(&self, id: u32) -> &[u32] {
        self.children.get(&id).map_or(&[], |v| v.as_slice())
    }

    /// The id of a full path, if known.
    pub fn lookup(&self, path: &str) -> Option<u32> {
        if let Some(&id) = self.collided.get(path) {
            return Some(id);
        }
        let id = *self.by_hash.get(&hash_of(path))?;
        (self.path(id) == path).then_some(id)
    }

    /// Appends a dead id (a tombstone or a gap left by a removed pack).
    pub fn push_dead(&mut self) {
        self.parent.push(DEAD);
        self.off.push(self.full.len());
    }

    /// Appends `(parent, name)` as the next id. The caller checks that it is new.
    pub fn push(&mut self, parent: u32, name: &str) -> Result<u32, String> {
        let id = self.next_id();
        if u64::from(id) >= MAX_PATH_IDS {
            return Err("path id space exhausted".into());
        }
        if !self.is_live(parent) || parent >= id {
            return Err(format!("path {id}: parent {parent} is not a live path"));
        }
        let parent_path = self.path(parent);
        let len = parent_path.len() + usize::from(parent != 0) + name.len();
        if len > MAX_PATH_LEN {
            return Err(format!("path {id} exceeds {MAX_PATH_LEN} bytes"));
        }
        let start = self.full.len();
        let (ps, pe) = (self.off[parent as usize], self.off[parent as usize + 1]);
        if parent != 0 {
            self.full.extend_from_within(ps..pe);
        }
        self.full.push('/');
        self.full.push_str(name);
        let full = &self.full[start..];
        let h = hash_of(full);
        if let Some(&other) = self.by_hash.get(&h) {
            if self.path(other) == full || self.collided.contains_key(full) {
                let msg = format!("path {full:?} is stored twice");
                self.full.truncate(start);
                return Err(msg);
            }
            self.collided.insert(full.into(), id);
        } else {
            self.by_hash.insert(h, id);
        }
        self.parent.push(parent);
        self.off.push(self.full.len());
        self.children.entry(parent).or_default().push(id);
        self.lower = OnceLock::new();
        self.rank = OnceLock::new();
        Ok(id)
    }

    /// Adds a decoded pack whose ids must continue this table (gaps become dead ids).
    pub fn extend(&mut self, pack: &PathPack) -> Result<(), String> {
        if pack.first_id < self.next_id() {
            return Err(format!(
                "pack starts at id {} below {}",
                pack.first_id,
                self.next_id()
            ));
        }
        while self.next_id() < pack.first_id {
            self.push_dead();
        }
        for (parent, name) in &pack.entries {
            if name.is_empty() {
                self.push_dead();
            } else {
                self.push(*parent, name)?;
            }
        }
        Ok(())
    }

    /// The id of `components` under the root, creating missing ones through `new`.
    pub fn resolve_or_insert(
        &mut self,
        path: &str,
        components: &[&str],
        new: &mut Vec<(u32, String)>,
    ) -> Result<u32, String> {
        if let Some(id) = self.lookup(path) {
            return Ok(id);
        }
        // Find the deepest existing ancestor, then create the rest.
        let mut cut = components.len();
        let mut parent = 0;
        let mut prefix_end = path.len();
        while cut > 0 {
            cut -= 1;
            prefix_end -= components[cut].len() + 1;
            let prefix = if prefix_end == 0 {
                "/"
            } else {
                &path[..prefix_end]
            };
            if let Some(id) = self.lookup(prefix) {
                parent = id;
                break;
            }
        }
        for name in &components[cut..] {
            parent = self.push(parent, name)?;
            new.push((self.parent[parent as usize], (*name).to_string()));
        }
        Ok(parent)
    }

    /// Calls `f(id, path)` for every live id, with paths lowercased when `lower`.
    pub fn for_each(&self, lower: bool, mut f: impl FnMut(u32, &str)) {
        let (full, off) = if lower {
            let (s, o) = self.lower.get_or_init(|| {
                let mut s = String::with_capacity(self.full.len());
                let mut o = Vec::with_capacity(self.off.len());
                o.push(0);
                for w in self.off.windows(2) {
                    s.push_str(&self.full[w[0]..w[1]].to_lowercase());
                    o.push(s.len());
                }
                (s, o)
            });
            (s.as_str(), o.as_slice())
        } else {
            (self.full.as_str(), self.off.as_slice())
        };
        for (id, w) in off.windows(2).enumerate() {
            if self.parent[id] != DEAD {
                f(id as u32, &full[w[0]..w[1]]);
            }
        }
    }

    /// The position of every id when all paths are sorted bytewise, so callers order paths
    /// by comparing integers. Sorted once per table (after an add that created paths, the
    /// next query that needs it pays one sort of all paths).
    pub fn rank(&self) -> &[u32] {
        self.rank.get_or_init(|| {
            let mut ids: Vec<u32> = (0..self.next_id()).collect();
            ids.sort_unstable_by(|a, b| self.path(*a).cmp(self.path(*b)));
            let mut rank = vec![0u32; ids.len()];
            for (i, id) in ids.into_iter().enumerate() {
                rank[id as usize] = i as u32;
            }
            rank
        })
    }

    /// Whether `id` is `ancestor` or below it.
    pub fn is_under(&self, mut id: u32, ancestor: u32) -> bool {
        if ancestor == 0 {
            return true;
        }
        while id > ancestor {
            match self.parent(id) {
                Some(p) => id = p,
                None => return false,
            }
        }
        id == ancestor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_children() {
        let mut t = PathTable::new();
        let mut new = Vec::new();
        let id = t
            .resolve_or_insert(
                "/etc/ssh/sshd_config",
                &["etc", "ssh", "sshd_config"],
                &mut new,
            )
            .unwrap();
        assert_eq!(new.len(), 3);
        assert_eq!(t.path(id), "/etc/ssh/sshd_config");
        let etc = t.lookup("/etc").unwrap();
        assert_eq!(t.children(0), &[etc]);
        assert!(t.is_under(id, etc));
        assert!(!t.is_under(etc, id));
        new.clear();
        let again = t
            .resolve_or_insert("/etc/passwd", &["etc", "passwd"], &mut new)
            .unwrap();
        assert_eq!(new, vec![(etc, "passwd".to_string())]);
        assert_eq!(t.lookup("/etc/passwd"), Some(again));
        assert!(t.push(etc, "passwd").is_err());

        let pack = PathPack {
            first_id: 1,
            entries: vec![
                (0, "etc".into()),
                (1, "ssh".into()),
                (2, "sshd_config".into()),
                (1, "passwd".into()),
            ],
        };
        let decoded = PathPack::decode(&pack.encode()).unwrap();
        assert_eq!(decoded, pack);
        let mut t2 = PathTable::new();
        t2.extend(&decoded).unwrap();
        assert_eq!(t2.lookup("/etc/passwd"), Some(again));
        let mut seen = Vec::new();
        t2.for_each(true, |id, p| seen.push((id, p.to_string())));
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn bad_packs_fail() {
        let bad = PathPack {
            first_id: 1,
            entries: vec![(1, "self".into())],
        };
        assert!(PathPack::decode(&bad.encode()).is_err());
        let mut t = PathTable::new();
        let dup = PathPack {
            first_id: 1,
            entries: vec![(0, "a".into()), (0, "a".into())],
        };
        assert!(t.extend(&dup).is_err());
    }
}
