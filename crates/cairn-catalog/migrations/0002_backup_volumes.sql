-- Cairn backup catalog, version 2: what the file catalog found on each backup's disks.
--
-- One row per indexed backup; `volumes` is the JSON list of cairn_api::server::IndexedVolume
-- (each volume parsed, or named with the reason it was not indexed). Read whole.

CREATE TABLE backup_volumes (
    backup_id   TEXT PRIMARY KEY,
    indexed_ms  BIGINT NOT NULL,
    volumes     TEXT NOT NULL
);
