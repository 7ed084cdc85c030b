//! The message, outcome and description types, with helpers.

pub use crate::bindings::sandpipe::connector::types::{
    Capability, Description, Message, Outcome, RetryAfter,
};

use crate::Error;

impl Message {
    /// The value of the first transport header named `name` (compared
    /// ASCII case-insensitively), if any.
    ///
    /// ```
    /// # use sandpipe_sdk::Message;
    /// let msg = Message {
    ///     id: "m-1".into(),
    ///     kind: "text/plain".into(),
    ///     data_location: None,
    ///     meta_location: None,
    ///     headers: vec![("Content-Type".into(), "text/plain".into())],
    ///     body: Vec::new(),
    ///     attempt: 1,
    /// };
    /// assert_eq!(msg.header("content-type"), Some("text/plain"));
    /// assert_eq!(msg.header("x-missing"), None);
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The raw envelope ([`Message::body`]) parsed as JSON. Fails with
    /// [`Error::Invalid`] if it is not JSON.
    ///
    /// ```
    /// # use sandpipe_sdk::Message;
    /// let msg = Message {
    ///     id: "m-1".into(),
    ///     kind: "text/plain".into(),
    ///     data_location: None,
    ///     meta_location: None,
    ///     headers: Vec::new(),
    ///     body: br#"{"uuid_ref": "m-1", "action": "done"}"#.to_vec(),
    ///     attempt: 1,
    /// };
    /// let body = msg.body_json()?;
    /// assert_eq!(body["action"], "done");
    /// # Ok::<(), sandpipe_sdk::Error>(())
    /// ```
    pub fn body_json(&self) -> Result<serde_json::Value, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::invalid(format!("message body is not JSON: {e}")))
    }

    /// Whether this is a redelivery to this plugin (`attempt > 1`).
    pub fn is_retry(&self) -> bool {
        self.attempt > 1
    }
}

impl Outcome {
    /// [`Outcome::Retry`]: discard the effects and try again after at least
    /// `delay_ms` milliseconds, recording `reason`.
    ///
    /// ```
    /// # use sandpipe_sdk::{Outcome, RetryAfter};
    /// let outcome = Outcome::retry_after(500, "upstream busy");
    /// assert_eq!(
    ///     outcome,
    ///     Outcome::Retry(RetryAfter { delay_ms: 500, reason: "upstream busy".into() })
    /// );
    /// ```
    pub fn retry_after(delay_ms: u64, reason: impl Into<String>) -> Self {
        Self::Retry(RetryAfter {
            delay_ms,
            reason: reason.into(),
        })
    }

    /// [`Outcome::Skip`] with this reason: the message is not for this
    /// plugin.
    pub fn skip(reason: impl Into<String>) -> Self {
        Self::Skip(reason.into())
    }

    /// [`Outcome::DeadLetter`] with this reason: the message can never
    /// succeed.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self::DeadLetter(reason.into())
    }
}

impl Capability {
    /// Every capability, in WIT order.
    pub const ALL: [Capability; 6] = [
        Capability::Log,
        Capability::Config,
        Capability::Blob,
        Capability::Meta,
        Capability::Sql,
        Capability::Emit,
    ];

    /// The capability's name as the engine's grants spell it (`log`,
    /// `config`, `blob`, `meta`, `sql`, `emit`).
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Config => "config",
            Capability::Blob => "blob",
            Capability::Meta => "meta",
            Capability::Sql => "sql",
            Capability::Emit => "emit",
        }
    }
}
