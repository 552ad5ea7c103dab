-- Cairn backup catalog, version 3: leader leases.
--
-- Several servers may share one PostgreSQL catalog: the one holding the `server` lease is
-- active (runs jobs and schedules), the others wait on standby. A lease is taken or renewed
-- by one conditional upsert (succeeds only when the lease is free, expired, or already the
-- caller's) and lapses at `expires_ms` unless renewed. Times are the holders' clocks in
-- milliseconds since the Unix epoch; `since_ms` is when the current holder took it.

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    since_ms    BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
