//! The keys of an encrypted repository: wrapped master keys (`keys/<16 hex>.json`), key files
//! and unlocking.
//!
//! ```text
//! keys/<id>.json   {"id", "kind": "passphrase" | "key_file", "created", "kdf"?, "salt"?, "wrapped"}
//! config           "encryption": {"cipher", "fingerprint", "key_check"}
//! ```
//!
//! Every wrapped key holds the same master key, wrapped by one passphrase (Argon2id with the
//! recorded parameters and salt) or one key file's secret. Adding, changing or removing one
//! writes or deletes only its own object: no data object changes. The last one cannot be
//! removed. An exported key file holds the master key itself and opens the repository even
//! when every `keys/` object is gone; so does the paper recovery key. **Losing every
//! passphrase, key file and recovery key loses the data.**
//!
//! The config's `key_check` (a value derived from the master key) tells a right key from a
//! wrong one without decrypting anything.

use std::sync::Arc;

use cairn_chunk::Keys;
use cairn_chunk::wrap::{self, KdfParams};

use crate::error::{Result, VaultError};
use crate::manifest::{RepoConfig, now};
use crate::repo::Repository;
use crate::store::Key;

/// What the config records of an encrypted repository.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptionConfig {
    /// "xchacha20-poly1305".
    pub cipher: String,
    /// "blake3-keyed".
    pub fingerprint: String,
    /// Derived from the master key (`cairn_chunk::Keys::check_value`).
    pub key_check: String,
}

impl EncryptionConfig {
    pub fn for_keys(keys: &Keys) -> Self {
        Self {
            cipher: "xchacha20-poly1305".into(),
            fingerprint: "blake3-keyed".into(),
            key_check: keys.check_value(),
        }
    }
}

/// How a wrapped key is unwrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WrapKind {
    Passphrase,
    KeyFile,
}

/// A `keys/<id>.json` object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    pub id: String,
    pub kind: WrapKind,
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Argon2id salt (hex), for a passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// `nonce | sealed master key | tag` (hex).
    pub wrapped: String,
}

/// What a key file holds: the master key (an export, or a typed-in paper key) or the secret
/// of one wrapped key (`repo key add --key-file`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyFile {
    /// Always "cairn-key-file-1".
    pub format: String,
    /// The repository it belongs to (absent for a typed-in paper key).
    pub repository: Option<String>,
    /// Which wrapped key it opens; absent when it holds the master key.
    pub key_id: Option<String>,
    /// 32 bytes, hex.
    pub secret: String,
}

const KEY_FILE_FORMAT: &str = "cairn-key-file-1";

/// A passphrase held in memory; `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What opens an encrypted repository.
#[derive(Clone, Debug)]
pub enum Credential {
    Passphrase(Secret),
    KeyFile { path: String, file: KeyFile },
}

impl Credential {
    pub fn passphrase(p: impl Into<Vec<u8>>) -> Self {
        Self::Passphrase(Secret(p.into()))
    }

    /// Reads a key file: the JSON [`KeyFile`], or a paper recovery key typed into a file.
    pub fn read_key_file(path: &std::path::Path) -> Result<Self> {
        let bad = |reason: String| VaultError::BadKeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file = if text.trim_start().starts_with('{') {
            let f: KeyFile = serde_json::from_str(&text)
                .map_err(|e| bad(format!("not a Cairn key file (truncated?): {e}")))?;
            if f.format != KEY_FILE_FORMAT {
                return Err(bad(format!("unknown format {:?}", f.format)));
            }
            f
        } else {
            let master = wrap::parse_paper_key(&text).map_err(|e| bad(e.to_string()))?;
            KeyFile {
                format: KEY_FILE_FORMAT.into(),
                repository: None,
                key_id: None,
                secret: hex::encode(master),
            }
        };
        secret_of(&file).map_err(bad)?;
        Ok(Self::KeyFile {
            path: path.display().to_string(),
            file,
        })
    }
}

fn secret_of(f: &KeyFile) -> std::result::Result<[u8; 32], String> {
    hex::decode(&f.secret)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "its secret is not 32 bytes of hex (truncated?)".to_string())
}

fn key_key(id: &str) -> Result<Key> {
    Key::new(format!("keys/{id}.json"))
        .map_err(|_| VaultError::Invalid(format!("{id:?} is not a key id")))
}

/// Writes a key file (mode 0600, created new: an existing file is never overwritten).
pub fn write_key_file(path: &std::path::Path, file: &KeyFile) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let body = serde_json::to_vec_pretty(file).expect("key file json");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VaultError::io(path.display(), "creating key file", e))?;
    f.write_all(&body)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| VaultError::io(path.display(), "writing key file", e))
}

/// The keys `cred` opens for the repository of `config` (`None` when it is not encrypted);
/// `wrapped` lists its wrapped keys (read only when the credential needs them). A client of
/// a vault service unlocks with it too.
pub fn unlock_with(
    config: &RepoConfig,
    wrapped: impl FnOnce() -> Result<Vec<WrappedKey>>,
    cred: &Credential,
) -> Result<Option<Keys>> {
    let Some(enc) = &config.encryption else {
        return Ok(None);
    };
    let repo_id = &config.id;
    let master = match cred {
        Credential::KeyFile { path, file } => {
            if let Some(r) = file.repository.as_ref().filter(|r| *r != repo_id) {
                return Err(VaultError::WrongKey(format!(
                    ": key file {path} belongs to repository {r}, this is {repo_id}"
                )));
            }
            let secret = secret_of(file).map_err(|reason| VaultError::BadKeyFile {
                path: path.clone(),
                reason,
            })?;
            match &file.key_id {
                None => Some(secret),
                Some(id) => wrapped()?
                    .iter()
                    .filter(|k| k.id == *id && k.kind == WrapKind::KeyFile)
                    .find_map(|k| try_unwrap(k, &wrap::key_file_key(&secret), repo_id)),
            }
        }
        Credential::Passphrase(p) => open_by_passphrase(&wrapped()?, &p.0, repo_id).map(|x| x.1),
    };
    master
        .map(|m| Keys::from_master(&m))
        .filter(|k| k.check_value() == enc.key_check)
        .map(Some)
        .ok_or_else(|| VaultError::WrongKey(String::new()))
}

/// The wrapped key `passphrase` opens, with the master key it holds.
fn open_by_passphrase(
    keys: &[WrappedKey],
    passphrase: &[u8],
    repo_id: &str,
) -> Option<(String, [u8; 32])> {
    keys.iter()
        .filter(|k| k.kind == WrapKind::Passphrase)
        .find_map(|k| {
            let kdf = k.kdf?;
            let salt = hex::decode(k.salt.as_deref()?).ok()?;
            let w = wrap::passphrase_key(passphrase, &salt, &kdf).ok()?;
            Some((k.id.clone(), try_unwrap(k, &w, repo_id)?))
        })
}

fn try_unwrap(k: &WrappedKey, wrapping: &[u8; 32], repo_id: &str) -> Option<[u8; 32]> {
    let w = hex::decode(&k.wrapped).ok()?;
    wrap::unwrap(wrapping, &w, repo_id).ok()
}

impl Repository {
    /// Every wrapped key, by id.
    pub fn list_keys(&self) -> Result<Vec<WrappedKey>> {
        let mut out = Vec::new();
        for m in self.store().list("keys")? {
            let b = match self.store().get(&m.key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            match serde_json::from_slice::<WrappedKey>(&b) {
                Ok(k) => out.push(k),
                Err(e) => tracing::warn!("skipping unreadable key object {}: {e}", m.key),
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Opens the repository's master key with `cred`; later reads and writes use it. A
    /// repository that is not encrypted needs nothing and is left as it is.
    pub fn unlock(&self, cred: &Credential) -> Result<()> {
        if let Some(keys) = unlock_with(self.config(), || self.list_keys(), cred)? {
            self.set_keys(Arc::new(keys));
        }
        Ok(())
    }

    fn unlocked(&self) -> Result<Arc<Keys>> {
        self.keys()
            .cloned()
            .ok_or_else(|| VaultError::KeyNeeded(self.config().id.clone()))
    }

    /// Wraps the master key by a new passphrase; returns the new key's id.
    pub fn add_passphrase(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let keys = self.unlocked()?;
        let salt = wrap::new_salt();
        let w = wrap::passphrase_key(passphrase, &salt, &kdf)
            .map_err(|e| VaultError::Invalid(e.to_string()))?;
        let k = WrappedKey {
            id: hex::encode(rand::random::<[u8; 8]>()),
            kind: WrapKind::Passphrase,
            created: now(),
            kdf: Some(kdf),
            salt: Some(hex::encode(salt)),
            wrapped: hex::encode(wrap::wrap(&w, keys.master(), &self.config().id)),
        };
        self.put_key(&k)?;
        Ok(k.id)
    }

    /// Wraps the master key by a new random key file secret, written to `path`; returns the
    /// new key's id.
    pub fn add_key_file(&self, path: &std::path::Path) -> Result<String> {
        let keys = self.unlocked()?;
        let secret: [u8; 32] = rand::random();
        let id = hex::encode(rand::random::<[u8; 8]>());
        let file = KeyFile {
            format: KEY_FILE_FORMAT.into(),
            repository: Some(self.config().id.clone()),
            key_id: Some(id.clone()),
            secret: hex::encode(secret),
        };
        write_key_file(path, &file)?;
        let k = WrappedKey {
            id,
            kind: WrapKind::KeyFile,
            created: now(),
            kdf: None,
            salt: None,
            wrapped: hex::encode(wrap::wrap(
                &wrap::key_file_key(&secret),
                keys.master(),
                &self.config().id,
            )),
        };
        self.put_key(&k)?;
        Ok(k.id)
    }

    fn put_key(&self, k: &WrappedKey) -> Result<()> {
        let body = serde_json::to_vec_pretty(k).expect("key json");
        Ok(self.store().put_new(&key_key(&k.id)?, &body)?)
    }

    /// Changes a passphrase: wraps the master key by `new` (after opening the repository
    /// with `old`), then removes the wrapped key `old` opened. Returns the new key's id. No
    /// data object changes; a crash between the two steps leaves both passphrases working.
    pub fn change_passphrase(&self, old: &[u8], new: &[u8], kdf: KdfParams) -> Result<String> {
        let repo_id = self.config().id.clone();
        let wrong = || VaultError::WrongKey(": the old passphrase opens no key".into());
        let (old_id, master) =
            open_by_passphrase(&self.list_keys()?, old, &repo_id).ok_or_else(wrong)?;
        let keys = Keys::from_master(&master);
        let enc = self.config().encryption.as_ref().ok_or_else(wrong)?;
        if keys.check_value() != enc.key_check {
            return Err(wrong());
        }
        self.set_keys(Arc::new(keys));
        let id = self.add_passphrase(new, kdf)?;
        self.remove_key(&old_id)?;
        Ok(id)
    }

    /// Removes a wrapped key; refuses to remove the last one.
    pub fn remove_key(&self, id: &str) -> Result<()> {
        let all = self.list_keys()?;
        if !all.iter().any(|k| k.id == id) {
            return Err(VaultError::Invalid(format!("no key {id}")));
        }
        if all.len() == 1 {
            return Err(VaultError::Invalid(format!(
                "key {id} is the last key of this repository: removing it would lose the data \
                 (add another key first)"
            )));
        }
        Ok(self.store().delete(&key_key(id)?)?)
    }

    /// The master key as a key file (opens the repository even without any `keys/` object).
    pub fn export_key(&self) -> Result<KeyFile> {
        let keys = self.unlocked()?;
        Ok(KeyFile {
            format: KEY_FILE_FORMAT.into(),
            repository: Some(self.config().id.clone()),
            key_id: None,
            secret: hex::encode(keys.master()),
        })
    }

    /// The master key as a paper recovery key.
    pub fn paper_key(&self) -> Result<String> {
        Ok(wrap::paper_key(self.unlocked()?.master()))
    }
}
