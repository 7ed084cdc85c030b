//! Listener `rabbitmq` (lapin): an exchange, a queue bound to it, manual
//! acks with a prefetch window, a delay queue for retries and a dead-letter
//! exchange.
//!
//! ```text
//! exchange ──routing key──▶ QUEUE ──▶ engine ── ack (done)
//!                             ▲          ├──── publish to QUEUE.retry (per-message TTL = delay),
//!                             │          │     header x-sandpipe-attempt = n + 1, then ack
//!   QUEUE.retry ──TTL expiry──┘          └──── publish to DLX with reason + attempts, then ack
//!   (x-dead-letter → QUEUE)
//! ```
//!
//! Every copy is published with publisher confirms before the original is
//! acked, so a crash in between duplicates (at-least-once) but never loses.
//! A delivery is only ever acked on the channel it came from: when the
//! connection dies, its unacked deliveries go back to the queue by
//! themselves, and the consumer reconnects with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, mpsc};

use super::{Acker, Delivery, Listener, Settlement};
use crate::config::{QueueType, RabbitmqListenerConfig};
use crate::server::Readiness;
use crate::tls::Tls;

/// Header carrying the delivery attempt of a retried message.
pub const ATTEMPT_HEADER: &str = "x-sandpipe-attempt";
/// Header carrying the reason of a dead-lettered or retried message.
pub const REASON_HEADER: &str = "x-sandpipe-reason";

/// Turn AMQP headers into text pairs (non-text values as their debug form).
pub fn headers_of(properties: &BasicProperties) -> Vec<(String, String)> {
    let Some(table) = properties.headers() else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .map(|(k, v)| {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::LongLongInt(i) => i.to_string(),
                AMQPValue::LongInt(i) => i.to_string(),
                AMQPValue::ShortInt(i) => i.to_string(),
                AMQPValue::LongUInt(i) => i.to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            (k.as_str().to_owned(), value)
        })
        .collect()
}

/// Text pairs as an AMQP header table.
pub fn table_of(headers: &[(String, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        );
    }
    table
}

/// Publish persistently on a confirm-mode channel and wait for the
/// broker's confirm: a nack or no confirm within `timeout` is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> anyhow::Result<()> {
    // The whole exchange within `timeout`: a broker that holds the publish
    // itself (flow control, a blocked connection) fails it as surely as one
    // that never confirms.
    let confirmation = tokio::time::timeout(timeout, async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await
    })
    .await
    .map_err(|_| anyhow::anyhow!("no publisher confirm within {timeout:?}"))??;
    if confirmation.is_nack() {
        anyhow::bail!("the broker refused (nacked) the message");
    }
    Ok(())
}

/// The lapin exchange kind of a config `type`.
pub fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
}

/// Connect, with a connection name for the broker's UI (`sandpipe:…`).
/// An `amqps://` URL connects with TLS, checking the broker's certificate
/// (chain and host name) against what `tls` trusts.
pub async fn connect_named(url: &str, name: &str, tls: &Tls) -> anyhow::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(format!("sandpipe:{name}").into());
    let uri: AMQPUri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("not an AMQP URL ({}): {e}", redact(url)))?;
    let connected = match uri.scheme {
        AMQPScheme::AMQP => Connection::connect_uri(uri, properties).await,
        AMQPScheme::AMQPS => {
            let connector = RustlsConnector::from(tls.verified()?);
            Connection::connector(
                uri,
                lapin::runtime::default_runtime()?,
                async move |uri, runtime| {
                    let host = uri.authority.host.clone();
                    let address = runtime.to_socket_addrs((host.clone(), uri.authority.port));
                    AsyncTcpStream::connect(&runtime, address)
                        .await?
                        .into_rustls(&connector, &host)
                        .await
                        .map_err(lapin::Error::from)
                },
                properties,
            )
            .await
        }
    };
    connected.map_err(|e| tls.error("RabbitMQ", &redact(url), "cannot connect to", e))
}

/// Connect under the name `sandpipe:client`.
pub async fn connect(url: &str, tls: &Tls) -> anyhow::Result<Connection> {
    connect_named(url, "client", tls).await
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

struct Shared {
    config: RabbitmqListenerConfig,
    inflight: AtomicUsize,
    /// The channel of the current connection, for publishing retries and
    /// dead letters (confirm mode).
    publisher: Mutex<Option<Channel>>,
    connected: AtomicBool,
    ready: Readiness,
    stop: tokio::sync::watch::Sender<bool>,
    tls: Tls,
}

impl Shared {
    fn retry_queue(&self) -> String {
        format!("{}.retry", self.config.queue)
    }

    fn dead_exchange(&self) -> String {
        self.config
            .dead_letter_exchange
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.config.queue))
    }

    /// Declare the whole topology on `channel`.
    async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        let c = &self.config;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                c.exchange.name.as_str().into(),
                exchange_kind(&c.exchange.kind),
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare exchange `{}`", c.exchange.name))?;
        let mut args = FieldTable::default();
        if c.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(c.queue.as_str().into(), durable_queue, args.clone())
            .await
            .with_context(|| format!("cannot declare queue `{}`", c.queue))?;
        channel
            .queue_bind(
                c.queue.as_str().into(),
                c.exchange.name.as_str().into(),
                c.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot bind `{}` to `{}`", c.queue, c.exchange.name))?;
        // The delay queue: expired messages go back to the main queue.
        let mut retry_args = args.clone();
        retry_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        retry_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(c.queue.as_str().into()),
        );
        channel
            .queue_declare(
                self.retry_queue().as_str().into(),
                durable_queue,
                retry_args,
            )
            .await
            .with_context(|| format!("cannot declare retry queue `{}`", self.retry_queue()))?;
        // The dead-letter exchange and a queue that keeps what it gets.
        let dead = self.dead_exchange();
        channel
            .exchange_declare(
                dead.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare dead-letter exchange `{dead}`"))?;
        channel
            .queue_declare(dead.as_str().into(), durable_queue, args)
            .await
            .with_context(|| format!("cannot declare dead-letter queue `{dead}`"))?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dead.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Publish with confirms on the current connection's publishing channel.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let channel = self
            .publisher
            .lock()
            .await
            .clone()
            .ok_or_else(|| anyhow::anyhow!("not connected to RabbitMQ"))?;
        publish_confirmed(
            &channel,
            exchange,
            routing_key,
            body,
            properties,
            self.config.confirm_timeout,
        )
        .await
    }
}

/// The RabbitMQ listener.
pub struct RabbitmqListener {
    shared: Arc<Shared>,
    deliveries: Mutex<mpsc::Receiver<lapin::message::Delivery>>,
    once: bool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for RabbitmqListener {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.try_lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

impl RabbitmqListener {
    /// Start consuming (the connection is made, and remade, in the background).
    pub fn new(config: &RabbitmqListenerConfig, once: bool, ready: Readiness, tls: &Tls) -> Self {
        let shared = Arc::new(Shared {
            config: config.clone(),
            inflight: AtomicUsize::new(0),
            publisher: Mutex::new(None),
            connected: AtomicBool::new(false),
            ready,
            stop: tokio::sync::watch::channel(false).0,
            tls: tls.clone(),
        });
        shared.ready.not_ready("listener", "connecting to RabbitMQ");
        let (tx, rx) = mpsc::channel(usize::from(config.prefetch.max(1)));
        let task = tokio::spawn(consume_forever(shared.clone(), tx));
        Self {
            shared,
            deliveries: Mutex::new(rx),
            once,
            task: Mutex::new(Some(task)),
        }
    }

    fn wrap(&self, delivery: lapin::message::Delivery) -> Delivery {
        let headers = headers_of(&delivery.properties);
        let attempt = headers
            .iter()
            .find(|(k, _)| k == ATTEMPT_HEADER)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        // A retry or requeue is a new publication carrying the attempt
        // header; anything the broker delivered before is `redelivered`.
        let first = !delivery.redelivered && !headers.iter().any(|(k, _)| k == ATTEMPT_HEADER);
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        Delivery {
            name: format!("{}#{}", self.shared.config.queue, delivery.delivery_tag),
            body: Bytes::from(delivery.data.clone()),
            headers,
            attempt,
            first,
            acker: Box::new(RabbitAcker {
                shared: self.shared.clone(),
                delivery,
                attempt,
            }),
        }
    }

    /// Whether the queue and its retry queue are empty (for `--once`).
    async fn drained(&self) -> bool {
        let channel = self.shared.publisher.lock().await.clone();
        let Some(channel) = channel else { return false };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        for queue in [self.shared.config.queue.clone(), self.shared.retry_queue()] {
            match channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) if q.message_count() == 0 => {}
                _ => return false,
            }
        }
        true
    }
}

/// Keep a consumer running: connect, declare, consume, forward; on any
/// failure back off and start again.
async fn consume_forever(shared: Arc<Shared>, tx: mpsc::Sender<lapin::message::Delivery>) {
    let backoff = &shared.config.reconnect;
    let mut delay = backoff.initial;
    let mut first = true;
    let mut stop = shared.stop.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let result = consume_once(&shared, &tx).await;
        if *stop.borrow() {
            return;
        }
        shared.connected.store(false, Ordering::SeqCst);
        *shared.publisher.lock().await = None;
        if tx.is_closed() {
            return;
        }
        let reason = match result {
            Ok(()) => "the broker ended the consumer".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        shared
            .ready
            .not_ready("listener", format!("RabbitMQ: {reason}"));
        if !first {
            metrics::counter!(crate::metrics::RECONNECTS, "backend" => "rabbitmq").increment(1);
        }
        first = false;
        if started.elapsed() > Duration::from_secs(30) {
            delay = backoff.initial;
        }
        tracing::warn!("RabbitMQ consumer stopped ({reason}); reconnecting in {delay:?}");
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(backoff.max);
    }
}

async fn consume_once(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<lapin::message::Delivery>,
) -> anyhow::Result<()> {
    let connection = connect_named(
        &shared.config.url,
        &format!("listener:{}", shared.config.queue),
        &shared.tls,
    )
    .await?;
    let publisher = connection.create_channel().await?;
    shared.declare(&publisher).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(shared.config.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            shared.config.queue.as_str().into(),
            format!("sandpipe-{}", uuid::Uuid::new_v4()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    *shared.publisher.lock().await = Some(publisher);
    shared.connected.store(true, Ordering::SeqCst);
    shared.ready.ready("listener");
    tracing::info!(queue = %shared.config.queue, "consuming from RabbitMQ");
    let mut stop = shared.stop.subscribe();
    loop {
        let delivery = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            delivery = consumer.next() => match delivery {
                Some(d) => Some(d?),
                None => return Ok(()),
            },
        };
        let sent = match delivery {
            Some(d) => tokio::select! {
                _ = stop.wait_for(|s| *s) => false,
                sent = tx.send(d) => sent.is_ok(),
            },
            None => false,
        };
        if !sent {
            // Shutting down: close politely; deliveries the engine never
            // took (prefetched, unacked) return to the queue.
            let _ = channel.close(200, "shutting down".into()).await;
            let _ = connection.close(200, "shutting down".into()).await;
            return Ok(());
        }
    }
}

#[async_trait]
impl Listener for RabbitmqListener {
    async fn close(&self) {
        let _ = self.shared.stop.send(true);
        if let Some(task) = self.task.lock().await.take()
            && tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
        {
            tracing::warn!("the RabbitMQ consumer did not close within 10s");
        }
    }

    async fn recv(&self) -> anyhow::Result<Option<Delivery>> {
        let mut deliveries = self.deliveries.lock().await;
        if !self.once {
            return Ok(deliveries.recv().await.map(|d| self.wrap(d)));
        }
        // --once: stop when nothing arrives for a while, nothing is in
        // flight and both queues are empty.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), deliveries.recv()).await {
                Ok(Some(d)) => return Ok(Some(self.wrap(d))),
                Ok(None) => return Ok(None),
                Err(_) => {
                    if self.shared.connected.load(Ordering::SeqCst)
                        && self.shared.inflight.load(Ordering::SeqCst) == 0
                        && self.drained().await
                    {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Publish one message to the configured exchange (`sandpipe send`).
pub async fn send(
    config: &RabbitmqListenerConfig,
    body: &[u8],
    tls: &Tls,
) -> anyhow::Result<String> {
    let connection = connect(&config.url, tls).await?;
    let channel = connection.create_channel().await?;
    let shared = Shared {
        config: config.clone(),
        inflight: AtomicUsize::new(0),
        publisher: Mutex::new(Some(channel.clone())),
        connected: AtomicBool::new(true),
        ready: Readiness::default(),
        stop: tokio::sync::watch::channel(false).0,
        tls: tls.clone(),
    };
    shared.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    shared
        .publish(
            &config.exchange.name,
            &config.routing_key,
            body,
            BasicProperties::default(),
        )
        .await?;
    let _ = connection.close(200, "sent".into()).await;
    Ok(format!(
        "exchange `{}` (routing key `{}`)",
        config.exchange.name, config.routing_key
    ))
}

struct RabbitAcker {
    shared: Arc<Shared>,
    delivery: lapin::message::Delivery,
    attempt: u32,
}

impl RabbitAcker {
    fn properties(&self, extra: &[(&str, String)]) -> BasicProperties {
        let mut headers: Vec<(String, String)> = headers_of(&self.delivery.properties)
            .into_iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let mut properties = self.delivery.properties.clone();
        properties = properties.with_headers(table_of(&headers));
        properties
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()> {
        let published = async {
            match &settlement {
                Settlement::Ack => {}
                Settlement::Retry { delay, reason } | Settlement::Requeue { delay, reason } => {
                    let next = match settlement {
                        Settlement::Retry { .. } => self.attempt + 1,
                        _ => self.attempt,
                    };
                    let properties = self
                        .properties(&[
                            (ATTEMPT_HEADER, next.to_string()),
                            (REASON_HEADER, reason.clone()),
                        ])
                        .with_expiration(delay.as_millis().max(1).to_string().as_str().into());
                    self.shared
                        .publish(
                            "",
                            &self.shared.retry_queue(),
                            &self.delivery.data,
                            properties,
                        )
                        .await
                        .context("cannot schedule the retry")?;
                }
                Settlement::DeadLetter { reason, report } => {
                    let mut report_text = report.to_string();
                    report_text.truncate(32 * 1024);
                    let properties = self.properties(&[
                        (REASON_HEADER, reason.clone()),
                        ("x-sandpipe-attempts", self.attempt.to_string()),
                        ("x-sandpipe-report", report_text),
                    ]);
                    self.shared
                        .publish(
                            &self.shared.dead_exchange(),
                            "",
                            &self.delivery.data,
                            properties,
                        )
                        .await
                        .context("cannot dead-letter")?;
                }
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        // Ack (or, when the copy could not be published, nack so the broker
        // redelivers) on the channel the delivery came from; if that channel
        // is gone, the broker has already requeued the delivery.
        let result = match published {
            Ok(()) => self
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .context("cannot ack (the channel closed; the broker will redeliver)"),
            Err(e) => {
                let _ = self
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                Err(e)
            }
        };
        self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn headers_round_trip() {
        let h = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "x y".to_owned()),
        ];
        let props = BasicProperties::default().with_headers(table_of(&h));
        assert_eq!(headers_of(&props), h);
    }
}
