//! `sql`: parameterised statements in the plugin's own database, all in one
//! transaction per invocation, committed only on `done`.

use std::sync::Arc;

use rusqlite::types::{Value as SqlValue, ValueRef};

use crate::capability::Interface;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::sql::{Host, Rows, Value};
use crate::store::database::{PluginConn, PluginDb};

/// An invocation's open transaction.
pub struct Transaction {
    db: Arc<PluginDb>,
    conn: Option<PluginConn>,
}

impl Transaction {
    /// Commit the transaction.
    pub async fn commit(mut self) -> anyhow::Result<()> {
        let Some(conn) = self.conn.take() else {
            anyhow::bail!("the transaction was lost after a failed statement");
        };
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.commit(conn)).await?
    }

    /// Roll back the transaction.
    pub async fn rollback(mut self) {
        if let Some(conn) = self.conn.take() {
            let db = self.db.clone();
            let _ = tokio::task::spawn_blocking(move || db.rollback(conn)).await;
        }
    }
}

/// One statement's result.
enum Outcome {
    Rows(Rows),
    Changed(u64),
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

fn sql_error(err: rusqlite::Error) -> WitError {
    match &err {
        rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::AuthorizationForStatementDenied => {
            WitError::AccessDenied(format!("statement not allowed in a plugin database: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::OperationInterrupted => {
            WitError::LimitExceeded(format!("statement interrupted at its deadline: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            WitError::Unavailable(err.to_string())
        }
        _ => WitError::Invalid(err.to_string()),
    }
}

fn run(conn: &PluginConn, statement: &str, params: Vec<Value>, query: bool, max_rows: u32) -> Result<Outcome, WitError> {
    let mut stmt = conn.conn.prepare(statement).map_err(sql_error)?;
    let params = rusqlite::params_from_iter(params.into_iter().map(to_sql));
    if !query {
        return stmt.execute(params).map(|n| Outcome::Changed(n as u64)).map_err(sql_error);
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let width = columns.len();
    let mut rows = stmt.query(params).map_err(sql_error)?;
    let mut values = Vec::new();
    while let Some(row) = rows.next().map_err(sql_error)? {
        if values.len() >= max_rows as usize {
            return Err(WitError::LimitExceeded(format!(
                "query returned more than {max_rows} rows"
            )));
        }
        let mut out = Vec::with_capacity(width);
        for i in 0..width {
            out.push(from_sql(row.get_ref(i).map_err(sql_error)?));
        }
        values.push(out);
    }
    Ok(Outcome::Rows(Rows { columns, values }))
}

impl InvocationState {
    async fn sql(&mut self, function: &str, statement: String, params: Vec<Value>, query: bool) -> Result<Outcome, WitError> {
        self.host.enter(Interface::Sql, function)?;
        let plugin = self.host.plugin.clone();
        let db = plugin
            .db
            .clone()
            .ok_or_else(|| WitError::Unavailable("the plugin's database is not open".into()))?;
        let conn = match self.host.effects.sql.as_mut().and_then(|t| t.conn.take()) {
            Some(conn) => conn,
            None => {
                let db2 = db.clone();
                tokio::task::spawn_blocking(move || db2.begin())
                    .await
                    .map_err(|e| WitError::Internal(e.to_string()))?
                    .map_err(|e| WitError::Unavailable(format!("{e:#}")))?
            }
        };
        let max_rows = plugin.limits.sql_rows;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = run(&conn, &statement, params, query, max_rows);
            (conn, result)
        })
        .await
        .map_err(|e| WitError::Internal(e.to_string()))?;
        self.host.effects.sql = Some(Transaction {
            db,
            conn: Some(conn),
        });
        result
    }
}

impl Host for InvocationState {
    async fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Rows, WitError> {
        match self.sql("query", statement, params, true).await? {
            Outcome::Rows(rows) => Ok(rows),
            Outcome::Changed(_) => Err(WitError::Internal("expected rows".into())),
        }
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, WitError> {
        match self.sql("execute", statement, params, false).await? {
            Outcome::Changed(n) => Ok(n),
            Outcome::Rows(_) => Err(WitError::Internal("expected a row count".into())),
        }
    }
}
