//! `sandpipe exec` and `sandpipe replay`: the plugin author's loop.
//!
//! `exec` runs one component on one message in the same [`Sandbox`] and
//! with the same capability host code as `run`, but every capability is
//! backed by something private and throw-away: the data object is served
//! from an in-memory object store, `sql` is the engine's locked-down SQLite
//! plugin database in a temporary folder (set up first by the plugin's
//! `--sql-init` script, through the same `PluginDb::init` as `run`'s
//! `sql.init`), plugin state is a temporary
//! SQLite file, metadata and config come from the command line, and emits,
//! blob writes and state changes are captured, never applied. The
//! host-call journal (`capability::journal`) is on, so every call is
//! reported with its result.
//!
//! `exec --record DIR` keeps the inputs and the report; `replay DIR
//! PLUGIN.wasm` runs a build against those inputs and compares the host
//! calls and the outcome ([`record`]).

pub mod record;
pub mod report;
pub mod service;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::capability::{HostState, Interface, MessageContext, PluginContext, Services};
use crate::config::{
    BlobGrant, DataStoreConfig, Grant, Limits, MessageFields, MetaGrant, SandboxConfig, SqlGrant,
};
use crate::output::Outputs;
use crate::pipeline::{envelope, routing};
use crate::sandbox::Sandbox;
use crate::sandbox::bindings::Message;
use crate::store::data::DataStore;
use crate::store::database::{Database, Sqlite, StateStore};
pub use report::Report;

/// Exit code: the plugin returned `done` or `skip` (replay: no difference).
pub const EXIT_OK: u8 = 0;
/// Exit code: the plugin failed, trapped, asked for a retry or
/// dead-lettered the message (replay: a difference).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the plugin could not be run (bad arguments or files).
pub const EXIT_USAGE: u8 = 2;

/// `sandpipe exec`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// The plugin component (`.wasm`).
    pub plugin: PathBuf,
    /// The message, for a plugin: a JSON envelope (sqAPI fields:
    /// `uuid_ref`, `data_type`, `data_location`, `meta_location`,
    /// `metadata`).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["query", "event", "request"])]
    pub message: Option<PathBuf>,
    /// For a service: a query (JSON) for `on-query`; the report lists its
    /// replies.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["message", "event", "request"])]
    pub query: Option<PathBuf>,
    /// For a service: an event (JSON) for `on-publish`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["message", "query", "request"])]
    pub event: Option<PathBuf>,
    /// For a service: a request to a declared route, as JSON
    /// (`{"method", "path", "route", "params", "query", "headers", "body"}`;
    /// `body` is text) for `on-request`; the report shows the response.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["message", "query", "event"])]
    pub request: Option<PathBuf>,
    /// For a service: the configuration `on-connect` gets first (a JSON
    /// object; default `{}`).
    #[arg(long, value_name = "FILE")]
    pub connect: Option<PathBuf>,
    /// For a service: the source the call comes through (default: the
    /// component's name).
    #[arg(long)]
    pub source: Option<String>,
    /// The data object, served at the message's `data_location` (or, when
    /// the message has none, at this file's name).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// A metadata value (over the message's inline `metadata`); VALUE is
    /// read as JSON when it parses, else as a string. Repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// A JSON object of metadata, as the metadata store would return it for
    /// the message's `meta_location` (under the --meta values).
    #[arg(long, value_name = "FILE")]
    pub meta_file: Option<PathBuf>,
    /// A value for the `config` interface, read like --meta. Repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// The plugin's SQL init script (what `plugins.grants.NAME.sql.init`
    /// names), run on its private database before the message as `run`
    /// runs it at start: as the plugin, in one transaction, under the
    /// plugin policy. A failing script stops exec (exit 2), naming the file.
    #[arg(long, value_name = "FILE")]
    pub sql_init: Option<PathBuf>,
    /// Grant only these (comma-separated: `blob`, `meta`, `sql`, `emit`
    /// (any output), `emit:OUTPUT`, `http:SCHEME://HOST[:PORT]` (one entry
    /// of the `http.allow` list; repeat it for more), or `none`); default:
    /// every interface the component imports but `http`, whose
    /// destinations must be named. `log` and `config` are always granted.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub grant: Option<Vec<String>>,
    /// Fuel budget (default: unlimited; fuel used is always reported).
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Wall-clock deadline, e.g. `2s` (default 5s).
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Linear memory limit, e.g. `32MiB` (default 64MiB).
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// Save the inputs, every host call and the outcome in this folder, for
    /// `sandpipe replay`.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
    /// Where compiled code is cached (default: the user's cache folder,
    /// `$XDG_CACHE_HOME/sandpipe/code` or `~/.cache/sandpipe/code`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// `sandpipe replay`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// A folder written by `sandpipe exec --record`.
    pub dir: PathBuf,
    /// The plugin build to run against it.
    pub plugin: PathBuf,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
    /// Where compiled code is cached (as for `exec`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Limits set on the command line; the rest are the engine's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitArgs {
    /// Fuel budget.
    pub fuel: Option<u64>,
    /// Deadline in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        let mut limits = Limits {
            fuel: self.fuel,
            ..Limits::default()
        };
        if let Some(ms) = self.timeout_ms {
            limits.timeout = Duration::from_millis(ms);
        }
        if let Some(bytes) = self.memory {
            limits.memory = ByteSize::b(bytes);
        }
        limits
    }
}

/// Everything one run depends on, besides the component: what `--record`
/// saves and `replay` reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inputs {
    /// The plugin's name (its file stem when recorded).
    pub name: String,
    /// The raw message.
    #[serde(skip)]
    pub message: Vec<u8>,
    /// The data object, if any.
    #[serde(skip)]
    pub data: Option<Vec<u8>>,
    /// Where the data object is served.
    pub data_location: Option<String>,
    /// Metadata over the message's inline metadata.
    pub meta: Map<String, Json>,
    /// The `config` values.
    pub config: BTreeMap<String, Json>,
    /// The plugin's SQL init script (`--sql-init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_init: Option<SqlInit>,
    /// The grant (see [`ExecArgs::grant`]); `None`: what the component
    /// imports.
    pub grants: Option<Vec<String>>,
    /// For a service component: the call to make instead of a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<service::ServiceCall>,
    /// The HTTP exchanges of a recorded run (`--record`), which `replay`
    /// serves instead of the network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<crate::capability::http::Exchange>,
    /// Limits.
    pub limits: LimitArgs,
}

/// A plugin's SQL init script (`exec --sql-init FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SqlInit {
    /// The file it was read from (named in errors and in the report).
    pub file: PathBuf,
    /// Its text (a recording keeps it in `init.sql`).
    #[serde(skip)]
    pub text: String,
}

/// A usage error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// Exit code for an error that stopped the command.
fn error_exit(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_USAGE)
}

/// `KEY=VALUE` with VALUE as JSON when it parses, else a string.
fn key_value(arg: &str, flag: &str) -> anyhow::Result<(String, Json)> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(usage(format!("{flag} {arg:?}: expected KEY=VALUE")));
    };
    if key.is_empty() {
        return Err(usage(format!("{flag} {arg:?}: the key is empty")));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| usage(format!("cannot read {what} {}: {e}", path.display())))
}

/// The plugin's name: its file stem, as `run` names it.
fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into())
}

impl Inputs {
    /// The inputs named by `exec`'s arguments.
    pub fn from_args(args: &ExecArgs) -> anyhow::Result<Self> {
        let service = service::ServiceCall::from_args(args)?;
        let (message, envelope) = match (&args.message, &service) {
            (Some(file), _) => {
                let message = read(file, "the message")?;
                let envelope =
                    envelope::parse(&message, &MessageFields::default()).map_err(|e| {
                        usage(format!("{}: not a message: {}", file.display(), e.reason))
                    })?;
                (message, envelope)
            }
            (None, Some(_)) => (Vec::new(), envelope::Envelope::default()),
            (None, None) => {
                return Err(usage(
                    "give --message FILE (a plugin) or --query, --event or --request FILE (a service)",
                ));
            }
        };
        let data = args
            .data
            .as_ref()
            .map(|p| read(p, "the data"))
            .transpose()?;
        let data_location = match (&envelope.data_location, &args.data) {
            (Some(location), _) => Some(location.clone()),
            (None, Some(file)) => Some(data_file_name(file)),
            (None, None) => None,
        };
        if let (Some(location), None) = (&envelope.data_location, &data) {
            return Err(usage(format!(
                "the message's data_location is `{location}`: give its content with --data FILE"
            )));
        }
        let mut meta = Map::new();
        if let Some(file) = &args.meta_file {
            let text = read(file, "the metadata")?;
            match serde_json::from_slice(&text) {
                Ok(Json::Object(map)) => meta = map,
                _ => {
                    return Err(usage(format!(
                        "--meta-file {}: not a JSON object",
                        file.display()
                    )));
                }
            }
        }
        for arg in &args.meta {
            let (k, v) = key_value(arg, "--meta")?;
            meta.insert(k, v);
        }
        let mut config = BTreeMap::new();
        for arg in &args.config {
            let (k, v) = key_value(arg, "--config")?;
            config.insert(k, v);
        }
        let sql_init = match &args.sql_init {
            Some(file) => Some(SqlInit {
                file: file.clone(),
                text: std::fs::read_to_string(file).map_err(|e| {
                    usage(format!(
                        "cannot read the SQL init script {}: {e}",
                        file.display()
                    ))
                })?,
            }),
            None => None,
        };
        Ok(Self {
            name: plugin_name(&args.plugin),
            message,
            data,
            data_location,
            meta,
            config,
            sql_init,
            grants: args.grant.clone(),
            service,
            http: Vec::new(),
            limits: LimitArgs {
                fuel: args.fuel,
                timeout_ms: args.timeout.map(|t| t.as_millis() as u64),
                memory: args.memory.map(|m| m.as_u64()),
            },
        })
    }
}

/// A data file's name, used as its location when the message has none.
fn data_file_name(file: &Path) -> String {
    file.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into())
}

/// The grant for `tokens` (see [`ExecArgs::grant`]), or for every
/// interface `imports` names; also the tokens it amounts to.
pub fn resolve_grant(
    tokens: Option<&[String]>,
    imports: &[String],
) -> anyhow::Result<(Grant, Vec<String>)> {
    let tokens: Vec<String> = match tokens {
        Some(list) => list
            .iter()
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect(),
        None => {
            let mut imported: Vec<Interface> = imports
                .iter()
                .filter_map(|i| Interface::from_import(i))
                .collect();
            imported.dedup();
            imported
                .into_iter()
                // `http` needs an allow-list, which imports cannot tell.
                .filter(|i| !matches!(i, Interface::Log | Interface::Config | Interface::Http))
                .map(|i| i.name().to_owned())
                .collect()
        }
    };
    let mut grant = Grant::default();
    let mut resolved = Vec::new();
    for token in tokens {
        match token.as_str() {
            "none" | "log" | "config" => continue,
            "blob" => {
                // Every location: reads see only the data object anyway,
                // and writes are captured.
                grant.blob = Some(BlobGrant {
                    read: vec![String::new()],
                    write: vec![String::new()],
                });
            }
            "meta" => grant.meta = Some(MetaGrant {}),
            "sql" => grant.sql = Some(SqlGrant::default()),
            "emit" => grant.emit_any = true,
            other if other.starts_with("http:") => {
                let entry = &other["http:".len()..];
                let allowed = crate::config::http::AllowedHost::try_from(entry.to_owned())
                    .map_err(|e| usage(format!("--grant {other:?}: {e}")))?;
                grant
                    .http
                    .get_or_insert_with(Default::default)
                    .allow
                    .push(allowed);
            }
            other => match other.strip_prefix("emit:") {
                Some(output) if !output.is_empty() => grant.emit.push(output.to_owned()),
                _ => {
                    return Err(usage(format!(
                        "--grant {other:?}: expected blob, meta, sql, emit, emit:OUTPUT, http:SCHEME://HOST[:PORT] or none"
                    )));
                }
            },
        }
        if !resolved.contains(&token) {
            resolved.push(token);
        }
    }
    Ok((grant, resolved))
}

/// The default code cache: the user's cache folder, else none (a
/// temporary folder).
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("sandpipe").join("code"))
}

/// A private temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("sandpipe-exec-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the plugin at `path` on `inputs`; the report says what it did.
pub async fn run(
    path: &Path,
    inputs: &Inputs,
    cache_dir: Option<&Path>,
    http: Arc<crate::capability::http::HttpClient>,
) -> anyhow::Result<Report> {
    let tmp = TempDir::new()?;
    let limits = inputs.limits.limits();
    let cache_dir = cache_dir
        .map(Path::to_path_buf)
        .or_else(default_cache_dir)
        .unwrap_or_else(|| tmp.0.join("code"));
    let sandbox = Arc::new(Sandbox::new(
        &SandboxConfig {
            cache_dir,
            max_instances: 2,
            ..SandboxConfig::default()
        },
        limits.memory.as_u64(),
        true,
    )?);
    let component = sandbox.load(path).map_err(|e| usage(format!("{e:#}")))?;
    let is_service = component.world == crate::sandbox::World::Service;
    match (is_service, &inputs.service) {
        (true, None) => {
            return Err(usage(format!(
                "{} is a `service` component: give it --query, --event or --request FILE",
                path.display()
            )));
        }
        (false, Some(_)) => {
            return Err(usage(format!(
                "{} is a `{}` component: --query, --event and --request are for services; give it --message FILE",
                path.display(),
                component.world
            )));
        }
        _ => {}
    }
    let (grant, grants) = resolve_grant(inputs.grants.as_deref(), &component.imports)?;

    // The capabilities' backends: private and thrown away afterwards.
    let database = Database::Sqlite {
        engine: Sqlite::open(&tmp.0.join("engine.sqlite"))?,
        plugins_dir: tmp.0.join("plugins"),
    };
    let data = DataStore::new(&DataStoreConfig::Memory, &crate::tls::Tls::default())?;
    if let (Some(location), Some(bytes)) = (&inputs.data_location, &inputs.data) {
        data.put(location, Bytes::from(bytes.clone()))
            .await
            .map_err(|e| usage(format!("cannot serve the data at `{location}`: {e}")))?;
    }
    let services = Arc::new(Services {
        data,
        state: StateStore::new(database.clone())?,
        outputs: Outputs::default(),
        http,
        secrets: crate::secrets::Secrets::default(),
        tls: crate::tls::Tls::default(),
        tokens: None,
    });
    let db = match grant.sql {
        Some(_) => Some(Arc::new(database.plugin_db(&inputs.name, &limits)?)),
        None => None,
    };
    // The plugin's tables, as `run` sets them up at start (`sql.init`).
    let mut init_note = None;
    let init_ran = inputs.sql_init.is_some() && db.is_some();
    match (&inputs.sql_init, &db) {
        (Some(init), Some(db)) => db
            .init_text(&init.file, init.text.clone())
            .await
            .map_err(|e| usage(format!("{e:#}")))?,
        (Some(init), None) => {
            init_note = Some(format!(
                "the SQL init script {} was not run: the grant has no `sql`",
                init.file.display()
            ));
        }
        (None, _) => {}
    }
    let mut grant = grant;
    grant.config = inputs.config.clone();
    let context = Arc::new(PluginContext::new(
        &inputs.name,
        grant,
        limits.clone(),
        db,
        services,
    ));

    if let Some(call) = &inputs.service {
        let mut report =
            service::run(path, inputs, call, &sandbox, component, context, grants).await?;
        if init_ran {
            report.sql_init = inputs
                .sql_init
                .as_ref()
                .map(|i| i.file.display().to_string());
        }
        report.notes.extend(init_note);
        return Ok(report);
    }
    let envelope = envelope::parse(&inputs.message, &MessageFields::default())
        .map_err(|e| usage(format!("not a message: {}", e.reason)))?;
    let mut metadata = envelope.metadata.clone();
    metadata.extend(inputs.meta.clone());
    let message = Arc::new(MessageContext {
        id: envelope.id.clone(),
        kind: envelope.kind.clone(),
        data_location: inputs.data_location.clone(),
        meta_location: envelope.meta_location.clone(),
        metadata,
        headers: Vec::new(),
        body: Bytes::from(inputs.message.clone()),
    });

    let mut report = Report::new(path, &inputs.name, &component.sha256, &message, grants);
    report.message.data_bytes = inputs.data.as_ref().map(|d| d.len() as u64);
    if init_ran {
        report.sql_init = inputs
            .sql_init
            .as_ref()
            .map(|i| i.file.display().to_string());
    }
    report.notes.extend(init_note);
    if envelope.data_location.is_none()
        && let Some(location) = &inputs.data_location
    {
        report.notes.push(format!(
            "the message has no data_location: the data is served at `{location}`"
        ));
    }
    if envelope.meta_location.is_some() && inputs.meta.is_empty() {
        report.notes.push(
            "the message's meta_location is not read by exec: give its metadata with --meta-file or --meta".into(),
        );
    }

    // describe(), as `run` does when it loads a plugin.
    let (described, _, _) = sandbox
        .describe(&component, &limits, HostState::new(context.clone(), None))
        .await;
    let description = match described {
        Ok(d) => d,
        Err(failure) => {
            report.fail_describe(&failure);
            return Ok(report);
        }
    };
    report.plugin.version = description.version.clone();
    if !description
        .mime_types
        .iter()
        .any(|m| routing::mime_matches(m, &message.kind))
    {
        report.notes.push(format!(
            "describe() does not list `{}` (it lists {}): `run` routes this message to the plugin only if its grant's `mime` does",
            message.kind,
            crate::config::list_or_none(&description.mime_types)
        ));
    }

    let wit_message = Message {
        id: message.id.clone(),
        kind: message.kind.clone(),
        data_location: message.data_location.clone(),
        meta_location: message.meta_location.clone(),
        headers: message.headers.clone(),
        body: message.body.to_vec(),
        attempt: 1,
    };
    let mut host = HostState::new(context, Some(message));
    host.journal = Some(Vec::new());
    let (result, host, cost) = sandbox
        .execute(&component, &limits, host, wit_message)
        .await;
    report.finish(result, &host, &cost);
    if let Some(tx) = host.effects.sql {
        tx.rollback().await;
    }
    Ok(report)
}

/// `sandpipe exec`.
pub async fn exec(args: ExecArgs) -> ExitCode {
    let inputs = match Inputs::from_args(&args) {
        Ok(i) => i,
        Err(e) => return error_exit(&e),
    };
    use crate::capability::http::{HttpClient, Tape};
    let tape = if args.record.is_some() {
        Tape::record()
    } else {
        Tape::Live
    };
    let http = Arc::new(HttpClient::with_tape(&crate::tls::Tls::default(), tape));
    let report = match run(
        &args.plugin,
        &inputs,
        args.cache_dir.as_deref(),
        http.clone(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return error_exit(&e),
    };
    if let Some(dir) = &args.record {
        let mut inputs = inputs;
        inputs.http = http.recorded();
        if let Err(e) = record::save(dir, &inputs, &report) {
            return error_exit(&e);
        }
    }
    let mut out = std::io::stdout().lock();
    let printed = if args.json {
        report::print_json(&mut out, &report)
    } else {
        report::print(&mut out, &report).and_then(|()| match &args.record {
            Some(dir) => {
                use std::io::Write as _;
                writeln!(out, "\nrecorded in {}", dir.display())
            }
            None => Ok(()),
        })
    };
    if let Err(e) = printed
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot print the report: {e}");
    }
    ExitCode::from(report.exit_code)
}

/// `sandpipe replay`.
pub async fn replay(args: ReplayArgs) -> ExitCode {
    let recording = match record::load(&args.dir) {
        Ok(r) => r,
        Err(e) => return error_exit(&e),
    };
    let http = Arc::new(crate::capability::http::HttpClient::with_tape(
        &crate::tls::Tls::default(),
        crate::capability::http::Tape::replay(recording.inputs.http.clone()),
    ));
    let report = match run(
        &args.plugin,
        &recording.inputs,
        args.cache_dir.as_deref(),
        http,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return error_exit(&e),
    };
    let comparison = record::compare(&recording.report, &report);
    let mut out = std::io::stdout().lock();
    let printed = if args.json {
        record::print_json(&mut out, &comparison, &recording.report, &report)
    } else {
        record::print(&mut out, &comparison, &recording.report, &report)
    };
    if let Err(e) = printed
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot print the comparison: {e}");
    }
    ExitCode::from(if comparison.is_same() {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_grant_is_what_the_component_imports() -> anyhow::Result<()> {
        let imports = [
            "wasi:cli/environment@0.2.0".to_owned(),
            "sandpipe:connector/log@0.1.0".to_owned(),
            "sandpipe:connector/sql@0.1.0".to_owned(),
            "sandpipe:connector/emit@0.1.0".to_owned(),
        ];
        let (grant, tokens) = resolve_grant(None, &imports)?;
        assert_eq!(tokens, vec!["sql", "emit"]);
        assert!(grant.sql.is_some() && grant.emit_any);
        assert!(grant.blob.is_none() && grant.meta.is_none());
        Ok(())
    }

    #[test]
    fn grant_narrows_and_names_outputs() -> anyhow::Result<()> {
        let list = ["blob".to_owned(), "emit:stats".to_owned()];
        let (grant, tokens) = resolve_grant(Some(&list), &[])?;
        assert_eq!(tokens, vec!["blob", "emit:stats"]);
        assert!(grant.sql.is_none() && !grant.emit_any);
        assert_eq!(grant.emit, vec!["stats"]);
        let (grant, tokens) = resolve_grant(Some(&["none".to_owned()]), &[])?;
        assert!(tokens.is_empty() && grant.blob.is_none());
        let bad = resolve_grant(Some(&["disk".to_owned()]), &[]);
        assert!(bad.is_err_and(|e| e.is::<UsageError>()));
        Ok(())
    }

    #[test]
    fn key_values_are_json_when_they_parse() -> anyhow::Result<()> {
        assert_eq!(key_value("n=5", "--meta")?, ("n".into(), Json::from(5)));
        assert_eq!(
            key_value("s=a=b", "--meta")?,
            ("s".into(), Json::from("a=b"))
        );
        assert!(key_value("novalue", "--meta").is_err());
        Ok(())
    }
}
