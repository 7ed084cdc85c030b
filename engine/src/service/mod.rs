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

pub mod http;
pub mod reply;
pub mod routes;
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
    Failure, GuestCall, InvocationState, Sandbox, Service as Bindings, Session, World,
};
pub use reply::Frame;

/// Notifications kept for a follower that reads slowly; past it the
/// follower is told how many it missed.
const NOTIFICATIONS_KEPT: usize = 1024;

/// Events a service sends back (`notify.send`) to whoever follows it.
pub struct Notifications {
    /// The service's name.
    service: String,
    sender: broadcast::Sender<Notification>,
    /// The largest notification body.
    max_bytes: u64,
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
        if body.len() as u64 > notifications.max_bytes {
            return Err(WitError::LimitExceeded(format!(
                "a notification of {} bytes is larger than {} bytes (services.{}.max_reply_bytes)",
                body.len(),
                notifications.max_bytes,
                notifications.service
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

/// One warm instance and what it is connected to.
struct Slot {
    session: Session,
    /// Each source's configuration generation the instance connected with.
    connected: BTreeMap<String, u64>,
}

/// Why a call has no result of the guest's.
#[derive(Debug)]
pub enum CallError {
    /// No instance came free within `queue_timeout`.
    Busy(String),
    /// `on-connect` failed, so the instance cannot serve.
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
    /// Whether the last `on-connect` succeeded.
    connected: bool,
    /// The last failure (a connect, a trap), if any.
    last_error: Option<String>,
}

/// One service, ready to serve.
pub struct Service {
    name: String,
    config: ServiceConfig,
    plugin: Arc<LoadedPlugin>,
    description: ServiceDescription,
    /// Turns for the instances.
    turns: Semaphore,
    idle: std::sync::Mutex<Vec<Slot>>,
    sources: std::sync::Mutex<BTreeMap<String, Connection>>,
    generation: AtomicU64,
    notifications: Arc<Notifications>,
    health: std::sync::Mutex<Health>,
    /// Each Vantiq source's connection: up or not, and why not.
    links: std::sync::Mutex<BTreeMap<String, (bool, Option<String>)>>,
    /// Whether the service is healthy now (see [`Service::is_healthy`]).
    healthy: watch::Sender<bool>,
    calls: AtomicU64,
}

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
                session: Session::new(sandbox.clone(), &plugin.component, plugin.context.clone())?,
                connected: BTreeMap::new(),
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
            plugin: plugin.clone(),
            description,
            turns: Semaphore::new(service.instances as usize),
            idle: std::sync::Mutex::new(idle),
            sources: std::sync::Mutex::new(sources),
            generation: AtomicU64::new(1),
            notifications: Arc::new(Notifications {
                service: name.to_owned(),
                sender,
                max_bytes: service.max_reply_bytes.as_u64(),
            }),
            health: std::sync::Mutex::new(Health::default()),
            links: std::sync::Mutex::new(BTreeMap::new()),
            healthy: watch::channel(false).0,
            calls: AtomicU64::new(0),
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

    /// Whether it is connected (its last `on-connect` succeeded), and why
    /// not.
    pub fn healthy(&self) -> (bool, Option<String>) {
        self.health
            .lock()
            .map(|h| (h.connected, h.last_error.clone()))
            .unwrap_or((false, None))
    }

    /// Healthy: connected (its last `on-connect` succeeded) and every
    /// Vantiq source's connection up.
    pub fn is_healthy(&self) -> bool {
        let connected = self.health.lock().map(|h| h.connected).unwrap_or(false);
        let links = self
            .links
            .lock()
            .map(|l| l.values().all(|(up, _)| *up))
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

    /// Record a Vantiq source's connection state (`note`: why it is not up).
    pub fn link_state(&self, source: &str, up: bool, note: Option<String>) {
        if let Ok(mut links) = self.links.lock() {
            links.insert(source.to_owned(), (up, note));
        }
        self.health_changed();
    }

    /// Source `source`'s connection is gone: it leaves the sources, and
    /// an instance gets its `on-close` now (the others before their next
    /// call).
    pub async fn disconnect(self: &Arc<Self>, source: &str) {
        let removed = self
            .sources
            .lock()
            .map(|mut s| s.remove(source).is_some())
            .unwrap_or(false);
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
        let (connected, last_error) = self.healthy();
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
        if let Some(vantiq) = &self.config.vantiq {
            let links = self.links.lock().map(|l| l.clone()).unwrap_or_default();
            let sources: serde_json::Map<String, Value> = links
                .into_iter()
                .map(|(source, (up, note))| (source, json!({"connected": up, "note": note})))
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
            "connected": connected,
            "healthy": self.is_healthy(),
            "last_error": last_error,
            "calls": self.calls.load(Ordering::Relaxed),
        })
    }

    /// Connect one instance (the service's readiness): `Err` with why not.
    pub async fn start(&self) -> Result<(), String> {
        let (mut slot, _turn) = self.take().await.map_err(|e| e.to_string())?;
        let connected = self.connect(&mut slot).await;
        self.put(slot);
        connected
    }

    /// Give source `source` a new configuration (JSON text): every instance
    /// closes and connects it again before its next call; calls in flight
    /// finish on the old one.
    pub fn reconfigure(&self, source: &str, config: String) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut sources) = self.sources.lock() {
            sources.insert(source.to_owned(), Connection { generation, config });
        }
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
            let last = this.answer(query, tx.clone()).await;
            let result = match &last {
                Frame::Error { code, .. } if code.starts_with("io.sandpipe.service.") => {
                    code.trim_start_matches("io.sandpipe.service.").to_owned()
                }
                _ => "ok".to_owned(),
            };
            this.count("query", &result, started);
            let _ = tx.send(last).await;
        });
        rx
    }

    /// The final reply of `query`, after its partial replies went to `tx`.
    async fn answer(&self, query: Query, tx: mpsc::Sender<Frame>) -> Frame {
        let (reply, shared) = reply::Reply::new(tx, self.config.max_reply_bytes.as_u64());
        let result = self
            .call("query", move |instance, store| {
                Box::pin(async move {
                    let handle = store.data_mut().table.push(reply)?;
                    Bindings::new(&mut *store, instance)?
                        .call_on_query(store, &query, handle)
                        .await
                })
            })
            .await;
        let last = shared.close();
        metrics::counter!(crate::metrics::SERVICE_PARTIALS, "service" => self.name.clone())
            .increment(shared.partials_sent());
        match (result, last) {
            (Ok(()), Some(last)) => last,
            (Ok(()), None) => Frame::engine_error(
                "noReply",
                "the service `{0}` ended the query without a final reply (complete, empty or error)",
                vec![self.name.clone()],
            ),
            // The guest's own error reply, made before it returned an error.
            (Err(CallError::Guest(_)), Some(last @ Frame::Error { .. })) => last,
            (Err(e), _) => Frame::engine_error(
                e.kind(),
                "the service `{0}` could not answer: {1}",
                vec![self.name.clone(), e.to_string()],
            ),
        }
    }

    /// Act on an event published on `source`.
    pub async fn publish(
        &self,
        source: String,
        body: String,
        headers: Vec<(String, String)>,
    ) -> Result<(), CallError> {
        let started = Instant::now();
        let event = Event {
            source,
            body,
            headers,
        };
        let result = self
            .call("publish", move |instance, store| {
                Box::pin(async move {
                    Bindings::new(&mut *store, instance)?
                        .call_on_publish(store, &event)
                        .await
                })
            })
            .await;
        self.count("publish", result_label(&result), started);
        result
    }

    /// Answer a request to a declared route.
    pub async fn request(&self, request: Request) -> Result<Response, CallError> {
        let started = Instant::now();
        let result = self
            .call("request", move |instance, store| {
                Box::pin(async move {
                    Bindings::new(&mut *store, instance)?
                        .call_on_request(store, &request)
                        .await
                })
            })
            .await;
        self.count("request", result_label(&result), started);
        result
    }

    /// Close every source on every warm instance (shutdown). Waits up to
    /// `wait` for calls in flight.
    pub async fn close(&self, wait: Duration) {
        let total = self.config.instances;
        let Ok(Ok(_all)) = tokio::time::timeout(wait, self.turns.acquire_many(total)).await else {
            tracing::warn!(service = %self.name, "calls still in flight at shutdown: not closing their sources");
            return;
        };
        let slots: Vec<Slot> = self
            .idle
            .lock()
            .map(|mut idle| idle.drain(..).collect())
            .unwrap_or_default();
        for mut slot in slots {
            if slot.session.is_warm() {
                let sources: Vec<String> = slot.connected.keys().cloned().collect();
                for source in sources {
                    self.close_source(&mut slot, source).await;
                }
            }
            self.put(slot);
        }
    }

    fn count(&self, call: &'static str, result: &str, started: Instant) {
        let service = self.name.clone();
        metrics::counter!(crate::metrics::SERVICE_CALLS, "service" => service.clone(), "call" => call, "result" => result.to_owned())
            .increment(1);
        metrics::histogram!(crate::metrics::SERVICE_CALL_SECONDS, "service" => service, "call" => call)
            .record(started.elapsed().as_secs_f64());
    }

    /// Take a free instance (waiting up to `queue_timeout`).
    async fn take(&self) -> Result<(Slot, tokio::sync::SemaphorePermit<'_>), CallError> {
        let wait = self.config.queue_timeout;
        let turn = match tokio::time::timeout(wait, self.turns.acquire()).await {
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
            Some(slot) => Ok((slot, turn)),
            None => Err(CallError::Busy("no instance is free".into())),
        }
    }

    fn put(&self, slot: Slot) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(slot);
        }
    }

    /// Run `call` on a free instance, connected first: the guest's value,
    /// with its effects applied, or why there is none.
    async fn call<T, F>(&self, what: &'static str, call: F) -> Result<T, CallError>
    where
        T: Send,
        F: GuestCall<Result<T, WitError>>,
    {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let (mut slot, _turn) = self.take().await?;
        let result = async {
            self.connect(&mut slot)
                .await
                .map_err(CallError::NotConnected)?;
            self.run(&mut slot, what, call).await
        }
        .await;
        self.put(slot);
        result
    }

    /// Run one call on `slot`'s instance and settle its effects.
    async fn run<T, F>(&self, slot: &mut Slot, what: &'static str, call: F) -> Result<T, CallError>
    where
        T: Send,
        F: GuestCall<Result<T, WitError>>,
    {
        let mut host = HostState::new(self.plugin.context.clone(), None);
        host.notify = Some(self.notifications.clone());
        let (result, host, _usage) = slot.session.call_with(host, call).await;
        match result {
            Ok(Ok(value)) => {
                let id = format!("service:{}:{what}", self.name);
                let origin = crate::output::Origin {
                    message_id: &id,
                    plugin: &self.plugin.name,
                };
                host.effects
                    .apply(&self.plugin.context.services, &origin)
                    .await
                    .map_err(|e| {
                        CallError::Commit(format!("the call's effects could not be applied: {e:#}"))
                    })?;
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
    /// of them). Waits out a restart's backoff.
    async fn connect(&self, slot: &mut Slot) -> Result<(), String> {
        // A pass may see the instance replaced (an `on-close` that
        // trapped): then the sources connected before are gone, and the
        // next pass connects them again.
        for _ in 0..3 {
            if !slot.session.is_warm() {
                // A fresh instance (the first, or one after a trap) has
                // seen no `on-connect`.
                slot.connected.clear();
            }
            let sources: Vec<(String, Connection)> = self
                .sources
                .lock()
                .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let mut replaced = false;
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
                if slot.connected.get(&source) == Some(&connection.generation) {
                    continue;
                }
                if slot.connected.contains_key(&source) {
                    self.close_source(slot, source.clone()).await;
                }
                let warm = slot.session.is_warm();
                if !warm {
                    replaced |= !slot.connected.is_empty();
                    slot.connected.clear();
                    if let Some(at) = slot.session.ready_at() {
                        tokio::time::sleep_until(at.into()).await;
                    }
                }
                let (name, config) = (source.clone(), connection.config.clone());
                let started = Instant::now();
                let result = self
                    .run(slot, "connect", move |instance, store| {
                        Box::pin(async move {
                            Bindings::new(&mut *store, instance)?
                                .call_on_connect(store, &name, &config)
                                .await
                        })
                    })
                    .await;
                self.count("connect", result_label(&result), started);
                if let Ok(mut health) = self.health.lock() {
                    health.connected = result.is_ok();
                    if let Err(e) = &result {
                        health.last_error = Some(format!("`on-connect` of source `{source}`: {e}"));
                    }
                }
                self.health_changed();
                if let Err(e) = result {
                    return Err(format!(
                        "service `{}` could not connect source `{source}`: {e}",
                        self.name
                    ));
                }
                slot.connected.insert(source, connection.generation);
            }
            if !replaced {
                return Ok(());
            }
        }
        Err(format!(
            "service `{}`: its instance was replaced three times while connecting",
            self.name
        ))
    }

    /// `on-close` of `source` on `slot`'s instance; a failure is logged.
    async fn close_source(&self, slot: &mut Slot, source: String) {
        slot.connected.remove(&source);
        let name = source.clone();
        let started = Instant::now();
        let result = self
            .run(slot, "close", move |instance, store| {
                Box::pin(async move {
                    Bindings::new(&mut *store, instance)?
                        .call_on_close(store, &name)
                        .await
                })
            })
            .await;
        self.count("close", result_label(&result), started);
        if let Err(e) = result {
            tracing::warn!(service = %self.name, %source, "`on-close` failed: {e}");
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
