//! PostgreSQL: the engine's schema (status log, plugin state) and, for each
//! plugin granted `sql`, a schema and a login role of its own.
//!
//! Isolation does not rest on parsing SQL but on PostgreSQL's privileges:
//!
//! - The engine's schema is closed to `PUBLIC`; only the admin role (the
//!   one in `database.url`) uses it.
//! - Each plugin has a role `sandpipe_<database>_<schema>`: LOGIN,
//!   NOSUPERUSER, NOCREATEDB, NOCREATEROLE, NOINHERIT, NOREPLICATION,
//!   NOBYPASSRLS, a member of no other role (memberships are revoked at
//!   every start), with a random password kept in the engine's schema and
//!   sent to the server only as a SCRAM verifier. It owns its schema, which
//!   is closed to `PUBLIC`. `PUBLIC` may not create in `public`.
//! - A plugin's statements run on connections that logged in *as* its role
//!   (one small pool per plugin), never on an admin session with
//!   `SET ROLE`, which `RESET ROLE` would undo. The plugin cannot become
//!   anyone else: `SET ROLE` needs a membership it does not have, and
//!   `SET SESSION AUTHORIZATION` needs a superuser login.
//! - Every invocation is one transaction, on a connection whose
//!   `search_path` is the plugin's schema and `statement_timeout` the
//!   plugin's timeout: the role's defaults, set at every start (a
//!   connection the plugin changed with `SET` is reset to them before it
//!   is reused; an invocation with another timeout, `sandpipe exec`'s, sets
//!   it locally). Because the
//!   plugin may change `statement_timeout` itself, the host also holds the
//!   deadline: past it, the statement is cancelled through the protocol's
//!   cancel request and the connection is closed, not reused.
//! - Transaction control (`BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, ...)
//!   is refused with `access-denied`; inside the engine's transaction block
//!   PostgreSQL itself refuses a `COMMIT` from `DO` or a procedure.
//! - Query results are read through a portal that fetches at most
//!   `limits.sql_rows + 1` rows, so an oversized result stops at the server.
//! - A plugin's statements are prepared once per connection and kept
//!   (at most [`CACHED_STATEMENTS`]; dropped after DDL or a failure).
//! - A plugin connection goes back to its pool as it is when its session
//!   holds nothing beyond the ended transaction; else it is cleaned first
//!   as by `DISCARD ALL` (settings, the plugin's prepared statements,
//!   cursors, temporary tables, advisory locks, `LISTEN`s all gone). What
//!   needs cleaning is known from the statements ([`touches_session`]) and
//!   from one cached query at the end of the transaction
//!   ([`LEFTOVERS_COLUMNS`], which also
//!   releases session advisory locks). One whose transaction did not end
//!   cleanly is closed instead.
//! - A plugin's DDL runs in a savepoint and, when it races another
//!   transaction's DDL in the catalog, again under its schema's advisory
//!   lock ([`is_ddl`]), so concurrent `CREATE TABLE IF NOT EXISTS` never
//!   fail; its `sql.init` script runs under the same lock at start.
//!
//! A failed statement aborts the invocation's transaction, as PostgreSQL
//! does: later statements of the same invocation fail, and its commit is
//! refused (PostgreSQL would roll back silently), so the plugin fails and is
//! retried. Use `ON CONFLICT` rather than catching a unique violation.
//!
//! The host's deadline runs from the invocation's first statement (when its
//! transaction begins) for the plugin's `timeout`, as SQLite's does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut as _, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures::TryStreamExt as _;
use sha2::Digest as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::CancelToken;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};

use super::{Outcome, ResultLimit, Work};
use super::{Rows, Value};
use crate::capability::StateOp;
use crate::config::{Config, DatabaseConfig};
use crate::error::HostError;
use crate::tls::Tls;
use crate::tls::postgres::PgTls;

/// Serialises the start-up of engines sharing one database.
const SETUP_LOCK: i64 = 0x5341_4e44_5049_5045; // "SANDPIPE"

/// Microseconds from 1970-01-01 (WIT timestamps) to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// The login role and schema of one plugin.
#[derive(Clone)]
struct PluginRole {
    role: String,
    password: String,
    schema: String,
    /// The role's default `statement_timeout`: the plugin's configured
    /// `timeout` (set with its `search_path` at start, see `harden`).
    timeout: Duration,
}

/// What the server allows, read at start to size the pools.
#[derive(Debug, Clone, Copy)]
pub struct PoolSizing {
    /// `max_connections`.
    pub max_connections: usize,
    /// `superuser_reserved_connections`.
    pub reserved: usize,
    /// Client connections open now (every client's, this start-up's too).
    pub in_use: usize,
}

impl PoolSizing {
    /// Connections the server has free now.
    pub fn free(&self) -> usize {
        self.max_connections
            .saturating_sub(self.reserved)
            .saturating_sub(self.in_use)
    }

    /// Connections per plugin pool, and a warning when the configured
    /// sizes can exceed what the server has free. Unset, a plugin pool is
    /// `pipeline.concurrency` connections, but no more than its share of
    /// half the free connections after the admin pool (the other half is
    /// left for other replicas and clients), and at least 1.
    pub fn plugin_pool(
        &self,
        admin: usize,
        plugins: usize,
        concurrency: usize,
        configured: Option<usize>,
    ) -> (usize, Option<String>) {
        let free = self.free();
        let size = configured.unwrap_or_else(|| {
            let share = (free / 2).saturating_sub(admin) / plugins.max(1);
            concurrency.min(share).max(1)
        });
        let wanted = admin + plugins * size;
        let warning = (wanted > free).then(|| {
            format!(
                "the pools may open {wanted} connections (database.pool_size {admin} + {plugins} plugin(s) × plugin_pool_size {size}), \
                 more than the {free} the server has free (max_connections {} − {} reserved − {} in use): \
                 invocations will wait for a connection when it refuses more",
                self.max_connections, self.reserved, self.in_use
            )
        });
        (size, warning)
    }
}

/// The engine's PostgreSQL database: an admin pool, the engine's schema and
/// the plugins' roles.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    config: Arc<tokio_postgres::Config>,
    /// The TLS connector of the URL's `sslmode`, for every connection
    /// (plugin roles' and cancel requests' too).
    tls: PgTls,
    schema: String,
    target: String,
    database: String,
    roles: Arc<BTreeMap<String, PluginRole>>,
    plugin_pool_size: usize,
    /// The key of the status rows' MACs; set once the database is
    /// prepared.
    status_key: Arc<std::sync::OnceLock<StatusKey>>,
}

/// The key of the status rows' MACs, made by the first engine on the
/// database and kept in `<schema>.status_key`, which only the engine's
/// role can read.
///
/// A lone plugin's status rows are written inside its own transaction, as
/// its role (one commit for the effects and the rows), so every plugin
/// role may `INSERT` into the status table (only that: no `SELECT`,
/// `UPDATE`, `DELETE`, and not the `id` or `at` columns). Every row carries
/// the MAC of its fields (`status::row_mac`, the engine's rows too; legacy
/// rows from before the column are the only ones allowed without one), and
/// the engine reads back only rows whose MAC it can verify: a row a plugin
/// wrote itself is counted and ignored. The key and the MACs never pass
/// through the guest (they travel as parameters of the engine's own
/// statement, which `pg_stat_activity` does not show).
/// MAC = sha256(key ‖ sha256(key ‖ data)).
pub struct StatusKey([u8; 32]);

impl StatusKey {
    /// A key of these bytes.
    pub fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The MAC of `data`.
    pub fn mac(&self, data: &[u8]) -> Vec<u8> {
        let inner = sha2::Sha256::new()
            .chain_update(self.0)
            .chain_update(data)
            .finalize();
        sha2::Sha256::new()
            .chain_update(self.0)
            .chain_update(inner)
            .finalize()
            .to_vec()
    }
}

/// The status table's columns that rows are written with (the rest, `id`
/// and `at`, are the table's own), in the order of the engine's `INSERT`s;
/// also the columns plugin roles may insert.
pub const STATUS_COLUMNS: &str = "message_id, plugin, plugin_version, component_sha256, \
     attempt, status, info, duration_ms, fuel_used, mac";

/// A statement of the engine's run in a plugin's transaction just before
/// its commit, in the same statement as the session check: `with` is a
/// data-modifying `WITH` clause (`WITH w AS (INSERT …)`), `types` and
/// `params` its parameters.
pub struct EngineCall {
    /// The `WITH` clause.
    pub with: String,
    /// The parameters' types, in order.
    pub types: &'static [Type],
    /// The parameters.
    pub params: Vec<Box<dyn ToSql + Send + Sync>>,
}

/// `"name"`, with inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with inner quotes doubled.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The role of the plugin whose schema is `schema` in `database`:
/// `sandpipe_<database>_<schema>`, at most 63 bytes; a hash keeps it unique
/// when the database's name had to be shortened or changed.
pub fn role_name(database: &str, schema: &str) -> String {
    let clean = crate::config::identifier_chars(database);
    let base = format!("{clean}_{schema}");
    if clean == database && base.len() <= 54 {
        return format!("sandpipe_{base}");
    }
    let hash = hex::encode(sha2::Sha256::digest(format!("{database}\0{schema}")));
    let cut = base.len().min(45);
    format!("sandpipe_{}_{}", &base[..cut], &hash[..8])
}

/// An error's text with its causes; PostgreSQL's own errors with their
/// SQLSTATE, detail and hint.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str("; ");
            text.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            text.push_str("; hint: ");
            text.push_str(hint);
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `PostgreSQL at host:port/database as user`, without the password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    format!("PostgreSQL at {}", location(config))
}

/// Why connecting to `target` failed: a TLS failure explained (see
/// [`crate::tls::Tls::explain`]), else PostgreSQL's error.
fn connect_error(
    tls: &PgTls,
    config: &tokio_postgres::Config,
    e: &tokio_postgres::Error,
) -> anyhow::Error {
    match tls.explain(&location(config), e) {
        Some(text) => anyhow::anyhow!("{text}"),
        None => anyhow::anyhow!(
            "cannot connect to {}: {}",
            describe_target(config),
            describe(e)
        ),
    }
}

/// `host:port/database as user`, without the password.
fn location(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{} as {}",
        config.get_dbname().or(config.get_user()).unwrap_or("?"),
        config.get_user().unwrap_or("?")
    )
}

/// A pool of connections made with `config` (checked only for being
/// closed when taken; plugin connections are cleaned when given back).
fn pool(config: tokio_postgres::Config, tls: PgTls, size: usize) -> anyhow::Result<Pool> {
    pool_recycled(config, tls, size, RecyclingMethod::Fast)
}

/// [`pool`] with connections recycled by `recycling`.
fn pool_recycled(
    config: tokio_postgres::Config,
    tls: PgTls,
    size: usize,
    recycling: RecyclingMethod,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: recycling,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .build()
        .context("cannot build a PostgreSQL connection pool")
}

/// Connect once, outside any pool (start-up work).
async fn connect_once(
    config: &tokio_postgres::Config,
    tls: &PgTls,
) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect(tls.clone())
        .await
        .map_err(|e| connect_error(tls, config, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("PostgreSQL start-up connection ended: {e}");
        }
    });
    Ok(client)
}

/// The 1-based line of character `position` (1-based) in `text`.
fn line_of(text: &str, position: u32) -> usize {
    text.chars()
        .take(position.saturating_sub(1) as usize)
        .filter(|&c| c == '\n')
        .count()
        + 1
}

impl Postgres {
    /// A pool on `url` for the engine's `schema`, without preparing
    /// anything; TLS as the URL's `sslmode` says, trusting what `tls` does.
    pub fn connect(url: &str, schema: &str, pool_size: usize, tls: &Tls) -> anyhow::Result<Self> {
        let (mut config, ssl_mode) = crate::config::postgres_url(url)
            .map_err(|e| anyhow::anyhow!("database.url is not a PostgreSQL URL: {e}"))?;
        let tls = tls.postgres(ssl_mode)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("sandpipe");
        }
        let target = describe_target(&config);
        let database = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            pool: pool(config.clone(), tls.clone(), pool_size)?,
            config: Arc::new(config),
            tls,
            schema: schema.to_owned(),
            target,
            database,
            roles: Arc::new(BTreeMap::new()),
            plugin_pool_size: 1,
            status_key: Arc::default(),
        })
    }

    /// Connect and prepare the database of `config`: the engine's schema
    /// and tables, each `sql` plugin's role and schema, the `init` script
    /// (between the two, so it can grant to the plugins' roles), then the
    /// checks that keep the plugins apart.
    pub async fn open(config: &Config, tls: &Tls) -> anyhow::Result<Self> {
        let DatabaseConfig::Postgres {
            url,
            init,
            schema,
            pool_size,
            plugin_pool_size,
        } = &config.database
        else {
            anyhow::bail!("the database is not PostgreSQL");
        };
        let mut pg = Self::connect(url, schema, *pool_size, tls)?;
        let setup = connect_once(&pg.config, &pg.tls).await?;
        setup
            .execute("SELECT pg_advisory_lock($1)", &[&SETUP_LOCK])
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", pg.target, describe(&e)))?;
        let row = setup
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", pg.target, describe(&e)))?;
        pg.database = row.get(0);
        let mut wanted = BTreeMap::new();
        for (name, grant) in &config.plugins.grants {
            if let Some(sql) = &grant.sql {
                let schema = sql.schema_for(name);
                let timeout = config.limits_for(name).timeout;
                wanted.insert(
                    name.clone(),
                    (role_name(&pg.database, &schema), schema, timeout),
                );
            }
        }
        let server: (i32, i32, i64) = {
            let row = setup
                .query_one(
                    "SELECT current_setting('max_connections')::int, \
                            current_setting('superuser_reserved_connections')::int, \
                            (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
                    &[],
                )
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", pg.target, describe(&e)))?;
            (row.get(0), row.get(1), row.get(2))
        };
        let sizing = PoolSizing {
            max_connections: usize::try_from(server.0).unwrap_or_default(),
            reserved: usize::try_from(server.1).unwrap_or_default(),
            in_use: usize::try_from(server.2).unwrap_or_default(),
        };
        let (size, warning) = sizing.plugin_pool(
            *pool_size,
            wanted.len(),
            config.pipeline.concurrency,
            *plugin_pool_size,
        );
        if let Some(warning) = warning {
            tracing::warn!(target = %pg.target, "{warning}");
        }
        pg.plugin_pool_size = size;
        let roles = pg
            .prepare(&setup, &wanted)
            .await
            .with_context(|| format!("cannot prepare {}", pg.target))?;
        let key = pg
            .prepare_status_key(&setup)
            .await
            .with_context(|| format!("cannot prepare {}", pg.target))?;
        let _ = pg.status_key.set(key);
        if let Some(script) = init {
            pg.run_init(script).await?;
        }
        pg.harden(&setup, &roles)
            .await
            .with_context(|| format!("cannot secure {}", pg.target))?;
        pg.roles = Arc::new(roles);
        // Dropping the start-up connection releases the lock.
        drop(setup);
        tracing::info!(
            target = %pg.target,
            schema = %pg.schema,
            pool_size = *pool_size,
            plugin_pool_size = pg.plugin_pool_size,
            plugins = %crate::config::list_or_none(pg.roles.iter().map(|(p, r)| format!("{p} (role {}, schema {})", r.role, r.schema))),
            "PostgreSQL ready"
        );
        Ok(pg)
    }

    /// `"schema"."table"` in the engine's schema.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// A connection of its own, outside the pool, closed when dropped: for
    /// a session-level lock that must end with its holder (a sync job's
    /// advisory lock).
    pub async fn dedicated(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect_once(&self.config, &self.tls).await
    }

    /// Where the pool connects (`user@host:port/database`), for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// An admin connection from the pool.
    pub async fn client(&self) -> anyhow::Result<Object> {
        self.pool.get().await.map_err(|e| match &e {
            deadpool_postgres::PoolError::Backend(pg) => connect_error(&self.tls, &self.config, pg),
            _ => anyhow::anyhow!("cannot connect to {}: {e}", self.target),
        })
    }

    /// Create what is missing: the engine's schema and tables, and each
    /// plugin's role and schema. Returns the roles with their passwords.
    async fn prepare(
        &self,
        client: &tokio_postgres::Client,
        wanted: &BTreeMap<String, (String, String, Duration)>,
    ) -> anyhow::Result<BTreeMap<String, PluginRole>> {
        let s = quote_ident(&self.schema);
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {status} (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 message_id TEXT NOT NULL,
                 plugin TEXT NOT NULL,
                 plugin_version TEXT NOT NULL,
                 component_sha256 TEXT NOT NULL,
                 attempt INTEGER NOT NULL,
                 status TEXT NOT NULL,
                 info TEXT NOT NULL,
                 duration_ms DOUBLE PRECISION,
                 fuel_used BIGINT,
                 at TIMESTAMPTZ NOT NULL DEFAULT now()
             );
             CREATE INDEX IF NOT EXISTS status_message ON {status} (message_id, plugin);
             CREATE TABLE IF NOT EXISTS {state} (
                 plugin TEXT NOT NULL,
                 key TEXT NOT NULL,
                 value BYTEA NOT NULL,
                 PRIMARY KEY (plugin, key)
             );
             CREATE TABLE IF NOT EXISTS {roles} (
                 role TEXT PRIMARY KEY,
                 password TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS {key} (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 key BYTEA NOT NULL
             );",
            status = self.table("status"),
            state = self.table("plugin_state"),
            roles = self.table("plugin_role"),
            key = self.table("status_key"),
        );
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| anyhow::anyhow!("creating the engine's schema {s}: {}", describe(&e)))?;
        let superuser: bool = client
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?
            .get(0);
        let mut out = BTreeMap::new();
        for (plugin, (role, schema, timeout)) in wanted {
            let fail = |what: &str, e: tokio_postgres::Error| {
                anyhow::anyhow!(
                    "plugin `{plugin}`: {what} (role {role}, schema {schema}): {}",
                    describe(&e)
                )
            };
            let fresh = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            let row = client
                .query_one(
                    &format!(
                        "INSERT INTO {} (role, password) VALUES ($1, $2)
                         ON CONFLICT (role) DO UPDATE SET role = excluded.role
                         RETURNING password",
                        self.table("plugin_role")
                    ),
                    &[role, &fresh],
                )
                .await
                .map_err(|e| fail("storing its password", e))?;
            let password: String = row.get(0);
            let exists = client
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
                .await
                .map_err(|e| fail("looking up its role", e))?
                .is_some();
            let r = quote_ident(role);
            let q = quote_ident(schema);
            if !exists {
                client
                    .batch_execute(&format!("CREATE ROLE {r} NOLOGIN"))
                    .await
                    .map_err(|e| fail("creating its role", e))?;
            }
            if !superuser {
                // A non-superuser admin gives the schema to the role only as
                // a member of it (the plugin role is a member of nothing).
                let member: bool = client
                    .query_one("SELECT pg_has_role(current_user, $1, 'MEMBER')", &[role])
                    .await
                    .map_err(|e| fail("looking up its role", e))?
                    .get(0);
                if !member {
                    client
                        .batch_execute(&format!("GRANT {r} TO CURRENT_USER"))
                        .await
                        .map_err(|e| fail("joining its role", e))?;
                }
            }
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {q} AUTHORIZATION {r};
                     ALTER SCHEMA {q} OWNER TO {r};
                     REVOKE ALL ON SCHEMA {q} FROM PUBLIC;"
                ))
                .await
                .map_err(|e| fail("creating its schema", e))?;
            out.insert(
                plugin.clone(),
                PluginRole {
                    role: role.clone(),
                    password,
                    schema: schema.clone(),
                    timeout: *timeout,
                },
            );
        }
        Ok(out)
    }

    /// The status key (made by the first engine on this database; see
    /// [`StatusKey`]), and the status table's `mac` column. Rows without
    /// one are refused from now on; rows older than the column keep none.
    /// The function through which earlier versions wrote a plugin's rows
    /// goes.
    async fn prepare_status_key(
        &self,
        client: &tokio_postgres::Client,
    ) -> anyhow::Result<StatusKey> {
        let fail =
            |what: &str, e: tokio_postgres::Error| anyhow::anyhow!("{what}: {}", describe(&e));
        let mut fresh = [0u8; 32];
        fresh[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        fresh[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO {} (id, key) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET id = excluded.id
                     RETURNING key",
                    self.table("status_key")
                ),
                &[&fresh.as_slice()],
            )
            .await
            .map_err(|e| fail("storing the status key", e))?;
        let stored: Vec<u8> = row.get(0);
        let key: [u8; 32] = stored.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} holds a key of {} bytes, not 32",
                self.table("status_key"),
                stored.len()
            )
        })?;
        let status = self.table("status");
        let old = quote_ident(&format!("{}_status", self.schema));
        client
            .batch_execute(&format!(
                "ALTER TABLE {status} ADD COLUMN IF NOT EXISTS mac BYTEA;
                 DO $sandpipe$ BEGIN
                     IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                                    WHERE conrelid = {rel}::regclass AND conname = 'status_signed') THEN
                         ALTER TABLE {status} ADD CONSTRAINT status_signed CHECK (mac IS NOT NULL) NOT VALID;
                     END IF;
                 END $sandpipe$;
                 DROP FUNCTION IF EXISTS {old}.write_status(text, bytea);
                 DROP SCHEMA IF EXISTS {old};",
                rel = quote_literal(&status),
            ))
            .await
            .map_err(|e| fail(&format!("adding the mac column to {status}"), e))?;
        Ok(StatusKey::new(key))
    }

    /// The key of the status rows' MACs (`None` before the database is
    /// prepared).
    pub fn status_key(&self) -> Option<&StatusKey> {
        self.status_key.get()
    }

    /// The key of the status rows' MACs, read from the database when this
    /// handle did not prepare it (a reader's); `None` when no engine ever
    /// made one there.
    pub async fn load_status_key(&self) -> anyhow::Result<Option<&StatusKey>> {
        if self.status_key.get().is_none() {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT key FROM {} WHERE id = 1", self.table("status_key")),
                    &[],
                )
                .await
                .map_err(|e| anyhow::anyhow!("reading the status key: {}", describe(&e)))?;
            if let Some(row) = row {
                let stored: Vec<u8> = row.get(0);
                if let Ok(key) = <[u8; 32]>::try_from(stored.as_slice()) {
                    let _ = self.status_key.set(StatusKey::new(key));
                }
            }
        }
        Ok(self.status_key.get())
    }

    /// Run the init script on a connection of its own. PostgreSQL runs a
    /// script without its own `BEGIN`/`COMMIT` as one transaction, so a
    /// failing script leaves nothing behind.
    async fn run_init(&self, script: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(script).map_err(|e| {
            anyhow::anyhow!(
                "database.init: cannot read the init script {}: {e}",
                script.display()
            )
        })?;
        let client = connect_once(&self.config, &self.tls).await?;
        if let Err(e) = client.batch_execute(&text).await {
            let at = e
                .as_db_error()
                .and_then(|db| match db.position() {
                    Some(tokio_postgres::error::ErrorPosition::Original(p)) => {
                        Some(format!(" at line {}", line_of(&text, *p)))
                    }
                    _ => None,
                })
                .unwrap_or_default();
            anyhow::bail!(
                "database.init: the init script {} failed{at}: {}",
                script.display(),
                describe(&e)
            );
        }
        tracing::info!(script = %script.display(), "ran the init script");
        Ok(())
    }

    /// After the init script: close the engine's schema, give each plugin
    /// role exactly its attributes and password and no memberships, and make
    /// sure `PUBLIC` cannot create in `public`.
    async fn harden(
        &self,
        client: &tokio_postgres::Client,
        roles: &BTreeMap<String, PluginRole>,
    ) -> anyhow::Result<()> {
        let s = quote_ident(&self.schema);
        client
            .batch_execute(&format!(
                "REVOKE ALL ON SCHEMA {s} FROM PUBLIC;
                 REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC;
                 REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM PUBLIC;"
            ))
            .await
            .map_err(|e| anyhow::anyhow!("closing the engine's schema {s}: {}", describe(&e)))?;
        let status = self.table("status");
        for (plugin, r) in roles {
            let role = quote_ident(&r.role);
            let fail = |e: tokio_postgres::Error| {
                anyhow::anyhow!(
                    "plugin `{plugin}`: setting up role {}: {}",
                    r.role,
                    describe(&e)
                )
            };
            // The one thing of the engine's a plugin may use: inserting
            // status rows (its own, written by the engine in its
            // transaction; any other is ignored, see [`StatusKey`]). And the
            // role's defaults, so an invocation needs no `SET LOCAL`s:
            // `search_path` its schema, `statement_timeout` its timeout.
            client
                .batch_execute(&format!(
                    "GRANT USAGE ON SCHEMA {s} TO {role};
                     GRANT INSERT ({STATUS_COLUMNS}) ON {status} TO {role};
                     ALTER ROLE {role} SET search_path = {};
                     ALTER ROLE {role} SET statement_timeout = {};",
                    quote_ident(&r.schema),
                    r.timeout.as_millis().max(1)
                ))
                .await
                .map_err(fail)?;
            // Only the attributes that are wrong are named, so an admin that
            // is not a superuser can do it as long as nothing needs one.
            let now = client
                .query_one(
                    "SELECT rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication,
                            rolbypassrls, rolcanlogin, rolconnlimit = -1
                     FROM pg_roles WHERE rolname = $1",
                    &[&r.role],
                )
                .await
                .map_err(fail)?;
            let wrong = [
                (now.get::<_, bool>(0), "NOSUPERUSER"),
                (now.get(1), "NOCREATEDB"),
                (now.get(2), "NOCREATEROLE"),
                (now.get(3), "NOINHERIT"),
                (now.get(4), "NOREPLICATION"),
                (now.get(5), "NOBYPASSRLS"),
                (!now.get::<_, bool>(6), "LOGIN"),
                (!now.get::<_, bool>(7), "CONNECTION LIMIT -1"),
            ];
            let fix: Vec<&str> = wrong
                .iter()
                .filter(|(is_wrong, _)| *is_wrong)
                .map(|(_, attribute)| *attribute)
                .collect();
            let verifier = postgres_protocol::password::scram_sha_256(r.password.as_bytes());
            client
                .batch_execute(&format!(
                    "ALTER ROLE {role} WITH {} PASSWORD {}",
                    fix.join(" "),
                    quote_literal(&verifier)
                ))
                .await
                .map_err(fail)?;
            let granted = client
                .query(
                    "SELECT g.rolname FROM pg_auth_members m
                     JOIN pg_roles g ON g.oid = m.roleid
                     JOIN pg_roles u ON u.oid = m.member
                     WHERE u.rolname = $1",
                    &[&r.role],
                )
                .await
                .map_err(|e| anyhow::anyhow!("plugin `{plugin}`: {}", describe(&e)))?;
            for row in granted {
                let other: String = row.get(0);
                tracing::warn!(
                    plugin = %plugin,
                    "role {} was a member of role {other}; revoking it (a plugin's role is a member of no role)",
                    r.role
                );
                client
                    .batch_execute(&format!("REVOKE {} FROM {role}", quote_ident(&other)))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "plugin `{plugin}`: cannot revoke role {other} from {}: {}",
                            r.role,
                            describe(&e)
                        )
                    })?;
            }
        }
        let public_create = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public')
                        AND has_schema_privilege('public', 'public', 'CREATE')",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?
            .get::<_, bool>(0);
        if public_create {
            client
                .batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "every role may create objects in schema public, where a plugin could plant functions for others to call; \
                         Sandpipe's attempt to revoke that failed: {}",
                        describe(&e)
                    )
                })?;
            tracing::warn!("revoked CREATE on schema public from PUBLIC");
        }
        Ok(())
    }

    /// The own database of `plugin`, whose statements run `timeout` at most.
    pub fn plugin_db(&self, plugin: &str, timeout: Duration) -> anyhow::Result<PluginDb> {
        let Some(r) = self.roles.get(plugin) else {
            anyhow::bail!(
                "plugin `{plugin}` has no PostgreSQL role: the database was opened without its `sql` grant"
            );
        };
        let mut config = (*self.config).clone();
        config
            .user(r.role.clone())
            .password(r.password.clone())
            .dbname(self.database.clone())
            .options("")
            .application_name(format!("sandpipe plugin {plugin}"));
        Ok(PluginDb {
            plugin: plugin.to_owned(),
            role: r.role.clone(),
            schema: r.schema.clone(),
            timeout,
            role_timeout: r.timeout,
            pool: pool(config, self.tls.clone(), self.plugin_pool_size)?,
            tls: self.tls.clone(),
            ddl_lock: ddl_lock_key(&r.role),
        })
    }

    /// The role and schema of `plugin`, if it was granted `sql`.
    pub fn plugin_role(&self, plugin: &str) -> Option<(&str, &str)> {
        self.roles
            .get(plugin)
            .map(|r| (r.role.as_str(), r.schema.as_str()))
    }

    /// The state value of `key` for `plugin`.
    pub async fn state_get(&self, plugin: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let fail = |e: tokio_postgres::Error| {
            anyhow::anyhow!("reading plugin `{plugin}`'s state: {}", describe(&e))
        };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT value FROM {} WHERE plugin = $1 AND key = $2",
                self.table("plugin_state")
            ))
            .await
            .map_err(fail)?;
        let row = client
            .query_opt(&stmt, &[&plugin, &key])
            .await
            .map_err(fail)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Apply state changes for `plugin` in one transaction.
    pub async fn state_apply(&self, plugin: &str, ops: Vec<StateOp>) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let fail = |e: tokio_postgres::Error| {
            anyhow::anyhow!("writing plugin `{plugin}`'s state: {}", describe(&e))
        };
        let tx = client.transaction().await.map_err(fail)?;
        let set = tx
            .prepare_cached(&format!(
                "INSERT INTO {} (plugin, key, value) VALUES ($1, $2, $3)
                 ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
                self.table("plugin_state")
            ))
            .await
            .map_err(fail)?;
        let delete = tx
            .prepare_cached(&format!(
                "DELETE FROM {} WHERE plugin = $1 AND key = $2",
                self.table("plugin_state")
            ))
            .await
            .map_err(fail)?;
        for op in &ops {
            match op {
                StateOp::Set(k, v) => tx.execute(&set, &[&plugin, k, v]).await,
                StateOp::Delete(k) => tx.execute(&delete, &[&plugin, k]).await,
            }
            .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }
}

/// A plugin's schema and role, with a small pool of connections logged in
/// as that role.
pub struct PluginDb {
    plugin: String,
    role: String,
    schema: String,
    timeout: Duration,
    /// The role's default `statement_timeout`; an invocation with another
    /// timeout (`sandpipe exec`'s) sets its own locally.
    role_timeout: Duration,
    pool: Pool,
    /// For cancel requests and messages.
    tls: PgTls,
    /// The transaction-level advisory lock that serializes the schema's
    /// DDL (see [`ddl_lock_key`]).
    ddl_lock: i64,
}

/// What an invocation's connection task is asked to do.
enum Command {
    Run {
        statement: String,
        work: Work,
        limit: ResultLimit,
        reply: oneshot::Sender<Result<Outcome, Failed>>,
    },
    Finish {
        commit: bool,
        discard: bool,
        /// Run in the transaction just before its commit.
        before: Option<EngineCall>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A statement's failure, and whether PostgreSQL aborted the transaction
/// for it (any error the server reports does).
#[derive(Debug)]
struct Failed {
    error: HostError,
    aborted: bool,
    /// DDL that met another transaction's DDL in the catalog.
    race: bool,
}

impl Failed {
    fn server(err: tokio_postgres::Error) -> Self {
        Self {
            error: pg_error(&err),
            aborted: true,
            race: catalog_race(&err),
        }
    }

    fn local(error: HostError) -> Self {
        Self {
            error,
            aborted: false,
            race: false,
        }
    }

    /// The connection is gone (a `Transaction` could not be taken on it).
    fn lost() -> Self {
        Self::local(HostError::Unavailable(
            "the connection to PostgreSQL was lost".into(),
        ))
    }
}

/// An invocation's open transaction. Its connection lives in a task of its
/// own (which owns the `tokio_postgres` transaction); this handle sends it
/// statements and holds the deadline.
pub struct PluginTx {
    plugin: String,
    commands: mpsc::Sender<Command>,
    cancel: CancelToken,
    /// The cancel request goes over the same TLS as the connection.
    tls: PgTls,
    deadline: Instant,
    timeout: Duration,
    /// Why the transaction can no longer be used (its statement was
    /// cancelled at the deadline, or the connection was lost).
    broken: Option<String>,
    /// The first statement PostgreSQL refused: the transaction is aborted
    /// and cannot be committed.
    aborted: Option<String>,
    finished: bool,
}

impl PluginDb {
    /// The plugin's role.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The plugin's schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Open a connection as the plugin's role for the invocation's
    /// transaction, which begins with its first statement (or with the
    /// engine's status rows when it has none): `search_path` is the
    /// plugin's schema, `statement_timeout` the plugin's timeout (both the
    /// role's defaults), which is also the host's deadline from now.
    pub async fn begin(&self) -> Result<PluginTx, HostError> {
        let deadline = Instant::now() + self.timeout;
        let client = self.connection(deadline).await?;
        let cancel = client.cancel_token();
        let setup = Setup {
            settings: (self.timeout != self.role_timeout).then(|| {
                format!(
                    "SET LOCAL statement_timeout = {}",
                    self.timeout.as_millis().max(1)
                )
            }),
            ddl_lock: self.ddl_lock,
        };
        let (commands, inbox) = mpsc::channel(1);
        tokio::spawn(connection_task(client, setup, inbox));
        Ok(PluginTx {
            plugin: self.plugin.clone(),
            commands,
            cancel,
            tls: self.tls.clone(),
            deadline,
            timeout: self.timeout,
            broken: None,
            aborted: None,
            finished: false,
        })
    }
}

impl PluginDb {
    /// A connection from the plugin's pool, waiting (until `deadline`) for
    /// one to come free when the pool is full — or when the server refuses
    /// more connections ("too many clients"): then the pool shrinks to what
    /// it has, so later invocations queue for those instead of failing.
    /// Time spent waiting is in `sandpipe_db_pool_wait_seconds`.
    async fn connection(&self, deadline: Instant) -> Result<Object, HostError> {
        let asked = Instant::now();
        let mut pause = Duration::from_millis(5);
        let waiting =
            metrics::gauge!(crate::metrics::DB_POOL_WAITING, "plugin" => self.plugin.clone());
        waiting.increment(1.0);
        let got = loop {
            match tokio::time::timeout_at(deadline, self.pool.get()).await {
                Ok(Ok(client)) => break Ok(client),
                Ok(Err(deadpool_postgres::PoolError::Backend(e)))
                    if e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS) =>
                {
                    let status = self.pool.status();
                    if status.size > 0 && status.size < status.max_size {
                        tracing::warn!(
                            plugin = %self.plugin,
                            "PostgreSQL refuses more connections: plugin `{}`'s pool shrinks from {} to the {} it has, and invocations wait for those",
                            self.plugin,
                            status.max_size,
                            status.size
                        );
                        self.pool.resize(status.size);
                    }
                    metrics::counter!(crate::metrics::DB_REFUSED, "plugin" => self.plugin.clone())
                        .increment(1);
                    if Instant::now() + pause >= deadline {
                        break Err(HostError::Unavailable(format!(
                            "plugin `{}`: PostgreSQL refused more connections and none came free within the plugin's timeout of {:?}: {}",
                            self.plugin,
                            self.timeout,
                            describe(&e)
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Ok(Err(e)) => {
                    let explained = match &e {
                        deadpool_postgres::PoolError::Backend(pg) => {
                            self.tls.explain(&format!("role {}", self.role), pg)
                        }
                        _ => None,
                    };
                    break Err(HostError::Unavailable(format!(
                        "plugin `{}` cannot connect to PostgreSQL as role {}: {}",
                        self.plugin,
                        self.role,
                        explained.unwrap_or_else(|| e.to_string())
                    )));
                }
                Err(_) => {
                    break Err(HostError::Unavailable(format!(
                        "no connection for plugin `{}` came free within its timeout of {:?} (database.plugin_pool_size)",
                        self.plugin, self.timeout
                    )));
                }
            }
        };
        waiting.decrement(1.0);
        metrics::histogram!(crate::metrics::DB_POOL_WAIT_SECONDS, "plugin" => self.plugin.clone())
            .record(asked.elapsed().as_secs_f64());
        got
    }
}

/// What an invocation's transaction starts with.
struct Setup {
    /// `SET LOCAL statement_timeout` when the invocation's timeout is not
    /// the role's default: sent with its first statement, in the same
    /// round trip.
    settings: Option<String>,
    /// The advisory lock key taken before the transaction's first DDL.
    ddl_lock: i64,
}

/// How an invocation's connection ended.
struct Served {
    /// The transaction ended cleanly: the connection may be reused.
    reusable: bool,
    /// The plugin ran DDL, or a statement failed: the connection's cached
    /// statements may no longer match the schema, so they are dropped.
    forget_statements: bool,
    /// A statement changed the session itself (see [`touches_session`]):
    /// it is cleaned before reuse without asking.
    session_changed: bool,
    /// What the check before the `COMMIT` found ([`LEFTOVERS_COLUMNS`]);
    /// `None` when it did not run (a rollback): then it runs after.
    leftovers: Option<bool>,
}

/// Statements kept prepared per plugin connection; past this many the
/// cache is emptied (a plugin that formats values into its SQL would
/// otherwise grow it without bound).
const CACHED_STATEMENTS: usize = 64;

/// The columns of the check run at the end of each invocation: the first
/// releases any session-level advisory lock, the second (a boolean) tells
/// whether the session holds anything else that outlives a transaction (a
/// `PREPARE`d statement, a `WITH HOLD` cursor, a `LISTEN`, a temporary
/// table). Only holdable cursors count: `pg_cursors` also lists the
/// protocol-level portal of this very query, and any other cursor ends
/// with the transaction. Every name is qualified with `pg_catalog`: the
/// plugin may have changed its `search_path` to put look-alikes first.
///
/// A committing invocation runs it in its transaction just before the
/// `COMMIT` (with the engine's status call, when there is one: one round
/// trip); an invocation rolled back runs it after ([`LEFTOVERS`]).
const LEFTOVERS_COLUMNS: &str = "pg_catalog.pg_advisory_unlock_all()::pg_catalog.text, \
       EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) \
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) \
    OR (pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 \
        AND EXISTS (SELECT 1 FROM pg_catalog.pg_class \
                    WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()))";

/// [`LEFTOVERS_COLUMNS`] on its own, prepared once per connection.
static LEFTOVERS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {LEFTOVERS_COLUMNS}"));

impl PluginDb {
    /// Run the plugin's init script `text` (from `script`) as its role, in
    /// its schema, in one transaction holding the schema's DDL lock (so it
    /// never races another replica's script or a running invocation's DDL).
    pub async fn init(&self, script: &Path, text: &str) -> anyhow::Result<()> {
        let fail = |e: &tokio_postgres::Error| {
            let at = e
                .as_db_error()
                .and_then(|db| match db.position() {
                    Some(tokio_postgres::error::ErrorPosition::Original(p)) => {
                        Some(format!(" at line {}", line_of(text, *p)))
                    }
                    _ => None,
                })
                .unwrap_or_default();
            anyhow::anyhow!(
                "sql.init: plugin `{}`'s init script {} failed{at}: {}",
                self.plugin,
                script.display(),
                describe(e)
            )
        };
        let mut client = self.pool.get().await.map_err(|e| {
            anyhow::anyhow!(
                "sql.init: plugin `{}` cannot connect to PostgreSQL as role {}: {e}",
                self.plugin,
                self.role
            )
        })?;
        let tx = client.transaction().await.map_err(|e| fail(&e))?;
        tx.batch_execute(&format!(
            "SET LOCAL search_path = {}; SET LOCAL statement_timeout = {}; \
             SELECT pg_advisory_xact_lock({})",
            quote_ident(&self.schema),
            super::sqlite::INIT_TIMEOUT.as_millis(),
            self.ddl_lock
        ))
        .await
        .map_err(|e| fail(&e))?;
        tx.batch_execute(text).await.map_err(|e| fail(&e))?;
        tx.commit().await.map_err(|e| fail(&e))?;
        // The script may have changed the session: not reused.
        drop(Object::take(client));
        tracing::info!(plugin = %self.plugin, script = %script.display(), "ran the plugin's init script");
        Ok(())
    }
}

/// The task that owns one invocation's connection and transaction.
async fn connection_task(mut client: Object, setup: Setup, mut inbox: mpsc::Receiver<Command>) {
    let served = serve(&mut client, &setup, &mut inbox).await;
    if served.forget_statements || client.statement_cache.size() > CACHED_STATEMENTS {
        client.statement_cache.clear();
    }
    let mut reusable = served.reusable;
    if reusable {
        // Whatever the plugin left in its session that outlives the
        // transaction (prepared statements, cursors, temporary tables,
        // advisory locks, LISTENs) goes now, not when the connection is
        // next taken: an advisory lock must not outlive the invocation
        // that took it. Asking costs one cached query; cleaning, only
        // when something is left.
        let left = match served.leftovers {
            Some(left) => left,
            None => leftovers(&client).await.unwrap_or(true),
        };
        let clean = served.session_changed || left;
        reusable = !clean || clean_session(&client).await.is_ok();
    }
    if !reusable {
        // Closed, never reused: a late cancel request can then reach no
        // one else's statement.
        drop(Object::take(client));
    }
}

/// Whether the session holds anything beyond its (ended) transaction;
/// releases its session-level advisory locks in passing.
async fn leftovers(client: &Object) -> Result<bool, tokio_postgres::Error> {
    let check = client.prepare_cached(&LEFTOVERS).await?;
    let row = client.query_one(&check, &[]).await?;
    row.try_get::<_, bool>(1)
}

/// The advisory lock key that serializes the DDL of one plugin role's
/// schema: the first 8 bytes of a hash of the role (roles are unique per
/// database and schema).
fn ddl_lock_key(role: &str) -> i64 {
    let digest = sha2::Sha256::digest(format!("sandpipe ddl {role}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(key)
}

/// Run `prelude` (simple statements, may be empty) and then `statement`,
/// pipelined: sent together, answered in order, one round trip.
async fn pipelined(
    link: &Link<'_>,
    prelude: &[&str],
    statement: &str,
    work: Work,
    limit: ResultLimit,
) -> Result<Outcome, Failed> {
    if prelude.is_empty() {
        return run(link, statement, work, limit).await;
    }
    let prelude = prelude.join("; ");
    let client = link.client()?;
    let (before, result) = futures::join!(
        client.batch_execute(&prelude),
        run(link, statement, work, limit)
    );
    before.map_err(Failed::server).and(result)
}

/// Whether `err` may be two transactions' DDL meeting in the catalog: a
/// unique violation of a system catalog index or an "already exists" (two
/// `CREATE ... IF NOT EXISTS` of one name), or "tuple concurrently
/// updated".
fn catalog_race(err: &tokio_postgres::Error) -> bool {
    let Some(db) = err.as_db_error() else {
        return false;
    };
    use tokio_postgres::error::SqlState;
    // "already exists": two `CREATE ... IF NOT EXISTS` of one name that both
    // looked before either committed (seen as `type "t" already exists`).
    // A real duplicate fails again when run under the lock, so counting it
    // here costs only that second try.
    let exists = [
        SqlState::DUPLICATE_OBJECT,
        SqlState::DUPLICATE_TABLE,
        SqlState::DUPLICATE_SCHEMA,
        SqlState::DUPLICATE_FUNCTION,
    ];
    (*db.code() == SqlState::UNIQUE_VIOLATION
        && db.constraint().is_some_and(|c| c.starts_with("pg_")))
        || exists.contains(db.code())
        || (*db.code() == SqlState::INTERNAL_ERROR
            && db.message().contains("tuple concurrently updated"))
}

/// Whether `sql` may change the session beyond its transaction by what it
/// says: a leading `SET` (other than `SET LOCAL`, which ends with the
/// transaction), `RESET`, `DISCARD`, `LOAD`, `LISTEN`, `PREPARE`, `DECLARE`,
/// `DEALLOCATE`, or a call of `set_config` anywhere. What a function the
/// plugin defined does is not seen here; [`LEFTOVERS_COLUMNS`] catches what such a
/// function can leave behind except a changed setting, which then stays on
/// the plugin's own connections (each invocation still sets its
/// `search_path` and `statement_timeout` locally).
pub fn touches_session(sql: &str) -> bool {
    let words = leading_keywords(sql, 2);
    let leading = match words.first().map(String::as_str) {
        Some("set") => words.get(1).map(String::as_str) != Some("local"),
        Some("reset" | "discard" | "load" | "listen" | "prepare" | "declare" | "deallocate") => {
            true
        }
        _ => false,
    };
    leading
        || sql
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|word| word.eq_ignore_ascii_case("set_config"))
}

/// Whether `sql` changes the catalog (DDL), by its leading keyword. Such a
/// statement runs in a savepoint; if it meets another transaction's DDL in
/// the catalog (two invocations that both `CREATE TABLE IF NOT EXISTS`:
/// PostgreSQL makes the second wait for the first and then fails it on a
/// catalog unique index), it is rolled back to the savepoint and run again
/// holding the schema's DDL lock, when the first one's table is there.
/// DDL run from inside a function is not seen (put it in an init script).
pub fn is_ddl(sql: &str) -> bool {
    matches!(
        leading_keywords(sql, 1).first().map(String::as_str),
        Some(
            "create"
                | "alter"
                | "drop"
                | "comment"
                | "grant"
                | "revoke"
                | "do"
                | "import"
                | "security"
        )
    )
}

/// `DISCARD ALL` but for the client's own prepared statements (its type
/// lookups), which it would otherwise find gone: the plugin's `PREPARE`d
/// statements are deallocated by name.
async fn clean_session(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let messages = client
        .simple_query(
            "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
             SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; \
             DISCARD SEQUENCES; SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql",
        )
        .await?;
    let mut deallocate = String::new();
    for message in messages {
        // Only the last query's rows (`pg_advisory_unlock_all` has one too).
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message
            && row.columns().first().map(|c| c.name()) == Some("name")
            && let Some(name) = row.get(0)
        {
            deallocate.push_str(&format!("DEALLOCATE {};", quote_ident(name)));
        }
    }
    if !deallocate.is_empty() {
        client.batch_execute(&deallocate).await?;
    }
    Ok(())
}

/// Commit the invocation's transaction in one round trip with its last
/// statement: the engine's `call` (if any) and the [`LEFTOVERS_COLUMNS`]
/// check, one statement kept prepared on the connection (and `BEGIN`
/// first, in the same round trip, when no statement of the plugin's ran).
/// What the check found.
///
/// If the last statement fails, PostgreSQL has aborted the transaction and
/// answers the `COMMIT` behind it by rolling back: the statement's error is
/// the result, and nothing was committed.
async fn commit(link: &Link<'_>, call: Option<&EngineCall>) -> Result<bool, String> {
    if !link.began && call.is_none() {
        // No statement ran and nothing is to be written: nothing to commit,
        // and nothing can be left in the session.
        return Ok(false);
    }
    let client = link.client().map_err(|f| f.error.to_string())?;
    let fail = |e: tokio_postgres::Error| describe(&e);
    let (stmt, params): (_, Vec<&(dyn ToSql + Sync)>) = match call {
        Some(call) => {
            let statement = format!("{} SELECT {LEFTOVERS_COLUMNS}", call.with);
            let stmt = link
                .cache
                .prepare_typed(client, &statement, call.types)
                .await
                .map_err(fail)?;
            let params = call.params.iter().map(|p| p.as_ref() as _).collect();
            (stmt, params)
        }
        None => (
            link.cache.prepare(client, &LEFTOVERS).await.map_err(fail)?,
            Vec::new(),
        ),
    };
    let begin = async {
        match link.began {
            true => Ok(()),
            false => client.batch_execute("BEGIN").await,
        }
    };
    // Polled in this order, so sent in this order.
    let (begun, row, committed) = futures::join!(
        begin,
        client.query_one(&stmt, &params),
        client.batch_execute("COMMIT")
    );
    begun.map_err(fail)?;
    let row = row.map_err(fail)?;
    committed.map_err(fail)?;
    row.try_get(row.len() - 1).map_err(fail)
}

/// An invocation's connection while its task serves it. The transaction is
/// begun by hand, in the same round trip as its first statement, and
/// committed by hand, in the same round trip as its last (the engine's
/// check and status rows): `tokio_postgres`'s `Transaction` sends `BEGIN`
/// and waits for it, and its `commit` consumes it, so neither can be
/// pipelined. A `Transaction` is still taken when a query needs a portal
/// (row-limited fetching exists only there); it is then forgotten, never
/// dropped, since the transaction is ended by hand.
struct Link<'c> {
    cache: Arc<deadpool_postgres::StatementCache>,
    conn: Conn<'c>,
    /// `BEGIN` has been sent.
    began: bool,
}

enum Conn<'c> {
    Client(&'c mut tokio_postgres::Client),
    Transaction(tokio_postgres::Transaction<'c>),
    /// Taking a `Transaction` failed: the connection is not used again.
    Lost,
}

impl<'c> Link<'c> {
    fn client(&self) -> Result<&tokio_postgres::Client, Failed> {
        match &self.conn {
            Conn::Client(client) => Ok(&**client),
            Conn::Transaction(tx) => Ok(tx.client()),
            Conn::Lost => Err(Failed::lost()),
        }
    }

    /// The `Transaction` a portal needs, taken now if need be (its `BEGIN`
    /// is the invocation's when none was sent yet; else PostgreSQL answers
    /// it with a warning, and it costs the round trip that pipelining the
    /// first `BEGIN` saved).
    async fn transaction(&mut self) -> Result<&tokio_postgres::Transaction<'c>, Failed> {
        if let Conn::Client(_) = self.conn {
            let Conn::Client(client) = std::mem::replace(&mut self.conn, Conn::Lost) else {
                return Err(Failed::lost());
            };
            let tx = client.transaction().await.map_err(Failed::server)?;
            self.conn = Conn::Transaction(tx);
            self.began = true;
        }
        match &self.conn {
            Conn::Transaction(tx) => Ok(tx),
            _ => Err(Failed::lost()),
        }
    }

    /// The transaction has been ended by hand: the `Transaction`, if one
    /// was taken, must not send its `ROLLBACK` on drop.
    fn ended(self) {
        if let Conn::Transaction(tx) = self.conn {
            std::mem::forget(tx);
        }
    }
}

/// Serve the invocation's commands: `BEGIN` and the `SET LOCAL`s with the
/// first statement (one round trip), a savepoint before DDL, the `COMMIT`
/// with the engine's last statement.
async fn serve(client: &mut Object, setup: &Setup, inbox: &mut mpsc::Receiver<Command>) -> Served {
    let mut served = Served {
        reusable: false,
        forget_statements: false,
        session_changed: false,
        leftovers: None,
    };
    let mut link = Link {
        cache: client.statement_cache.clone(),
        conn: Conn::Client(client),
        began: false,
    };
    let mut settings = setup.settings.as_deref();
    let mut ddl_locked = false;
    while let Some(command) = inbox.recv().await {
        match command {
            Command::Run {
                statement,
                work,
                limit,
                reply,
            } => {
                // Rows are fetched through a portal, which needs the
                // transaction object.
                if matches!(work, Work::Query(_))
                    && let Err(e) = link.transaction().await
                {
                    served.forget_statements = true;
                    let _ = reply.send(Err(e));
                    continue;
                }
                let ddl = is_ddl(&statement);
                // DDL runs optimistically in a savepoint; if it raced
                // another transaction's DDL in the catalog, it runs again
                // under the schema's DDL lock (held to the end).
                let guard = (ddl && !ddl_locked).then_some("SAVEPOINT sandpipe_ddl");
                let again = guard.is_some().then(|| work.clone());
                let begin = (!link.began).then_some("BEGIN");
                link.began = true;
                let prelude: Vec<&str> = begin
                    .into_iter()
                    .chain(settings.take())
                    .chain(guard)
                    .collect();
                let mut result = pipelined(&link, &prelude, &statement, work, limit).await;
                if let (Some(work), Err(Failed { race: true, .. })) = (again, &result) {
                    tracing::debug!(
                        "a plugin's DDL raced another transaction's; again under the schema's DDL lock"
                    );
                    let lock = format!(
                        "ROLLBACK TO SAVEPOINT sandpipe_ddl; SELECT pg_advisory_xact_lock({})",
                        setup.ddl_lock
                    );
                    result = pipelined(&link, &[lock.as_str()], &statement, work, limit).await;
                    ddl_locked = true;
                }
                served.forget_statements |= ddl || result.is_err();
                served.session_changed |= touches_session(&statement);
                let _ = reply.send(result);
            }
            Command::Finish {
                commit: committing,
                discard,
                before,
                reply,
            } => {
                let result = if committing {
                    commit(&link, before.as_ref()).await.map(|left| {
                        served.leftovers = Some(left);
                    })
                } else if link.began {
                    match link.client() {
                        Ok(client) => client
                            .batch_execute("ROLLBACK")
                            .await
                            .map_err(|e| describe(&e)),
                        Err(failed) => Err(failed.error.to_string()),
                    }
                } else {
                    // Nothing ran: nothing to roll back, nothing left.
                    served.leftovers = Some(false);
                    Ok(())
                };
                link.ended();
                served.reusable = result.is_ok() && !discard;
                let _ = reply.send(result);
                return served;
            }
        }
    }
    // The handle went away without finishing: the transaction rolls back
    // when the connection closes.
    served
}

impl PluginTx {
    /// Run one plugin statement: rows for a query (at most `limit`), else
    /// the number of rows changed.
    pub async fn run(
        &mut self,
        statement: String,
        work: Work,
        limit: ResultLimit,
    ) -> Result<Outcome, HostError> {
        if let Some(why) = &self.broken {
            return Err(HostError::Invalid(format!(
                "this invocation's transaction is over: {why}"
            )));
        }
        if let Some(keyword) = transaction_control(&statement) {
            return Err(HostError::AccessDenied(format!(
                "`{keyword}` is transaction control, which the engine owns: each invocation's statements run in one transaction, committed only when the plugin returns done"
            )));
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Run {
            statement,
            work,
            limit,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            return Err(self.lost());
        }
        match tokio::time::timeout_at(self.deadline, answer).await {
            Ok(Ok(Ok(outcome))) => Ok(outcome),
            Ok(Ok(Err(Failed { error, aborted, .. }))) => {
                if let HostError::Unavailable(why) = &error {
                    self.broken = Some(why.clone());
                }
                if aborted && self.aborted.is_none() {
                    self.aborted = Some(error.to_string());
                }
                Err(error)
            }
            Ok(Err(_)) => Err(self.lost()),
            Err(_) => {
                let why = format!(
                    "a statement of plugin `{}` ran past its deadline ({:?}) and was cancelled",
                    self.plugin, self.timeout
                );
                self.broken = Some(why.clone());
                let cancel = self.cancel.clone();
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    cancel.cancel_query(self.tls.clone()),
                )
                .await;
                Err(HostError::LimitExceeded(why))
            }
        }
    }

    fn lost(&mut self) -> HostError {
        let why = "the connection to PostgreSQL was lost".to_owned();
        self.broken = Some(why.clone());
        HostError::Unavailable(why)
    }

    async fn finish(&mut self, commit: bool, before: Option<EngineCall>) -> anyhow::Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let discard = self.broken.is_some();
        // PostgreSQL answers COMMIT of an aborted transaction by rolling it
        // back without an error: refuse it here, so the invocation fails
        // (and is retried) instead of losing its SQL silently.
        let refusal = match (&self.broken, &self.aborted) {
            _ if !commit => None,
            (Some(why), _) => Some(why.clone()),
            (None, Some(first)) => Some(format!(
                "a statement failed earlier in this invocation, which aborted its transaction ({first})"
            )),
            (None, None) => None,
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Finish {
            commit: refusal.is_none() && commit,
            discard,
            before,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            anyhow::bail!("the connection to PostgreSQL was lost before the transaction ended");
        }
        let wait = self.timeout.max(Duration::from_secs(10));
        let result = tokio::time::timeout(wait, answer)
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not end the transaction within {wait:?}"))?
            .map_err(|_| anyhow::anyhow!("the connection to PostgreSQL was lost"))?;
        result.map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(why) = refusal {
            anyhow::bail!("not committed: {why}");
        }
        Ok(())
    }

    /// Commit the transaction.
    pub async fn commit(mut self) -> anyhow::Result<()> {
        let plugin = self.plugin.clone();
        self.finish(true, None)
            .await
            .with_context(|| format!("cannot commit plugin `{plugin}`'s transaction"))
    }

    /// Run the engine's `call` in the transaction (as the plugin's role),
    /// then commit: both or neither.
    pub async fn commit_with(mut self, call: EngineCall) -> anyhow::Result<()> {
        let plugin = self.plugin.clone();
        self.finish(true, Some(call))
            .await
            .with_context(|| format!("cannot commit plugin `{plugin}`'s transaction"))
    }

    /// Roll the transaction back.
    pub async fn rollback(mut self) {
        if let Err(e) = self.finish(false, None).await {
            tracing::warn!(plugin = %self.plugin, "rollback: {e:#}");
        }
    }
}

impl Drop for PluginTx {
    fn drop(&mut self) {
        if !self.finished {
            // The task closes the connection (rolling back); stop whatever
            // statement it may still be running.
            let cancel = self.cancel.clone();
            let tls = self.tls.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = cancel.cancel_query(tls).await;
                });
            }
        }
    }
}

/// The leading keyword of `sql` (lowercase) if the statement is
/// transaction control.
pub fn transaction_control(sql: &str) -> Option<String> {
    let words = leading_keywords(sql, 2);
    let first = words.first()?.as_str();
    let second = words.get(1).map(String::as_str);
    match first {
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" => {
            Some(first.to_ascii_uppercase())
        }
        "prepare" if second == Some("transaction") => Some("PREPARE TRANSACTION".into()),
        _ => None,
    }
}

/// Up to `n` leading words of `sql`, lowercase, skipping whitespace and
/// comments (`-- ...` and nested `/* ... */`).
pub fn leading_keywords(sql: &str, n: usize) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut words = Vec::new();
    while i < bytes.len() && words.len() < n {
        let b = bytes[i];
        if b.is_ascii_whitespace() {
            i += 1;
        } else if bytes[i..].starts_with(b"--") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b.is_ascii_alphabetic() || b == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            words.push(sql[start..i].to_ascii_lowercase());
        } else {
            break;
        }
    }
    words
}

/// The WIT error for a PostgreSQL error.
fn pg_error(err: &tokio_postgres::Error) -> HostError {
    let text = describe(err);
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        return match code {
            // insufficient_privilege
            "42501" => HostError::AccessDenied(text),
            // query_canceled: statement_timeout (or the host's cancel)
            "57014" => HostError::LimitExceeded(format!("statement cancelled: {text}")),
            // connection exception, operator intervention, insufficient
            // resources, serialization failure, deadlock, lock not available
            c if c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || c == "40001"
                || c == "40P01"
                || c == "55P03" =>
            {
                HostError::Unavailable(text)
            }
            _ => HostError::Invalid(text),
        };
    }
    let io = std::iter::successors(std::error::Error::source(err), |e| e.source())
        .any(|e| e.is::<std::io::Error>());
    if err.is_closed() || io {
        HostError::Unavailable(text)
    } else {
        HostError::Invalid(text)
    }
}

/// The types the `sql` interface maps, after domains are unwrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Text,
    Json,
    Jsonb,
    Bytea,
    Timestamp,
    Uuid,
    Void,
}

fn class(ty: &Type) -> Option<Class> {
    match ty.kind() {
        Kind::Domain(inner) => return class(inner),
        Kind::Enum(_) => return Some(Class::Text),
        _ => {}
    }
    Some(match *ty {
        Type::BOOL => Class::Bool,
        Type::INT2 => Class::Int2,
        Type::INT4 => Class::Int4,
        Type::INT8 => Class::Int8,
        Type::OID => Class::Oid,
        Type::FLOAT4 => Class::Float4,
        Type::FLOAT8 => Class::Float8,
        Type::NUMERIC => Class::Numeric,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Class::Text,
        Type::JSON => Class::Json,
        Type::JSONB => Class::Jsonb,
        Type::BYTEA => Class::Bytea,
        Type::TIMESTAMP | Type::TIMESTAMPTZ => Class::Timestamp,
        Type::UUID => Class::Uuid,
        Type::VOID => Class::Void,
        _ if ty.name() == "citext" => Class::Text,
        _ => return None,
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Json(_) => "json",
        Value::Timestamp(_) => "timestamp",
    }
}

/// A plugin's parameter, encoded for the type the server expects.
#[derive(Debug)]
struct Param(Encoded);

#[derive(Debug)]
enum Encoded {
    Null,
    Bytes(Vec<u8>),
}

impl Param {
    /// Parameter `$index` with `value`, for a placeholder of type `ty`.
    fn new(index: usize, value: Value, ty: &Type) -> Result<Self, HostError> {
        let mismatch = |value: &Value| {
            let kind = kind_of(value);
            HostError::Invalid(format!(
                "parameter ${index} is {kind} but the statement expects {ty}; pass a matching value, or pass text and cast the placeholder (`${index}::text::{ty}`)"
            ))
        };
        if matches!(value, Value::Null) {
            return Ok(Self(Encoded::Null));
        }
        let Some(class) = class(ty) else {
            return Err(mismatch(&value));
        };
        let mut out = BytesMut::new();
        let range = |i: i64, name: &str| {
            HostError::Invalid(format!(
                "parameter ${index}: {i} is out of range for {name}"
            ))
        };
        match (class, &value) {
            (Class::Bool, Value::Boolean(b)) => out.put_u8(u8::from(*b)),
            (Class::Int2, Value::Int(i)) => {
                out.put_i16(i16::try_from(*i).map_err(|_| range(*i, "smallint"))?)
            }
            (Class::Int4, Value::Int(i)) => {
                out.put_i32(i32::try_from(*i).map_err(|_| range(*i, "integer"))?)
            }
            (Class::Int8, Value::Int(i)) => out.put_i64(*i),
            (Class::Oid, Value::Int(i)) => {
                out.put_u32(u32::try_from(*i).map_err(|_| range(*i, "oid"))?)
            }
            (Class::Float4, Value::Float(f)) => out.put_f32(*f as f32),
            (Class::Float4, Value::Int(i)) => out.put_f32(*i as f32),
            (Class::Float8, Value::Float(f)) => out.put_f64(*f),
            (Class::Float8, Value::Int(i)) => out.put_f64(*i as f64),
            (Class::Numeric, Value::Int(i)) => encode_numeric(&i.to_string(), &mut out)
                .map_err(|e| HostError::Invalid(format!("parameter ${index}: {e}")))?,
            (Class::Numeric, Value::Float(f)) => {
                let text = if f.is_nan() {
                    "NaN".to_owned()
                } else if f.is_finite() {
                    format!("{f}")
                } else {
                    return Err(HostError::Invalid(format!(
                        "parameter ${index}: {f} is not a numeric value"
                    )));
                };
                encode_numeric(&text, &mut out)
                    .map_err(|e| HostError::Invalid(format!("parameter ${index}: {e}")))?
            }
            (Class::Numeric, Value::Text(s)) => encode_numeric(s.trim(), &mut out)
                .map_err(|e| HostError::Invalid(format!("parameter ${index}: {e}")))?,
            (Class::Text, Value::Text(s) | Value::Json(s)) => out.put_slice(s.as_bytes()),
            (Class::Json, Value::Json(s) | Value::Text(s)) => out.put_slice(s.as_bytes()),
            (Class::Jsonb, Value::Json(s) | Value::Text(s)) => {
                out.put_u8(1);
                out.put_slice(s.as_bytes());
            }
            (Class::Bytea, Value::Bytes(b)) => out.put_slice(b),
            (Class::Timestamp, Value::Timestamp(us)) => out.put_i64(
                us.checked_sub(PG_EPOCH_US)
                    .ok_or_else(|| range(*us, "timestamp"))?,
            ),
            (Class::Uuid, Value::Text(s)) => {
                let id = uuid::Uuid::parse_str(s.trim()).map_err(|e| {
                    HostError::Invalid(format!("parameter ${index}: not a UUID: {e}"))
                })?;
                out.put_slice(id.as_bytes());
            }
            _ => return Err(mismatch(&value)),
        }
        Ok(Self(Encoded::Bytes(out.to_vec())))
    }
}

impl ToSql for Param {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Encoded::Null => Ok(IsNull::Yes),
            Encoded::Bytes(b) => {
                out.put_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Rows fetched from a plugin query's portal at a time.
const FETCH_BATCH: i64 = 256;

/// The length of a result cell's wire value (`None` for NULL), read
/// without copying it.
struct RawLen(Option<usize>);

impl<'a> FromSql<'a> for RawLen {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(Some(raw.len())))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One result cell, decoded by its column's type.
struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres_protocol::types as pg;
        let Some(class) = class(ty) else {
            return Err(format!("cannot decode type {ty}").into());
        };
        Ok(Self(match class {
            Class::Bool => Value::Boolean(pg::bool_from_sql(raw)?),
            Class::Int2 => Value::Int(pg::int2_from_sql(raw)?.into()),
            Class::Int4 => Value::Int(pg::int4_from_sql(raw)?.into()),
            Class::Int8 => Value::Int(pg::int8_from_sql(raw)?),
            Class::Oid => Value::Int(pg::oid_from_sql(raw)?.into()),
            Class::Float4 => Value::Float(pg::float4_from_sql(raw)?.into()),
            Class::Float8 => Value::Float(pg::float8_from_sql(raw)?),
            Class::Numeric => Value::Text(decode_numeric(raw)?),
            Class::Text => Value::Text(pg::text_from_sql(raw)?.to_owned()),
            Class::Json => Value::Json(pg::text_from_sql(raw)?.to_owned()),
            Class::Jsonb => match raw.split_first() {
                Some((1, rest)) => Value::Json(std::str::from_utf8(rest)?.to_owned()),
                _ => return Err("unsupported jsonb version".into()),
            },
            Class::Bytea => Value::Bytes(pg::bytea_from_sql(raw).to_vec()),
            Class::Timestamp => {
                let t = pg::timestamp_from_sql(raw)?;
                Value::Timestamp(if t == i64::MAX || t == i64::MIN {
                    t // infinity
                } else {
                    t.saturating_add(PG_EPOCH_US)
                })
            }
            Class::Uuid => Value::Text(uuid::Uuid::from_bytes(pg::uuid_from_sql(raw)?).to_string()),
            Class::Void => Value::Null,
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// `params` bound to `stmt`'s placeholders, each encoded for its type.
fn bind(stmt: &tokio_postgres::Statement, params: Vec<Value>) -> Result<Vec<Param>, HostError> {
    let types = stmt.params();
    if types.len() != params.len() {
        return Err(HostError::Invalid(format!(
            "the statement has {} placeholder(s) but {} parameter(s) were given",
            types.len(),
            params.len()
        )));
    }
    params
        .into_iter()
        .zip(types)
        .enumerate()
        .map(|(i, (value, ty))| Param::new(i + 1, value, ty))
        .collect()
}

/// `stmt`'s column names, and whether each column's values count by their
/// length in `limits.sql_bytes`; `invalid` for a type the sql interface
/// does not return.
fn result_columns(stmt: &tokio_postgres::Statement) -> Result<(Vec<String>, Vec<bool>), HostError> {
    let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    let mut sized = Vec::with_capacity(columns.len());
    for column in stmt.columns() {
        let Some(class) = class(column.type_()) else {
            return Err(HostError::Invalid(format!(
                "column `{}` has type {}, which the sql interface does not return; cast it in the query, e.g. `{}::text`",
                column.name(),
                column.type_(),
                column.name()
            )));
        };
        sized.push(matches!(
            class,
            Class::Text | Class::Json | Class::Jsonb | Class::Bytea | Class::Numeric
        ));
    }
    Ok((columns, sized))
}

/// One row's values, each counted into `bytes` against `limit` before it
/// is decoded (decoding happens here, not on the server).
fn row_values(
    row: &tokio_postgres::Row,
    sized: &[bool],
    limit: &ResultLimit,
    bytes: &mut u64,
) -> Result<Vec<Value>, HostError> {
    let mut out = Vec::with_capacity(sized.len());
    for (i, sized) in sized.iter().enumerate() {
        let RawLen(len) = row.try_get(i).map_err(|e| pg_error(&e))?;
        limit.count(bytes, len.filter(|_| *sized))?;
        let cell: Cell = row.try_get(i).map_err(|e| pg_error(&e))?;
        out.push(cell.0);
    }
    Ok(out)
}

/// Run one statement inside the invocation's transaction.
async fn run(
    link: &Link<'_>,
    statement: &str,
    work: Work,
    limit: ResultLimit,
) -> Result<Outcome, Failed> {
    let client = link.client()?;
    // Kept prepared on the connection: the plugin's next invocation on it
    // binds and executes without parsing again.
    let stmt = link
        .cache
        .prepare(client, statement)
        .await
        .map_err(Failed::server)?;
    let params = match work {
        Work::Query(params) => bind(&stmt, params).map_err(Failed::local)?,
        Work::Execute(batch) => {
            let lists = batch.len();
            let mut changed = 0;
            for (index, params) in batch.into_iter().enumerate() {
                let params = bind(&stmt, params)
                    .map_err(|e| Failed::local(Work::failed_at(e, index, lists)))?;
                changed += client
                    .execute_raw(&stmt, params.iter())
                    .await
                    .map_err(|e| Failed {
                        error: Work::failed_at(pg_error(&e), index, lists),
                        aborted: true,
                        race: catalog_race(&e),
                    })?;
            }
            return Ok(Outcome::Changed(changed));
        }
    };
    let (columns, sized) = result_columns(&stmt).map_err(Failed::local)?;
    let Conn::Transaction(tx) = &link.conn else {
        return Err(Failed::local(HostError::Unavailable(
            "a query's rows need the transaction, which was not taken".into(),
        )));
    };
    let portal = tx
        .bind_raw(&stmt, params.iter())
        .await
        .map_err(Failed::server)?;
    // Rows are fetched a batch at a time, so no more than a batch is ever
    // held beyond the limits; one row more than allowed tells "too many".
    let max_rows = i64::from(limit.rows);
    let mut values = Vec::new();
    let mut bytes = 0;
    loop {
        let wanted = (max_rows + 1 - values.len() as i64).clamp(1, FETCH_BATCH);
        let stream = tx
            .query_portal_raw(&portal, wanted as i32)
            .await
            .map_err(Failed::server)?;
        futures::pin_mut!(stream);
        let mut fetched = 0;
        while let Some(row) = stream.try_next().await.map_err(Failed::server)? {
            fetched += 1;
            if values.len() as i64 >= max_rows {
                return Err(Failed::local(limit.too_many_rows()));
            }
            values.push(row_values(&row, &sized, &limit, &mut bytes).map_err(Failed::local)?);
        }
        if fetched < wanted {
            break;
        }
    }
    Ok(Outcome::Rows(Rows { columns, values }))
}

/// Run one statement on `client`, a connection of an external database in
/// a transaction its caller began: the typing, binding and limits of a
/// plugin's statement ([`run`]), the rows streamed (the server's are
/// dropped past the limit).
pub async fn run_plain(
    client: &tokio_postgres::Client,
    statement: &str,
    work: Work,
    limit: ResultLimit,
) -> Result<Outcome, HostError> {
    let stmt = client.prepare(statement).await.map_err(|e| pg_error(&e))?;
    let params = match work {
        Work::Query(params) => bind(&stmt, params)?,
        Work::Execute(batch) => {
            let lists = batch.len();
            let mut changed = 0;
            for (index, params) in batch.into_iter().enumerate() {
                let params = bind(&stmt, params).map_err(|e| Work::failed_at(e, index, lists))?;
                changed += client
                    .execute_raw(&stmt, params.iter())
                    .await
                    .map_err(|e| Work::failed_at(pg_error(&e), index, lists))?;
            }
            return Ok(Outcome::Changed(changed));
        }
    };
    let (columns, sized) = result_columns(&stmt)?;
    let rows = client
        .query_raw(&stmt, params.iter())
        .await
        .map_err(|e| pg_error(&e))?;
    futures::pin_mut!(rows);
    let mut values = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.try_next().await.map_err(|e| pg_error(&e))? {
        if values.len() as u64 >= u64::from(limit.rows) {
            return Err(limit.too_many_rows());
        }
        values.push(row_values(&row, &sized, &limit, &mut bytes)?);
    }
    Ok(Outcome::Rows(Rows { columns, values }))
}

/// A pool of connections to an external database (`databases:`): `url`
/// (with its `sslmode`) logging in with `password`; each connection is
/// cleaned when it comes back (`DISCARD ALL`-like: settings, advisory
/// locks, prepared statements, cursors), so nothing a guest's query left
/// in the session outlives its invocation. Also the TLS connector, for
/// cancel requests.
pub fn external_pool(
    url: &str,
    password: Option<&str>,
    size: usize,
    tls: &Tls,
) -> anyhow::Result<(Pool, PgTls)> {
    let (mut config, ssl_mode) = crate::config::postgres_url(url)
        .map_err(|e| anyhow::anyhow!("not a PostgreSQL URL: {e}"))?;
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("sandpipe-source");
    let tls = tls.postgres(ssl_mode)?;
    Ok((
        pool_recycled(config, tls.clone(), size, RecyclingMethod::Clean)?,
        tls,
    ))
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// PostgreSQL's binary `numeric` for a decimal text (`-12.50`, `NaN`).
fn encode_numeric(text: &str, out: &mut BytesMut) -> Result<(), String> {
    let header = |out: &mut BytesMut, ndigits: i16, weight: i16, sign: u16, dscale: u16| {
        out.put_i16(ndigits);
        out.put_i16(weight);
        out.put_u16(sign);
        out.put_u16(dscale);
    };
    match text.to_ascii_lowercase().as_str() {
        "nan" => {
            header(out, 0, 0, NUMERIC_NAN, 0);
            return Ok(());
        }
        "infinity" | "+infinity" => {
            header(out, 0, 0, NUMERIC_PINF, 0);
            return Ok(());
        }
        "-infinity" => {
            header(out, 0, 0, NUMERIC_NINF, 0);
            return Ok(());
        }
        _ => {}
    }
    let bad = || format!("`{text}` is not a decimal number");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let dscale = u16::try_from(frac.len()).map_err(|_| bad())?;
    let int = int.trim_start_matches('0');
    // Base-10000 groups: the integer part padded on the left, the fraction
    // on the right, to whole groups of four digits.
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let all: String = "0".repeat(int_pad) + int + frac + &"0".repeat(frac_pad);
    let mut groups: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let mut weight = i32::try_from((int.len() + int_pad) / 4).map_err(|_| bad())? - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        header(out, 0, 0, NUMERIC_POS, dscale);
        return Ok(());
    }
    let ndigits = i16::try_from(groups.len()).map_err(|_| bad())?;
    let weight = i16::try_from(weight).map_err(|_| bad())?;
    let sign = if negative { NUMERIC_NEG } else { NUMERIC_POS };
    header(out, ndigits, weight, sign, dscale);
    for g in groups {
        out.put_i16(g);
    }
    Ok(())
}

/// The decimal text of PostgreSQL's binary `numeric`.
fn decode_numeric(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
        match raw.get(i..i + 2) {
            Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
            None => Err("truncated numeric".into()),
        }
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    match sign {
        NUMERIC_NAN => return Ok("NaN".into()),
        NUMERIC_PINF => return Ok("Infinity".into()),
        NUMERIC_NINF => return Ok("-Infinity".into()),
        _ => {}
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        digits.push(word(8 + 2 * i)?);
    }
    let group = |exponent: i32| -> u16 {
        usize::try_from(weight - exponent)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == NUMERIC_NEG {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for exponent in (0..=weight).rev() {
            if exponent == weight {
                text.push_str(&group(exponent).to_string());
            } else {
                text.push_str(&format!("{:04}", group(exponent)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut exponent = -1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", group(exponent)));
            exponent -= 1;
        }
        frac.truncate(dscale);
        text.push('.');
        text.push_str(&frac);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        let mut buf = BytesMut::new();
        encode_numeric(text, &mut buf).expect("encode");
        decode_numeric(&buf).expect("decode")
    }

    #[test]
    fn numerics_survive_the_binary_format() {
        for (input, output) in [
            ("0", "0"),
            ("1", "1"),
            ("-1", "-1"),
            ("10000", "10000"),
            ("123456789.000123", "123456789.000123"),
            ("0.5", "0.5"),
            ("-0.00012", "-0.00012"),
            ("12.50", "12.50"),
            ("007", "7"),
            ("9223372036854775807", "9223372036854775807"),
            ("NaN", "NaN"),
            ("+3", "3"),
            (".25", "0.25"),
        ] {
            assert_eq!(roundtrip(input), output, "{input}");
        }
        let mut buf = BytesMut::new();
        for bad in ["", "-", "1e5", "1.2.3", "abc", "1 000"] {
            assert!(encode_numeric(bad, &mut buf).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transaction_control_is_recognised_through_comments_and_case() {
        for sql in [
            "COMMIT",
            "  commit;",
            "-- x\nCOMMIT",
            "/* a /* nested */ comment */ rollback",
            "End",
            "ABORT",
            "begin isolation level serializable",
            "START TRANSACTION",
            "SAVEPOINT s",
            "RELEASE s",
            "prepare  transaction 'x'",
            "ROLLBACK PREPARED 'x'",
            "COMMIT PREPARED 'x'",
        ] {
            assert!(transaction_control(sql).is_some(), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "PREPARE q AS SELECT 1",
            "INSERT INTO commit VALUES (1)",
            "CREATE TABLE t (x int)",
            "",
            "-- only a comment",
        ] {
            assert!(transaction_control(sql).is_none(), "{sql}");
        }
    }

    #[test]
    fn pools_fit_what_the_server_has_free() {
        let server = PoolSizing {
            max_connections: 100,
            reserved: 3,
            in_use: 5,
        };
        // Unset: pipeline.concurrency, within a share of half what is free.
        assert_eq!(server.plugin_pool(16, 1, 16, None), (16, None));
        assert_eq!(server.plugin_pool(16, 1, 128, None), (30, None));
        assert_eq!(server.plugin_pool(16, 3, 128, None), (10, None));
        // Never below one, even when nothing is free.
        let full = PoolSizing {
            in_use: 97,
            ..server
        };
        let (size, warning) = full.plugin_pool(16, 2, 16, None);
        assert_eq!(size, 1);
        assert!(warning.is_some_and(|w| w.contains("18") && w.contains("0 the server has free")));
        // Configured: kept, with a warning when it can exceed the server.
        assert_eq!(server.plugin_pool(16, 1, 16, Some(20)), (20, None));
        let (size, warning) = server.plugin_pool(16, 1, 128, Some(128));
        assert_eq!(size, 128);
        assert!(warning.is_some_and(|w| w.contains("144") && w.contains("max_connections 100")),);
    }

    #[test]
    fn ddl_and_session_changes_are_recognised() {
        for sql in [
            "CREATE TABLE IF NOT EXISTS t (x int)",
            "  -- setup\n alter table t add column y int",
            "DROP TABLE t",
            "DO $$ BEGIN END $$",
            "/* c */ GRANT SELECT ON t TO PUBLIC",
        ] {
            assert!(is_ddl(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
        ] {
            assert!(!is_ddl(sql), "{sql}");
        }
        for sql in [
            "SET work_mem = '1MB'",
            "set statement_timeout = 0",
            "RESET ALL",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "LISTEN x",
            "SELECT set_config('work_mem', '1MB', false)",
            "select SET_CONFIG('a.b', 'c', false)",
            "DISCARD ALL",
        ] {
            assert!(touches_session(sql), "{sql}");
        }
        for sql in [
            "SET LOCAL work_mem = '1MB'",
            "UPDATE t SET x = 1",
            "INSERT INTO t (my_set_config) VALUES (1)",
            "SELECT pg_advisory_lock(1)",
        ] {
            assert!(!touches_session(sql), "{sql}");
        }
        // Keys differ per role and are stable.
        assert_eq!(ddl_lock_key("a"), ddl_lock_key("a"));
        assert_ne!(ddl_lock_key("a"), ddl_lock_key("b"));
    }

    #[test]
    fn role_names_are_unique_per_database_and_fit_postgres() {
        assert_eq!(role_name("sandpipe", "probe"), "sandpipe_sandpipe_probe");
        let long = role_name(&"d".repeat(60), "schema");
        assert!(long.len() <= 63, "{long}");
        assert_ne!(role_name("a-b", "s"), role_name("a_b", "s"));
        assert_ne!(
            role_name(&"d".repeat(60), "s1"),
            role_name(&"d".repeat(60), "s2")
        );
    }

    #[test]
    fn parameters_follow_the_placeholder_type() {
        assert!(Param::new(1, Value::Int(70_000), &Type::INT2).is_err());
        assert!(Param::new(1, Value::Int(7), &Type::INT2).is_ok());
        assert!(Param::new(1, Value::Text("x".into()), &Type::INT4).is_err());
        assert!(Param::new(1, Value::Null, &Type::INTERVAL).is_ok());
        let err = Param::new(2, Value::Text("1 day".into()), &Type::INTERVAL)
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("$2::text::interval"), "{err}");
        assert!(Param::new(1, Value::Text("not a uuid".into()), &Type::UUID).is_err());
    }
}
