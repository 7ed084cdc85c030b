//! Request/reply over a RabbitMQ queue (`services.NAME.rabbitmq`): a
//! message with `reply_to` is a query, answered with one message per reply
//! (`{"status": 100|200|204|400, "body": ...}`, the request's
//! `correlation_id`, header `x-sandpipe-final` on the last) published to
//! the default exchange with `reply_to` as the routing key, each confirmed;
//! a message without is an event for `on-publish`. The request is acked
//! once its final reply is confirmed (an event: once handled). Replicas of
//! the engine on the same queue are competing consumers.
//!
//! What is not acked: a query whose replies the broker did not confirm,
//! and an event that failed for the engine's reasons (no instance free,
//! its source not connected, its effects not applied) are requeued; an
//! event the guest refused or trapped on, or one for a source the service
//! does not have, is rejected without requeue (to the queue's dead-letter
//! exchange, if it has one).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;

use super::{CallError, Service};
use crate::config::service::ServiceRabbitmq;
use crate::listener::rabbitmq::{connect_named, headers_of, publish_confirmed, redact};

/// The header a request may name its source in (default: the service's).
pub const SOURCE_HEADER: &str = "x-sandpipe-source";
/// The header set to `true` on a query's last reply.
pub const FINAL_HEADER: &str = "x-sandpipe-final";

/// Consume `config.queue` for `service` until `shutdown`, reconnecting
/// with a backoff.
pub async fn run(
    service: Arc<Service>,
    config: ServiceRabbitmq,
    tls: crate::tls::Tls,
    shutdown: watch::Receiver<bool>,
) {
    super::keep_serving(
        &service,
        "rabbitmq",
        &config.queue,
        shutdown,
        |mut shutdown| {
            let (service, config, tls) = (&service, &config, &tls);
            async move { consume(service, config, tls, &mut shutdown).await }
        },
    )
    .await
}

async fn consume(
    service: &Arc<Service>,
    config: &ServiceRabbitmq,
    tls: &crate::tls::Tls,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let name = format!("service:{}", service.name());
    let connection = connect_named(&config.url, &name, tls).await?;
    let replies = connection.create_channel().await?;
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            config.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            format!("{name}-{}", uuid::Uuid::new_v4()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(service = %service.name(), queue = %config.queue, url = %redact(&config.url), "serving requests from RabbitMQ");
    loop {
        let delivery = tokio::select! {
            () = async { drop(shutdown.wait_for(|stop| *stop).await) } => {
                let _ = channel.close(200, "shutting down".into()).await;
                let _ = connection.close(200, "shutting down".into()).await;
                return Ok(());
            }
            delivery = consumer.next() => match delivery {
                Some(d) => d?,
                None => anyhow::bail!("the broker ended the consumer"),
            },
        };
        let (service, replies, timeout) =
            (service.clone(), replies.clone(), config.confirm_timeout);
        tokio::spawn(async move { handle(&service, &replies, timeout, delivery).await });
    }
}

/// Answer or act on one request, then settle it.
async fn handle(
    service: &Arc<Service>,
    replies: &Channel,
    timeout: Duration,
    delivery: lapin::message::Delivery,
) {
    let mut headers = headers_of(&delivery.properties);
    let source = headers
        .iter()
        .find(|(k, _)| k == SOURCE_HEADER)
        .map_or_else(|| service.name().to_owned(), |(_, v)| v.clone());
    headers.retain(|(k, _)| k != SOURCE_HEADER);
    let body = match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
        Ok(body) => body.to_string(),
        Err(e) => {
            tracing::warn!(service = %service.name(), "a request that is not JSON, rejected: {e}");
            settle(&delivery, Settle::Reject).await;
            return;
        }
    };
    let reply_to = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str().to_owned());
    let how = match reply_to {
        Some(reply_to) => {
            let correlation = delivery.properties.correlation_id().clone();
            let mut frames = service.query(source, body, headers);
            let mut sent = true;
            while let Some(frame) = frames.recv().await {
                let last = frame.is_final();
                let mut table = FieldTable::default();
                table.insert(ShortString::from(FINAL_HEADER), AMQPValue::Boolean(last));
                let mut properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(table);
                if let Some(correlation) = &correlation {
                    properties = properties.with_correlation_id(correlation.clone());
                }
                let payload = frame.to_line();
                if let Err(e) = publish_confirmed(
                    replies,
                    "",
                    &reply_to,
                    payload.as_bytes(),
                    properties,
                    timeout,
                )
                .await
                {
                    tracing::warn!(service = %service.name(), %reply_to, "a reply was not confirmed, the request is requeued: {e:#}");
                    sent = false;
                    break;
                }
                if last {
                    break;
                }
            }
            if sent { Settle::Ack } else { Settle::Requeue }
        }
        // An event for a source the service does not have would be
        // requeued for ever: it is rejected.
        None if !service.knows(&source) => {
            tracing::warn!(service = %service.name(), %source, "an event for a source the service does not have, rejected");
            Settle::Reject
        }
        None => match service.publish(source, body, headers).await {
            Ok(()) => Settle::Ack,
            Err(e @ (CallError::Busy(_) | CallError::NotConnected(_) | CallError::Commit(_))) => {
                tracing::warn!(service = %service.name(), "an event is requeued: {e}");
                Settle::Requeue
            }
            Err(e) => {
                tracing::warn!(service = %service.name(), "an event is rejected: {e}");
                Settle::Reject
            }
        },
    };
    settle(&delivery, how).await;
}

enum Settle {
    Ack,
    Requeue,
    Reject,
}

async fn settle(delivery: &lapin::message::Delivery, how: Settle) {
    let settled = match how {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue | Settle::Reject => {
            delivery
                .nack(BasicNackOptions {
                    requeue: matches!(how, Settle::Requeue),
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = settled {
        tracing::warn!("cannot settle a request: {e}");
    }
}
