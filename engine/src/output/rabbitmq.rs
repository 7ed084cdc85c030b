//! Output `rabbitmq`: publishes to an exchange with publisher confirms. A
//! nack or a confirm that does not arrive in time fails the publish (and so
//! the invocation's commit, which is then retried). The connection is made
//! on first use and remade after any failure.

use anyhow::Context as _;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::Origin;
use crate::capability::Emit;
use crate::config::RabbitmqOutputConfig;
use crate::listener::rabbitmq::{connect, exchange_kind, publish_confirmed, table_of};
use crate::tls::Tls;

/// A RabbitMQ output.
pub struct RabbitmqOutput {
    config: RabbitmqOutputConfig,
    link: Mutex<Option<(Connection, Channel)>>,
    tls: Tls,
}

impl RabbitmqOutput {
    /// The output (it connects on first publish).
    pub fn new(config: &RabbitmqOutputConfig, tls: &Tls) -> Self {
        Self {
            config: config.clone(),
            link: Mutex::new(None),
            tls: tls.clone(),
        }
    }

    async fn open(&self) -> anyhow::Result<(Connection, Channel)> {
        let connection = connect(&self.config.url, &self.tls).await?;
        let channel = connection.create_channel().await?;
        let kind = exchange_kind(&self.config.exchange.kind);
        channel
            .exchange_declare(
                self.config.exchange.name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare exchange `{}`", self.config.exchange.name))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((connection, channel))
    }

    pub(super) async fn publish(
        &self,
        origin: &Origin<'_>,
        seq: usize,
        emit: &Emit,
    ) -> anyhow::Result<()> {
        let mut link = self.link.lock().await;
        if link.is_none() {
            // Bounded like the publish: a broker that does not answer the
            // connection is an outage of the output, not a stuck message.
            let timeout = self.config.confirm_timeout;
            let opened = tokio::time::timeout(timeout, self.open())
                .await
                .map_err(|_| anyhow::anyhow!("no connection within {timeout:?}"))
                .and_then(|opened| opened)
                .with_context(|| format!("output `{}`: cannot connect to RabbitMQ", emit.output))?;
            *link = Some(opened);
        }
        let Some((_, channel)) = link.as_ref() else {
            anyhow::bail!("not connected");
        };
        let mut headers = emit.headers.clone();
        headers.push(("x-sandpipe-message-id".into(), origin.message_id.to_owned()));
        headers.push(("x-sandpipe-plugin".into(), origin.plugin.to_owned()));
        let properties = BasicProperties::default()
            .with_message_id(
                format!("{}.{}.{seq}", origin.message_id, origin.plugin)
                    .as_str()
                    .into(),
            )
            .with_headers(table_of(&headers));
        let result = publish_confirmed(
            channel,
            &self.config.exchange.name,
            &self.config.routing_key,
            &emit.payload,
            properties,
            self.config.confirm_timeout,
        )
        .await;
        if result.is_err() {
            // Start over with a new connection next time.
            *link = None;
        }
        result.with_context(|| format!("output `{}`: cannot publish to RabbitMQ", emit.output))
    }
}
