//! The vault service's control calls (`docs/PROTOCOL.md`): the JSON bodies and answers of
//! sessions, counters and maintenance, and the retention rules a prune applies. The vault
//! service answers them and `cairn_vault::RemoteVault` asks. (The data path — uploads of
//! segments, fetches — is the framed binary protocol of `docs/PROTOCOL.md`, not JSON.)
//! Every struct refuses fields it does not know.

use cairn_types::{SessionId, SnapshotId};
use serde::{Deserialize, Serialize};

/// Retention rules of a prune. All zero keeps everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneOptions {
    pub keep_last: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
}

/// Answer of `GET /v1/stats`: disk-data bytes through the service and its sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultStats {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub open_sessions: u64,
    pub expired_sessions: u64,
    pub session_lease_ms: u64,
}

/// Answer of `POST /v1/sessions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBegun {
    pub session: SessionId,
    /// The session's lease; older services do not say (and do not expire sessions).
    #[serde(default)]
    pub lease_ms: Option<u64>,
}

/// Answer of `POST /v1/sessions/{id}/keepalive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRenewed {
    pub lease_ms: u64,
}

/// Answer of `POST /v1/sessions/{id}/blobs`: blobs stored from the upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub stored: u64,
}

/// Answer of `DELETE /v1/sessions/{id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aborted {
    pub aborted: bool,
}

/// The empty body of `POST /v1/sessions` and `POST /v1/sessions/{id}/keepalive`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Body of `POST /v1/verify`, `/v1/prune` and `/v1/gc` (empty: every field default).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintRequest {
    #[serde(default)]
    pub read_data: bool,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub prune: Option<PruneOptions>,
    /// GC: how long condemned containers wait at least before they are deleted (seconds);
    /// absent: the store's default. Left out when absent, so older services accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_grace_secs: Option<u64>,
}

/// Body of `POST /v1/forget`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgetRequest {
    /// Snapshot ids, unique prefixes or names.
    pub snapshots: Vec<String>,
}

/// A snapshot's retention lock: answer of `GET /v1/locks` (one per locked snapshot, expired
/// locks included) and part of the answer of `POST /v1/snapshots/{spec}/lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLock {
    pub snapshot: SnapshotId,
    /// Unix seconds: the snapshot cannot be forgotten before.
    pub until: u64,
}

/// Body of `POST /v1/snapshots/{spec}/lock`: lock or extend, never shorten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Unix seconds.
    pub until: u64,
}

/// Answer of `POST /v1/snapshots/{spec}/lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockAnswer {
    pub lock: SnapshotLock,
    /// Objects the store made immutable, and those it could not (the vault's rules hold
    /// either way).
    pub protected: usize,
    pub unprotected: usize,
}

/// The repository's retention rule for new snapshots: `GET` and `PUT /v1/retention`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Every new snapshot is locked for at least this long (0: no minimum).
    pub min_lock_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str, named: &str) {
        let e = serde_json::from_str::<T>(json).expect_err(json);
        assert!(e.to_string().contains(named), "{e} should name {named}");
    }

    #[test]
    fn unknown_fields_are_named() {
        refused::<MaintRequest>(r#"{"dry_run": true, "force": true}"#, "force");
        refused::<MaintRequest>(
            r#"{"prune": {"keep_last": 1, "keep_hourly": 2}}"#,
            "keep_hourly",
        );
        refused::<ForgetRequest>(r#"{"snapshots": [], "all": true}"#, "all");
        refused::<VaultStats>(
            r#"{"bytes_received": 0, "bytes_sent": 0, "open_sessions": 0,
                "expired_sessions": 0, "session_lease_ms": 1, "uptime": 3}"#,
            "uptime",
        );
        refused::<Stored>(r#"{"stored": 1, "skipped": 0}"#, "skipped");
    }

    #[test]
    fn an_older_service_without_leases_still_begins() {
        let b: SessionBegun =
            serde_json::from_str(r#"{"session": "00112233445566778899aabbccddeeff"}"#).unwrap();
        assert_eq!(b.lease_ms, None);
    }
}
