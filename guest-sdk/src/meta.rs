//! The message's metadata, and a small key-value state that belongs to the
//! plugin and survives across messages. Requires the `meta` grant.
//!
//! State changes ([`state_set`], [`state_delete`]) are applied only if the
//! plugin's outcome is [`Outcome::Done`](crate::Outcome::Done).
//!
//! ```no_run
//! use sandpipe_sdk::meta;
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! let source = meta::get("source")?.unwrap_or_default();
//! let everything = meta::all_json()?;
//!
//! // A per-plugin counter kept across messages.
//! let seen = meta::state_get_str("seen")?
//!     .and_then(|s| s.parse::<u64>().ok())
//!     .unwrap_or(0);
//! meta::state_set("seen", (seen + 1).to_string().as_bytes())?;
//! # Ok(())
//! # }
//! ```

use crate::{Error, host};

/// The message's metadata as one JSON object (`{}` if it has none), as
/// text.
pub fn all() -> Result<String, Error> {
    host::meta_all().map_err(Error::from)
}

/// The message's metadata parsed as JSON.
pub fn all_json() -> Result<serde_json::Value, Error> {
    let text = all()?;
    serde_json::from_str(&text).map_err(|e| Error::internal(format!("metadata is not JSON: {e}")))
}

/// One metadata value: strings as they are, other values as JSON text.
/// `None` if the key is not set.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    host::meta_get(key).map_err(Error::from)
}

/// Read a key of the plugin's own state.
pub fn state_get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    host::meta_state_get(key).map_err(Error::from)
}

/// Read a key of the plugin's own state as UTF-8 text
/// ([`Error::Invalid`] if it is not UTF-8).
pub fn state_get_str(key: &str) -> Result<Option<String>, Error> {
    match state_get(key)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| Error::invalid(format!("state key `{key}` is not UTF-8: {e}"))),
    }
}

/// Set a key of the plugin's own state. Written only if the plugin's outcome
/// is [`Outcome::Done`](crate::Outcome::Done).
pub fn state_set(key: &str, value: &[u8]) -> Result<(), Error> {
    host::meta_state_set(key, value).map_err(Error::from)
}

/// Delete a key of the plugin's own state. Applied only if the plugin's
/// outcome is [`Outcome::Done`](crate::Outcome::Done).
pub fn state_delete(key: &str) -> Result<(), Error> {
    host::meta_state_delete(key).map_err(Error::from)
}
