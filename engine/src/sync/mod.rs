//! Sync jobs: the engine pages through a `source` component and reconciles
//! what it yields into the source's sink (docs/sources.md).
//!
//! A job takes the sink's lock (one job per sink table, across replicas),
//! marks jobs an engine left running as failed, records itself, then asks
//! the source in Elastic's order: `changed` (false: completed, nothing to
//! do), `validate-config`, `ping`, then `get-docs` page after page, all on
//! one warm instance ([`Session`]) with the component's limits armed per
//! call.
//!
//! A **full** sync holds the sink's `id → version` index (16 + 8 bytes a
//! document: [`sink::Sink::index`]); a document whose version is the
//! sink's is skipped, a new or changed one is upserted, and what the source
//! no longer yields is deleted once the last page is in. An
//! **incremental** sync applies each document's operation. Writes go in
//! batches (`batch.operations` / `batch.bytes`), each in one transaction
//! with the job's counts. A job that dies half-way leaves the sink with
//! some documents new and none deleted; the next job starts over and
//! reconciles (upserts are idempotent, deletions wait for a whole sync), so
//! nothing is lost or duplicated.

pub mod monitor;
pub mod rules;
pub mod schedule;
pub mod sink;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::sync::watch;

use crate::config::source::SourceConfig;
use crate::plugins::LoadedPlugin;
use crate::sandbox::bindings::{Operation, PageRequest, SyncKind, WitError};
use crate::sandbox::bounded::{self, Docs};
use crate::sandbox::{GuestCall, Sandbox, Session, Source as SourceBindings, World};
use monitor::ErrorMonitor;
use sink::{Batch, Sink, Upsert};

/// A document's key in the sink: the first 16 bytes of SHA-256 of its id.
pub type Key = [u8; 16];

/// The longest timestamp a document may have (a longer one is a document
/// error).
pub const MAX_TIMESTAMP_BYTES: usize = 1024;

/// The longest page cursor or sync cursor a source may return (a longer
/// one fails the job: the engine keeps cursors in memory and the sync
/// cursor in the job table).
pub const MAX_CURSOR_BYTES: usize = 64 * 1024;

/// Ids longer than this are replaced by their MD5 in hex (Elastic's
/// `ES_ID_SIZE_LIMIT`).
pub const MAX_ID_BYTES: usize = 512;

/// A full or an incremental sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Everything, with deletions of what the source no longer has.
    Full,
    /// What changed since the last sync's cursor.
    Incremental,
}

/// Who started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `sandpipe sync`, or the HTTP API.
    OnDemand,
    /// The schedule.
    Scheduled,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Recorded, not started.
    Pending,
    /// Running.
    InProgress,
    /// Asked to stop; stops after the page in hand.
    Canceling,
    /// Stopped when asked (what was written stays; nothing was deleted).
    Canceled,
    /// Done.
    Completed,
    /// Failed; the record's `error` says why.
    Error,
}

macro_rules! names {
    ($ty:ident { $($case:ident => $name:literal),* $(,)? } else $default:ident) => {
        impl $ty {
            /// The name recorded in the job table.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$case => $name,)*
                }
            }

            /// The value recorded as `name` (an unknown one reads as the
            /// default).
            pub fn parse(name: &str) -> Self {
                match name {
                    $($name => Self::$case,)*
                    _ => Self::$default,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(JobKind { Full => "full", Incremental => "incremental" } else Full);
names!(Trigger { OnDemand => "on_demand", Scheduled => "scheduled" } else OnDemand);
names!(JobState {
    Pending => "pending",
    InProgress => "in_progress",
    Canceling => "canceling",
    Canceled => "canceled",
    Completed => "completed",
    Error => "error",
} else Error);

/// What a job did to the sink's documents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// New documents written.
    pub indexed: u64,
    /// Changed documents written.
    pub updated: u64,
    /// Documents deleted.
    pub deleted: u64,
    /// Unchanged documents not written (full sync).
    pub skipped: u64,
    /// Documents over `max_document_bytes`, not written.
    pub dropped: u64,
    /// Documents that failed (bad JSON, a duplicate id, ...).
    pub errors: u64,
}

impl Counts {
    /// Take back what `pending` counted (operations not written).
    fn take_back(&mut self, pending: &Counts) {
        self.indexed -= pending.indexed;
        self.updated -= pending.updated;
        self.deleted -= pending.deleted;
    }

    /// Documents the source yielded so far.
    pub fn seen(&self) -> u64 {
        self.indexed + self.updated + self.deleted + self.skipped + self.dropped + self.errors
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} indexed, {} updated, {} deleted, {} skipped, {} dropped, {} errors",
            self.indexed, self.updated, self.deleted, self.skipped, self.dropped, self.errors
        )
    }
}

/// A job's durable record.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Its id in the sink's job table.
    pub id: i64,
    /// The source.
    pub source: String,
    /// Full or incremental.
    pub kind: JobKind,
    /// Who started it.
    pub trigger: Trigger,
    /// Where it is.
    pub state: JobState,
    /// The sync cursor it ended with (what the next incremental sync
    /// starts from), once it has one.
    pub sync_cursor: Option<String>,
    /// What it did.
    pub counts: Counts,
    /// When it started, milliseconds since 1970.
    pub started_ms: i64,
    /// How long it ran.
    pub duration: Duration,
    /// Why it failed or was canceled.
    pub error: Option<String>,
}

/// A document's id as the sink keeps it: an id over [`MAX_ID_BYTES`]
/// becomes its MD5 in hex, as Elastic's connectors do.
pub fn sink_id(id: String) -> String {
    if id.len() > MAX_ID_BYTES {
        hex::encode(md5::Md5::digest(id.as_bytes()))
    } else {
        id
    }
}

/// The key of (sink) id `id`.
pub fn key_of(id: &str) -> Key {
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// A document's version: a hash of its timestamp, or of its body when it
/// has none. Equal versions mean an unchanged document.
pub fn version_of(timestamp: Option<&str>, body: &str) -> i64 {
    let mut hash = sha2::Sha256::new();
    match timestamp {
        Some(ts) => {
            hash.update(b"t");
            hash.update(ts.as_bytes());
        }
        None => {
            hash.update(b"b");
            hash.update(body.as_bytes());
        }
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Why a document is not a JSON object, or `None` when it is one.
fn not_an_object(body: &str) -> Option<String> {
    if !body.trim_start().starts_with('{') {
        return Some("its body is not a JSON object".into());
    }
    serde_json::from_str::<serde::de::IgnoredAny>(body)
        .err()
        .map(|e| format!("its body is not valid JSON: {e}"))
}

/// What runs the source's calls: a warm instance of its component, or
/// the source compiled into the engine (benchmarks).
enum Runner {
    Wasm(Session),
    Native(Arc<dyn crate::sandbox::NativeSource>),
}

/// A job's hold on its sink: the lock (checked before every write) and
/// when it started.
struct Turn<'a> {
    lock: &'a sink::SinkLock,
    started: Instant,
}

/// What a job that ran to its end keeps.
struct Ran {
    /// The sync cursor for the next incremental sync.
    cursor: Option<String>,
    /// New sync rules that this (full) sync applied: they become active.
    rules: Option<String>,
}

/// How a job ended early.
enum Stop {
    /// It failed, for this reason.
    Failed(String),
    /// It was canceled.
    Canceled,
}

impl From<String> for Stop {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

/// One source, ready to sync.
pub struct Source {
    name: String,
    config: SourceConfig,
    plugin: Arc<LoadedPlugin>,
    sandbox: Arc<Sandbox>,
    sink: Sink,
    /// Its schedules: the kind, the text in the config, the schedule.
    schedules: Vec<(JobKind, String, schedule::Schedule)>,
    /// Batches committed by this process: names change events uniquely.
    batches: std::sync::atomic::AtomicU64,
    /// The sink's tables made (for readers: `sources`, the API).
    prepared: tokio::sync::OnceCell<()>,
}

impl Source {
    /// Source `name` of `config`, its component among `plugins`.
    pub fn new(
        name: &str,
        config: &crate::config::Config,
        plugins: &[Arc<LoadedPlugin>],
        sandbox: Arc<Sandbox>,
        tls: &crate::tls::Tls,
    ) -> anyhow::Result<Self> {
        let source = config.sources.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no source `{name}` under `sources` (declared: {})",
                config.file.display(),
                if config.sources.is_empty() {
                    "none".to_owned()
                } else {
                    config
                        .sources
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )
        })?;
        let component = source.component.as_deref().unwrap_or(name);
        let plugin = plugins
            .iter()
            .find(|p| p.name == component)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "sources.{name}: no component `{component}` loaded from {}/{component}.wasm",
                    config.plugins.dir.display()
                )
            })?;
        if plugin.component.world != World::Source {
            anyhow::bail!(
                "sources.{name}: component `{component}` is a `{}` component, not a `source` one",
                plugin.component.world
            );
        }
        bounded::allow_pages_up_to(
            u64::from(source.page_size),
            plugin.context.limits.memory.as_u64(),
        );
        let sink = config
            .sink_for(name, source)
            .map_err(|e| anyhow::anyhow!("sources.{name}.sink: {e}"))?;
        let mut schedules = Vec::new();
        for (kind, text) in [
            (JobKind::Full, &source.schedule.full),
            (JobKind::Incremental, &source.schedule.incremental),
        ] {
            let Some(text) = text else { continue };
            let parsed = schedule::Schedule::parse(text)
                .map_err(|e| anyhow::anyhow!("sources.{name}.schedule.{kind}: {e}"))?;
            if kind == JobKind::Incremental && !incremental(plugin) {
                anyhow::bail!(
                    "sources.{name}.schedule.incremental: component `{component}` does not sync incrementally (its `describe` says so)"
                );
            }
            schedules.push((kind, text.clone(), parsed));
        }
        Ok(Self {
            name: name.to_owned(),
            config: source.clone(),
            plugin: plugin.clone(),
            sandbox,
            sink: Sink::new(&sink, tls)?,
            schedules,
            batches: std::sync::atomic::AtomicU64::new(0),
            prepared: tokio::sync::OnceCell::new(),
        })
    }

    /// The component's name and version.
    pub fn component(&self) -> (&str, &str) {
        (&self.plugin.name, &self.plugin.description.version)
    }

    /// When each scheduled kind of job runs next: the kind, its schedule
    /// as written, the time.
    pub async fn next_runs(
        &self,
    ) -> anyhow::Result<Vec<(JobKind, String, chrono::DateTime<chrono::Utc>)>> {
        let now = chrono::Utc::now();
        let mut out = Vec::new();
        for (kind, text, schedule) in &self.schedules {
            let last = self
                .sink
                .last_started(&self.name, *kind)
                .await?
                .and_then(schedule::from_ms);
            out.push((*kind, text.clone(), schedule.due(now, last)));
        }
        Ok(out)
    }

    /// Run the source's scheduled jobs until `shutdown` turns true (which
    /// also cancels a job in progress after its page in hand). A job due
    /// while another engine runs one waits for the lock; one that another
    /// engine already ran is skipped.
    pub async fn run_schedules(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.schedules.is_empty() {
            return;
        }
        let retry = Duration::from_secs(5);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let next = match self.prepared().await {
                Ok(_) => self.next_runs().await,
                Err(e) => Err(e),
            };
            let wait_and_run = match next {
                Ok(runs) => runs.into_iter().min_by_key(|(_, _, at)| *at),
                Err(e) => {
                    tracing::warn!(source = %self.name, "cannot read the schedule's last jobs: {e:#}");
                    None
                }
            };
            let Some((kind, _, due)) = wait_and_run else {
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            };
            let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let ran = self
                .sync_with(
                    kind,
                    Trigger::Scheduled,
                    Some(due.timestamp_millis()),
                    shutdown.clone(),
                    None,
                    &mut |_| {},
                )
                .await;
            if let Err(e) = ran {
                tracing::warn!(source = %self.name, %kind, "the scheduled job did not run: {e:#}; trying again in {retry:?}");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its sink.
    pub fn sink(&self) -> &Sink {
        &self.sink
    }

    /// The sink, its tables made if this process has not made them yet
    /// (making them is safe beside another engine doing the same: it takes
    /// a database-wide lock of its own).
    pub async fn prepared(&self) -> anyhow::Result<&Sink> {
        self.prepared
            .get_or_try_init(|| self.sink.prepare())
            .await?;
        Ok(&self.sink)
    }

    /// Whether the source pages incrementally.
    pub fn incremental(&self) -> bool {
        incremental(&self.plugin)
    }

    /// Run one job of `kind` to its end: its final record (an `Err` only
    /// when the job could not even be recorded: the sink is down, or
    /// another job holds the lock). `cancel` turning true stops it after
    /// the page in hand; `progress` sees the record after every page.
    pub async fn sync(
        &self,
        kind: JobKind,
        trigger: Trigger,
        cancel: watch::Receiver<bool>,
        progress: &mut (dyn FnMut(&JobRecord) + Send),
    ) -> anyhow::Result<JobRecord> {
        self.sync_with(kind, trigger, None, cancel, None, progress)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the job was not due"))
    }

    /// [`Source::sync`], for the scheduler and the HTTP API: with
    /// `due_ms` (a scheduled job's due time), the job is skipped — `None`
    /// — when one of its kind started at or after it (another engine ran
    /// it); `started` is told the job's id once it is recorded.
    pub async fn sync_with(
        &self,
        kind: JobKind,
        trigger: Trigger,
        due_ms: Option<i64>,
        cancel: watch::Receiver<bool>,
        started: Option<tokio::sync::oneshot::Sender<i64>>,
        progress: &mut (dyn FnMut(&JobRecord) + Send),
    ) -> anyhow::Result<Option<JobRecord>> {
        // Held until the job returns (released on drop, however it ends).
        let lock = self.sink.lock().await?;
        self.prepared().await?;
        let stale = self.sink.close_interrupted(&self.name).await?;
        if stale > 0 {
            tracing::warn!(source = %self.name, "{stale} job(s) left running by a stopped engine marked failed");
        }
        if let Some(due) = due_ms
            && self
                .sink
                .last_started(&self.name, kind)
                .await?
                .is_some_and(|last| last >= due)
        {
            tracing::debug!(source = %self.name, %kind, "a job due then already ran");
            return Ok(None);
        }
        let mut job = JobRecord {
            id: 0,
            source: self.name.clone(),
            kind,
            trigger,
            state: JobState::InProgress,
            sync_cursor: None,
            counts: Counts::default(),
            started_ms: 0,
            duration: Duration::ZERO,
            error: None,
        };
        self.sink.start_job(&mut job).await?;
        tracing::info!(source = %self.name, job = job.id, %kind, %trigger, "sync started");
        if let Some(started) = started {
            let _ = started.send(job.id);
        }
        let turn = Turn {
            lock: &lock,
            started: Instant::now(),
        };
        let started = turn.started;
        let mut batch = Batch::default();
        let ran = tokio::time::timeout(
            self.config.job_timeout,
            self.run(&mut job, &mut batch, &turn, cancel, progress),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Stop::Failed(format!(
                "ran past sources.{}.job_timeout ({:?})",
                self.name, self.config.job_timeout
            )))
        });
        job.duration = started.elapsed();
        let (cursor, new_rules, batch) = match ran {
            Ok(ran) => {
                job.state = JobState::Completed;
                (Some(ran.cursor), ran.rules, batch)
            }
            Err(stop) => {
                // What the last batch counted was not written.
                job.counts.take_back(&batch.pending);
                (job.state, job.error) = match stop {
                    Stop::Canceled => (JobState::Canceled, Some("canceled".into())),
                    Stop::Failed(why) => (JobState::Error, Some(why)),
                };
                (None, None, Batch::default())
            }
        };
        if let Some(cursor) = &cursor {
            job.sync_cursor.clone_from(cursor);
        }
        if let Err(e) = self.commit(&lock, batch, &job, cursor).await {
            // The last batch did not go through: the job failed (what
            // was not written is written by the next job).
            job.state = JobState::Error;
            job.error = Some(format!("{e:#}"));
            self.sink.write(Batch::default(), &job, None).await?;
        } else if let Some(rules) = new_rules
            && job.state == JobState::Completed
            && let Err(e) = self
                .sink
                .set_rules(&self.name, "valid", Some(rules), None)
                .await
        {
            // The job completed; the next full sync makes them active.
            tracing::warn!(source = %self.name, "cannot record the active sync rules: {e:#}");
        }
        let source = self.name.clone();
        metrics::counter!(crate::metrics::SYNC_JOBS, "source" => source.clone(), "kind" => kind.as_str(), "state" => job.state.as_str()).increment(1);
        metrics::histogram!(crate::metrics::SYNC_SECONDS, "source" => source, "kind" => kind.as_str())
            .record(job.duration.as_secs_f64());
        match &job.error {
            Some(why) => {
                tracing::warn!(source = %self.name, job = job.id, state = %job.state, counts = %job.counts, "sync ended: {why}")
            }
            None => {
                tracing::info!(source = %self.name, job = job.id, counts = %job.counts, duration = ?job.duration, "sync completed")
            }
        }
        progress(&job);
        Ok(Some(job))
    }

    /// One page from a source compiled into the engine, on the same host
    /// code as a component's (its limits, its deadline).
    async fn native_page(
        &self,
        native: &Arc<dyn crate::sandbox::NativeSource>,
        request: PageRequest,
    ) -> Result<bounded::PageRaw, String> {
        let native = native.clone();
        let host = crate::capability::HostState::new(self.plugin.context.clone(), None);
        let (result, host, _) = self
            .sandbox
            .run_native(&self.plugin.context.limits, host, move |state| {
                Box::pin(async move { native.get_docs(state, request).await })
            })
            .await;
        end_call(host).await;
        match result {
            Ok(Ok(page)) => Ok(bounded::PageRaw {
                docs: Docs::Copied(page.docs),
                next: page.next,
                sync_cursor: page.sync_cursor,
            }),
            Ok(Err(error)) => Err(format!(
                "`get-docs` returned {}",
                crate::pipeline::wit_error_text(&error)
            )),
            Err(failure) => Err(format!("`get-docs` failed: {failure}")),
        }
    }

    /// Call `what` on the session's instance: its value, or why the job
    /// fails.
    async fn call<T: Send>(
        &self,
        session: &mut Session,
        what: &str,
        call: impl GuestCall<Result<T, WitError>>,
    ) -> Result<T, String> {
        let (result, host, _usage) = session.call(None, call).await;
        end_call(host).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(format!(
                "`{what}` returned {}",
                crate::pipeline::wit_error_text(&error)
            )),
            Err(failure) => Err(format!("`{what}` failed: {failure}")),
        }
    }

    /// The job's work, from `changed` to the last write before the final
    /// one, which `batch` holds when it returns: what to keep when the job
    /// completes. On an error, `batch` holds what was not written.
    async fn run(
        &self,
        job: &mut JobRecord,
        batch: &mut Batch,
        turn: &Turn<'_>,
        cancel: watch::Receiver<bool>,
        progress: &mut (dyn FnMut(&JobRecord) + Send),
    ) -> Result<Ran, Stop> {
        let started = turn.started;
        if job.kind == JobKind::Incremental && !self.incremental() {
            return Err(Stop::Failed(format!(
                "source `{}` does not sync incrementally (its `describe` says so): run a full sync",
                self.name
            )));
        }
        let mut runner = match &self.plugin.component.code {
            crate::sandbox::Code::NativeSource(native) => Runner::Native(native.clone()),
            _ => Runner::Wasm(
                Session::new(
                    self.sandbox.clone(),
                    &self.plugin.component,
                    self.plugin.context.clone(),
                )
                .map_err(|e| e.to_string())?,
            ),
        };
        let last_cursor = self
            .sink
            .sync_cursor(&self.name)
            .await
            .map_err(|e| format!("cannot read the sync cursor: {e:#}"))?;
        // The rules first: invalid ones fail the job before any call,
        // and new ones make it run even when the source has no change.
        let (rules, advanced, draft) = self.check_rules(&mut runner).await?;
        let new_rules = draft.is_some();
        if new_rules && job.kind == JobKind::Incremental {
            return Err(Stop::Failed(format!(
                "the sync rules changed since the last full sync, and only a full sync applies them to what the sink has: run `sandpipe sync {} --full`",
                self.name
            )));
        }
        let asked = last_cursor.clone();
        let changed = match &mut runner {
            Runner::Wasm(session) => {
                self.call(session, "changed", move |instance, store| {
                    Box::pin(async move {
                        SourceBindings::new(&mut *store, instance)?
                            .call_changed(store, asked.as_deref())
                            .await
                    })
                })
                .await?
            }
            // A compiled-in source takes Elastic's defaults.
            Runner::Native(_) => true,
        };
        if !changed && !new_rules {
            tracing::info!(source = %self.name, "nothing changed since the last sync");
            return Ok(Ran {
                cursor: last_cursor,
                rules: None,
            });
        }
        if let Runner::Wasm(session) = &mut runner {
            self.call(session, "validate-config", |instance, store| {
                Box::pin(async move {
                    SourceBindings::new(&mut *store, instance)?
                        .call_validate_config(store)
                        .await
                })
            })
            .await?;
            self.call(session, "ping", |instance, store| {
                Box::pin(async move {
                    SourceBindings::new(&mut *store, instance)?
                        .call_ping(store)
                        .await
                })
            })
            .await?;
        }
        let mut index = match job.kind {
            JobKind::Full => self
                .sink
                .index()
                .await
                .map_err(|e| format!("cannot read the sink's index: {e:#}"))?,
            JobKind::Incremental => HashMap::new(),
        };
        let mut seen: HashSet<u128> = HashSet::new();
        let mut cursors: HashSet<u64> = HashSet::new();
        let mut monitor = ErrorMonitor::new(&self.config.errors);
        let mut cursor: Option<String> = None;
        let mut sync_cursor = last_cursor.clone();
        let size = self.config.page_size;
        let max_body = self.config.max_document_bytes.as_u64() as usize;
        let mut polled = Instant::now();
        loop {
            // Canceled here (Ctrl-C), or in the job table (the HTTP API,
            // from any engine; read at most once a second).
            let mut canceled = *cancel.borrow();
            if !canceled && polled.elapsed() >= Duration::from_secs(1) {
                polled = Instant::now();
                canceled = matches!(
                    self.sink.job_state(job.id).await,
                    Ok(Some(JobState::Canceling))
                );
            }
            if canceled {
                job.state = JobState::Canceling;
                self.flush(turn, batch, job).await?;
                return Err(Stop::Canceled);
            }
            let request = PageRequest {
                kind: match job.kind {
                    JobKind::Full => SyncKind::Full,
                    JobKind::Incremental => SyncKind::Incremental,
                },
                cursor: cursor.clone(),
                sync_cursor: last_cursor.clone(),
                size,
                advanced_rules: advanced.clone(),
            };
            let page = match &mut runner {
                Runner::Wasm(session) => {
                    self.call(session, "get-docs", move |instance, store| {
                        Box::pin(async move { bounded::get_docs(instance, store, &request).await })
                    })
                    .await?
                }
                Runner::Native(native) => self.native_page(native, request).await?,
            };
            let docs = match page.docs {
                Docs::Copied(docs) if docs.len() <= size as usize => docs,
                Docs::Copied(docs) => {
                    return Err(Stop::Failed(format!(
                        "`get-docs` returned {} documents for a page of at most {size} (sources.{}.page_size)",
                        docs.len(),
                        self.name
                    )));
                }
                Docs::TooLarge { count, bytes } => {
                    return Err(Stop::Failed(format!(
                        "`get-docs` returned a page of {count} documents{} for a page of at most {size}: refused uncopied",
                        if bytes > 0 {
                            format!(
                                " holding {bytes} bytes of text, more than the source's memory limit"
                            )
                        } else {
                            String::new()
                        }
                    )));
                }
            };
            for (what, cursor) in [("next", &page.next), ("sync-cursor", &page.sync_cursor)] {
                if let Some(cursor) = cursor
                    && cursor.len() > MAX_CURSOR_BYTES
                {
                    return Err(Stop::Failed(format!(
                        "`get-docs` returned a `{what}` cursor of {} bytes, over {MAX_CURSOR_BYTES}",
                        cursor.len()
                    )));
                }
            }
            if let Some(next) = &page.next {
                use std::hash::{Hash as _, Hasher as _};
                let mut hash = std::collections::hash_map::DefaultHasher::new();
                next.hash(&mut hash);
                if !cursors.insert(hash.finish()) {
                    return Err(Stop::Failed(format!(
                        "`get-docs` returned a cursor it had returned before (`{}`) as the next page's: the sync would never end",
                        crate::capability::cut(next.clone(), 200)
                    )));
                }
            }
            for doc in docs {
                let id = sink_id(doc.id);
                let key = key_of(&id);
                let number = sink::key_number(&key);
                let fail = |monitor: &mut ErrorMonitor, job: &mut JobRecord, why: String| {
                    job.counts.errors += 1;
                    metrics::counter!(crate::metrics::SYNC_DOCUMENTS, "source" => self.name.clone(), "op" => "error").increment(1);
                    monitor.error(why).map_err(Stop::Failed)
                };
                if id.is_empty() {
                    fail(&mut monitor, job, "a document with an empty id".into())?;
                    continue;
                }
                if job.kind == JobKind::Full && !seen.insert(number) {
                    fail(
                        &mut monitor,
                        job,
                        format!("document `{id}` came twice in one sync; the second is ignored"),
                    )?;
                    continue;
                }
                if doc.op == Operation::Delete {
                    if job.kind == JobKind::Full {
                        // Against the world's contract: what the source
                        // does not yield is deleted at the end anyway.
                        fail(
                            &mut monitor,
                            job,
                            format!(
                                "a full sync's page deletes `{id}`: a full sync yields documents only"
                            ),
                        )?;
                        continue;
                    }
                    if batch.touches(&key) {
                        self.flush(turn, batch, job).await?;
                    }
                    batch.delete(key);
                    batch.pending.deleted += 1;
                    job.counts.deleted += 1;
                    self.count("deleted");
                    monitor.ok();
                    continue;
                }
                if doc
                    .timestamp
                    .as_ref()
                    .is_some_and(|t| t.len() > MAX_TIMESTAMP_BYTES)
                {
                    // Kept as the sink has it (seen, not written).
                    index.remove(&number);
                    fail(
                        &mut monitor,
                        job,
                        format!(
                            "document `{id}`: its timestamp is over {MAX_TIMESTAMP_BYTES} bytes"
                        ),
                    )?;
                    continue;
                }
                if doc.body.len() > max_body {
                    // Not written; what the sink has of it stays (it is
                    // `seen`, so a full sync does not delete it).
                    index.remove(&number);
                    job.counts.dropped += 1;
                    self.count("dropped");
                    tracing::debug!(source = %self.name, id = %id, bytes = doc.body.len(), "document dropped: over max_document_bytes");
                    continue;
                }
                // With rules, the body is read whole (the rules may have
                // changed since an unchanged document was written).
                let mut checked = false;
                if !rules.is_empty() {
                    let included = match serde_json::from_str::<serde_json::Value>(&doc.body) {
                        Ok(value) if value.is_object() => rules.includes(&value),
                        // A bad document keeps what the sink has of it
                        // (seen, not written), as without rules.
                        Ok(_) => {
                            index.remove(&number);
                            let why = "its body is not a JSON object";
                            fail(&mut monitor, job, format!("document `{id}`: {why}"))?;
                            continue;
                        }
                        Err(e) => {
                            index.remove(&number);
                            let why = format!("its body is not valid JSON: {e}");
                            fail(&mut monitor, job, format!("document `{id}`: {why}"))?;
                            continue;
                        }
                    };
                    if !included {
                        // As if the source had not yielded it: a full sync
                        // deletes it with the rest (it stays in `index`),
                        // an incremental one now.
                        if job.kind == JobKind::Incremental {
                            if batch.touches(&key) {
                                self.flush(turn, batch, job).await?;
                            }
                            batch.delete(key);
                            batch.pending.deleted += 1;
                            job.counts.deleted += 1;
                        }
                        self.count("filtered");
                        monitor.ok();
                        continue;
                    }
                    checked = true;
                }
                let version = version_of(doc.timestamp.as_deref(), &doc.body);
                let known = index.remove(&number);
                if known == Some(version) {
                    job.counts.skipped += 1;
                    self.count("skipped");
                    monitor.ok();
                    continue;
                }
                if !checked && let Some(why) = not_an_object(&doc.body) {
                    fail(&mut monitor, job, format!("document `{id}`: {why}"))?;
                    continue;
                }
                if self.sink.is_postgres() && doc.body.contains("\\u0000") {
                    fail(
                        &mut monitor,
                        job,
                        format!(
                            "document `{id}`: its body holds \\u0000, which PostgreSQL's jsonb refuses"
                        ),
                    )?;
                    continue;
                }
                let updated = match job.kind {
                    JobKind::Full => known.is_some(),
                    JobKind::Incremental => doc.op == Operation::Update,
                };
                if batch.touches(&key) {
                    self.flush(turn, batch, job).await?;
                }
                if updated {
                    job.counts.updated += 1;
                    batch.pending.updated += 1;
                    self.count("updated");
                } else {
                    job.counts.indexed += 1;
                    batch.pending.indexed += 1;
                    self.count("indexed");
                }
                monitor.ok();
                batch.upsert(Upsert {
                    key,
                    id,
                    version,
                    timestamp: doc.timestamp,
                    body: doc.body,
                    update: updated,
                });
                if batch.len() >= self.config.batch.operations as usize
                    || batch.bytes as u64 >= self.config.batch.bytes.as_u64()
                {
                    self.flush(turn, batch, job).await?;
                }
            }
            if page.sync_cursor.is_some() {
                sync_cursor = page.sync_cursor;
            }
            job.duration = started.elapsed();
            progress(job);
            match page.next {
                None => break,
                Some(next) => cursor = Some(next),
            }
        }
        // Every page is in: what the source no longer yields goes.
        for number in index.into_keys() {
            if batch.len() >= self.config.batch.operations as usize {
                self.flush(turn, batch, job).await?;
            }
            batch.delete(number.to_be_bytes());
            batch.pending.deleted += 1;
            job.counts.deleted += 1;
            self.count("deleted");
        }
        if let Some(last) = monitor.last()
            && job.counts.errors > 0
        {
            tracing::warn!(source = %self.name, errors = job.counts.errors, "documents failed; the last: {last}");
        }
        Ok(Ran {
            cursor: sync_cursor,
            rules: draft,
        })
    }

    /// Check the sync rules (the config's draft): the basic rules the
    /// engine applies, the advanced rules' JSON handed to `get-docs`, and
    /// the draft when it differs from the active rules (it becomes active
    /// when a full sync with it completes); or why the job fails.
    async fn check_rules(
        &self,
        runner: &mut Runner,
    ) -> Result<(rules::BasicRules, Option<String>, Option<String>), Stop> {
        let config = &self.config.rules;
        let mut problems: Vec<String> = match rules::validate(&config.basic) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        };
        let advanced = config.advanced.as_ref().map(|json| json.to_string());
        if let Some(json) = advanced.clone() {
            let takes = self
                .plugin
                .source
                .as_ref()
                .is_some_and(|d| d.advanced_rules);
            if !takes {
                problems.push(format!(
                    "source `{}` takes no advanced rules (its `describe` says so): remove sources.{}.rules.advanced",
                    self.name, self.name
                ));
            } else if let Runner::Wasm(session) = runner {
                let (result, host, _) = session
                    .call(None, move |instance, store| {
                        Box::pin(async move {
                            SourceBindings::new(&mut *store, instance)?
                                .call_validate_advanced_rules(store, &json)
                                .await
                        })
                    })
                    .await;
                end_call(host).await;
                match result {
                    Ok(errors) => problems.extend(errors.into_iter().map(|e| {
                        if e.ids.is_empty() {
                            format!("advanced rules: {}", e.message)
                        } else {
                            format!("advanced rules {}: {}", e.ids.join(", "), e.message)
                        }
                    })),
                    Err(failure) => {
                        return Err(Stop::Failed(format!(
                            "`validate-advanced-rules` failed: {failure}"
                        )));
                    }
                }
            }
        }
        let draft = serde_json::json!({
            "basic": config.basic.iter().map(|r| serde_json::json!({
                "id": r.id, "policy": r.policy, "field": r.field, "rule": r.rule,
                "value": r.value, "order": r.order,
            })).collect::<Vec<_>>(),
            "advanced": config.advanced,
        })
        .to_string();
        let before = self
            .sink
            .rules(&self.name)
            .await
            .map_err(|e| Stop::Failed(format!("cannot read the sync rules: {e:#}")))?
            .and_then(|(_, active, _)| active);
        // No rules and none before count as the same.
        let empty = config.basic.is_empty() && config.advanced.is_none();
        let new_rules = match &before {
            Some(active) => *active != draft,
            None => !empty,
        };
        // A valid draft is recorded valid (the active rules change only
        // when a full sync with it completes); an invalid one with why.
        let recorded = if problems.is_empty() {
            self.sink.set_rules(&self.name, "valid", None, None).await
        } else {
            let errors = problems.join("; ");
            self.sink
                .set_rules(&self.name, "invalid", None, Some(errors))
                .await
        };
        recorded.map_err(|e| Stop::Failed(format!("cannot record the sync rules: {e:#}")))?;
        if !problems.is_empty() {
            return Err(Stop::Failed(format!(
                "the sync rules are invalid (sources.{}.rules): {}",
                self.name,
                problems.join("; ")
            )));
        }
        let basic = rules::validate(&config.basic).unwrap_or_default();
        Ok((basic, advanced, new_rules.then_some(draft)))
    }

    fn count(&self, op: &'static str) {
        metrics::counter!(crate::metrics::SYNC_DOCUMENTS, "source" => self.name.clone(), "op" => op)
            .increment(1);
    }

    /// Write `batch` with the job's counts so far.
    async fn flush(
        &self,
        turn: &Turn<'_>,
        batch: &mut Batch,
        job: &mut JobRecord,
    ) -> Result<(), Stop> {
        job.duration = turn.started.elapsed();
        let batch = std::mem::take(batch);
        let pending = batch.pending;
        self.commit(turn.lock, batch, job, None).await.map_err(|e| {
            // Not written: not counted.
            job.counts.take_back(&pending);
            Stop::Failed(format!("{e:#}"))
        })
    }

    /// Publish `batch`'s change events to the source's outputs (each
    /// confirmed), then write it to the sink with `job`'s record (and the
    /// new sync `cursor`, at the end): an event may be published twice
    /// (a job that dies between the two redoes the batch), never lost.
    async fn commit(
        &self,
        lock: &sink::SinkLock,
        batch: Batch,
        job: &JobRecord,
        cursor: Option<Option<String>>,
    ) -> anyhow::Result<()> {
        if lock.lost() {
            anyhow::bail!(
                "the job lost the sink's lock (its connection closed): another engine may be syncing; nothing more is written"
            );
        }
        if !self.config.outputs.is_empty() && !batch.is_empty() {
            self.publish(&batch, job).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot publish the change events to sources.{}.outputs: {e:#}",
                    self.name
                )
            })?;
        }
        self.sink
            .write(batch, job, cursor)
            .await
            .map_err(|e| anyhow::anyhow!("cannot write to {}: {e:#}", self.sink.describe()))
    }

    /// The change events of `batch`, to every output of the source.
    async fn publish(&self, batch: &Batch, job: &JobRecord) -> anyhow::Result<()> {
        let deleted = self.sink.ids_of(&batch.deletes).await?;
        let event = |op: &str, id: &str, doc: &str| -> anyhow::Result<Vec<u8>> {
            let id = serde_json::to_string(id)?;
            Ok(format!("{{\"op\":\"{op}\",\"id\":{id},\"doc\":{doc}}}").into_bytes())
        };
        let mut events = Vec::with_capacity(batch.upserts.len() + deleted.len());
        for u in &batch.upserts {
            let op = if u.update { "update" } else { "index" };
            events.push((op, event(op, &u.id, &u.body)?));
        }
        for id in &deleted {
            events.push(("delete", event("delete", id, "null")?));
        }
        let emits: Vec<crate::capability::Emit> = self
            .config
            .outputs
            .iter()
            .flat_map(|output| {
                events.iter().map(|(op, payload)| crate::capability::Emit {
                    output: output.clone(),
                    payload: payload.clone(),
                    headers: vec![
                        ("x-sandpipe-source".into(), self.name.clone()),
                        ("x-sandpipe-op".into(), (*op).to_owned()),
                    ],
                })
            })
            .collect();
        // Names made from the job and the batch: unique, so no event
        // replaces another at an output that names messages.
        let batch_number = self
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let origin = format!("job-{}-{batch_number}", job.id);
        self.plugin
            .context
            .services
            .outputs
            .publish(
                &crate::output::Origin {
                    message_id: &origin,
                    plugin: &self.name,
                },
                &emits,
            )
            .await
    }
}

/// Whether `plugin`, a source, says it pages incrementally.
fn incremental(plugin: &LoadedPlugin) -> bool {
    plugin.source.as_ref().is_some_and(|d| d.incremental)
}

/// End what a call of a source left open: its SQL transaction (read-only
/// on an external database; a source's effects are never applied).
async fn end_call(host: crate::capability::HostState) {
    host.effects.discard().await;
}

/// Every source of `config` that loaded, by name, with why the others
/// did not.
pub fn sources(
    config: &crate::config::Config,
    plugins: &[Arc<LoadedPlugin>],
    sandbox: &Arc<Sandbox>,
    tls: &crate::tls::Tls,
) -> (Vec<Source>, Vec<String>) {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for name in config.sources.keys() {
        match Source::new(name, config, plugins, sandbox.clone(), tls) {
            Ok(source) => ok.push(source),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    (ok, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_become_their_md5_as_elastic_does() {
        let short = "a".repeat(512);
        assert_eq!(sink_id(short.clone()), short);
        let long = "a".repeat(513);
        // md5("a" * 513), as Python's hashlib gives it.
        let hashed = sink_id(long);
        assert_eq!(hashed.len(), 32);
        assert!(hashed.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(hashed, hex::encode(md5::Md5::digest("a".repeat(513))));
    }

    #[test]
    fn a_version_is_the_timestamp_else_the_body() {
        let v = version_of(Some("2026-01-01T00:00:00Z"), "{\"a\":1}");
        assert_eq!(v, version_of(Some("2026-01-01T00:00:00Z"), "{\"a\":2}"));
        assert_ne!(v, version_of(Some("2026-01-02T00:00:00Z"), "{\"a\":1}"));
        assert_ne!(version_of(None, "{\"a\":1}"), version_of(None, "{\"a\":2}"));
        // A timestamp equal to a body is still another version.
        assert_ne!(version_of(Some("x"), "y"), version_of(None, "x"));
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert_eq!(not_an_object(" {\"a\": [1, 2]}"), None);
        assert!(not_an_object("[1]").unwrap().contains("not a JSON object"));
        assert!(
            not_an_object("{\"a\": ")
                .unwrap()
                .contains("not valid JSON")
        );
        assert!(
            not_an_object("{} trailing")
                .unwrap()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn keys_are_stable_and_differ() {
        assert_eq!(key_of("doc-1"), key_of("doc-1"));
        assert_ne!(key_of("doc-1"), key_of("doc-2"));
        assert_eq!(
            sink::key_number(&key_of("doc-1")).to_be_bytes(),
            key_of("doc-1")
        );
    }

    #[test]
    fn job_names_round_trip() {
        for state in [
            JobState::Pending,
            JobState::InProgress,
            JobState::Canceling,
            JobState::Canceled,
            JobState::Completed,
            JobState::Error,
        ] {
            assert_eq!(JobState::parse(state.as_str()), state);
        }
        assert_eq!(JobKind::parse("incremental"), JobKind::Incremental);
        assert_eq!(Trigger::parse("scheduled"), Trigger::Scheduled);
    }
}
