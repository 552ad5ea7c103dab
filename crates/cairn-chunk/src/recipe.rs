//! Recipes: the ordered segment references that make up one disk image, and the tree over them.
//!
//! A recipe is a sequence of [`Entry`]s. Above the entries sits a tree whose node boundaries
//! are **content-defined**: a node closes after a record whose digest's first 8 bytes are
//! divisible by [`NODE_BOUNDARY_DIVISOR`], or after [`NODE_MAX_RECORDS`] records. So two recipes
//! that share a long run of entries produce identical nodes for it, and a synthetic full shares
//! every unchanged subtree with its parent through ordinary deduplication of tree nodes.
//!
//! Node layout (little-endian):
//!
//! ```text
//! "CRN1" | level u8 | pad[3] | count u32 | count × record
//! leaf record  (level 0): digest[32] | len u32 | kind u8          (37 bytes)
//! inner record (level>0): digest[32] | span_bytes u64 | span_entries u64   (48 bytes)
//! ```
//!
//! A node's digest is the BLAKE3 of its encoded bytes. Random reads descend from the root
//! using `span_bytes`, in O(depth) = O(log n) node visits.

use cairn_types::Digest;

use crate::FormatError;
use crate::crypto::Keys;
use crate::fingerprint::fingerprint_with;
use crate::format::{
    INNER_RECORD_LEN, LEAF_RECORD_LEN, NODE_BOUNDARY_DIVISOR, NODE_HEADER_LEN, NODE_MAGIC,
    NODE_MAX_LEVEL, NODE_MAX_RECORDS,
};

/// What a recipe entry refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum EntryKind {
    /// A stored segment with this digest.
    Data = 0,
    /// `len` zero bytes; nothing stored (the digest is all zeros).
    Zero = 1,
}

/// One segment reference of a recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub digest: Digest,
    pub len: u32,
    pub kind: EntryKind,
}

impl Entry {
    pub fn data(digest: Digest, len: u32) -> Self {
        Self {
            digest,
            len,
            kind: EntryKind::Data,
        }
    }

    pub fn zero(len: u32) -> Self {
        Self {
            digest: Digest::default(),
            len,
            kind: EntryKind::Zero,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.kind as u8);
    }

    fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let digest = Digest::from_slice(&b[..32]).expect("32 bytes");
        let len = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        let kind = match b[36] {
            0 => EntryKind::Data,
            1 => EntryKind::Zero,
            k => {
                return Err(FormatError::new(
                    "tree node",
                    format!("unknown entry kind {k}"),
                ));
            }
        };
        if len == 0 {
            return Err(FormatError::new("tree node", "entry of length 0"));
        }
        Ok(Self { digest, len, kind })
    }

    fn is_boundary(&self) -> bool {
        self.kind == EntryKind::Data
            && boundary_key(&self.digest).is_multiple_of(NODE_BOUNDARY_DIVISOR)
    }
}

/// Encodes entries as consecutive leaf records (the wire form of a recipe).
pub fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * LEAF_RECORD_LEN);
    entries.iter().for_each(|e| e.encode(&mut out));
    out
}

/// Parses consecutive leaf records.
pub fn decode_entries(b: &[u8]) -> Result<Vec<Entry>, FormatError> {
    if !b.len().is_multiple_of(LEAF_RECORD_LEN) {
        return Err(FormatError::new(
            "entry list",
            format!("length {} is not a multiple of {LEAF_RECORD_LEN}", b.len()),
        ));
    }
    b.chunks_exact(LEAF_RECORD_LEN).map(Entry::decode).collect()
}

/// A reference from an inner node to a child node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildRef {
    pub digest: Digest,
    /// Bytes of disk image the child covers.
    pub span_bytes: u64,
    /// Entries the child covers.
    pub span_entries: u64,
}

impl ChildRef {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.span_bytes.to_le_bytes());
        out.extend_from_slice(&self.span_entries.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        Self {
            digest: Digest::from_slice(&b[..32]).expect("32 bytes"),
            span_bytes: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
            span_entries: u64::from_le_bytes(b[40..48].try_into().expect("8 bytes")),
        }
    }
}

fn boundary_key(d: &Digest) -> u64 {
    u64::from_le_bytes(d.0[..8].try_into().expect("8 bytes"))
}

/// A decoded tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Vec<Entry>),
    Inner { level: u8, children: Vec<ChildRef> },
}

impl Node {
    /// The digests a node refers to: its data segments (a leaf) or its children.
    pub fn refs(&self) -> Vec<Digest> {
        match self {
            Node::Leaf(es) => es
                .iter()
                .filter(|e| e.kind == EntryKind::Data)
                .map(|e| e.digest)
                .collect(),
            Node::Inner { children, .. } => children.iter().map(|c| c.digest).collect(),
        }
    }

    pub fn level(&self) -> u8 {
        match self {
            Node::Leaf(_) => 0,
            Node::Inner { level, .. } => *level,
        }
    }

    /// Encodes the node.
    pub fn encode(&self) -> Vec<u8> {
        let (level, count) = match self {
            Node::Leaf(e) => (0, e.len()),
            Node::Inner { level, children } => (*level, children.len()),
        };
        let mut out = Vec::with_capacity(NODE_HEADER_LEN + count * INNER_RECORD_LEN);
        out.extend_from_slice(&NODE_MAGIC);
        out.extend_from_slice(&[level, 0, 0, 0]);
        let count = u32::try_from(count).expect("fewer than 2^32 records in a node");
        out.extend_from_slice(&count.to_le_bytes());
        match self {
            Node::Leaf(entries) => entries.iter().for_each(|e| e.encode(&mut out)),
            Node::Inner { children, .. } => children.iter().for_each(|c| c.encode(&mut out)),
        }
        out
    }

    /// Parses a node, checking magic, level, count and exact length.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let err = |r: String| FormatError::new("tree node", r);
        if b.len() < NODE_HEADER_LEN || b[..4] != NODE_MAGIC {
            return Err(err("bad magic or short header".into()));
        }
        let level = b[4];
        if level > NODE_MAX_LEVEL {
            return Err(err(format!("level {level} too deep")));
        }
        let count = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        if count > NODE_MAX_RECORDS {
            return Err(err(format!("{count} records exceed the limit")));
        }
        let rec = if level == 0 {
            LEAF_RECORD_LEN
        } else {
            INNER_RECORD_LEN
        };
        let body = &b[NODE_HEADER_LEN..];
        if body.len() != count * rec {
            return Err(err(format!(
                "length {} does not match {count} records",
                b.len()
            )));
        }
        if level == 0 {
            let entries = body
                .chunks_exact(rec)
                .map(Entry::decode)
                .collect::<Result<_, _>>()?;
            Ok(Node::Leaf(entries))
        } else {
            if count == 0 {
                return Err(err("inner node without children".into()));
            }
            let children = body.chunks_exact(rec).map(ChildRef::decode).collect();
            Ok(Node::Inner { level, children })
        }
    }
}

/// The root of a recipe tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeRoot {
    pub digest: Digest,
    pub level: u8,
    pub size: u64,
    pub entries: u64,
}

/// Builds the tree over a stream of entries; every finished node is handed to `sink` as
/// `(digest, encoded bytes)` bottom-up, children before parents.
pub struct TreeBuilder<F: FnMut(Digest, Vec<u8>)> {
    levels: Vec<Pending>,
    sink: F,
    keys: Option<std::sync::Arc<Keys>>,
}

#[derive(Default)]
struct Pending {
    leaf: Vec<Entry>,
    inner: Vec<ChildRef>,
}

impl<F: FnMut(Digest, Vec<u8>)> std::fmt::Debug for TreeBuilder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeBuilder")
            .field("levels", &self.levels.len())
            .finish()
    }
}

impl<F: FnMut(Digest, Vec<u8>)> TreeBuilder<F> {
    pub fn new(sink: F) -> Self {
        Self::keyed(None, sink)
    }

    /// A builder whose node digests are keyed fingerprints under `keys` (when given).
    pub fn keyed(keys: Option<std::sync::Arc<Keys>>, sink: F) -> Self {
        Self {
            levels: vec![Pending::default()],
            sink,
            keys,
        }
    }

    /// Appends one entry.
    pub fn push(&mut self, e: Entry) {
        let lv = &mut self.levels[0].leaf;
        lv.push(e);
        if e.is_boundary() || lv.len() >= NODE_MAX_RECORDS {
            self.close(0);
        }
    }

    fn close(&mut self, level: usize) {
        let node = if level == 0 {
            let entries = std::mem::take(&mut self.levels[0].leaf);
            if entries.is_empty() {
                return;
            }
            Node::Leaf(entries)
        } else {
            let children = std::mem::take(&mut self.levels[level].inner);
            if children.is_empty() {
                return;
            }
            Node::Inner {
                level: u8::try_from(level).expect("a tree of at most 255 levels"),
                children,
            }
        };
        let (span_bytes, span_entries) = match &node {
            Node::Leaf(e) => (e.iter().map(|e| u64::from(e.len)).sum(), e.len() as u64),
            Node::Inner { children, .. } => (
                children.iter().map(|c| c.span_bytes).sum(),
                children.iter().map(|c| c.span_entries).sum(),
            ),
        };
        let bytes = node.encode();
        let digest = fingerprint_with(self.keys.as_deref(), &bytes);
        (self.sink)(digest, bytes);
        if self.levels.len() <= level + 1 {
            self.levels.push(Pending::default());
        }
        let up = &mut self.levels[level + 1].inner;
        let child = ChildRef {
            digest,
            span_bytes,
            span_entries,
        };
        up.push(child);
        if boundary_key(&digest).is_multiple_of(NODE_BOUNDARY_DIVISOR)
            || up.len() >= NODE_MAX_RECORDS
        {
            self.close(level + 1);
        }
    }

    /// Closes every open node and returns the root.
    pub fn finish(mut self) -> TreeRoot {
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            let pending = if level == 0 {
                self.levels[0].leaf.len()
            } else {
                self.levels[level].inner.len()
            };
            if top && level > 0 && pending == 1 {
                let c = self.levels[level].inner[0];
                return TreeRoot {
                    digest: c.digest,
                    level: u8::try_from(level - 1).expect("a tree of at most 255 levels"),
                    size: c.span_bytes,
                    entries: c.span_entries,
                };
            }
            if top && level == 0 && pending == 0 {
                // An empty recipe: a single empty leaf.
                let bytes = Node::Leaf(Vec::new()).encode();
                let digest = fingerprint_with(self.keys.as_deref(), &bytes);
                (self.sink)(digest, bytes);
                return TreeRoot {
                    digest,
                    level: 0,
                    size: 0,
                    entries: 0,
                };
            }
            self.close(level);
            level += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fingerprint;
    use std::collections::HashMap;

    fn entries(n: usize, salt: u8) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&(i as u64).to_le_bytes());
                d[8] = salt;
                Entry::data(fingerprint(&d), 1000 + u32::try_from(i % 7).unwrap())
            })
            .collect()
    }

    fn build(es: &[Entry]) -> (TreeRoot, HashMap<Digest, Vec<u8>>) {
        let mut nodes = HashMap::new();
        let mut b = TreeBuilder::new(|d, bytes| {
            nodes.insert(d, bytes);
        });
        es.iter().for_each(|&e| b.push(e));
        let root = b.finish();
        (root, nodes)
    }

    fn flatten(root: &Digest, nodes: &HashMap<Digest, Vec<u8>>, out: &mut Vec<Entry>) {
        match Node::decode(&nodes[root]).unwrap() {
            Node::Leaf(e) => out.extend(e),
            Node::Inner { children, .. } => {
                children.iter().for_each(|c| flatten(&c.digest, nodes, out))
            }
        }
    }

    #[test]
    fn tree_round_trips_all_sizes() {
        for n in [0, 1, 2, 31, 300, 5000, 70_000] {
            let es = entries(n, 0);
            let (root, nodes) = build(&es);
            let mut back = Vec::new();
            flatten(&root.digest, &nodes, &mut back);
            assert_eq!(back, es, "n={n}");
            assert_eq!(root.entries, n as u64);
            assert_eq!(root.size, es.iter().map(|e| u64::from(e.len)).sum::<u64>());
        }
    }

    #[test]
    fn a_small_change_shares_most_nodes() {
        let a = entries(50_000, 0);
        let mut b = a.clone();
        b[25_000] = entries(1, 9)[0];
        let (_, na) = build(&a);
        let (_, nb) = build(&b);
        let new = nb.keys().filter(|k| !na.contains_key(k)).count();
        assert!(new <= 8, "{new} new nodes of {}", nb.len());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(Node::decode(b"").is_err());
        assert!(Node::decode(b"CRN1\x00\x00\x00\x00\x05\x00\x00\x00").is_err());
        let mut ok = Node::Leaf(entries(3, 0)).encode();
        assert!(Node::decode(&ok).is_ok());
        ok.pop();
        assert!(Node::decode(&ok).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = Node::decode(&b);
            let mut with_magic = b"CRN1".to_vec();
            with_magic.extend_from_slice(&b);
            let _ = Node::decode(&with_magic);
        }
    }
}
