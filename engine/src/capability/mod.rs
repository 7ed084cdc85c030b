//! Host capabilities: one module per WIT interface, each holding the host
//! implementation, its policy check and its quota.
//!
//! Architecture invariant: only the capability's policy decides access.
//! Every interface of the world is linked for every plugin; a call to an
//! interface the operator did not grant answers `access-denied` (naming the
//! plugin, the interface and the missing grant) and is recorded, never a
//! trap.
//!
//! Effects (SQL, blob writes, state changes, emits) are held per
//! invocation in [`Effects`] and applied by the pipeline only when the
//! plugin's outcome is `done`.

pub mod blob;
pub mod config;
pub mod emit;
pub mod http;
pub mod journal;
pub mod log;
pub mod meta;
pub mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::{Grant, Limits};
use crate::output::Outputs;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::store::data::DataStore;
use crate::store::database::{PluginDb, StateStore};

/// The services capabilities are backed by, shared by every plugin.
pub struct Services {
    /// The data store (`blob`).
    pub data: DataStore,
    /// Plugin-scoped key-value state (`meta.state-*`).
    pub state: StateStore,
    /// Named outputs (`emit`).
    pub outputs: Outputs,
    /// Outbound HTTP (`http`).
    pub http: Arc<http::HttpClient>,
    /// The values `http.auth` bindings (and external databases'
    /// passwords) apply.
    pub secrets: crate::secrets::Secrets,
    /// What TLS connections trust (external databases).
    pub tls: crate::tls::Tls,
    /// Users' OAuth tokens from the token storage (`http.auth`'s
    /// `oauth_user`), when `token_storage:` is configured.
    pub tokens: Option<Arc<crate::service::token_storage::UserTokens>>,
}

/// What one plugin is, may do, and is backed by. Built once at load.
pub struct PluginContext {
    /// The plugin's name (its file stem).
    pub name: String,
    /// The operator's grant.
    pub grant: Grant,
    /// Effective limits.
    pub limits: Limits,
    /// `config` values, rendered as the `config` interface returns them.
    pub config: BTreeMap<String, String>,
    /// The plugin's own database, when `sql` is granted.
    pub db: Option<Arc<PluginDb>>,
    /// Shared services.
    pub services: Arc<Services>,
    /// Whether the plugin's last invocation used `sql`: then the next one
    /// begins its PostgreSQL transaction while the guest starts (see
    /// [`Effects::begin_early`]).
    pub used_sql: std::sync::atomic::AtomicBool,
    /// Turns for the plugin's HTTP requests in flight
    /// (`limits.http_concurrency`), shared by all its invocations.
    pub http_slots: Arc<tokio::sync::Semaphore>,
    /// The plugin's idle kept-alive HTTP connections.
    pub http_pool: http::Pool,
}

impl PluginContext {
    /// Build the context of plugin `name`.
    pub fn new(
        name: &str,
        grant: Grant,
        limits: Limits,
        db: Option<Arc<PluginDb>>,
        services: Arc<Services>,
    ) -> Self {
        // Payloads of up to this plugin's `emit_bytes` must be copied out
        // of its memory for its quota to be checked on them.
        crate::sandbox::bounded::allow_emits_up_to(limits.emit_bytes.as_u64());
        let config = grant
            .config
            .iter()
            .map(|(k, v)| (k.clone(), render_value(v)))
            .collect();
        let http_slots = Arc::new(tokio::sync::Semaphore::new(
            limits.http_concurrency.max(1) as usize
        ));
        Self {
            name: name.to_owned(),
            grant,
            limits,
            http_slots,
            http_pool: http::Pool::default(),
            config,
            db,
            services,
            used_sql: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

/// Strings as they are; every other JSON value as JSON text.
pub fn render_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The message a plugin is working on, after resolution.
#[derive(Debug, Clone, Default)]
pub struct MessageContext {
    /// The message id.
    pub id: String,
    /// The MIME type.
    pub kind: String,
    /// The data object's location.
    pub data_location: Option<String>,
    /// The metadata's location.
    pub meta_location: Option<String>,
    /// Resolved metadata (inline, overlaid with the metadata store's).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Transport headers.
    pub headers: Vec<(String, String)>,
    /// The raw envelope.
    pub body: Bytes,
}

/// One message queued by `emit.publish`.
#[derive(Debug, Clone)]
pub struct Emit {
    /// The output's name.
    pub output: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

/// A pending change of the plugin's state.
#[derive(Debug, Clone)]
pub enum StateOp {
    /// Set a key.
    Set(String, Vec<u8>),
    /// Delete a key.
    Delete(String),
}

/// The effects of one invocation, applied only on `done`.
#[derive(Default)]
pub struct Effects {
    /// The open SQL transaction, if the plugin used `sql`.
    pub sql: Option<sql::Transaction>,
    /// A PostgreSQL transaction being begun before the guest asked for
    /// one (see [`Effects::begin_early`]); taken by the first `sql` call.
    pub sql_early: Option<tokio::task::JoinHandle<Result<sql::Transaction, WitError>>>,
    /// Queued emits.
    pub emits: Vec<Emit>,
    /// Queued blob writes.
    pub puts: Vec<(String, Bytes)>,
    /// Queued state changes.
    pub state: Vec<StateOp>,
    emit_bytes: u64,
    put_bytes: u64,
    state_bytes: u64,
}

impl Effects {
    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.sql.is_none() && self.emits.is_empty() && self.puts.is_empty() && self.state.is_empty()
    }

    /// Whether the only effect is an open PostgreSQL transaction (which
    /// the status rows may then join: `StatusLog::record_within`).
    pub fn only_postgres_sql(&self) -> bool {
        self.sql.as_ref().is_some_and(|tx| tx.is_postgres())
            && self.emits.is_empty()
            && self.puts.is_empty()
            && self.state.is_empty()
    }

    /// Take a connection for `plugin`'s PostgreSQL transaction now, in a
    /// task of its own, when its last invocation used `sql`: waiting for
    /// the pool then happens while the guest starts and reads its input,
    /// not when it runs its first statement (whose round trip carries the
    /// `BEGIN`). A connection the guest does not use goes back to the
    /// pool in the background ([`Effects::settle_sql`]).
    pub fn begin_early(&mut self, plugin: &PluginContext) {
        use std::sync::atomic::Ordering;
        if let Some(db) = &plugin.db
            && matches!(**db, PluginDb::Postgres(_))
            && plugin.used_sql.load(Ordering::Relaxed)
        {
            let db = db.clone();
            self.sql_early = Some(tokio::spawn(
                async move { sql::Transaction::begin(&db).await },
            ));
        }
    }

    /// Apply the effects of a call that ended well, in the fixed order:
    /// the SQL commit, blob writes, state, then outputs (each confirmed).
    /// `origin` names the message (or call) and the component for the
    /// outputs' headers.
    pub async fn apply(
        self,
        services: &Services,
        origin: &crate::output::Origin<'_>,
    ) -> anyhow::Result<()> {
        if let Some(tx) = self.sql {
            tx.commit().await?;
        }
        for (location, bytes) in self.puts {
            services.data.put(&location, bytes).await?;
        }
        if !self.state.is_empty() {
            services.state.apply(origin.plugin, self.state).await?;
        }
        if !self.emits.is_empty() {
            services.outputs.publish(origin, &self.emits).await?;
        }
        Ok(())
    }

    /// Drop the effects of a call that did not end well: its SQL
    /// transaction is rolled back; nothing else was applied.
    pub async fn discard(self) {
        if let Some(tx) = self.sql {
            tx.rollback().await;
        }
    }

    /// Note whether the invocation used `sql` (for the next one's
    /// [`Effects::begin_early`]), and roll back, in the background, a
    /// transaction begun early that it did not use.
    pub fn settle_sql(&mut self, plugin: &PluginContext) {
        plugin
            .used_sql
            .store(self.sql.is_some(), std::sync::atomic::Ordering::Relaxed);
        if let Some(early) = self.sql_early.take() {
            tokio::spawn(async move {
                if let Ok(Ok(tx)) = early.await {
                    tx.rollback().await;
                }
            });
        }
    }
}

/// The capabilities' state in one invocation's store.
pub struct HostState {
    /// The plugin.
    pub plugin: Arc<PluginContext>,
    /// The message; `None` while `describe` runs.
    pub message: Option<Arc<MessageContext>>,
    /// Pending effects.
    pub effects: Effects,
    /// Every denied host call, as a sentence.
    pub denials: Vec<String>,
    /// Log lines written, for `sandpipe exec` and the status log.
    pub logs: Vec<(String, String)>,
    /// Backend outages met by host calls: a failure after one of these is
    /// the infrastructure's, not the message's.
    pub outages: Vec<String>,
    /// Every host call with its result, when on (`sandpipe exec`); see
    /// [`journal`].
    pub journal: Option<Vec<journal::HostCall>>,
    /// When the invocation's deadline passes (set when its limits are
    /// armed); host calls that wait end by then.
    pub deadline: std::time::Instant,
    calls: u64,
    log_bytes: u64,
    /// Blob readers open now.
    readers: u32,
    /// HTTP requests sent so far.
    http_requests: u32,
    /// What the invocation's HTTP requests record while they run.
    http_use: Option<Arc<http::HttpUse>>,
    /// Whether HTTP work outlived the call (see [`HostState::gather`]).
    http_open: bool,
    /// Where a service's `notify.send` goes; `None` outside a service's
    /// call.
    pub notify: Option<Arc<crate::service::Notifications>>,
}

/// The longest denial message kept (see [`HostState::deny`]).
pub const MAX_DENIAL: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary), saying how
/// long it was: for text a plugin controls that the engine keeps or logs.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("… (cut, {total} bytes in all)"));
    text
}

/// The interfaces, as the grants name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// `log`: always granted.
    Log,
    /// `config`: always granted.
    Config,
    /// `blob`.
    Blob,
    /// `meta`.
    Meta,
    /// `sql`.
    Sql,
    /// `emit`.
    Emit,
    /// `http`: `wasi:http/outgoing-handler`.
    Http,
}

impl Interface {
    /// Every interface of the `plugin` world.
    pub const ALL: [Interface; 7] = [
        Self::Log,
        Self::Config,
        Self::Blob,
        Self::Meta,
        Self::Sql,
        Self::Emit,
        Self::Http,
    ];

    /// The interface's name in WIT.
    pub fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Config => "config",
            Self::Blob => "blob",
            Self::Meta => "meta",
            Self::Sql => "sql",
            Self::Emit => "emit",
            Self::Http => "http",
        }
    }

    /// The interface a component import names, e.g.
    /// `sandpipe:connector/sql@0.1.0` → `Sql`;
    /// `wasi:http/outgoing-handler@0.2.0` → `Http`.
    pub fn from_import(import: &str) -> Option<Self> {
        if import.starts_with("wasi:http/outgoing-handler") {
            return Some(Self::Http);
        }
        let rest = import.strip_prefix("sandpipe:connector/")?;
        let name = rest.split('@').next()?;
        Self::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether `grant` grants this interface.
    pub fn granted(self, grant: &Grant) -> bool {
        match self {
            Self::Log | Self::Config => true,
            Self::Blob => grant.blob.is_some(),
            Self::Meta => grant.meta.is_some(),
            Self::Sql => grant.sql.is_some(),
            Self::Emit => grant.emit_any || !grant.emit.is_empty(),
            Self::Http => grant.http.is_some(),
        }
    }

    /// How to grant it, for error messages.
    pub fn how_to_grant(self, plugin: &str) -> String {
        let example = match self {
            Self::Log | Self::Config => "(always granted)",
            Self::Blob => "blob: true",
            Self::Meta => "meta: true",
            Self::Sql => "sql: true",
            Self::Emit => "emit: [<output>]",
            Self::Http => "http: { allow: [\"https://<host>\"] }",
        };
        format!("`{example}` under plugins.grants.{plugin}")
    }
}

impl HostState {
    /// A fresh state for one invocation of `plugin`.
    pub fn new(plugin: Arc<PluginContext>, message: Option<Arc<MessageContext>>) -> Self {
        let plugin_timeout = plugin.limits.timeout;
        Self {
            plugin,
            message,
            effects: Effects::default(),
            denials: Vec::new(),
            logs: Vec::new(),
            outages: Vec::new(),
            journal: None,
            deadline: std::time::Instant::now() + plugin_timeout,
            calls: 0,
            log_bytes: 0,
            readers: 0,
            http_requests: 0,
            http_use: None,
            http_open: false,
            notify: None,
        }
    }

    /// Blob readers the plugin has open now.
    pub fn open_readers(&self) -> u32 {
        self.readers
    }

    /// Whether the call left something open that an instance must not
    /// carry into the next call: a blob reader, or HTTP work (a response
    /// kept, a connection running) that would hold the plugin's turns and
    /// quotas past the call.
    pub fn left_open(&self) -> bool {
        self.readers > 0 || self.http_open
    }

    /// Count a host call and check the interface is granted.
    pub fn enter(&mut self, interface: Interface, function: &str) -> Result<(), WitError> {
        self.calls += 1;
        if self.calls > self.plugin.limits.host_calls {
            return Err(self.limit(
                "host_calls",
                format!(
                    "more than {} host calls in one invocation",
                    self.plugin.limits.host_calls
                ),
            ));
        }
        if interface.granted(&self.plugin.grant) {
            Ok(())
        } else {
            Err(self.deny(format!(
                "plugin `{}` called {}.{} but has no `{}` grant (add {})",
                self.plugin.name,
                interface.name(),
                function,
                interface.name(),
                interface.how_to_grant(&self.plugin.name)
            )))
        }
    }

    /// Record a denial and return the error for the guest. The message is
    /// cut to [`MAX_DENIAL`] bytes: it may quote what the plugin passed.
    pub fn deny(&mut self, message: String) -> WitError {
        let message = cut(message, MAX_DENIAL);
        tracing::warn!(plugin = %self.plugin.name, "denied: {message}");
        let plugin = self.plugin.name.clone();
        metrics::counter!(crate::metrics::DENIED, "plugin" => plugin).increment(1);
        if self.denials.len() < 100 {
            self.denials.push(message.clone());
        }
        WitError::AccessDenied(message)
    }

    /// Count a refused call over the quota `plugins.*.limits.KEY` and
    /// return the error for the guest, naming the key.
    pub fn limit(&self, key: &'static str, message: String) -> WitError {
        tracing::warn!(plugin = %self.plugin.name, limit = key, "limit exceeded: {message}");
        self.count_limit(key);
        WitError::LimitExceeded(format!("{message} (limits.{key})"))
    }

    /// Count a refused call over the quota `limits.KEY` in the metrics.
    pub fn count_limit(&self, key: &'static str) {
        let plugin = self.plugin.name.clone();
        metrics::counter!(crate::metrics::LIMIT_EXCEEDED, "plugin" => plugin, "limit" => key)
            .increment(1);
    }

    /// Record a backend outage and return the error for the guest.
    pub fn outage(&mut self, message: String) -> WitError {
        if self.outages.len() < 10 {
            self.outages.push(message.clone());
        }
        WitError::Unavailable(message)
    }

    /// Record the outage if `error` is one (for errors built elsewhere).
    pub fn note(&mut self, error: WitError) -> WitError {
        match error {
            WitError::Unavailable(m) => self.outage(m),
            other => other,
        }
    }

    /// The message, or `invalid` in a call without one (`describe`, a
    /// source's or a service's calls).
    pub fn message(&self) -> Result<Arc<MessageContext>, WitError> {
        self.message.clone().ok_or_else(|| {
            WitError::Invalid(
                "this call has no message (`describe`, a source's or a service's calls)".into(),
            )
        })
    }
}

/// A backend's error as the guest sees it.
impl From<crate::error::HostError> for WitError {
    fn from(error: crate::error::HostError) -> Self {
        use crate::error::HostError as E;
        match error {
            E::AccessDenied(m) => Self::AccessDenied(m),
            E::LimitExceeded(m) => Self::LimitExceeded(m),
            E::NotFound(m) => Self::NotFound(m),
            E::Invalid(m) => Self::Invalid(m),
            E::Unavailable(m) => Self::Unavailable(m),
            E::Internal(m) => Self::Internal(m),
        }
    }
}

/// A guest's error as the host words it (`kind: text`).
impl From<WitError> for crate::error::HostError {
    fn from(error: WitError) -> Self {
        match error {
            WitError::AccessDenied(m) => Self::AccessDenied(m),
            WitError::LimitExceeded(m) => Self::LimitExceeded(m),
            WitError::NotFound(m) => Self::NotFound(m),
            WitError::Invalid(m) => Self::Invalid(m),
            WitError::Unavailable(m) => Self::Unavailable(m),
            WitError::Internal(m) => Self::Internal(m),
        }
    }
}

/// The empty `types` interface host.
impl crate::sandbox::bindings::sandpipe::connector::types::Host for InvocationState {}

/// The empty `source-types` interface host (types only, imported by
/// every `source` component).
impl crate::sandbox::bindings::source::sandpipe::connector::source_types::Host for InvocationState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(cut("short".into(), 10), "short");
        let long = format!("{}é{}", "a".repeat(9), "b".repeat(100));
        let kept = cut(long, 10);
        assert_eq!(kept, format!("{}… (cut, 111 bytes in all)", "a".repeat(9)));
    }

    #[test]
    fn imports_map_to_interfaces_whatever_the_version() {
        assert_eq!(
            Interface::from_import("sandpipe:connector/sql@0.1.0"),
            Some(Interface::Sql)
        );
        assert_eq!(
            Interface::from_import("sandpipe:connector/emit"),
            Some(Interface::Emit)
        );
        assert_eq!(Interface::from_import("wasi:cli/environment@0.2.0"), None);
        assert_eq!(
            Interface::from_import("wasi:http/outgoing-handler@0.2.6"),
            Some(Interface::Http)
        );
        assert_eq!(Interface::from_import("wasi:http/types@0.2.6"), None);
        assert_eq!(
            Interface::from_import("sandpipe:connector/types@0.1.0"),
            None
        );
    }

    #[test]
    fn nothing_but_log_and_config_is_granted_by_default() {
        let grant = Grant::default();
        let granted: Vec<_> = Interface::ALL
            .into_iter()
            .filter(|i| i.granted(&grant))
            .collect();
        assert_eq!(granted, vec![Interface::Log, Interface::Config]);
    }
}
