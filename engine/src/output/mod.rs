//! Outputs: where `emit` publishes. One file per backend; `type` in the
//! YAML selects it.

mod dir;
mod rabbitmq;
mod redis;

use std::collections::BTreeMap;

use crate::capability::Emit;
use crate::config::OutputConfig;
use crate::tls::Tls;
pub use dir::{DirOutput, safe_name};
pub use rabbitmq::RabbitmqOutput;
pub use redis::RedisOutput;

/// One configured output.
pub enum Output {
    /// A folder, one file per message.
    Dir(DirOutput),
    /// A RabbitMQ exchange.
    Rabbitmq(Box<RabbitmqOutput>),
    /// A Redis stream.
    Redis(RedisOutput),
}

/// Every configured output, by name.
#[derive(Default)]
pub struct Outputs {
    outputs: BTreeMap<String, Output>,
}

/// Who emitted what: makes published names deterministic, so a redelivered
/// message overwrites its own earlier output instead of duplicating it.
pub struct Origin<'a> {
    /// The message id.
    pub message_id: &'a str,
    /// The plugin.
    pub plugin: &'a str,
}

impl Outputs {
    /// Build the outputs of the config (their TLS connections trust what
    /// `tls` does).
    pub fn new(config: &BTreeMap<String, OutputConfig>, tls: &Tls) -> anyhow::Result<Self> {
        let mut outputs = BTreeMap::new();
        for (name, output) in config {
            let built = match output {
                OutputConfig::Dir { path } => Output::Dir(DirOutput::new(path)?),
                OutputConfig::Rabbitmq(c) => {
                    Output::Rabbitmq(Box::new(RabbitmqOutput::new(c, tls)))
                }
                OutputConfig::Redis {
                    url,
                    stream,
                    maxlen,
                    timeout,
                } => Output::Redis(RedisOutput::new(url, stream, *maxlen, *timeout, tls)),
            };
            outputs.insert(name.clone(), built);
        }
        Ok(Self { outputs })
    }

    /// Publish `emits` in order; returns when every one is durable.
    pub async fn publish(&self, origin: &Origin<'_>, emits: &[Emit]) -> anyhow::Result<()> {
        for (seq, emit) in emits.iter().enumerate() {
            let output = self
                .outputs
                .get(&emit.output)
                .ok_or_else(|| anyhow::anyhow!("output `{}` is not configured", emit.output))?;
            match output {
                Output::Dir(dir) => dir.publish(origin, seq, emit).await?,
                Output::Rabbitmq(rabbit) => rabbit.publish(origin, seq, emit).await?,
                Output::Redis(redis) => redis.publish(origin, seq, emit).await?,
            }
        }
        Ok(())
    }
}
