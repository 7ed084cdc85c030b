//! What `sandpipe exec` prints: the outcome, the logs, the SQL, the emits,
//! the other captured effects, every host call, the fuel and the duration;
//! as text for people or as one JSON object (`--json`).

use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{EXIT_FAILED, EXIT_OK};
use crate::capability::journal::{self, HostCall};
use crate::capability::{HostState, MessageContext, StateOp};
use crate::pipeline::wit_error_text;
use crate::sandbox::bindings::{Outcome, WitError};
use crate::sandbox::{Failure, FailureKind, Usage};

/// Characters of an emitted payload shown in the text report.
const PAYLOAD_PREVIEW: usize = 240;
/// Characters of one host call line in the text report.
const CALL_LINE: usize = 200;

/// The plugin that ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Its name.
    pub name: String,
    /// Its version, from `describe`.
    pub version: String,
    /// sha256 of the component file.
    pub sha256: String,
    /// The component file.
    pub file: String,
}

/// The message it ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Its id.
    pub id: String,
    /// Its MIME type.
    pub kind: String,
    /// Where its data object was served.
    pub data_location: Option<String>,
    /// The data object's size.
    pub data_bytes: Option<u64>,
}

/// What the plugin made of the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeInfo {
    /// `done`, `skip`, `retry`, `dead-letter` or `failed`.
    pub status: String,
    /// For `failed`: the failure's kind (`panic`, `out-of-fuel`,
    /// `plugin-error`, ...).
    pub failure: Option<String>,
    /// The reason, the retry delay and reason, or the failure's message.
    pub detail: String,
}

impl std::fmt::Display for OutcomeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.failure, self.detail.is_empty()) {
            (Some(kind), _) => write!(f, "{}: {kind}: {}", self.status, self.detail),
            (None, true) => write!(f, "{}", self.status),
            (None, false) => write!(f, "{}: {}", self.status, self.detail),
        }
    }
}

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    /// `trace` ... `error`.
    pub level: String,
    /// The text.
    pub message: String,
}

/// One captured emit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmitInfo {
    /// The output's name.
    pub output: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// The payload's size.
    pub bytes: usize,
    /// The payload's beginning (text, or hex).
    pub preview: String,
}

/// One captured blob write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobWrite {
    /// Where.
    pub location: String,
    /// How much.
    pub bytes: usize,
    /// The beginning (text, or hex).
    pub preview: String,
}

/// Everything one `exec` found out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The plugin.
    pub plugin: PluginInfo,
    /// The message.
    pub message: MessageInfo,
    /// What was granted besides `log` and `config`.
    pub grants: Vec<String>,
    /// The SQL init script run on the plugin's database before the
    /// message (`--sql-init`), if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_init: Option<String>,
    /// The outcome.
    pub outcome: OutcomeInfo,
    /// 0 for done or skip, else 1.
    pub exit_code: u8,
    /// Log lines.
    pub logs: Vec<LogLine>,
    /// The `sql` host calls (also in `calls`).
    pub sql: Vec<HostCall>,
    /// Emitted messages (captured, not published).
    pub emits: Vec<EmitInfo>,
    /// Blob writes (captured, not written).
    pub blob_writes: Vec<BlobWrite>,
    /// State changes (captured, not applied): `set KEY (N bytes)`, `delete KEY`.
    pub state_changes: Vec<String>,
    /// Denied host calls.
    pub denials: Vec<String>,
    /// Every host call with its result, in order.
    pub calls: Vec<HostCall>,
    /// Fuel used by `execute`.
    pub fuel: Option<u64>,
    /// Wall-clock time of `execute`, instantiation included.
    pub duration_ms: f64,
    /// Things the author should know (routing, where data was served).
    pub notes: Vec<String>,
    /// A service's query: its replies, in order (`{"status", "body"}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<Json>,
    /// A service's request: its response (`{"status", "headers", "body"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Json>,
}

impl Report {
    /// A report with nothing run yet.
    pub fn new(
        path: &Path,
        name: &str,
        sha256: &str,
        message: &MessageContext,
        grants: Vec<String>,
    ) -> Self {
        Self {
            plugin: PluginInfo {
                name: name.to_owned(),
                version: String::new(),
                sha256: sha256.to_owned(),
                file: path.display().to_string(),
            },
            message: MessageInfo {
                id: message.id.clone(),
                kind: message.kind.clone(),
                data_location: message.data_location.clone(),
                data_bytes: None,
            },
            grants,
            sql_init: None,
            outcome: OutcomeInfo {
                status: "failed".into(),
                failure: None,
                detail: String::new(),
            },
            exit_code: EXIT_FAILED,
            logs: Vec::new(),
            sql: Vec::new(),
            emits: Vec::new(),
            blob_writes: Vec::new(),
            state_changes: Vec::new(),
            denials: Vec::new(),
            calls: Vec::new(),
            fuel: None,
            duration_ms: 0.0,
            notes: Vec::new(),
            replies: Vec::new(),
            response: None,
        }
    }

    /// `describe` failed: the plugin never ran.
    pub fn fail_describe(&mut self, failure: &Failure) {
        self.outcome = OutcomeInfo {
            status: "failed".into(),
            failure: Some(failure.kind.as_str().into()),
            detail: format!("in describe(): {}", failure.message),
        };
        self.exit_code = EXIT_FAILED;
    }

    /// Fill in what `execute` did.
    pub fn finish(
        &mut self,
        result: Result<Result<Outcome, WitError>, Failure>,
        host: &HostState,
        cost: &Usage,
    ) {
        let plain = |status: &str, detail: String| OutcomeInfo {
            status: status.into(),
            failure: None,
            detail,
        };
        let failed = |kind: FailureKind, detail: String| OutcomeInfo {
            status: "failed".into(),
            failure: Some(kind.as_str().into()),
            detail,
        };
        self.outcome = match result {
            Ok(Ok(Outcome::Done)) => plain("done", String::new()),
            Ok(Ok(Outcome::Skip(why))) => plain("skip", why),
            Ok(Ok(Outcome::Retry(r))) => {
                plain("retry", format!("after {} ms: {}", r.delay_ms, r.reason))
            }
            Ok(Ok(Outcome::DeadLetter(why))) => plain("dead-letter", why),
            // As the pipeline classifies it.
            Ok(Err(error)) => failed(
                if host.denials.is_empty() {
                    FailureKind::PluginError
                } else {
                    FailureKind::DeniedCall
                },
                wit_error_text(&error),
            ),
            Err(failure) => failed(failure.kind, failure.message),
        };
        self.exit_code = if matches!(self.outcome.status.as_str(), "done" | "skip") {
            EXIT_OK
        } else {
            EXIT_FAILED
        };
        self.logs = host
            .logs
            .iter()
            .map(|(level, message)| LogLine {
                level: level.clone(),
                message: message.clone(),
            })
            .collect();
        self.calls = host.journal.clone().unwrap_or_default();
        self.sql = self
            .calls
            .iter()
            .filter(|c| c.interface == "sql")
            .cloned()
            .collect();
        self.emits = host
            .effects
            .emits
            .iter()
            .map(|e| EmitInfo {
                output: e.output.clone(),
                headers: e.headers.clone(),
                bytes: e.payload.len(),
                preview: journal::preview(&e.payload, PAYLOAD_PREVIEW),
            })
            .collect();
        self.blob_writes = host
            .effects
            .puts
            .iter()
            .map(|(location, bytes)| BlobWrite {
                location: location.clone(),
                bytes: bytes.len(),
                preview: journal::preview(bytes, PAYLOAD_PREVIEW),
            })
            .collect();
        self.state_changes = host
            .effects
            .state
            .iter()
            .map(|op| match op {
                StateOp::Set(k, v) => format!("set {k} = {}", journal::preview(v, 80)),
                StateOp::Delete(k) => format!("delete {k}"),
            })
            .collect();
        self.denials = host.denials.clone();
        self.fuel = cost.fuel;
        self.duration_ms = cost.duration.as_secs_f64() * 1000.0;
    }
}

/// The report as one JSON object.
pub fn print_json(out: &mut dyn Write, report: &Report) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    writeln!(out)
}

/// Compact JSON, with byte-string summaries (see `journal::bytes`) shown
/// as `<N bytes "preview">`, cut to `max` characters.
pub fn compact(value: &Json, max: usize) -> String {
    let text = render(value);
    if text.chars().count() <= max {
        text
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}…")
    }
}

fn render(value: &Json) -> String {
    match value {
        Json::Object(map)
            if map.len() == 3
                && map.contains_key("len")
                && map.contains_key("sha256")
                && map.contains_key("preview") =>
        {
            let preview = map.get("preview").unwrap_or(&Json::Null);
            format!(
                "<{} bytes {preview}>",
                map.get("len").unwrap_or(&Json::Null)
            )
        }
        Json::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}:{}", Json::from(k.as_str()), render(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Json::Array(list) => {
            let items: Vec<String> = list.iter().map(render).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// A host call's result, for people: `→ ...` or `→ error: ...`.
pub fn result_text(call: &HostCall) -> String {
    if let Some(error) = call.result.get("error") {
        return format!("error: {}", error.as_str().unwrap_or_default());
    }
    let ok = call.result.get("ok").unwrap_or(&Json::Null);
    match (call.interface.as_str(), call.function.as_str()) {
        ("sql", "execute") => {
            let n = ok.get("changed").and_then(Json::as_u64).unwrap_or(0);
            format!("{n} row{} changed", if n == 1 { "" } else { "s" })
        }
        ("sql", "query") => {
            let n = ok.get("rows").and_then(Json::as_u64).unwrap_or(0);
            let columns = ok
                .get("columns")
                .map(|c| compact(c, 120))
                .unwrap_or_default();
            let values = ok
                .get("values")
                .map(|v| compact(v, 160))
                .unwrap_or_default();
            format!(
                "{n} row{} {columns}{}",
                if n == 1 { "" } else { "s" },
                if n > 0 {
                    format!(" {values}")
                } else {
                    String::new()
                }
            )
        }
        ("log", "write")
        | ("emit", "publish")
        | ("blob", "put")
        | ("meta", "state-set" | "state-delete") => "ok".into(),
        _ => compact(ok, CALL_LINE),
    }
}

/// One line for a host call: `sql.execute {...} → 1 row changed`.
pub fn call_line(call: &HostCall) -> String {
    let args = match &call.args {
        Json::Object(map) if map.is_empty() => String::new(),
        args => format!(" {}", compact(args, CALL_LINE)),
    };
    format!("{}{args} → {}", call.name(), result_text(call))
}

fn params_text(params: &Json) -> String {
    match params {
        Json::Array(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, v)| format!("${} = {}", i + 1, compact(v, 80)))
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

/// The report for people.
pub fn print(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let p = &r.plugin;
    let version = if p.version.is_empty() {
        String::new()
    } else {
        format!(" {}", p.version)
    };
    writeln!(
        out,
        "plugin    {}{version} ({}, sha256 {})",
        p.name,
        p.file,
        &p.sha256[..p.sha256.len().min(12)]
    )?;
    let m = &r.message;
    let data = match (&m.data_location, m.data_bytes) {
        (Some(l), Some(n)) => format!(", data {l} ({n} bytes)"),
        (Some(l), None) => format!(", data {l}"),
        _ => ", no data".into(),
    };
    writeln!(out, "message   {} ({}){data}", m.id, m.kind)?;
    let grants = if r.grants.is_empty() {
        "log, config".to_owned()
    } else {
        let list: Vec<String> = r
            .grants
            .iter()
            .map(|g| {
                if g == "emit" {
                    "emit (any output)".to_owned()
                } else {
                    g.clone()
                }
            })
            .collect();
        format!("log, config, {}", list.join(", "))
    };
    writeln!(out, "grants    {grants}")?;
    if let Some(file) = &r.sql_init {
        writeln!(out, "sql init  {file} (run before the message)")?;
    }
    writeln!(out, "outcome   {}", r.outcome)?;
    writeln!(
        out,
        "fuel      {}",
        r.fuel.map_or("-".into(), |f| f.to_string())
    )?;
    writeln!(out, "duration  {:.1} ms", r.duration_ms)?;
    for note in &r.notes {
        writeln!(out, "note      {note}")?;
    }
    if !r.denials.is_empty() {
        writeln!(
            out,
            "note      calls were denied: exec grants what the component imports unless --grant narrows it"
        )?;
    }

    if !r.replies.is_empty() {
        writeln!(out, "\nreplies ({})", r.replies.len())?;
        for reply in &r.replies {
            writeln!(out, "  {}", compact(reply, CALL_LINE))?;
        }
    }
    if let Some(response) = &r.response {
        writeln!(out, "\nresponse  {}", compact(response, CALL_LINE))?;
    }

    writeln!(out, "\nlogs ({})", r.logs.len())?;
    for l in &r.logs {
        writeln!(out, "  {:<5} {}", l.level, l.message)?;
    }

    writeln!(out, "\nsql ({})", r.sql.len())?;
    for (i, call) in r.sql.iter().enumerate() {
        let statement = call
            .args
            .get("statement")
            .and_then(Json::as_str)
            .unwrap_or_default();
        writeln!(out, "  {}. {} {statement}", i + 1, call.function)?;
        let params = params_text(call.args.get("params").unwrap_or(&Json::Null));
        if !params.is_empty() {
            writeln!(out, "       params {params}")?;
        }
        writeln!(out, "       → {}", result_text(call))?;
    }

    writeln!(out, "\nemits ({})", r.emits.len())?;
    for (i, e) in r.emits.iter().enumerate() {
        let headers: Vec<String> = e.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(
            out,
            "  {}. → {} ({} bytes){}",
            i + 1,
            e.output,
            e.bytes,
            if headers.is_empty() {
                String::new()
            } else {
                format!(" [{}]", headers.join(", "))
            }
        )?;
        writeln!(out, "       {}", e.preview)?;
    }

    if !r.blob_writes.is_empty() {
        writeln!(out, "\nblob writes ({})", r.blob_writes.len())?;
        for w in &r.blob_writes {
            writeln!(out, "  {} ({} bytes) {}", w.location, w.bytes, w.preview)?;
        }
    }
    if !r.state_changes.is_empty() {
        writeln!(out, "\nstate changes ({})", r.state_changes.len())?;
        for s in &r.state_changes {
            writeln!(out, "  {s}")?;
        }
    }
    if !r.denials.is_empty() {
        writeln!(out, "\ndenied ({})", r.denials.len())?;
        for d in &r.denials {
            writeln!(out, "  {d}")?;
        }
    }

    writeln!(out, "\nhost calls ({})", r.calls.len())?;
    for c in &r.calls {
        writeln!(out, "  {}", call_line(c))?;
    }
    Ok(())
}

/// A report's outcome, fuel and duration as JSON (for `replay --json`).
pub fn summary(r: &Report) -> Json {
    json!({
        "outcome": r.outcome,
        "calls": r.calls.len(),
        "fuel": r.fuel,
        "duration_ms": r.duration_ms,
    })
}
