//! External databases (`databases:`): a system of record a component reads
//! through its `sql` grant (`sql: { database: NAME }`), typically a source
//! paging through tables. The engine connects with the configured user and
//! the password from `secrets:` (the guest never sees either). Three
//! layers keep it read-only:
//!
//! - the login may not be a superuser (PostgreSQL: `rolsuper`, or a
//!   member of `pg_read_server_files`, `pg_write_server_files`,
//!   `pg_execute_server_program`; MySQL: `ALL PRIVILEGES`, `SUPER` or
//!   `FILE` on `*.*`): checked on the first use, refused with the reason;
//! - a statement must be a query (its first word `SELECT`, `WITH`,
//!   `VALUES`, `TABLE`, `SHOW`, `EXPLAIN`, `DESCRIBE`/`DESC`; on MySQL no
//!   executable comment `/*! ... */`): no `COMMIT` can end the read-only
//!   transaction, no `SET` can change it;
//! - every invocation's statements run in a read-only transaction (`START
//!   TRANSACTION READ ONLY` / `BEGIN READ ONLY`): the server refuses a
//!   write that a query hides (`WITH ... DELETE`, `EXPLAIN ANALYZE`).
//!
//! Grant the login `SELECT` only as well. The `sql` limits apply
//! (`limits.sql_rows`, `limits.sql_bytes`, checked value by value as rows
//! arrive), and every statement ends at the invocation's deadline: on
//! PostgreSQL the transaction's `statement_timeout`, on MySQL a `KILL` of
//! the statement's connection; a connection whose statement ran past it
//! is closed, never given back to the pool.
//!
//! MySQL and MariaDB (mysql_async, rustls; statements use `?`
//! placeholders, bound in order) and PostgreSQL (tokio-postgres with the
//! engine's TLS; `$1, $2, ...`, typed as for a plugin's own database:
//! `postgres::run_plain`).

use std::time::Duration;

use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable as _;

use super::{Outcome, ResultLimit, Rows, Value, Work, postgres};
use crate::config::{ExternalDatabase, ExternalKind};
use crate::error::HostError;
use crate::tls::Tls;

/// The character set number of binary strings (`BINARY`, `BLOB`).
const BINARY_CHARSET: u16 = 63;

/// An external database's pool.
pub struct ExternalDb {
    name: String,
    pool: Pool,
    /// Whether the login may be used: decided on first use (a check that
    /// failed for want of the server is tried again).
    login: tokio::sync::Mutex<Option<Result<(), String>>>,
}

/// The first words a statement on an external database may start with.
pub const QUERIES: [&str; 8] = [
    "select", "with", "values", "table", "show", "explain", "describe", "desc",
];

/// Why `statement` may not run on external database `name` (of `kind`),
/// or `None` when it is a query. The first word is read the way
/// PostgreSQL reads comments; MySQL reads them otherwise (`/* */` does not
/// nest, `#` starts one, `/*!` runs its content), so on MySQL a statement
/// with `/*` or `#` is refused whole.
pub fn not_a_query(name: &str, kind: ExternalKind, statement: &str) -> Option<HostError> {
    let refuse = |why: String| {
        Some(HostError::AccessDenied(format!(
            "database `{name}` is read-only: {why}"
        )))
    };
    if kind == ExternalKind::Mysql && (statement.contains("/*") || statement.contains('#')) {
        return refuse(
            "on MySQL a statement may hold no `/* */` or `#` comment (nor a `#` anywhere: write it in a parameter)".into(),
        );
    }
    let first = postgres::leading_keywords(statement, 1);
    match first.first() {
        Some(word) if QUERIES.contains(&word.as_str()) => None,
        other => refuse(format!(
            "it takes queries only (SELECT, WITH, VALUES, TABLE, SHOW, EXPLAIN, DESCRIBE), not `{}`",
            other.map_or("(nothing)", String::as_str)
        )),
    }
}

enum Pool {
    Mysql(mysql_async::Pool, mysql_async::Opts),
    Postgres(deadpool_postgres::Pool, crate::tls::postgres::PgTls),
}

/// An invocation's read-only transaction on one connection.
pub struct ExternalTx {
    conn: Conn,
    name: String,
    kind: ExternalKind,
    /// How to end a statement still running when the connection is given
    /// up: a MySQL `KILL` from a connection of its own, a PostgreSQL
    /// cancel request.
    stop: Stop,
    /// Whether a statement is running now (then dropping the transaction
    /// ends it on the server).
    running: bool,
    /// The invocation's deadline, when the host set one.
    deadline: Option<std::time::Instant>,
}

enum Stop {
    Mysql(mysql_async::Opts),
    Postgres(crate::tls::postgres::PgTls),
}

enum Conn {
    Mysql(mysql_async::Conn),
    Postgres(Box<deadpool_postgres::Object>),
    /// Given up after a statement ran past its deadline (the connection
    /// is closed, not given back).
    Lost,
}

impl Drop for ExternalTx {
    fn drop(&mut self) {
        // Dropped in its transaction (the invocation ended, or was given
        // up mid-statement): end what runs, and never give a PostgreSQL
        // connection back to the pool this way.
        self.give_up();
    }
}

fn mysql_error(name: &str, e: &mysql_async::Error) -> HostError {
    match e {
        mysql_async::Error::Server(s) => HostError::Invalid(format!(
            "database `{name}`: {} ({}, SQLSTATE {})",
            s.message, s.code, s.state
        )),
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => {
            HostError::Unavailable(format!("database `{name}`: {e}"))
        }
        _ => HostError::Internal(format!("database `{name}`: {e}")),
    }
}

impl ExternalDb {
    /// The pool of `databases.NAME` (`config`), logging in with
    /// `password` (the secret's value). Connects lazily.
    pub fn new(
        name: &str,
        config: &ExternalDatabase,
        password: Option<&str>,
        tls: &Tls,
    ) -> anyhow::Result<Self> {
        let pool = match config.kind {
            ExternalKind::Mysql => {
                let opts = mysql_async::Opts::from_url(&config.url)
                    .map_err(|e| anyhow::anyhow!("databases.{name}.url is not a MySQL URL: {e}"))?;
                let constraints = mysql_async::PoolConstraints::new(0, config.pool_size)
                    .ok_or_else(|| anyhow::anyhow!("databases.{name}.pool_size is invalid"))?;
                let mut builder = mysql_async::OptsBuilder::from_opts(opts)
                    .pool_opts(mysql_async::PoolOpts::default().with_constraints(constraints))
                    .wait_timeout(Some(600));
                if let Some(password) = password {
                    builder = builder.pass(Some(password));
                }
                let opts = mysql_async::Opts::from(builder);
                Pool::Mysql(mysql_async::Pool::new(opts.clone()), opts)
            }
            ExternalKind::Postgres => {
                let (pool, tls) =
                    postgres::external_pool(&config.url, password, config.pool_size, tls)
                        .map_err(|e| anyhow::anyhow!("databases.{name}.url: {e:#}"))?;
                Pool::Postgres(pool, tls)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            pool,
            login: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether the login may be used: `Ok(Ok)`, `Ok(Err(why))` when it has
    /// privileges beyond reading (a superuser, a role that is one, server
    /// files, or on MySQL any role or server-wide grant), `Err` when the
    /// check could not run.
    async fn check_login(&self, conn: &mut Conn) -> Result<Result<(), String>, HostError> {
        let name = &self.name;
        let bad = |why: &str| {
            Ok(Err(format!(
                "database `{name}`: its login {why}; an external database is read-only and needs a login with SELECT only"
            )))
        };
        match conn {
            Conn::Mysql(conn) => {
                let grants: Vec<String> = conn
                    .query("SHOW GRANTS")
                    .await
                    .map_err(|e| mysql_error(name, &e))?;
                for grant in grants {
                    let upper = grant.to_ascii_uppercase();
                    if !upper.starts_with("GRANT ") || !upper.contains(" ON ") {
                        // A role granted (or a default role set): its
                        // privileges do not show here.
                        return bad(&format!("has a role (`{grant}`)"));
                    }
                    if upper.contains(" ON *.* ")
                        && (upper.contains("ALL PRIVILEGES")
                            || upper.contains("SUPER")
                            || upper.contains(" FILE"))
                    {
                        return bad(&format!("has server-wide privileges (`{grant}`)"));
                    }
                }
                Ok(Ok(()))
            }
            Conn::Postgres(client) => {
                let row = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_roles r
                             WHERE (r.rolsuper OR r.rolname IN ('pg_read_server_files',
                                 'pg_write_server_files', 'pg_execute_server_program'))
                               AND pg_has_role(current_user, r.oid, 'MEMBER'))",
                        &[],
                    )
                    .await
                    .map_err(|e| {
                        HostError::Unavailable(format!(
                            "database `{name}`: {}",
                            postgres::describe(&e)
                        ))
                    })?;
                if row.get::<_, bool>(0) {
                    return bad(
                        "is (or may become) a superuser, or reads, writes or runs the server's files",
                    );
                }
                Ok(Ok(()))
            }
            Conn::Lost => Ok(Ok(())),
        }
    }

    /// A connection in a read-only transaction, waiting at most `timeout`
    /// (also each statement's limit).
    pub async fn begin(&self, timeout: Duration) -> Result<ExternalTx, HostError> {
        let name = &self.name;
        let millis = timeout.as_millis().max(1);
        let connect = async {
            let mut conn = match &self.pool {
                Pool::Mysql(pool, _) => {
                    Conn::Mysql(pool.get_conn().await.map_err(|e| mysql_error(name, &e))?)
                }
                Pool::Postgres(pool, _) => {
                    Conn::Postgres(Box::new(pool.get().await.map_err(|e| {
                        HostError::Unavailable(format!("database `{name}`: {e}"))
                    })?))
                }
            };
            {
                let mut login = self.login.lock().await;
                if login.is_none() {
                    // A definite answer is kept; a failed check is not.
                    *login = Some(self.check_login(&mut conn).await?);
                }
                if let Some(Err(why)) = login.as_ref() {
                    return Err(HostError::AccessDenied(why.clone()));
                }
            }
            match &mut conn {
                Conn::Mysql(c) => {
                    // Read-only for the session too: were the transaction
                    // ended, what follows is still refused.
                    for statement in [
                        "SET SESSION TRANSACTION READ ONLY",
                        "START TRANSACTION READ ONLY",
                    ] {
                        c.query_drop(statement)
                            .await
                            .map_err(|e| mysql_error(name, &e))?;
                    }
                }
                Conn::Postgres(c) => c
                    .batch_execute(&format!(
                        "BEGIN READ ONLY; SET LOCAL statement_timeout = {millis}"
                    ))
                    .await
                    .map_err(|e| {
                        HostError::Unavailable(format!(
                            "database `{name}`: {}",
                            postgres::describe(&e)
                        ))
                    })?,
                Conn::Lost => {}
            }
            Ok::<_, HostError>(conn)
        };
        let conn = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            HostError::Unavailable(format!(
                "database `{name}`: no connection within {timeout:?}"
            ))
        })??;
        let (kind, stop) = match &self.pool {
            Pool::Mysql(_, opts) => (ExternalKind::Mysql, Stop::Mysql(opts.clone())),
            Pool::Postgres(_, tls) => (ExternalKind::Postgres, Stop::Postgres(tls.clone())),
        };
        Ok(ExternalTx {
            conn,
            name: name.clone(),
            kind,
            stop,
            running: false,
            deadline: None,
        })
    }
}

/// A parameter as MySQL takes it.
fn param(value: Value) -> mysql_async::Value {
    use mysql_async::Value as M;
    match value {
        Value::Null => M::NULL,
        Value::Boolean(b) => M::Int(i64::from(b)),
        Value::Int(i) => M::Int(i),
        Value::Float(f) => M::Double(f),
        Value::Text(t) | Value::Json(t) => M::Bytes(t.into_bytes()),
        Value::Bytes(b) => M::Bytes(b),
        Value::Timestamp(micros) => {
            match chrono::DateTime::from_timestamp_micros(micros).map(|d| d.naive_utc()) {
                Some(d) => {
                    use chrono::{Datelike as _, Timelike as _};
                    M::Date(
                        u16::try_from(d.year()).unwrap_or_default(),
                        d.month() as u8,
                        d.day() as u8,
                        d.hour() as u8,
                        d.minute() as u8,
                        d.second() as u8,
                        d.nanosecond() / 1000,
                    )
                }
                None => M::NULL,
            }
        }
    }
}

/// A result value as the sql interface gives it, by its column's type,
/// with the bytes it counts in `limits.sql_bytes` (`None`: fixed-size).
fn cell(value: mysql_async::Value, column: &mysql_async::Column) -> (Value, Option<usize>) {
    use mysql_async::Value as M;
    match value {
        M::NULL => (Value::Null, None),
        M::Int(i) => (Value::Int(i), None),
        M::UInt(u) => match i64::try_from(u) {
            Ok(i) => (Value::Int(i), None),
            Err(_) => (Value::Text(u.to_string()), None),
        },
        M::Float(f) => (Value::Float(f64::from(f)), None),
        M::Double(d) => (Value::Float(d), None),
        M::Bytes(bytes) => {
            let len = Some(bytes.len());
            let binary = column.character_set() == BINARY_CHARSET
                && !matches!(
                    column.column_type(),
                    ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL
                );
            if column.column_type() == ColumnType::MYSQL_TYPE_JSON {
                (
                    Value::Json(String::from_utf8_lossy(&bytes).into_owned()),
                    len,
                )
            } else if binary && !column.flags().contains(ColumnFlags::ENUM_FLAG) {
                (Value::Bytes(bytes), len)
            } else {
                (
                    Value::Text(String::from_utf8_lossy(&bytes).into_owned()),
                    len,
                )
            }
        }
        M::Date(y, mo, d, h, mi, s, us) => {
            if column.column_type() == ColumnType::MYSQL_TYPE_DATE {
                return (Value::Text(format!("{y:04}-{mo:02}-{d:02}")), None);
            }
            let at = chrono::NaiveDate::from_ymd_opt(i32::from(y), u32::from(mo), u32::from(d))
                .and_then(|date| {
                    date.and_hms_micro_opt(u32::from(h), u32::from(mi), u32::from(s), us)
                });
            match at {
                Some(at) => (Value::Timestamp(at.and_utc().timestamp_micros()), None),
                // MySQL's zero date.
                None => (Value::Null, None),
            }
        }
        M::Time(negative, days, h, mi, s, us) => {
            let hours = u64::from(days) * 24 + u64::from(h);
            let sign = if negative { "-" } else { "" };
            (
                Value::Text(format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}")),
                None,
            )
        }
    }
}

impl ExternalTx {
    /// Bound every statement from now on by the invocation's `deadline`
    /// too.
    pub fn set_deadline(&mut self, deadline: std::time::Instant) {
        self.deadline = Some(deadline);
    }

    /// Give the connection up: a statement still running is ended on the
    /// server (MySQL: `KILL` from a connection of its own; PostgreSQL: a
    /// cancel request) and the connection is closed, not pooled.
    fn give_up(&mut self) {
        let running = std::mem::take(&mut self.running);
        match std::mem::replace(&mut self.conn, Conn::Lost) {
            Conn::Postgres(object) => {
                if running && let Stop::Postgres(tls) = &self.stop {
                    let token = object.cancel_token();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _ = token.cancel_query(tls).await;
                    });
                }
                drop(deadpool_postgres::Object::take(*object));
            }
            Conn::Mysql(conn) => {
                if running && let Stop::Mysql(opts) = &self.stop {
                    let id = conn.id();
                    let opts = opts.clone();
                    tokio::spawn(async move {
                        let kill = async {
                            let mut killer = mysql_async::Conn::new(opts).await?;
                            killer.query_drop(format!("KILL {id}")).await?;
                            killer.disconnect().await
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(10), kill).await;
                        drop(conn);
                    });
                }
            }
            Conn::Lost => {}
        }
    }

    /// Run one statement (rows within `limit`; changes are refused by the
    /// server: the transaction is read-only), waiting at most `timeout`
    /// and never past the invocation's deadline.
    pub async fn run(
        &mut self,
        statement: &str,
        work: Work,
        limit: ResultLimit,
        timeout: Duration,
    ) -> Result<Outcome, HostError> {
        if let Some(refused) = not_a_query(&self.name, self.kind, statement) {
            return Err(refused);
        }
        let timeout = match self.deadline {
            Some(deadline) => {
                timeout.min(deadline.saturating_duration_since(std::time::Instant::now()))
            }
            None => timeout,
        };
        let name = self.name.clone();
        self.running = true;
        let run = async {
            match &mut self.conn {
                Conn::Mysql(conn) => mysql_run(conn, &name, statement, work, limit).await,
                Conn::Postgres(client) => postgres::run_plain(client, statement, work, limit)
                    .await
                    .map_err(|e| e.map_text(|m| format!("database `{name}`: {m}"))),
                Conn::Lost => Err(HostError::Unavailable(format!(
                    "database `{name}`: the connection was given up after a statement ran past its deadline"
                ))),
            }
        };
        let result = tokio::time::timeout(timeout, run).await;
        match result {
            Ok(result) => {
                self.running = false;
                result
            }
            Err(_) => {
                // Still running on the server: end it, close the
                // connection.
                self.give_up();
                Err(HostError::Unavailable(format!(
                    "database `{}`: the statement ran past the invocation's deadline ({timeout:?})",
                    self.name
                )))
            }
        }
    }

    /// End the transaction (read-only: nothing to commit) and give the
    /// connection back (closed instead if it does not end in time).
    pub async fn finish(mut self) {
        let wait = Duration::from_secs(5);
        let ended = match &mut self.conn {
            Conn::Mysql(conn) => {
                matches!(
                    tokio::time::timeout(wait, conn.query_drop("ROLLBACK")).await,
                    Ok(Ok(()))
                )
            }
            Conn::Postgres(client) => matches!(
                tokio::time::timeout(wait, client.batch_execute("ROLLBACK")).await,
                Ok(Ok(()))
            ),
            Conn::Lost => true,
        };
        if ended {
            // Back to its pool (MySQL's resets it; PostgreSQL's cleans it).
            if let Conn::Postgres(object) = std::mem::replace(&mut self.conn, Conn::Lost) {
                drop(object);
            } else if let Conn::Mysql(conn) = std::mem::replace(&mut self.conn, Conn::Lost) {
                drop(conn);
            }
        } else {
            self.running = true;
            self.give_up();
        }
    }
}

/// One statement on a MySQL connection.
async fn mysql_run(
    conn: &mut mysql_async::Conn,
    name: &str,
    statement: &str,
    work: Work,
    limit: ResultLimit,
) -> Result<Outcome, HostError> {
    match work {
        Work::Execute(batch) => {
            let mut changed = 0;
            let lists = batch.len();
            for (index, params) in batch.into_iter().enumerate() {
                let params: Vec<mysql_async::Value> = params.into_iter().map(param).collect();
                conn.exec_drop(statement, params)
                    .await
                    .map_err(|e| Work::failed_at(mysql_error(name, &e), index, lists))?;
                changed += conn.affected_rows();
            }
            Ok(Outcome::Changed(changed))
        }
        Work::Query(params) => {
            let params: Vec<mysql_async::Value> = params.into_iter().map(param).collect();
            let mut result = conn
                .exec_iter(statement, params)
                .await
                .map_err(|e| mysql_error(name, &e))?;
            let columns: Vec<mysql_async::Column> =
                result.columns().map(|c| c.to_vec()).unwrap_or_default();
            let names = columns.iter().map(|c| c.name_str().into_owned()).collect();
            let mut values = Vec::new();
            let mut bytes = 0;
            while let Some(mut row) = result.next().await.map_err(|e| mysql_error(name, &e))? {
                if values.len() as u64 >= u64::from(limit.rows) {
                    // The rest of the result is drained when the
                    // connection is next used or given back.
                    return Err(limit.too_many_rows());
                }
                let mut out = Vec::with_capacity(columns.len());
                for (i, column) in columns.iter().enumerate() {
                    let raw = row.take(i).unwrap_or(mysql_async::Value::NULL);
                    let (value, len) = cell(raw, column);
                    limit.count(&mut bytes, len)?;
                    out.push(value);
                }
                values.push(out);
            }
            Ok(Outcome::Rows(Rows {
                columns: names,
                values,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_queries_run_on_an_external_database() {
        for ok in [
            "SELECT 1",
            "  -- a comment\n select * from t",
            "/* c */ WITH x AS (SELECT 1) SELECT * FROM x",
            "VALUES (1)",
            "TABLE t",
            "show tables",
            "EXPLAIN SELECT 1",
            "DESC t",
        ] {
            assert!(
                not_a_query("db", ExternalKind::Postgres, ok).is_none(),
                "{ok}"
            );
        }
        for refused in [
            "COMMIT",
            "commit; delete from t",
            "DELETE FROM t",
            "SET TRANSACTION READ WRITE",
            "set autocommit = 1",
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "XA START 'x'",
            "LOCK TABLES t WRITE",
            "(SELECT 1)",
            "",
        ] {
            let why = not_a_query("db", ExternalKind::Postgres, refused).unwrap();
            assert!(
                why.to_string().contains("database `db` is read-only"),
                "{refused}: {why}"
            );
        }
        // MySQL reads comments otherwise than PostgreSQL: refused whole.
        for refused in [
            "SELECT 1 /*!, SLEEP(9) */",
            "/* /* */ COMMIT -- */ SELECT 1",
            "SELECT 1 # ; COMMIT",
        ] {
            let why = not_a_query("db", ExternalKind::Mysql, refused).unwrap();
            assert!(
                why.to_string().contains("no `/* */` or `#` comment"),
                "{refused}: {why}"
            );
        }
        assert!(not_a_query("db", ExternalKind::Mysql, "SELECT a -- the a\nFROM t").is_none());
    }
}
