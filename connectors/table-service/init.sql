-- table-service's table. Name this file in the service's grant,
--   plugins.grants.table-service.sql: { init: <this file, relative to the config> }
-- and the engine runs it at every start, as the service's own role in its
-- own schema. Any table with a TEXT primary key `id` works: set
-- `config: { table: NAME }` in the grant.
CREATE TABLE IF NOT EXISTS orders (
    id       TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    total    BIGINT NOT NULL,
    status   TEXT NOT NULL
);
