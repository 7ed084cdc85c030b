//! The engine's configuration: one YAML file.
//!
//! Every section is a plain serde struct with `deny_unknown_fields`, so a
//! typo is an error that names the file, the line and the key. Backends are
//! chosen with a `type` field (`#[serde(tag = "type")]`). `${NAME}` anywhere
//! in the file is replaced by the environment variable `NAME` before
//! parsing, so secrets never sit in the file; a missing variable is an error.
//! Relative paths are resolved against the directory of the config file.
//!
//! YAML parsing is confined to [`Config::parse`], so the YAML crate can
//! change in one place.
//!
//! This crate also holds the message [`envelope`] parser. Both read untrusted
//! or operator input and need nothing from the sandbox, so they live apart
//! from the engine: the fuzz targets in `fuzz/` build them without wasmtime.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;

pub mod envelope;
pub mod http;
mod postgres;
pub mod service;
pub mod source;

pub use postgres::{PgSslMode, postgres_url};

/// A configuration that could not be loaded. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {file}: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `${NAME}` reference names an unset variable.
    #[error(
        "{file}:{line}: environment variable `{name}` is not set (referenced as `${{{name}}}`)"
    )]
    MissingEnv {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the reference.
        line: usize,
        /// The variable's name.
        name: String,
    },
    /// The YAML is malformed or does not fit the schema.
    #[error("{file}:{location}: {key}: {message}")]
    Parse {
        /// The config file.
        file: PathBuf,
        /// `line N, column M`, when known.
        location: String,
        /// The YAML path of the offending key, e.g. `plugins.grants.text-stats.memory`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The values parse but contradict each other.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// The YAML path of the offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where messages come from.
    pub listener: ListenerConfig,
    /// How the fields of a message envelope are named (sqAPI style).
    #[serde(default)]
    pub message_fields: MessageFields,
    /// Where data objects live.
    #[serde(default)]
    pub data_store: DataStoreConfig,
    /// Where metadata lives.
    #[serde(default)]
    pub meta_store: MetaStoreConfig,
    /// The status log and the plugins' databases.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Named outputs plugins may `emit` to (when granted).
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputConfig>,
    /// Retry policy for failed plugins.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Concurrency of the pipeline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The wasm sandbox: compiled-code cache, instance pool.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Plugin components and what each is granted.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Source connectors, by name: how their sync jobs run and where the
    /// documents go (docs/sources.md).
    #[serde(default)]
    pub sources: BTreeMap<String, source::SourceConfig>,
    /// Service connectors, by name: how they run and the transports they
    /// are served on (docs/services.md).
    #[serde(default)]
    pub services: BTreeMap<String, service::ServiceConfig>,
    /// Sciebo RDS's token storage, which services register with.
    #[serde(default)]
    pub token_storage: Option<service::TokenStorageConfig>,
    /// External databases, by name, that a grant's `sql: { database }`
    /// opens read-only for a component (sources reading a system of
    /// record): the engine connects, the guest never sees the credentials.
    #[serde(default)]
    pub databases: BTreeMap<String, ExternalDatabase>,
    /// The HTTP server for health probes and metrics; none when absent.
    #[serde(default)]
    pub server: Option<ServerConfig>,
    /// What the engine's outbound TLS connections trust (`amqps://`,
    /// `rediss://`, PostgreSQL's `sslmode`, an `https://` S3 endpoint).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Credentials, by name: each from an environment variable or a file
    /// (a Kubernetes secret volume), never written in this file. Grants
    /// bind them to destinations (`http.auth`); plugins never see them.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    /// Values of grants' `config` that came from `${ENV}` references, as
    /// `plugins.grants.NAME.config.KEY` (`sandpipe check` warns: `config`
    /// is readable by the plugin, credentials belong in `secrets`).
    #[serde(skip)]
    pub env_in_grant_config: Vec<String>,
    /// The directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself, for error messages.
    #[serde(skip)]
    pub file: PathBuf,
}

/// The HTTP server: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on, e.g. `127.0.0.1:9090`.
    pub listen: std::net::SocketAddr,
    /// The secret (under `secrets:`) whose value a request must carry as
    /// `Authorization: Bearer VALUE` to start or cancel a sync
    /// (`POST /v1/sources/...`). Unset: those requests are refused.
    #[serde(default)]
    pub token: Option<String>,
}

/// Outbound TLS: one setting for every connection the engine makes, since
/// a deployment's private CA (its company's, its cloud's) is usually one,
/// and a file may hold several CAs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM file of CA certificates (one or several) trusted in addition
    /// to the platform's roots, for servers whose certificates a private CA
    /// issued. Relative to the config file. Default: none (the platform's
    /// roots only).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The certificates of `ca_file` (none without it), in file order:
    /// an unreadable file, a malformed PEM section or a file without any
    /// `CERTIFICATE` section is an error that names the file.
    pub fn ca_certificates(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certificates = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the CA file {} is not valid PEM: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!(
                "the CA file {} holds no certificate (no `-----BEGIN CERTIFICATE-----` section)",
                path.display()
            ));
        }
        Ok(certificates)
    }
}

/// Where messages come from; `type` selects the listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ListenerConfig {
    /// A spool folder: each `*.json` file is one message.
    Dir {
        /// The spool folder. `done/`, `dead/`, `.work/` and `.retry/` are created inside it.
        path: PathBuf,
        /// How often to look for new files when the folder is empty. Default 200ms.
        #[serde(default = "default_poll", with = "humantime_serde")]
        poll_interval: Duration,
    },
    /// A RabbitMQ queue bound to an exchange.
    Rabbitmq(RabbitmqListenerConfig),
    /// A Redis stream read through a consumer group.
    Redis(RedisListenerConfig),
}

/// Listener `redis` (streams).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisListenerConfig {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// The stream (created with the group if missing).
    pub stream: String,
    /// The consumer group. Default `sandpipe`.
    #[serde(default = "default_group")]
    pub group: String,
    /// This replica's consumer name. Default: a unique name per process.
    #[serde(default)]
    pub consumer: Option<String>,
    /// The entry field holding the message. Default `message`; an entry
    /// without it is read as a JSON object of all its fields.
    #[serde(default = "default_field")]
    pub field: String,
    /// Entries read per XREADGROUP. Default 16.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// How long one XREADGROUP blocks. Default 1s.
    #[serde(default = "default_block", with = "humantime_serde")]
    pub block: Duration,
    /// Entries pending this long are taken over from their (dead)
    /// consumer with XAUTOCLAIM. Must exceed the longest processing time.
    /// Default 60s.
    #[serde(default = "default_claim_idle", with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Where dead letters go. Default `STREAM.dead`.
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
    /// Connection and response timeout. Default 5s.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_group() -> String {
    "sandpipe".into()
}
fn default_field() -> String {
    "message".into()
}
fn default_batch() -> u32 {
    16
}
fn default_block() -> Duration {
    Duration::from_secs(1)
}
fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_redis_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Listener `rabbitmq`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqListenerConfig {
    /// `amqp://user:password@host:port/vhost` (use `${ENV}` for the password;
    /// add `?heartbeat=N` to change the heartbeat interval).
    pub url: String,
    /// The exchange the queue is bound to (declared durable).
    pub exchange: ExchangeConfig,
    /// The queue (declared durable). `QUEUE.retry` and the dead-letter
    /// exchange/queue are declared beside it.
    pub queue: String,
    /// `classic` (default) or `quorum`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// The binding's routing key. Default empty.
    #[serde(default)]
    pub routing_key: String,
    /// Unacknowledged deliveries the broker sends ahead. Default 64.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Where dead letters go. Default `QUEUE.dead` (a fanout exchange with
    /// a queue of the same name).
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// How long to wait for a publisher confirm. Default 10s.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Reconnection backoff.
    #[serde(default = "default_reconnect")]
    pub reconnect: ReconnectConfig,
}

/// An exchange: name and type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// The exchange's name.
    pub name: String,
    /// `direct` (default), `fanout`, `topic`, `headers`, or a plugin's type.
    #[serde(rename = "type", default = "default_exchange_kind")]
    pub kind: String,
}

fn default_exchange_kind() -> String {
    "direct".into()
}

/// RabbitMQ queue types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    /// A classic queue.
    #[default]
    Classic,
    /// A replicated quorum queue.
    Quorum,
}

/// Reconnection backoff: doubles from `initial` up to `max`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First delay. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Largest delay. Default 30s.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

fn default_reconnect() -> ReconnectConfig {
    ReconnectConfig {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
    }
}

fn default_prefetch() -> u16 {
    64
}

fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_poll() -> Duration {
    Duration::from_millis(200)
}

/// One field of the envelope: its JSON key and whether it must be present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The JSON key in the message.
    pub key: String,
    /// A message without this key (or with `null`) is dead-lettered.
    #[serde(default)]
    pub required: bool,
}

impl FieldSpec {
    fn new(key: &str, required: bool) -> Self {
        Self {
            key: key.to_owned(),
            required,
        }
    }
}

/// The names of the envelope's fields. The defaults are sqAPI's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageFields {
    /// The message's unique id. Default `uuid_ref`, required.
    pub uuid: FieldSpec,
    /// The data's MIME type. Default `data_type`, required.
    #[serde(rename = "type")]
    pub kind: FieldSpec,
    /// The data object's location in the data store. Default `data_location`.
    pub data_location: FieldSpec,
    /// The metadata's location in the metadata store. Default `meta_location`.
    pub meta_location: FieldSpec,
    /// Inline metadata (a JSON object). Default `metadata`.
    pub metadata: FieldSpec,
    /// Where the MIME type is in the message's metadata (inline and from
    /// `meta_location`) when the envelope has no type field, as sqAPI's
    /// `mime.path`: a dotted path into the metadata object, e.g.
    /// `mime.type` (a key spelled with the dots is looked up first). With
    /// it, a missing type field is not an error; a message with neither is
    /// dead-lettered. Default: none (the type comes from the envelope only).
    pub mime_path: Option<String>,
}

impl Default for MessageFields {
    fn default() -> Self {
        Self {
            uuid: FieldSpec::new("uuid_ref", true),
            kind: FieldSpec::new("data_type", true),
            data_location: FieldSpec::new("data_location", false),
            meta_location: FieldSpec::new("meta_location", false),
            metadata: FieldSpec::new("metadata", false),
            mime_path: None,
        }
    }
}

/// Where data objects live; `type` selects the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataStoreConfig {
    /// A folder on the local disk (object_store's local filesystem).
    Disk {
        /// The root folder; locations are relative to it and cannot escape it.
        root: PathBuf,
    },
    /// An in-memory store (empty at start; useful for tests and `exec`).
    Memory,
    /// An S3-compatible object store (AWS S3, OpenStack Swift's S3 API,
    /// MinIO, Ceph RGW, ...). Locations are keys in the bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The endpoint, e.g. `https://s3.example.org`. Default: AWS for `region`.
        #[serde(default)]
        endpoint: Option<String>,
        /// The region. Default `us-east-1`.
        #[serde(default = "default_region")]
        region: String,
        /// The access key id (use `${ENV}`).
        access_key_id: String,
        /// The secret access key (use `${ENV}`).
        secret_access_key: String,
        /// Allow a plain-HTTP endpoint (a local test server). Default false.
        #[serde(default)]
        allow_http: bool,
        /// `bucket.host/key` addressing instead of `host/bucket/key`. Default false.
        #[serde(default)]
        virtual_hosted_style: bool,
    },
}

fn default_region() -> String {
    "us-east-1".into()
}

impl Default for DataStoreConfig {
    fn default() -> Self {
        Self::Disk {
            root: PathBuf::from("data"),
        }
    }
}

/// Where metadata lives; `type` selects the store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MetaStoreConfig {
    /// One JSON object per file; `meta_location` is the file's path under `root`.
    File {
        /// The root folder.
        root: PathBuf,
    },
    /// Only the metadata inline in the message; a `meta_location` is an error.
    #[default]
    Inline,
    /// Redis: `meta_location` is a key holding a JSON object (a string, as
    /// sqAPI writes it) or a hash.
    Redis {
        /// `redis://[:password@]host:port[/db]`.
        url: String,
        /// Connection and response timeout. Default 5s.
        #[serde(default = "default_redis_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
}

/// The status log and the plugins' databases; `type` selects the backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DatabaseConfig {
    /// Embedded SQLite: the status log in one file, each plugin's `sql` in
    /// its own file under `plugins_dir`.
    Sqlite {
        /// The status log and plugin state. Default `state/sandpipe.sqlite`.
        #[serde(default = "default_sqlite_path")]
        path: PathBuf,
        /// One database file per plugin. Default `state/plugins`.
        #[serde(default = "default_sqlite_plugins")]
        plugins_dir: PathBuf,
    },
    /// PostgreSQL: the status log and plugin state in the engine's schema;
    /// each plugin granted `sql` gets a schema and a login role of its own.
    Postgres {
        /// The admin connection, `postgres://user[:password]@host[:port]/database`.
        /// The user is a superuser, or a role with CREATEROLE and CREATE on
        /// the database (it makes itself a member of the plugin roles it
        /// creates, to give them their schemas). Use `${ENV}` for the
        /// password.
        url: String,
        /// An SQL script run with the admin connection at every start
        /// (after the roles and schemas exist, so it may grant to them);
        /// write it idempotently. A missing or failing script stops the
        /// engine.
        #[serde(default)]
        init: Option<PathBuf>,
        /// The engine's own schema (status log, plugin state), closed to
        /// every other role. Default `sandpipe`.
        #[serde(default = "default_pg_schema")]
        schema: String,
        /// Admin connections (status log and state). Default 16.
        #[serde(default = "default_pg_pool")]
        pool_size: usize,
        /// Connections per plugin role; each invocation that uses `sql`
        /// holds one until its transaction ends. Default: `pipeline.concurrency`.
        #[serde(default)]
        plugin_pool_size: Option<usize>,
    },
}

fn default_sqlite_path() -> PathBuf {
    PathBuf::from("state/sandpipe.sqlite")
}
fn default_sqlite_plugins() -> PathBuf {
    PathBuf::from("state/plugins")
}
fn default_pg_schema() -> String {
    "sandpipe".into()
}
fn default_pg_pool() -> usize {
    16
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self::Sqlite {
            path: default_sqlite_path(),
            plugins_dir: default_sqlite_plugins(),
        }
    }
}

/// Why `name` cannot be a schema of Sandpipe's, or `None` if it can:
/// lowercase ASCII letters, digits and `_`, starting with a letter or `_`,
/// at most 63 bytes, and none of PostgreSQL's own (`public`, `pg_*`,
/// `information_schema`).
pub fn schema_name_problem(name: &str) -> Option<String> {
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Some(format!(
            "`{name}` is not a schema name Sandpipe accepts: use 1 to 63 lowercase letters, digits and `_`, starting with a letter or `_`"
        ));
    }
    if name == "public" || name == "information_schema" || name.starts_with("pg_") {
        return Some(format!("`{name}` is PostgreSQL's own schema"));
    }
    None
}

/// A named output; `type` selects the backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OutputConfig {
    /// A folder; one JSON file per emitted message.
    Dir {
        /// The folder (created if missing).
        path: PathBuf,
    },
    /// A RabbitMQ exchange, with publisher confirms.
    Rabbitmq(RabbitmqOutputConfig),
    /// A Redis stream (XADD).
    Redis {
        /// `redis://[:password@]host:port[/db]`.
        url: String,
        /// The stream.
        stream: String,
        /// Trim the stream to about this many entries (`MAXLEN ~`). Default: no trimming.
        #[serde(default)]
        maxlen: Option<u64>,
        /// Connection and response timeout. Default 5s.
        #[serde(default = "default_redis_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
}

/// Output `rabbitmq`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqOutputConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// The exchange (declared durable).
    pub exchange: ExchangeConfig,
    /// The routing key of every message. Default empty.
    #[serde(default)]
    pub routing_key: String,
    /// How long to wait for a publisher confirm. Default 10s.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
}

/// Retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Deliveries of one message before it is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Delay before each retry.
    pub backoff: BackoffConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: BackoffConfig::default(),
        }
    }
}

/// Exponential backoff: `initial * multiplier^(attempt-1)`, capped at `max`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// The first delay. Default 1s.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// The largest delay. Default 60s.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per attempt. Default 2.
    pub multiplier: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
        }
    }
}

impl BackoffConfig {
    /// The delay before delivery number `attempt + 1`, after `attempt` failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// Concurrency of the pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages processed at once. Default 16.
    pub concurrency: usize,
    /// Plugins run at once for one message. Default 4.
    pub plugin_concurrency: usize,
    /// The largest delivery accepted; a larger one is dead-lettered unread
    /// (the dir listener reads no more than this plus one byte). Default 1MiB.
    pub max_message_bytes: ByteSize,
    /// The largest metadata object fetched from the metadata store; a
    /// larger one dead-letters the message. Default 1MiB.
    pub max_metadata_bytes: ByteSize,
    /// Which deliveries are checked against the status log for plugins
    /// that already finished the message (and so do not run again).
    /// Default `redeliveries`.
    pub dedupe: Dedupe,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            plugin_concurrency: 4,
            max_message_bytes: ByteSize::mib(1),
            max_metadata_bytes: ByteSize::mib(1),
            dedupe: Dedupe::Redeliveries,
        }
    }
}

/// `pipeline.dedupe`: which deliveries look up the plugins already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dedupe {
    /// Every delivery that may have been seen before: a broker's
    /// redelivery, a retry, a requeue after an outage, a stream entry
    /// taken over from a dead consumer, every file of the `dir` listener.
    /// A message's first delivery from RabbitMQ or Redis skips the look-up
    /// (one query per message less): a producer that publishes one message
    /// twice gets its plugins run twice, as at-least-once allows.
    Redeliveries,
    /// Every delivery, first ones included: a message id already done is
    /// not run again even when its producer published it twice.
    EveryDelivery,
}

/// The wasm sandbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Compiled native code, one file per component hash and engine version.
    /// Default `state/cache`.
    pub cache_dir: PathBuf,
    /// Plugin instances alive at once (the pooling allocator's size).
    /// Default 128.
    pub max_instances: u32,
    /// Use wasmtime's pooling allocator (pre-reserved slots, copy-on-write
    /// memory images); `false` allocates each instance on demand. Default
    /// true. See docs/benchmarks.md for what each costs.
    pub pooling: bool,
    /// With the pooling allocator: how much of each slot's linear memory
    /// (and of its tables and async stack) stays resident between
    /// instances, reset in place, instead of being handed back to the
    /// kernel and faulted in again by the next instance. Either way the
    /// next instance sees none of the last one's data (tests/e2e/leaks.rs).
    /// Unset (the default): 1 MiB with `dirty_page_reset` in use, else
    /// 64 KiB zeroed in place.
    /// See docs/benchmarks.md for the costs.
    pub keep_resident: Option<ByteSize>,
    /// Reset only the pages an instance dirtied (Linux 6.7+ `PAGEMAP_SCAN`)
    /// instead of handing them back to the kernel: half the cost of a
    /// fresh instance. Off by default: wasmtime 48's scan skips a dirty
    /// page that is not present at that instant — swapped out, or being
    /// moved by the kernel's memory compaction — and the next instance in
    /// the slot could read it (bytecodealliance/wasmtime#14357). Never used
    /// with swap active. See docs/security.md.
    pub dirty_page_reset: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("state/cache"),
            max_instances: 128,
            pooling: true,
            keep_resident: None,
            dirty_page_reset: false,
        }
    }
}

/// Plugin components and their grants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Every `*.wasm` here is a plugin, named after its file stem. Default `plugins`.
    pub dir: PathBuf,
    /// Limits for every plugin that does not override them.
    pub defaults: Limits,
    /// What each plugin may do, by plugin name. A plugin without an entry
    /// is loaded with nothing granted (log and config only).
    pub grants: BTreeMap<String, Grant>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("plugins"),
            defaults: Limits::default(),
            grants: BTreeMap::new(),
        }
    }
}

/// Where a secret's value comes from: exactly one of `env` and `file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// An environment variable's name.
    pub env: Option<String>,
    /// A file (relative to the config file), read at start; one trailing
    /// newline is dropped.
    pub file: Option<PathBuf>,
}

/// Per-invocation limits of the sandbox and of the host capabilities.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Fuel per invocation (wasm instructions, roughly). `null`: unmetered,
    /// the deadline alone stops a runaway plugin. Default `null`.
    pub fuel: Option<u64>,
    /// Linear memory per instance. Default 64MiB.
    pub memory: ByteSize,
    /// Wall-clock deadline per invocation. Default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bytes of log text per invocation. Default 64KiB.
    pub log_bytes: ByteSize,
    /// Captured stderr per invocation (panic messages). Default 16KiB.
    pub stderr_bytes: ByteSize,
    /// Messages emitted per invocation. Default 1000.
    pub emits: u32,
    /// Bytes emitted per invocation, payloads and headers. Default 16MiB.
    pub emit_bytes: ByteSize,
    /// Rows one SQL query may return. Default 10000.
    pub sql_rows: u32,
    /// Bytes of values one SQL query may return (text and blobs by their
    /// length, every other value 8). Default 16MiB.
    pub sql_bytes: ByteSize,
    /// Bytes one `blob.read` returns at most. Default 1MiB.
    pub blob_chunk: ByteSize,
    /// Bytes written through `blob.put` per invocation. Default 64MiB.
    pub blob_put_bytes: ByteSize,
    /// Objects open for reading at once in one invocation (each holds a
    /// file or a connection of the engine's). Default 16.
    pub blob_readers: u32,
    /// Bytes of state changes (keys and values) queued per invocation.
    /// Default 16MiB.
    pub state_bytes: ByteSize,
    /// State changes (sets and deletes) queued per invocation. Default
    /// 10000.
    pub state_changes: u32,
    /// The largest state value. Default 1MiB.
    pub state_value_bytes: ByteSize,
    /// Host calls per invocation. Default 100000.
    pub host_calls: u64,
    /// Outbound HTTP requests per invocation (`http` grant). Default 100.
    pub http_requests: u32,
    /// Bytes of request bodies sent per invocation. Default 16MiB.
    pub http_request_bytes: ByteSize,
    /// Bytes of response bodies received per invocation; a longer
    /// response fails when the guest reads past it (it is streamed, never
    /// held whole). Default 64MiB.
    pub http_response_bytes: ByteSize,
    /// Requests of one plugin in flight at once, across all its
    /// invocations; more wait for a turn (within their deadline).
    /// Default 16.
    pub http_concurrency: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: None,
            memory: ByteSize::mib(64),
            timeout: Duration::from_secs(5),
            log_bytes: ByteSize::kib(64),
            stderr_bytes: ByteSize::kib(16),
            emits: 1000,
            emit_bytes: ByteSize::mib(16),
            sql_rows: 10_000,
            sql_bytes: ByteSize::mib(16),
            blob_chunk: ByteSize::mib(1),
            blob_put_bytes: ByteSize::mib(64),
            blob_readers: 16,
            state_bytes: ByteSize::mib(16),
            state_changes: 10_000,
            state_value_bytes: ByteSize::mib(1),
            host_calls: 100_000,
            http_requests: 100,
            http_request_bytes: ByteSize::mib(16),
            http_response_bytes: ByteSize::mib(64),
            http_concurrency: 16,
        }
    }
}

/// Per-plugin overrides of [`Limits`]; unset keys take the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// See [`Limits::fuel`]. `0` here means unmetered.
    pub fuel: Option<u64>,
    /// See [`Limits::memory`].
    pub memory: Option<ByteSize>,
    /// See [`Limits::timeout`].
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// See [`Limits::log_bytes`].
    pub log_bytes: Option<ByteSize>,
    /// See [`Limits::stderr_bytes`].
    pub stderr_bytes: Option<ByteSize>,
    /// See [`Limits::emits`].
    pub emits: Option<u32>,
    /// See [`Limits::emit_bytes`].
    pub emit_bytes: Option<ByteSize>,
    /// See [`Limits::sql_rows`].
    pub sql_rows: Option<u32>,
    /// See [`Limits::sql_bytes`].
    pub sql_bytes: Option<ByteSize>,
    /// See [`Limits::blob_chunk`].
    pub blob_chunk: Option<ByteSize>,
    /// See [`Limits::blob_put_bytes`].
    pub blob_put_bytes: Option<ByteSize>,
    /// See [`Limits::blob_readers`].
    pub blob_readers: Option<u32>,
    /// See [`Limits::state_bytes`].
    pub state_bytes: Option<ByteSize>,
    /// See [`Limits::state_changes`].
    pub state_changes: Option<u32>,
    /// See [`Limits::state_value_bytes`].
    pub state_value_bytes: Option<ByteSize>,
    /// See [`Limits::host_calls`].
    pub host_calls: Option<u64>,
    /// See [`Limits::http_requests`].
    pub http_requests: Option<u32>,
    /// See [`Limits::http_request_bytes`].
    pub http_request_bytes: Option<ByteSize>,
    /// See [`Limits::http_response_bytes`].
    pub http_response_bytes: Option<ByteSize>,
    /// See [`Limits::http_concurrency`].
    pub http_concurrency: Option<u32>,
}

impl LimitOverrides {
    /// These overrides applied on top of `base`.
    pub fn apply(&self, base: &Limits) -> Limits {
        Limits {
            fuel: match self.fuel {
                Some(0) => None,
                Some(f) => Some(f),
                None => base.fuel,
            },
            memory: self.memory.unwrap_or(base.memory),
            timeout: self.timeout.unwrap_or(base.timeout),
            log_bytes: self.log_bytes.unwrap_or(base.log_bytes),
            stderr_bytes: self.stderr_bytes.unwrap_or(base.stderr_bytes),
            emits: self.emits.unwrap_or(base.emits),
            emit_bytes: self.emit_bytes.unwrap_or(base.emit_bytes),
            sql_rows: self.sql_rows.unwrap_or(base.sql_rows),
            sql_bytes: self.sql_bytes.unwrap_or(base.sql_bytes),
            blob_chunk: self.blob_chunk.unwrap_or(base.blob_chunk),
            blob_put_bytes: self.blob_put_bytes.unwrap_or(base.blob_put_bytes),
            blob_readers: self.blob_readers.unwrap_or(base.blob_readers),
            state_bytes: self.state_bytes.unwrap_or(base.state_bytes),
            state_changes: self.state_changes.unwrap_or(base.state_changes),
            state_value_bytes: self.state_value_bytes.unwrap_or(base.state_value_bytes),
            host_calls: self.host_calls.unwrap_or(base.host_calls),
            http_requests: self.http_requests.unwrap_or(base.http_requests),
            http_request_bytes: self.http_request_bytes.unwrap_or(base.http_request_bytes),
            http_response_bytes: self.http_response_bytes.unwrap_or(base.http_response_bytes),
            http_concurrency: self.http_concurrency.unwrap_or(base.http_concurrency),
        }
    }
}

/// What one plugin may do. Everything not listed is denied.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// MIME types routed to this plugin (`type/*` and `*/*` allowed). When
    /// absent, the plugin's own `describe` list is used.
    pub mime: Option<Vec<String>>,
    /// Refuse to load the plugin if it imports an interface not granted here.
    #[serde(default)]
    pub strict: bool,
    /// Pin the component: refuse it unless its sha256 (hex) matches.
    pub sha256: Option<String>,
    /// `sql`: a database of the plugin's own. `true` or a map.
    #[serde(default, deserialize_with = "bool_or_map")]
    pub sql: Option<SqlGrant>,
    /// `emit`: the outputs the plugin may publish to.
    #[serde(default)]
    pub emit: Vec<String>,
    /// `emit` to any output name: set only by `sandpipe exec`, which
    /// captures emits and publishes nothing; the YAML cannot set it.
    #[serde(skip)]
    pub emit_any: bool,
    /// `blob`: `true` (the message's data object only) or a map.
    #[serde(default, deserialize_with = "bool_or_map")]
    pub blob: Option<BlobGrant>,
    /// `meta`: the message's metadata and a plugin-scoped state.
    #[serde(default, deserialize_with = "bool_or_map")]
    pub meta: Option<MetaGrant>,
    /// `http`: outbound requests through `wasi:http` to the hosts its
    /// `allow` list names (see [`http`]).
    pub http: Option<http::HttpGrant>,
    /// The plugin's own configuration values, readable through `config`.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    /// Limit overrides for this plugin (same keys as `plugins.defaults`).
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Opt-in: reuse warm instances across messages instead of a fresh
    /// instance per message (see [`Reuse`]). Absent: a fresh instance for
    /// every message, the default and the strongest isolation.
    #[serde(default)]
    pub reuse: Option<Reuse>,
}

/// Warm-instance reuse for one plugin: trades isolation between messages
/// for throughput, for guests whose instantiation is expensive (Python,
/// JavaScript). What the plugin keeps in its memory — globals, caches,
/// anything a message left there — is seen by the next messages that reuse
/// the instance; effects, SQL transactions, limits, host calls and blob
/// readers stay per message. An instance is discarded after any trap,
/// after `messages` messages, or if a message leaves a blob reader open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reuse {
    /// Idle warm instances kept (each holds a slot of
    /// `sandbox.max_instances`). Default 2.
    pub instances: u32,
    /// Messages one instance serves before it is discarded. Default 1000.
    pub messages: u32,
}

impl Default for Reuse {
    fn default() -> Self {
        Self {
            instances: 2,
            messages: 1000,
        }
    }
}

/// An external database (`databases.NAME`), read-only for the components
/// granted it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalDatabase {
    /// `mysql` (MySQL or MariaDB) or `postgres`.
    #[serde(rename = "type")]
    pub kind: ExternalKind,
    /// `mysql://user@host[:port]/database` or
    /// `postgres://user@host[:port]/database` (with `?sslmode=` as for
    /// `database.url`), without the password.
    pub url: String,
    /// The secret (under `secrets:`) holding the password, if any.
    #[serde(default)]
    pub password: Option<String>,
    /// Connections kept open. Default 4.
    #[serde(default = "default_external_pool")]
    pub pool_size: usize,
}

fn default_external_pool() -> usize {
    4
}

/// The kind of an external database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalKind {
    /// MySQL or MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgres,
}

/// The `sql` grant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlGrant {
    /// An external database (under `databases:`) opened read-only instead
    /// of the plugin's own; `schema` and `init` do not apply.
    #[serde(default)]
    pub database: Option<String>,
    /// PostgreSQL only: the plugin's schema. Default: the plugin's name made
    /// an identifier (lowercase, `-` and other characters → `_`).
    pub schema: Option<String>,
    /// An SQL script (relative to the config file) that sets up the
    /// plugin's tables: run at every start, before any message, as the
    /// plugin itself (its role and schema on PostgreSQL, its file under
    /// the plugin policy on SQLite), in one transaction that holds the
    /// schema's DDL lock. Write it idempotently (`IF NOT EXISTS`).
    pub init: Option<PathBuf>,
}

impl SqlGrant {
    /// The schema of plugin `plugin` under this grant.
    pub fn schema_for(&self, plugin: &str) -> String {
        match &self.schema {
            Some(schema) => schema.clone(),
            None => identifier(plugin),
        }
    }
}

/// `name` in the characters of an SQL identifier: lowercase, and `_` for
/// every character but ASCII letters and digits.
pub fn identifier_chars(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `name` made an SQL identifier: lowercase, every character but ASCII
/// letters and digits `_`, `p_` in front unless it starts with a letter or
/// `_`, at most 63 bytes.
pub fn identifier(name: &str) -> String {
    let mut out = identifier_chars(name);
    if !out.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        out.insert_str(0, "p_");
    }
    out.truncate(63);
    out
}

/// The `blob` grant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobGrant {
    /// Location prefixes `blob.open` may read, besides the message's own data object.
    #[serde(default)]
    pub read: Vec<String>,
    /// Location prefixes `blob.put` may write.
    #[serde(default)]
    pub write: Vec<String>,
}

/// The `meta` grant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaGrant {}

/// `true` → `Some(T::default())`, `false`/absent → `None`, a map → `Some(T)`.
fn bool_or_map<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Flag(bool),
        Map(T),
    }
    match Either::<T>::deserialize(de) {
        Ok(Either::Flag(true)) => Ok(Some(T::default())),
        Ok(Either::Flag(false)) => Ok(None),
        Ok(Either::Map(t)) => Ok(Some(t)),
        Err(_) => Err(serde::de::Error::custom(
            "expected `true`, `false` or a map of this grant's known keys",
        )),
    }
}

impl Config {
    /// Read, expand and parse a config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parse config text that claims to come from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let expanded = expand_env(file, text)?;
        let de = serde_yaml_ng::Deserializer::from_str(&expanded);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {}, column {}", l.line(), l.column()))
                .unwrap_or_else(|| "?".to_owned());
            let message = strip_location(&inner.to_string());
            ConfigError::Parse {
                file: file.to_owned(),
                location,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        config.file = file.to_owned();
        config.env_in_grant_config = env_in_grant_config(text);
        config.base_dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    /// A path from the config, resolved against the config file's folder.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir.clone();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let ListenerConfig::Dir { path, .. } = &mut self.listener {
            fix(path);
        }
        if let DataStoreConfig::Disk { root } = &mut self.data_store {
            fix(root);
        }
        if let MetaStoreConfig::File { root } = &mut self.meta_store {
            fix(root);
        }
        match &mut self.database {
            DatabaseConfig::Sqlite { path, plugins_dir } => {
                fix(path);
                fix(plugins_dir);
            }
            DatabaseConfig::Postgres { init, .. } => {
                if let Some(init) = init {
                    fix(init);
                }
            }
        }
        for secret in self.secrets.values_mut() {
            if let Some(path) = &mut secret.file {
                fix(path);
            }
        }
        for output in self.outputs.values_mut() {
            if let OutputConfig::Dir { path } = output {
                fix(path);
            }
        }
        if let Some(ca_file) = &mut self.tls.ca_file {
            fix(ca_file);
        }
        fix(&mut self.sandbox.cache_dir);
        fix(&mut self.plugins.dir);
        for source in self.sources.values_mut() {
            if let Some(source::SinkConfig::Sqlite { path, .. }) = &mut source.sink {
                fix(path);
            }
        }
        for grant in self.plugins.grants.values_mut() {
            if let Some(init) = grant.sql.as_mut().and_then(|s| s.init.as_mut()) {
                fix(init);
            }
        }
        for service in self.services.values_mut() {
            if let Some(icon) = service.register.as_mut().and_then(|r| r.icon.as_mut()) {
                fix(icon);
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            key,
            message,
        };
        if self.retry.max_attempts == 0 {
            return Err(invalid(
                "retry.max_attempts".into(),
                "must be at least 1".into(),
            ));
        }
        if self.pipeline.concurrency == 0 || self.pipeline.plugin_concurrency == 0 {
            return Err(invalid(
                "pipeline".into(),
                "concurrency and plugin_concurrency must be at least 1".into(),
            ));
        }
        if let Some(path) = &self.message_fields.mime_path
            && (path.is_empty() || path.split('.').any(str::is_empty))
        {
            return Err(invalid(
                "message_fields.mime_path".into(),
                format!("`{path}` is not a dotted path into the metadata (e.g. `mime.type`)"),
            ));
        }
        self.validate_database()?;
        if let Err(message) = self.tls.ca_certificates() {
            return Err(invalid("tls.ca_file".into(), message));
        }
        self.validate_secrets()?;
        for (name, grant) in &self.plugins.grants {
            for output in &grant.emit {
                if !self.outputs.contains_key(output) {
                    return Err(invalid(
                        format!("plugins.grants.{name}.emit"),
                        format!(
                            "output `{output}` is not declared under `outputs` (declared: {})",
                            list_or_none(self.outputs.keys())
                        ),
                    ));
                }
            }
            if let Some(pin) = &grant.sha256
                && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(
                    format!("plugins.grants.{name}.sha256"),
                    "must be 64 hexadecimal digits".into(),
                ));
            }
            if let Some(reuse) = &grant.reuse
                && (reuse.instances == 0 || reuse.messages == 0)
            {
                return Err(invalid(
                    format!("plugins.grants.{name}.reuse"),
                    "instances and messages must be at least 1 (leave `reuse` out for a fresh instance per message)".into(),
                ));
            }
        }
        self.validate_sources()?;
        self.validate_services()?;
        for (name, grant) in &self.plugins.grants {
            let Some(sql) = &grant.sql else { continue };
            let Some(database) = &sql.database else {
                continue;
            };
            let key = format!("plugins.grants.{name}.sql.database");
            if !self.databases.contains_key(database) {
                return Err(invalid(
                    key,
                    format!(
                        "database `{database}` is not declared under `databases` (declared: {})",
                        list_or_none(self.databases.keys())
                    ),
                ));
            }
            if sql.init.is_some() || sql.schema.is_some() {
                return Err(invalid(
                    key,
                    "an external database is read-only: `init` and `schema` do not apply".into(),
                ));
            }
        }
        if let Some(server) = &self.server
            && let Some(secret) = &server.token
            && !self.secrets.contains_key(secret)
        {
            return Err(invalid(
                "server.token".into(),
                format!(
                    "secret `{secret}` is not declared under `secrets` (declared: {})",
                    list_or_none(self.secrets.keys())
                ),
            ));
        }
        for (name, db) in &self.databases {
            if let Some(secret) = &db.password
                && !self.secrets.contains_key(secret)
            {
                return Err(invalid(
                    format!("databases.{name}.password"),
                    format!(
                        "secret `{secret}` is not declared under `secrets` (declared: {})",
                        list_or_none(self.secrets.keys())
                    ),
                ));
            }
            let (kind, schemes): (&str, &[&str]) = match db.kind {
                ExternalKind::Mysql => ("mysql", &["mysql://"]),
                ExternalKind::Postgres => ("postgres", &["postgres://", "postgresql://"]),
            };
            if !schemes.iter().any(|s| db.url.starts_with(s)) || db.pool_size == 0 {
                return Err(invalid(
                    format!("databases.{name}"),
                    format!(
                        "a `{kind}` database's url starts with {}, and pool_size is at least 1",
                        schemes.join(" or ")
                    ),
                ));
            }
        }
        // Idle warm instances hold pooling slots: leave room for the rest.
        // A service's instances stay warm for good.
        let warm: u64 = self
            .plugins
            .grants
            .values()
            .filter_map(|g| g.reuse.as_ref())
            .map(|r| u64::from(r.instances))
            .sum::<u64>()
            + self
                .services
                .values()
                .map(|s| u64::from(s.instances))
                .sum::<u64>();
        if warm >= u64::from(self.sandbox.max_instances) {
            return Err(invalid(
                "sandbox.max_instances".into(),
                format!(
                    "{} instance slots cannot hold the {warm} warm instances the grants' `reuse` and the services keep and still run other components: raise it above {warm}",
                    self.sandbox.max_instances
                ),
            ));
        }
        Ok(())
    }

    /// The `services` section.
    fn validate_services(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            key,
            message,
        };
        let mut listens: BTreeMap<SocketAddr, &str> = BTreeMap::new();
        if let Some(server) = &self.server {
            listens.insert(server.listen, "server");
        }
        for (name, service) in &self.services {
            if service.instances == 0 {
                return Err(invalid(
                    format!("services.{name}.instances"),
                    "must be at least 1".into(),
                ));
            }
            if !service.connect.is_object() {
                return Err(invalid(
                    format!("services.{name}.connect"),
                    "must be a map (the JSON object `on-connect` gets)".into(),
                ));
            }
            if let Some(vantiq) = &service.vantiq {
                let key = format!("services.{name}.vantiq");
                if !self.secrets.contains_key(&vantiq.token) {
                    return Err(invalid(
                        format!("{key}.token"),
                        format!(
                            "secret `{}` is not declared under `secrets` (declared: {})",
                            vantiq.token,
                            list_or_none(self.secrets.keys())
                        ),
                    ));
                }
                let scheme = vantiq.url.split("://").next().unwrap_or_default();
                if !["http", "https", "ws", "wss"].contains(&scheme) || !vantiq.url.contains("://")
                {
                    return Err(invalid(
                        format!("{key}.url"),
                        format!(
                            "`{}` is not an http(s):// or ws(s):// URL of a Vantiq server",
                            vantiq.url
                        ),
                    ));
                }
                if vantiq.sources.is_empty() {
                    return Err(invalid(
                        format!("{key}.sources"),
                        "name at least one Vantiq source".into(),
                    ));
                }
                if vantiq.sources.iter().any(|s| s == name) {
                    return Err(invalid(
                        format!("{key}.sources"),
                        format!(
                            "`{name}` is the service's own source (its HTTP one): name the Vantiq sources otherwise"
                        ),
                    ));
                }
            }
            if let Some(health) = &service.health
                && health.listen.port() != 0
                && let Some(other) = listens.insert(health.listen, name)
            {
                return Err(invalid(
                    format!("services.{name}.health.listen"),
                    format!("{} is also {other}'s address", health.listen),
                ));
            }
            if let Some(register) = &service.register {
                let key = format!("services.{name}.register");
                if self.token_storage.is_none() {
                    return Err(invalid(
                        key,
                        "registering needs `token_storage: { url: ... }`".into(),
                    ));
                }
                if !register.servicename.starts_with("port-") {
                    return Err(invalid(
                        format!("{key}.servicename"),
                        format!(
                            "`{}`: the token storage takes names that start with `port-`",
                            register.servicename
                        ),
                    ));
                }
                if register.implements.is_empty()
                    || register
                        .implements
                        .iter()
                        .any(|i| i != "fileStorage" && i != "metadata")
                {
                    return Err(invalid(
                        format!("{key}.implements"),
                        "one or both of `fileStorage` and `metadata`".into(),
                    ));
                }
                for (field, secret) in [
                    ("client_id", &register.client_id),
                    ("client_secret", &register.client_secret),
                ] {
                    if !self.secrets.contains_key(secret) {
                        return Err(invalid(
                            format!("{key}.{field}"),
                            format!(
                                "secret `{secret}` is not declared under `secrets` (declared: {})",
                                list_or_none(self.secrets.keys())
                            ),
                        ));
                    }
                }
            }
            let Some(http) = &service.http else { continue };
            if let Some(secret) = &http.token
                && !self.secrets.contains_key(secret)
            {
                return Err(invalid(
                    format!("services.{name}.http.token"),
                    format!(
                        "secret `{secret}` is not declared under `secrets` (declared: {})",
                        list_or_none(self.secrets.keys())
                    ),
                ));
            }
            if http.listen.port() != 0
                && let Some(other) = listens.insert(http.listen, name)
            {
                return Err(invalid(
                    format!("services.{name}.http.listen"),
                    format!("{} is also {other}'s address", http.listen),
                ));
            }
        }
        Ok(())
    }

    /// The `sources` section.
    fn validate_sources(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            key,
            message,
        };
        let mut sinks: BTreeMap<String, &String> = BTreeMap::new();
        for (name, source) in &self.sources {
            if source.page_size == 0 || source.batch.operations == 0 || source.batch.bytes.0 == 0 {
                return Err(invalid(
                    format!("sources.{name}"),
                    "page_size, batch.operations and batch.bytes must be at least 1".into(),
                ));
            }
            let e = &source.errors;
            if !(0.0..=1.0).contains(&e.max_rate) || e.window == 0 {
                return Err(invalid(
                    format!("sources.{name}.errors"),
                    "max_rate is a share between 0 and 1, over a window of at least 1 document"
                        .into(),
                ));
            }
            for output in &source.outputs {
                if !self.outputs.contains_key(output) {
                    return Err(invalid(
                        format!("sources.{name}.outputs"),
                        format!(
                            "output `{output}` is not declared under `outputs` (declared: {})",
                            list_or_none(self.outputs.keys())
                        ),
                    ));
                }
            }
            let sink = self
                .sink_for(name, source)
                .map_err(|m| invalid(format!("sources.{name}.sink"), m))?;
            let (schema, table) = match &sink {
                source::SinkConfig::Postgres { schema, table, .. } => (Some(schema), table),
                source::SinkConfig::Sqlite { table, .. } => (None, table),
            };
            for ident in schema.into_iter().chain(table) {
                if let Some(problem) = schema_name_problem(ident) {
                    return Err(invalid(format!("sources.{name}.sink"), problem));
                }
            }
            // A full sync deletes what its source does not yield from the
            // whole table: two sources in one table would delete each
            // other's documents.
            if let Some(table) = table
                && table.starts_with("sandpipe_")
            {
                return Err(invalid(
                    format!("sources.{name}.sink"),
                    format!(
                        "table `{table}`: names starting with `sandpipe_` are the engine's (its job records, cursors and indexes live beside the documents)"
                    ),
                ));
            }
            // Where the table is, whatever the spelling: the server and
            // database of a URL, the file of a path.
            let target = match &sink {
                source::SinkConfig::Postgres { url, schema, table } => {
                    let url = url.as_deref().unwrap_or_default();
                    let server = match postgres_url(url) {
                        Ok((c, _)) => format!(
                            "{:?} {:?} {}",
                            c.get_hosts(),
                            c.get_ports(),
                            c.get_dbname().or(c.get_user()).unwrap_or_default()
                        ),
                        Err(_) => url.to_owned(),
                    };
                    format!(
                        "postgres {server} {schema}.{}",
                        table.as_deref().unwrap_or_default()
                    )
                }
                source::SinkConfig::Sqlite { path, table } => format!(
                    "sqlite {} {}",
                    path.components().collect::<PathBuf>().display(),
                    table.as_deref().unwrap_or_default()
                ),
            };
            if let Some(other) = sinks.insert(target, name) {
                return Err(invalid(
                    format!("sources.{name}.sink"),
                    format!(
                        "sources `{other}` and `{name}` sink into the same table: each full sync would delete the other's documents; give one a `sink.table` of its own"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sink of source `name`, its defaults filled in: the URL (from
    /// `database` when unset), the table (the source's name made an
    /// identifier); or why there is none.
    pub fn sink_for(
        &self,
        name: &str,
        source: &source::SourceConfig,
    ) -> Result<source::SinkConfig, String> {
        let table = identifier(name);
        Ok(match &source.sink {
            None => match &self.database {
                DatabaseConfig::Postgres { url, .. } => source::SinkConfig::Postgres {
                    url: Some(url.clone()),
                    schema: source::default_sink_schema(),
                    table: Some(table),
                },
                DatabaseConfig::Sqlite { path, .. } => source::SinkConfig::Sqlite {
                    path: path
                        .parent()
                        .map(|dir| dir.join("sources.sqlite"))
                        .unwrap_or_else(|| self.path(&source::default_sink_path())),
                    table: Some(table),
                },
            },
            Some(source::SinkConfig::Postgres {
                url,
                schema,
                table: t,
            }) => {
                let url = match (url, &self.database) {
                    (Some(url), _) => url.clone(),
                    (None, DatabaseConfig::Postgres { url, .. }) => url.clone(),
                    (None, DatabaseConfig::Sqlite { .. }) => {
                        return Err(
                            "a `postgres` sink needs a `url` when `database` is not PostgreSQL"
                                .into(),
                        );
                    }
                };
                source::SinkConfig::Postgres {
                    url: Some(url),
                    schema: schema.clone(),
                    table: Some(t.clone().unwrap_or(table)),
                }
            }
            Some(source::SinkConfig::Sqlite { path, table: t }) => source::SinkConfig::Sqlite {
                path: path.clone(),
                table: Some(t.clone().unwrap_or(table)),
            },
        })
    }

    /// The `secrets` section and the `http.auth` bindings that name them.
    fn validate_secrets(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            key,
            message,
        };
        for (name, source) in &self.secrets {
            if source.env.is_some() == source.file.is_some() {
                return Err(invalid(
                    format!("secrets.{name}"),
                    "give exactly one of `env: VARIABLE` and `file: PATH` (a secret's value is \
                     never written in this file)"
                        .into(),
                ));
            }
        }
        for (plugin, grant) in &self.plugins.grants {
            let Some(http_grant) = &grant.http else {
                continue;
            };
            for (destination, auth) in &http_grant.auth {
                let key = format!("plugins.grants.{plugin}.http.auth.\"{destination}\"");
                if matches!(auth, http::HttpAuth::OauthUser(_)) && self.token_storage.is_none() {
                    return Err(invalid(
                        key,
                        "`oauth_user` takes users' tokens from the token storage: configure `token_storage: { url: ... }`".into(),
                    ));
                }
                if let Some(problem) = destination.auth_problem() {
                    return Err(invalid(key, format!("cannot carry a secret: {problem}")));
                }
                for secret in auth.secrets() {
                    if !self.secrets.contains_key(secret) {
                        return Err(invalid(
                            key,
                            format!(
                                "secret `{secret}` is not declared under `secrets` (declared: {})",
                                list_or_none(self.secrets.keys())
                            ),
                        ));
                    }
                }
                for header in auth.header_names() {
                    let token = !header.is_empty()
                        && header
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                    if !token || http::RESERVED_HEADERS.contains(&header.as_str()) {
                        return Err(invalid(
                            key,
                            format!(
                                "`{header}` cannot carry a secret (not a header name, or one the engine sets itself)"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The `database` section and the `sql` grants' schemas.
    fn validate_database(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            key,
            message,
        };
        let mut taken: BTreeMap<String, String> = BTreeMap::new();
        if let DatabaseConfig::Postgres {
            url,
            schema,
            pool_size,
            plugin_pool_size,
            ..
        } = &self.database
        {
            if let Err(e) = postgres_url(url) {
                return Err(invalid(
                    "database.url".into(),
                    format!("not a PostgreSQL connection URL: {e}"),
                ));
            }
            if let Some(problem) = schema_name_problem(schema) {
                return Err(invalid("database.schema".into(), problem));
            }
            if *pool_size == 0 || *plugin_pool_size == Some(0) {
                return Err(invalid(
                    "database".into(),
                    "pool_size and plugin_pool_size must be at least 1".into(),
                ));
            }
            taken.insert(schema.clone(), "the engine (database.schema)".into());
        }
        let postgres = matches!(self.database, DatabaseConfig::Postgres { .. });
        for (name, grant) in &self.plugins.grants {
            let Some(sql) = &grant.sql else { continue };
            // An explicit schema is checked whatever the backend; the
            // derived ones matter only where schemas exist.
            if sql.schema.is_none() && !postgres {
                continue;
            }
            let key = format!("plugins.grants.{name}.sql.schema");
            let schema = sql.schema_for(name);
            if let Some(problem) = schema_name_problem(&schema) {
                let hint = if sql.schema.is_none() {
                    " (derived from the plugin's name; set `sql: { schema: NAME }`)".to_owned()
                } else {
                    String::new()
                };
                return Err(invalid(key, format!("{problem}{hint}")));
            }
            if !postgres {
                continue;
            }
            if let Some(owner) = taken.insert(schema.clone(), format!("plugin `{name}`")) {
                return Err(invalid(
                    key,
                    format!(
                        "schema `{schema}` is already used by {owner}; give each plugin its own with `sql: {{ schema: NAME }}`"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The effective limits of plugin `name`.
    pub fn limits_for(&self, name: &str) -> Limits {
        match self.plugins.grants.get(name) {
            Some(grant) => grant.limits.apply(&self.plugins.defaults),
            None => self.plugins.defaults.clone(),
        }
    }
}

/// `a, b, c`, or `none`.
pub fn list_or_none<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: std::fmt::Display,
{
    let all: Vec<String> = items.into_iter().map(|s| s.to_string()).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

/// serde_yaml appends " at line X column Y"; we print the location ourselves.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The grants' `config` values written with a `${NAME}` reference, read
/// from the text before expansion (nothing if it is not YAML).
fn env_in_grant_config(text: &str) -> Vec<String> {
    fn mentions_env(value: &serde_yaml_ng::Value) -> bool {
        match value {
            serde_yaml_ng::Value::String(s) => s.contains("${"),
            serde_yaml_ng::Value::Sequence(items) => items.iter().any(mentions_env),
            serde_yaml_ng::Value::Mapping(map) => map.values().any(mentions_env),
            serde_yaml_ng::Value::Tagged(tagged) => mentions_env(&tagged.value),
            _ => false,
        }
    }
    let Ok(raw) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) else {
        return Vec::new();
    };
    let Some(grants) = raw
        .get("plugins")
        .and_then(|p| p.get("grants"))
        .and_then(|g| g.as_mapping())
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (name, grant) in grants {
        let Some(config) = grant.get("config").and_then(|c| c.as_mapping()) else {
            continue;
        };
        for (key, value) in config {
            if mentions_env(value) {
                found.push(format!(
                    "plugins.grants.{}.config.{}",
                    name.as_str().unwrap_or("?"),
                    key.as_str().unwrap_or("?")
                ));
            }
        }
    }
    found.sort();
    found
}

/// Replace `${NAME}` with the environment variable `NAME`.
fn expand_env(file: &Path, text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let name = &after[..end];
            let value = std::env::var(name).map_err(|_| ConfigError::MissingEnv {
                file: file.to_owned(),
                line: index + 1,
                name: name.to_owned(),
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/sandpipe/test.yaml"), text)
    }

    #[test]
    fn minimal_config_gets_embedded_defaults() -> anyhow::Result<()> {
        let c = parse("listener: { type: dir, path: spool }\n")?;
        assert!(matches!(c.database, DatabaseConfig::Sqlite { .. }));
        assert!(
            matches!(&c.listener, ListenerConfig::Dir { path, .. } if path == Path::new("/etc/sandpipe/spool"))
        );
        assert_eq!(c.message_fields.uuid.key, "uuid_ref");
        assert!(c.message_fields.kind.required);
        assert_eq!(c.plugins.defaults.memory, ByteSize::mib(64));
        Ok(())
    }

    #[test]
    fn unknown_key_names_file_line_and_path() {
        let err = parse(
            "listener: { type: dir, path: spool }\nplugins:\n  grants:\n    a:\n      limits:\n        memroy: 1MiB\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("/etc/sandpipe/test.yaml"), "{err}");
        assert!(err.contains("line 6"), "{err}");
        assert!(err.contains("plugins.grants.a.limits"), "{err}");
        assert!(err.contains("memroy"), "{err}");
    }

    #[test]
    fn secrets_are_named_sources_and_http_auth_binds_them_to_destinations() -> anyhow::Result<()> {
        let c = parse(
            "listener: { type: dir, path: spool }\nsecrets:\n  token: { env: ZENODO_TOKEN }\n  key: { file: keys/api }\nplugins:\n  grants:\n    p:\n      http:\n        allow: [\"https://zenodo.org\", \"https://*.example.org\"]\n        auth:\n          \"https://zenodo.org\": { bearer: token }\n          \"https://*.example.org\": { header: { X-Api-Key: key } }\n          \"https://other.org:8443\": { basic: { user: me, password: token } }\n",
        )?;
        assert_eq!(
            c.secrets["key"].file.as_deref(),
            Some(Path::new("/etc/sandpipe/keys/api"))
        );
        let http = c.plugins.grants["p"].http.as_ref().unwrap();
        assert_eq!(
            http.auth_for("https", "zenodo.org", 443),
            Some(&http::HttpAuth::Bearer("token".into()))
        );
        assert!(matches!(
            http.auth_for("https", "api.example.org", 443),
            Some(http::HttpAuth::Header(_))
        ));
        assert!(matches!(
            http.auth_for("https", "other.org", 8443),
            Some(http::HttpAuth::Basic { .. })
        ));
        assert_eq!(http.auth_for("https", "another.org", 8443), None);
        assert_eq!(http.auth_for("http", "zenodo.org", 80), None);
        Ok(())
    }

    #[test]
    fn a_binding_to_an_undeclared_secret_or_a_reserved_header_is_refused() {
        let base = "listener: { type: dir, path: spool }\nsecrets:\n  token: { env: T }\nplugins:\n  grants:\n    p:\n      http:\n        allow: [\"https://a.org\"]\n        auth:\n";
        for (binding, expected) in [
            (
                "          \"https://a.org\": { bearer: nope }\n",
                "secret `nope` is not declared under `secrets` (declared: token)",
            ),
            (
                "          \"https://a.org\": { header: { Host: token } }\n",
                "`host` cannot carry a secret",
            ),
            (
                "          \"a.org\": { bearer: token }\n",
                "scheme is missing",
            ),
        ] {
            let err = parse(&format!("{base}{binding}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains("plugins.grants.p.http.auth"), "{err}");
        }
        let err =
            parse("listener: { type: dir, path: spool }\nsecrets:\n  s: { env: A, file: b }\n")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(
            err.contains("secrets.s") && err.contains("exactly one"),
            "{err}"
        );
    }

    #[test]
    fn config_values_from_env_references_are_noted() -> anyhow::Result<()> {
        let c = parse(
            "listener: { type: dir, path: spool }\nplugins:\n  grants:\n    p:\n      config: { url: \"https://x.org\", token: \"${HOME}\", nested: [\"a${HOME}\"] }\n",
        )?;
        assert_eq!(
            c.env_in_grant_config,
            vec![
                "plugins.grants.p.config.nested".to_owned(),
                "plugins.grants.p.config.token".to_owned()
            ]
        );
        Ok(())
    }

    #[test]
    fn missing_env_var_is_named_with_its_line() {
        let err = parse("listener: { type: dir, path: \"${SANDPIPE_SURELY_UNSET_VAR}\" }\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("SANDPIPE_SURELY_UNSET_VAR"), "{err}");
        assert!(err.contains("test.yaml:1"), "{err}");
    }

    #[test]
    fn reuse_needs_instances_messages_and_slots() {
        let err = |yaml: &str| {
            parse(&format!("listener: {{ type: dir, path: s }}\n{yaml}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let zero = err("plugins:\n  grants:\n    a: { reuse: { instances: 0 } }\n");
        assert!(zero.contains("plugins.grants.a.reuse"), "{zero}");
        let full = err(
            "sandbox: { max_instances: 4 }\nplugins:\n  grants:\n    a: { reuse: { instances: 2 } }\n    b: { reuse: { instances: 2 } }\n",
        );
        assert!(full.contains("sandbox.max_instances"), "{full}");
        assert!(full.contains("4 warm instances"), "{full}");
        assert_eq!(
            err("plugins:\n  grants:\n    a: { reuse: {} }\n"),
            "",
            "the defaults are valid"
        );
    }

    #[test]
    fn services_are_checked_and_name_the_key() {
        let refused = |yaml: &str| {
            parse(&format!("listener: {{ type: dir, path: s }}\n{yaml}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let secrets = "secrets:\n  id: { env: PATH }\n  secret: { env: PATH }\n";
        let register = |name: &str, implements: &str, secret: &str| {
            format!(
                "{secrets}token_storage: {{ url: \"http://ts:3000\" }}\nservices:\n  z:\n    register: {{ servicename: {name}, authorize_url: a, refresh_url: r, client_id: id, client_secret: {secret}, implements: [{implements}] }}\n"
            )
        };
        assert_eq!(refused(&register("port-z", "metadata", "secret")), "");
        let err = refused(&register("zenodo", "metadata", "secret"));
        assert!(
            err.contains("services.z.register.servicename") && err.contains("port-"),
            "{err}"
        );
        let err = refused(&register("port-z", "photos", "secret"));
        assert!(err.contains("services.z.register.implements"), "{err}");
        let err = refused(&register("port-z", "metadata", "nope"));
        assert!(
            err.contains("services.z.register.client_secret") && err.contains("`nope`"),
            "{err}"
        );
        let err = refused(&format!(
            "{secrets}services:\n  z:\n    register: {{ servicename: port-z, authorize_url: a, refresh_url: r, client_id: id, client_secret: secret, implements: [metadata] }}\n"
        ));
        assert!(err.contains("needs `token_storage"), "{err}");
        let err = refused("services:\n  z: { instances: 0 }\n");
        assert!(err.contains("services.z.instances"), "{err}");
        let err =
            refused("services:\n  z: { vantiq: { url: \"ftp://x\", token: t, sources: [a] } }\n");
        assert!(err.contains("services.z.vantiq.token"), "{err}");
        let err = refused(
            "secrets:\n  t: { env: PATH }\nservices:\n  z: { vantiq: { url: \"ftp://x\", token: t, sources: [a] } }\n",
        );
        assert!(err.contains("services.z.vantiq.url"), "{err}");
        let err = refused(
            "server: { listen: \"127.0.0.1:9090\" }\nservices:\n  z: { http: { listen: \"127.0.0.1:9090\" } }\n",
        );
        assert!(
            err.contains("services.z.http.listen") && err.contains("server"),
            "{err}"
        );
    }

    #[test]
    fn sources_are_checked_and_never_share_a_sink_table() {
        let refused = |yaml: &str| {
            parse(&format!("listener: {{ type: dir, path: s }}\n{yaml}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // `shop-a` and `shop_a` make the same table.
        let err = refused("sources:\n  shop-a: {}\n  shop_a: {}\n");
        assert!(
            err.contains("sources `shop-a` and `shop_a` sink into the same table"),
            "{err}"
        );
        let err = refused("sources:\n  a: {}\n  b: { sink: { type: sqlite, table: a } }\n");
        assert!(err.contains("sink into the same table"), "{err}");
        // The same server and table, spelled otherwise.
        let err = refused(
            "sources:\n  a: { sink: { type: postgres, url: \"postgres://a@h/db\", table: t } }\n  b: { sink: { type: postgres, url: \"postgres://b@h:5432/db?sslmode=require\", table: t } }\n",
        );
        assert!(err.contains("sink into the same table"), "{err}");
        let err = refused(
            "sources:\n  a: { sink: { type: sqlite, path: ./s.sqlite, table: t } }\n  b: { sink: { type: sqlite, path: s.sqlite, table: t } }\n",
        );
        assert!(err.contains("sink into the same table"), "{err}");
        let err = refused("sources:\n  sandpipe_sync_jobs: {}\n");
        assert!(
            err.contains("names starting with `sandpipe_` are the engine's"),
            "{err}"
        );
        assert!(
            refused("sources:\n  a: {}\n  b: { sink: { type: sqlite, table: b2 } }\n").is_empty()
        );
        let err = refused("sources:\n  a: { outputs: [nowhere] }\n");
        assert!(
            err.contains("sources.a.outputs") && err.contains("nowhere"),
            "{err}"
        );
        let err = refused("sources:\n  a: { errors: { max_rate: 1.5 } }\n");
        assert!(err.contains("sources.a.errors"), "{err}");
        let err = refused("sources:\n  a: { sink: { type: sqlite, table: \"Bad-Name\" } }\n");
        assert!(err.contains("sources.a.sink"), "{err}");
        let err =
            refused("databases:\n  d: { type: mysql, url: \"mysql://u@h/db\", password: nope }\n");
        assert!(
            err.contains("databases.d.password") && err.contains("nope"),
            "{err}"
        );
        let err = refused("plugins:\n  grants:\n    p: { sql: { database: missing } }\n");
        assert!(err.contains("plugins.grants.p.sql.database"), "{err}");
    }

    #[test]
    fn grant_of_undeclared_output_is_refused() {
        let err = parse(
            "listener: { type: dir, path: s }\nplugins:\n  grants:\n    a: { emit: [nowhere] }\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("plugins.grants.a.emit"), "{err}");
        assert!(err.contains("nowhere"), "{err}");
    }

    #[test]
    fn mime_path_is_a_dotted_path_into_the_metadata() -> anyhow::Result<()> {
        let c =
            parse("listener: { type: dir, path: s }\nmessage_fields: { mime_path: mime.type }\n")?;
        assert_eq!(c.message_fields.mime_path.as_deref(), Some("mime.type"));
        assert!(
            c.message_fields.kind.required,
            "the type field keeps its default"
        );
        assert_eq!(
            parse("listener: { type: dir, path: s }\n")?
                .message_fields
                .mime_path,
            None
        );
        for bad in ["\"\"", "mime..type", ".mime", "mime."] {
            let err = parse(&format!(
                "listener: {{ type: dir, path: s }}\nmessage_fields: {{ mime_path: {bad} }}\n"
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(err.contains("message_fields.mime_path"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn grants_accept_true_or_maps_and_limits_override_defaults() -> anyhow::Result<()> {
        let c = parse(
            "listener: { type: dir, path: s }\noutputs: { o: { type: dir, path: out } }\nplugins:\n  defaults: { timeout: 2s, fuel: 1000 }\n  grants:\n    a: { sql: true, blob: { read: [x/] }, meta: false, emit: [o], limits: { memory: 8MiB, fuel: 0 } }\n",
        )?;
        let g = &c.plugins.grants["a"];
        assert!(g.sql.is_some());
        assert_eq!(
            g.blob.as_ref().map(|b| b.read.clone()),
            Some(vec!["x/".into()])
        );
        assert!(g.meta.is_none());
        let l = c.limits_for("a");
        assert_eq!(l.memory, ByteSize::mib(8));
        assert_eq!(l.timeout, Duration::from_secs(2));
        assert_eq!(l.fuel, None);
        assert_eq!(c.limits_for("other").fuel, Some(1000));
        Ok(())
    }

    #[test]
    fn rabbitmq_listener_parses_with_defaults() -> anyhow::Result<()> {
        let c = parse(
            "listener:\n  type: rabbitmq\n  url: amqp://guest:guest@127.0.0.1:5672/%2f\n  exchange: { name: x, type: fanout }\n  queue: q\n  queue_type: quorum\n",
        )?;
        let ListenerConfig::Rabbitmq(r) = &c.listener else {
            anyhow::bail!("not rabbitmq")
        };
        assert_eq!(
            (r.exchange.kind.as_str(), r.queue.as_str(), r.prefetch),
            ("fanout", "q", 64)
        );
        assert_eq!(r.queue_type, QueueType::Quorum);
        let err = parse(
            "listener: { type: rabbitmq, url: u, exchange: { name: x }, queue: q, prefech: 3 }\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("prefech"), "{err}");
        Ok(())
    }

    #[test]
    fn tls_ca_file_resolves_against_the_config_and_must_hold_a_certificate() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sandpipe-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs"))?;
        let file = dir.join("sandpipe.yaml");
        let load = |text: &str| {
            Config::parse(
                &file,
                &format!(
                    "listener: {{ type: dir, path: s }}\ntls: {{ ca_file: certs/ca.pem }}\n{text}"
                ),
            )
        };
        let _ = std::fs::remove_file(dir.join("certs/ca.pem"));
        let missing = load("").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            missing.contains("sandpipe.yaml: tls.ca_file: cannot read"),
            "{missing}"
        );
        assert!(missing.contains("certs/ca.pem"), "{missing}");
        std::fs::write(dir.join("certs/ca.pem"), "not a certificate\n")?;
        let empty = load("").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(empty.contains("tls.ca_file"), "{empty}");
        assert!(empty.contains("holds no certificate"), "{empty}");
        // Two certificates (their content is checked by the engine, which
        // makes them trust anchors).
        std::fs::write(
            dir.join("certs/ca.pem"),
            "-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nAwQF\n-----END CERTIFICATE-----\n",
        )?;
        let config = load("")?;
        assert_eq!(config.tls.ca_file, Some(dir.join("certs/ca.pem")));
        assert_eq!(config.tls.ca_certificates().map(|c| c.len()), Ok(2));
        assert!(
            parse("listener: { type: dir, path: s }\n")?
                .tls
                .ca_certificates()
                .is_ok_and(|c| c.is_empty())
        );
        let typo = parse("listener: { type: dir, path: s }\ntls: { ca_fle: x }\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(typo.contains("ca_fle"), "{typo}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = BackoffConfig::default();
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(3), Duration::from_secs(4));
        assert_eq!(b.delay(30), Duration::from_secs(60));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the text, loading returns (never panics), and an error
        /// always names the file.
        #[test]
        fn any_text_loads_or_fails_naming_the_file(text in "\\PC{0,300}") {
            if let Err(e) = Config::parse(Path::new("/etc/x/fuzz.yaml"), &text) {
                prop_assert!(e.to_string().contains("/etc/x/fuzz.yaml"), "{}", e);
            }
        }

        /// YAML-shaped text built from real keys and random values: the same.
        #[test]
        fn yaml_shaped_text_loads_or_fails_naming_the_file(
            keys in proptest::collection::vec(
                prop::sample::select(vec![
                    "listener", "type", "path", "plugins", "grants", "limits", "memory",
                    "timeout", "fuel", "sql", "emit", "blob", "retry", "max_attempts",
                    "outputs", "database", "url", "queue", "exchange", "name", "server",
                ]),
                1..8,
            ),
            values in proptest::collection::vec("[a-z0-9:/.${}\\[\\] -]{0,12}", 1..8),
        ) {
            let mut text = String::from("listener: { type: dir, path: s }\n");
            for (depth, (k, v)) in keys.iter().zip(values.iter().cycle()).enumerate() {
                text.push_str(&"  ".repeat(depth % 3));
                text.push_str(&format!("{k}: {v}\n"));
            }
            if let Err(e) = Config::parse(Path::new("/etc/x/fuzz.yaml"), &text) {
                prop_assert!(e.to_string().contains("/etc/x/fuzz.yaml"), "{}", e);
            }
        }
    }
}
