//! `sources:` — source connectors and how their sync jobs run
//! (docs/sources.md). A source's component is a `source`-world `.wasm` in
//! `plugins.dir`; what it may reach (`http`, `sql`, `config`, limits) is its
//! grant under `plugins.grants`, as for any component. This section says
//! how the engine syncs it: page size, batches, the sink, the error
//! monitor.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// One source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The component, by name (`plugins.dir/NAME.wasm`, a `source`-world
    /// component). Default: the source's own name.
    #[serde(default)]
    pub component: Option<String>,
    /// Where the documents go. Default: a table named after the source in
    /// the engine's `database` (PostgreSQL: schema `sandpipe_sources`;
    /// SQLite: the file `state/sources.sqlite` beside the status log's
    /// folder).
    #[serde(default)]
    pub sink: Option<SinkConfig>,
    /// Documents asked for per `get-docs` call. Default 100.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Writes to the sink, grouped.
    #[serde(default)]
    pub batch: BatchConfig,
    /// A document whose JSON body is longer is dropped and counted.
    /// Default 3MiB (Elastic's `max_text_document_size`).
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: ByteSize,
    /// When document errors fail the job.
    #[serde(default)]
    pub errors: ErrorMonitorConfig,
    /// The longest a job may run; past it the job fails. Default 1h.
    #[serde(default = "default_job_timeout", with = "humantime_serde")]
    pub job_timeout: Duration,
    /// Sync rules: which documents go into the sink.
    #[serde(default)]
    pub rules: RulesConfig,
    /// When jobs run on their own (`sandpipe run`); none by default.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Outputs (declared under `outputs`) that get every change the sync
    /// makes as an event `{"op": "index"|"update"|"delete", "id", "doc"}`,
    /// published before the change is committed to the sink.
    #[serde(default)]
    pub outputs: Vec<String>,
}

/// `sources.NAME.schedule`: per job kind, an interval (`30m`) or a cron
/// expression with seconds (`0 0/5 * * * ?`, Quartz style, UTC).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Full syncs.
    pub full: Option<String>,
    /// Incremental syncs.
    pub incremental: Option<String>,
}

fn default_page_size() -> u32 {
    100
}
fn default_max_document_bytes() -> ByteSize {
    ByteSize::mib(3)
}
fn default_job_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// `sources.NAME.batch`: operations go to the sink in batches of at most
/// `operations` operations or `bytes` bytes of documents, whichever comes
/// first (Elastic's bulk defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Operations per batch. Default 500.
    pub operations: u32,
    /// Bytes of documents per batch. Default 3MiB.
    pub bytes: ByteSize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            operations: 500,
            bytes: ByteSize::mib(3),
        }
    }
}

/// `sources.NAME.errors`: a job fails when its document errors pass any of
/// these (Elastic's error monitor defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorMonitorConfig {
    /// Errors in the whole job. Default 1000.
    pub max_total: u64,
    /// Errors in a row. Default 10.
    pub max_consecutive: u64,
    /// The share of errors among the last `window` documents. Default 0.15.
    pub max_rate: f64,
    /// Documents the rate is taken over. Default 100.
    pub window: u32,
}

impl Default for ErrorMonitorConfig {
    fn default() -> Self {
        Self {
            max_total: 1000,
            max_consecutive: 10,
            max_rate: 0.15,
            window: 100,
        }
    }
}

/// `sources.NAME.sink`; `type` selects it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SinkConfig {
    /// A PostgreSQL table: `id` primary key, the document as `jsonb`, and
    /// a full-text search column with a GIN index.
    Postgres {
        /// `postgres://user[:password]@host[:port]/database`. Default: the
        /// engine's `database.url` (when it is PostgreSQL).
        #[serde(default)]
        url: Option<String>,
        /// The schema of the table (created if missing). Default
        /// `sandpipe_sources`.
        #[serde(default = "default_sink_schema")]
        schema: String,
        /// The table. Default: the source's name made an identifier.
        #[serde(default)]
        table: Option<String>,
    },
    /// A table in an SQLite file.
    Sqlite {
        /// The file (created if missing). Default `state/sources.sqlite`.
        #[serde(default = "default_sink_path")]
        path: PathBuf,
        /// The table. Default: the source's name made an identifier.
        #[serde(default)]
        table: Option<String>,
    },
}

/// The default schema of PostgreSQL sinks.
pub fn default_sink_schema() -> String {
    "sandpipe_sources".into()
}

/// The default file of SQLite sinks.
pub fn default_sink_path() -> PathBuf {
    PathBuf::from("state/sources.sqlite")
}

/// `sources.NAME.rules`: which documents go into the sink. The rules in
/// the file are the draft; a job checks them first and runs only with a
/// valid draft, which becomes the active rules (docs/sources.md, "Sync
/// rules").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Basic rules, applied by the engine to every document (Elastic's).
    #[serde(default)]
    pub basic: Vec<BasicRule>,
    /// Advanced rules: the source's own JSON, checked by its
    /// `validate-advanced-rules` and handed to every `get-docs`.
    #[serde(default)]
    pub advanced: Option<serde_json::Value>,
}

/// One basic rule, as Elastic's connectors define it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicRule {
    /// The rule's id (reported with its errors).
    pub id: String,
    /// `include` or `exclude`.
    pub policy: String,
    /// The document's field: a top-level key, else a dotted path.
    pub field: String,
    /// `equals`, `contains`, `starts_with`, `ends_with`, `regex`, `<` or `>`.
    pub rule: String,
    /// The value compared with the field's (a string; numbers and booleans
    /// are read as their text).
    pub value: serde_json::Value,
    /// Rules apply in this order; the first that matches decides.
    pub order: i64,
}
