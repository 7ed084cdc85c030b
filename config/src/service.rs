//! `services:` — service connectors and the transports the engine serves
//! them on (docs/services.md). A service's component is a `service`-world
//! `.wasm` in `plugins.dir`; what it may reach (`sql`, `http`, `emit`,
//! `config`, limits) is its grant under `plugins.grants`, as for any
//! component. This section says how the engine runs and serves it.

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// One service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The component, by name (`plugins.dir/NAME.wasm`, a `service`-world
    /// component). Default: the service's own name.
    #[serde(default)]
    pub component: Option<String>,
    /// Warm instances serving calls side by side (each holds a slot of
    /// `sandbox.max_instances`). Default 1: calls take turns.
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// The configuration `on-connect` gets for the service's own source
    /// (the one HTTP queries and events arrive on), as JSON. Default `{}`.
    #[serde(default = "default_connect")]
    pub connect: serde_json::Value,
    /// The largest body of one reply (`partial`, `complete`); a larger one
    /// fails `limit-exceeded`. Default 4MiB.
    #[serde(default = "default_max_reply_bytes")]
    pub max_reply_bytes: ByteSize,
    /// The longest a call waits for a free instance before it is answered
    /// with an error. Default 30s.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The service's declared HTTP routes, served on a listener of its own;
    /// none when absent (the routes are then not served).
    #[serde(default)]
    pub http: Option<ServiceHttp>,
    /// A connection to a Vantiq server for the service's Vantiq sources;
    /// none when absent.
    #[serde(default)]
    pub vantiq: Option<VantiqConfig>,
    /// Queries and events arriving on a RabbitMQ queue (request/reply with
    /// `reply_to` and `correlation_id`); none when absent.
    #[serde(default)]
    pub rabbitmq: Option<ServiceRabbitmq>,
    /// Queries and events arriving on a Redis stream (request/reply with
    /// `reply_to` and `correlation_id` fields); none when absent.
    #[serde(default)]
    pub redis: Option<ServiceRedis>,
    /// Register the service with the token storage (`token_storage:`) at
    /// start, as a Sciebo RDS port does; none when absent.
    #[serde(default)]
    pub register: Option<Registration>,
    /// A TCP port open while the service is healthy (as the Vantiq
    /// connector SDK's `tcpProbePort`): connected, and every Vantiq source
    /// connected. None when absent.
    #[serde(default)]
    pub health: Option<HealthProbe>,
}

/// `services.NAME.vantiq`: the Vantiq server and the sources served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VantiqConfig {
    /// The server, `https://dev.vantiq.com` (or `wss://...`): the engine
    /// connects to its WebSocket at `/api/v1/wsock/websocket`.
    pub url: String,
    /// The secret (under `secrets:`) holding the access token.
    pub token: String,
    /// The Vantiq sources this connector serves; one WebSocket each.
    pub sources: Vec<String>,
    /// Reconnecting after a failure: the first wait, doubling up to
    /// `reconnect_max`. Default 500ms.
    #[serde(default = "default_reconnect", with = "humantime_serde")]
    pub reconnect: Duration,
    /// The longest wait between reconnects. Default 30s.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// WebSocket pings at this interval (Vantiq's `sendPings`: 20s);
    /// none by default.
    #[serde(default, with = "humantime_serde")]
    pub ping: Option<Duration>,
}

/// `services.NAME.rabbitmq`: request/reply over a RabbitMQ queue. A
/// message with `reply_to` is a query (each reply goes to `reply_to` with
/// the request's `correlation_id`); one without is an event. Replicas of
/// the engine consume the queue as competing consumers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRabbitmq {
    /// The broker, `amqp://` or `amqps://` (`${ENV}` for the password).
    pub url: String,
    /// The queue the requests arrive on (declared durable if missing).
    pub queue: String,
    /// Requests handled at once. Default 16.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// The longest a reply may wait for the broker's confirm. Default 10s.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
}

fn default_prefetch() -> u16 {
    16
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `services.NAME.redis`: request/reply over a Redis stream and consumer
/// group. An entry with a `reply_to` field is a query (each reply is added
/// to the stream `reply_to` with the entry's `correlation_id`); one without
/// is an event. Replicas are consumers of the same group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRedis {
    /// The server, `redis://` or `rediss://`.
    pub url: String,
    /// The stream the requests arrive on (made, with the group, if
    /// missing).
    pub stream: String,
    /// The consumer group. Default `sandpipe`.
    #[serde(default = "default_group")]
    pub group: String,
    /// Entries read at once (and handled at once). Default 16.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// An entry left pending this long by a consumer that went away is
    /// taken over. Default 60s.
    #[serde(default = "default_claim_idle", with = "humantime_serde")]
    pub claim_idle: Duration,
}

fn default_group() -> String {
    "sandpipe".into()
}
fn default_batch() -> u32 {
    16
}
fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}

/// `token_storage:` — Sciebo RDS's central token storage, which services
/// register with (`services.NAME.register`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenStorageConfig {
    /// Its base URL, e.g. `http://central-service-token-storage:3000`.
    pub url: String,
}

/// `services.NAME.register`: the service as the token storage's `POST
/// /service` takes it (an OAuth service). Credentials are names of
/// secrets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Its name there; RDS requires the `port-` prefix.
    pub servicename: String,
    /// The OAuth authorize URL users are sent to.
    pub authorize_url: String,
    /// The OAuth token URL (code exchange and refresh).
    pub refresh_url: String,
    /// The secret holding the OAuth client id.
    pub client_id: String,
    /// The secret holding the OAuth client secret.
    pub client_secret: String,
    /// What the service implements: `fileStorage`, `metadata`.
    pub implements: Vec<String>,
    /// `active` (the service pushes files; RDS 0) or `passive` (1).
    /// Default active.
    #[serde(default)]
    pub file_transfer_mode: TransferMode,
    /// `none` or `zip` (files as one archive). Default none.
    #[serde(default)]
    pub file_transfer_archive: TransferArchive,
    /// The name users see.
    #[serde(default)]
    pub display_name: Option<String>,
    /// A page about the service.
    #[serde(default)]
    pub info_url: Option<String>,
    /// A help page.
    #[serde(default)]
    pub help_url: Option<String>,
    /// An image file, sent as a `data:` URI. Relative to the config file.
    #[serde(default)]
    pub icon: Option<std::path::PathBuf>,
    /// A free-form description object.
    #[serde(default)]
    pub description: Option<serde_json::Value>,
}

/// How files reach a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// The service pushes them (RDS `fileTransferMode` 0).
    #[default]
    Active,
    /// The service pulls them (1).
    Passive,
}

/// Whether files travel as one archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferArchive {
    /// One by one (RDS `fileTransferArchive` 0).
    #[default]
    None,
    /// As one zip file (1).
    Zip,
}

/// `services.NAME.health`: the TCP health probe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    /// The address to listen on while healthy, e.g. `0.0.0.0:8000`.
    pub listen: SocketAddr,
}

fn default_reconnect() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

/// `services.NAME.http`: the listener of the service's declared routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceHttp {
    /// The address to listen on, e.g. `127.0.0.1:8081` (port 0: any).
    pub listen: SocketAddr,
    /// The largest request body; a larger one is answered 413 without
    /// reaching the guest. Default 10MiB.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// The most parts of one `multipart/form-data` body. Default 100.
    #[serde(default = "default_max_parts")]
    pub max_parts: u32,
    /// The longest a client may take to send its request body; a slower
    /// one is answered 408. Default 30s.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// The secret (under `secrets:`) whose value requests must carry as
    /// `Authorization: Bearer VALUE`; unset: the routes are open to
    /// whoever reaches the listener (bind it to an internal address).
    #[serde(default)]
    pub token: Option<String>,
}

fn default_instances() -> u32 {
    1
}
fn default_connect() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
fn default_max_reply_bytes() -> ByteSize {
    ByteSize::mib(4)
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(10)
}
fn default_max_parts() -> u32 {
    100
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
