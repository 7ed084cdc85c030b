//! The fake host's SQL database: an in-memory SQLite that answers the
//! plugin like the engine's SQLite plugin databases do (same SQLite, same
//! parameter binding, same value mapping, same lock-down while the plugin
//! runs, same error kinds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::Connection;
use rusqlite::hooks::AuthContext;
use rusqlite::types::{Value as SqlValue, ValueRef};

use super::SqlAnswer;
use crate::Error;
use crate::sql::{Rows, Value};

/// An in-memory SQLite connection; plugin statements are checked by the
/// engine's policy while `plugin_mode` is on.
pub(super) struct Database {
    conn: Connection,
    plugin_mode: Arc<AtomicBool>,
}

impl Database {
    /// A fresh, empty database.
    pub(super) fn open() -> rusqlite::Result<Self> {
        let mut conn = Connection::open_in_memory()?;
        let plugin_mode = Arc::new(AtomicBool::new(false));
        let mode = plugin_mode.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            if mode.load(Ordering::SeqCst) {
                sandpipe_sqlite_policy::authorize(&ctx.action, false)
            } else {
                rusqlite::hooks::Authorization::Allow
            }
        }))?;
        Ok(Self { conn, plugin_mode })
    }

    /// The connection (for setup and inspection: not locked down).
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Run a plugin's init script as the engine runs
    /// `plugins.grants.NAME.sql.init` at start: every statement in one
    /// transaction, under the plugin policy; nothing of it is kept if a
    /// statement fails.
    pub(super) fn init(&self, script: &str) -> rusqlite::Result<()> {
        self.begin()?;
        if let Err(e) = self.conn.execute_batch(script) {
            let _ = self.end(false);
            return Err(e);
        }
        self.end(true)
    }

    /// Open the invocation's transaction and lock the connection down.
    pub(super) fn begin(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.plugin_mode.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Unlock, then commit (`true`) or roll back the transaction.
    pub(super) fn end(&self, commit: bool) -> rusqlite::Result<()> {
        self.plugin_mode.store(false, Ordering::SeqCst);
        if commit {
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
            Ok(())
        } else {
            self.conn.execute_batch("ROLLBACK")
        }
    }

    /// Run one statement: rows for a query, else the number of rows
    /// changed. `$1, $2, ...` bind in order, as in the engine.
    pub(super) fn run(
        &self,
        statement: &str,
        params: &[Value],
        query: bool,
    ) -> Result<SqlAnswer, Error> {
        run(&self.conn, statement, params, query)
    }
}

impl Database {
    /// Run one statement once per parameter list, as the engine's
    /// `execute-batch` does: prepared once, stopped at the first failure,
    /// whose message names the list.
    pub(super) fn run_batch(
        &self,
        statement: &str,
        batch: &[Vec<Value>],
    ) -> Result<SqlAnswer, Error> {
        let mut stmt = self.conn.prepare(statement).map_err(sql_error)?;
        let mut changed = 0;
        for (index, params) in batch.iter().enumerate() {
            let params = rusqlite::params_from_iter(params.iter().cloned().map(to_sql));
            changed += stmt.execute(params).map_err(|e| {
                let e = sql_error(e);
                if batch.len() <= 1 {
                    return e;
                }
                e.map_message(|m| format!("parameter list {index} of {}: {m}", batch.len()))
            })? as u64;
        }
        Ok(SqlAnswer::Changed(changed))
    }
}

/// See [`Database::run`]; also used for inspection queries.
pub(super) fn run(
    conn: &Connection,
    statement: &str,
    params: &[Value],
    query: bool,
) -> Result<SqlAnswer, Error> {
    let mut stmt = conn.prepare(statement).map_err(sql_error)?;
    let params = rusqlite::params_from_iter(params.iter().cloned().map(to_sql));
    if !query {
        return stmt
            .execute(params)
            .map(|n| SqlAnswer::Changed(n as u64))
            .map_err(sql_error);
    }
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let width = columns.len();
    let mut rows = stmt.query(params).map_err(sql_error)?;
    let mut values = Vec::new();
    while let Some(row) = rows.next().map_err(sql_error)? {
        let mut out = Vec::with_capacity(width);
        for i in 0..width {
            out.push(from_sql(row.get_ref(i).map_err(sql_error)?));
        }
        values.push(out);
    }
    Ok(SqlAnswer::Rows(Rows { columns, values }))
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

/// The engine's error kinds for SQLite errors.
fn sql_error(err: rusqlite::Error) -> Error {
    match &err {
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::AuthorizationForStatementDenied =>
        {
            Error::access_denied(format!("statement not allowed in a plugin database: {err}"))
        }
        _ if err.to_string().starts_with("not authorized") => {
            Error::access_denied(format!("statement not allowed in a plugin database: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Error::unavailable(err.to_string())
        }
        _ => Error::invalid(err.to_string()),
    }
}
