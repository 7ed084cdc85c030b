-- text-stats's table. Name this file in the plugin's grant,
--   plugins.grants.text-stats.sql: { init: <this file, relative to the config> }
-- and the engine runs it at every start, before any message, as the plugin
-- (its own SQLite file, or its own schema and role on PostgreSQL), in one
-- transaction. Idempotent; valid on SQLite and PostgreSQL (BIGINT: counts
-- of objects past 2 GiB do not fit PostgreSQL's 32-bit INTEGER).
CREATE TABLE IF NOT EXISTS text_stats (
    message_id TEXT PRIMARY KEY,
    location   TEXT,
    lines      BIGINT NOT NULL,
    words      BIGINT NOT NULL,
    bytes      BIGINT NOT NULL
);
