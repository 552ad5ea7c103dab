//! Recipe tree nodes kept on local disk for repositories on object storage.
//!
//! Every incremental backup walks its parent's recipe tree, every restore and file listing
//! walks its snapshot's, and every GC walks them all: on object storage each node read would
//! be a request. A node read from the store is therefore kept under the cache directory
//! (`nodes/<container>/<offset>`, its stored bytes behind their fingerprint), once it has
//! decoded. Stored frames never change (a container is written once), so an entry is valid
//! as long as its container exists; GC removes the entries of the containers it deletes. An
//! entry whose fingerprint does not match (a damaged local disk) is removed and read again
//! from the store: the cache can cost a read, never an answer. Like the index, it is
//! rebuilt by use.

use std::path::PathBuf;

use cairn_chunk::format::BlobKind;
use cairn_types::ContainerId;

use super::Repository;
use crate::index::Location;

impl Repository {
    /// Where `loc`'s stored bytes are kept, if they are a tree node on object storage.
    fn node_path(&self, loc: &Location) -> Option<PathBuf> {
        (loc.kind == BlobKind::Tree && !self.store.capabilities().local).then(|| {
            self.cache_dir
                .join("nodes")
                .join(loc.container.to_hex())
                .join(format!("{:08x}", loc.offset))
        })
    }

    /// The stored bytes of a cached tree node.
    pub(crate) fn cached_node(&self, loc: &Location) -> Option<Vec<u8>> {
        let path = self.node_path(loc)?;
        let b = std::fs::read(&path).ok()?;
        let ok = b.len() == 32 + loc.stored_len as usize
            && cairn_chunk::fingerprint(&b[32..]).as_bytes() == &b[..32];
        if !ok {
            tracing::warn!("dropping damaged cached tree node {}", path.display());
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(b[32..].to_vec())
    }

    /// Keeps a tree node's stored bytes (best effort: a failure costs a later read).
    pub(crate) fn cache_node(&self, loc: &Location, stored: &[u8]) {
        let Some(path) = self.node_path(loc) else {
            return;
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a node file has a directory"))?;
            let tmp = path.with_extension("tmp");
            let mut b = Vec::with_capacity(32 + stored.len());
            b.extend_from_slice(cairn_chunk::fingerprint(stored).as_bytes());
            b.extend_from_slice(stored);
            std::fs::write(&tmp, &b)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::debug!("could not cache tree node {}: {e}", path.display());
        }
    }

    /// Forgets the cached nodes of deleted containers.
    pub(crate) fn drop_cached_nodes(&self, containers: impl IntoIterator<Item = ContainerId>) {
        let dir = self.cache_dir.join("nodes");
        for c in containers {
            let _ = std::fs::remove_dir_all(dir.join(c.to_hex()));
        }
    }
}
