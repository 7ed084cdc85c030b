//! The capability functions on the host: they answer from the [`FakeHost`]
//! that [`run`](super::run) installed for the current thread, and record
//! what the plugin did. Texts and error kinds follow the engine's.

use std::cell::RefCell;
use std::sync::Arc;

use super::{BlobWrite, Emit, FakeHost, LogLine, SqlCall, SqlFunction, StateChange, level_name};
use crate::bindings::sandpipe::connector::log::Level;
use crate::bindings::sandpipe::connector::sql::{Rows, Value};
use crate::bindings::sandpipe::connector::types::Error as WitError;
use crate::{Capability, Error, Message};

/// The most the engine hands out per `reader.read` (its default
/// `limits.blob_chunk`).
const BLOB_CHUNK: usize = 1 << 20;
/// Longest state key (the engine's).
const MAX_STATE_KEY: usize = 512;
/// Largest state value (the engine's).
const MAX_STATE_VALUE: usize = 1 << 20;

/// What the plugin did during one invocation.
#[derive(Debug, Default)]
pub(super) struct Effects {
    pub(super) logs: Vec<LogLine>,
    pub(super) sql: Vec<SqlCall>,
    pub(super) emits: Vec<Emit>,
    pub(super) blob_writes: Vec<BlobWrite>,
    pub(super) state_changes: Vec<StateChange>,
    pub(super) calls: Vec<String>,
    pub(super) denials: Vec<String>,
    pub(super) http_requests: Vec<crate::http::Request>,
}

/// One invocation in progress: the host, the message, the effects.
pub(super) struct Session {
    pub(super) host: FakeHost,
    pub(super) message: Message,
    pub(super) plugin: String,
    pub(super) effects: Effects,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// Install `session` for this thread; returns the one it replaces.
pub(super) fn install(session: Session) -> Option<Session> {
    SESSION.with(|cell| cell.borrow_mut().replace(session))
}

/// Put `previous` back; returns the session that was installed.
pub(super) fn uninstall(previous: Option<Session>) -> Option<Session> {
    SESSION.with(|cell| std::mem::replace(&mut *cell.borrow_mut(), previous))
}

/// Name the plugin in the installed session (for denial texts and logs).
pub(super) fn set_plugin(name: &str) {
    SESSION.with(|cell| {
        if let Some(session) = cell.borrow_mut().as_mut() {
            session.plugin = name.to_owned();
        }
    });
}

#[allow(clippy::panic)]
fn no_host() -> ! {
    panic!("no sandpipe_sdk::testing host is installed; use sandpipe_sdk::testing::run")
}

/// Run `f` on the installed session (panics if there is none).
fn with<T>(f: impl FnOnce(&mut Session) -> Result<T, Error>) -> Result<T, WitError> {
    SESSION.with(|cell| match cell.borrow_mut().as_mut() {
        Some(session) => f(session).map_err(WitError::from),
        None => no_host(),
    })
}

impl Session {
    /// Record a call to `interface.function` of `capability`; deny it
    /// without the grant, or fail it as the host was told to.
    fn enter(&mut self, capability: Capability, function: &str) -> Result<(), Error> {
        let interface = capability.name();
        self.effects.calls.push(format!("{interface}.{function}"));
        let always = matches!(capability, Capability::Log | Capability::Config);
        let granted = always
            || self
                .host
                .grants
                .as_ref()
                .is_none_or(|list| list.contains(&capability));
        if !granted {
            let example = match capability {
                Capability::Blob => "blob: true",
                Capability::Meta => "meta: true",
                Capability::Sql => "sql: true",
                Capability::Emit => "emit: [<output>]",
                Capability::Log | Capability::Config => "(always granted)",
            };
            return Err(self.deny(format!(
                "plugin `{plugin}` called {interface}.{function} but has no `{interface}` grant \
                 (add `{example}` under plugins.grants.{plugin})",
                plugin = self.plugin
            )));
        }
        if let Some((_, error)) = self.host.failures.iter().find(|(c, _)| *c == capability) {
            return Err(error.clone());
        }
        Ok(())
    }

    fn deny(&mut self, message: String) -> Error {
        self.effects.denials.push(message.clone());
        Error::AccessDenied(message)
    }

    fn reader(&self, location: &str) -> Result<Reader, Error> {
        let own = self.message.data_location.as_deref() == Some(location);
        let bytes = match (&self.host.data, own) {
            (Some(data), true) => Some(data.clone()),
            _ => self.host.blobs.get(location).cloned(),
        };
        bytes
            .map(|bytes| Reader { bytes, pos: 0 })
            .ok_or_else(|| Error::not_found(format!("no object at `{location}`")))
    }
}

/// An open object of the fake host.
pub(crate) struct Reader {
    bytes: Arc<[u8]>,
    pos: usize,
}

/// The engine's rules for object locations.
fn check_location(location: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid location `{location}`: {why}"
        )))
    };
    if location.is_empty() {
        return bad("empty");
    }
    if location.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if location.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    if location.contains('\\') {
        return bad("backslashes are not allowed");
    }
    if location.contains(':') {
        return bad("URLs and drive letters are not allowed");
    }
    if location.chars().any(char::is_control) {
        return bad("control characters are not allowed");
    }
    if location.contains('%') {
        return bad("percent-encoding is not allowed");
    }
    for segment in location.split('/') {
        match segment {
            "" => return bad("empty path segments are not allowed"),
            "." | ".." => return bad("`.` and `..` segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

fn check_state_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_STATE_KEY {
        return Err(Error::invalid(format!(
            "state keys must be 1 to {MAX_STATE_KEY} bytes"
        )));
    }
    Ok(())
}

/// Strings as they are, other values as JSON text (the engine's rule for
/// config and metadata values).
fn render(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn log_write(level: Level, message: &str) -> Result<(), WitError> {
    with(|s| {
        s.enter(Capability::Log, "write")?;
        // Shown by the test harness when the test fails.
        eprintln!("[{} {}] {message}", s.plugin, level_name(level));
        s.effects.logs.push(LogLine {
            level,
            message: message.to_owned(),
        });
        Ok(())
    })
}

pub(crate) fn config_get(key: &str) -> Result<Option<String>, WitError> {
    with(|s| {
        s.enter(Capability::Config, "get")?;
        Ok(s.host.config.get(key).map(render))
    })
}

pub(crate) fn config_keys() -> Result<Vec<String>, WitError> {
    with(|s| {
        s.enter(Capability::Config, "keys")?;
        Ok(s.host.config.keys().cloned().collect())
    })
}

pub(crate) fn blob_open_data() -> Result<Reader, WitError> {
    with(|s| {
        s.enter(Capability::Blob, "open-data")?;
        let location = s.message.data_location.clone().ok_or_else(|| {
            Error::not_found(format!("message `{}` has no data location", s.message.id))
        })?;
        s.reader(&location)
    })
}

pub(crate) fn blob_open(location: &str) -> Result<Reader, WitError> {
    with(|s| {
        s.enter(Capability::Blob, "open")?;
        check_location(location)?;
        s.reader(location)
    })
}

pub(crate) fn blob_put(location: &str, bytes: &[u8]) -> Result<(), WitError> {
    with(|s| {
        s.enter(Capability::Blob, "put")?;
        check_location(location)?;
        s.effects.blob_writes.push(BlobWrite {
            location: location.to_owned(),
            bytes: bytes.to_vec(),
        });
        Ok(())
    })
}

pub(crate) fn reader_read(reader: &mut Reader, max: u32) -> Result<Vec<u8>, WitError> {
    with(|s| {
        s.enter(Capability::Blob, "reader.read")?;
        let max = usize::try_from(max).unwrap_or(usize::MAX).min(BLOB_CHUNK);
        let end = reader.bytes.len().min(reader.pos.saturating_add(max));
        let chunk = reader.bytes[reader.pos..end].to_vec();
        reader.pos = end;
        Ok(chunk)
    })
}

pub(crate) fn reader_size(reader: &Reader) -> Option<u64> {
    Some(reader.bytes.len() as u64)
}

pub(crate) fn meta_all() -> Result<String, WitError> {
    with(|s| {
        s.enter(Capability::Meta, "all")?;
        serde_json::to_string(&s.host.meta).map_err(|e| Error::internal(e.to_string()))
    })
}

pub(crate) fn meta_get(key: &str) -> Result<Option<String>, WitError> {
    with(|s| {
        s.enter(Capability::Meta, "get")?;
        Ok(s.host.meta.get(key).map(render))
    })
}

pub(crate) fn meta_state_get(key: &str) -> Result<Option<Vec<u8>>, WitError> {
    with(|s| {
        s.enter(Capability::Meta, "state-get")?;
        check_state_key(key)?;
        // The invocation sees its own pending changes, as in the engine.
        for change in s.effects.state_changes.iter().rev() {
            match change {
                StateChange::Set { key: k, value } if k == key => return Ok(Some(value.clone())),
                StateChange::Delete { key: k } if k == key => return Ok(None),
                _ => {}
            }
        }
        Ok(s.host.state.get(key).cloned())
    })
}

pub(crate) fn meta_state_set(key: &str, value: &[u8]) -> Result<(), WitError> {
    with(|s| {
        s.enter(Capability::Meta, "state-set")?;
        check_state_key(key)?;
        if value.len() > MAX_STATE_VALUE {
            // The engine's default `limits.state_value_bytes`, in its words.
            return Err(Error::limit_exceeded(format!(
                "a state value of {} bytes is over 1.0 MiB (limits.state_value_bytes)",
                value.len()
            )));
        }
        s.effects.state_changes.push(StateChange::Set {
            key: key.to_owned(),
            value: value.to_vec(),
        });
        Ok(())
    })
}

pub(crate) fn meta_state_delete(key: &str) -> Result<(), WitError> {
    with(|s| {
        s.enter(Capability::Meta, "state-delete")?;
        check_state_key(key)?;
        s.effects.state_changes.push(StateChange::Delete {
            key: key.to_owned(),
        });
        Ok(())
    })
}

fn sql(
    function: SqlFunction,
    statement: &str,
    params: &[Value],
    batch: &[Vec<Value>],
) -> Result<super::SqlAnswer, WitError> {
    with(|s| {
        s.enter(Capability::Sql, function.name())?;
        let db = &s.host.db;
        let result = match function {
            SqlFunction::Query => db.run(statement, params, true),
            SqlFunction::Execute => db.run(statement, params, false),
            SqlFunction::ExecuteBatch => db.run_batch(statement, batch),
        };
        s.effects.sql.push(SqlCall {
            function,
            statement: statement.to_owned(),
            params: params.to_vec(),
            batch: batch.to_vec(),
            result: result.clone(),
        });
        result
    })
}

pub(crate) fn sql_query(statement: &str, params: &[Value]) -> Result<Rows, WitError> {
    match sql(SqlFunction::Query, statement, params, &[])? {
        super::SqlAnswer::Rows(rows) => Ok(rows),
        super::SqlAnswer::Changed(_) => Ok(Rows {
            columns: Vec::new(),
            values: Vec::new(),
        }),
    }
}

pub(crate) fn sql_execute(statement: &str, params: &[Value]) -> Result<u64, WitError> {
    match sql(SqlFunction::Execute, statement, params, &[])? {
        super::SqlAnswer::Changed(n) => Ok(n),
        super::SqlAnswer::Rows(_) => Ok(0),
    }
}

pub(crate) fn sql_execute_batch(statement: &str, batch: &[Vec<Value>]) -> Result<u64, WitError> {
    match sql(SqlFunction::ExecuteBatch, statement, &[], batch)? {
        super::SqlAnswer::Changed(n) => Ok(n),
        super::SqlAnswer::Rows(_) => Ok(0),
    }
}

pub(crate) fn emit_publish(
    output: &str,
    payload: &[u8],
    headers: &[(String, String)],
) -> Result<(), WitError> {
    with(|s| {
        s.enter(Capability::Emit, "publish")?;
        if let Some(outputs) = &s.host.outputs
            && !outputs.iter().any(|o| o == output)
        {
            let granted = if outputs.is_empty() {
                "none".to_owned()
            } else {
                outputs.join(", ")
            };
            let message = format!(
                "plugin `{}` may not emit to output `{output}` (granted: {granted})",
                s.plugin
            );
            return Err(s.deny(message));
        }
        s.effects.emits.push(Emit {
            output: output.to_owned(),
            payload: payload.to_vec(),
            headers: headers.to_vec(),
        });
        Ok(())
    })
}

/// A response body of the fake host.
pub(crate) struct HttpBody {
    bytes: Vec<u8>,
    pos: usize,
}

pub(crate) fn http_send(request: &crate::http::Request) -> Result<crate::http::Answer, Error> {
    request.parts()?;
    SESSION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(session) = cell.as_mut() else {
            no_host()
        };
        session.effects.calls.push("http.handle".to_owned());
        session.effects.http_requests.push(request.clone());
        let canned = session
            .host
            .http
            .iter()
            .find(|c| c.method == request.method && c.url == request.url)
            .cloned();
        match canned {
            Some(c) => Ok((
                c.status,
                c.headers,
                HttpBody {
                    bytes: c.body,
                    pos: 0,
                },
            )),
            None => {
                let message = format!(
                    "plugin `{}` sent {} {}, which no FakeHost::http response answers (in the \
                     engine: a destination outside the `http.allow` list is denied)",
                    session.plugin, request.method, request.url
                );
                Err(session.deny(message))
            }
        }
    })
}

pub(crate) fn http_read(body: &mut HttpBody, max: usize) -> Result<Vec<u8>, Error> {
    let rest = &body.bytes[body.pos..];
    let n = rest.len().min(max);
    body.pos += n;
    Ok(rest[..n].to_vec())
}
