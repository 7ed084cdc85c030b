//! The embedded database (SQLite): the engine's own file (status log and
//! plugin state) and one file per plugin for its `sql` capability.
//!
//! A plugin's connection is locked down: no ATTACH (so no other file, and no
//! `VACUUM INTO`), no transaction control (the engine owns the transaction),
//! no pragmas that change anything, no virtual tables, no extensions, and a
//! progress handler that interrupts a statement past its deadline.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OptionalExtension as _};

/// A SQLite connection used from async code through `spawn_blocking`.
#[derive(Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Open (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Run `f` on the connection on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("database connection poisoned"))?;
            f(&mut conn)
        })
        .await
        .context("database task failed")?
    }

    /// Run `f` synchronously (start-up and tests).
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("database connection poisoned"))?;
        f(&mut conn)
    }
}

/// Plugin-scoped key-value state, in the engine's database.
#[derive(Clone)]
pub struct StateStore {
    db: Sqlite,
}

impl StateStore {
    /// The state table in `db`.
    pub fn new(db: Sqlite) -> anyhow::Result<Self> {
        db.call_blocking(|c| {
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS plugin_state (
                    plugin TEXT NOT NULL,
                    key TEXT NOT NULL,
                    value BLOB NOT NULL,
                    PRIMARY KEY (plugin, key)
                ) WITHOUT ROWID;",
            )?;
            Ok(())
        })?;
        Ok(Self { db })
    }

    /// The value of `key` for `plugin`.
    pub async fn get(&self, plugin: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        self.db
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT value FROM plugin_state WHERE plugin = ?1 AND key = ?2",
                    (&plugin, &key),
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await
    }

    /// Apply `ops` for `plugin` atomically.
    pub async fn apply(
        &self,
        plugin: &str,
        ops: Vec<crate::capability::StateOp>,
    ) -> anyhow::Result<()> {
        use crate::capability::StateOp;
        let plugin = plugin.to_owned();
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                for op in ops {
                    match op {
                        StateOp::Set(k, v) => tx.execute(
                            "INSERT INTO plugin_state (plugin, key, value) VALUES (?1, ?2, ?3)
                             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
                            (&plugin, &k, &v),
                        )?,
                        StateOp::Delete(k) => tx.execute(
                            "DELETE FROM plugin_state WHERE plugin = ?1 AND key = ?2",
                            (&plugin, &k),
                        )?,
                    };
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }
}

/// A plugin's own database file, with a small pool of locked-down
/// connections.
pub struct PluginDb {
    path: PathBuf,
    plugin: String,
    timeout: Duration,
    pool: Mutex<Vec<PluginConn>>,
}

/// A locked-down connection to a plugin's database.
pub struct PluginConn {
    /// The connection.
    pub conn: Connection,
    engine_mode: Arc<AtomicBool>,
    deadline_ms: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl PluginConn {
    /// Run engine-issued SQL (transaction control) past the authorizer.
    pub fn engine(&self, sql: &str) -> rusqlite::Result<()> {
        self.engine_mode.store(true, Ordering::SeqCst);
        let result = self.conn.execute_batch(sql);
        self.engine_mode.store(false, Ordering::SeqCst);
        result
    }

    /// Statements from now on are interrupted after `timeout`.
    pub fn arm_deadline(&self, timeout: Duration) {
        self.deadline_ms
            .store(now_ms() + timeout.as_millis() as u64, Ordering::SeqCst);
    }
}

impl PluginDb {
    /// The database of `plugin` in `dir`; statements time out after `timeout`.
    pub fn new(dir: &Path, plugin: &str, timeout: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            path: dir.join(format!("{plugin}.sqlite")),
            plugin: plugin.to_owned(),
            timeout,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> anyhow::Result<PluginConn> {
        let mut conn = Connection::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        conn.busy_timeout(self.timeout)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // No other database file can ever be reached from this connection.
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, 64 << 20)?;
        conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, 1 << 20)?;
        let engine_mode = Arc::new(AtomicBool::new(false));
        let deadline_ms = Arc::new(AtomicU64::new(u64::MAX));
        {
            let engine_mode = engine_mode.clone();
            conn.authorizer(Some(move |ctx: AuthContext<'_>| {
                authorize(&ctx.action, engine_mode.load(Ordering::SeqCst))
            }))?;
        }
        {
            let deadline_ms = deadline_ms.clone();
            conn.progress_handler(
                10_000,
                Some(move || now_ms() > deadline_ms.load(Ordering::SeqCst)),
            )?;
        }
        Ok(PluginConn {
            conn,
            engine_mode,
            deadline_ms,
        })
    }

    /// A connection inside a fresh `BEGIN IMMEDIATE` transaction (blocking).
    pub fn begin(&self) -> anyhow::Result<PluginConn> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        let conn = match pooled {
            Some(c) => c,
            None => self.open()?,
        };
        conn.arm_deadline(self.timeout);
        conn.engine("BEGIN IMMEDIATE")
            .with_context(|| format!("cannot begin a transaction in {}", self.path.display()))?;
        Ok(conn)
    }

    /// Commit and return the connection to the pool (blocking).
    pub fn commit(&self, conn: PluginConn) -> anyhow::Result<()> {
        conn.arm_deadline(self.timeout);
        conn.engine("COMMIT")
            .with_context(|| format!("cannot commit plugin `{}`'s transaction", self.plugin))?;
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < 8
        {
            pool.push(conn);
        }
        Ok(())
    }

    /// Roll back and return the connection to the pool (blocking).
    pub fn rollback(&self, conn: PluginConn) {
        conn.arm_deadline(self.timeout);
        if conn.engine("ROLLBACK").is_ok()
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < 8
        {
            pool.push(conn);
        }
    }
}

/// The policy for plugin SQL.
fn authorize(action: &AuthAction<'_>, engine_mode: bool) -> Authorization {
    match action {
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } if engine_mode => {
            Authorization::Allow
        }
        AuthAction::Attach { .. }
        | AuthAction::Detach { .. }
        | AuthAction::Transaction { .. }
        | AuthAction::Savepoint { .. }
        | AuthAction::CreateVtable { .. }
        | AuthAction::DropVtable { .. } => Authorization::Deny,
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            const READ_ONLY: [&str; 6] = [
                "table_info",
                "table_xinfo",
                "index_list",
                "index_info",
                "foreign_key_list",
                "user_version",
            ];
            if pragma_value.is_none()
                && READ_ONLY.contains(&pragma_name.to_ascii_lowercase().as_str())
            {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Function { function_name } => {
            let name = function_name.to_ascii_lowercase();
            if name == "load_extension"
                || name.starts_with("readfile")
                || name.starts_with("writefile")
            {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        _ => Authorization::Allow,
    }
}
