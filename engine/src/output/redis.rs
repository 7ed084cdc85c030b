//! Output `redis`: XADD to a stream. Fields: `message_id`, `plugin`,
//! `seq`, `headers` (a JSON array of pairs) and `payload`.

use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use super::Origin;
use crate::capability::Emit;
use crate::listener::redis::connect;
use crate::tls::Tls;

/// A Redis stream output.
pub struct RedisOutput {
    url: String,
    stream: String,
    maxlen: Option<u64>,
    timeout: Duration,
    conn: Mutex<Option<ConnectionManager>>,
    tls: Tls,
}

impl RedisOutput {
    /// The output (it connects on first publish).
    pub fn new(url: &str, stream: &str, maxlen: Option<u64>, timeout: Duration, tls: &Tls) -> Self {
        Self {
            url: url.to_owned(),
            stream: stream.to_owned(),
            maxlen,
            timeout,
            conn: Mutex::new(None),
            tls: tls.clone(),
        }
    }

    pub(super) async fn publish(
        &self,
        origin: &Origin<'_>,
        seq: usize,
        emit: &Emit,
    ) -> anyhow::Result<()> {
        let mut conn = {
            let mut guard = self.conn.lock().await;
            match guard.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = connect(&self.url, self.timeout, &self.tls).await?;
                    *guard = Some(c.clone());
                    c
                }
            }
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
        if let Some(maxlen) = self.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        cmd.arg("*")
            .arg("message_id")
            .arg(origin.message_id)
            .arg("plugin")
            .arg(origin.plugin)
            .arg("seq")
            .arg(seq)
            .arg("headers")
            .arg(serde_json::to_string(&emit.headers)?)
            .arg("payload")
            .arg(&emit.payload);
        let _: String = cmd.query_async(&mut conn).await.with_context(|| {
            format!("output `{}`: XADD to `{}` failed", emit.output, self.stream)
        })?;
        Ok(())
    }
}
