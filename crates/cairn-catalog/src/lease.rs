//! Leader leases: which of several processes sharing one catalog is active.
//!
//! A lease is a row of `leases` (migration 3): a name (`server`), its holder and when it
//! lapses. [`Catalog::acquire_lease`] takes or renews it in one conditional upsert that
//! succeeds only when the lease is free, expired, or already the caller's, so two contenders
//! never both hold it (PostgreSQL locks the row for the upsert; SQLite has one writer).
//!
//! | who | does |
//! |---|---|
//! | a contender | calls [`Catalog::acquire_lease`] every renewal period; holds the lease while it returns `true` |
//! | the holder | renews well before `expires_ms`, and stops acting as the holder by its own deadline (the time it *sent* the last successful renewal plus the TTL) even when it cannot reach the database to learn more |
//! | a holder stopping cleanly | [`Catalog::release_lease`]: the next contender takes over at once |
//!
//! Times are the callers' clocks in milliseconds since the Unix epoch: processes sharing a
//! lease need clocks that agree to well within the TTL (NTP).

use crate::backend::args;
use crate::{Catalog, Result};

/// A lease as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// When the current holder took it.
    pub since_ms: i64,
    /// When it lapses unless renewed.
    pub expires_ms: i64,
}

impl Catalog {
    /// Takes lease `name` for `holder` until `now_ms + ttl_ms` if it is free, expired at
    /// `now_ms`, or already held by `holder` (a renewal). Returns whether `holder` holds it.
    pub fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool> {
        let n = self.db().execute(
            "INSERT INTO leases (name, holder, since_ms, expires_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                since_ms = CASE WHEN leases.holder = excluded.holder THEN leases.since_ms
                                ELSE excluded.since_ms END,
                expires_ms = excluded.expires_ms
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= excluded.since_ms",
            args![name, holder, now_ms, now_ms.saturating_add(ttl_ms)],
        )?;
        Ok(n == 1)
    }

    /// Lease `name` as stored (possibly expired), if it was ever taken.
    pub fn lease(&self, name: &str) -> Result<Option<Lease>> {
        self.db()
            .query_opt(
                "SELECT name, holder, since_ms, expires_ms FROM leases WHERE name = $1",
                args![name],
            )?
            .map(|r| {
                Ok(Lease {
                    name: r.text(0)?.into(),
                    holder: r.text(1)?.into(),
                    since_ms: r.int(2)?,
                    expires_ms: r.int(3)?,
                })
            })
            .transpose()
    }

    /// Gives up lease `name` if `holder` holds it. Returns whether it did.
    pub fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let n = self.db().execute(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            args![name, holder],
        )?;
        Ok(n == 1)
    }
}
