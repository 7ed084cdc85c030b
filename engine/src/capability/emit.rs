//! `emit`: queue messages for outputs the grant lists. Published by the
//! pipeline only when the plugin's outcome is `done`, before the ack.

use crate::capability::{Emit, Interface, journal};
use crate::config::list_or_none;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::emit::Host;

impl Host for InvocationState {
    async fn publish(
        &mut self,
        output: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), WitError> {
        let call = self.host.journal_call(Interface::Emit, "publish", || {
            serde_json::json!({
                "output": output,
                "headers": journal::headers(&headers),
                "payload": journal::bytes(&payload),
            })
        });
        let result = self.publish_inner(output, payload, headers);
        self.host
            .journal_result(call, &result, |_| serde_json::Value::Null);
        result
    }
}

impl InvocationState {
    fn publish_inner(
        &mut self,
        output: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), WitError> {
        let host = &mut self.host;
        host.enter(Interface::Emit, "publish")?;
        if !host.plugin.grant.emit_any && !host.plugin.grant.emit.contains(&output) {
            let message = format!(
                "plugin `{}` may not emit to output `{output}` (granted: {})",
                host.plugin.name,
                list_or_none(&host.plugin.grant.emit)
            );
            return Err(host.deny(message));
        }
        let (max_emits, max_bytes) = (host.plugin.limits.emits, host.plugin.limits.emit_bytes);
        if host.effects.emits.len() as u64 >= u64::from(max_emits) {
            return Err(host.limit(
                "emits",
                format!("more than {max_emits} emits in one invocation"),
            ));
        }
        let size = payload.len() as u64
            + headers
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum::<u64>();
        if host.effects.emit_bytes + size > max_bytes.as_u64() {
            return Err(host.limit(
                "emit_bytes",
                format!(
                    "emitting {size} more bytes would exceed {max_bytes} in one invocation ({} already emitted)",
                    host.effects.emit_bytes
                ),
            ));
        }
        host.effects.emit_bytes += size;
        host.effects.emits.push(Emit {
            output,
            payload,
            headers,
        });
        Ok(())
    }
}
