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
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::AuthorizationForStatementDenied =>
        {
            WitError::AccessDenied(format!("statement not allowed in a plugin database: {err}"))
        }
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
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

fn run(
    conn: &PluginConn,
    statement: &str,
    params: Vec<Value>,
    query: bool,
    max_rows: u32,
) -> Result<Outcome, WitError> {
    let mut stmt = conn.conn.prepare(statement).map_err(sql_error)?;
    let params = rusqlite::params_from_iter(params.into_iter().map(to_sql));
    if !query {
        return stmt
            .execute(params)
            .map(|n| Outcome::Changed(n as u64))
            .map_err(sql_error);
    }
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
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
    async fn sql(
        &mut self,
        function: &str,
        statement: String,
        params: Vec<Value>,
        query: bool,
    ) -> Result<Outcome, WitError> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn open(timeout: Duration) -> (tempfile::TempDir, Arc<PluginDb>, PluginConn) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(PluginDb::new(dir.path(), "p", timeout).expect("db"));
        let conn = db.begin().expect("begin");
        (dir, db, conn)
    }

    fn exec(conn: &PluginConn, sql: &str) -> Result<u64, WitError> {
        match run(conn, sql, Vec::new(), false, 100)? {
            Outcome::Changed(n) => Ok(n),
            Outcome::Rows(_) => Ok(0),
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
            vec![
                Value::Int(7),
                Value::Text("x".into()),
                Value::Bytes(vec![1, 2]),
                Value::Float(0.5),
            ],
            false,
            100,
        );
        assert!(matches!(n, Ok(Outcome::Changed(1))));
        let rows = run(&conn, "SELECT a, b, c, d FROM t", Vec::new(), true, 100);
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
        let result = run(&conn, endless, Vec::new(), true, 100);
        assert!(
            matches!(result, Err(WitError::LimitExceeded(_))),
            "{:?}",
            result.err()
        );
        conn.arm_deadline(Duration::from_secs(5));
        let many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) SELECT x FROM c";
        let result = run(&conn, many, Vec::new(), true, 100);
        assert!(
            matches!(&result, Err(WitError::LimitExceeded(m)) if m.contains("more than 100 rows")),
            "{:?}",
            result.err()
        );
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
        let Ok(Outcome::Rows(rows)) = run(&conn, "SELECT count(*) FROM t", Vec::new(), true, 10)
        else {
            panic!("query failed")
        };
        assert!(matches!(rows.values[0][0], Value::Int(0)));
    }
}
