//! The status log: every step of every message, per plugin, durable
//! before a delivery is settled.
//!
//! One row per event. Message-level events (received, a bad envelope, the
//! final dead-lettering) have an empty `plugin`. Each plugin row carries the
//! plugin's version and its component's sha256, so every result can be
//! traced to the exact code that produced it.
//!
//! The log lives in the engine's database: table `status` of the SQLite
//! file, or of the engine's schema on PostgreSQL (closed to every other
//! role, plugins' included).
//!
//! Writes are group-committed: [`StatusLog::record`] still returns only
//! once its entries are durable, but the entries of every message that
//! records while a transaction is being committed go together into the
//! next one, so concurrent messages share a commit (and its fsync) instead
//! of paying one each. See [`GroupCommit`]. On SQLite one thread of the
//! log's own does the writing; on PostgreSQL a task does.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use serde::Serialize;

use tokio_postgres::types::{ToSql, Type};

use crate::store::database::postgres::{self, STATUS_COLUMNS, describe};
use crate::store::database::{Database, Postgres, Sqlite};

/// The status of a message or of one plugin on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The engine took the delivery (and started its plugins).
    Received,
    /// The plugin finished and its effects are committed.
    Done,
    /// The plugin said the message is not for it.
    Skipped,
    /// The plugin failed this attempt; it may be retried.
    Failed,
    /// The message (or this plugin's part) was dead-lettered.
    Dead,
}

impl Status {
    /// The name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Done => "done",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// One row of the status log.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The message id.
    pub message_id: String,
    /// The plugin, or empty for message-level events.
    pub plugin: String,
    /// The plugin's version (from `describe`).
    pub plugin_version: String,
    /// The plugin component's sha256.
    pub component_sha256: String,
    /// The delivery attempt, from 1.
    pub attempt: u32,
    /// What happened.
    pub status: Status,
    /// Why, in words.
    pub info: String,
    /// How long the plugin ran, in milliseconds.
    pub duration_ms: Option<f64>,
    /// Fuel used, when metered.
    pub fuel_used: Option<u64>,
}

impl Entry {
    /// A message-level entry.
    pub fn message(
        message_id: &str,
        attempt: u32,
        status: Status,
        info: impl Into<String>,
    ) -> Self {
        Self {
            message_id: message_id.to_owned(),
            plugin: String::new(),
            plugin_version: String::new(),
            component_sha256: String::new(),
            attempt,
            status,
            info: info.into(),
            duration_ms: None,
            fuel_used: None,
        }
    }
}

/// A stored row, as read back.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The plugin, or empty.
    pub plugin: String,
    /// The plugin's version.
    pub plugin_version: String,
    /// The component's sha256.
    pub component_sha256: String,
    /// The attempt.
    pub attempt: u32,
    /// The status name.
    pub status: String,
    /// Why.
    pub info: String,
    /// Duration in ms.
    pub duration_ms: Option<f64>,
    /// Fuel used.
    pub fuel_used: Option<u64>,
}

/// The status log.
#[derive(Clone)]
pub struct StatusLog {
    db: Backend,
    commits: Arc<GroupCommit>,
    /// PostgreSQL's batched idempotency look-ups (message id → the plugins
    /// that finished it).
    lookups: Arc<Group<String, HashSet<String>>>,
    /// Stops the SQLite writer thread when the last handle is dropped.
    _writer: Option<Arc<StopWriter>>,
}

/// Tells the SQLite writer thread to finish what is queued and stop.
struct StopWriter(Arc<GroupCommit>);

impl Drop for StopWriter {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A caller waiting for its job (entries to commit, a message id to look
/// up) to be done.
type Waiter<J, R> = (J, oneshot::Sender<Result<R, String>>);

/// Group commit: callers queue their entries; a writer takes everything
/// queued, writes it in one statement, tells each caller the result, and
/// repeats. On PostgreSQL the writer is a task the first caller starts
/// while none runs, which stops when the queue is empty; on SQLite it is a
/// thread of its own that sleeps on `wake` (no task to spawn, no hop to the
/// blocking pool per commit). Either way a caller that stops waiting never
/// strands the others. The same queue batches the PostgreSQL idempotency
/// look-ups: one query for every message that asks while one runs.
struct Group<J, R> {
    state: Mutex<Queue<J, R>>,
    wake: Condvar,
}

type GroupCommit = Group<Vec<Entry>, ()>;

impl<J, R> Default for Group<J, R> {
    fn default() -> Self {
        Self {
            state: Mutex::new(Queue {
                waiting: Vec::new(),
                writing: false,
                closed: false,
            }),
            wake: Condvar::new(),
        }
    }
}

struct Queue<J, R> {
    waiting: Vec<Waiter<J, R>>,
    /// A writer task is running (PostgreSQL).
    writing: bool,
    /// The log is gone: the writer thread finishes the queue and stops.
    closed: bool,
}

impl<J, R> Group<J, R> {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<J, R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job; true when the caller must start the writer task.
    /// Once closed (the writer thread is gone) the waiter is dropped, so
    /// its caller hears at once that the writer stopped.
    fn enqueue(&self, waiter: Waiter<J, R>) -> bool {
        let mut queue = self.queue();
        if queue.closed {
            return false;
        }
        queue.waiting.push(waiter);
        !std::mem::replace(&mut queue.writing, true)
    }

    /// Everything queued, or `None` (and the writer task stops) when empty.
    fn take(&self) -> Option<Vec<Waiter<J, R>>> {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.writing = false;
            return None;
        }
        Some(std::mem::take(&mut queue.waiting))
    }

    /// For the writer thread: wait for entries; `None` once closed and
    /// drained.
    fn wait_take(&self) -> Option<Vec<Waiter<J, R>>> {
        let mut queue = self.queue();
        loop {
            if !queue.waiting.is_empty() {
                return Some(std::mem::take(&mut queue.waiting));
            }
            if queue.closed {
                return None;
            }
            queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.queue().closed = true;
        self.wake.notify_one();
    }
}

/// Unzip a batch into its entries (in order) and the callers to answer.
fn unzip(
    batch: Vec<Waiter<Vec<Entry>, ()>>,
) -> (Vec<Entry>, Vec<oneshot::Sender<Result<(), String>>>) {
    let (entries, waiters): (Vec<Vec<Entry>>, Vec<_>) = batch.into_iter().unzip();
    metrics::counter!(crate::metrics::STATUS_COMMITS).increment(1);
    metrics::counter!(crate::metrics::STATUS_WRITES).increment(waiters.len() as u64);
    (entries.into_iter().flatten().collect(), waiters)
}

/// Closes the queue when the writer thread ends, however it ends (a
/// panic included), and drops what is still queued: no caller waits for a
/// writer that is gone.
struct WriterGone(Arc<GroupCommit>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        queue.closed = true;
        queue.waiting.clear();
    }
}

/// The SQLite writer thread's loop.
fn sqlite_writer(db: Sqlite, commits: Arc<GroupCommit>) {
    let _gone = WriterGone(commits.clone());
    while let Some(batch) = commits.wait_take() {
        let (entries, waiters) = unzip(batch);
        let result = db
            .call_blocking(|c| sqlite_write(c, &entries))
            .map_err(|e| format!("{e:#}"));
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

impl StatusLog {
    /// The log in `db`. SQLite's table is created now if missing;
    /// PostgreSQL's was created when the database was opened.
    pub fn new(db: Database) -> anyhow::Result<Self> {
        match db {
            Database::Sqlite { engine, .. } => {
                create_sqlite_table(&engine)?;
                let commits: Arc<GroupCommit> = Arc::default();
                {
                    let (db, commits) = (engine.clone(), commits.clone());
                    std::thread::Builder::new()
                        .name("sandpipe-status".into())
                        .spawn(move || sqlite_writer(db, commits))
                        .map_err(|e| {
                            anyhow::anyhow!("cannot start the status log's writer thread: {e}")
                        })?;
                }
                Ok(Self {
                    db: Backend::Sqlite(engine),
                    _writer: Some(Arc::new(StopWriter(commits.clone()))),
                    commits,
                    lookups: Arc::default(),
                })
            }
            Database::Postgres(pg) => Ok(Self {
                db: Backend::Postgres(pg),
                commits: Arc::default(),
                lookups: Arc::default(),
                _writer: None,
            }),
        }
    }

    /// Append `entries`, all in one transaction (possibly shared with other
    /// callers' entries); returns once they are durable.
    pub async fn record(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        match self.submit(entries).await {
            Ok(result) => result.map_err(|e| anyhow::anyhow!(e)),
            Err(_) => anyhow::bail!("writing the status log: the writer stopped"),
        }
    }

    /// Queue `entries`, starting the writer if none runs; the receiver
    /// answers once they are committed.
    fn submit(&self, entries: Vec<Entry>) -> oneshot::Receiver<Result<(), String>> {
        let (done, committed) = oneshot::channel();
        let start = self.commits.enqueue((entries, done));
        match &self.db {
            Backend::Sqlite(_) => self.commits.wake.notify_one(),
            Backend::Postgres(pg) if start => {
                let (pg, commits) = (pg.clone(), self.commits.clone());
                tokio::spawn(async move { pg_writer(pg, commits).await });
            }
            Backend::Postgres(_) => {}
        }
        committed
    }

    /// Whether [`StatusLog::record_within`] can write into a plugin's
    /// transaction: the log is on PostgreSQL.
    pub fn writes_within(&self) -> bool {
        matches!(&self.db, Backend::Postgres(pg) if pg.status_key().is_some())
    }

    /// Append `entries` inside plugin's PostgreSQL transaction `tx` and
    /// commit it: the plugin's effects and its status rows are durable
    /// together, in one commit, or neither is. Each row carries its MAC
    /// (see `postgres::StatusKey`): rows the plugin's role writes itself
    /// are ignored when read.
    pub async fn record_within(
        &self,
        tx: crate::capability::sql::Transaction,
        entries: &[Entry],
    ) -> anyhow::Result<()> {
        let key = match &self.db {
            Backend::Postgres(pg) => pg.status_key().map(|key| (pg, key)),
            Backend::Sqlite(_) => None,
        };
        let Some((pg, key)) = key else {
            tx.rollback().await;
            anyhow::bail!("the status log is not on PostgreSQL");
        };
        let call = postgres::EngineCall {
            with: format!("WITH w AS ({})", pg_insert(pg)),
            types: PG_TYPES,
            params: PgColumns::new(entries, key).into_params(),
        };
        tx.commit_with(call).await?;
        metrics::counter!(crate::metrics::STATUS_COMMITS).increment(1);
        metrics::counter!(crate::metrics::STATUS_WRITES).increment(1);
        Ok(())
    }

    /// Plugins that already finished this message (done or skipped), so a
    /// redelivery does not run them again. On PostgreSQL the look-ups of
    /// every message that asks while one runs are answered by one query.
    pub async fn finished_plugins(&self, message_id: &str) -> anyhow::Result<HashSet<String>> {
        match &self.db {
            Backend::Sqlite(db) => sqlite_finished(db, message_id).await,
            Backend::Postgres(pg) => {
                let (done, answer) = oneshot::channel();
                if self.lookups.enqueue((message_id.to_owned(), done)) {
                    let (pg, lookups) = (pg.clone(), self.lookups.clone());
                    tokio::spawn(async move { pg_lookups(pg, lookups).await });
                }
                match answer.await {
                    Ok(result) => result.map_err(|e| anyhow::anyhow!(e)),
                    Err(_) => anyhow::bail!("reading the status log: the reader stopped"),
                }
            }
        }
    }

    /// Every row of one message, oldest first.
    pub async fn rows(&self, message_id: &str) -> anyhow::Result<Vec<Row>> {
        match &self.db {
            Backend::Sqlite(db) => sqlite_rows(db, message_id).await,
            Backend::Postgres(pg) => {
                let fail = |e: tokio_postgres::Error| {
                    anyhow::anyhow!("reading the status log: {}", describe(&e))
                };
                let client = pg.client().await?;
                // Planned for the table as it is (see `pg_finished`).
                let query = format!(
                    "SELECT {STATUS_COLUMNS} FROM {} WHERE message_id = $1 ORDER BY id",
                    pg.table("status")
                );
                let rows = client
                    .query_typed(&query, &[(&message_id, Type::TEXT)])
                    .await
                    .map_err(fail)?;
                Ok(verified(pg, &rows).await?.map(|(_, row)| row).collect())
            }
        }
    }
}

/// The PostgreSQL writer task: commit what is queued until nothing is.
async fn pg_writer(pg: Postgres, commits: Arc<GroupCommit>) {
    while let Some(batch) = commits.take() {
        let (entries, waiters) = unzip(batch);
        let result = pg_record(&pg, entries).await.map_err(|e| format!("{e:#}"));
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// The PostgreSQL look-up task: answer what is queued until nothing is.
async fn pg_lookups(pg: Postgres, lookups: Arc<Group<String, HashSet<String>>>) {
    while let Some(batch) = lookups.take() {
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        metrics::counter!(crate::metrics::STATUS_LOOKUPS).increment(1);
        let found = pg_finished(&pg, &ids).await.map_err(|e| format!("{e:#}"));
        for (id, waiter) in batch {
            let answer = found.as_ref().map_err(Clone::clone).map(|rows| {
                rows.iter()
                    .filter(|(m, _)| *m == id)
                    .map(|(_, p)| p.clone())
                    .collect()
            });
            let _ = waiter.send(answer);
        }
    }
}

/// The finished (done or skipped) plugins of every message in `ids`, as
/// (message id, plugin) pairs: one query, one round trip.
///
/// Not a kept prepared statement: PostgreSQL would plan it once, when the
/// table was as small as a new deployment's, and keep scanning the whole
/// growing table with that plan (until autovacuum's next ANALYZE). A
/// statement with its parameter types given is parsed, bound and run in
/// one round trip and planned for the table as it is now, by the index.
async fn pg_finished(pg: &Postgres, ids: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let fail =
        |e: tokio_postgres::Error| anyhow::anyhow!("reading the status log: {}", describe(&e));
    let client = pg.client().await?;
    let query = format!(
        "SELECT {STATUS_COLUMNS} FROM {} WHERE message_id = ANY($1) \
         AND plugin <> '' AND status IN ('done', 'skipped')",
        pg.table("status")
    );
    let rows = client
        .query_typed(&query, &[(&ids, Type::TEXT_ARRAY)])
        .await
        .map_err(fail)?;
    Ok(verified(pg, &rows)
        .await?
        .map(|(message_id, row)| (message_id, row.plugin))
        .collect())
}

/// The rows of `rows` (all of [`STATUS_COLUMNS`], in order) whose MAC
/// verifies, with their message ids; rows from before the `mac` column have
/// none and are taken as they are (the table refuses a new row without
/// one). Any other row was not written by the engine (a plugin's role may
/// insert rows): it is counted, reported and ignored.
async fn verified(
    pg: &Postgres,
    rows: &[tokio_postgres::Row],
) -> anyhow::Result<impl Iterator<Item = (String, Row)>> {
    let key = pg.load_status_key().await?;
    let mut forged = 0u64;
    let mut kept = Vec::with_capacity(rows.len());
    for r in rows {
        let fields = Fields {
            message_id: r.get(0),
            plugin: r.get(1),
            plugin_version: r.get(2),
            component_sha256: r.get(3),
            attempt: r.get(4),
            status: r.get(5),
            info: r.get(6),
            duration_ms: r.get(7),
            fuel_used: r.get(8),
        };
        let mac: Option<&[u8]> = r.get(9);
        let genuine = match (mac, key) {
            (None, _) => true,
            (Some(mac), Some(key)) => mac == fields.mac(key).as_slice(),
            (Some(_), None) => false,
        };
        if !genuine {
            forged += 1;
            continue;
        }
        kept.push((
            fields.message_id.to_owned(),
            Row {
                plugin: fields.plugin.to_owned(),
                plugin_version: fields.plugin_version.to_owned(),
                component_sha256: fields.component_sha256.to_owned(),
                attempt: u32::try_from(fields.attempt).unwrap_or_default(),
                status: fields.status.to_owned(),
                info: fields.info.to_owned(),
                duration_ms: fields.duration_ms,
                fuel_used: fields.fuel_used.map(|f| f as u64),
            },
        ));
    }
    if forged > 0 {
        metrics::counter!(crate::metrics::STATUS_FORGED).increment(forged);
        tracing::warn!(
            rows = forged,
            "ignored status rows without the engine's MAC (written by something else, e.g. a plugin's role)"
        );
    }
    Ok(kept.into_iter())
}

/// One status row's fields as stored, for its MAC.
struct Fields<'a> {
    message_id: &'a str,
    plugin: &'a str,
    plugin_version: &'a str,
    component_sha256: &'a str,
    attempt: i32,
    status: &'a str,
    info: &'a str,
    duration_ms: Option<f64>,
    fuel_used: Option<i64>,
}

impl<'a> Fields<'a> {
    fn of(e: &'a Entry) -> Self {
        Self {
            message_id: &e.message_id,
            plugin: &e.plugin,
            plugin_version: &e.plugin_version,
            component_sha256: &e.component_sha256,
            attempt: i32::try_from(e.attempt).unwrap_or(i32::MAX),
            status: e.status.as_str(),
            info: &e.info,
            duration_ms: e.duration_ms,
            fuel_used: e.fuel_used.map(|f| i64::try_from(f).unwrap_or(i64::MAX)),
        }
    }

    /// The MAC of the fields, each length-prefixed (or tagged, when
    /// optional) so no two rows share an encoding.
    fn mac(&self, key: &postgres::StatusKey) -> Vec<u8> {
        let mut data = Vec::with_capacity(128 + self.info.len());
        for text in [
            self.message_id,
            self.plugin,
            self.plugin_version,
            self.component_sha256,
            self.status,
            self.info,
        ] {
            data.extend_from_slice(&(text.len() as u64).to_le_bytes());
            data.extend_from_slice(text.as_bytes());
        }
        data.extend_from_slice(&self.attempt.to_le_bytes());
        match self.duration_ms {
            Some(d) => {
                data.push(1);
                data.extend_from_slice(&d.to_bits().to_le_bytes());
            }
            None => data.push(0),
        }
        match self.fuel_used {
            Some(f) => {
                data.push(1);
                data.extend_from_slice(&f.to_le_bytes());
            }
            None => data.push(0),
        }
        key.mac(&data)
    }
}

/// The statement that appends rows, from the arrays of [`PgColumns`] (one
/// round trip, atomic without a transaction block of its own), in order.
fn pg_insert(pg: &Postgres) -> String {
    format!(
        "INSERT INTO {} ({STATUS_COLUMNS}) \
         SELECT m, p, v, c, a, s, i, d, f, k \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], \
                     $6::text[], $7::text[], $8::float8[], $9::int8[], $10::bytea[]) \
              WITH ORDINALITY AS e(m, p, v, c, a, s, i, d, f, k, n) \
         ORDER BY n",
        pg.table("status")
    )
}

/// The parameters' types of [`pg_insert`].
const PG_TYPES: &[Type] = &[
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::INT8_ARRAY,
    Type::BYTEA_ARRAY,
];

/// Entries as the columns of [`pg_insert`], each row with its MAC.
struct PgColumns {
    message_id: Vec<String>,
    plugin: Vec<String>,
    plugin_version: Vec<String>,
    component_sha256: Vec<String>,
    attempt: Vec<i32>,
    status: Vec<&'static str>,
    info: Vec<String>,
    duration_ms: Vec<Option<f64>>,
    fuel_used: Vec<Option<i64>>,
    mac: Vec<Vec<u8>>,
}

impl PgColumns {
    fn new(entries: &[Entry], key: &postgres::StatusKey) -> Self {
        let fields: Vec<Fields<'_>> = entries.iter().map(Fields::of).collect();
        let text = |f: fn(&Entry) -> &str| entries.iter().map(|e| f(e).to_owned()).collect();
        Self {
            message_id: text(|e| &e.message_id),
            plugin: text(|e| &e.plugin),
            plugin_version: text(|e| &e.plugin_version),
            component_sha256: text(|e| &e.component_sha256),
            attempt: fields.iter().map(|f| f.attempt).collect(),
            status: entries.iter().map(|e| e.status.as_str()).collect(),
            info: text(|e| &e.info),
            duration_ms: fields.iter().map(|f| f.duration_ms).collect(),
            fuel_used: fields.iter().map(|f| f.fuel_used).collect(),
            mac: fields.iter().map(|f| f.mac(key)).collect(),
        }
    }

    fn into_params(self) -> Vec<Box<dyn ToSql + Send + Sync>> {
        vec![
            Box::new(self.message_id),
            Box::new(self.plugin),
            Box::new(self.plugin_version),
            Box::new(self.component_sha256),
            Box::new(self.attempt),
            Box::new(self.status),
            Box::new(self.info),
            Box::new(self.duration_ms),
            Box::new(self.fuel_used),
            Box::new(self.mac),
        ]
    }
}

/// Append `entries` on the engine's own connection (see [`pg_insert`]).
async fn pg_record(pg: &Postgres, entries: Vec<Entry>) -> anyhow::Result<()> {
    let fail =
        |e: tokio_postgres::Error| anyhow::anyhow!("writing the status log: {}", describe(&e));
    let key = pg
        .status_key()
        .ok_or_else(|| anyhow::anyhow!("writing the status log: the database is not prepared"))?;
    let client = pg.client().await?;
    let insert = client
        .prepare_typed_cached(&pg_insert(pg), PG_TYPES)
        .await
        .map_err(fail)?;
    let params = PgColumns::new(&entries, key).into_params();
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
    client.execute(&insert, &params).await.map_err(fail)?;
    Ok(())
}

fn create_sqlite_table(db: &Sqlite) -> anyhow::Result<()> {
    db.call_blocking(|c| {
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS status (
                id INTEGER PRIMARY KEY,
                message_id TEXT NOT NULL,
                plugin TEXT NOT NULL,
                plugin_version TEXT NOT NULL,
                component_sha256 TEXT NOT NULL,
                attempt INTEGER NOT NULL,
                status TEXT NOT NULL,
                info TEXT NOT NULL,
                duration_ms REAL,
                fuel_used INTEGER,
                at_ms INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS status_message ON status (message_id, plugin);",
        )?;
        Ok(())
    })
}

fn sqlite_write(c: &mut rusqlite::Connection, entries: &[Entry]) -> anyhow::Result<()> {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let tx = c.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO status (message_id, plugin, plugin_version, component_sha256,
                attempt, status, info, duration_ms, fuel_used, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for e in entries {
            stmt.execute(rusqlite::params![
                e.message_id,
                e.plugin,
                e.plugin_version,
                e.component_sha256,
                e.attempt,
                e.status.as_str(),
                e.info,
                e.duration_ms,
                e.fuel_used.map(|f| f as i64),
                at,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

async fn sqlite_finished(db: &Sqlite, message_id: &str) -> anyhow::Result<HashSet<String>> {
    // An indexed lookup: on this thread (see `Sqlite::read_now`).
    db.read_now(|c| {
        let mut stmt = c.prepare_cached(
            "SELECT DISTINCT plugin FROM status
             WHERE message_id = ?1 AND plugin != '' AND status IN ('done', 'skipped')",
        )?;
        let rows = stmt.query_map([message_id], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<HashSet<_>, _>>()?)
    })
}

async fn sqlite_rows(db: &Sqlite, message_id: &str) -> anyhow::Result<Vec<Row>> {
    let id = message_id.to_owned();
    db.read(move |c| {
        let mut stmt = c.prepare_cached(
            "SELECT plugin, plugin_version, component_sha256, attempt, status, info,
                    duration_ms, fuel_used
             FROM status WHERE message_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([&id], |r| {
            Ok(Row {
                plugin: r.get(0)?,
                plugin_version: r.get(1)?,
                component_sha256: r.get(2)?,
                attempt: r.get(3)?,
                status: r.get(4)?,
                info: r.get(5)?,
                duration_ms: r.get(6)?,
                fuel_used: r.get::<_, Option<i64>>(7)?.map(|f| f as u64),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_mac_covers_every_field_and_their_boundaries() {
        let key = postgres::StatusKey::new([7; 32]);
        let mut entry = Entry::message("m1", 1, Status::Done, "ok");
        entry.plugin = "p".into();
        entry.duration_ms = Some(1.5);
        entry.fuel_used = Some(10);
        let mac = Fields::of(&entry).mac(&key);
        assert_eq!(mac.len(), 32);
        assert_eq!(mac, Fields::of(&entry.clone()).mac(&key));
        let changed: [fn(&mut Entry); 9] = [
            |e| e.message_id.push('x'),
            |e| e.plugin.push('x'),
            |e| e.plugin_version.push('x'),
            |e| e.component_sha256.push('x'),
            |e| e.attempt += 1,
            |e| e.status = Status::Skipped,
            |e| e.info.push('x'),
            |e| e.duration_ms = None,
            |e| e.fuel_used = Some(11),
        ];
        for change in changed {
            let mut other = entry.clone();
            change(&mut other);
            assert_ne!(Fields::of(&other).mac(&key), mac);
        }
        // Moving a byte from one field to the next changes the MAC.
        let mut shifted = entry.clone();
        shifted.message_id = "m".into();
        shifted.plugin = "1p".into();
        assert_ne!(Fields::of(&shifted).mac(&key), mac);
        // Another key, another MAC.
        assert_ne!(
            Fields::of(&entry).mac(&postgres::StatusKey::new([8; 32])),
            mac
        );
    }

    #[tokio::test]
    async fn records_and_reads_back_per_message() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = StatusLog::new(Database::Sqlite {
            engine: Sqlite::open(&dir.path().join("s.sqlite"))?,
            plugins_dir: dir.path().join("plugins"),
        })?;
        let mut done = Entry::message("m1", 1, Status::Done, "ok");
        done.plugin = "p".into();
        log.record(vec![Entry::message("m1", 1, Status::Received, ""), done])
            .await?;
        log.record(vec![Entry::message("m2", 1, Status::Received, "")])
            .await?;
        let rows = log.rows("m1").await?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].status, "done");
        assert_eq!(
            log.finished_plugins("m1").await?,
            HashSet::from(["p".to_owned()])
        );
        assert!(log.finished_plugins("m2").await?.is_empty());
        Ok(())
    }

    fn sqlite_log(dir: &std::path::Path) -> anyhow::Result<(StatusLog, Sqlite)> {
        let engine = Sqlite::open(&dir.join("s.sqlite"))?;
        let log = StatusLog::new(Database::Sqlite {
            engine: engine.clone(),
            plugins_dir: dir.join("plugins"),
        })?;
        Ok((log, engine))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_all_land_and_each_returns_once_durable() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (log, _) = sqlite_log(dir.path())?;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let log = log.clone();
            tasks.spawn(async move {
                let id = format!("m{i}");
                log.record(vec![Entry::message(&id, 1, Status::Received, "")])
                    .await?;
                log.record(vec![Entry::message(&id, 1, Status::Done, "")])
                    .await?;
                // Durable means readable through the other connection now.
                let rows = log.rows(&id).await?;
                anyhow::ensure!(rows.len() == 2, "{id}: {rows:?}");
                anyhow::ensure!(rows[0].status == "received" && rows[1].status == "done");
                Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_to_the_caller() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (log, engine) = sqlite_log(dir.path())?;
        engine.call_blocking(|c| Ok(c.execute_batch("DROP TABLE status")?))?;
        let err = log
            .record(vec![Entry::message("m", 1, Status::Done, "")])
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("no such table: status"), "{err}");
        Ok(())
    }
}
