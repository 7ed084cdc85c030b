//! `log`: structured logs into the engine's `tracing` output, bounded per
//! invocation. Always granted.

use crate::capability::Interface;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::log::{Host, Level};

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl Host for InvocationState {
    async fn write(&mut self, level: Level, message: String) -> Result<(), WitError> {
        let call = self.host.journal_call(
            Interface::Log,
            "write",
            || serde_json::json!({ "level": level.as_str(), "message": message }),
        );
        let result = self.write_inner(level, message);
        self.host
            .journal_result(call, &result, |_| serde_json::Value::Null);
        result
    }
}

impl InvocationState {
    fn write_inner(&mut self, level: Level, message: String) -> Result<(), WitError> {
        let host = &mut self.host;
        host.enter(Interface::Log, "write")?;
        let limit = host.plugin.limits.log_bytes;
        host.log_bytes += message.len() as u64;
        if host.log_bytes > limit.as_u64() {
            return Err(host.limit(
                "log_bytes",
                format!(
                    "log quota of {limit} per invocation exceeded ({} bytes written or asked for)",
                    host.log_bytes
                ),
            ));
        }
        let plugin = host.plugin.name.as_str();
        let id = host.message.as_ref().map_or("", |m| m.id.as_str());
        match level {
            Level::Trace => tracing::trace!(plugin, message_id = id, "{message}"),
            Level::Debug => tracing::debug!(plugin, message_id = id, "{message}"),
            Level::Info => tracing::info!(plugin, message_id = id, "{message}"),
            Level::Warn => tracing::warn!(plugin, message_id = id, "{message}"),
            Level::Error => tracing::error!(plugin, message_id = id, "{message}"),
        }
        host.logs.push((level.as_str().to_owned(), message));
        Ok(())
    }
}
