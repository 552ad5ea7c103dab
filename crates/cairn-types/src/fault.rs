//! Fault points: named places in a role's work where the fault-injection suite makes the
//! process die as `kill -9` would (no destructor, no flush, no reply), to prove that every
//! role recovers from dying at that moment.
//!
//! A point does nothing unless the process was started with `CAIRN_FAULT_POINT` naming it
//! (`NAME`, or `NAME@N` to die on its N-th pass, counting from 1). `CAIRN_FAULT_PAUSE=NAME:MS`
//! instead holds the first pass of a point for `MS` milliseconds, so that the suite can kill
//! *another* role while this one stands at a known moment. The variables are read once; unset
//! variables cost one relaxed atomic load per pass. Points are named `ROLE.FLOW.MOMENT`;
//! [`POINTS`] lists every one, so the suite can walk them all.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
        "storage.restore.after_first_batch",
        "the storage agent has fetched and written the first batch of a restored disk",
    ),
    (
        "server.prune.before_forget",
        "the server has removed a pruned backup from its catalog, the vault still holds it",
    ),
    (
        "vault.forget.after_first",
        "the vault has forgotten the first of several snapshots in one call",
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

struct Pause {
    name: String,
    ms: u64,
    done: AtomicBool,
}

fn pause() -> Option<&'static Pause> {
    static PAUSE: OnceLock<Option<Pause>> = OnceLock::new();
    PAUSE
        .get_or_init(|| {
            let v = std::env::var("CAIRN_FAULT_PAUSE").ok()?;
            let (name, ms) = v.rsplit_once(':')?;
            Some(Pause {
                name: name.to_string(),
                ms: ms.parse().ok()?,
                done: AtomicBool::new(false),
            })
        })
        .as_ref()
}

/// Dies here, as if killed with SIGKILL, when this point is armed and due; or, when a pause
/// names it, holds its first pass for the pause's time.
pub fn point(name: &str) {
    if let Some(p) = pause()
        && p.name == name
        && !p.done.swap(true, Ordering::Relaxed)
    {
        eprintln!("fault point {name}: pausing {} ms", p.ms);
        std::thread::sleep(std::time::Duration::from_millis(p.ms));
    }
    let Some(a) = armed() else { return };
    if a.name == name && a.passes.fetch_add(1, Ordering::Relaxed) + 1 == a.nth {
        eprintln!("fault point {name}: dying as if killed");
        std::process::abort();
    }
}
