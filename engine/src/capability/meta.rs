//! `meta`: the message's metadata, and a small key-value state of the
//! plugin's own (changes applied only on `done`).

use serde_json::json;

use crate::capability::{Interface, StateOp, journal, render_value};
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::meta::Host;

/// Longest state key.
const MAX_KEY: usize = 512;

impl InvocationState {
    async fn meta_all(&mut self) -> Result<String, WitError> {
        self.host.enter(Interface::Meta, "all")?;
        let message = self.host.message()?;
        serde_json::to_string(&message.metadata).map_err(|e| WitError::Internal(e.to_string()))
    }

    async fn meta_get(&mut self, key: String) -> Result<Option<String>, WitError> {
        self.host.enter(Interface::Meta, "get")?;
        let message = self.host.message()?;
        Ok(message.metadata.get(&key).map(render_value))
    }

    async fn meta_state_get(&mut self, key: String) -> Result<Option<Vec<u8>>, WitError> {
        self.host.enter(Interface::Meta, "state-get")?;
        check_key(&key)?;
        // Read your own pending writes first.
        for op in self.host.effects.state.iter().rev() {
            match op {
                StateOp::Set(k, v) if *k == key => return Ok(Some(v.clone())),
                StateOp::Delete(k) if *k == key => return Ok(None),
                _ => {}
            }
        }
        let plugin = self.host.plugin.clone();
        match plugin.services.state.get(&plugin.name, &key).await {
            Ok(value) => Ok(value),
            Err(e) => Err(self.host.outage(format!("state store: {e:#}"))),
        }
    }

    async fn meta_state_set(&mut self, key: String, value: Vec<u8>) -> Result<(), WitError> {
        self.host.enter(Interface::Meta, "state-set")?;
        check_key(&key)?;
        let max = self.host.plugin.limits.state_value_bytes;
        if value.len() as u64 > max.as_u64() {
            return Err(self.host.limit(
                "state_value_bytes",
                format!("a state value of {} bytes is over {max}", value.len()),
            ));
        }
        self.queue_state(key.len() + value.len())?;
        self.host.effects.state.push(StateOp::Set(key, value));
        Ok(())
    }

    async fn meta_state_delete(&mut self, key: String) -> Result<(), WitError> {
        self.host.enter(Interface::Meta, "state-delete")?;
        check_key(&key)?;
        self.queue_state(key.len())?;
        self.host.effects.state.push(StateOp::Delete(key));
        Ok(())
    }

    /// Room for one more state change of `size` bytes (key and value):
    /// at most `limits.state_changes` changes and `limits.state_bytes`
    /// per invocation.
    fn queue_state(&mut self, size: usize) -> Result<(), WitError> {
        let changes = self.host.plugin.limits.state_changes;
        if self.host.effects.state.len() >= changes as usize {
            return Err(self.host.limit(
                "state_changes",
                format!("more than {changes} state changes in one invocation"),
            ));
        }
        let limit = self.host.plugin.limits.state_bytes;
        let queued = self.host.effects.state_bytes;
        if queued + size as u64 > limit.as_u64() {
            return Err(self.host.limit(
                "state_bytes",
                format!(
                    "a state change of {size} bytes would exceed {limit} in one invocation ({queued} already queued)"
                ),
            ));
        }
        self.host.effects.state_bytes += size as u64;
        Ok(())
    }
}

/// The WIT functions: each journaled (see [`journal`]), then run.
impl Host for InvocationState {
    async fn all(&mut self) -> Result<String, WitError> {
        let call = self.host.journal_call(Interface::Meta, "all", || json!({}));
        let result = self.meta_all().await;
        self.host.journal_result(call, &result, |v| json!(v));
        result
    }

    async fn get(&mut self, key: String) -> Result<Option<String>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Meta, "get", || json!({ "key": key }));
        let result = self.meta_get(key).await;
        self.host.journal_result(call, &result, |v| json!(v));
        result
    }

    async fn state_get(&mut self, key: String) -> Result<Option<Vec<u8>>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Meta, "state-get", || json!({ "key": key }));
        let result = self.meta_state_get(key).await;
        self.host.journal_result(call, &result, |v| {
            v.as_deref().map_or(json!(null), journal::bytes)
        });
        result
    }

    async fn state_set(&mut self, key: String, value: Vec<u8>) -> Result<(), WitError> {
        let call = self.host.journal_call(
            Interface::Meta,
            "state-set",
            || json!({ "key": key, "value": journal::bytes(&value) }),
        );
        let result = self.meta_state_set(key, value).await;
        self.host.journal_result(call, &result, |_| json!(null));
        result
    }

    async fn state_delete(&mut self, key: String) -> Result<(), WitError> {
        let call =
            self.host
                .journal_call(Interface::Meta, "state-delete", || json!({ "key": key }));
        let result = self.meta_state_delete(key).await;
        self.host.journal_result(call, &result, |_| json!(null));
        result
    }
}

fn check_key(key: &str) -> Result<(), WitError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(WitError::Invalid(format!(
            "state keys must be 1 to {MAX_KEY} bytes"
        )));
    }
    Ok(())
}
