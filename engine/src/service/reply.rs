//! The `reply` resource of the `service` world: how a guest answers one
//! query. Partial replies go out as they are made, through a bounded
//! channel (a slow receiver slows the guest down; the call's deadline still
//! holds); the final reply is kept until the call returns and its effects
//! are committed, then sent by [`super::Service::query`].
//!
//! One reply model serves every transport: a [`Frame`] is the Vantiq
//! protocol's query response (`status` 100, 200, 204 or 400 with a body),
//! and the HTTP transport sends each as one NDJSON line.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use wasmtime::component::Resource;

use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::service::sandpipe::connector::service_types::{Host, HostReply};

/// Frames that may wait in a reply's channel before `partial` waits.
pub const CHANNEL: usize = 16;

/// The largest reply body when nothing else is configured
/// (`services.NAME.max_reply_bytes`' default).
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;

/// One reply to a query, as the Vantiq protocol numbers them.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// 100: part of the answer (a JSON object or array of objects).
    Partial(Value),
    /// 200: the last part of the answer.
    Complete(Value),
    /// 204: no (more) answer.
    Empty,
    /// 400: the query failed.
    Error {
        /// What failed, as a code (`io.sandpipe.service.trap`).
        code: String,
        /// The message with `{0}`-style placeholders.
        template: String,
        /// The placeholders' values.
        parameters: Vec<String>,
    },
}

impl Frame {
    /// The status code of the frame.
    pub fn status(&self) -> u16 {
        match self {
            Self::Partial(_) => 100,
            Self::Complete(_) => 200,
            Self::Empty => 204,
            Self::Error { .. } => 400,
        }
    }

    /// Whether it ends the reply.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Partial(_))
    }

    /// An error frame from the engine (not the guest).
    pub fn engine_error(code: &str, template: &str, parameters: Vec<String>) -> Self {
        Self::Error {
            code: format!("io.sandpipe.service.{code}"),
            template: template.to_owned(),
            parameters,
        }
    }

    /// The frame as one NDJSON line (`to_json`'s text and a newline),
    /// written without building the JSON value around the body.
    pub fn to_line(&self) -> String {
        let mut line = match self {
            Self::Partial(body) | Self::Complete(body) => {
                format!("{{\"status\":{},\"body\":{body}}}", self.status())
            }
            other => other.to_json().to_string(),
        };
        line.push('\n');
        line
    }

    /// The frame as JSON: `{"status": 100, "body": ...}`; an error's body
    /// is `{"messageCode", "messageTemplate", "parameters"}`, as Vantiq's
    /// connector SDKs send it.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Partial(body) | Self::Complete(body) => {
                json!({ "status": self.status(), "body": body })
            }
            Self::Empty => json!({ "status": 204 }),
            Self::Error {
                code,
                template,
                parameters,
            } => json!({
                "status": 400,
                "body": {
                    "messageCode": code,
                    "messageTemplate": template,
                    "parameters": parameters,
                },
            }),
        }
    }
}

/// What the guest's `reply` handle refers to.
pub struct Reply {
    shared: Arc<Shared>,
}

/// What the reply's handle and the engine share.
pub struct Shared {
    /// Where partial replies go; `None` once the call has returned.
    partials: Mutex<Option<mpsc::Sender<Frame>>>,
    /// The final reply, once made.
    last: Mutex<Option<Frame>>,
    /// The largest reply body.
    max_bytes: u64,
    /// Partial replies sent.
    sent: std::sync::atomic::AtomicU64,
}

impl Reply {
    /// A reply sending partials to `partials`; the engine keeps the
    /// returned [`Shared`] to take the final reply and close it.
    pub fn new(partials: mpsc::Sender<Frame>, max_bytes: u64) -> (Self, Arc<Shared>) {
        let shared = Arc::new(Shared {
            partials: Mutex::new(Some(partials)),
            last: Mutex::new(None),
            max_bytes,
            sent: std::sync::atomic::AtomicU64::new(0),
        });
        (
            Self {
                shared: shared.clone(),
            },
            shared,
        )
    }
}

impl Shared {
    /// End the reply (the call returned): later calls on the handle fail,
    /// and the final reply, if one was made, is handed over.
    pub fn close(&self) -> Option<Frame> {
        if let Ok(mut partials) = self.partials.lock() {
            partials.take();
        }
        self.last.lock().ok().and_then(|mut last| last.take())
    }

    /// Partial replies sent so far.
    pub fn partials_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sender(&self) -> Result<mpsc::Sender<Frame>, WitError> {
        let finished = self.last.lock().map(|l| l.is_some()).unwrap_or(true);
        let sender = self.partials.lock().ok().and_then(|p| p.clone());
        match sender {
            Some(sender) if !finished => Ok(sender),
            _ => Err(WitError::Invalid(
                "the reply is finished: `complete`, `empty` or `error` was already called, or the query's call has returned".into(),
            )),
        }
    }

    fn finish(&self, frame: Frame) -> Result<(), WitError> {
        self.sender()?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(frame);
        }
        Ok(())
    }
}

/// A reply body: a JSON object or an array of objects, at most `max`
/// bytes.
fn body(text: &str, max: u64) -> Result<Value, WitError> {
    if text.len() as u64 > max {
        return Err(WitError::LimitExceeded(format!(
            "a reply of {} bytes is larger than {max} bytes (services.NAME.max_reply_bytes)",
            text.len()
        )));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| WitError::Invalid(format!("a reply body must be JSON: {e}")))?;
    let objects = match &value {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().all(Value::is_object),
        _ => false,
    };
    if objects {
        Ok(value)
    } else {
        Err(WitError::Invalid(
            "a reply body must be a JSON object or an array of objects".into(),
        ))
    }
}

impl Host for InvocationState {}

impl HostReply for InvocationState {
    async fn partial(&mut self, reply: Resource<Reply>, text: String) -> Result<(), WitError> {
        let shared = self
            .table
            .get(&reply)
            .map_err(|e| WitError::Internal(e.to_string()))?
            .shared
            .clone();
        let sender = shared.sender()?;
        let value = body(&text, shared.max_bytes)?;
        sender
            .send(Frame::Partial(value))
            .await
            .map_err(|_| WitError::Unavailable("the query's receiver is gone".into()))?;
        shared
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn complete(&mut self, reply: Resource<Reply>, text: String) -> Result<(), WitError> {
        let shared = self.shared(&reply)?;
        shared.sender()?;
        let value = body(&text, shared.max_bytes)?;
        shared.finish(Frame::Complete(value))
    }

    async fn empty(&mut self, reply: Resource<Reply>) -> Result<(), WitError> {
        self.shared(&reply)?.finish(Frame::Empty)
    }

    async fn error(
        &mut self,
        reply: Resource<Reply>,
        code: String,
        template: String,
        parameters: Vec<String>,
    ) -> Result<(), WitError> {
        let shared = self.shared(&reply)?;
        let size = code.len() + template.len() + parameters.iter().map(String::len).sum::<usize>();
        if size as u64 > shared.max_bytes {
            return Err(WitError::LimitExceeded(format!(
                "an error reply of {size} bytes is larger than {} bytes (services.NAME.max_reply_bytes)",
                shared.max_bytes
            )));
        }
        shared.finish(Frame::Error {
            code,
            template,
            parameters,
        })
    }

    async fn drop(&mut self, reply: Resource<Reply>) -> wasmtime::Result<()> {
        self.table.delete(reply)?;
        Ok(())
    }
}

impl InvocationState {
    fn shared(&self, reply: &Resource<Reply>) -> Result<Arc<Shared>, WitError> {
        self.table
            .get(reply)
            .map(|r| r.shared.clone())
            .map_err(|e| WitError::Internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_objects_or_arrays_of_objects_within_the_limit() {
        assert!(body("{\"a\": 1}", 100).is_ok());
        assert!(body("[{\"a\": 1}, {}]", 100).is_ok());
        assert!(matches!(body("[1]", 100), Err(WitError::Invalid(_))));
        assert!(matches!(body("\"x\"", 100), Err(WitError::Invalid(_))));
        assert!(matches!(body("{", 100), Err(WitError::Invalid(_))));
        assert!(matches!(
            body("{\"a\": 1}", 3),
            Err(WitError::LimitExceeded(_))
        ));
    }

    #[test]
    fn frames_read_as_vantiq_replies() {
        let error = Frame::Error {
            code: "x.bad".into(),
            template: "no table {0} in {1}".into(),
            parameters: vec!["t".into(), "db".into()],
        };
        assert_eq!(
            error.to_json(),
            json!({"status": 400, "body": {"messageCode": "x.bad", "messageTemplate": "no table {0} in {1}", "parameters": ["t", "db"]}})
        );
        assert_eq!(Frame::Empty.to_json(), json!({"status": 204}));
        assert_eq!(
            Frame::Partial(json!([{"a": 1}])).to_json(),
            json!({"status": 100, "body": [{"a": 1}]})
        );
        assert!(Frame::Complete(json!({})).is_final());
        for frame in [
            Frame::Partial(json!([{"a": "x\ny"}])),
            Frame::Complete(json!({"b": 1})),
            Frame::Empty,
            error.clone(),
        ] {
            let line = frame.to_line();
            assert!(
                line.ends_with('\n') && !line.trim_end().contains('\n'),
                "{line}"
            );
            assert_eq!(
                serde_json::from_str::<Value>(line.trim_end()).unwrap(),
                frame.to_json()
            );
        }
        assert!(!Frame::Partial(json!({})).is_final());
    }

    #[tokio::test]
    async fn a_finished_reply_refuses_more_and_hands_over_its_last_frame() {
        let (tx, mut rx) = mpsc::channel(4);
        let (_reply, shared) = Reply::new(tx, 1024);
        assert!(shared.sender().is_ok());
        shared.finish(Frame::Empty).unwrap();
        assert!(shared.sender().is_err());
        assert!(shared.finish(Frame::Empty).is_err());
        assert_eq!(shared.close(), Some(Frame::Empty));
        assert!(rx.recv().await.is_none());
    }
}
