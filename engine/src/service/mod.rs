//! Services: components of the `service` world, answering queries, events
//! and HTTP requests on warm instances (docs/services.md).
//!
//! A [`Service`] holds `services.NAME.instances` [`Session`]s (warm
//! instances, limits armed per call, restarted after a trap with a
//! backoff). Every transport maps onto the same calls: [`Service::query`]
//! streams [`Frame`]s, [`Service::publish`] acts on an event,
//! [`Service::request`] answers a declared route. Before an instance serves
//! anything it is connected: `on-connect` for each source with the source's
//! current configuration — on a fresh instance (the first, or one started
//! after a trap), and again (after `on-close`) when a source's
//! configuration changed. A call in flight finishes on the configuration
//! its instance had when it started.
//!
//! A call's effects (SQL, blob writes, state, emits) are applied when it
//! returns without an error, as a plugin's are on `done`; a query's final
//! reply goes out after that.

pub mod broker;
pub mod http;
pub mod reply;
pub mod routes;
pub mod stream;
pub mod token_storage;
pub mod vantiq;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

use crate::capability::HostState;
use crate::config::service::ServiceConfig;
use crate::plugins::LoadedPlugin;
use crate::sandbox::bindings::service::sandpipe::connector::notify;
use crate::sandbox::bindings::{Event, Query, Request, Response, ServiceDescription, WitError};
use crate::sandbox::{
    Failure, InvocationState, NativeService, Sandbox, Service as Bindings, Session, World,
};
pub use reply::Frame;

/// Notifications kept for a follower that reads slowly; past it the
/// follower is told how many it missed.
const NOTIFICATIONS_KEPT: usize = 256;

/// The largest notification body: with [`NOTIFICATIONS_KEPT`], what one
/// slow follower can make the engine hold (16 MiB per service).
pub const MAX_NOTIFICATION_BYTES: u64 = 64 * 1024;

/// Events a service sends back (`notify.send`) to whoever follows it.
pub struct Notifications {
    /// The service's name.
    service: String,
    sender: broadcast::Sender<Notification>,
}

/// One notification.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The source it is for.
    pub source: String,
    /// The event.
    pub body: Value,
}

impl Notifications {
    /// Follow the notifications from now on.
    pub fn follow(&self) -> broadcast::Receiver<Notification> {
        self.sender.subscribe()
    }
}

impl notify::Host for InvocationState {
    async fn send(&mut self, source: String, body: String) -> Result<(), WitError> {
        let Some(notifications) = self.host.notify.clone() else {
            return Err(WitError::Invalid(
                "`notify.send` is for a service's calls: nothing follows this component".into(),
            ));
        };
        if body.len() as u64 > MAX_NOTIFICATION_BYTES {
            return Err(WitError::LimitExceeded(format!(
                "a notification of {} bytes is larger than {MAX_NOTIFICATION_BYTES} bytes",
                body.len(),
            )));
        }
        let body: Value = serde_json::from_str(&body)
            .map_err(|e| WitError::Invalid(format!("a notification must be JSON: {e}")))?;
        notifications
            .sender
            .send(Notification {
                source: source.clone(),
                body,
            })
            .map(drop)
            .map_err(|_| {
                WitError::Unavailable(format!(
                    "no one is connected to source `{source}` of service `{}`",
                    notifications.service
                ))
            })
    }
}

/// A source's current configuration.
#[derive(Debug, Clone)]
struct Connection {
    /// Bumped by every change.
    generation: u64,
    /// JSON text, as `on-connect` gets it.
    config: String,
}

/// What runs a service's calls: a warm instance of its component, or the
/// service compiled into the engine (benchmarks).
enum Runner {
    Wasm(Session),
    Native(Arc<dyn NativeService>),
}

impl Runner {
    fn is_warm(&self) -> bool {
        match self {
            Self::Wasm(session) => session.is_warm(),
            Self::Native(_) => true,
        }
    }

    fn instances_started(&self) -> u64 {
        match self {
            Self::Wasm(session) => session.instances_started(),
            Self::Native(_) => 1,
        }
    }

    fn ready_at(&self) -> Option<Instant> {
        match self {
            Self::Wasm(session) => session.ready_at(),
            Self::Native(_) => None,
        }
    }

    fn reset(&mut self) {
        if let Self::Wasm(session) = self {
            session.reset();
        }
    }
}

/// One call of a service's exports.
pub(crate) enum Call {
    Connect { source: String, config: String },
    Close { source: String },
    Publish(Event),
    Query(Query, reply::Reply),
    Request(Request),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Close { .. } => "close",
            Self::Publish(_) => "publish",
            Self::Query(..) => "query",
            Self::Request(_) => "request",
        }
    }
}

/// What a call returned.
pub(crate) enum Output {
    Done,
    Response(Response),
}

/// `call` on a component's instance.
pub(crate) async fn wasm_call(
    instance: &wasmtime::component::Instance,
    store: &mut wasmtime::Store<InvocationState>,
    call: Call,
) -> wasmtime::Result<Result<Output, WitError>> {
    let bindings = Bindings::new(&mut *store, instance)?;
    let done = |r: Result<(), WitError>| r.map(|()| Output::Done);
    Ok(match call {
        Call::Connect { source, config } => done(
            bindings
                .call_on_connect(&mut *store, &source, &config)
                .await?,
        ),
        Call::Close { source } => done(bindings.call_on_close(&mut *store, &source).await?),
        Call::Publish(event) => done(bindings.call_on_publish(&mut *store, &event).await?),
        Call::Query(query, reply) => {
            let handle = store.data_mut().table.push(reply)?;
            done(bindings.call_on_query(&mut *store, &query, handle).await?)
        }
        Call::Request(request) => bindings
            .call_on_request(&mut *store, &request)
            .await?
            .map(Output::Response),
    })
}

/// `call` on a service compiled into the engine.
async fn native_call(
    native: &dyn NativeService,
    state: &mut InvocationState,
    call: Call,
) -> Result<Output, WitError> {
    match call {
        Call::Connect { .. } | Call::Close { .. } => Ok(Output::Done),
        Call::Publish(event) => native.on_publish(state, event).await.map(|()| Output::Done),
        Call::Query(query, reply) => {
            let handle = state
                .table
                .push(reply)
                .map_err(|e| WitError::Internal(e.to_string()))?;
            native
                .on_query(state, query, handle)
                .await
                .map(|()| Output::Done)
        }
        Call::Request(request) => native
            .on_request(state, request)
            .await
            .map(Output::Response),
    }
}

/// One warm instance and what it is connected to.
struct Slot {
    session: Runner,
    /// Each source's configuration generation the instance connected with.
    connected: BTreeMap<String, u64>,
    /// The instance `connected` is about (`Session::instances_started`).
    instance: u64,
    /// The sources' version (`Service::sources_version`) the instance was
    /// last fully connected at; 0: never.
    version: u64,
}

impl Slot {
    /// Forget what a replaced (or gone) instance was connected to.
    fn check_instance(&mut self) {
        let now = self.session.instances_started();
        if !self.session.is_warm() || now != self.instance {
            self.connected.clear();
            self.instance = now;
        }
    }
}

/// An instance taken from the pool with its turn; back into the pool when
/// dropped. A call cut off half-way (its future dropped) leaves the
/// instance's store mid-call: such an instance is dropped, and the slot
/// goes back empty.
struct Taken<'a> {
    service: &'a Service,
    slot: Option<Slot>,
    done: bool,
    _turn: tokio::sync::SemaphorePermit<'a>,
}

impl Taken<'_> {
    fn slot(&mut self) -> &mut Slot {
        // Only `Drop` takes the slot out.
        #[allow(clippy::unwrap_used)]
        self.slot.as_mut().unwrap()
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            if !self.done {
                slot.session.reset();
                slot.connected.clear();
            }
            if let Ok(mut idle) = self.service.idle.lock() {
                idle.push(slot);
            }
        }
    }
}

/// Why a call has no result of the guest's.
#[derive(Debug)]
pub enum CallError {
    /// No instance came free within `queue_timeout`, or the service stops.
    Busy(String),
    /// The call's source is not connected (`on-connect` failed, or the
    /// service has no such source).
    NotConnected(String),
    /// The guest returned an error.
    Guest(WitError),
    /// The call trapped, ran out of time or fuel, or hit a limit.
    Failed(Failure),
    /// The call ended well, but its effects could not be applied.
    Commit(String),
}

impl CallError {
    /// A short stable name (metrics, error codes).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Busy(_) => "busy",
            Self::NotConnected(_) => "notConnected",
            Self::Guest(_) => "error",
            Self::Failed(_) => "failed",
            Self::Commit(_) => "commit",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy(m) | Self::NotConnected(m) | Self::Commit(m) => f.write_str(m),
            Self::Guest(e) => f.write_str(&crate::pipeline::wit_error_text(e)),
            Self::Failed(failure) => write!(f, "{failure}"),
        }
    }
}

/// A service's state, as `/v1/services` and `sandpipe services` show it.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Each source whose last `on-connect` failed, with why.
    failing: BTreeMap<String, String>,
    /// Whether any `on-connect` succeeded yet.
    connected_once: bool,
    /// The last failure (a connect, a trap), if any.
    last_error: Option<String>,
}

/// A Vantiq source's connection as the service knows it.
#[derive(Debug, Clone, Default)]
struct LinkState {
    /// The connection attempt this is about.
    epoch: u64,
    /// Up and configured.
    up: bool,
    /// Why not.
    note: Option<String>,
}

/// One service, ready to serve.
pub struct Service {
    name: String,
    config: ServiceConfig,
    sandbox: Arc<Sandbox>,
    plugin: Arc<LoadedPlugin>,
    description: ServiceDescription,
    /// Turns for the instances.
    turns: Semaphore,
    idle: std::sync::Mutex<Vec<Slot>>,
    sources: std::sync::Mutex<BTreeMap<String, Connection>>,
    generation: AtomicU64,
    /// Bumped whenever a source is added, changed or removed: an instance
    /// connected at the current version needs no look at the sources.
    sources_version: AtomicU64,
    notifications: Arc<Notifications>,
    health: std::sync::Mutex<Health>,
    /// Each Vantiq source's connection.
    links: std::sync::Mutex<BTreeMap<String, LinkState>>,
    /// Whether the service is healthy now (see [`Service::is_healthy`]).
    healthy: watch::Sender<bool>,
    calls: AtomicU64,
    /// Metric handles by (call, result).
    meters: std::sync::Mutex<BTreeMap<(&'static str, &'static str), Meters>>,
}

/// A call's counter and duration histogram.
type Meters = (metrics::Counter, metrics::Histogram);

impl Service {
    /// Service `name` of `config`, its component among `plugins`.
    pub fn new(
        name: &str,
        config: &crate::config::Config,
        plugins: &[Arc<LoadedPlugin>],
        sandbox: &Arc<Sandbox>,
    ) -> anyhow::Result<Self> {
        let service = config.services.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no service `{name}` under `services` (declared: {})",
                config.file.display(),
                crate::config::list_or_none(config.services.keys())
            )
        })?;
        let component = service.component.as_deref().unwrap_or(name);
        let plugin = plugins
            .iter()
            .find(|p| p.name == component)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "services.{name}: no component `{component}` loaded from {}/{component}.wasm",
                    config.plugins.dir.display()
                )
            })?;
        if plugin.component.world != World::Service {
            anyhow::bail!(
                "services.{name}: component `{component}` is a `{}` component, not a `service` one",
                plugin.component.world
            );
        }
        let description = plugin.service.clone().ok_or_else(|| {
            anyhow::anyhow!("services.{name}: component `{component}` did not describe itself")
        })?;
        let mut idle = Vec::new();
        for _ in 0..service.instances {
            idle.push(Slot {
                session: match &plugin.component.code {
                    crate::sandbox::Code::NativeService(native) => Runner::Native(native.clone()),
                    _ => Runner::Wasm(Session::new(
                        sandbox.clone(),
                        &plugin.component,
                        plugin.context.clone(),
                    )?),
                },
                connected: BTreeMap::new(),
                instance: 0,
                version: 0,
            });
        }
        let mut sources = BTreeMap::new();
        sources.insert(
            name.to_owned(),
            Connection {
                generation: 1,
                config: service.connect.to_string(),
            },
        );
        let (sender, _) = broadcast::channel(NOTIFICATIONS_KEPT);
        Ok(Self {
            name: name.to_owned(),
            config: service.clone(),
            sandbox: sandbox.clone(),
            plugin: plugin.clone(),
            description,
            turns: Semaphore::new(service.instances as usize),
            idle: std::sync::Mutex::new(idle),
            sources: std::sync::Mutex::new(sources),
            generation: AtomicU64::new(1),
            sources_version: AtomicU64::new(1),
            notifications: Arc::new(Notifications {
                service: name.to_owned(),
                sender,
            }),
            health: std::sync::Mutex::new(Health::default()),
            links: std::sync::Mutex::new(BTreeMap::new()),
            healthy: watch::channel(false).0,
            calls: AtomicU64::new(0),
            meters: std::sync::Mutex::default(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// What its component says about itself (its routes).
    pub fn description(&self) -> &ServiceDescription {
        &self.description
    }

    /// Its component's name and version.
    pub fn component(&self) -> (&str, &str) {
        (&self.plugin.name, &self.plugin.description.version)
    }

    /// Its notifications, for a transport that follows them.
    pub fn notifications(&self) -> &Arc<Notifications> {
        &self.notifications
    }

    /// Whether `source` is one of its sources now (its own, and each
    /// Vantiq source while connected and configured).
    pub fn knows(&self, source: &str) -> bool {
        self.sources
            .lock()
            .map(|s| s.contains_key(source))
            .unwrap_or(false)
    }

    /// The sources a configuration may be given to: its own and its
    /// Vantiq sources.
    fn configurable(&self, source: &str) -> bool {
        source == self.name
            || self
                .config
                .vantiq
                .as_ref()
                .is_some_and(|v| v.sources.iter().any(|s| s == source))
    }

    /// Healthy: every source connected (its last `on-connect` succeeded,
    /// and one did), and every Vantiq source's connection up and
    /// configured.
    pub fn is_healthy(&self) -> bool {
        let connected = self
            .health
            .lock()
            .map(|h| h.connected_once && h.failing.is_empty())
            .unwrap_or(false);
        let links = self
            .links
            .lock()
            .map(|l| l.values().all(|link| link.up))
            .unwrap_or(false);
        connected && links
    }

    /// Follow [`Service::is_healthy`].
    pub fn health_changes(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    fn health_changed(&self) {
        let now = self.is_healthy();
        self.healthy.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        });
    }

    /// A new connection attempt of Vantiq source `source`: its epoch.
    pub fn link_attempt(&self, source: &str) -> u64 {
        let epoch = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut links) = self.links.lock() {
            links.insert(
                source.to_owned(),
                LinkState {
                    epoch,
                    up: false,
                    note: Some("connecting".into()),
                },
            );
        }
        self.health_changed();
        epoch
    }

    /// Record Vantiq source `source`'s state for connection attempt
    /// `epoch` (ignored when a later attempt began since).
    pub fn link_state(&self, source: &str, epoch: u64, up: bool, note: Option<String>) {
        if let Ok(mut links) = self.links.lock()
            && let Some(link) = links.get_mut(source)
            && link.epoch == epoch
        {
            link.up = up;
            link.note = note;
        }
        self.health_changed();
    }

    /// Source `source`'s connection is gone: it leaves the sources, and
    /// an instance gets its `on-close` now (the others before their next
    /// call).
    pub fn disconnect(self: &Arc<Self>, source: &str) {
        let removed = self
            .sources
            .lock()
            .map(|mut s| s.remove(source).is_some())
            .unwrap_or(false);
        self.sources_version.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut health) = self.health.lock() {
            health.failing.remove(source);
        }
        if removed {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.start().await {
                    tracing::warn!(service = %this.name, "{e}");
                }
            });
        }
    }

    /// What `/v1/services` and `sandpipe services` show of it.
    pub fn status(&self) -> Value {
        let health = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        let (component, version) = self.component();
        let sources: Vec<String> = self
            .sources
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        let mut transports =
            vec![json!({"type": "http", "path": format!("/v1/services/{}", self.name)})];
        if let Some(http) = &self.config.http {
            transports.push(json!({"type": "routes", "listen": http.listen.to_string()}));
        }
        if let Some(rabbitmq) = &self.config.rabbitmq {
            transports.push(json!({
                "type": "rabbitmq",
                "url": crate::listener::rabbitmq::redact(&rabbitmq.url),
                "queue": rabbitmq.queue,
            }));
        }
        if let Some(redis) = &self.config.redis {
            transports.push(json!({
                "type": "redis",
                "stream": redis.stream,
                "group": redis.group,
            }));
        }
        if let Some(vantiq) = &self.config.vantiq {
            let links = self.links.lock().map(|l| l.clone()).unwrap_or_default();
            let sources: serde_json::Map<String, Value> = links
                .into_iter()
                .map(|(source, link)| (source, json!({"connected": link.up, "note": link.note})))
                .collect();
            transports.push(json!({"type": "vantiq", "url": vantiq.url, "sources": sources}));
        }
        json!({
            "name": self.name,
            "component": component,
            "version": version,
            "instances": self.config.instances,
            "sources": sources,
            "transports": transports,
            "routes": self.description.routes.iter().map(|r| json!({
                "method": r.method, "path": r.path, "summary": r.summary,
            })).collect::<Vec<_>>(),
            "connected": health.connected_once && health.failing.is_empty(),
            "failing": health.failing,
            "healthy": self.is_healthy(),
            "last_error": health.last_error,
            "calls": self.calls.load(Ordering::Relaxed),
        })
    }

    /// Connect one instance to every source (the service's readiness):
    /// `Err` with why one is not. Runs in a task of its own (see
    /// [`Service::detached`]).
    pub async fn start(self: &Arc<Self>) -> Result<(), String> {
        self.detached(|this| async move {
            let mut taken = this.take().await.map_err(|e| e.to_string())?;
            let failing = this.connect(taken.slot()).await;
            taken.done = true;
            match failing.into_iter().next() {
                None => Ok(()),
                Some((source, why)) => Err(format!(
                    "service `{}` could not connect source `{source}`: {why}",
                    this.name
                )),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// Run `work` in a task of its own and wait for it. A call takes an
    /// instance out of the pool for its duration: were its future dropped
    /// half-way (a client that went away), the call would be cut off with
    /// the guest mid-way. In a task, the call always finishes and gives
    /// the instance back; only the wait is dropped.
    async fn detached<T, F, Fut>(self: &Arc<Self>, work: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        tokio::spawn(work(self.clone()))
            .await
            .map_err(|e| CallError::Busy(format!("the call's task failed: {e}")))
    }

    /// Give source `source` (the service's own, or one of its Vantiq
    /// sources) a new configuration (a JSON object's text): every instance
    /// closes and connects it again before its next call; calls in flight
    /// finish on the old one.
    pub fn reconfigure(&self, source: &str, config: String) -> Result<(), String> {
        if !self.configurable(source) {
            let mut sources = vec![self.name.clone()];
            if let Some(vantiq) = &self.config.vantiq {
                sources.extend(vantiq.sources.iter().cloned());
            }
            return Err(format!(
                "service `{}` has no source `{source}` (its sources: {})",
                self.name,
                sources.join(", ")
            ));
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut sources) = self.sources.lock() {
            sources.insert(source.to_owned(), Connection { generation, config });
        }
        self.sources_version.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Answer `query` on `source`: the replies, in order, the last one
    /// final (complete, empty or error). The call runs in a task of its
    /// own; dropping the receiver makes the guest's next `partial` fail.
    pub fn query(
        self: &Arc<Self>,
        source: String,
        body: String,
        headers: Vec<(String, String)>,
    ) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel(reply::CHANNEL);
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let query = Query {
                source,
                body,
                headers,
            };
            let (last, result) = this.answer(query, tx.clone()).await;
            this.count("query", result, started);
            let _ = tx.send(last).await;
        });
        rx
    }

    /// The final reply of `query`, after its partial replies went to `tx`,
    /// and the call's result for the metrics.
    async fn answer(&self, query: Query, tx: mpsc::Sender<Frame>) -> (Frame, &'static str) {
        let (reply, shared) = reply::Reply::new(tx, self.config.max_reply_bytes.as_u64());
        let source = query.source.clone();
        let result = self
            .call(&source, Call::Query(query, reply))
            .await
            .map(drop);
        let last = shared.close();
        let partials = shared.partials_sent();
        if partials > 0 {
            metrics::counter!(crate::metrics::SERVICE_PARTIALS, "service" => self.name.clone())
                .increment(partials);
        }
        match (result, last) {
            (Ok(()), Some(last)) => (last, "ok"),
            (Ok(()), None) => (
                Frame::engine_error(
                    "noReply",
                    "the service `{0}` could not answer: {1}",
                    vec![
                        self.name.clone(),
                        "the query ended without a final reply (complete, empty or error)".into(),
                    ],
                ),
                "noReply",
            ),
            // The guest's own error reply, made before it returned an error.
            (Err(CallError::Guest(_)), Some(last @ Frame::Error { .. })) => (last, "error"),
            (Err(e), _) => {
                let kind = e.kind();
                (
                    Frame::engine_error(
                        kind,
                        "the service `{0}` could not answer: {1}",
                        vec![self.name.clone(), e.to_string()],
                    ),
                    kind,
                )
            }
        }
    }

    /// Act on an event published on `source` (in a task of its own).
    pub async fn publish(
        self: &Arc<Self>,
        source: String,
        body: String,
        headers: Vec<(String, String)>,
    ) -> Result<(), CallError> {
        let started = Instant::now();
        let result = self
            .detached(|this| async move {
                let event = Event {
                    source,
                    body,
                    headers,
                };
                let source = event.source.clone();
                this.call(&source, Call::Publish(event)).await.map(drop)
            })
            .await
            .and_then(|r| r);
        self.count("publish", result_label(&result), started);
        result
    }

    /// Answer a request to a declared route (in a task of its own; the
    /// service's own source).
    pub async fn request(self: &Arc<Self>, request: Request) -> Result<Response, CallError> {
        let started = Instant::now();
        let result = self
            .detached(|this| async move {
                let source = this.name.clone();
                match this.call(&source, Call::Request(request)).await? {
                    Output::Response(response) => Ok(response),
                    Output::Done => Err(CallError::Guest(WitError::Internal(
                        "on-request returned no response".into(),
                    ))),
                }
            })
            .await
            .and_then(|r| r);
        self.count("request", result_label(&result), started);
        result
    }

    /// Close every source on every warm instance and take no more calls
    /// (shutdown). Waits up to `wait` for calls in flight.
    pub async fn close(&self, wait: Duration) {
        let total = self.config.instances;
        let all = tokio::time::timeout(wait, self.turns.acquire_many(total)).await;
        self.turns.close();
        let Ok(Ok(_all)) = all else {
            tracing::warn!(service = %self.name, "calls still in flight at shutdown: not closing their sources");
            return;
        };
        let slots: Vec<Slot> = self
            .idle
            .lock()
            .map(|mut idle| idle.drain(..).collect())
            .unwrap_or_default();
        for mut slot in slots {
            slot.check_instance();
            let sources: Vec<String> = slot.connected.keys().cloned().collect();
            for source in sources {
                self.close_source(&mut slot, source).await;
            }
            if let Ok(mut idle) = self.idle.lock() {
                idle.push(slot);
            }
        }
    }

    fn count(&self, call: &'static str, result: &'static str, started: Instant) {
        // The handles, made once per (call, result): a registry look-up
        // hashes every label.
        let handles = self.meters.lock().ok().map(|mut meters| {
            meters
                .entry((call, result))
                .or_insert_with(|| {
                    let service = self.name.clone();
                    (
                        metrics::counter!(crate::metrics::SERVICE_CALLS, "service" => service.clone(), "call" => call, "result" => result),
                        metrics::histogram!(crate::metrics::SERVICE_CALL_SECONDS, "service" => service, "call" => call),
                    )
                })
                .clone()
        });
        if let Some((counter, histogram)) = handles {
            counter.increment(1);
            histogram.record(started.elapsed().as_secs_f64());
        }
    }

    /// Take a free instance (waiting up to `queue_timeout`).
    async fn take(&self) -> Result<Taken<'_>, CallError> {
        let wait = self.config.queue_timeout;
        // A free instance without a timer; the timer only when waiting.
        let free = self.turns.try_acquire();
        let turn = match free {
            Ok(turn) => Ok(Ok(turn)),
            Err(_) => tokio::time::timeout(wait, self.turns.acquire()).await,
        };
        let turn = match turn {
            Ok(Ok(turn)) => turn,
            Ok(Err(_)) => return Err(CallError::Busy("the service is shutting down".into())),
            Err(_) => {
                return Err(CallError::Busy(format!(
                    "no instance of service `{}` came free within {wait:?} (services.{}.queue_timeout; {} instance(s))",
                    self.name, self.name, self.config.instances
                )));
            }
        };
        let slot = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match slot {
            Some(slot) => Ok(Taken {
                service: self,
                slot: Some(slot),
                done: false,
                _turn: turn,
            }),
            None => Err(CallError::Busy("no instance is free".into())),
        }
    }

    /// Run `call` for `source` on a free instance, connected first: the
    /// guest's value, with its effects applied, or why there is none.
    async fn call(&self, source: &str, call: Call) -> Result<Output, CallError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.knows(source) {
            return Err(CallError::NotConnected(format!(
                "service `{}` has no connected source `{source}`",
                self.name
            )));
        }
        let mut taken = self.take().await?;
        let failing = self.connect(taken.slot()).await;
        let result = match failing.get(source) {
            Some(why) => Err(CallError::NotConnected(format!(
                "source `{source}` of service `{}` is not connected: {why}",
                self.name
            ))),
            // An instance that is not warm now would start fresh for
            // this call, without `on-connect`.
            None if !taken.slot().session.is_warm() => Err(CallError::NotConnected(format!(
                "service `{}`: its instance failed while connecting",
                self.name
            ))),
            None => self.run(taken.slot(), call).await,
        };
        taken.done = true;
        result
    }

    /// Run one call on `slot`'s instance and settle its effects.
    async fn run(&self, slot: &mut Slot, call: Call) -> Result<Output, CallError> {
        let what = call.name();
        let mut host = HostState::new(self.plugin.context.clone(), None);
        host.notify = Some(self.notifications.clone());
        let (result, host, _usage) = match &mut slot.session {
            Runner::Wasm(session) => {
                session
                    .call_with(host, move |instance, store| {
                        Box::pin(wasm_call(instance, store, call))
                    })
                    .await
            }
            Runner::Native(native) => {
                let native = native.clone();
                self.sandbox
                    .run_native(&self.plugin.context.limits, host, move |state| {
                        Box::pin(async move { native_call(&*native, state, call).await })
                    })
                    .await
            }
        };
        match result {
            Ok(Ok(value)) => {
                if !host.effects.is_empty() {
                    let id = format!("service:{}:{what}", self.name);
                    let origin = crate::output::Origin {
                        message_id: &id,
                        plugin: &self.plugin.name,
                    };
                    host.effects
                        .apply(&self.plugin.context.services, &origin)
                        .await
                        .map_err(|e| {
                            CallError::Commit(format!(
                                "the call's effects could not be applied: {e:#}"
                            ))
                        })?;
                }
                Ok(value)
            }
            Ok(Err(error)) => {
                host.effects.discard().await;
                Err(CallError::Guest(error))
            }
            Err(failure) => {
                host.effects.discard().await;
                tracing::warn!(service = %self.name, call = what, "{failure}");
                if let Ok(mut health) = self.health.lock() {
                    health.last_error = Some(format!("`on-{what}` failed: {failure}"));
                }
                Err(CallError::Failed(failure))
            }
        }
    }

    /// Connect `slot`'s instance to every source it is not connected to
    /// with the source's current configuration (a fresh instance to all
    /// of them), closing sources that are gone; waits out a restart's
    /// backoff. The sources whose `on-connect` failed, with why.
    async fn connect(&self, slot: &mut Slot) -> BTreeMap<String, String> {
        let version = self.sources_version.load(Ordering::SeqCst);
        if slot.version == version
            && slot.session.is_warm()
            && slot.instance == slot.session.instances_started()
        {
            return BTreeMap::new();
        }
        // Boxed: the slow path's state is large, and every call's future
        // would otherwise carry (and move) it.
        let failing = Box::pin(self.connect_all(slot)).await;
        if failing.is_empty() && slot.session.is_warm() {
            slot.version = version;
        }
        failing
    }

    /// [`Service::connect`] for an instance not known to be connected.
    async fn connect_all(&self, slot: &mut Slot) -> BTreeMap<String, String> {
        let mut failing = BTreeMap::new();
        // A pass may see the instance replaced (a trap in `on-close`, an
        // instance dropped for work left open): what it was connected to
        // is then gone, and the next pass connects it again.
        for _ in 0..3 {
            failing.clear();
            slot.check_instance();
            let sources: Vec<(String, Connection)> = self
                .sources
                .lock()
                .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let gone: Vec<String> = slot
                .connected
                .keys()
                .filter(|s| !sources.iter().any(|(name, _)| name == *s))
                .cloned()
                .collect();
            for source in gone {
                self.close_source(slot, source).await;
            }
            for (source, connection) in sources {
                slot.check_instance();
                if slot.connected.get(&source) == Some(&connection.generation) {
                    continue;
                }
                if slot.connected.contains_key(&source) {
                    self.close_source(slot, source.clone()).await;
                    slot.check_instance();
                }
                if !slot.session.is_warm()
                    && let Some(at) = slot.session.ready_at()
                {
                    tokio::time::sleep_until(at.into()).await;
                }
                let started = Instant::now();
                let result = self
                    .run(
                        slot,
                        Call::Connect {
                            source: source.clone(),
                            config: connection.config.clone(),
                        },
                    )
                    .await
                    .map(drop);
                self.count("connect", result_label(&result), started);
                if let Ok(mut health) = self.health.lock() {
                    match &result {
                        Ok(()) => {
                            health.connected_once = true;
                            health.failing.remove(&source);
                        }
                        Err(e) => {
                            let why = e.to_string();
                            health.last_error =
                                Some(format!("`on-connect` of source `{source}`: {why}"));
                            health.failing.insert(source.clone(), why);
                        }
                    }
                }
                self.health_changed();
                match result {
                    Ok(()) => {
                        // A fresh instance started by this very call.
                        if slot.instance != slot.session.instances_started() {
                            slot.connected.clear();
                            slot.instance = slot.session.instances_started();
                        }
                        slot.connected.insert(source, connection.generation);
                    }
                    Err(e) => {
                        failing.insert(source, e.to_string());
                    }
                }
            }
            if slot.session.is_warm() {
                return failing;
            }
        }
        failing
            .entry(self.name.clone())
            .or_insert_with(|| "the instance was replaced three times while connecting".into());
        failing
    }

    /// `on-close` of `source` on `slot`'s instance; a failure is logged.
    async fn close_source(&self, slot: &mut Slot, source: String) {
        slot.connected.remove(&source);
        if !slot.session.is_warm() {
            // No instance: nothing saw the source.
            return;
        }
        let started = Instant::now();
        let result = self
            .run(
                slot,
                Call::Close {
                    source: source.clone(),
                },
            )
            .await
            .map(drop);
        self.count("close", result_label(&result), started);
        if let Err(e) = result {
            tracing::warn!(service = %self.name, %source, "`on-close` failed: {e}");
        }
    }
}

/// Run `serve` (one connection of a broker transport, `backend`, serving
/// `target`) until it ends well or `shutdown`; after a failure, again after
/// a backoff (500 ms, doubling to 30 s), the failure logged and counted
/// as a reconnect.
pub async fn keep_serving<F, Fut>(
    service: &Service,
    backend: &'static str,
    target: &str,
    mut shutdown: watch::Receiver<bool>,
    mut serve: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match serve(shutdown.clone()).await {
            Ok(()) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(500)
                    .saturating_mul(1 << failures.saturating_sub(1).min(6))
                    .min(Duration::from_secs(30));
                tracing::warn!(service = %service.name(), %backend, %target, "{e:#}; again in {wait:?}");
                metrics::counter!(crate::metrics::RECONNECTS, "backend" => backend).increment(1);
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Keep a TCP listener on `listen` open while `service` is healthy (as
/// the Vantiq connector SDK's `declare_healthy`): a connection is accepted
/// and closed at once. Closed while unhealthy, and at `shutdown`.
pub async fn serve_health(
    service: Arc<Service>,
    listen: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut health = service.health_changes();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if *health.borrow_and_update() {
            match tokio::net::TcpListener::bind(listen).await {
                Ok(listener) => {
                    tracing::info!(service = %service.name(), %listen, "healthy: the probe port is open");
                    loop {
                        tokio::select! {
                            _ = shutdown.wait_for(|stop| *stop) => return,
                            changed = health.changed() => {
                                if changed.is_err() { return; }
                                if !*health.borrow_and_update() { break; }
                            }
                            accepted = listener.accept() => drop(accepted),
                        }
                    }
                    tracing::warn!(service = %service.name(), %listen, "unhealthy: the probe port is closed");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(service = %service.name(), %listen, "cannot open the probe port: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = health.changed() => if changed.is_err() { return; },
        }
    }
}

fn result_label<T>(result: &Result<T, CallError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

/// Every service of `config` that loaded, by name, with why the others
/// did not.
pub fn services(
    config: &crate::config::Config,
    plugins: &[Arc<LoadedPlugin>],
    sandbox: &Arc<Sandbox>,
) -> (Vec<Service>, Vec<String>) {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for name in config.services.keys() {
        match Service::new(name, config, plugins, sandbox) {
            Ok(service) => ok.push(service),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    (ok, problems)
}
