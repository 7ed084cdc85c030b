//! The database: the engine's status log and plugin state, and the plugins'
//! own databases behind the `sql` capability. Two backends, chosen by
//! `database.type`:
//!
//! - [`sqlite`]: the engine's file plus one locked-down file per plugin.
//! - [`postgres`]: the engine's schema plus, per plugin, a schema and a
//!   login role of its own; every plugin statement runs as that role.
//!
//! [`Database`] is opened once by `app::assemble`; the status log
//! (`crate::status::StatusLog`), the [`StateStore`] and each plugin's
//! [`PluginDb`] are built from it.

pub mod external;
pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use crate::capability::StateOp;
use crate::config::{Config, DatabaseConfig, Limits};
use crate::error::HostError;
use crate::tls::Tls;

pub use postgres::Postgres;
pub use sqlite::{PluginConn, Sqlite};

/// A SQL value of a plugin's statement: a parameter or a result (the
/// capability layer converts the WIT `sql.value` to and from it).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Boolean(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A JSON document, as text.
    Json(String),
    /// Microseconds since 1970-01-01T00:00:00Z.
    Timestamp(i64),
}

/// A query's result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// One list of values per row, in column order.
    pub values: Vec<Vec<Value>>,
}

/// One plugin statement's result.
#[derive(Debug)]
pub enum Outcome {
    /// A query's rows.
    Rows(Rows),
    /// The number of rows a statement changed.
    Changed(u64),
}

/// What one plugin statement is run for.
#[derive(Debug, Clone)]
pub enum Work {
    /// `query`: its rows, within a [`ResultLimit`].
    Query(Vec<Value>),
    /// `execute` (one parameter list) or `execute-batch` (one or more):
    /// the statement is prepared once and run once per list, in order;
    /// the outcome is the total number of rows changed.
    Execute(Vec<Vec<Value>>),
}

impl Work {
    /// Name the failing parameter list of a batch in its error; a single
    /// `execute` keeps the driver's message as it is.
    pub fn failed_at(error: HostError, index: usize, lists: usize) -> HostError {
        if lists <= 1 {
            return error;
        }
        error.map_text(|m| format!("parameter list {index} of {lists}: {m}"))
    }
}

/// How much one plugin query may return: `limits.sql_rows` rows and
/// `limits.sql_bytes` bytes of values (text and blobs by their length,
/// every other value 8). Checked value by value, before the value is
/// copied out of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultLimit {
    /// Rows.
    pub rows: u32,
    /// Bytes of values.
    pub bytes: u64,
}

impl ResultLimit {
    /// The limits of `limits`.
    pub fn of(limits: &Limits) -> Self {
        Self {
            rows: limits.sql_rows,
            bytes: limits.sql_bytes.as_u64(),
        }
    }

    /// `limit-exceeded` for a query with more than `rows` rows.
    pub fn too_many_rows(&self) -> HostError {
        HostError::LimitExceeded(format!(
            "query returned more than {} rows (limits.sql_rows)",
            self.rows
        ))
    }

    /// Count a value of `len` bytes (`None`: a fixed-size value) into
    /// `used`; `limit-exceeded` once the query's values pass `bytes`.
    pub fn count(&self, used: &mut u64, len: Option<usize>) -> Result<(), HostError> {
        *used = used.saturating_add(len.map_or(8, |l| l as u64));
        if *used > self.bytes {
            return Err(HostError::LimitExceeded(format!(
                "query returned more than {} of values (limits.sql_bytes)",
                bytesize::ByteSize::b(self.bytes)
            )));
        }
        Ok(())
    }
}

/// The opened database.
#[derive(Clone)]
pub enum Database {
    /// The engine's SQLite file; plugin files go in `plugins_dir`.
    Sqlite {
        /// The engine's file.
        engine: Sqlite,
        /// One file per plugin.
        plugins_dir: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres(Postgres),
}

impl Database {
    /// Open the database of `config` and make it ready: for PostgreSQL,
    /// create the engine's schema and tables, the plugins' roles and
    /// schemas, and run the `init` script. Fails, saying why, if any of it
    /// fails.
    pub async fn open(config: &Config, tls: &Tls) -> anyhow::Result<Self> {
        match &config.database {
            DatabaseConfig::Sqlite { path, plugins_dir } => Ok(Self::Sqlite {
                engine: Sqlite::open(path)?,
                plugins_dir: plugins_dir.clone(),
            }),
            DatabaseConfig::Postgres { .. } => {
                Ok(Self::Postgres(Postgres::open(config, tls).await?))
            }
        }
    }

    /// Connect without preparing anything (no init script, no roles): to
    /// read the status log of a database an engine has opened.
    pub fn connect(config: &DatabaseConfig, tls: &Tls) -> anyhow::Result<Self> {
        match config {
            DatabaseConfig::Sqlite { path, plugins_dir } => Ok(Self::Sqlite {
                engine: Sqlite::open(path)?,
                plugins_dir: plugins_dir.clone(),
            }),
            DatabaseConfig::Postgres {
                url,
                schema,
                pool_size,
                ..
            } => Ok(Self::Postgres(Postgres::connect(
                url, schema, *pool_size, tls,
            )?)),
        }
    }

    /// The own database of `plugin` (granted `sql`) with its `limits`.
    pub fn plugin_db(&self, plugin: &str, limits: &Limits) -> anyhow::Result<PluginDb> {
        match self {
            Self::Sqlite { plugins_dir, .. } => Ok(PluginDb::Sqlite(Arc::new(
                sqlite::PluginDb::new(plugins_dir, plugin, limits.timeout)?,
            ))),
            Self::Postgres(pg) => Ok(PluginDb::Postgres(Arc::new(
                pg.plugin_db(plugin, limits.timeout)?,
            ))),
        }
    }
}

/// A plugin's own database.
#[derive(Clone)]
pub enum PluginDb {
    /// Its SQLite file.
    Sqlite(Arc<sqlite::PluginDb>),
    /// Its PostgreSQL schema and role.
    Postgres(Arc<postgres::PluginDb>),
    /// An external database it reads (`sql: { database }`), each statement
    /// bounded by the duration (the plugin's `limits.timeout`).
    External(Arc<external::ExternalDb>, std::time::Duration),
}

impl PluginDb {
    /// Run the plugin's init script (`plugins.grants.NAME.sql.init`) as
    /// the plugin, in one transaction; fails naming the plugin, the file
    /// and, where the database says, the line.
    pub async fn init(&self, script: &std::path::Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(script).map_err(|e| {
            anyhow::anyhow!(
                "sql.init: cannot read the init script {}: {e}",
                script.display()
            )
        })?;
        self.init_text(script, text).await
    }

    /// [`PluginDb::init`] with the script's text already read from
    /// `script` (which errors name): `sandpipe exec --sql-init` and
    /// `replay`, which keep the text with their inputs.
    pub async fn init_text(&self, script: &std::path::Path, text: String) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(db) => {
                let (db, path) = (db.clone(), script.to_owned());
                tokio::task::spawn_blocking(move || db.init(&path, &text)).await?
            }
            Self::Postgres(db) => db.init(script, &text).await,
            Self::External(..) => anyhow::bail!(
                "sql.init: {} cannot run on an external database, which is read-only",
                script.display()
            ),
        }
    }
}

/// Plugin-scoped key-value state, in the engine's database.
#[derive(Clone)]
pub struct StateStore {
    db: Database,
}

impl StateStore {
    /// The state table in `db` (created now for SQLite; PostgreSQL's was
    /// created when the database was opened).
    pub fn new(db: Database) -> anyhow::Result<Self> {
        if let Database::Sqlite { engine, .. } = &db {
            sqlite::create_state_table(engine)?;
        }
        Ok(Self { db })
    }

    /// The value of `key` for `plugin`.
    pub async fn get(&self, plugin: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match &self.db {
            Database::Sqlite { engine, .. } => sqlite::state_get(engine, plugin, key).await,
            Database::Postgres(pg) => pg.state_get(plugin, key).await,
        }
    }

    /// Apply `ops` for `plugin` atomically.
    pub async fn apply(&self, plugin: &str, ops: Vec<StateOp>) -> anyhow::Result<()> {
        match &self.db {
            Database::Sqlite { engine, .. } => sqlite::state_apply(engine, plugin, ops).await,
            Database::Postgres(pg) => pg.state_apply(plugin, ops).await,
        }
    }
}
