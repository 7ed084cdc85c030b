//! `emit`: queue messages for outputs the grant lists. Published by the
//! pipeline only when the plugin's outcome is `done`, before the ack.
//!
//! A component's payload and headers arrive as a [`Payload`] and
//! [`Headers`] (`sandbox::bounded`): copied out of the guest only when no
//! larger than the largest `emit_bytes` of any plugin, otherwise measured
//! only. Either way `emit_bytes` is checked on their whole length here, so
//! a payload larger than the plugin may emit is refused (`limit-exceeded`,
//! counted) and was never copied.

use crate::capability::{Emit, Interface, journal};
use crate::config::list_or_none;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::emit::Host;
use crate::sandbox::bounded::{Headers, Payload};

impl Host for InvocationState {
    async fn publish(
        &mut self,
        output: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), WitError> {
        self.publish_lifted(output, Payload::Copied(payload), Headers::Copied(headers))
    }
}

impl InvocationState {
    /// `emit.publish`: what a component's import calls
    /// (`sandbox::bounded::link`) and the generated [`Host::publish`].
    pub fn publish_lifted(
        &mut self,
        output: String,
        payload: Payload,
        headers: Headers,
    ) -> Result<(), WitError> {
        let call = self.host.journal_call(Interface::Emit, "publish", || {
            let not_copied = |len| serde_json::json!({ "len": len, "copied": false });
            serde_json::json!({
                "output": output,
                "headers": match &headers {
                    Headers::Copied(h) => journal::headers(h),
                    Headers::TooLarge(len) => not_copied(len),
                },
                "payload": match &payload {
                    Payload::Copied(p) => journal::bytes(p),
                    Payload::TooLarge(len) => not_copied(len),
                },
            })
        });
        let result = self.publish_inner(output, payload, headers);
        self.host
            .journal_result(call, &result, |_| serde_json::Value::Null);
        result
    }

    fn publish_inner(
        &mut self,
        output: String,
        payload: Payload,
        headers: Headers,
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
        let size = payload.whole_len().saturating_add(headers.whole_len());
        if host.effects.emit_bytes.saturating_add(size) > max_bytes.as_u64() {
            return Err(host.limit(
                "emit_bytes",
                format!(
                    "emitting {size} more bytes would exceed {max_bytes} in one invocation ({} already emitted)",
                    host.effects.emit_bytes
                ),
            ));
        }
        let (Payload::Copied(payload), Headers::Copied(headers)) = (payload, headers) else {
            // Not copied, yet within this plugin's quota: only when the
            // plugin's limits were changed after its context was built
            // (see `bounded::allow_emits_up_to`). Refused all the same.
            return Err(host.limit(
                "emit_bytes",
                format!(
                    "emitting {size} more bytes: more than the engine copies out of a plugin in one call ({} bytes)",
                    crate::sandbox::bounded::emit_cap()
                ),
            ));
        };
        host.effects.emit_bytes += size;
        host.effects.emits.push(Emit {
            output,
            payload,
            headers,
        });
        Ok(())
    }
}
