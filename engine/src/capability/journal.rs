//! The host-call journal: when it is on (`sandpipe exec` turns it on), every
//! call a guest makes to a `sandpipe` interface is recorded with a summary
//! of its arguments and of its result, denied calls included. `run` leaves
//! it off; then recording costs one branch per call.
//!
//! Summaries are JSON so that `exec --json` can print them and `replay` can
//! compare them: byte strings become their length, a sha256 prefix and a
//! short text preview; SQL values keep their type; rows keep their columns,
//! their count and the first [`MAX_ROWS`] rows.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use sha2::Digest as _;

use crate::capability::{HostState, Interface};
use crate::pipeline::wit_error_text;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::sql::{Rows, Value};

/// Rows of a query result kept in the journal.
pub const MAX_ROWS: usize = 50;
/// Characters of a byte string's text preview.
pub const PREVIEW: usize = 64;

/// One host call and its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCall {
    /// The interface (`sql`, `blob`, ...).
    pub interface: String,
    /// The function (`execute`, `reader.read`, ...).
    pub function: String,
    /// The arguments, summarised.
    pub args: Json,
    /// `{"ok": ...}` or `{"error": "<kind>: <text>"}`.
    pub result: Json,
}

impl HostCall {
    /// `interface.function`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.interface, self.function)
    }
}

/// A call whose result is not known yet (see [`HostState::journal_call`]).
pub struct PendingCall {
    interface: Interface,
    function: &'static str,
    args: Json,
}

impl HostState {
    /// Whether host calls are being recorded.
    pub fn journaling(&self) -> bool {
        self.journal.is_some()
    }

    /// Start recording a call: `args` is evaluated only when the journal is
    /// on. Finish it with [`HostState::journal_result`].
    pub fn journal_call(
        &self,
        interface: Interface,
        function: &'static str,
        args: impl FnOnce() -> Json,
    ) -> Option<PendingCall> {
        self.journaling().then(|| PendingCall {
            interface,
            function,
            args: args(),
        })
    }

    /// Record the result of a call started with [`HostState::journal_call`].
    pub fn journal_result<T>(
        &mut self,
        call: Option<PendingCall>,
        result: &Result<T, WitError>,
        ok: impl FnOnce(&T) -> Json,
    ) {
        let (Some(call), Some(journal)) = (call, self.journal.as_mut()) else {
            return;
        };
        let result = match result {
            Ok(value) => json!({ "ok": ok(value) }),
            Err(error) => json!({ "error": wit_error_text(error) }),
        };
        journal.push(HostCall {
            interface: call.interface.name().to_owned(),
            function: call.function.to_owned(),
            args: call.args,
            result,
        });
    }
}

/// A byte string: its length, a sha256 prefix, and a preview (text when it
/// starts as UTF-8, else hex).
pub fn bytes(data: &[u8]) -> Json {
    let sha = hex::encode(sha2::Sha256::digest(data));
    json!({
        "len": data.len(),
        "sha256": &sha[..16],
        "preview": preview(data, PREVIEW),
    })
}

/// Up to `max` characters of `data`: text (with `…` when cut), or hex.
pub fn preview(data: &[u8], max: usize) -> String {
    let head = &data[..data.len().min(max * 4)];
    let text = match std::str::from_utf8(head) {
        Ok(t) => Some(t),
        // Cut inside a character: keep the valid part.
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(t) if t.chars().all(|c| !c.is_control() || c.is_whitespace()) => {
            let cut: String = t.chars().take(max).collect();
            if cut.len() < data.len() {
                format!("{cut}…")
            } else {
                cut
            }
        }
        _ => {
            let n = data.len().min(max / 2);
            let more = if n < data.len() { "…" } else { "" };
            format!("0x{}{more}", hex::encode(&data[..n]))
        }
    }
}

/// A SQL value with its type: `null`, booleans, numbers and text as JSON;
/// `{"bytes": ...}`, `{"json": ...}`, `{"timestamp": ...}` for the others.
pub fn sql_value(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(s) => json!(s),
        Value::Bytes(b) => json!({ "bytes": bytes(b) }),
        Value::Json(s) => json!({ "json": s }),
        Value::Timestamp(t) => json!({ "timestamp": t }),
    }
}

/// SQL parameters.
pub fn sql_params(params: &[Value]) -> Json {
    Json::Array(params.iter().map(sql_value).collect())
}

/// A batch's parameter lists: their count and the first [`MAX_ROWS`].
pub fn sql_batch(batch: &[Vec<Value>]) -> Json {
    let lists: Vec<Json> = batch.iter().take(MAX_ROWS).map(|p| sql_params(p)).collect();
    json!({ "count": batch.len(), "lists": lists })
}

/// A query's rows: columns, count, and the first [`MAX_ROWS`].
pub fn sql_rows(rows: &Rows) -> Json {
    let values: Vec<Json> = rows
        .values
        .iter()
        .take(MAX_ROWS)
        .map(|row| Json::Array(row.iter().map(sql_value).collect()))
        .collect();
    json!({
        "columns": rows.columns,
        "rows": rows.values.len(),
        "values": values,
    })
}

/// Headers as a JSON list of pairs.
pub fn headers(headers: &[(String, String)]) -> Json {
    Json::Array(headers.iter().map(|(k, v)| json!([k, v])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_strings_are_summarised_with_a_preview() {
        let b = bytes(b"hello world");
        assert_eq!(b["len"], 11);
        assert_eq!(b["preview"], "hello world");
        assert_eq!(b["sha256"].as_str().map(str::len), Some(16));
        assert_eq!(preview(b"abcdef", 3), "abc…");
        assert_eq!(preview(&[0xff, 0x00, 0x01], 8), "0xff0001");
        assert_eq!(preview(&[0u8; 10], 4), "0x0000…");
        // A multi-byte character cut at the end of the window is dropped.
        assert_eq!(preview("ééé".as_bytes(), 2), "éé…");
    }

    #[test]
    fn sql_values_keep_their_type() {
        let params = sql_params(&[
            Value::Null,
            Value::Int(7),
            Value::Text("x".into()),
            Value::Json("{}".into()),
            Value::Bytes(vec![1]),
        ]);
        assert_eq!(params[0], Json::Null);
        assert_eq!(params[1], 7);
        assert_eq!(params[2], "x");
        assert_eq!(params[3], json!({"json": "{}"}));
        assert_eq!(params[4]["bytes"]["len"], 1);
    }
}
