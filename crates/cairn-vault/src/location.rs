//! Where a repository lives, as users name it: a directory, or `s3://BUCKET[/PREFIX]`.
//!
//! S3 settings come from [`S3Overrides`] (the CLI's `--s3-*` flags, set once at start-up)
//! and else from the usual `AWS_*` variables ([`s3_config`]). An S3
//! repository keeps its rebuildable local state (the index) in a cache directory:
//! `--cache-dir`, else `CAIRN_CACHE_DIR`, else `$XDG_CACHE_HOME/cairn`, else `~/.cache/cairn`, one subdirectory
//! per endpoint, bucket and prefix. Losing the cache costs a rebuild from the containers'
//! trailers, never data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Result, VaultError};
use crate::repo::{InitOptions, Repository};
use crate::store::s3::{self, Credentials, S3Config, S3Store};

/// S3 settings given on the command line; each wins over its `AWS_*` variable.
#[derive(Clone, Debug, Default)]
pub struct S3Overrides {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Where S3 repositories keep their local cache (wins over `CAIRN_CACHE_DIR`).
    pub cache_dir: Option<PathBuf>,
}

static OVERRIDES: OnceLock<S3Overrides> = OnceLock::new();

/// Sets the process's S3 overrides (once; later calls are ignored).
pub fn set_s3_overrides(o: S3Overrides) {
    let _ = OVERRIDES.set(o);
}

/// Whether `location` names an S3 repository.
pub fn is_s3(location: &str) -> bool {
    s3::is_s3_url(location)
}

/// The full S3 settings for `url`: overrides, then the environment.
pub fn s3_config(url: &str) -> Result<S3Config> {
    let o = OVERRIDES.get().cloned().unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (bucket, prefix) = s3::parse_url(url)?;
    let endpoint = o
        .endpoint
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .ok_or_else(|| {
            VaultError::Invalid(format!(
                "{url}: no S3 endpoint: pass --s3-endpoint or set AWS_ENDPOINT_URL"
            ))
        })?;
    let region = o
        .region
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let access_key = o.access_key.or_else(|| env("AWS_ACCESS_KEY_ID"));
    let secret_key = o.secret_key.or_else(|| env("AWS_SECRET_ACCESS_KEY"));
    let (Some(access_key), Some(secret_key)) = (access_key, secret_key) else {
        return Err(VaultError::Invalid(format!(
            "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or --s3-access-key and --s3-secret-key-file)"
        )));
    };
    Ok(S3Config {
        endpoint,
        region,
        bucket,
        prefix,
        credentials: Credentials {
            access_key,
            secret_key,
        },
        ca_file: o.ca_file.or_else(|| env("AWS_CA_BUNDLE").map(Into::into)),
    })
}

/// The cache directory of an S3 repository (module docs).
pub fn s3_cache_dir(cfg: &S3Config) -> PathBuf {
    let root = OVERRIDES
        .get()
        .and_then(|o| o.cache_dir.clone())
        .or_else(|| std::env::var_os("CAIRN_CACHE_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("cairn")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/cairn")
        });
    let what = format!(
        "{}\n{}\n{}",
        cfg.endpoint.trim_end_matches('/'),
        cfg.bucket,
        cfg.prefix
    );
    let tag = blake3::hash(what.as_bytes()).to_hex();
    root.join(format!("s3-{}-{}", cfg.bucket, &tag[..16]))
}

/// Connects to an S3 location; returns the store and its cache directory (created).
fn open_s3(url: &str) -> Result<(Arc<S3Store>, PathBuf)> {
    let cfg = s3_config(url)?;
    let cache = s3_cache_dir(&cfg);
    let store = S3Store::open(cfg)?;
    Ok((Arc::new(store), cache))
}

fn cache_err(cache: &Path, e: std::io::Error) -> VaultError {
    VaultError::Invalid(format!("cache directory {}: {e}", cache.display()))
}

/// The file in a cache directory naming the repository it caches.
const CACHE_ID_FILE: &str = "repository-id";

/// Makes `cache` belong to repository `id`: a cache of another repository (one that was
/// deleted and made anew at the same location) is emptied first, so that its index never
/// vouches for segments of containers that are gone.
fn claim_cache(cache: &Path, id: &str) -> Result<()> {
    let io = |e| cache_err(cache, e);
    let marker = cache.join(CACHE_ID_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(held) if held.trim() == id => return Ok(()),
        Ok(_) => std::fs::remove_dir_all(cache).map_err(io)?,
        Err(_) if cache.exists() => std::fs::remove_dir_all(cache).map_err(io)?,
        Err(_) => {}
    }
    std::fs::create_dir_all(cache).map_err(io)?;
    std::fs::write(&marker, id).map_err(io)
}

impl Repository {
    /// Opens the repository at `location`: a directory or `s3://BUCKET[/PREFIX]`.
    pub fn open_location(location: &Path) -> Result<Arc<Self>> {
        match location.to_str().filter(|s| is_s3(s)) {
            Some(url) => {
                let (store, cache) = open_s3(url)?;
                let id = Self::read_config(store.as_ref())?.id;
                claim_cache(&cache, &id)?;
                Self::open(store, &cache)
            }
            None => Self::open_dir(location),
        }
    }

    /// Creates a repository at `location`: a directory or `s3://BUCKET[/PREFIX]` (the bucket
    /// must exist; nothing under the prefix may be a repository already).
    pub fn init_location(location: &Path, opts: &InitOptions) -> Result<Arc<Self>> {
        match location.to_str().filter(|s| is_s3(s)) {
            Some(url) => {
                let (store, cache) = open_s3(url)?;
                // Whatever a cache holds here is of a repository that is gone.
                if cache.exists() {
                    std::fs::remove_dir_all(&cache).map_err(|e| cache_err(&cache, e))?;
                }
                std::fs::create_dir_all(&cache).map_err(|e| cache_err(&cache, e))?;
                let repo = Self::init(store, &cache, opts)?;
                std::fs::write(cache.join(CACHE_ID_FILE), &repo.config().id)
                    .map_err(|e| cache_err(&cache, e))?;
                Ok(repo)
            }
            None => Self::init_dir(location, opts),
        }
    }
}
