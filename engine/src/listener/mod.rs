//! Listeners: where deliveries come from, and how each is settled exactly
//! once (ack, retry later, or dead-letter). One file per type; `type` in
//! the YAML selects it.

mod dir;
pub mod rabbitmq;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::ListenerConfig;
pub use dir::DirListener;
pub use rabbitmq::RabbitmqListener;

use crate::server::Readiness;
use crate::tls::Tls;

/// How a delivery ends.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Done: remove it from the source.
    Ack,
    /// Deliver it again after `delay`, as attempt `attempt + 1`.
    Retry {
        /// How long to wait.
        delay: Duration,
        /// Why (for logs and headers).
        reason: String,
    },
    /// Deliver it again after `delay` as the same attempt: the failure was
    /// the engine's or a dependency's, not the message's.
    Requeue {
        /// How long to wait.
        delay: Duration,
        /// Why.
        reason: String,
    },
    /// Never deliver it again; keep it with its reason and report.
    DeadLetter {
        /// Why.
        reason: String,
        /// Every plugin's status, as JSON.
        report: serde_json::Value,
    },
}

/// Settles one delivery. Consumed by use, so it happens once.
#[async_trait]
pub trait Acker: Send {
    /// Settle the delivery.
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()>;
}

/// One delivery of one message.
pub struct Delivery {
    /// The raw message.
    pub body: Bytes,
    /// Transport headers.
    pub headers: Vec<(String, String)>,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// Certainly the message's first delivery to any engine: not a
    /// broker's redelivery, a retry, a requeue, nor an entry taken over
    /// from another consumer. The pipeline then skips the status-log
    /// look-up of the plugins already finished (`pipeline.dedupe`).
    pub first: bool,
    /// A name for logs (file name, delivery tag).
    pub name: String,
    /// Settles it.
    pub acker: Box<dyn Acker>,
}

/// A source of deliveries.
#[async_trait]
pub trait Listener: Send + Sync {
    /// The next delivery. `None` when the source is drained (only in
    /// `--once` mode). Must be cancel-safe: dropping the future loses
    /// nothing.
    async fn recv(&self) -> anyhow::Result<Option<Delivery>>;

    /// Stop consuming and close connections politely. Called once, after
    /// every delivery has been settled.
    async fn close(&self) {}
}

/// Build the configured listener. `once`: drain what is there, then end.
/// A message file is read no further than `max_message_bytes` plus one
/// (a broker hands over whole messages: its own limit bounds them). The
/// listener reports its connection state to `ready`; its TLS connections
/// trust what `tls` does.
pub async fn build(
    config: &ListenerConfig,
    once: bool,
    max_message_bytes: u64,
    ready: Readiness,
    tls: &Tls,
) -> anyhow::Result<Box<dyn Listener>> {
    match config {
        ListenerConfig::Dir {
            path,
            poll_interval,
        } => {
            let listener = DirListener::new(path, *poll_interval, once)?
                .with_max_message_bytes(max_message_bytes);
            ready.ready("listener");
            Ok(Box::new(listener))
        }
        ListenerConfig::Rabbitmq(c) => Ok(Box::new(RabbitmqListener::new(c, once, ready, tls))),
        ListenerConfig::Redis(c) => Ok(Box::new(
            redis::RedisListener::new(c, once, ready, tls).await?,
        )),
    }
}

/// Put a message into the configured source (`sandpipe send`), without
/// consuming from it. Returns where it went.
pub async fn send(
    config: &ListenerConfig,
    body: &[u8],
    name: &str,
    tls: &Tls,
) -> anyhow::Result<String> {
    match config {
        ListenerConfig::Dir { path, .. } => DirListener::send_to(path, body, name),
        ListenerConfig::Rabbitmq(c) => rabbitmq::send(c, body, tls).await,
        ListenerConfig::Redis(c) => redis::send(c, body, tls).await,
    }
}
