-- Sandpipe's `database.init` script for PostgreSQL.
--
-- The engine runs it at every start, with the admin connection of
-- `database.url`, after it has created its own schema (`sandpipe` by
-- default) and each `sql` plugin's role and schema, and before it checks
-- that the plugins are kept apart. So: write it idempotently, and grant to a
-- plugin through the owner of its schema (the plugin's role). Without its
-- own BEGIN/COMMIT the script is one transaction: if it fails, nothing of it
-- stays and the engine does not start.

-- Reference data the plugins may read but not change.
CREATE SCHEMA IF NOT EXISTS reference;
REVOKE ALL ON SCHEMA reference FROM PUBLIC;

CREATE TABLE IF NOT EXISTS reference.mime_type (
    mime TEXT PRIMARY KEY,
    label TEXT NOT NULL
);
INSERT INTO reference.mime_type (mime, label) VALUES
    ('image/png', 'PNG image'),
    ('image/jpeg', 'JPEG image'),
    ('image/gif', 'GIF image'),
    ('text/plain', 'plain text')
ON CONFLICT (mime) DO UPDATE SET label = excluded.label;

-- Read access for the plugins that exist in this deployment (a plugin's
-- schema is named after it, `-` becoming `_`, unless its grant says
-- `sql: { schema: NAME }`).
DO $$
DECLARE
    plugin_role regrole;
BEGIN
    FOR plugin_role IN
        SELECT nspowner::regrole FROM pg_namespace
        WHERE nspname IN ('image_meta', 'text_stats')
    LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA reference TO %s', plugin_role);
        EXECUTE format('GRANT SELECT ON reference.mime_type TO %s', plugin_role);
    END LOOP;
END
$$;

-- For operators: each message's latest message-level status. The engine
-- closes its schema to PUBLIC again after this script, so the view is
-- readable only by the admin role and whoever it grants.
CREATE OR REPLACE VIEW sandpipe.message_outcome AS
SELECT DISTINCT ON (message_id) message_id, attempt, status, info, at
FROM sandpipe.status
WHERE plugin = ''
ORDER BY message_id, id DESC;
