//! Maintenance: verify, prune, GC. Destructive work is planned first; the plan is printable
//! and `dry_run` stops after planning.

pub(crate) mod gc;
mod prune;
mod repair;
mod verify;

pub use gc::{GC_CLOCK_MARGIN, GC_GRACE_REMOTE, GcOptions, GcPlan, LEFTOVER_MIN_AGE, gc};
pub use prune::{PruneOptions, PrunePlan, forget, keep_mask, prune};
pub use repair::{RepairReport, repair};
pub use verify::{Damage, SnapshotCheck, VerifyReport, verify};
