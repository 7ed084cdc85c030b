-- Run by the engine at every start with the admin connection, after the
-- plugins' roles and schemas exist. Keep it idempotent.

-- A reporting role that may read what the plugins store, nothing else.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sandpipe_reader') THEN
    CREATE ROLE sandpipe_reader NOLOGIN;
  END IF;
END
$$;
GRANT USAGE ON SCHEMA image_meta, text_stats TO sandpipe_reader;
