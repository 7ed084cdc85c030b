//! The host's own error for what a backend answers a host call: the stores
//! (`store::database`) return it, and the capability layer turns it into the
//! WIT `error` a guest sees (`From<HostError> for WitError`), so no store
//! depends on the generated bindings.

/// Why a host call's backend work failed; the cases of the WIT `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// A policy refused it (the text names what is missing).
    #[error("access-denied: {0}")]
    AccessDenied(String),
    /// A quota was exceeded (the text names the limit).
    #[error("limit-exceeded: {0}")]
    LimitExceeded(String),
    /// The object, key or row does not exist.
    #[error("not-found: {0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A backend is unavailable; later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("internal: {0}")]
    Internal(String),
}

impl HostError {
    /// The same kind of error with its text changed by `f`.
    pub fn map_text(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Self::AccessDenied(m) => Self::AccessDenied(f(m)),
            Self::LimitExceeded(m) => Self::LimitExceeded(f(m)),
            Self::NotFound(m) => Self::NotFound(f(m)),
            Self::Invalid(m) => Self::Invalid(f(m)),
            Self::Unavailable(m) => Self::Unavailable(f(m)),
            Self::Internal(m) => Self::Internal(f(m)),
        }
    }
}
