//! Repository configuration and snapshot manifests (JSON objects in the store).
//!
//! A snapshot exists exactly when its manifest `snapshots/<id>.json` exists; the manifest is
//! written last, after every blob it reaches is durable.
//!
//! Manifests are authenticated against damage: `checksum` is the BLAKE3 hash of the
//! manifest's canonical JSON (this struct serialised with `checksum` absent), its `size` must
//! equal its recipe root's, and its id must be the one its object is named after. A manifest
//! that fails any of these is *damaged*: listed apart, never trusted (see
//! [`Repository::scan_snapshots`](crate::Repository::scan_snapshots)). Manifests written
//! before the checksum existed are checked on size and name only.

use std::collections::BTreeMap;

use cairn_chunk::ChunkerParams;
use cairn_chunk::recipe::TreeRoot;
use cairn_types::SnapshotId;

/// Version of the repository layout (an encrypted one's is
/// [`cairn_chunk::format::REPO_VERSION_ENCRYPTED`]).
pub use cairn_chunk::format::REPO_VERSION;

/// The `config` object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    pub version: u32,
    pub id: String,
    /// Default segmentation for new backups.
    pub chunker: ChunkerParams,
    /// zstd level for segments (0 = off).
    pub compression: i32,
    pub created: u64,
    /// Present when the repository is encrypted (see [`crate::keys`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::keys::EncryptionConfig>,
}

/// Counters of one backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupStats {
    /// Bytes read from the source image.
    pub bytes_read: u64,
    /// Logical bytes of data segments the vault lacked.
    pub bytes_new: u64,
    /// Bytes the repository grew by (containers, index, manifest).
    pub bytes_stored: u64,
    /// Bytes of disk data handed to the vault, as encoded segments: what crosses the network
    /// to a vault service (the same figure for a local repository).
    pub bytes_sent: u64,
    pub segments: u64,
    pub segments_new: u64,
    pub zero_bytes: u64,
    pub duration_ms: u64,
}

/// A committed backup of one disk image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotManifest {
    pub id: SnapshotId,
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix milliseconds: orders snapshots made within one second.
    #[serde(default)]
    pub created_ms: u64,
    pub size: u64,
    pub root: TreeRoot,
    pub chunker: ChunkerParams,
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    #[serde(default)]
    pub stats: BackupStats,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// In an encrypted repository: the real name and labels, sealed (hex; see
    /// [`Private`]). `name` then holds the keyed tag of the name, `labels` nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// BLAKE3 of the canonical JSON without this field (hex); see the module docs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl SnapshotManifest {
    fn canonical_hash(&self) -> String {
        let mut bare = self.clone();
        bare.checksum = None;
        let json = serde_json::to_vec(&bare).expect("manifest json");
        blake3::hash(&json).to_hex().to_string()
    }

    /// Sets `checksum` from the other fields; call after the last change.
    pub fn seal(&mut self) {
        self.checksum = Some(self.canonical_hash());
    }

    /// Checks the manifest against itself: its checksum (when it has one) and its size
    /// against the recipe root. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if let Some(sum) = &self.checksum
            && *sum != self.canonical_hash()
        {
            return Err("checksum does not match the manifest's fields".into());
        }
        if self.size != self.root.size {
            return Err(format!(
                "size {} differs from its recipe's {}",
                self.size, self.root.size
            ));
        }
        Ok(())
    }

    /// The bytes a manifest is stored as: its compact JSON, checksum included.
    pub fn to_stored(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest json")
    }

    /// Parses and checks the manifest stored as `snapshots/<file_id>.json`. A manifest with a
    /// checksum must be stored exactly as [`to_stored`](Self::to_stored) writes it, so no byte
    /// of it can change unnoticed (not even white space).
    pub fn parse_stored(file_id: &str, bytes: &[u8]) -> Result<Self, String> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| format!("unreadable: {e}"))?;
        if m.id.to_string() != file_id {
            return Err(format!("holds snapshot {} under another name", m.id));
        }
        m.check()?;
        // Manifests from before checksums were written pretty-printed; a compact one without
        // a checksum lost it (a damaged key is ignored by the parser).
        let legacy = bytes.contains(&b'\n');
        if m.checksum.is_none() && !legacy {
            return Err("its checksum is missing".into());
        }
        if m.checksum.is_some() && m.to_stored() != bytes {
            return Err("stored bytes differ from the manifest's own form".into());
        }
        Ok(m)
    }
}

/// The fields of a manifest an encrypted repository seals: sealed under the metadata key
/// with the recipe root's digest as associated data, so they cannot be moved to another
/// snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Private {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Private {
    /// Seals the name and labels for a commit: (name tag, sealed hex).
    pub fn seal(
        keys: &cairn_chunk::Keys,
        name: &str,
        labels: &BTreeMap<String, String>,
        root: &cairn_types::Digest,
    ) -> (String, String) {
        let p = Self {
            name: name.to_string(),
            labels: labels.clone(),
        };
        let json = serde_json::to_vec(&p).expect("private json");
        let sealed = keys.seal_metadata(&json, root.as_bytes());
        (format!("enc-{}", keys.name_tag(name)), hex::encode(sealed))
    }
}

impl SnapshotManifest {
    /// Replaces the name tag and empty labels of a sealed manifest by the real ones. A
    /// manifest that is not sealed is left as it is.
    pub fn open_private(&mut self, keys: &cairn_chunk::Keys) -> Result<(), String> {
        let Some(sealed) = &self.sealed else {
            return Ok(());
        };
        let bytes = hex::decode(sealed).map_err(|_| "sealed fields are not hex".to_string())?;
        let json = keys
            .open_metadata(&bytes, self.root.digest.as_bytes())
            .map_err(|e| format!("sealed fields: {e}"))?;
        let p: Private =
            serde_json::from_slice(&json).map_err(|e| format!("sealed fields: {e}"))?;
        self.name = p.name;
        self.labels = p.labels;
        Ok(())
    }
}

/// [`cairn_types::now_ms`], unsigned as stored here.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(cairn_types::now_ms()).unwrap_or(0)
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A manifest that failed [`SnapshotManifest::parse_stored`]: reported and skipped, never
/// trusted, until it is forgotten (by its file id) or repaired.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DamagedSnapshot {
    /// The id its object is named after.
    pub id: String,
    pub problem: String,
    /// The recipe root the damaged text still names, if one can be read from it: GC keeps
    /// what it reaches, so the snapshot's data outlives the damage to its manifest.
    pub root: Option<cairn_types::Digest>,
}

impl DamagedSnapshot {
    /// Salvages what it can from a damaged manifest's bytes.
    pub fn salvage(id: &str, problem: String, bytes: &[u8]) -> Self {
        Self {
            id: id.to_string(),
            problem,
            root: salvage_root(bytes),
        }
    }
}

/// Fields read back from a damaged manifest's text, where they still can be.
#[derive(Debug, Default)]
pub struct SalvagedFields {
    pub name: Option<String>,
    pub created: Option<u64>,
    pub chunker: Option<ChunkerParams>,
}

impl DamagedSnapshot {
    /// Reads what it can of the manifest's other fields from its damaged `bytes`.
    pub fn salvaged_fields(&self, bytes: &[u8]) -> SalvagedFields {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
            return SalvagedFields {
                name: v["name"].as_str().map(str::to_string),
                created: v["created"].as_u64(),
                chunker: serde_json::from_value(v["chunker"].clone()).ok(),
            };
        }
        let text = String::from_utf8_lossy(bytes);
        let after = |field: &str| {
            let at = text.find(&format!("\"{field}\""))? + field.len() + 2;
            Some(text[at..].trim_start_matches([' ', ':', '\n']).to_string())
        };
        SalvagedFields {
            name: after("name").and_then(|t| {
                let t = t.strip_prefix('"')?;
                let name = &t[..t.find('"')?];
                (!name.is_empty() && !name.chars().any(char::is_control)).then(|| name.to_string())
            }),
            created: after("created").and_then(|t| {
                let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            }),
            chunker: None,
        }
    }
}

/// The first 64-hex-digit string after `"root"` in a (possibly damaged) manifest.
fn salvage_root(bytes: &[u8]) -> Option<cairn_types::Digest> {
    let at = bytes.windows(6).position(|w| w == b"\"root\"")?;
    let rest = &bytes[at..];
    let start = rest
        .windows(64)
        .position(|w| w.iter().all(u8::is_ascii_hexdigit))?;
    std::str::from_utf8(&rest[start..start + 64])
        .ok()?
        .parse()
        .ok()
}

/// The snapshot `spec` names among `all`: an id, a unique id prefix (at least 6 digits), or a
/// name (the newest with it).
pub(crate) fn find_in(all: &[SnapshotManifest], spec: &str) -> crate::Result<SnapshotManifest> {
    if let Ok(id) = spec.parse::<SnapshotId>()
        && let Some(s) = all.iter().find(|s| s.id == id)
    {
        return Ok(s.clone());
    }
    let by_prefix: Vec<&SnapshotManifest> =
        if spec.len() >= 6 && spec.chars().all(|c| c.is_ascii_hexdigit()) {
            let p = spec.to_ascii_lowercase();
            all.iter()
                .filter(|s| s.id.to_hex().starts_with(&p))
                .collect()
        } else {
            Vec::new()
        };
    let by_name = all.iter().rev().find(|s| s.name == spec);
    match (by_name, by_prefix.as_slice()) {
        (Some(named), [one]) if one.id != named.id => Err(crate::VaultError::Invalid(format!(
            "{spec:?} is ambiguous: the name of snapshot {} and a prefix of snapshot {}'s id \
             (give the whole id)",
            named.id, one.id
        ))),
        (Some(named), _) if by_prefix.len() > 1 => Err(crate::VaultError::Invalid(format!(
            "{spec:?} is ambiguous: the name of snapshot {} and a prefix of {} ids",
            named.id,
            by_prefix.len()
        ))),
        (Some(named), _) => Ok(named.clone()),
        (None, [one]) => Ok((*one).clone()),
        (None, []) => Err(crate::VaultError::SnapshotNotFound(spec.to_string())),
        (None, many) => Err(crate::VaultError::Invalid(format!(
            "snapshot prefix {spec:?} is ambiguous ({} matches)",
            many.len()
        ))),
    }
}
