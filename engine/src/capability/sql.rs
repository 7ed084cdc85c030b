//! `sql`: parameterised statements in the plugin's own database, all in one
//! transaction per invocation, committed only on `done`.
//!
//! The backend decides what "own database" means: a locked-down SQLite file
//! per plugin, or a PostgreSQL schema reached only through a login role of
//! the plugin's own (see `store::database::postgres`). [`Transaction`] is
//! the same for both: the host interface and the tests drive it alike.

use serde_json::json;

use crate::capability::{Interface, journal};
use crate::config::Limits;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::sql::{Host, Rows, Value};
use crate::store::database::{
    self as store, Outcome, PluginConn, PluginDb, ResultLimit, Work, external, postgres, sqlite,
};

/// A guest's value as the store takes it.
fn store_value(value: Value) -> store::Value {
    match value {
        Value::Null => store::Value::Null,
        Value::Boolean(b) => store::Value::Boolean(b),
        Value::Int(i) => store::Value::Int(i),
        Value::Float(f) => store::Value::Float(f),
        Value::Text(t) => store::Value::Text(t),
        Value::Bytes(b) => store::Value::Bytes(b),
        Value::Json(j) => store::Value::Json(j),
        Value::Timestamp(t) => store::Value::Timestamp(t),
    }
}

/// A store's value as the guest gets it.
fn wit_value(value: store::Value) -> Value {
    match value {
        store::Value::Null => Value::Null,
        store::Value::Boolean(b) => Value::Boolean(b),
        store::Value::Int(i) => Value::Int(i),
        store::Value::Float(f) => Value::Float(f),
        store::Value::Text(t) => Value::Text(t),
        store::Value::Bytes(b) => Value::Bytes(b),
        store::Value::Json(j) => Value::Json(j),
        store::Value::Timestamp(t) => Value::Timestamp(t),
    }
}

fn store_values(values: Vec<Value>) -> Vec<store::Value> {
    values.into_iter().map(store_value).collect()
}

/// A store's rows as the guest gets them.
fn wit_rows(rows: store::Rows) -> Rows {
    Rows {
        columns: rows.columns,
        values: rows
            .values
            .into_iter()
            .map(|row| row.into_iter().map(wit_value).collect())
            .collect(),
    }
}

/// An invocation's open transaction.
pub struct Transaction {
    inner: Inner,
}

enum Inner {
    Sqlite {
        db: std::sync::Arc<sqlite::PluginDb>,
        /// `None` once a blocking task holding it failed.
        conn: Option<PluginConn>,
        /// Held until the transaction ends (also when it is dropped).
        _turn: sqlite::WriteTurn,
    },
    Postgres(postgres::PluginTx),
    /// A read-only transaction on an external database.
    External(external::ExternalTx, std::time::Duration),
}

impl Transaction {
    /// Begin a transaction in `db`.
    pub async fn begin(db: &PluginDb) -> Result<Self, WitError> {
        let inner = match db {
            PluginDb::Sqlite(db) => {
                let turn = db
                    .write_turn()
                    .await
                    .map_err(|e| WitError::Unavailable(format!("{e:#}")))?;
                let db2 = db.clone();
                let conn = tokio::task::spawn_blocking(move || db2.begin())
                    .await
                    .map_err(|e| WitError::Internal(e.to_string()))?
                    .map_err(|e| WitError::Unavailable(format!("{e:#}")))?;
                Inner::Sqlite {
                    db: db.clone(),
                    conn: Some(conn),
                    _turn: turn,
                }
            }
            PluginDb::Postgres(db) => Inner::Postgres(db.begin().await.map_err(WitError::from)?),
            PluginDb::External(db, timeout) => {
                Inner::External(db.begin(*timeout).await.map_err(WitError::from)?, *timeout)
            }
        };
        Ok(Self { inner })
    }

    /// Run one statement: rows for a query (within `limit`, else
    /// `limit-exceeded`), else the number of rows changed.
    pub async fn run(
        &mut self,
        statement: String,
        work: Work,
        limit: ResultLimit,
    ) -> Result<Outcome, WitError> {
        match &mut self.inner {
            Inner::Sqlite { conn, .. } => {
                let Some(c) = conn.take() else {
                    return Err(WitError::Internal(
                        "the transaction was lost after a failed statement".into(),
                    ));
                };
                let (c, result) = tokio::task::spawn_blocking(move || {
                    let result = sqlite::run(&c, &statement, work, limit);
                    (c, result)
                })
                .await
                .map_err(|e| WitError::Internal(e.to_string()))?;
                *conn = Some(c);
                result.map_err(WitError::from)
            }
            Inner::Postgres(tx) => tx.run(statement, work, limit).await.map_err(WitError::from),
            Inner::External(tx, timeout) => tx
                .run(&statement, work, limit, *timeout)
                .await
                .map_err(WitError::from),
        }
    }

    /// Run a query and return its rows (at most `max_rows`, and the default
    /// `limits.sql_bytes`).
    pub async fn query(
        &mut self,
        statement: &str,
        params: Vec<Value>,
        max_rows: u32,
    ) -> Result<Rows, WitError> {
        let limit = ResultLimit {
            rows: max_rows,
            ..ResultLimit::of(&Limits::default())
        };
        match self
            .run(
                statement.to_owned(),
                Work::Query(store_values(params)),
                limit,
            )
            .await?
        {
            Outcome::Rows(rows) => Ok(wit_rows(rows)),
            Outcome::Changed(_) => Err(WitError::Internal("expected rows".into())),
        }
    }

    /// Run a statement and return the number of rows it changed.
    pub async fn execute(&mut self, statement: &str, params: Vec<Value>) -> Result<u64, WitError> {
        let limit = ResultLimit::of(&Limits::default());
        match self
            .run(
                statement.to_owned(),
                Work::Execute(vec![store_values(params)]),
                limit,
            )
            .await?
        {
            Outcome::Changed(n) => Ok(n),
            Outcome::Rows(_) => Err(WitError::Internal("expected a row count".into())),
        }
    }

    /// Commit the transaction.
    pub async fn commit(self) -> anyhow::Result<()> {
        match self.inner {
            Inner::Sqlite { db, conn, _turn } => {
                let Some(conn) = conn else {
                    anyhow::bail!("the transaction was lost after a failed statement");
                };
                tokio::task::spawn_blocking(move || db.commit(conn)).await?
            }
            Inner::Postgres(tx) => tx.commit().await,
            // Read-only: nothing to commit.
            Inner::External(tx, _) => {
                tx.finish().await;
                Ok(())
            }
        }
    }

    /// Run the engine's `call` in the transaction, then commit: both or
    /// neither. PostgreSQL only (a SQLite plugin's file is its own).
    pub async fn commit_with(self, call: postgres::EngineCall) -> anyhow::Result<()> {
        match self.inner {
            Inner::Postgres(tx) => tx.commit_with(call).await,
            Inner::Sqlite { .. } | Inner::External(..) => {
                anyhow::bail!(
                    "the engine's statement runs only in a PostgreSQL plugin's transaction"
                )
            }
        }
    }

    /// Bound an external database's statements by the invocation's
    /// `deadline` too (the other backends have their own).
    pub fn set_deadline(&mut self, deadline: std::time::Instant) {
        if let Inner::External(tx, _) = &mut self.inner {
            tx.set_deadline(deadline);
        }
    }

    /// Whether this is a PostgreSQL transaction.
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, Inner::Postgres(_))
    }

    /// Roll back the transaction.
    pub async fn rollback(self) {
        match self.inner {
            Inner::Sqlite { db, conn, _turn } => {
                if let Some(conn) = conn {
                    let _ = tokio::task::spawn_blocking(move || db.rollback(conn)).await;
                }
            }
            Inner::Postgres(tx) => tx.rollback().await,
            Inner::External(tx, _) => tx.finish().await,
        }
    }
}

impl InvocationState {
    async fn sql(
        &mut self,
        function: &str,
        statement: String,
        work: Work,
    ) -> Result<Outcome, WitError> {
        self.host.enter(Interface::Sql, function)?;
        let plugin = self.host.plugin.clone();
        let Some(db) = plugin.db.as_ref() else {
            return Err(WitError::Unavailable(
                "the plugin's database is not open".into(),
            ));
        };
        if self.host.effects.sql.is_none() {
            let tx = match self.host.effects.sql_early.take() {
                Some(early) => early
                    .await
                    .map_err(|e| WitError::Internal(format!("beginning the transaction: {e}")))??,
                None => {
                    let mut tx = Transaction::begin(db).await?;
                    tx.set_deadline(self.host.deadline);
                    tx
                }
            };
            self.host.effects.sql = Some(tx);
        }
        let Some(tx) = self.host.effects.sql.as_mut() else {
            return Err(WitError::Internal("no transaction".into()));
        };
        let result = tx
            .run(statement, work, ResultLimit::of(&plugin.limits))
            .await;
        match result {
            // The database's policy (SQLite's authorizer, PostgreSQL's
            // transaction control) refused it: a denial like any other.
            Err(WitError::AccessDenied(message)) => Err(self.host.deny(message)),
            Err(WitError::LimitExceeded(message)) => {
                for key in ["sql_rows", "sql_bytes"] {
                    if message.ends_with(&format!("(limits.{key})")) {
                        self.host.count_limit(key);
                    }
                }
                Err(WitError::LimitExceeded(message))
            }
            other => other,
        }
    }
}

impl Host for InvocationState {
    async fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Rows, WitError> {
        let call = self.host.journal_call(
            Interface::Sql,
            "query",
            || json!({ "statement": statement, "params": journal::sql_params(&params) }),
        );
        let result = match self
            .sql("query", statement, Work::Query(store_values(params)))
            .await
        {
            Ok(Outcome::Rows(rows)) => Ok(wit_rows(rows)),
            Ok(Outcome::Changed(_)) => Err(WitError::Internal("expected rows".into())),
            Err(e) => Err(e),
        };
        self.host.journal_result(call, &result, journal::sql_rows);
        result
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, WitError> {
        let call = self.host.journal_call(
            Interface::Sql,
            "execute",
            || json!({ "statement": statement, "params": journal::sql_params(&params) }),
        );
        let result = self
            .changes(
                "execute",
                statement,
                Work::Execute(vec![store_values(params)]),
            )
            .await;
        self.host
            .journal_result(call, &result, |n| json!({ "changed": n }));
        result
    }

    async fn execute_batch(
        &mut self,
        statement: String,
        batch: Vec<Vec<Value>>,
    ) -> Result<u64, WitError> {
        let call = self.host.journal_call(
            Interface::Sql,
            "execute-batch",
            || json!({ "statement": statement, "batch": journal::sql_batch(&batch) }),
        );
        let result = self
            .changes(
                "execute-batch",
                statement,
                Work::Execute(batch.into_iter().map(store_values).collect()),
            )
            .await;
        self.host
            .journal_result(call, &result, |n| json!({ "changed": n }));
        result
    }
}

impl InvocationState {
    /// `execute` and `execute-batch`: the number of rows changed.
    async fn changes(
        &mut self,
        function: &str,
        statement: String,
        work: Work,
    ) -> Result<u64, WitError> {
        match self.sql(function, statement, work).await? {
            Outcome::Changed(n) => Ok(n),
            Outcome::Rows(_) => Err(WitError::Internal("expected a row count".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn sqlite_db(dir: &std::path::Path, timeout: Duration) -> PluginDb {
        PluginDb::Sqlite(Arc::new(
            sqlite::PluginDb::new(dir, "p", timeout).expect("plugin database"),
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_transactions_of_one_plugin_take_turns_and_all_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(sqlite_db(dir.path(), Duration::from_secs(30)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16i64 {
            let db = db.clone();
            tasks.spawn(async move {
                let mut tx = Transaction::begin(&db).await?;
                tx.execute("CREATE TABLE IF NOT EXISTS t(x INTEGER)", Vec::new())
                    .await?;
                tx.execute("INSERT INTO t(x) VALUES ($1)", vec![Value::Int(i)])
                    .await?;
                tx.commit()
                    .await
                    .map_err(|e| WitError::Internal(e.to_string()))
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("task").expect("transaction");
        }
        let mut tx = Transaction::begin(&db).await.expect("begin");
        let rows = tx
            .query("SELECT count(*) FROM t", Vec::new(), 10)
            .await
            .expect("count");
        assert!(matches!(rows.values[0][0], Value::Int(16)));
        tx.rollback().await;
    }

    #[tokio::test]
    async fn a_transaction_waits_its_turn_at_most_the_timeout_and_a_dropped_one_frees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sqlite_db(dir.path(), Duration::from_millis(200));
        let first = Transaction::begin(&db).await.expect("first");
        let err = Transaction::begin(&db).await.err();
        assert!(
            matches!(&err, Some(WitError::Unavailable(m)) if m.contains("plugin `p`'s database stayed busy")),
            "{err:?}"
        );
        // Dropped without commit or rollback (an invocation that vanished):
        // its turn and its transaction end with it.
        drop(first);
        let next = Transaction::begin(&db)
            .await
            .expect("the turn is free again");
        next.rollback().await;
    }
}
