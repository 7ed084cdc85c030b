//! The way of one message: envelope → resolution → routing → sandboxed
//! plugins → effects → status log → settlement.
//!
//! Architecture invariant: a delivery is settled exactly once, and only
//! after every routed plugin's effects are committed and its status is
//! durable in the status log.

pub use sandpipe_config::envelope;
pub mod routing;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::capability::{HostState, MessageContext, Services};
use crate::config::{Config, Dedupe};
use crate::listener::{Delivery, Listener, Settlement};
use crate::output::Origin;
use crate::plugins::LoadedPlugin;
use crate::sandbox::bindings::{Message, Outcome, WitError};
use crate::sandbox::{FailureKind, Sandbox};
use crate::status::{Entry, Status, StatusLog};
use crate::store::data::DataError;
use crate::store::meta::{MetaError, MetaStore};
use envelope::Envelope;

/// What a run made of the messages it settled.
///
/// A message is counted once, by its last settlement in the run: `done`,
/// `dead`, or `failed` when that was a retry (or a requeue after an
/// outage) that the run did not see finish. `deliveries` counts every
/// settlement, retries included. (A broker's duplicate of a message
/// already done counts again.)
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Distinct messages settled: `done + failed + dead`.
    pub processed: u64,
    /// Deliveries settled, retries and redeliveries included.
    pub deliveries: u64,
    /// Messages acknowledged: every routed plugin done or skipped.
    pub done: u64,
    /// Messages whose last settlement was a retry: not finished in this run.
    pub failed: u64,
    /// Messages dead-lettered.
    pub dead: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural =
            |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "processed {} {} ({} {}): {} done, {} failed, {} dead-lettered",
            self.processed,
            plural(self.processed, "message", "messages"),
            self.deliveries,
            plural(self.deliveries, "delivery", "deliveries"),
            self.done,
            self.failed,
            self.dead
        )
    }
}

/// The run's counts so far (see [`Summary`]).
#[derive(Default)]
struct Tally {
    deliveries: u64,
    done: u64,
    dead: u64,
    /// Messages whose last settlement was a retry or a requeue; a message
    /// leaves when it is done or dead-lettered, so this holds only what is
    /// waiting for another attempt.
    pending: HashSet<String>,
}

/// How a delivery was settled, as the tally sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Done,
    /// Retried or requeued: it comes back.
    Again,
    Dead,
}

impl Tally {
    fn settled(&mut self, id: String, how: Settled) {
        self.deliveries += 1;
        match how {
            Settled::Done => {
                self.pending.remove(&id);
                self.done += 1;
            }
            Settled::Dead => {
                self.pending.remove(&id);
                self.dead += 1;
            }
            Settled::Again => {
                self.pending.insert(id);
            }
        }
    }

    fn summary(&self) -> Summary {
        let failed = self.pending.len() as u64;
        Summary {
            processed: self.done + self.dead + failed,
            deliveries: self.deliveries,
            done: self.done,
            failed,
            dead: self.dead,
        }
    }
}

/// What the pipeline needs of a delivery besides its content.
struct Taken<'a> {
    attempt: u32,
    /// Certainly its first delivery ([`Delivery::first`]).
    first: bool,
    name: &'a str,
}

/// The longest status-log reason of one plugin on one message.
pub const MAX_INFO: usize = 16 * 1024;

/// What one plugin made of one message.
struct PluginResult {
    plugin: Arc<LoadedPlugin>,
    status: Status,
    info: String,
    retry_after: Option<Duration>,
    duration: Duration,
    fuel: Option<u64>,
    /// The failure was a backend's (an output, a store), not the message's.
    outage: bool,
}

/// A `done` plugin's PostgreSQL transaction, its only effect, left open
/// for the message's status rows to join (see [`StatusLog::record_within`]).
type Held = Option<crate::capability::sql::Transaction>;

/// The pipeline: everything needed to process deliveries.
pub struct Pipeline {
    config: Arc<Config>,
    sandbox: Arc<Sandbox>,
    plugins: Vec<Arc<LoadedPlugin>>,
    status: StatusLog,
    meta: MetaStore,
    services: Arc<Services>,
    tally: std::sync::Mutex<Tally>,
    /// Consecutive outages (reset by a message that settles normally).
    outages: AtomicU64,
    /// No new deliveries are taken before this instant.
    pause_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Message ids being processed now.
    busy_ids: KeyedLocks,
}

/// One async lock per key, made on demand and dropped when unused.
#[derive(Default)]
struct KeyedLocks {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one key; releases (and forgets an unused key) on drop.
struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = match self.locks.lock() {
            Ok(mut map) => map.entry(key.to_owned()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        };
        KeyGuard {
            locks: self,
            key: key.to_owned(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Ok(mut map) = self.locks.locks.lock()
            && map
                .get(&self.key)
                .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

impl Pipeline {
    /// Assemble a pipeline from loaded parts.
    pub fn new(
        config: Arc<Config>,
        sandbox: Arc<Sandbox>,
        plugins: Vec<Arc<LoadedPlugin>>,
        status: StatusLog,
        meta: MetaStore,
        services: Arc<Services>,
    ) -> Self {
        Self {
            config,
            sandbox,
            plugins,
            status,
            meta,
            services,
            tally: std::sync::Mutex::new(Tally::default()),
            outages: AtomicU64::new(0),
            pause_until: std::sync::Mutex::new(None),
            busy_ids: KeyedLocks::default(),
        }
    }

    /// The status log.
    pub fn status_log(&self) -> &StatusLog {
        &self.status
    }

    /// Counts so far.
    pub fn summary(&self) -> Summary {
        self.tally.lock().map(|t| t.summary()).unwrap_or_default()
    }

    /// Take deliveries from `listener` until it is drained or `shutdown`
    /// becomes true; then finish what is in flight and return the counts.
    pub async fn run(
        self: &Arc<Self>,
        listener: Arc<dyn Listener>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Summary> {
        let slots = Arc::new(Semaphore::new(self.config.pipeline.concurrency));
        let mut tasks = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let pause = self.pause_until.lock().ok().and_then(|mut p| p.take());
            if let Some(until) = pause {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                permit = slots.clone().acquire_owned() => permit?,
            };
            let delivery = tokio::select! {
                _ = shutdown.changed() => break,
                delivery = listener.recv() => delivery?,
            };
            let Some(delivery) = delivery else { break };
            let this = self.clone();
            tasks.spawn(async move {
                this.process(delivery).await;
                drop(permit);
            });
            while let Some(joined) = tasks.try_join_next() {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a message task failed");
                }
            }
        }
        tracing::info!(in_flight = tasks.len(), "finishing messages in flight");
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a message task failed");
            }
        }
        listener.close().await;
        Ok(self.summary())
    }

    /// Process one delivery and settle it. Never leaves it unsettled.
    pub async fn process(&self, delivery: Delivery) {
        let Delivery {
            body,
            headers,
            attempt,
            first,
            name,
            acker,
        } = delivery;
        metrics::counter!(crate::metrics::RECEIVED).increment(1);
        let in_flight = metrics::gauge!(crate::metrics::IN_FLIGHT);
        in_flight.increment(1.0);
        // The message's id once known (for the summary), else the delivery's.
        let mut id = None;
        let delivery = Taken {
            attempt,
            first,
            name: &name,
        };
        let settlement = match self.decide(&body, &headers, &delivery, &mut id).await {
            Ok(s) => s,
            Err(e) => {
                // An infrastructure failure (status log, stores): not the
                // message's fault, so the attempt does not count.
                tracing::error!(delivery = %name, error = format!("{e:#}"), "cannot process; will retry");
                Settlement::Requeue {
                    delay: self.backoff_for_outage(),
                    reason: format!("{e:#}"),
                }
            }
        };
        let label = match &settlement {
            Settlement::Ack => "done",
            Settlement::Retry { .. } => "retry",
            Settlement::Requeue { .. } => "requeue",
            Settlement::DeadLetter { .. } => "dead",
        };
        metrics::counter!(crate::metrics::SETTLED, "settlement" => label).increment(1);
        let outcome = match &settlement {
            Settlement::Ack => Settled::Done,
            Settlement::Retry { .. } | Settlement::Requeue { .. } => Settled::Again,
            Settlement::DeadLetter { .. } => Settled::Dead,
        };
        match acker.settle(settlement).await {
            Ok(()) => {
                let id = id.unwrap_or_else(|| format!("delivery:{name}"));
                if let Ok(mut tally) = self.tally.lock() {
                    tally.settled(id, outcome);
                }
            }
            Err(e) => tracing::error!(delivery = %name, error = format!("{e:#}"), "cannot settle"),
        }
        in_flight.decrement(1.0);
    }

    async fn dead(
        &self,
        id: &str,
        attempt: u32,
        reason: String,
        mut entries: Vec<Entry>,
    ) -> anyhow::Result<Settlement> {
        tracing::warn!(message_id = id, "dead-lettered: {reason}");
        entries.push(Entry::message(id, attempt, Status::Dead, reason.clone()));
        self.status.record(entries).await?;
        let report = serde_json::to_value(self.status.rows(id).await?)?;
        Ok(Settlement::DeadLetter { reason, report })
    }

    async fn decide(
        &self,
        body: &bytes::Bytes,
        headers: &[(String, String)],
        delivery: &Taken<'_>,
        message_id: &mut Option<String>,
    ) -> anyhow::Result<Settlement> {
        let (attempt, name) = (delivery.attempt, delivery.name);
        let max = self.config.pipeline.max_message_bytes;
        if body.len() as u64 > max.as_u64() {
            // Not parsed: its id is unknown, and parsing is what a huge
            // message would attack.
            let id = format!("delivery:{name}");
            metrics::counter!(crate::metrics::LIMIT_EXCEEDED, "limit" => "max_message_bytes")
                .increment(1);
            let received = Entry::message(&id, attempt, Status::Received, "");
            let reason = format!(
                "message too large: {} bytes or more, larger than {max} (pipeline.max_message_bytes); not parsed",
                body.len()
            );
            return self.dead(&id, attempt, reason, vec![received]).await;
        }
        let envelope = match envelope::parse(body, &self.config.message_fields) {
            Ok(e) => e,
            Err(err) => {
                let id = err.id.clone().unwrap_or_else(|| format!("delivery:{name}"));
                *message_id = Some(id.clone());
                let received = Entry::message(&id, attempt, Status::Received, "");
                return self
                    .dead(
                        &id,
                        attempt,
                        format!("bad message: {}", err.reason),
                        vec![received],
                    )
                    .await;
            }
        };
        let id = if envelope.id.is_empty() {
            format!("delivery:{name}")
        } else {
            envelope.id.clone()
        };
        *message_id = Some(id.clone());
        // A broker redelivers what a dropped connection left unacked, possibly
        // while this process still works on the first copy: one copy of a
        // message at a time, so the second sees the first's durable status
        // and does not run its plugins again.
        let _one_at_a_time = self.busy_ids.lock(&id).await;
        let mut received = Entry::message(&id, attempt, Status::Received, envelope.kind.clone());

        // Routed by the envelope's type before anything is fetched; a
        // message without one, when `message_fields.mime_path` is set, by
        // the type in its metadata once that is resolved.
        let mime_path = self.config.message_fields.mime_path.as_deref();
        let type_in_metadata = envelope.kind.is_empty() && mime_path.is_some();
        let mut routed = Vec::new();
        if !type_in_metadata {
            routed = self.route(&envelope.kind);
            if routed.is_empty() {
                let reason = self.unrouted(&envelope.kind);
                return self.dead(&id, attempt, reason, vec![received]).await;
            }
        }

        // The look-up of the plugins already finished (a redelivery skips
        // them) does not depend on the resolution: both at once, so the
        // look-up's round trip hides behind the stores'. A first delivery
        // has nothing to find (`pipeline.dedupe`).
        let look_up = !delivery.first || self.config.pipeline.dedupe == Dedupe::EveryDelivery;
        let step = std::time::Instant::now();
        let (resolved, finished) = tokio::join!(
            async {
                let resolved = self.resolve(&id, &envelope, headers, body).await;
                record_step("resolve", step);
                resolved
            },
            async {
                if !look_up {
                    return Ok(HashSet::new());
                }
                let finished = self.status.finished_plugins(&id).await;
                record_step("lookup", step);
                finished
            },
        );
        let mut message = match resolved {
            Ok(m) => m,
            Err(Resolution::Permanent(reason)) => {
                return self.dead(&id, attempt, reason, vec![received]).await;
            }
            Err(Resolution::Transient(reason)) => {
                return self
                    .requeue_outage(&id, attempt, reason, vec![received])
                    .await;
            }
        };
        if let (true, Some(path)) = (type_in_metadata, mime_path) {
            let kind = match envelope::mime_from_metadata(&message.metadata, path) {
                Ok(Some(kind)) => kind,
                Ok(None) => {
                    let reason = envelope::no_mime_reason(&self.config.message_fields);
                    return self.dead(&id, attempt, reason, vec![received]).await;
                }
                Err(reason) => return self.dead(&id, attempt, reason, vec![received]).await,
            };
            received.info = format!("{kind} (metadata {path})");
            routed = self.route(&kind);
            if routed.is_empty() {
                let reason = self.unrouted(&kind);
                return self.dead(&id, attempt, reason, vec![received]).await;
            }
            message.kind = kind;
        }
        let message = Arc::new(message);

        let finished: HashSet<String> = finished?;
        let to_run: Vec<Arc<LoadedPlugin>> = routed
            .into_iter()
            .filter(|p| !finished.contains(&p.name))
            .collect();
        // The plugins that run are the routed ones without a done or
        // skipped row; each gets its row when it ends. The received row
        // goes with the message's final rows, in the same statement: one
        // write (and one fsync) per message instead of two. A message the
        // engine is still working on, or that a crash interrupted, has no
        // row yet; its redelivery writes them.

        // A message with one plugin to run whose only effect is SQL on
        // the status log's PostgreSQL: its status rows are written in the
        // plugin's own transaction, one commit for both.
        let hold = to_run.len() == 1 && self.status.writes_within();
        let step = std::time::Instant::now();
        let (results, held): (Vec<PluginResult>, Vec<Held>) = futures::stream::iter(to_run)
            .map(|plugin| self.run_plugin(plugin, message.clone(), attempt, hold))
            .buffer_unordered(self.config.pipeline.plugin_concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .unzip();
        let held = held.into_iter().flatten().next();
        record_step("plugins", step);

        let max = self.config.retry.max_attempts;
        let dead: Vec<&PluginResult> = results
            .iter()
            .filter(|r| r.status == Status::Dead)
            .collect();
        let failed: Vec<&PluginResult> = results
            .iter()
            .filter(|r| r.status == Status::Failed)
            .collect();
        let mut entries: Vec<Entry> = std::iter::once(received)
            .chain(results.iter().map(|r| {
                let mut e = self.plugin_entry(&r.plugin, &id, attempt, r.status, r.info.clone());
                e.duration_ms = Some(r.duration.as_secs_f64() * 1000.0);
                e.fuel_used = r.fuel;
                e
            }))
            .collect();
        let describe = |rs: &[&PluginResult]| {
            rs.iter()
                .map(|r| format!("plugin `{}`: {}", r.plugin.name, r.info))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let outages: Vec<&PluginResult> = failed.iter().copied().filter(|r| r.outage).collect();
        if !outages.is_empty() {
            return self
                .requeue_outage(&id, attempt, describe(&outages), entries)
                .await;
        }
        if !dead.is_empty() {
            return self.dead(&id, attempt, describe(&dead), entries).await;
        }
        if !failed.is_empty() {
            if attempt >= max {
                let reason = format!(
                    "failed {attempt} of {max} attempts; last: {}",
                    describe(&failed)
                );
                return self.dead(&id, attempt, reason, entries).await;
            }
            let hint = failed
                .iter()
                .filter_map(|r| r.retry_after)
                .max()
                .unwrap_or_default();
            let delay = self.config.retry.backoff.delay(attempt).max(hint);
            let reason = describe(&failed);
            entries.push(Entry::message(
                &id,
                attempt,
                Status::Failed,
                format!("retry in {delay:?}: {reason}"),
            ));
            self.status.record(entries).await?;
            return Ok(Settlement::Retry { delay, reason });
        }
        self.outages.store(0, Ordering::SeqCst);
        entries.push(Entry::message(&id, attempt, Status::Done, ""));
        let step = std::time::Instant::now();
        if let Some(tx) = held {
            let committed = self.status.record_within(tx, &entries).await;
            record_step("commit", step);
            if let Err(e) = committed {
                // Neither the effects nor the rows: as any failed commit.
                entries.pop();
                let info = format!("effects could not be committed: {e:#}");
                if let Some(row) = entries.iter_mut().find(|e| !e.plugin.is_empty()) {
                    row.status = Status::Failed;
                    row.info = info.clone();
                }
                let plugin = results.first().map(|r| r.plugin.name.as_str());
                let reason = format!("plugin `{}`: {info}", plugin.unwrap_or_default());
                return self.requeue_outage(&id, attempt, reason, entries).await;
            }
            return Ok(Settlement::Ack);
        }
        self.status.record(entries).await?;
        record_step("status", step);
        Ok(Settlement::Ack)
    }

    /// The plugins whose MIME patterns match `kind`.
    fn route(&self, kind: &str) -> Vec<Arc<LoadedPlugin>> {
        self.plugins
            .iter()
            .filter(|p| p.mime.iter().any(|m| routing::mime_matches(m, kind)))
            .cloned()
            .collect()
    }

    /// Why no plugin takes `kind`.
    fn unrouted(&self, kind: &str) -> String {
        let loaded: Vec<String> = self
            .plugins
            .iter()
            .map(|p| format!("{} [{}]", p.name, p.mime.join(", ")))
            .collect();
        format!(
            "no plugin handles MIME type `{kind}` (loaded: {})",
            crate::config::list_or_none(loaded)
        )
    }

    /// A dependency is down: not the message's fault. Keep the attempt,
    /// try again later, and slow down taking new work.
    async fn requeue_outage(
        &self,
        id: &str,
        attempt: u32,
        reason: String,
        mut entries: Vec<Entry>,
    ) -> anyhow::Result<Settlement> {
        let delay = self.backoff_for_outage();
        entries.push(Entry::message(
            id,
            attempt,
            Status::Failed,
            format!("backend unavailable, requeued in {delay:?} (attempt not counted): {reason}"),
        ));
        self.status.record(entries).await?;
        Ok(Settlement::Requeue { delay, reason })
    }

    /// The delay before retrying after an outage, growing while outages
    /// continue; also pauses taking new deliveries for that long.
    fn backoff_for_outage(&self) -> Duration {
        let n = self.outages.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = self.config.retry.backoff.delay(n.min(16) as u32);
        if let Ok(mut pause) = self.pause_until.lock() {
            *pause = Some(std::time::Instant::now() + delay);
        }
        tracing::warn!("a backend is unavailable: pausing new work for {delay:?}");
        delay
    }

    fn plugin_entry(
        &self,
        p: &LoadedPlugin,
        id: &str,
        attempt: u32,
        status: Status,
        info: String,
    ) -> Entry {
        Entry {
            message_id: id.to_owned(),
            plugin: p.name.clone(),
            plugin_version: p.description.version.clone(),
            component_sha256: p.component.sha256.clone(),
            attempt,
            status,
            info,
            duration_ms: None,
            fuel_used: None,
        }
    }

    async fn resolve(
        &self,
        id: &str,
        envelope: &Envelope,
        headers: &[(String, String)],
        body: &bytes::Bytes,
    ) -> Result<MessageContext, Resolution> {
        // An absolute location (sqAPI's) becomes the root-relative one:
        // the location plugins see and can open.
        let data_location = match &envelope.data_location {
            Some(given) => {
                let location = self
                    .services
                    .data
                    .message_location(given)
                    .map_err(|e| Resolution::Permanent(format!("bad data_location: {e}")))?;
                let named = if location == *given {
                    format!("`{location}`")
                } else {
                    format!("`{given}` (`{location}` in the data store)")
                };
                match self.services.data.exists(&location).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(Resolution::Permanent(format!(
                            "data object {named} not found in the data store"
                        )));
                    }
                    Err(DataError::Invalid(m)) | Err(DataError::NotFound(m)) => {
                        let m = if location == *given {
                            m
                        } else {
                            format!("{m} (given as `{given}`)")
                        };
                        return Err(Resolution::Permanent(format!("bad data_location: {m}")));
                    }
                    Err(e @ DataError::Unavailable(_)) => {
                        return Err(Resolution::Transient(e.to_string()));
                    }
                }
                Some(location)
            }
            None => None,
        };
        let mut metadata = envelope.metadata.clone();
        if let Some(location) = &envelope.meta_location {
            match self
                .meta
                .fetch(location, self.config.pipeline.max_metadata_bytes)
                .await
            {
                Ok(found) => metadata.extend(found),
                Err(e @ MetaError::Unavailable(_)) => {
                    return Err(Resolution::Transient(e.to_string()));
                }
                Err(e @ MetaError::TooLarge(..)) => {
                    metrics::counter!(crate::metrics::LIMIT_EXCEEDED, "limit" => "max_metadata_bytes")
                        .increment(1);
                    return Err(Resolution::Permanent(e.to_string()));
                }
                Err(e) => return Err(Resolution::Permanent(e.to_string())),
            }
        }
        Ok(MessageContext {
            id: id.to_owned(),
            kind: envelope.kind.clone(),
            data_location,
            meta_location: envelope.meta_location.clone(),
            metadata,
            headers: headers.to_vec(),
            body: body.clone(),
        })
    }

    async fn run_plugin(
        &self,
        plugin: Arc<LoadedPlugin>,
        message: Arc<MessageContext>,
        attempt: u32,
        hold: bool,
    ) -> (PluginResult, Held) {
        let wit_message = Message {
            id: message.id.clone(),
            kind: message.kind.clone(),
            data_location: message.data_location.clone(),
            meta_location: message.meta_location.clone(),
            headers: message.headers.clone(),
            body: message.body.to_vec(),
            attempt,
        };
        let mut host = HostState::new(plugin.context.clone(), Some(message.clone()));
        host.effects.begin_early(&plugin.context);
        let limits = &plugin.context.limits;
        let (result, mut host, usage) = self
            .sandbox
            .execute(&plugin.component, limits, host, wit_message)
            .await;
        host.effects.settle_sql(&plugin.context);
        let denials = std::mem::take(&mut host.denials);
        let outages = std::mem::take(&mut host.outages);
        let mut outage = false;
        let mut held = None;
        // Denials are counted as they happen (`HostState::deny`): the list
        // keeps only the first 100.
        let label = plugin.name.clone();
        metrics::histogram!(crate::metrics::INVOCATION_SECONDS, "plugin" => label.clone())
            .record(usage.duration.as_secs_f64());
        if let Some(fuel) = usage.fuel {
            metrics::counter!(crate::metrics::FUEL, "plugin" => label.clone()).increment(fuel);
        }
        let with_denials = |info: String| {
            if denials.is_empty() {
                info
            } else {
                format!("{info} [denied: {}]", denials.join("; "))
            }
        };
        let (status, info, retry_after) = match result {
            Ok(Ok(Outcome::Done)) if hold && host.effects.only_postgres_sql() => {
                held = host.effects.sql.take();
                (Status::Done, with_denials(String::new()), None)
            }
            Ok(Ok(Outcome::Done)) => match self.commit(&plugin, &message, host).await {
                Ok(()) => (Status::Done, with_denials(String::new()), None),
                Err(e) => {
                    outage = true;
                    (
                        Status::Failed,
                        format!("effects could not be committed: {e:#}"),
                        None,
                    )
                }
            },
            Ok(Ok(outcome)) => {
                discard(host).await;
                match outcome {
                    Outcome::Skip(why) => (Status::Skipped, with_denials(why), None),
                    Outcome::Retry(r) => (
                        Status::Failed,
                        with_denials(format!("plugin asked for a retry: {}", r.reason)),
                        Some(Duration::from_millis(r.delay_ms)),
                    ),
                    Outcome::DeadLetter(why) => (
                        Status::Dead,
                        with_denials(format!("plugin dead-lettered it: {why}")),
                        None,
                    ),
                    Outcome::Done => (Status::Done, String::new(), None),
                }
            }
            Ok(Err(error)) => {
                discard(host).await;
                let kind = if denials.is_empty() {
                    FailureKind::PluginError
                } else {
                    FailureKind::DeniedCall
                };
                (
                    Status::Failed,
                    with_denials(format!("{}: {}", kind.as_str(), wit_error_text(&error))),
                    None,
                )
            }
            Err(failure) => {
                discard(host).await;
                let info = if failure.kind == FailureKind::DeniedCall {
                    failure.to_string()
                } else {
                    with_denials(failure.to_string())
                };
                (Status::Failed, info, None)
            }
        };
        if status == Status::Failed && !outages.is_empty() {
            outage = true;
        }
        let info = if outages.is_empty() {
            info
        } else {
            format!("{info} [unavailable: {}]", outages.join("; "))
        };
        // A plugin's reason (skip, retry, dead-letter, error) is its own
        // text: the status log keeps no more than MAX_INFO of it.
        let info = crate::capability::cut(info, MAX_INFO);
        metrics::counter!(crate::metrics::PLUGIN_RESULTS, "plugin" => label, "status" => status.as_str())
            .increment(1);
        match status {
            Status::Failed | Status::Dead => {
                tracing::warn!(plugin = %plugin.name, message_id = %message.id, attempt, "{info}")
            }
            _ => {
                tracing::debug!(plugin = %plugin.name, message_id = %message.id, "{}", status.as_str())
            }
        }
        let result = PluginResult {
            plugin,
            status,
            info,
            retry_after,
            duration: usage.duration,
            fuel: usage.fuel,
            outage,
        };
        (result, held)
    }

    /// Apply a `done` invocation's effects, in the fixed order: SQL commit,
    /// blob writes, state, then outputs (each confirmed).
    async fn commit(
        &self,
        plugin: &LoadedPlugin,
        message: &MessageContext,
        host: HostState,
    ) -> anyhow::Result<()> {
        let step = std::time::Instant::now();
        let committed = self.apply(plugin, message, host.effects).await;
        record_step("commit", step);
        committed
    }

    async fn apply(
        &self,
        plugin: &LoadedPlugin,
        message: &MessageContext,
        effects: crate::capability::Effects,
    ) -> anyhow::Result<()> {
        let origin = Origin {
            message_id: &message.id,
            plugin: &plugin.name,
        };
        effects.apply(&self.services, &origin).await
    }
}

/// Time spent in one step of a message's way (`sandpipe_message_step_seconds`).
fn record_step(step: &'static str, since: std::time::Instant) {
    metrics::histogram!(crate::metrics::STEP_SECONDS, "step" => step)
        .record(since.elapsed().as_secs_f64());
}

enum Resolution {
    Permanent(String),
    Transient(String),
}

async fn discard(host: HostState) {
    host.effects.discard().await;
}

/// `access-denied: ...` and so on.
pub fn wit_error_text(error: &WitError) -> String {
    crate::error::HostError::from(error.clone()).to_string()
}

#[cfg(test)]
mod keyed_lock_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn one_holder_per_key_and_unused_keys_are_forgotten() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("m").await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        let other = locks.lock("other").await; // another key is not blocked
        drop(other);
        for t in tasks {
            t.await.unwrap_or_default();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(locks.locks.lock().map(|m| m.is_empty()).unwrap_or(false));
    }
}

#[cfg(test)]
mod tally_tests {
    use super::*;

    #[test]
    fn messages_are_counted_once_by_their_last_settlement() {
        let mut tally = Tally::default();
        tally.settled("fine".into(), Settled::Done);
        // Retried twice, then done.
        tally.settled("flaky".into(), Settled::Again);
        tally.settled("flaky".into(), Settled::Again);
        tally.settled("flaky".into(), Settled::Done);
        // Retried, then dead-lettered.
        tally.settled("bad".into(), Settled::Again);
        tally.settled("bad".into(), Settled::Dead);
        // Retried and not back within the run.
        tally.settled("later".into(), Settled::Again);
        let summary = tally.summary();
        assert_eq!(
            summary,
            Summary {
                processed: 4,
                deliveries: 7,
                done: 2,
                failed: 1,
                dead: 1,
            }
        );
        assert_eq!(
            summary.to_string(),
            "processed 4 messages (7 deliveries): 2 done, 1 failed, 1 dead-lettered"
        );
        assert!(
            tally.pending.len() == 1,
            "only what waits for a retry is kept"
        );
        let one = Summary {
            processed: 1,
            deliveries: 1,
            done: 1,
            ..Summary::default()
        };
        assert_eq!(
            one.to_string(),
            "processed 1 message (1 delivery): 1 done, 0 failed, 0 dead-lettered"
        );
    }
}
