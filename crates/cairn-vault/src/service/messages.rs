//! The JSON bodies and answers of the vault service's control calls: the contract's types,
//! [`cairn_api::vault`].

pub use cairn_api::vault::{
    Aborted, Empty, ForgetRequest, LeaseRenewed, LockAnswer, LockRequest, MaintRequest,
    RetentionPolicy, SessionBegun, SnapshotLock, Stored, VaultStats,
};
