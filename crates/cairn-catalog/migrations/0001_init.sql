-- Cairn backup catalog, version 1.
--
-- Portable SQL: runs unchanged on SQLite (the embedded default) and PostgreSQL 15
-- (tests/postgres.rs applies it to a real server). Times are milliseconds since the Unix
-- epoch (BIGINT); structured values that are only read whole are JSON in TEXT columns.

CREATE TABLE vms (
    name        TEXT PRIMARY KEY,
    created_ms  BIGINT NOT NULL
);

-- Seed 001: configuration, execution state and host resource usage of one backup point,
-- kept in the metadata store (a directory apart from the vault). `timestamp_id` is the id
-- the storage snapshot (the backup) carries too.
CREATE TABLE metadata_snapshots (
    timestamp_id    TEXT PRIMARY KEY,
    vm              TEXT NOT NULL REFERENCES vms (name),
    created_ms      BIGINT NOT NULL,
    config_digest   TEXT NOT NULL,
    config_reused   INTEGER NOT NULL,
    state_file      TEXT,
    state_bytes     BIGINT,
    usage           TEXT NOT NULL
);

-- One backup point of one VM. Written in one transaction with its disks, and only once
-- every disk is committed in the vault: a row here is always restorable as a full.
CREATE TABLE backups (
    id                      TEXT PRIMARY KEY,
    vm                      TEXT NOT NULL REFERENCES vms (name),
    job_id                  TEXT NOT NULL,
    kind                    TEXT NOT NULL,
    group_id                TEXT,
    timestamp_id            TEXT NOT NULL REFERENCES metadata_snapshots (timestamp_id),
    created_ms              BIGINT NOT NULL,
    duration_ms             BIGINT NOT NULL,
    host                    TEXT NOT NULL,
    checkpoint              TEXT,
    snapshot_kind           TEXT NOT NULL,
    quiesce                 TEXT NOT NULL,
    quiesce_window_ms       BIGINT NOT NULL,
    vm_snapshot_lifetime_ms BIGINT NOT NULL,
    bytes_read              BIGINT NOT NULL,
    bytes_sent              BIGINT NOT NULL,
    attributes              TEXT NOT NULL
);
CREATE INDEX backups_by_vm ON backups (vm, created_ms);

CREATE TABLE backup_disks (
    backup_id       TEXT NOT NULL REFERENCES backups (id) ON DELETE CASCADE,
    disk            TEXT NOT NULL,
    vault_snapshot  TEXT NOT NULL,
    size            BIGINT NOT NULL,
    format          TEXT NOT NULL,
    storage_agent   TEXT NOT NULL,
    datastore       TEXT NOT NULL,
    datastore_disk  TEXT NOT NULL,
    change_source   TEXT NOT NULL,
    changed_bytes   BIGINT NOT NULL,
    bytes_read      BIGINT NOT NULL,
    bytes_sent      BIGINT NOT NULL,
    rdm             TEXT,
    PRIMARY KEY (backup_id, disk)
);

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL,
    params          TEXT NOT NULL,
    vms             TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    started_ms      BIGINT,
    finished_ms     BIGINT,
    error           TEXT,
    result          TEXT,
    -- Resources the job holds that a failed or orphaned job must release (JSON list).
    holds           TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, created_ms);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    at_ms       BIGINT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE schedules (
    name            TEXT PRIMARY KEY,
    vms             TEXT NOT NULL,
    group_backup    INTEGER NOT NULL,
    every_s         BIGINT NOT NULL,
    next_ms         BIGINT NOT NULL,
    enabled         INTEGER NOT NULL
);

-- Retention per VM; the row for vm '*' is the default.
CREATE TABLE retention (
    vm              TEXT PRIMARY KEY,
    keep_last       INTEGER,
    keep_daily      INTEGER,
    keep_weekly     INTEGER,
    keep_monthly    INTEGER
);
