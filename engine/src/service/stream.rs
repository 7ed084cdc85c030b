//! Request/reply over a Redis stream (`services.NAME.redis`): the engine
//! reads the stream as a consumer of a group (XREADGROUP; entries a dead
//! consumer left pending are taken over with XAUTOCLAIM after
//! `claim_idle`). An entry's fields: `body` (JSON), and for a query
//! `reply_to` (a stream) and `correlation_id`; `source` names the source
//! (default: the service's). Each reply of a query is added to `reply_to`
//! (`correlation_id`, `status`, `body`, `final` 0|1); the entry is acked
//! (XACK) once its final reply is added. An event is acked once handled,
//! or when the guest refused it or trapped (logged); left pending — taken
//! over again after `claim_idle` — when the engine could not handle it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use redis::streams::StreamId;
use tokio::sync::watch;

use super::{CallError, Service};
use crate::config::service::ServiceRedis;
use crate::listener::redis::{connect, ensure_group, read_new, take_over};

/// How long one XREADGROUP waits for entries.
const BLOCK: Duration = Duration::from_secs(1);

/// Serve `config.stream` for `service` until `shutdown`.
pub async fn run(
    service: Arc<Service>,
    config: ServiceRedis,
    tls: crate::tls::Tls,
    shutdown: watch::Receiver<bool>,
) {
    super::keep_serving(
        &service,
        "redis",
        &config.stream,
        shutdown,
        |mut shutdown| {
            let (service, config, tls) = (&service, &config, &tls);
            async move { serve(service, config, tls, &mut shutdown).await }
        },
    )
    .await
}

async fn serve(
    service: &Arc<Service>,
    config: &ServiceRedis,
    tls: &crate::tls::Tls,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Reads block their connection: writes go on another.
    let mut reader = connect(&config.url, BLOCK + Duration::from_secs(5), tls).await?;
    let writer = connect(&config.url, Duration::from_secs(5), tls).await?;
    ensure_group(&mut reader, &config.stream, &config.group).await?;
    let consumer = format!("{}-{}", service.name(), uuid::Uuid::new_v4().simple());
    tracing::info!(service = %service.name(), stream = %config.stream, group = %config.group, "serving requests from Redis");
    let turns = Arc::new(tokio::sync::Semaphore::new(config.batch.max(1) as usize));
    let mut last_claim = std::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // Read no more entries than there is room to handle.
        let one = tokio::select! {
            () = async { drop(shutdown.wait_for(|stop| *stop).await) } => return Ok(()),
            one = turns.clone().acquire_owned() => one?,
        };
        drop(one);
        let room = turns.available_permits().max(1);
        let mut entries: Vec<StreamId> = Vec::new();
        if last_claim.elapsed() >= config.claim_idle.min(Duration::from_secs(10)) {
            last_claim = std::time::Instant::now();
            entries = take_over(
                &mut reader,
                &config.stream,
                &config.group,
                &consumer,
                config.claim_idle,
                room,
            )
            .await?;
        }
        if entries.is_empty() {
            entries = read_new(
                &mut reader,
                &config.stream,
                &config.group,
                &consumer,
                room,
                BLOCK,
            )
            .await?;
        }
        for entry in entries {
            let Ok(turn) = turns.clone().acquire_owned().await else {
                return Ok(());
            };
            let (service, writer, config) = (service.clone(), writer.clone(), config.clone());
            tokio::spawn(async move {
                let _turn = turn;
                if let Err(e) = handle(&service, writer, &config, entry).await {
                    tracing::warn!(service = %service.name(), "a request from Redis: {e:#}");
                }
            });
        }
    }
}

/// The text of field `name` of `entry`.
fn field(fields: &HashMap<String, redis::Value>, name: &str) -> Option<String> {
    fields
        .get(name)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

async fn handle(
    service: &Arc<Service>,
    mut writer: ConnectionManager,
    config: &ServiceRedis,
    entry: StreamId,
) -> anyhow::Result<()> {
    let ack = |mut writer: ConnectionManager, id: String| async move {
        let _: i64 = redis::cmd("XACK")
            .arg(&config.stream)
            .arg(&config.group)
            .arg(&id)
            .query_async(&mut writer)
            .await
            .context("XACK failed")?;
        anyhow::Ok(())
    };
    let source = field(&entry.map, "source").unwrap_or_else(|| service.name().to_owned());
    let body = match field(&entry.map, "body")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
    {
        Some(body) => body.to_string(),
        None => {
            tracing::warn!(service = %service.name(), id = %entry.id, "an entry without a JSON `body`, acked and dropped");
            return ack(writer, entry.id).await;
        }
    };
    match field(&entry.map, "reply_to") {
        Some(reply_to) => {
            let correlation = field(&entry.map, "correlation_id").unwrap_or_default();
            let mut frames = service.query(source, body, Vec::new());
            while let Some(frame) = frames.recv().await {
                let last = frame.is_final();
                let reply = frame.to_json();
                let _: String = redis::cmd("XADD")
                    .arg(&reply_to)
                    .arg("*")
                    .arg("correlation_id")
                    .arg(&correlation)
                    .arg("status")
                    .arg(frame.status())
                    .arg("body")
                    .arg(reply["body"].to_string())
                    .arg("final")
                    .arg(u8::from(last))
                    .query_async(&mut writer)
                    .await
                    .context("XADD of a reply failed")?;
                if last {
                    break;
                }
            }
            ack(writer, entry.id).await
        }
        // An event for a source the service does not have would stay
        // pending for ever: acked and dropped, logged.
        None if !service.knows(&source) => {
            tracing::warn!(service = %service.name(), %source, id = %entry.id, "an event for a source the service does not have, acked and dropped");
            ack(writer, entry.id).await
        }
        None => match service.publish(source, body, Vec::new()).await {
            Ok(()) => ack(writer, entry.id).await,
            Err(e @ (CallError::Busy(_) | CallError::NotConnected(_) | CallError::Commit(_))) => {
                tracing::warn!(service = %service.name(), id = %entry.id, "an event left pending: {e}");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(service = %service.name(), id = %entry.id, "an event refused, acked: {e}");
                ack(writer, entry.id).await
            }
        },
    }
}
