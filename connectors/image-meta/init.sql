-- image-meta's table. Name this file in the plugin's grant,
--   plugins.grants.image-meta.sql: { init: <this file, relative to the config> }
-- and the engine runs it at every start, before any message, as the plugin
-- (its own SQLite file, or its own schema and role on PostgreSQL), in one
-- transaction. Idempotent; valid on SQLite and PostgreSQL (dimensions are
-- at most 2^31 - 1, so INTEGER; sizes past 2 GiB need BIGINT there).
CREATE TABLE IF NOT EXISTS image_meta (
    message_id TEXT PRIMARY KEY,
    location   TEXT,
    format     TEXT NOT NULL,
    width      INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    bytes      BIGINT NOT NULL
);
