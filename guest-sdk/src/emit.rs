//! Publishing to outputs the operator declared. Requires the `emit` grant
//! listing the output's name.
//!
//! Emitted messages are queued and published only if the plugin's outcome is
//! [`Outcome::Done`](crate::Outcome::Done), before the incoming message is
//! acknowledged.
//!
//! ```no_run
//! use sandpipe_sdk::{emit, serde_json::json};
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! emit::publish("raw", b"hello", &[("x-source", "example")])?;
//! emit::publish_json("stats", &json!({ "lines": 3 }))?;
//! # Ok(())
//! # }
//! ```

use crate::{Error, host};

/// Queue `payload` with `headers` for the output named `output`.
pub fn publish(output: &str, payload: &[u8], headers: &[(&str, &str)]) -> Result<(), Error> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    host::emit_publish(output, payload, &headers).map_err(Error::from)
}

/// Queue `value`, serialised as compact JSON, for the output named `output`
/// with the header `content-type: application/json`.
pub fn publish_json(output: &str, value: &serde_json::Value) -> Result<(), Error> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| Error::internal(format!("cannot serialise JSON: {e}")))?;
    publish(output, &payload, &[("content-type", "application/json")])
}
