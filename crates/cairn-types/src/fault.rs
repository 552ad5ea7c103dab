//! Fault points: named places in a role's work where the fault-injection suite makes the
//! process die as `kill -9` would (no destructor, no flush, no reply), to prove that every
//! role recovers from dying at that moment.
//!
//! A point does nothing unless the process was started with `CAIRN_FAULT_POINT` naming it
//! (`NAME`, or `NAME@N` to die on its N-th pass, counting from 1). The variable is read once;
//! an unset variable costs one relaxed atomic load per pass. Points are named
//! `ROLE.FLOW.MOMENT`; [`POINTS`] lists every one, so the suite can walk them all.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every fault point, with the moment it stands for.
pub const POINTS: &[(&str, &str)] = &[
    (
        "storage.backup.after_unit_snapshot",
        "the storage agent has taken the storage-unit snapshot, nothing sent yet",
    ),
    (
        "storage.backup.before_commit",
        "the storage agent (or the CLI) has sent every segment of a disk, not yet committed",
    ),
    (
        "vault.commit.before_manifest",
        "the vault has made a backup's containers durable, the manifest is not written",
    ),
    (
        "vault.gc.after_repack",
        "GC has written repacked containers, the index still names the old ones",
    ),
    (
        "vault.gc.after_index",
        "GC has rewritten the index, the doomed containers are not deleted yet",
    ),
    (
        "storage.restore.before_rename",
        "the storage agent has written a restored qcow2 disk under its partial name",
    ),
    (
        "host.snapshot.after_snapshot",
        "the host agent has taken the VM snapshot and thawed the guest, not yet replied",
    ),
];

struct Armed {
    name: String,
    nth: u64,
    passes: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("CAIRN_FAULT_POINT").ok()?;
            let (name, nth) = match v.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                None => (v, 1),
            };
            Some(Armed {
                name,
                nth,
                passes: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Dies here, as if killed with SIGKILL, when this point is armed and due.
pub fn point(name: &str) {
    let Some(a) = armed() else { return };
    if a.name == name && a.passes.fetch_add(1, Ordering::Relaxed) + 1 == a.nth {
        eprintln!("fault point {name}: dying as if killed");
        std::process::abort();
    }
}
