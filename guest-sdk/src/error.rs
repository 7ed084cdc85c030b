//! The SDK's error type.

use std::fmt;

use crate::bindings::sandpipe::connector::types::Error as WitError;

/// Why a host call, or the plugin itself, failed.
///
/// Host calls return it; [`Plugin::execute`](crate::Plugin::execute) returns
/// it to fail the message. The variants mirror the `error` variant of the
/// `sandpipe:connector` WIT contract; each carries a human-readable text.
///
/// ```
/// use sandpipe_sdk::Error;
///
/// let err = Error::invalid("width must be positive");
/// assert_eq!(err.to_string(), "invalid: width must be positive");
/// assert_eq!(err.kind(), "invalid");
/// assert_eq!(err.message(), "width must be positive");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Error {
    /// The operator did not grant this capability, output, location or schema
    /// to the plugin. The text names what is missing.
    AccessDenied(String),
    /// A host-side quota was exceeded (bytes, rows, emits, log volume,
    /// calls). The text names the limit and its value.
    LimitExceeded(String),
    /// The requested object, key or row does not exist.
    NotFound(String),
    /// The request itself is malformed (bad SQL, bad location, bad key), or
    /// the plugin's input is.
    Invalid(String),
    /// A backend the engine depends on is unavailable; retrying later may
    /// succeed.
    Unavailable(String),
    /// Anything else; the text explains it.
    Internal(String),
}

impl Error {
    /// An [`Error::AccessDenied`] with this text.
    pub fn access_denied(msg: impl Into<String>) -> Self {
        Self::AccessDenied(msg.into())
    }

    /// An [`Error::LimitExceeded`] with this text.
    pub fn limit_exceeded(msg: impl Into<String>) -> Self {
        Self::LimitExceeded(msg.into())
    }

    /// An [`Error::NotFound`] with this text.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }

    /// An [`Error::Invalid`] with this text.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }

    /// An [`Error::Unavailable`] with this text.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::Unavailable(msg.into())
    }

    /// An [`Error::Internal`] with this text.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal(msg.into())
    }

    /// The same kind of error with its text changed by `f`.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Self::AccessDenied(m) => Self::AccessDenied(f(m)),
            Self::LimitExceeded(m) => Self::LimitExceeded(f(m)),
            Self::NotFound(m) => Self::NotFound(f(m)),
            Self::Invalid(m) => Self::Invalid(f(m)),
            Self::Unavailable(m) => Self::Unavailable(f(m)),
            Self::Internal(m) => Self::Internal(f(m)),
        }
    }

    /// The variant's name as the WIT contract spells it: `access-denied`,
    /// `limit-exceeded`, `not-found`, `invalid`, `unavailable` or `internal`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AccessDenied(_) => "access-denied",
            Self::LimitExceeded(_) => "limit-exceeded",
            Self::NotFound(_) => "not-found",
            Self::Invalid(_) => "invalid",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The error's text, without the kind.
    pub fn message(&self) -> &str {
        match self {
            Self::AccessDenied(m)
            | Self::LimitExceeded(m)
            | Self::NotFound(m)
            | Self::Invalid(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => m,
        }
    }

    /// Whether retrying later may succeed (only [`Error::Unavailable`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The same error with `context: ` put in front of its text.
    ///
    /// ```
    /// use sandpipe_sdk::Error;
    ///
    /// let err = Error::not_found("images/x.png").context("opening the data object");
    /// assert_eq!(err.to_string(), "not found: opening the data object: images/x.png");
    /// ```
    #[must_use]
    pub fn context(self, context: impl fmt::Display) -> Self {
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            Self::AccessDenied(m) => Self::AccessDenied(wrap(m)),
            Self::LimitExceeded(m) => Self::LimitExceeded(wrap(m)),
            Self::NotFound(m) => Self::NotFound(wrap(m)),
            Self::Invalid(m) => Self::Invalid(wrap(m)),
            Self::Unavailable(m) => Self::Unavailable(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Self::AccessDenied(_) => "access denied",
            Self::LimitExceeded(_) => "limit exceeded",
            Self::NotFound(_) => "not found",
            Self::Invalid(_) => "invalid",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal error",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

impl From<WitError> for Error {
    fn from(err: WitError) -> Self {
        match err {
            WitError::AccessDenied(m) => Self::AccessDenied(m),
            WitError::LimitExceeded(m) => Self::LimitExceeded(m),
            WitError::NotFound(m) => Self::NotFound(m),
            WitError::Invalid(m) => Self::Invalid(m),
            WitError::Unavailable(m) => Self::Unavailable(m),
            WitError::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<Error> for WitError {
    fn from(err: Error) -> Self {
        match err {
            Error::AccessDenied(m) => Self::AccessDenied(m),
            Error::LimitExceeded(m) => Self::LimitExceeded(m),
            Error::NotFound(m) => Self::NotFound(m),
            Error::Invalid(m) => Self::Invalid(m),
            Error::Unavailable(m) => Self::Unavailable(m),
            Error::Internal(m) => Self::Internal(m),
        }
    }
}

/// Maps a host error into an [`std::io::Error`] (used by
/// [`blob::Reader`](crate::blob::Reader)'s `Read` implementation). The
/// original [`Error`] is kept inside and recovered by
/// `Error::from(io::Error)`.
impl From<Error> for std::io::Error {
    fn from(err: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &err {
            Error::AccessDenied(_) => ErrorKind::PermissionDenied,
            Error::LimitExceeded(_) => ErrorKind::QuotaExceeded,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Invalid(_) => ErrorKind::InvalidInput,
            Error::Unavailable(_) | Error::Internal(_) => ErrorKind::Other,
        };
        std::io::Error::new(kind, err)
    }
}

/// Recovers the [`Error`] an I/O error was made from; any other I/O error
/// becomes [`Error::Internal`] (or [`Error::Invalid`] for invalid data).
impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        let kind = err.kind();
        let text = err.to_string();
        if let Some(inner) = err.into_inner()
            && let Ok(sdk) = inner.downcast::<Error>()
        {
            return *sdk;
        }
        match kind {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                Self::Invalid(text)
            }
            _ => Self::Internal(text),
        }
    }
}

/// A JSON error is [`Error::Invalid`].
impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::Invalid(format!("JSON: {err}"))
    }
}

/// Invalid UTF-8 is [`Error::Invalid`].
impl From<std::str::Utf8Error> for Error {
    fn from(err: std::str::Utf8Error) -> Self {
        Self::Invalid(format!("UTF-8: {err}"))
    }
}

/// Invalid UTF-8 is [`Error::Invalid`].
impl From<std::string::FromUtf8Error> for Error {
    fn from(err: std::string::FromUtf8Error) -> Self {
        Self::Invalid(format!("UTF-8: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_round_trip_keeps_the_error() {
        let original = Error::limit_exceeded("blob bytes: 10 MiB");
        let io: std::io::Error = original.clone().into();
        assert_eq!(io.kind(), std::io::ErrorKind::QuotaExceeded);
        assert_eq!(Error::from(io), original);
    }

    #[test]
    fn foreign_io_error_is_internal() {
        let io = std::io::Error::other("boom");
        assert_eq!(Error::from(io), Error::internal("boom"));
    }

    #[test]
    fn wit_round_trip() {
        let e = Error::not_found("x");
        let w: WitError = e.clone().into();
        assert_eq!(Error::from(w), e);
    }

    #[test]
    fn display_and_context() {
        let e = Error::unavailable("db down").context("insert");
        assert_eq!(e.to_string(), "unavailable: insert: db down");
        assert!(e.is_transient());
    }
}
