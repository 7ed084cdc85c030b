//! `log`: structured logs into the engine's `tracing` output, bounded per
//! invocation. Always granted.
//!
//! A line arrives as a [`Line`]: at most [`MAX_LINE`] bytes of it are
//! copied out of the guest (`sandbox::bounded`), and the `log_bytes` quota
//! counts its whole length, so a line past the quota is refused without
//! being copied and a kept line longer than `MAX_LINE` is cut, with a note
//! of its length.

use crate::capability::Interface;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::log::{Host, Level};
use crate::sandbox::bounded::Text;

/// The most of one log line that is copied out of a guest and kept. The
/// default `log_bytes` quota, so with default limits every line the quota
/// lets through is kept whole; past it (where an operator raised the
/// quota) a line is cut: one line of 64 KiB is already more than a log
/// pipeline keeps as one record, and what one host call makes the engine
/// hold stays small whatever the quota.
pub const MAX_LINE: usize = 64 << 10;

/// A log line, as `log.write` receives it.
pub type Line = Text<MAX_LINE>;

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
        self.write_line(level, Line::new(message))
    }
}

impl InvocationState {
    /// `log.write` of `line`: what a component's import calls
    /// (`sandbox::bounded::link`) and the generated [`Host::write`].
    pub fn write_line(&mut self, level: Level, line: Line) -> Result<(), WitError> {
        let call = self.host.journal_call(
            Interface::Log,
            "write",
            || serde_json::json!({ "level": level.as_str(), "message": line.as_str() }),
        );
        let result = self.write_inner(level, line);
        self.host
            .journal_result(call, &result, |_| serde_json::Value::Null);
        result
    }

    fn write_inner(&mut self, level: Level, line: Line) -> Result<(), WitError> {
        let host = &mut self.host;
        host.enter(Interface::Log, "write")?;
        let limit = host.plugin.limits.log_bytes;
        host.log_bytes = host.log_bytes.saturating_add(line.whole_len());
        if host.log_bytes > limit.as_u64() {
            return Err(host.limit(
                "log_bytes",
                format!(
                    "log quota of {limit} per invocation exceeded ({} bytes written or asked for)",
                    host.log_bytes
                ),
            ));
        }
        let message = line.into_string();
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
