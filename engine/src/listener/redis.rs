//! Listener `redis`: a stream read through a consumer group.
//!
//! ```text
//! STREAM ──XREADGROUP──▶ engine ── XACK (done)
//!   ▲                       ├──── MULTI ZADD STREAM.retry (due, entry) + XACK EXEC
//!   │                       └──── MULTI XADD STREAM.dead (entry + reason) + XACK EXEC
//!   └── due retries are moved back by one Lua script (XADD + ZREM, atomic)
//! ```
//!
//! Entries left pending by a consumer that died (a crashed replica) are
//! taken over with XAUTOCLAIM once they have been idle for `claim_idle`.
//! An entry's message is its `message` field (the envelope JSON); an entry
//! without one is read as a JSON object of all its fields. The other
//! fields travel as headers; `x-sandpipe-attempt` carries the attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::Mutex;

use super::{Acker, Delivery, Listener, Settlement};
use crate::config::RedisListenerConfig;
use crate::listener::rabbitmq::{ATTEMPT_HEADER, REASON_HEADER, redact};
use crate::server::Readiness;
use crate::tls::Tls;

/// A connection manager (reconnects by itself) with timeouts. A
/// `rediss://` URL connects with TLS, checking the server's certificate
/// (chain and host name) against what `tls` trusts; rediss's `#insecure`
/// (no check) fails, the client being built without its
/// `tls-rustls-insecure` feature.
pub async fn connect(url: &str, timeout: Duration, tls: &Tls) -> anyhow::Result<ConnectionManager> {
    let invalid = |e: redis::RedisError| anyhow::anyhow!("invalid Redis URL {}: {e}", redact(url));
    let client = if url.starts_with("rediss://") {
        let roots = tls.roots_pem()?;
        // The Redis client builds its own rustls configuration (with the
        // process's default provider, which this makes ours).
        let _ = crate::tls::provider();
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.to_vec()),
            },
        )
        .map_err(invalid)?
    } else {
        redis::Client::open(url).map_err(invalid)?
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| tls.error("Redis", &redact(url), "cannot connect to", e))
}

/// Make consumer group `group` on `stream` (and the stream), unless it
/// exists.
pub async fn ensure_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> anyhow::Result<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => {
            Err(e).with_context(|| format!("cannot create consumer group `{group}` on `{stream}`"))
        }
        _ => Ok(()),
    }
}

/// Up to `count` entries of `group` left pending for `idle` or longer,
/// taken over by `consumer` (XAUTOCLAIM).
pub async fn take_over(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
    consumer: &str,
    idle: Duration,
    count: usize,
) -> anyhow::Result<Vec<StreamId>> {
    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .context("XAUTOCLAIM failed")?;
    Ok(claimed.claimed)
}

/// Up to `count` new entries for `consumer` of `group`, waiting up to
/// `block` for one (XREADGROUP).
pub async fn read_new(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> anyhow::Result<Vec<StreamId>> {
    let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .context("XREADGROUP failed")?;
    Ok(read
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .collect())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Moves due retries back into the stream, atomically.
const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  local entry = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', unpack(entry['fields']))
  redis.call('ZREM', KEYS[1], member)
end
return #due
";

fn text(value: &redis::Value) -> String {
    redis::from_redis_value_ref::<String>(value).unwrap_or_else(|_| format!("{value:?}"))
}

struct Shared {
    config: RedisListenerConfig,
    conn: ConnectionManager,
    consumer: String,
    inflight: AtomicUsize,
}

impl Shared {
    fn retry_key(&self) -> String {
        format!("{}.retry", self.config.stream)
    }

    fn dead_key(&self) -> String {
        self.config
            .dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.config.stream))
    }
}

/// The Redis streams listener.
pub struct RedisListener {
    shared: Arc<Shared>,
    once: bool,
    /// Fetched entries not yet handed out (last first), each with whether
    /// it was taken over from another consumer.
    buffer: Mutex<Vec<(StreamId, bool)>>,
    ready: Readiness,
}

impl RedisListener {
    /// Connect and create the consumer group (and stream) if missing.
    pub async fn new(
        config: &RedisListenerConfig,
        once: bool,
        ready: Readiness,
        tls: &Tls,
    ) -> anyhow::Result<Self> {
        let mut conn = connect(&config.url, config.timeout, tls).await?;
        ensure_group(&mut conn, &config.stream, &config.group).await?;
        let consumer = config.consumer.clone().unwrap_or_else(|| {
            format!(
                "sandpipe-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )
        });
        ready.ready("listener");
        Ok(Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                conn,
                consumer,
                inflight: AtomicUsize::new(0),
            }),
            once,
            buffer: Mutex::new(Vec::new()),
            ready,
        })
    }

    fn wrap(&self, entry: StreamId, claimed: bool) -> Delivery {
        let field = &self.shared.config.field;
        let mut headers = Vec::new();
        let mut body = None;
        for (k, v) in &entry.map {
            if k == field {
                body = Some(match v {
                    redis::Value::BulkString(b) => b.clone(),
                    other => text(other).into_bytes(),
                });
            } else {
                headers.push((k.clone(), text(v)));
            }
        }
        headers.sort();
        let body = body.unwrap_or_else(|| {
            let object: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            serde_json::to_vec(&object).unwrap_or_default()
        });
        let attempt = headers
            .iter()
            .find(|(k, _)| k == ATTEMPT_HEADER)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        // Retries and requeues come back as new entries with the attempt
        // header; an entry claimed from a dead consumer may have been
        // half-processed.
        let first = !claimed && !headers.iter().any(|(k, _)| k == ATTEMPT_HEADER);
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        Delivery {
            name: format!("{}#{}", self.shared.config.stream, entry.id),
            body: Bytes::from(body),
            headers,
            attempt,
            first,
            acker: Box::new(RedisAcker {
                shared: self.shared.clone(),
                entry,
                attempt,
            }),
        }
    }

    /// Fill the buffer: due retries first moved back, then entries of dead
    /// consumers (marked claimed), then new entries (blocking up to
    /// `block`).
    async fn fetch(&self) -> anyhow::Result<Vec<(StreamId, bool)>> {
        let c = &self.shared.config;
        let mut conn = self.shared.conn.clone();
        let _: i64 = redis::Script::new(PROMOTE)
            .key(self.shared.retry_key())
            .key(&c.stream)
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await
            .context("cannot move due retries back into the stream")?;
        let claimed = take_over(
            &mut conn,
            &c.stream,
            &c.group,
            &self.shared.consumer,
            c.claim_idle,
            c.batch as usize,
        )
        .await?;
        if !claimed.is_empty() {
            tracing::warn!(
                count = claimed.len(),
                "took over entries left pending by a dead consumer"
            );
            return Ok(claimed.into_iter().map(|e| (e, true)).collect());
        }
        let block = if self.once {
            Duration::from_millis(200)
        } else {
            c.block
        };
        let read = read_new(
            &mut conn,
            &c.stream,
            &c.group,
            &self.shared.consumer,
            c.batch as usize,
            block,
        )
        .await?;
        Ok(read.into_iter().map(|e| (e, false)).collect())
    }

    async fn drained(&self) -> anyhow::Result<bool> {
        if self.shared.inflight.load(Ordering::SeqCst) > 0 {
            return Ok(false);
        }
        let mut conn = self.shared.conn.clone();
        let retries: u64 = redis::cmd("ZCARD")
            .arg(self.shared.retry_key())
            .query_async(&mut conn)
            .await?;
        Ok(retries == 0)
    }
}

#[async_trait]
impl Listener for RedisListener {
    async fn recv(&self) -> anyhow::Result<Option<Delivery>> {
        let mut buffer = self.buffer.lock().await;
        let mut backoff = Duration::from_millis(200);
        loop {
            if let Some((entry, claimed)) = buffer.pop() {
                return Ok(Some(self.wrap(entry, claimed)));
            }
            match self.fetch().await {
                Ok(mut entries) => {
                    self.ready.ready("listener");
                    backoff = Duration::from_millis(200);
                    if entries.is_empty() {
                        if self.once && self.drained().await.unwrap_or(false) {
                            return Ok(None);
                        }
                        if self.once {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                    entries.reverse();
                    *buffer = entries;
                }
                Err(e) => {
                    // Redis is down: keep what we hold, wait, try again.
                    self.ready.not_ready("listener", format!("Redis: {e:#}"));
                    metrics::counter!(crate::metrics::RECONNECTS, "backend" => "redis")
                        .increment(1);
                    tracing::warn!("Redis listener: {e:#}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Publish a message to the stream (`sandpipe send`).
pub async fn send(config: &RedisListenerConfig, body: &[u8], tls: &Tls) -> anyhow::Result<String> {
    let mut conn = connect(&config.url, config.timeout, tls).await?;
    let id: String = redis::cmd("XADD")
        .arg(&config.stream)
        .arg("*")
        .arg(&config.field)
        .arg(body)
        .query_async(&mut conn)
        .await?;
    Ok(format!("stream `{}` as {id}", config.stream))
}

struct RedisAcker {
    shared: Arc<Shared>,
    entry: StreamId,
    attempt: u32,
}

impl RedisAcker {
    /// The entry's fields with `extra` set, flat.
    fn fields(&self, extra: &[(&str, String)]) -> Vec<Vec<u8>> {
        let mut flat = Vec::new();
        for (k, v) in &self.entry.map {
            if extra.iter().any(|(e, _)| e == k) {
                continue;
            }
            flat.push(k.clone().into_bytes());
            flat.push(match v {
                redis::Value::BulkString(b) => b.clone(),
                other => text(other).into_bytes(),
            });
        }
        for (k, v) in extra {
            flat.push(k.as_bytes().to_vec());
            flat.push(v.clone().into_bytes());
        }
        flat
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()> {
        let c = &self.shared.config;
        let mut pipe = redis::pipe();
        pipe.atomic();
        match &settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay, reason } | Settlement::Requeue { delay, reason } => {
                let next = match settlement {
                    Settlement::Retry { .. } => self.attempt + 1,
                    _ => self.attempt,
                };
                let fields: Vec<String> = self
                    .fields(&[
                        (ATTEMPT_HEADER, next.to_string()),
                        (REASON_HEADER, reason.clone()),
                    ])
                    .into_iter()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect();
                let member = serde_json::json!({
                    "fields": fields,
                    "n": uuid::Uuid::new_v4().to_string(),
                });
                pipe.cmd("ZADD")
                    .arg(self.shared.retry_key())
                    .arg(now_ms() + delay.as_millis() as u64)
                    .arg(member.to_string())
                    .ignore();
            }
            Settlement::DeadLetter { reason, report } => {
                let mut report = report.to_string();
                report.truncate(32 * 1024);
                let fields = self.fields(&[
                    (REASON_HEADER, reason.clone()),
                    ("x-sandpipe-attempts", self.attempt.to_string()),
                    ("x-sandpipe-report", report),
                ]);
                pipe.cmd("XADD")
                    .arg(self.shared.dead_key())
                    .arg("*")
                    .arg(fields)
                    .ignore();
            }
        }
        pipe.cmd("XACK")
            .arg(&c.stream)
            .arg(&c.group)
            .arg(&self.entry.id)
            .ignore();
        let mut conn = self.shared.conn.clone();
        let result: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
        // On failure the entry stays pending and is claimed again later.
        result.with_context(|| format!("cannot settle entry {} of `{}`", self.entry.id, c.stream))
    }
}
