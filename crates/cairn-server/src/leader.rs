//! Which server is active when several share one PostgreSQL catalog
//! (`cairn server --catalog postgresql://...`).
//!
//! Every server contends for the catalog's lease [`LEASE`] ([`cairn_catalog::lease`]). The
//! holder is **active**: it runs the job engine and the scheduler and accepts every API
//! request. The others are on **standby**: they answer reads from the shared catalog and
//! refuse changes with `503 standby: the active server is HOLDER` (`GET /v1/leader` says
//! which is which), and try to take the lease over every [`RENEW_EVERY`].
//!
//! | what | when |
//! |---|---|
//! | the holder renews | every [`RENEW_EVERY`] (3 s); a lease lapses [`LEASE_TTL`] (10 s) after its last renewal |
//! | the holder stops being active | [`MARGIN`] (2 s) before its lease can lapse: at the moment it sent its last successful renewal + TTL − margin, on its own monotonic clock, even when it cannot reach the database to learn more |
//! | a standby takes over after the active server died | within TTL + one attempt: ≤ 13 s |
//! | a server stopping cleanly | gives the lease up ([`step_down`]): a standby takes over at its next attempt |
//!
//! **Becoming active runs what a server start runs**: jobs left `running` are failed and
//! what they held released, `queued` ones are queued again ([`crate::engine::recover`]),
//! orphaned metadata snapshots are removed; the workers and the scheduler start the first
//! time. **A server that stops being active** (renewals failing until its deadline, or
//! another server holding the lease) logs it, starts no job, and its running flows stop at
//! their next step boundary (failed, holds released); it keeps contending, and recovers
//! again if it becomes active again. Starting a job is a conditional update (`queued` →
//! `running`), so two servers never run one job even around a takeover.
//!
//! Lease times are wall-clock milliseconds written by the holder and compared by the
//! others: servers sharing a catalog need clocks within [`MARGIN`] of each other (NTP).
//!
//! On SQLite (one server per catalog file: [`cairn_catalog::Catalog::shared`] is false)
//! there is no lease and the server is always active.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::server::LeaderStatus;
use cairn_catalog::{Catalog, now_ms};

use crate::{Result, Server};

/// The name of the servers' lease in the catalog.
pub const LEASE: &str = "server";
/// How long a lease lasts after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the holder renews, and a standby tries to take the lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How long before its lease can lapse the holder stops acting as active: covers clock
/// differences between servers.
pub const MARGIN: Duration = Duration::from_secs(2);

/// This process's part in the lease.
#[derive(Debug)]
pub struct Leadership {
    /// This process in the lease: `HOST pid PID #RANDOM`.
    me: String,
    /// Whether a lease decides (a shared catalog); otherwise always active.
    leased: bool,
    /// Until when this process is active: its deadline as the holder; `None` on standby.
    until: Mutex<Option<Instant>>,
}

impl Leadership {
    /// For a server on `catalog`: leased when the catalog may be shared.
    pub fn new(catalog: &Catalog) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".into());
        Self {
            me: format!(
                "{host} pid {} #{}",
                std::process::id(),
                &cairn_catalog::new_id()[..6]
            ),
            leased: catalog.shared(),
            until: Mutex::new(None),
        }
    }

    /// Whether this server may run jobs and accept changes now.
    pub fn is_active(&self) -> bool {
        !self.leased || self.until().is_some_and(|u| Instant::now() < u)
    }

    /// This process's name in the lease.
    pub fn me(&self) -> &str {
        &self.me
    }

    fn until(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_until(&self, until: Option<Instant>) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// What `GET /v1/leader` answers: this server's role and the lease as stored.
    pub fn status(&self, catalog: &Catalog) -> Result<LeaderStatus> {
        let lease = if self.leased {
            catalog.lease(LEASE)?
        } else {
            None
        };
        Ok(LeaderStatus {
            active: self.is_active(),
            me: self.me.clone(),
            shared: self.leased,
            holder: lease.as_ref().map(|l| l.holder.clone()),
            expires_ms: lease.map(|l| l.expires_ms),
        })
    }

    /// Why a standby refuses a change, naming the active server when one holds the lease.
    pub fn standby_message(&self, catalog: &Catalog) -> String {
        match catalog.lease(LEASE) {
            Ok(Some(l)) if l.holder != self.me && l.expires_ms > now_ms() => {
                format!("standby: the active server is {}", l.holder)
            }
            Ok(_) => format!(
                "standby: no server is active right now; this one tries to take over every {} s",
                RENEW_EVERY.as_secs()
            ),
            Err(e) => format!("standby: the catalog cannot tell which server is active: {e}"),
        }
    }
}

/// Takes or renews the lease once; whether this process holds it. Sets the deadline.
fn renew(server: &Server, lease_catalog: &Catalog) -> std::result::Result<bool, String> {
    let sent = Instant::now();
    let ttl_ms = i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
    let l = &server.leader;
    match lease_catalog.acquire_lease(LEASE, &l.me, now_ms(), ttl_ms) {
        Ok(true) => {
            l.set_until(Some(sent + LEASE_TTL - MARGIN));
            Ok(true)
        }
        Ok(false) => {
            l.set_until(None);
            Ok(false)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// What a server runs when it becomes active: recovery as at a start, then (once) the
/// workers and the scheduler.
pub(crate) fn activate(server: &Arc<Server>) -> Result<()> {
    crate::engine::recover(&**server)?;
    // Metadata snapshots of backups that never got recorded (no job of this process runs
    // yet on a first start; on a takeover the old holder's jobs stop before recording).
    for m in server.catalog.orphan_metadata()? {
        let _ = server.meta.remove(&server.catalog, &m);
    }
    server.workers_started.call_once(|| {
        crate::engine::start(server);
        crate::schedule::start_scheduler(server);
    });
    Ok(())
}

/// Starts contending for the lease on its own connection `lease_catalog`: one attempt now
/// (a server that gets the lease is active when this returns), then a thread renewing or
/// retrying every [`RENEW_EVERY`].
pub(crate) fn start(server: &Arc<Server>, lease_catalog: Catalog) -> Result<()> {
    let mut holding = false;
    match renew(server, &lease_catalog) {
        Ok(true) => {
            tracing::info!("active: this server ({}) holds the lease", server.leader.me);
            if let Err(e) = activate(server) {
                step_down(server);
                return Err(e);
            }
            holding = true;
        }
        // Said at the default log level: a standby does nothing visible until it takes over.
        Ok(false) => tracing::warn!("{}", server.leader.standby_message(&server.catalog)),
        Err(e) => tracing::warn!("standby: cannot take the lease: {e}"),
    }
    let server = Arc::clone(server);
    std::thread::Builder::new()
        .name("leader-lease".into())
        .spawn(move || {
            loop {
                std::thread::sleep(RENEW_EVERY);
                holding = contend(&server, &lease_catalog, holding);
            }
        })
        .expect("spawn leader-lease");
    Ok(())
}

/// One renewal or takeover attempt; whether this process holds the lease (and is active)
/// afterwards. Logs every change of role.
fn contend(server: &Arc<Server>, lease_catalog: &Catalog, holding: bool) -> bool {
    let l = &server.leader;
    // A holder whose deadline passed before this renewal succeeded was inactive meanwhile:
    // its workers let queued jobs be, so it recovers again like a new holder.
    let was_active = l.is_active();
    match renew(server, lease_catalog) {
        Ok(true) if holding && was_active => true,
        Ok(true) => {
            if holding {
                tracing::warn!(
                    "active again: the lease was renewed only after this server's deadline \
                     (it started no job meanwhile); recovering jobs as at a start"
                );
            } else {
                tracing::warn!(
                    "active: this server ({}) holds the lease now; recovering jobs as at a start",
                    l.me
                );
            }
            match activate(server) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("cannot become active: {}; giving the lease up", e.chain());
                    l.set_until(None);
                    let _ = lease_catalog.release_lease(LEASE, &l.me);
                    false
                }
            }
        }
        Ok(false) => {
            if holding {
                server.engine.clear_queue();
                tracing::error!(
                    "no longer active: {}; starting no more jobs",
                    l.standby_message(&server.catalog)
                );
            }
            false
        }
        Err(e) if holding && !l.is_active() => {
            server.engine.clear_queue();
            tracing::error!(
                "no longer active: the lease could not be renewed for {} s ({e}); starting no \
                 more jobs, running ones stop at their next step",
                (LEASE_TTL - MARGIN).as_secs()
            );
            false
        }
        Err(e) => {
            if holding {
                tracing::warn!("lease renewal failed (active for now): {e}");
            }
            holding
        }
    }
}

/// Gives the lease up (a clean shutdown): a standby takes over at its next attempt instead
/// of waiting for the lease to lapse. Jobs still running here are recovered by it.
pub fn step_down(server: &Server) {
    let l = &server.leader;
    if !l.leased {
        return;
    }
    l.set_until(None);
    match server.catalog.release_lease(LEASE, &l.me) {
        Ok(true) => tracing::info!("gave the lease up"),
        Ok(false) => {}
        Err(e) => tracing::warn!("could not give the lease up: {e}"),
    }
}
