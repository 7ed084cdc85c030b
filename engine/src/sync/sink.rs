//! Where a source's documents go, through the engine's own code: a
//! PostgreSQL table (`id` primary key, the document as `jsonb`, a
//! full-text `search` column with a GIN index) or a table in an SQLite
//! file. Beside the documents, in the same database, the sync jobs'
//! records (`sandpipe_sync_jobs`) and each source's sync cursor
//! (`sandpipe_sync_state`), so that a batch of documents and the job's
//! counts commit together.
//!
//! Every document row carries `id_hash` (16 bytes of SHA-256 of its id) and
//! `version` (a hash of its timestamp, or of its body when it has none):
//! what the full sync's reconciliation holds in memory ([`Sink::index`]),
//! 24 bytes a document whatever the ids' length, and what it deletes by.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use sha2::Digest as _;

use super::{Counts, JobKind, JobRecord, JobState, Key, Trigger};
use crate::config::source::SinkConfig;
use crate::store::database::postgres::{Postgres, describe, quote_ident};
use crate::store::database::sqlite::Sqlite;
use crate::tls::Tls;

/// One document to add or replace.
#[derive(Debug, Clone)]
pub struct Upsert {
    /// SHA-256 of the id, first 16 bytes.
    pub key: Key,
    /// The id (at most 512 bytes: longer ones are hashed before).
    pub id: String,
    /// See the module's documentation.
    pub version: i64,
    /// The source's timestamp, if it gave one.
    pub timestamp: Option<String>,
    /// The document, a JSON object.
    pub body: String,
    /// Whether it replaces a document the sink has (for change events).
    pub update: bool,
}

/// Operations written to the sink together, in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Documents to add or replace.
    pub upserts: Vec<Upsert>,
    /// Documents to delete, by key.
    pub deletes: Vec<Key>,
    /// Bytes of the upserts' ids, timestamps and bodies.
    pub bytes: usize,
    /// What the job counted for the batch's operations (taken back when
    /// the batch is not written).
    pub pending: super::Counts,
    /// Every key an operation of the batch touches.
    keys: HashSet<Key>,
}

impl Batch {
    /// Operations in the batch.
    pub fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len()
    }

    /// Whether the batch has no operation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an operation on `key` is in the batch (a second one must
    /// wait for the next batch: one statement cannot touch a row twice).
    pub fn touches(&self, key: &Key) -> bool {
        self.keys.contains(key)
    }

    /// Add or replace a document.
    pub fn upsert(&mut self, upsert: Upsert) {
        self.keys.insert(upsert.key);
        self.bytes +=
            upsert.id.len() + upsert.timestamp.as_ref().map_or(0, String::len) + upsert.body.len();
        self.upserts.push(upsert);
    }

    /// Delete the document of `key`.
    pub fn delete(&mut self, key: Key) {
        self.keys.insert(key);
        self.deletes.push(key);
    }
}

/// A source's sink.
pub enum Sink {
    /// A PostgreSQL table.
    Postgres(PgSink),
    /// A table in an SQLite file.
    Sqlite(SqliteSink),
}

/// The PostgreSQL sink.
pub struct PgSink {
    pg: Postgres,
    schema: String,
    table: String,
}

/// The SQLite sink.
pub struct SqliteSink {
    db: Sqlite,
    path: PathBuf,
    table: String,
}

/// Held while a job runs: no other job of the same sink table starts,
/// in this process or another (PostgreSQL: a session advisory lock on a
/// connection of its own, released when it closes, by a crash too;
/// SQLite: an exclusive lock on a file beside the database).
pub enum SinkLock {
    /// The connection that holds the advisory lock.
    Postgres(tokio_postgres::Client),
    /// The locked file.
    File(std::fs::File),
}

impl SinkLock {
    /// Whether the lock is gone (its connection closed).
    pub fn lost(&self) -> bool {
        match self {
            Self::Postgres(client) => client.is_closed(),
            Self::File(_) => false,
        }
    }
}

const JOB_COLUMNS: &str = "id, source, kind, triggered_by, state, sync_cursor, indexed, updated, \
                           deleted, skipped, dropped, errors, started_ms, duration_ms, error";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn ucount(n: i64) -> u64 {
    u64::try_from(n).unwrap_or_default()
}

/// A value of a job-table statement: a parameter, or a column of a row.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    fn text(&self) -> Option<String> {
        match self {
            Self::Text(t) => Some(t.clone()),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<Option<String>> for Cell {
    fn from(text: Option<String>) -> Self {
        text.map_or(Self::Null, Self::Text)
    }
}

impl From<i64> for Cell {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

/// `sql`, written with PostgreSQL's `$1, $2, …`, as SQLite numbers its
/// parameters: `?1, ?2, …` (the job-table statements hold no `$` else).
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// A job record from its columns, in [`JOB_COLUMNS`]'s order.
fn record(row: &[Cell]) -> JobRecord {
    let int = |i: usize| row.get(i).and_then(Cell::int).unwrap_or_default();
    let text = |i: usize| row.get(i).and_then(Cell::text);
    let name = |i: usize| text(i).unwrap_or_default();
    let count = |i: usize| ucount(int(i));
    JobRecord {
        id: int(0),
        source: name(1),
        kind: JobKind::parse(&name(2)),
        trigger: Trigger::parse(&name(3)),
        state: JobState::parse(&name(4)),
        sync_cursor: text(5),
        counts: Counts {
            indexed: count(6),
            updated: count(7),
            deleted: count(8),
            skipped: count(9),
            dropped: count(10),
            errors: count(11),
        },
        started_ms: int(12),
        duration: Duration::from_millis(count(13)),
        error: text(14),
    }
}

impl Sink {
    /// The sink `config` (its defaults filled in by `Config::sink_for`),
    /// connected lazily.
    pub fn new(config: &SinkConfig, tls: &Tls) -> anyhow::Result<Self> {
        Ok(match config {
            SinkConfig::Postgres { url, schema, table } => {
                let url = url.as_deref().context("the sink has no `url`")?;
                Self::Postgres(PgSink {
                    pg: Postgres::connect(url, schema, 2, tls)?,
                    schema: schema.clone(),
                    table: table.clone().context("the sink has no `table`")?,
                })
            }
            SinkConfig::Sqlite { path, table } => Self::Sqlite(SqliteSink {
                db: Sqlite::open(path)?,
                path: path.clone(),
                table: table.clone().context("the sink has no `table`")?,
            }),
        })
    }

    /// Whether the sink is a PostgreSQL table.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Where the documents go, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(s) => format!(
                "PostgreSQL table {}.{} at {}",
                s.schema,
                s.table,
                s.pg.target()
            ),
            Self::Sqlite(s) => format!("SQLite table {} in {}", s.table, s.path.display()),
        }
    }

    /// The sink's table, qualified and quoted, for SQL.
    fn qualified(&self) -> String {
        match self {
            Self::Postgres(s) => format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.table)),
            Self::Sqlite(s) => quote_ident(&s.table),
        }
    }

    /// The table of the sink's schema named `name`, qualified and quoted.
    fn side_table(&self, name: &str) -> String {
        match self {
            Self::Postgres(s) => format!("{}.{name}", quote_ident(&s.schema)),
            Self::Sqlite(_) => name.to_owned(),
        }
    }

    /// Take the sink's job lock, or say who holds it.
    pub async fn lock(&self) -> anyhow::Result<SinkLock> {
        match self {
            Self::Postgres(s) => {
                let client = s.pg.dedicated().await?;
                let name = format!("{}.{}", s.schema, s.table);
                let row = client
                    .query_one(
                        "SELECT pg_try_advisory_lock(hashtext('sandpipe:sync'), hashtext($1))",
                        &[&name],
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", s.pg.target(), describe(&e)))?;
                if !row.get::<_, bool>(0) {
                    anyhow::bail!(
                        "another sync into {} is running (an engine holds its advisory lock)",
                        self.describe()
                    );
                }
                Ok(SinkLock::Postgres(client))
            }
            Self::Sqlite(s) => {
                let mut path = s.path.clone().into_os_string();
                path.push(format!(".{}.lock", s.table));
                let path = PathBuf::from(path);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open the lock file {}", path.display()))?;
                match file.try_lock() {
                    Ok(()) => Ok(SinkLock::File(file)),
                    Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                        "another sync into {} is running (a process holds {})",
                        self.describe(),
                        path.display()
                    ),
                    Err(std::fs::TryLockError::Error(e)) => {
                        Err(e).with_context(|| format!("cannot lock {}", path.display()))
                    }
                }
            }
        }
    }

    /// Create what is missing: the documents' table (and its search
    /// index), the job records and the sync cursors.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let docs = self.qualified();
        let jobs = self.side_table("sandpipe_sync_jobs");
        let state = self.side_table("sandpipe_sync_state");
        match self {
            Self::Postgres(s) => {
                // `sandpipe_` names are the engine's (no table has one);
                // a long table name is cut and told apart by its hash.
                let search_index = if s.table.len() <= 38 {
                    format!("sandpipe_search_{}", s.table)
                } else {
                    let hash = hex::encode(&sha2::Sha256::digest(s.table.as_bytes())[..4]);
                    format!("sandpipe_search_{}_{hash}", &s.table[..38])
                };
                let sql = format!(
                    "SELECT pg_advisory_xact_lock(hashtext('sandpipe:sync-prepare'));
                     CREATE SCHEMA IF NOT EXISTS {schema};
                     CREATE TABLE IF NOT EXISTS {docs} (
                         id text PRIMARY KEY,
                         id_hash bytea NOT NULL UNIQUE,
                         version bigint NOT NULL,
                         \"timestamp\" text,
                         body jsonb NOT NULL,
                         search tsvector GENERATED ALWAYS AS
                             (jsonb_to_tsvector('simple'::regconfig, body, '[\"string\"]')) STORED,
                         synced_at timestamptz NOT NULL DEFAULT now());
                     CREATE INDEX IF NOT EXISTS {search_index} ON {docs} USING GIN (search);
                     CREATE TABLE IF NOT EXISTS {jobs} (
                         id bigserial PRIMARY KEY, source text NOT NULL, kind text NOT NULL,
                         triggered_by text NOT NULL, state text NOT NULL, sync_cursor text,
                         indexed bigint NOT NULL DEFAULT 0, updated bigint NOT NULL DEFAULT 0,
                         deleted bigint NOT NULL DEFAULT 0, skipped bigint NOT NULL DEFAULT 0,
                         dropped bigint NOT NULL DEFAULT 0, errors bigint NOT NULL DEFAULT 0,
                         started_ms bigint NOT NULL, duration_ms bigint NOT NULL DEFAULT 0,
                         error text);
                     CREATE INDEX IF NOT EXISTS sandpipe_sync_jobs_source
                         ON {jobs} (source, id);
                     CREATE TABLE IF NOT EXISTS {state} (
                         source text PRIMARY KEY, sync_cursor text, rules_state text,
                         active_rules text, rules_errors text);",
                    schema = quote_ident(&s.schema),
                    search_index = quote_ident(&search_index),
                );
                let mut client = s.pg.client().await?;
                let tx = client.transaction().await?;
                tx.batch_execute(&sql)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", self.describe(), describe(&e)))?;
                tx.commit().await?;
                Ok(())
            }
            Self::Sqlite(s) => {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {docs} (
                         id TEXT PRIMARY KEY, id_hash BLOB NOT NULL UNIQUE,
                         version INTEGER NOT NULL, \"timestamp\" TEXT, body TEXT NOT NULL,
                         synced_ms INTEGER NOT NULL);
                     CREATE TABLE IF NOT EXISTS {jobs} (
                         id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,
                         kind TEXT NOT NULL, triggered_by TEXT NOT NULL, state TEXT NOT NULL,
                         sync_cursor TEXT, indexed INTEGER NOT NULL DEFAULT 0,
                         updated INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,
                         skipped INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
                         errors INTEGER NOT NULL DEFAULT 0, started_ms INTEGER NOT NULL,
                         duration_ms INTEGER NOT NULL DEFAULT 0, error TEXT);
                     CREATE INDEX IF NOT EXISTS sandpipe_sync_jobs_source ON {jobs} (source, id);
                     CREATE TABLE IF NOT EXISTS {state} (source TEXT PRIMARY KEY, sync_cursor TEXT,
                         rules_state TEXT, active_rules TEXT, rules_errors TEXT);"
                );
                let what = self.describe();
                s.db.call(move |conn| conn.execute_batch(&sql).with_context(|| what))
                    .await
            }
        }
    }

    /// Every document's key and version: what a full sync reconciles
    /// against. Read as a stream, never as a whole result.
    pub async fn index(&self) -> anyhow::Result<HashMap<u128, i64>> {
        let sql = format!("SELECT id_hash, version FROM {}", self.qualified());
        match self {
            Self::Postgres(s) => {
                let client = s.pg.client().await?;
                let rows = client
                    .query_raw(&sql, Vec::<String>::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", self.describe(), describe(&e)))?;
                futures::pin_mut!(rows);
                let mut index = HashMap::new();
                while let Some(row) = rows.try_next().await? {
                    let hash: &[u8] = row.get(0);
                    index.insert(key_number(hash), row.get::<_, i64>(1));
                }
                Ok(index)
            }
            Self::Sqlite(s) => {
                s.db.read(move |conn| {
                    let mut stmt = conn.prepare(&sql)?;
                    let mut rows = stmt.query([])?;
                    let mut index = HashMap::new();
                    while let Some(row) = rows.next()? {
                        let hash: Vec<u8> = row.get(0)?;
                        index.insert(key_number(&hash), row.get::<_, i64>(1)?);
                    }
                    Ok(index)
                })
                .await
            }
        }
    }

    /// Documents in the sink.
    pub async fn len(&self) -> anyhow::Result<u64> {
        let sql = format!("SELECT count(*) FROM {}", self.qualified());
        match self {
            Self::Postgres(s) => {
                let client = s.pg.client().await?;
                let row = client.query_one(&sql, &[]).await?;
                Ok(ucount(row.get::<_, i64>(0)))
            }
            Self::Sqlite(s) => {
                s.db.read(move |conn| Ok(ucount(conn.query_row(&sql, [], |r| r.get(0))?)))
                    .await
            }
        }
    }

    /// Write `batch` and `job`'s state and counts in one transaction (with
    /// the source's new sync cursor when `cursor` is given: at the end of
    /// a completed job).
    pub async fn write(
        &self,
        batch: Batch,
        job: &JobRecord,
        cursor: Option<Option<String>>,
    ) -> anyhow::Result<()> {
        let docs = self.qualified();
        let jobs = self.side_table("sandpipe_sync_jobs");
        let state = self.side_table("sandpipe_sync_state");
        let c = &job.counts;
        let counts = [
            count(c.indexed),
            count(c.updated),
            count(c.deleted),
            count(c.skipped),
            count(c.dropped),
            count(c.errors),
        ];
        let duration = i64::try_from(job.duration.as_millis()).unwrap_or(i64::MAX);
        match self {
            Self::Postgres(s) => {
                let mut client = s.pg.client().await?;
                let tx = client.transaction().await?;
                let fail = |e: tokio_postgres::Error| {
                    anyhow::anyhow!("{}: {}", self.describe(), describe(&e))
                };
                if !batch.upserts.is_empty() {
                    let ids: Vec<&str> = batch.upserts.iter().map(|u| u.id.as_str()).collect();
                    let keys: Vec<&[u8]> = batch.upserts.iter().map(|u| &u.key[..]).collect();
                    let versions: Vec<i64> = batch.upserts.iter().map(|u| u.version).collect();
                    let stamps: Vec<Option<&str>> = batch
                        .upserts
                        .iter()
                        .map(|u| u.timestamp.as_deref())
                        .collect();
                    let bodies: Vec<&str> = batch.upserts.iter().map(|u| u.body.as_str()).collect();
                    let sql = format!(
                        "INSERT INTO {docs} (id, id_hash, version, \"timestamp\", body)
                         SELECT u.id, u.h, u.v, u.ts, u.b::jsonb
                         FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::text[], $5::text[])
                             AS u(id, h, v, ts, b)
                         ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                             \"timestamp\" = excluded.\"timestamp\", body = excluded.body,
                             synced_at = now()"
                    );
                    tx.execute(&sql, &[&ids, &keys, &versions, &stamps, &bodies])
                        .await
                        .map_err(fail)?;
                }
                if !batch.deletes.is_empty() {
                    let keys: Vec<&[u8]> = batch.deletes.iter().map(|k| &k[..]).collect();
                    let sql = format!("DELETE FROM {docs} WHERE id_hash = ANY($1::bytea[])");
                    tx.execute(&sql, &[&keys]).await.map_err(fail)?;
                }
                let sql = format!(
                    "UPDATE {jobs} SET state = CASE WHEN state = 'canceling' AND $2 = 'in_progress'
                             THEN state ELSE $2 END,
                         sync_cursor = $3, indexed = $4, updated = $5,
                         deleted = $6, skipped = $7, dropped = $8, errors = $9,
                         duration_ms = $10, error = $11
                     WHERE id = $1"
                );
                let [indexed, updated, deleted, skipped, dropped, errors] = counts;
                tx.execute(
                    &sql,
                    &[
                        &job.id,
                        &job.state.as_str(),
                        &job.sync_cursor,
                        &indexed,
                        &updated,
                        &deleted,
                        &skipped,
                        &dropped,
                        &errors,
                        &duration,
                        &job.error,
                    ],
                )
                .await
                .map_err(fail)?;
                if let Some(cursor) = cursor {
                    let sql = format!(
                        "INSERT INTO {state} (source, sync_cursor) VALUES ($1, $2)
                         ON CONFLICT (source) DO UPDATE SET sync_cursor = excluded.sync_cursor"
                    );
                    tx.execute(&sql, &[&job.source, &cursor])
                        .await
                        .map_err(fail)?;
                }
                tx.commit().await.map_err(fail)?;
                Ok(())
            }
            Self::Sqlite(s) => {
                let job = job.clone();
                let what = self.describe();
                s.db.call(move |conn| {
                    let tx = conn.transaction()?;
                    {
                        let now = now_ms();
                        let mut upsert = tx.prepare_cached(&format!(
                            "INSERT INTO {docs} (id, id_hash, version, \"timestamp\", body, synced_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                             ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                                 \"timestamp\" = excluded.\"timestamp\", body = excluded.body,
                                 synced_ms = excluded.synced_ms"
                        ))?;
                        for u in &batch.upserts {
                            upsert.execute(rusqlite::params![
                                u.id,
                                &u.key[..],
                                u.version,
                                u.timestamp,
                                u.body,
                                now
                            ])?;
                        }
                        let mut delete =
                            tx.prepare_cached(&format!("DELETE FROM {docs} WHERE id_hash = ?1"))?;
                        for key in &batch.deletes {
                            delete.execute([&key[..]])?;
                        }
                        let [indexed, updated, deleted, skipped, dropped, errors] = counts;
                        tx.execute(
                            &format!(
                                "UPDATE {jobs} SET state = CASE WHEN state = 'canceling' AND ?2 = 'in_progress'
                                         THEN state ELSE ?2 END,
                                     sync_cursor = ?3, indexed = ?4,
                                     updated = ?5, deleted = ?6, skipped = ?7, dropped = ?8,
                                     errors = ?9, duration_ms = ?10, error = ?11
                                 WHERE id = ?1"
                            ),
                            rusqlite::params![
                                job.id,
                                job.state.as_str(),
                                job.sync_cursor,
                                indexed,
                                updated,
                                deleted,
                                skipped,
                                dropped,
                                errors,
                                duration,
                                job.error
                            ],
                        )?;
                        if let Some(cursor) = cursor {
                            tx.execute(
                                &format!(
                                    "INSERT INTO {state} (source, sync_cursor) VALUES (?1, ?2)
                                     ON CONFLICT (source) DO UPDATE SET sync_cursor = excluded.sync_cursor"
                                ),
                                rusqlite::params![job.source, cursor],
                            )?;
                        }
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await
                .with_context(|| what)
            }
        }
    }

    /// Run the statement `sql` (PostgreSQL's placeholders) on the sink's
    /// database with `args`: its rows.
    async fn query(&self, sql: String, args: Vec<Cell>) -> anyhow::Result<Vec<Vec<Cell>>> {
        match self {
            Self::Postgres(s) => {
                let client = s.pg.client().await?;
                let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = args
                    .into_iter()
                    .map(|a| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match a {
                            Cell::Null => Box::new(None::<String>),
                            Cell::Int(i) => Box::new(i),
                            Cell::Text(t) => Box::new(t),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let rows = client
                    .query(&sql, &refs)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", self.describe(), describe(&e)))?;
                let cells = |row: &tokio_postgres::Row| -> anyhow::Result<Vec<Cell>> {
                    use tokio_postgres::types::Type;
                    (0..row.len())
                        .map(|i| {
                            let ty = row.columns()[i].type_();
                            Ok(if *ty == Type::INT8 {
                                row.try_get::<_, Option<i64>>(i)?
                                    .map_or(Cell::Null, Cell::Int)
                            } else {
                                row.try_get::<_, Option<String>>(i)?.into()
                            })
                        })
                        .collect()
                };
                rows.iter().map(cells).collect()
            }
            Self::Sqlite(s) => {
                let sql = sqlite_placeholders(&sql);
                s.db.call(move |conn| {
                    use rusqlite::types::{Value, ValueRef};
                    let args: Vec<Value> = args
                        .into_iter()
                        .map(|a| match a {
                            Cell::Null => Value::Null,
                            Cell::Int(i) => Value::Integer(i),
                            Cell::Text(t) => Value::Text(t),
                        })
                        .collect();
                    let mut stmt = conn.prepare_cached(&sql)?;
                    let columns = stmt.column_count();
                    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
                    let mut out = Vec::new();
                    while let Some(row) = rows.next()? {
                        let mut cells = Vec::with_capacity(columns);
                        for i in 0..columns {
                            cells.push(match row.get_ref(i)? {
                                ValueRef::Integer(i) => Cell::Int(i),
                                ValueRef::Text(t) => {
                                    Cell::Text(String::from_utf8_lossy(t).into_owned())
                                }
                                _ => Cell::Null,
                            });
                        }
                        out.push(cells);
                    }
                    Ok(out)
                })
                .await
            }
        }
    }

    /// The first row of [`Sink::query`], if any.
    async fn query_one(&self, sql: String, args: Vec<Cell>) -> anyhow::Result<Option<Vec<Cell>>> {
        Ok(self.query(sql, args).await?.into_iter().next())
    }

    /// Mark the jobs of `source` left `in_progress` or `canceling` by an
    /// engine that stopped (the caller holds the lock, so none runs) as
    /// failed; how many there were.
    pub async fn close_interrupted(&self, source: &str) -> anyhow::Result<u64> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        let why = "interrupted: the engine running it stopped; the next job starts over";
        let sql = format!(
            "UPDATE {jobs} SET state = 'error', error = $2
             WHERE source = $1 AND state IN ('pending', 'in_progress', 'canceling')
             RETURNING id"
        );
        Ok(self
            .query(sql, vec![source.into(), why.into()])
            .await?
            .len() as u64)
    }

    /// Record a new job (its `id` is set).
    pub async fn start_job(&self, job: &mut JobRecord) -> anyhow::Result<()> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        job.started_ms = now_ms();
        let sql = format!(
            "INSERT INTO {jobs} (source, kind, triggered_by, state, started_ms)
             VALUES ($1, $2, $3, $4, $5) RETURNING id"
        );
        let args = vec![
            job.source.as_str().into(),
            job.kind.as_str().into(),
            job.trigger.as_str().into(),
            job.state.as_str().into(),
            job.started_ms.into(),
        ];
        let row = self.query_one(sql, args).await?;
        job.id = row
            .and_then(|r| r.first().and_then(Cell::int))
            .context("the job table gave the new job no id")?;
        Ok(())
    }

    /// Record the validation of `source`'s sync rules: `state` (`valid`
    /// or `invalid`), the rules that became active (a valid draft), or the
    /// errors (the active rules stay what they were).
    pub async fn set_rules(
        &self,
        source: &str,
        state: &str,
        active: Option<String>,
        errors: Option<String>,
    ) -> anyhow::Result<()> {
        let table = self.side_table("sandpipe_sync_state");
        let sql = format!(
            "INSERT INTO {table} (source, rules_state, active_rules, rules_errors)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (source) DO UPDATE SET rules_state = excluded.rules_state,
                 active_rules = coalesce(excluded.active_rules, {table}.active_rules),
                 rules_errors = excluded.rules_errors"
        );
        self.query(
            sql,
            vec![source.into(), state.into(), active.into(), errors.into()],
        )
        .await?;
        Ok(())
    }

    /// The state of `source`'s sync rules: (`valid` or `invalid`, the
    /// active rules' JSON, the errors), when a job has checked them.
    pub async fn rules(
        &self,
        source: &str,
    ) -> anyhow::Result<Option<(String, Option<String>, Option<String>)>> {
        let table = self.side_table("sandpipe_sync_state");
        let sql = format!(
            "SELECT rules_state, active_rules, rules_errors FROM {table}
             WHERE source = $1 AND rules_state IS NOT NULL"
        );
        let row = self.query_one(sql, vec![source.into()]).await?;
        Ok(row.map(|r| {
            let text = |i: usize| r.get(i).and_then(Cell::text);
            (text(0).unwrap_or_default(), text(1), text(2))
        }))
    }

    /// Ask the running job of `source` (in any engine) to stop: it is
    /// marked `canceling`, which the job reads between pages. How many
    /// jobs were asked.
    pub async fn request_cancel(&self, source: &str) -> anyhow::Result<u64> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        let sql = format!(
            "UPDATE {jobs} SET state = 'canceling' WHERE source = $1 AND state = 'in_progress'
             RETURNING id"
        );
        Ok(self.query(sql, vec![source.into()]).await?.len() as u64)
    }

    /// The recorded state of job `id`.
    pub async fn job_state(&self, id: i64) -> anyhow::Result<Option<JobState>> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        let sql = format!("SELECT state FROM {jobs} WHERE id = $1");
        let row = self.query_one(sql, vec![id.into()]).await?;
        Ok(row
            .and_then(|r| r.first().and_then(Cell::text))
            .map(|s| JobState::parse(&s)))
    }

    /// When the last job of `source` of `kind` started (milliseconds since
    /// 1970), if one did.
    pub async fn last_started(&self, source: &str, kind: JobKind) -> anyhow::Result<Option<i64>> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        let sql = format!("SELECT max(started_ms) FROM {jobs} WHERE source = $1 AND kind = $2");
        let row = self
            .query_one(sql, vec![source.into(), kind.as_str().into()])
            .await?;
        Ok(row.and_then(|r| r.first().and_then(Cell::int)))
    }

    /// The sync cursor the last completed sync of `source` ended with.
    pub async fn sync_cursor(&self, source: &str) -> anyhow::Result<Option<String>> {
        let state = self.side_table("sandpipe_sync_state");
        let sql = format!("SELECT sync_cursor FROM {state} WHERE source = $1");
        let row = self.query_one(sql, vec![source.into()]).await?;
        Ok(row.and_then(|r| r.first().and_then(Cell::text)))
    }

    /// The last `limit` jobs of `source`, newest first.
    pub async fn jobs(&self, source: &str, limit: u32) -> anyhow::Result<Vec<JobRecord>> {
        let jobs = self.side_table("sandpipe_sync_jobs");
        let sql =
            format!("SELECT {JOB_COLUMNS} FROM {jobs} WHERE source = $1 ORDER BY id DESC LIMIT $2");
        let rows = self
            .query(sql, vec![source.into(), i64::from(limit).into()])
            .await?;
        Ok(rows.iter().map(|r| record(r)).collect())
    }

    /// The ids of the documents of `keys` the sink has.
    pub async fn ids_of(&self, keys: &[Key]) -> anyhow::Result<Vec<String>> {
        let docs = self.qualified();
        match self {
            Self::Postgres(s) => {
                let client = s.pg.client().await?;
                let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
                let sql = format!("SELECT id FROM {docs} WHERE id_hash = ANY($1::bytea[])");
                let rows = client.query(&sql, &[&keys]).await?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            }
            Self::Sqlite(s) => {
                let keys = keys.to_vec();
                s.db.read(move |conn| {
                    use rusqlite::OptionalExtension as _;
                    let mut stmt =
                        conn.prepare_cached(&format!("SELECT id FROM {docs} WHERE id_hash = ?1"))?;
                    let mut ids = Vec::new();
                    for key in &keys {
                        if let Some(id) = stmt
                            .query_row([&key[..]], |r| r.get::<_, String>(0))
                            .optional()?
                        {
                            ids.push(id);
                        }
                    }
                    Ok(ids)
                })
                .await
            }
        }
    }
}

/// A key's 16 bytes as the number the index holds (a malformed hash, which
/// only a hand-edited row can have, is zero-padded).
pub fn key_number(hash: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    let n = hash.len().min(16);
    bytes[..n].copy_from_slice(&hash[..n]);
    u128::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_numbers_the_placeholders_as_postgresql_does() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $2 WHERE id = $1 AND b = '$' || $10"),
            "UPDATE t SET a = ?2 WHERE id = ?1 AND b = '$' || ?10"
        );
    }

    #[test]
    fn a_record_reads_its_columns_in_order() {
        let row: Vec<Cell> = vec![
            7.into(),
            "src".into(),
            "incremental".into(),
            "scheduled".into(),
            "canceled".into(),
            Cell::Null,
            1.into(),
            2.into(),
            3.into(),
            4.into(),
            5.into(),
            6.into(),
            1000.into(),
            250.into(),
            Some("canceled".to_owned()).into(),
        ];
        let job = record(&row);
        assert_eq!(
            (job.id, job.kind, job.trigger, job.state, job.sync_cursor),
            (
                7,
                JobKind::Incremental,
                Trigger::Scheduled,
                JobState::Canceled,
                None
            )
        );
        assert_eq!(
            [
                job.counts.indexed,
                job.counts.errors,
                job.duration.as_millis() as u64
            ],
            [1, 6, 250]
        );
        assert_eq!(job.error.as_deref(), Some("canceled"));
    }
}
