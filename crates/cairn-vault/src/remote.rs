//! A vault service as a [`Vault`]: the client half of the protocol in [`crate::service`].
//! Counts the disk-data bytes it sends and receives.
//!
//! An encrypted repository's service has no key: a client [`unlock`](RemoteVault::unlock)s
//! it, then seals what it uploads, opens what it fetches and the manifests' private fields,
//! and reads recipe trees itself (the service's `entries` cannot).
//!
//! An open session renews its lease from a keep-alive thread (every third of the lease the
//! service announced), so a backup that is alive keeps its session however long it goes
//! between two calls; the thread stops when the session is committed or dropped, and a
//! client that dies stops renewing with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_chunk::{Entry, Keys};
use cairn_http::{Client, ClientError, Trust};
use cairn_types::{Digest, SessionId, SnapshotId};

use crate::api::{Upload, Vault, VaultSession};
use crate::error::{Result, VaultError};
use crate::maint::{GcOptions, GcPlan, PruneOptions, PrunePlan, VerifyReport};
use crate::manifest::{RepoConfig, SnapshotManifest};
use crate::service::messages::{
    Aborted, Empty, ForgetRequest, LeaseRenewed, MaintRequest, SessionBegun, Stored,
};
use crate::service::messages::{LockAnswer, LockRequest, RetentionPolicy, SnapshotLock};
use crate::session::CommitRequest;
use crate::wire;

fn remote(e: ClientError) -> VaultError {
    match &e {
        ClientError::Api { api, .. } => VaultError::Remote {
            kind: api.kind,
            message: e.to_string(),
        },
        _ => VaultError::Remote {
            kind: cairn_http::ErrorKind::Unknown,
            message: e.to_string(),
        },
    }
}

/// A connection to a vault service.
#[derive(Debug, Clone)]
pub struct RemoteVault {
    client: Client,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    keys: Option<Arc<Keys>>,
}

impl RemoteVault {
    /// Opens the master key of an encrypted repository with `cred` (the wrapped keys are
    /// read from the service); a repository that is not encrypted is left as it is.
    /// Opens downloaded answers, each with the digest it must hash to (the end-to-end
    /// check), decoding each frame once for the run of answers that share it; calls `sink`
    /// with each answer's position and plaintext.
    fn open_answers<'a>(
        &self,
        answers: impl IntoIterator<Item = (wire::DownloadedBlob<'a>, &'a Digest)>,
        mut sink: impl FnMut(usize, Vec<u8>),
    ) -> Result<()> {
        // A frame is named by the answer that carried it; the parsers check that the first
        // answer carries one.
        let mut cache = cairn_chunk::FrameCache::new();
        let mut carried: (usize, &[u8]) = (0, &[]);
        for (k, ((codec, m, bytes), d)) in answers.into_iter().enumerate() {
            if let Some(b) = bytes {
                carried = (k, b);
            }
            let plain = cache
                .member(self.keys.as_deref(), carried.0, codec, carried.1, m, d)
                .map_err(|e| VaultError::Corrupt(format!("segment from the vault: {e}")))?;
            sink(k, plain);
        }
        Ok(())
    }

    pub fn unlock(&mut self, cred: &crate::keys::Credential) -> Result<()> {
        let config = self.config()?;
        let client = &self.client;
        let keys = crate::keys::unlock_with(
            &config,
            || client.get_json("/v1/keys").map_err(remote),
            cred,
        )?;
        if let Some(k) = keys {
            self.keys = Some(Arc::new(k));
        }
        Ok(())
    }

    fn open(&self, mut m: SnapshotManifest) -> Result<SnapshotManifest> {
        if let Some(k) = &self.keys {
            m.open_private(k)
                .map_err(|e| VaultError::Corrupt(format!("snapshot {}: {e}", m.id)))?;
        }
        Ok(m)
    }

    /// Reads a recipe tree here, level by level (the service cannot open sealed nodes).
    fn walk_tree(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        crate::repo::walk_recipe(s, |d| self.fetch(d))
    }
    /// Connects and checks the token with a config request.
    pub fn connect(base: &str, token: &str, trust: &Trust) -> Result<Self> {
        let client = Client::new(base, token, trust).map_err(remote)?;
        let v = Self {
            client,
            sent: Arc::default(),
            received: Arc::default(),
            keys: None,
        };
        v.config()?;
        Ok(v)
    }
}

struct RemoteSession {
    client: Client,
    id: SessionId,
    sent: Arc<AtomicU64>,
    committed: bool,
    /// Dropping it stops the keep-alive thread.
    keepalive: Option<crossbeam_channel::Sender<()>>,
}

/// Renews session `id` every `every` until the returned sender is dropped or the service
/// no longer knows the session. Failures other than that are retried on the next tick.
fn start_keepalive(
    client: Client,
    id: SessionId,
    every: Duration,
) -> Option<crossbeam_channel::Sender<()>> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let path = format!("/v1/sessions/{id}/keepalive");
    let spawned = std::thread::Builder::new()
        .name("cairn-session-keepalive".into())
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                match client.post_json::<_, LeaseRenewed>(&path, &Empty {}) {
                    Ok(_) => {}
                    Err(e) if e.kind() == Some(cairn_http::ErrorKind::NotFound) => {
                        tracing::warn!("vault session {id} is gone: {e}");
                        return;
                    }
                    Err(e) => tracing::debug!("keep-alive of vault session {id}: {e}"),
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!("no keep-alive for vault session {id}: {e}");
            None
        }
    }
}

impl VaultSession for RemoteSession {
    fn lacking(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(digests.len());
        for chunk in digests.chunks(wire::MAX_DIGESTS) {
            let r = self
                .client
                .post_raw(
                    &format!("/v1/sessions/{}/lacking", self.id),
                    &wire::encode_digests(chunk),
                )
                .map_err(remote)?;
            if r.len() != chunk.len() {
                return Err(VaultError::Remote {
                    kind: cairn_http::ErrorKind::Unknown,
                    message: "lacking: wrong answer length".into(),
                });
            }
            out.extend(r.into_iter().map(|b| b != 0));
        }
        Ok(out)
    }

    fn upload(&self, blobs: Vec<Upload>) -> Result<()> {
        let body = wire::encode_uploads(&blobs);
        let n: u64 = blobs.iter().map(|b| b.seg.bytes.len() as u64).sum();
        let _: Stored = self
            .client
            .post_bytes(&format!("/v1/sessions/{}/blobs", self.id), &body)
            .map_err(remote)?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn commit(mut self: Box<Self>, req: CommitRequest) -> Result<SnapshotManifest> {
        // A commit is not subject to the lease: the service takes the session out of its
        // table for it.
        drop(self.keepalive.take());
        let m = self
            .client
            .post_json(&format!("/v1/sessions/{}/commit", self.id), &req)
            .map_err(remote)?;
        self.committed = true;
        Ok(m)
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        drop(self.keepalive.take());
        if !self.committed {
            let _: std::result::Result<Aborted, _> = self
                .client
                .delete_json(&format!("/v1/sessions/{}", self.id));
        }
    }
}

fn path_seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Vault for RemoteVault {
    fn config(&self) -> Result<RepoConfig> {
        self.client.get_json("/v1/config").map_err(remote)
    }

    fn begin(&self, _purpose: &str) -> Result<Box<dyn VaultSession>> {
        let b: SessionBegun = self
            .client
            .post_json("/v1/sessions", &Empty {})
            .map_err(remote)?;
        let keepalive = b.lease_ms.and_then(|ms| {
            let every = Duration::from_millis(ms / 3).max(Duration::from_millis(100));
            start_keepalive(self.client.clone(), b.session, every)
        });
        Ok(Box::new(RemoteSession {
            client: self.client.clone(),
            id: b.session,
            sent: self.sent.clone(),
            committed: false,
            keepalive,
        }))
    }

    fn list(&self) -> Result<Vec<SnapshotManifest>> {
        let all: Vec<SnapshotManifest> = self.client.get_json("/v1/snapshots").map_err(remote)?;
        all.into_iter().map(|m| self.open(m)).collect()
    }

    fn find(&self, spec: &str) -> Result<SnapshotManifest> {
        if self.keys.is_some() {
            // Names are sealed: only this side can match them.
            return crate::repo::find_in(&self.list()?, spec);
        }
        self.client
            .get_json(&format!("/v1/snapshots/{}", path_seg(spec)))
            .map_err(|e| match e.kind() {
                Some(cairn_http::ErrorKind::NotFound) => {
                    VaultError::SnapshotNotFound(spec.to_string())
                }
                _ => remote(e),
            })
    }

    fn entries(&self, s: &SnapshotManifest) -> Result<Vec<Entry>> {
        if self.keys.is_some() {
            return Ok(self.walk_tree(s)?.0);
        }
        let b = self
            .client
            .get_bytes(&format!("/v1/snapshots/{}/entries", s.id))
            .map_err(remote)?;
        cairn_chunk::recipe::decode_entries(&b)
            .map_err(|e| VaultError::Corrupt(format!("entries of {}: {e}", s.id)))
    }

    fn entries_and_nodes(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        if self.keys.is_some() {
            return self.walk_tree(s);
        }
        Ok((self.entries(s)?, Vec::new()))
    }

    fn keys(&self) -> Option<Arc<Keys>> {
        self.keys.clone()
    }

    fn fetch(&self, digests: &[Digest]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(digests.len());
        for chunk in digests.chunks(4096) {
            let body = self
                .client
                .post_raw("/v1/fetch", &wire::encode_digests(chunk))
                .map_err(remote)?;
            self.received
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let frames = wire::decode_download(&body, chunk.len())
                .map_err(|e| VaultError::Corrupt(format!("fetch answer: {e}")))?;
            let answers = frames.into_iter().zip(chunk);
            self.open_answers(answers, |_, plain| out.push(plain))?;
        }
        Ok(out)
    }

    fn fetch_near(&self, required: &[Digest], optional: &[Digest]) -> Result<crate::api::Fetched> {
        if required.len() + optional.len() > wire::MAX_DIGESTS || required.is_empty() {
            return Ok((self.fetch(required)?, Vec::new()));
        }
        let body = match self
            .client
            .post_raw("/v1/fetch-near", &wire::encode_near(required, optional))
        {
            Ok(b) => b,
            // A vault service from before fetch-near.
            Err(e) if e.kind() == Some(cairn_http::ErrorKind::NotFound) => {
                return Ok((self.fetch(required)?, Vec::new()));
            }
            Err(e) => return Err(remote(e)),
        };
        self.received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let n = required.len() + optional.len();
        let answers = wire::decode_near_answer(&body, n)
            .map_err(|e| VaultError::Corrupt(format!("fetch-near answer: {e}")))?;
        let mut req: Vec<Option<Vec<u8>>> = vec![None; required.len()];
        let mut opt = Vec::new();
        let indices: Vec<usize> = answers.iter().map(|a| a.0).collect();
        let answers = answers.into_iter().map(|(i, a)| {
            let d = required
                .get(i)
                .unwrap_or_else(|| &optional[i - required.len()]);
            (a, d)
        });
        self.open_answers(answers, |k, plain| {
            let i = indices[k];
            match req.get_mut(i) {
                Some(slot) => *slot = Some(plain),
                None => opt.push((i - required.len(), plain)),
            }
        })?;
        let req = req
            .into_iter()
            .zip(required)
            .map(|(p, d)| p.ok_or(VaultError::MissingSegment(*d)))
            .collect::<Result<_>>()?;
        Ok((req, opt))
    }

    fn verify(&self, read_data: bool) -> Result<VerifyReport> {
        self.client
            .post_json(
                "/v1/verify",
                &MaintRequest {
                    read_data,
                    ..Default::default()
                },
            )
            .map_err(remote)
    }

    fn damaged_segments(&self) -> Result<Vec<Digest>> {
        self.client.get_json("/v1/damaged").map_err(remote)
    }

    fn lock(&self, spec: &str, until: u64) -> Result<LockAnswer> {
        let path = format!("/v1/snapshots/{}/lock", path_seg(spec));
        self.client
            .post_json(&path, &LockRequest { until })
            .map_err(remote)
    }

    fn locks(&self) -> Result<Vec<SnapshotLock>> {
        self.client.get_json("/v1/locks").map_err(remote)
    }

    fn retention_policy(&self) -> Result<RetentionPolicy> {
        self.client.get_json("/v1/retention").map_err(remote)
    }

    fn set_retention_policy(&self, p: &RetentionPolicy) -> Result<RetentionPolicy> {
        self.client.put_json("/v1/retention", p).map_err(remote)
    }

    fn forget(&self, specs: &[String]) -> Result<Vec<SnapshotId>> {
        if self.keys.is_some() {
            // Names are sealed: resolve them here, send ids (a damaged snapshot's id passes
            // through as it is).
            let all = self.list()?;
            let ids: Vec<String> = specs
                .iter()
                .map(|s| match crate::repo::find_in(&all, s) {
                    Ok(m) => m.id.to_string(),
                    Err(_) => s.clone(),
                })
                .collect();
            return self
                .client
                .post_json("/v1/forget", &ForgetRequest { snapshots: ids })
                .map_err(remote);
        }
        self.client
            .post_json(
                "/v1/forget",
                &ForgetRequest {
                    snapshots: specs.to_vec(),
                },
            )
            .map_err(remote)
    }

    fn prune(&self, opts: &PruneOptions, dry_run: bool) -> Result<PrunePlan> {
        self.client
            .post_json(
                "/v1/prune",
                &MaintRequest {
                    dry_run,
                    prune: Some(opts.clone()),
                    ..Default::default()
                },
            )
            .map_err(remote)
    }

    fn gc(&self, opts: &GcOptions) -> Result<GcPlan> {
        self.client
            .post_json(
                "/v1/gc",
                &MaintRequest {
                    dry_run: opts.dry_run,
                    gc_grace_secs: opts.grace_secs,
                    ..Default::default()
                },
            )
            .map_err(remote)
    }

    fn wire_bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn location(&self) -> String {
        self.client.base().to_string()
    }
}
