//! The plugin's own configuration: the `config` map of its grant in the
//! engine's configuration file. Always granted.
//!
//! Strings come back as they are; other values (numbers, booleans, lists,
//! maps) as JSON text, so `get_parsed::<u32>("limit")` works for `limit: 10`.
//!
//! ```no_run
//! use sandpipe_sdk::config;
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! let output = config::get_or("output", "stats")?;
//! let limit: u32 = config::get_parsed("limit")?.unwrap_or(100);
//! for key in config::keys()? {
//!     sandpipe_sdk::debug!("config key {key}");
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt::Display;
use std::str::FromStr;

use crate::{Error, host};

/// The value of `key`, or `None` if it is not set.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    host::config_get(key).map_err(Error::from)
}

/// The value of `key`, or `default` if it is not set.
pub fn get_or(key: &str, default: &str) -> Result<String, Error> {
    Ok(get(key)?.unwrap_or_else(|| default.to_owned()))
}

/// The value of `key` parsed with [`FromStr`], or `None` if it is not set.
/// A value that does not parse is [`Error::Invalid`] naming the key.
pub fn get_parsed<T>(key: &str) -> Result<Option<T>, Error>
where
    T: FromStr,
    T::Err: Display,
{
    match get(key)? {
        None => Ok(None),
        Some(raw) => parse_value(key, &raw).map(Some),
    }
}

/// Every configured key, sorted.
pub fn keys() -> Result<Vec<String>, Error> {
    host::config_keys().map_err(Error::from)
}

fn parse_value<T>(key: &str, raw: &str) -> Result<T, Error>
where
    T: FromStr,
    T::Err: Display,
{
    raw.trim().parse::<T>().map_err(|e| {
        Error::invalid(format!(
            "config key `{key}`: cannot parse {raw:?} as {}: {e}",
            std::any::type_name::<T>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_the_key() {
        assert_eq!(parse_value::<u32>("limit", " 10 "), Ok(10));
        let err = parse_value::<u32>("limit", "ten").err();
        assert!(matches!(err, Some(Error::Invalid(ref m)) if m.starts_with("config key `limit`")));
    }
}
