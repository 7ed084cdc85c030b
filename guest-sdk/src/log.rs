//! Structured logs, recorded in the engine's log with the plugin's name and
//! the message id. Always granted; bounded per invocation.
//!
//! Each function returns `Err(`[`Error::LimitExceeded`]`)` once the
//! invocation has written more than its log quota. Propagate it with `?` if
//! losing a log line should fail the message, or ignore it with `let _ =`;
//! the macros [`trace!`](crate::trace), [`debug!`](crate::debug),
//! [`info!`](crate::info), [`warn!`](crate::warn) and
//! [`error!`](crate::error) format their arguments and always ignore the
//! error.
//!
//! ```no_run
//! use sandpipe_sdk::log;
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! log::info("starting")?; // fails the caller once the quota is exceeded
//! let _ = log::debug("detail that may be dropped");
//! sandpipe_sdk::warn!("{} rows skipped", 3); // never fails
//! # Ok(())
//! # }
//! ```

use crate::bindings::sandpipe::connector::log as wit;
use crate::{Error, host};

/// How important a log line is.
pub use wit::Level;

/// Write one log line at `level`.
pub fn write(level: Level, message: &str) -> Result<(), Error> {
    host::log_write(level, message).map_err(Error::from)
}

/// Write one line at [`Level::Trace`].
pub fn trace(message: &str) -> Result<(), Error> {
    write(Level::Trace, message)
}

/// Write one line at [`Level::Debug`].
pub fn debug(message: &str) -> Result<(), Error> {
    write(Level::Debug, message)
}

/// Write one line at [`Level::Info`].
pub fn info(message: &str) -> Result<(), Error> {
    write(Level::Info, message)
}

/// Write one line at [`Level::Warn`].
pub fn warn(message: &str) -> Result<(), Error> {
    write(Level::Warn, message)
}

/// Write one line at [`Level::Error`].
pub fn error(message: &str) -> Result<(), Error> {
    write(Level::Error, message)
}

/// Format and write one log line at [`log::Level::Trace`](crate::log::Level),
/// ignoring any error (such as an exceeded log quota).
///
/// ```no_run
/// sandpipe_sdk::trace!("chunk {} of {}", 1, 4);
/// ```
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {{
        let _ = $crate::log::write($crate::log::Level::Trace, &::std::format!($($arg)+));
    }};
}

/// Format and write one log line at [`log::Level::Debug`](crate::log::Level),
/// ignoring any error (such as an exceeded log quota).
///
/// ```no_run
/// sandpipe_sdk::debug!("header is {} bytes", 24);
/// ```
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {{
        let _ = $crate::log::write($crate::log::Level::Debug, &::std::format!($($arg)+));
    }};
}

/// Format and write one log line at [`log::Level::Info`](crate::log::Level),
/// ignoring any error (such as an exceeded log quota).
///
/// ```no_run
/// sandpipe_sdk::info!("stored {} rows", 2);
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {{
        let _ = $crate::log::write($crate::log::Level::Info, &::std::format!($($arg)+));
    }};
}

/// Format and write one log line at [`log::Level::Warn`](crate::log::Level),
/// ignoring any error (such as an exceeded log quota).
///
/// ```no_run
/// sandpipe_sdk::warn!("unknown key {:?}", "colour");
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {{
        let _ = $crate::log::write($crate::log::Level::Warn, &::std::format!($($arg)+));
    }};
}

/// Format and write one log line at [`log::Level::Error`](crate::log::Level),
/// ignoring any error (such as an exceeded log quota).
///
/// ```no_run
/// sandpipe_sdk::error!("cannot parse {}", "x.png");
/// ```
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {{
        let _ = $crate::log::write($crate::log::Level::Error, &::std::format!($($arg)+));
    }};
}
