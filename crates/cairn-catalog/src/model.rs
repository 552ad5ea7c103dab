//! The catalog's rows as typed values: the backup server's records of `cairn_api::server`,
//! stored as they are answered (one shape on the wire and in the catalog). Enumerations are
//! stored by their wire names; a stored name this build does not know is a
//! [`crate::CatalogError::Decode`] naming it, never a default.

pub use cairn_api::server::{
    BackupDisk, BackupRecord, Hold, IndexedVolume, JobEvent, JobKind, JobRecord, JobResult,
    JobState, MetadataSnapshot, Retention, Schedule, TimestampId, VmSummary,
};
