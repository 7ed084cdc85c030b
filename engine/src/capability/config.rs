//! `config`: the plugin's own values from the YAML grant. Always granted.

use serde_json::json;

use crate::capability::Interface;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::config::Host;

impl Host for InvocationState {
    async fn get(&mut self, key: String) -> Result<Option<String>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Config, "get", || json!({ "key": key }));
        let result = self
            .host
            .enter(Interface::Config, "get")
            .map(|()| self.host.plugin.config.get(&key).cloned());
        self.host.journal_result(call, &result, |v| json!(v));
        result
    }

    async fn keys(&mut self) -> Result<Vec<String>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Config, "keys", || json!({}));
        let result = self
            .host
            .enter(Interface::Config, "keys")
            .map(|()| self.host.plugin.config.keys().cloned().collect());
        self.host.journal_result(call, &result, |v| json!(v));
        result
    }
}
