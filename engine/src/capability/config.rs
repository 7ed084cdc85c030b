//! `config`: the plugin's own values from the YAML grant. Always granted.

use crate::capability::Interface;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::config::Host;

impl Host for InvocationState {
    async fn get(&mut self, key: String) -> Result<Option<String>, WitError> {
        self.host.enter(Interface::Config, "get")?;
        Ok(self.host.plugin.config.get(&key).cloned())
    }

    async fn keys(&mut self) -> Result<Vec<String>, WitError> {
        self.host.enter(Interface::Config, "keys")?;
        Ok(self.host.plugin.config.keys().cloned().collect())
    }
}
