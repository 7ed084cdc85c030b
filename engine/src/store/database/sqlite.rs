//! SQLite: the engine's own file (status log and plugin state) and one file
//! per plugin for its `sql` capability.
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
use rusqlite::hooks::AuthContext;
use rusqlite::limits::Limit;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension as _};

use super::{Outcome, ResultLimit, Work};
use super::{Rows, Value};
use crate::capability::StateOp;
use crate::error::HostError;

/// A SQLite database used from async code through `spawn_blocking`: one
/// connection for writes (and reads inside them), and one for reads alone,
/// so that a read never waits behind a write's commit (WAL readers do not
/// block on the writer).
#[derive(Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

/// Lock one of the database's connections.
fn lock(conn: &Mutex<Connection>) -> anyhow::Result<std::sync::MutexGuard<'_, Connection>> {
    conn.lock()
        .map_err(|_| anyhow::anyhow!("database connection poisoned"))
}

impl Sqlite {
    /// Open (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let open = || -> anyhow::Result<Connection> {
            let conn = Connection::open(path)
                .with_context(|| format!("cannot open database {}", path.display()))?;
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            Ok(conn)
        };
        let conn = open()?;
        let reader = open()?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Run the short read-only `f` on the reading connection, right here
    /// on the calling thread: an indexed lookup takes microseconds, less
    /// than handing it to a blocking thread and back. It sees what is
    /// committed, without waiting for a commit in progress.
    pub fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let conn = lock(&self.reader)?;
        f(&conn)
    }

    /// Run the read-only `f` on the reading connection on a blocking
    /// thread: it sees what is committed, without waiting for a commit in
    /// progress.
    pub async fn read<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lock(&conn)?;
            f(&conn)
        })
        .await
        .context("database task failed")?
    }

    /// Run `f` on the connection on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&conn)?;
            f(&mut conn)
        })
        .await
        .context("database task failed")?
    }

    /// Run `f` on the connection right here (start-up, tests, the status
    /// log's writer thread).
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut conn = lock(&self.conn)?;
        f(&mut conn)
    }
}

/// Create the plugin state table (see [`super::StateStore`]).
pub(super) fn create_state_table(db: &Sqlite) -> anyhow::Result<()> {
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
    })
}

/// The state value of `key` for `plugin`.
pub(super) async fn state_get(
    db: &Sqlite,
    plugin: &str,
    key: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let (plugin, key) = (plugin.to_owned(), key.to_owned());
    db.call(move |c| {
        Ok(c.query_row(
            "SELECT value FROM plugin_state WHERE plugin = ?1 AND key = ?2",
            (&plugin, &key),
            |r| r.get(0),
        )
        .optional()?)
    })
    .await
}

/// Apply state changes for `plugin` in one transaction.
pub(super) async fn state_apply(
    db: &Sqlite,
    plugin: &str,
    ops: Vec<StateOp>,
) -> anyhow::Result<()> {
    let plugin = plugin.to_owned();
    db.call(move |c| {
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

/// How long a plugin's init script may run.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(300);

/// A plugin's own database file, with a small pool of locked-down
/// connections.
pub struct PluginDb {
    path: PathBuf,
    plugin: String,
    timeout: Duration,
    pool: Mutex<Vec<PluginConn>>,
    /// SQLite has one writer at a time, and a transaction that finds the
    /// file locked sleeps in SQLite's busy handler (1, 2, 5, … 100 ms
    /// steps) long after the lock is free. Invocations in this process
    /// queue here instead, first come first served, and are woken the
    /// moment the last transaction ends; the busy handler is left for other
    /// processes on the same file.
    writer: Arc<tokio::sync::Semaphore>,
}

/// The right to write a plugin's database, from `BEGIN` to its end.
pub struct WriteTurn(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

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
            writer: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// Wait for this process's turn to write (see `writer`), at most the
    /// statement timeout.
    pub async fn write_turn(&self) -> anyhow::Result<WriteTurn> {
        match tokio::time::timeout(self.timeout, self.writer.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(WriteTurn(permit)),
            Ok(Err(_)) => anyhow::bail!("plugin `{}`'s database is closed", self.plugin),
            Err(_) => anyhow::bail!(
                "plugin `{}`'s database stayed busy with other messages' transactions for {:?}",
                self.plugin,
                self.timeout
            ),
        }
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
                sandpipe_sqlite_policy::authorize(&ctx.action, engine_mode.load(Ordering::SeqCst))
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

    /// Run the init script `text` (from `script`) in one transaction, under
    /// the plugin policy (blocking).
    pub fn init(&self, script: &Path, text: &str) -> anyhow::Result<()> {
        let conn = self.begin()?;
        conn.arm_deadline(INIT_TIMEOUT);
        if let Err(e) = conn.conn.execute_batch(text) {
            self.rollback(conn);
            let (at, e) = init_error(text, &e);
            anyhow::bail!(
                "sql.init: plugin `{}`'s init script {} failed{at}: {e}",
                self.plugin,
                script.display()
            );
        }
        self.commit(conn)
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

/// Where in an init script `text` SQLite stopped (` at line N`, when it
/// says: a syntax error, an unknown table or column) and its message
/// without the rest of the script, which rusqlite quotes.
fn init_error(text: &str, e: &rusqlite::Error) -> (String, String) {
    if let rusqlite::Error::SqlInputError {
        msg, sql, offset, ..
    } = e
        && let Ok(offset) = usize::try_from(*offset)
        && let Some(rest) = text.len().checked_sub(sql.len())
        && text.as_bytes().ends_with(sql.as_bytes())
    {
        let at = (rest + offset).min(text.len());
        let line = text.as_bytes()[..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        return (format!(" at line {line}"), msg.clone());
    }
    (String::new(), e.to_string())
}

fn to_sql(value: Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Boolean(b) => SqlValue::Integer(i64::from(b)),
        Value::Int(i) | Value::Timestamp(i) => SqlValue::Integer(i),
        Value::Float(f) => SqlValue::Real(f),
        Value::Text(s) | Value::Json(s) => SqlValue::Text(s),
        Value::Bytes(b) => SqlValue::Blob(b),
    }
}

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

fn sql_error(err: rusqlite::Error) -> HostError {
    match &err {
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::AuthorizationForStatementDenied =>
        {
            HostError::AccessDenied(format!("statement not allowed in a plugin database: {err}"))
        }
        // A function the authorizer refuses is reported as a plain error.
        _ if err.to_string().starts_with("not authorized") => {
            HostError::AccessDenied(format!("statement not allowed in a plugin database: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            HostError::LimitExceeded(format!("statement interrupted at its deadline: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            HostError::Unavailable(err.to_string())
        }
        _ => HostError::Invalid(err.to_string()),
    }
}

/// Run one plugin statement on `conn` (blocking): rows for a query (at most
/// `limit`), else the number of rows changed.
pub fn run(
    conn: &PluginConn,
    statement: &str,
    work: Work,
    limit: ResultLimit,
) -> Result<Outcome, HostError> {
    let mut stmt = conn.conn.prepare(statement).map_err(sql_error)?;
    let params = match work {
        Work::Query(params) => params,
        Work::Execute(batch) => {
            let lists = batch.len();
            let mut changed = 0u64;
            for (index, params) in batch.into_iter().enumerate() {
                let params = rusqlite::params_from_iter(params.into_iter().map(to_sql));
                changed += stmt
                    .execute(params)
                    .map_err(|e| Work::failed_at(sql_error(e), index, lists))?
                    as u64;
            }
            return Ok(Outcome::Changed(changed));
        }
    };
    let params = rusqlite::params_from_iter(params.into_iter().map(to_sql));
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let width = columns.len();
    let mut rows = stmt.query(params).map_err(sql_error)?;
    let mut values = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next().map_err(sql_error)? {
        if values.len() >= limit.rows as usize {
            return Err(limit.too_many_rows());
        }
        let mut out = Vec::with_capacity(width);
        for i in 0..width {
            let value = row.get_ref(i).map_err(sql_error)?;
            let len = match value {
                ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.len()),
                _ => None,
            };
            // Counted before it is copied out of SQLite.
            limit.count(&mut bytes, len)?;
            out.push(from_sql(value));
        }
        values.push(out);
    }
    Ok(Outcome::Rows(Rows { columns, values }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rows(rows: u32) -> ResultLimit {
        ResultLimit {
            rows,
            bytes: 1 << 20,
        }
    }

    fn open(timeout: Duration) -> (tempfile::TempDir, Arc<PluginDb>, PluginConn) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(PluginDb::new(dir.path(), "p", timeout).expect("db"));
        let conn = db.begin().expect("begin");
        (dir, db, conn)
    }

    fn exec(conn: &PluginConn, sql: &str) -> Result<u64, HostError> {
        match run(conn, sql, Work::Execute(vec![Vec::new()]), rows(100))? {
            Outcome::Changed(n) => Ok(n),
            Outcome::Rows(_) => Ok(0),
        }
    }

    #[test]
    fn a_batch_runs_once_per_list_and_names_the_list_that_fails() {
        let (_dir, _db, conn) = open(Duration::from_secs(5));
        exec(
            &conn,
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        )
        .expect("create");
        let list = |id: i64, name: Option<&str>| {
            vec![
                Value::Int(id),
                name.map_or(Value::Null, |n| Value::Text(n.into())),
            ]
        };
        let insert = "INSERT INTO t (id, name) VALUES (?1, ?2)";
        let batch = vec![list(1, Some("a")), list(2, Some("b")), list(3, Some("c"))];
        match run(&conn, insert, Work::Execute(batch), rows(10)) {
            Ok(Outcome::Changed(n)) => assert_eq!(n, 3),
            other => panic!("{other:?}"),
        }
        let batch = vec![list(4, Some("d")), list(5, None), list(6, Some("f"))];
        match run(&conn, insert, Work::Execute(batch), rows(10)) {
            Err(HostError::Invalid(m)) => {
                assert!(m.starts_with("parameter list 1 of 3: "), "{m}");
                assert!(m.contains("NOT NULL"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // The lists before the failing one stay applied; the rest never ran.
        match run(
            &conn,
            "SELECT id FROM t ORDER BY id",
            Work::Query(Vec::new()),
            rows(10),
        ) {
            Ok(Outcome::Rows(r)) => {
                let ids: Vec<_> = r
                    .values
                    .iter()
                    .map(|row| match row[0] {
                        Value::Int(id) => id,
                        _ => -1,
                    })
                    .collect();
                assert_eq!(ids, [1, 2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plugin_sql_cannot_reach_other_files_or_the_transaction() {
        let (dir, _db, conn) = open(Duration::from_secs(5));
        let outside = dir.path().join("outside.sqlite");
        let attack = [
            format!("ATTACH DATABASE '{}' AS other", outside.display()),
            format!("VACUUM INTO '{}'", outside.display()),
            "PRAGMA journal_mode = DELETE".to_owned(),
            "PRAGMA writable_schema = ON".to_owned(),
            "PRAGMA user_version = 3".to_owned(),
            "COMMIT".to_owned(),
            "ROLLBACK".to_owned(),
            "SAVEPOINT s".to_owned(),
            "SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')".to_owned(),
            "CREATE TABLE a(x); CREATE TABLE b(x)".to_owned(),
        ];
        for sql in &attack {
            assert!(exec(&conn, sql).is_err(), "{sql} was allowed");
        }
        assert!(
            !outside.exists(),
            "a file outside the plugin's database was written"
        );
        // Ordinary work still goes through, with typed parameters.
        exec(&conn, "CREATE TABLE t (a INTEGER, b TEXT, c BLOB, d REAL)").expect("create");
        let n = run(
            &conn,
            "INSERT INTO t VALUES ($1, $2, $3, $4)",
            Work::Execute(vec![vec![
                Value::Int(7),
                Value::Text("x".into()),
                Value::Bytes(vec![1, 2]),
                Value::Float(0.5),
            ]]),
            rows(100),
        );
        assert!(matches!(n, Ok(Outcome::Changed(1))));
        // Introspection pragmas read, so they are allowed, argument and all.
        let columns = run(
            &conn,
            "PRAGMA table_info(t)",
            Work::Query(Vec::new()),
            rows(100),
        );
        assert!(
            matches!(&columns, Ok(Outcome::Rows(r)) if r.values.len() == 4),
            "{:?}",
            columns.err()
        );
        let rows = run(
            &conn,
            "SELECT a, b, c, d FROM t",
            Work::Query(Vec::new()),
            rows(100),
        );
        let Ok(Outcome::Rows(rows)) = rows else {
            panic!("query failed")
        };
        assert_eq!(rows.columns, vec!["a", "b", "c", "d"]);
        assert!(matches!(rows.values[0][0], Value::Int(7)));
        assert!(matches!(&rows.values[0][2], Value::Bytes(b) if b == &[1, 2]));
    }

    #[test]
    fn runaway_queries_and_huge_results_are_limited() {
        let (_dir, _db, conn) = open(Duration::from_millis(200));
        let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
        let result = run(&conn, endless, Work::Query(Vec::new()), rows(100));
        assert!(
            matches!(result, Err(HostError::LimitExceeded(_))),
            "{:?}",
            result.err()
        );
        conn.arm_deadline(Duration::from_secs(5));
        let many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) SELECT x FROM c";
        let result = run(&conn, many, Work::Query(Vec::new()), rows(100));
        assert!(
            matches!(&result, Err(HostError::LimitExceeded(m)) if m.contains("more than 100 rows (limits.sql_rows)")),
            "{:?}",
            result.err()
        );
        // Few rows, but more bytes than allowed: refused before the value
        // is copied out of SQLite.
        let wide = "SELECT zeroblob(2000000)";
        let result = run(&conn, wide, Work::Query(Vec::new()), rows(100));
        assert!(
            matches!(&result, Err(HostError::LimitExceeded(m)) if m.contains("more than 1.0 MiB of values (limits.sql_bytes)")),
            "{:?}",
            result.err()
        );
        let under = run(
            &conn,
            "SELECT zeroblob(1000000)",
            Work::Query(Vec::new()),
            rows(100),
        );
        assert!(under.is_ok(), "{:?}", under.err());
    }

    #[test]
    fn rolled_back_work_is_gone_and_committed_work_stays() {
        let (_dir, db, conn) = open(Duration::from_secs(5));
        exec(&conn, "CREATE TABLE t (x)").expect("create");
        db.commit(conn).expect("commit");
        let conn = db.begin().expect("begin");
        exec(&conn, "INSERT INTO t VALUES (1)").expect("insert");
        db.rollback(conn);
        let conn = db.begin().expect("begin");
        let Ok(Outcome::Rows(rows)) = run(
            &conn,
            "SELECT count(*) FROM t",
            Work::Query(Vec::new()),
            rows(10),
        ) else {
            panic!("query failed")
        };
        assert!(matches!(rows.values[0][0], Value::Int(0)));
    }
}
