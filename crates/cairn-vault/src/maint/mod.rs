//! Maintenance: verify, prune, GC. Destructive work is planned first; the plan is printable
//! and `dry_run` stops after planning.

mod gc;
mod prune;
mod verify;

pub use gc::{GcPlan, gc};
pub use prune::{PruneOptions, PrunePlan, forget, keep_mask, prune};
pub use verify::{Damage, VerifyReport, verify};
