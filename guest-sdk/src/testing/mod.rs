//! Unit-test a plugin natively, with `cargo test`, against in-memory fakes
//! of every capability. Host builds only (not compiled for `wasm32`).
//!
//! On `wasm32` the capability functions ([`log`](crate::log),
//! [`config`](crate::config), [`blob`](crate::blob), [`meta`](crate::meta),
//! [`sql`](crate::sql), [`emit`](crate::emit)) call the engine. On the host
//! they call the [`FakeHost`] that [`run`] installs for the current thread
//! while it calls your [`Plugin::execute`]; outside [`run`] they panic with
//! "no sandpipe_sdk::testing host is installed; use
//! sandpipe_sdk::testing::run".
//!
//! The fake host holds:
//!
//! | capability | fake |
//! |---|---|
//! | `log` | captured lines ([`Report::logs`]; also printed to stderr, which the test harness shows for a failing test) |
//! | `config` | [`FakeHost::config`] values |
//! | `blob` | the message's data object ([`FakeHost::data`], at the message's `data_location`), other objects ([`FakeHost::blob`]); writes are captured ([`Report::blob_writes`]) |
//! | `meta` | the message's metadata ([`FakeHost::meta`]), plugin state ([`FakeHost::state`]); changes are captured ([`Report::state_changes`]) |
//! | `sql` | an in-memory SQLite database ([`FakeHost::sql_init`] runs the plugin's init script as the engine does, [`FakeHost::sql`] sets it up from outside, [`Report::query`] inspects it); statements are captured ([`Report::sql`]) |
//! | `emit` | captured messages ([`Report::emits`]); [`FakeHost::outputs`] declares the outputs |
//! | `http` | canned responses ([`FakeHost::http`]); requests are captured ([`Report::http_requests`]) |
//!
//! It behaves like the engine where a test can notice: `$1, $2, ...`
//! parameters and the SQL value mapping are the engine's (the same SQLite),
//! the SQL runs in one transaction that is committed only when the outcome
//! is [`Outcome::Done`] (and plugin SQL may not `BEGIN`, `COMMIT`,
//! `ATTACH`, ...); state changes and blob writes are applied only then;
//! a state read sees the invocation's own pending changes; config and
//! metadata values are strings as they are and other JSON values as JSON
//! text; locations are checked by the engine's rules; a missing grant
//! ([`FakeHost::grant`]) or an undeclared output is
//! [`Error::AccessDenied`] with the engine's text. Everything is granted
//! unless [`FakeHost::grant`] narrows it, as with `sandpipe exec`.
//!
//! What it does not do: fuel, memory, deadlines and the per-invocation
//! quotas (log volume, emits, rows, bytes, host calls) are the sandbox's;
//! check those by running the component (see [`Scenario`] and
//! `sandpipe exec`). A panic in the plugin is not caught: it fails the test
//! (in the engine it fails the message).
//!
//! # Example
//!
//! A plugin and its test. [`run`] takes the message and the host, and
//! returns a [`Report`]: the outcome and everything the plugin did.
//!
//! ```
//! use sandpipe_sdk::prelude::*;
//! use sandpipe_sdk::testing::{self, FakeHost};
//!
//! /// The plugin's table: its `init.sql`, which the operator names in the
//! /// grant (`sql: { init: init.sql }`) and the engine runs at start. In a
//! /// plugin crate: `include_str!("../init.sql")`.
//! const INIT_SQL: &str = "CREATE TABLE IF NOT EXISTS loud (id TEXT PRIMARY KEY, text TEXT);";
//!
//! struct Shout;
//!
//! impl Plugin for Shout {
//!     fn describe() -> Description {
//!         Description {
//!             name: "shout".into(),
//!             version: "0.1.0".into(),
//!             mime_types: vec!["text/plain".into()],
//!             capabilities: vec![Capability::Blob, Capability::Sql, Capability::Emit],
//!         }
//!     }
//!
//!     fn execute(msg: Message) -> Result<Outcome, Error> {
//!         let text = String::from_utf8(blob::open_data()?.read_all()?)?;
//!         let loud = text.trim().to_uppercase();
//!         sql::execute(
//!             "INSERT INTO loud VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET text = excluded.text",
//!             &params![msg.id.as_str(), loud.as_str()],
//!         )?;
//!         let output = config::get_or("output", "loud")?;
//!         emit::publish_json(&output, &json!({ "id": msg.id, "text": loud }))?;
//!         sandpipe_sdk::info!("{} shouted", msg.id);
//!         Ok(Outcome::Done)
//!     }
//! }
//!
//! // In the plugin crate: #[cfg(test)] mod tests { ... #[test] fn shouts() { ... } }
//! let message = Message {
//!     data_location: Some("in/hello.txt".into()),
//!     ..testing::message("m-1", "text/plain")
//! };
//! let host = FakeHost::new()
//!     .sql_init(INIT_SQL)                        // as the engine does at start
//!     .data("hello\n")
//!     .config("output", "shouts")
//!     .outputs(["shouts"]);
//! let report = testing::run::<Shout>(message, host);
//!
//! report.assert_done();
//! // The rows written (committed: the outcome is done).
//! let rows = report.query("SELECT id, text FROM loud", &[])?;
//! assert_eq!(rows.len(), 1);
//! assert_eq!(rows.first().and_then(|r| r.get_str("text")), Some("HELLO"));
//! // The SQL statements, with their parameters.
//! assert_eq!(report.sql.len(), 1);
//! assert_eq!(report.sql[0].params, params!["m-1", "HELLO"]);
//! // The emitted message.
//! assert_eq!(report.emits.len(), 1);
//! assert_eq!(report.emits[0].output, "shouts");
//! assert_eq!(report.emits[0].json()?, json!({ "id": "m-1", "text": "HELLO" }));
//! assert_eq!(report.emits[0].header("content-type"), Some("application/json"));
//! // The log.
//! assert!(report.logged("m-1 shouted"));
//!
//! // A second message against the same database and state: the report
//! // hands the host back.
//! let again = testing::run::<Shout>(
//!     Message { data_location: Some("in/hello.txt".into()), ..testing::message("m-1", "text/plain") },
//!     report.into_host().data("hello again"),
//! );
//! again.assert_done();
//! let rows = again.query("SELECT text FROM loud WHERE id = $1", &params!["m-1"])?;
//! assert_eq!(rows.first().and_then(|r| r.get_str("text")), Some("HELLO AGAIN"));
//!
//! // Failures: a missing grant is access-denied, and nothing is committed.
//! let denied = testing::run::<Shout>(
//!     Message { data_location: Some("in/x.txt".into()), ..testing::message("m-2", "text/plain") },
//!     FakeHost::new().sql_init(INIT_SQL).data("x").grant(&[Capability::Blob, Capability::Sql]),
//! );
//! assert!(matches!(denied.outcome, Err(Error::AccessDenied(_))));
//! assert!(denied.query("SELECT id FROM loud", &[])?.is_empty());
//! # Ok::<(), sandpipe_sdk::Error>(())
//! ```
//!
//! # The same test in the sandbox
//!
//! A [`Scenario`] is a message with its data object, metadata, config and
//! the plugin's SQL init script: exactly what `sandpipe exec` takes. Run it natively with
//! [`Scenario::run`], and write it to a folder with
//! [`Scenario::write_to`] to run the built component on the same inputs in
//! the real sandbox:
//!
//! ```console
//! $ tests/scenarios/hello/exec.sh target/wasm32-wasip2/release/my_plugin.wasm
//! $ # or: sandpipe exec my_plugin.wasm --message tests/scenarios/hello/message.json \
//! $ #       --data tests/scenarios/hello/data --meta-file tests/scenarios/hello/meta.json --config ...
//! ```
//!
//! `sandpipe exec --json` prints the outcome, the logs, the SQL statements
//! with their parameters and the emits: compare them with what the native
//! test asserts. See [`Scenario`] for an example.

mod database;
pub(crate) mod fake;
mod scenario;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::bindings::sandpipe::connector::log::Level;
use crate::sql::{Rows, Value};
use crate::{Capability, Description, Error, Message, Outcome, Plugin};
use database::Database;
use fake::{Effects, Session};
pub use scenario::Scenario;

/// The `rusqlite` crate the fake database uses, for [`Report::db`] and
/// [`FakeHost::db`].
pub use rusqlite;

/// A message with this id and MIME type, no data or metadata location, no
/// headers, an empty body, attempt 1. Fill in the rest with struct update
/// syntax: `Message { data_location: Some("a.txt".into()), ..message("m-1", "text/plain") }`.
pub fn message(id: &str, kind: &str) -> Message {
    Message {
        id: id.to_owned(),
        kind: kind.to_owned(),
        data_location: None,
        meta_location: None,
        headers: Vec::new(),
        body: Vec::new(),
        attempt: 1,
    }
}

/// The fake host a plugin runs against in [`run`]: configuration, the
/// message's data object and metadata, plugin state, other objects, a SQL
/// database, outputs, grants. Build it with the chained methods; every
/// capability is granted and every output accepted unless narrowed.
///
/// ```
/// use sandpipe_sdk::prelude::*;
/// use sandpipe_sdk::testing::FakeHost;
///
/// let host = FakeHost::new()
///     .config("output", "stats")
///     .config("limit", 10)                       // config::get gives "10"
///     .data(&b"line one\nline two\n"[..])        // the message's data object
///     .meta("source", "camera-7")                // meta::get("source")
///     .meta("tags", json!(["a", "b"]))           // meta::get gives "[\"a\",\"b\"]"
///     .state("seen", "41")                       // meta::state_get
///     .blob("lookup/codes.csv", "a,1\nb,2\n")    // blob::open("lookup/codes.csv")
///     .sql("CREATE TABLE codes (code TEXT, n INTEGER); INSERT INTO codes VALUES ('a', 1)")
///     .outputs(["stats"])                        // emit to any other output is denied
///     .fail(Capability::Emit, Error::unavailable("broker down"));
/// let count: i64 = host.db().query_row("SELECT count(*) FROM codes", [], |r| r.get(0))?;
/// assert_eq!(count, 1);
/// # Ok::<(), sandpipe_sdk::testing::rusqlite::Error>(())
/// ```
pub struct FakeHost {
    config: BTreeMap<String, serde_json::Value>,
    data: Option<Arc<[u8]>>,
    meta: serde_json::Map<String, serde_json::Value>,
    state: BTreeMap<String, Vec<u8>>,
    blobs: BTreeMap<String, Arc<[u8]>>,
    db: Database,
    grants: Option<Vec<Capability>>,
    outputs: Option<Vec<String>>,
    failures: Vec<(Capability, Error)>,
    http: Vec<CannedResponse>,
}

/// A response [`FakeHost::http`] serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannedResponse {
    /// The request's method.
    pub method: String,
    /// The request's URL, exactly.
    pub url: String,
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeHost")
            .field("config", &self.config)
            .field("data", &self.data.as_ref().map(|d| d.len()))
            .field("meta", &self.meta)
            .field("state", &self.state.keys().collect::<Vec<_>>())
            .field("blobs", &self.blobs.keys().collect::<Vec<_>>())
            .field("grants", &self.grants)
            .field("outputs", &self.outputs)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl FakeHost {
    /// A host with nothing configured, an empty database, everything
    /// granted and any output accepted.
    ///
    /// Panics if SQLite cannot open an in-memory database.
    #[allow(clippy::panic)]
    pub fn new() -> Self {
        let db = match Database::open() {
            Ok(db) => db,
            Err(e) => {
                panic!("sandpipe_sdk::testing: cannot open an in-memory SQLite database: {e}")
            }
        };
        Self {
            config: BTreeMap::new(),
            data: None,
            meta: serde_json::Map::new(),
            state: BTreeMap::new(),
            blobs: BTreeMap::new(),
            db,
            grants: None,
            outputs: None,
            failures: Vec::new(),
            http: Vec::new(),
        }
    }

    /// Answer `method url` (the URL exactly as the plugin writes it) with
    /// `status` and `body`. A request nothing answers fails as the engine
    /// fails a destination outside the `http.allow` list
    /// ([`Error::AccessDenied`]). Requests are recorded
    /// ([`Report::http_requests`]).
    #[must_use]
    pub fn http(mut self, method: &str, url: &str, status: u16, body: impl Into<Vec<u8>>) -> Self {
        self.http.push(CannedResponse {
            method: method.to_ascii_uppercase(),
            url: url.to_owned(),
            status,
            headers: Vec::new(),
            body: body.into(),
        });
        self
    }

    /// Serve `response` (with headers of its own).
    #[must_use]
    pub fn http_response(mut self, response: CannedResponse) -> Self {
        self.http.push(response);
        self
    }

    /// A `config` value. Strings are returned as they are, other JSON
    /// values as JSON text (`10` → `"10"`), as the engine does.
    #[must_use]
    pub fn config(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.config.insert(key.to_owned(), value.into());
        self
    }

    /// The message's data object: what [`blob::open_data`](crate::blob::open_data)
    /// (and [`blob::open`](crate::blob::open) of the message's
    /// `data_location`) reads. The message needs a `data_location`, as in
    /// the engine.
    #[must_use]
    pub fn data(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.data = Some(Arc::from(bytes.into()));
        self
    }

    /// One metadata value of the message (what [`meta::get`](crate::meta::get)
    /// and [`meta::all`](crate::meta::all) see).
    #[must_use]
    pub fn meta(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.meta.insert(key.to_owned(), value.into());
        self
    }

    /// Every key of a JSON object as metadata (merged over what is set).
    ///
    /// Panics if `object` is not a JSON object.
    #[must_use]
    #[allow(clippy::panic)]
    pub fn meta_json(mut self, object: serde_json::Value) -> Self {
        match object {
            serde_json::Value::Object(map) => self.meta.extend(map),
            other => panic!("FakeHost::meta_json: metadata must be a JSON object, not {other}"),
        }
        self
    }

    /// A key of the plugin's state, as left by earlier messages.
    #[must_use]
    pub fn state(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.state.insert(key.to_owned(), value.into());
        self
    }

    /// An object other than the message's data, for
    /// [`blob::open`](crate::blob::open).
    #[must_use]
    pub fn blob(mut self, location: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.blobs
            .insert(location.to_owned(), Arc::from(bytes.into()));
        self
    }

    /// Run SQL on the database now, to set it up (tables, rows from earlier
    /// messages). Any statements, `;`-separated; no parameters (use
    /// [`FakeHost::db`] for those). Not checked by the plugin policy: for
    /// the plugin's own init script use [`FakeHost::sql_init`], which runs
    /// it as the engine does.
    ///
    /// Panics if the SQL fails.
    #[must_use]
    #[allow(clippy::panic)]
    pub fn sql(self, batch: &str) -> Self {
        if let Err(e) = self.db.conn().execute_batch(batch) {
            panic!("FakeHost::sql: the setup SQL failed: {e}\n{batch}");
        }
        self
    }

    /// Run the plugin's init script (what the operator names in
    /// `plugins.grants.NAME.sql.init`, e.g. the `init.sql` the plugin
    /// ships) as the engine does at every start, before any message: all
    /// of it in one transaction, under the same policy as the plugin's own
    /// statements (no `ATTACH`, no transaction control, no writing
    /// pragmas). Unlike [`FakeHost::sql`], which sets the database up from
    /// outside, it fails where the engine would refuse to start. Write the
    /// script idempotently (`CREATE TABLE IF NOT EXISTS`): the engine runs
    /// it at every start.
    ///
    /// ```
    /// use sandpipe_sdk::testing::FakeHost;
    ///
    /// const INIT_SQL: &str = "CREATE TABLE IF NOT EXISTS words (message_id TEXT PRIMARY KEY, words BIGINT NOT NULL);";
    /// // In a plugin crate: const INIT_SQL: &str = include_str!("../init.sql");
    /// let host = FakeHost::new().sql_init(INIT_SQL).sql_init(INIT_SQL); // idempotent
    /// let n: i64 = host.db().query_row("SELECT count(*) FROM words", [], |r| r.get(0))?;
    /// assert_eq!(n, 0);
    /// # Ok::<(), sandpipe_sdk::testing::rusqlite::Error>(())
    /// ```
    ///
    /// Panics, with SQLite's message and the script, if it fails.
    #[must_use]
    #[allow(clippy::panic)]
    pub fn sql_init(self, script: &str) -> Self {
        if let Err(e) = self.db.init(script) {
            panic!(
                "FakeHost::sql_init: the init script failed (the engine would refuse to start): {e}\n{script}"
            );
        }
        self
    }

    /// The database's connection, to set it up or inspect it (outside the
    /// plugin's transaction and not locked down).
    pub fn db(&self) -> &rusqlite::Connection {
        self.db.conn()
    }

    /// Declare the outputs: emitting to any other is
    /// [`Error::AccessDenied`]. By default any output is accepted.
    #[must_use]
    pub fn outputs<I, S>(mut self, outputs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.outputs = Some(outputs.into_iter().map(Into::into).collect());
        self
    }

    /// Grant only these capabilities (`log` and `config` are always
    /// granted): a call to any other is [`Error::AccessDenied`], with the
    /// engine's text. By default everything is granted.
    #[must_use]
    pub fn grant(mut self, capabilities: &[Capability]) -> Self {
        self.grants = Some(capabilities.to_vec());
        self
    }

    /// Make every call to `capability` fail with `error` (after the grant
    /// check): a database that is down, a broker that refuses, a quota
    /// that is exceeded.
    #[must_use]
    pub fn fail(mut self, capability: Capability, error: Error) -> Self {
        self.failures.retain(|(c, _)| *c != capability);
        self.failures.push((capability, error));
        self
    }
}

/// One captured log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// `sql::query`, `sql::execute` or `sql::execute_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFunction {
    /// [`sql::query`](crate::sql::query).
    Query,
    /// [`sql::execute`](crate::sql::execute).
    Execute,
    /// [`sql::execute_batch`](crate::sql::execute_batch).
    ExecuteBatch,
}

impl SqlFunction {
    /// The WIT function's name (`query`, `execute`, `execute-batch`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Execute => "execute",
            Self::ExecuteBatch => "execute-batch",
        }
    }
}

/// What a SQL statement answered.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlAnswer {
    /// `execute`: the number of rows changed.
    Changed(u64),
    /// `query`: the rows.
    Rows(Rows),
}

/// One SQL statement the plugin ran, with its parameters and its result.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlCall {
    /// `query` or `execute`.
    pub function: SqlFunction,
    /// The statement.
    pub statement: String,
    /// Its parameters, `$1` first (empty for `execute-batch`).
    pub params: Vec<Value>,
    /// For `execute-batch`: every parameter list, in order.
    pub batch: Vec<Vec<Value>>,
    /// What it answered.
    pub result: Result<SqlAnswer, Error>,
}

impl SqlCall {
    /// For an `execute` that succeeded: the number of rows changed.
    pub fn changed(&self) -> Option<u64> {
        match self.result {
            Ok(SqlAnswer::Changed(n)) => Some(n),
            _ => None,
        }
    }
}

/// One captured emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// The output's name.
    pub output: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The headers.
    pub headers: Vec<(String, String)>,
}

impl Emit {
    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// The payload as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The first header named `name` (ASCII case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One captured [`blob::put`](crate::blob::put).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobWrite {
    /// Where.
    pub location: String,
    /// What.
    pub bytes: Vec<u8>,
}

/// One captured state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// [`meta::state_set`](crate::meta::state_set).
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// [`meta::state_delete`](crate::meta::state_delete).
    Delete {
        /// The key.
        key: String,
    },
}

/// What one [`run`] found out: the outcome and everything the plugin did,
/// and the host afterwards (its database, state and objects, with the
/// plugin's changes applied only if the outcome is [`Outcome::Done`]).
///
/// The captured effects (`sql`, `emits`, `blob_writes`, `state_changes`)
/// list what the plugin asked for, whatever the outcome; in the engine they
/// take effect only for `done`.
pub struct Report {
    /// The plugin's [`Plugin::describe`].
    pub plugin: Description,
    /// What [`Plugin::execute`] returned; an `Err` too if committing the
    /// SQL transaction failed.
    pub outcome: Result<Outcome, Error>,
    /// Log lines, in order.
    pub logs: Vec<LogLine>,
    /// SQL statements, in order, with their results.
    pub sql: Vec<SqlCall>,
    /// Emitted messages, in order.
    pub emits: Vec<Emit>,
    /// Objects written, in order.
    pub blob_writes: Vec<BlobWrite>,
    /// State changes, in order.
    pub state_changes: Vec<StateChange>,
    /// Every host call, in order, as `interface.function` (`blob.open-data`,
    /// `blob.reader.read`, `sql.execute`, ...), denied and failed ones
    /// included.
    pub calls: Vec<String>,
    /// Denied calls' texts.
    pub denials: Vec<String>,
    /// HTTP requests sent, in order, answered or not.
    pub http_requests: Vec<crate::http::Request>,
    host: FakeHost,
}

impl Report {
    /// Whether the outcome is [`Outcome::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self.outcome, Ok(Outcome::Done))
    }

    /// Panic, showing the whole report, unless the outcome is
    /// [`Outcome::Done`].
    #[allow(clippy::panic)]
    #[track_caller]
    pub fn assert_done(&self) -> &Self {
        if !self.is_done() {
            panic!("the plugin's outcome is not done\n{self}");
        }
        self
    }

    /// Whether a log line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs.iter().any(|l| l.message.contains(text))
    }

    /// The messages emitted to `output`.
    pub fn emits_to<'a>(&'a self, output: &'a str) -> impl Iterator<Item = &'a Emit> + 'a {
        self.emits.iter().filter(move |e| e.output == output)
    }

    /// Run a query on the database after the run (committed if the outcome
    /// is done, else rolled back), e.g. to check the rows written.
    pub fn query(&self, statement: &str, params: &[Value]) -> Result<Rows, Error> {
        match database::run(self.host.db.conn(), statement, params, true)? {
            SqlAnswer::Rows(rows) => Ok(rows),
            SqlAnswer::Changed(_) => Ok(Rows {
                columns: Vec::new(),
                values: Vec::new(),
            }),
        }
    }

    /// The database after the run.
    pub fn db(&self) -> &rusqlite::Connection {
        self.host.db.conn()
    }

    /// A state key after the run.
    pub fn state(&self, key: &str) -> Option<&[u8]> {
        self.host.state.get(key).map(Vec::as_slice)
    }

    /// An object (other than the message's data) after the run.
    pub fn blob(&self, location: &str) -> Option<&[u8]> {
        self.host.blobs.get(location).map(|b| &b[..])
    }

    /// The host after the run, to run the next message against the same
    /// database, state and objects. Its data object is still this
    /// message's: replace it with [`FakeHost::data`].
    pub fn into_host(self) -> FakeHost {
        self.host
    }
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("plugin", &self.plugin.name)
            .field("outcome", &self.outcome)
            .field("logs", &self.logs)
            .field("sql", &self.sql)
            .field("emits", &self.emits)
            .field("blob_writes", &self.blob_writes)
            .field("state_changes", &self.state_changes)
            .field("calls", &self.calls)
            .field("denials", &self.denials)
            .finish_non_exhaustive()
    }
}

/// The report for people, like `sandpipe exec` prints it.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match &self.outcome {
            Ok(Outcome::Done) => "done".to_owned(),
            Ok(Outcome::Skip(why)) => format!("skip: {why}"),
            Ok(Outcome::Retry(r)) => format!("retry: after {} ms: {}", r.delay_ms, r.reason),
            Ok(Outcome::DeadLetter(why)) => format!("dead-letter: {why}"),
            Err(e) => format!("failed: {e}"),
        };
        writeln!(f, "plugin    {} {}", self.plugin.name, self.plugin.version)?;
        writeln!(f, "outcome   {outcome}")?;
        writeln!(f, "logs ({})", self.logs.len())?;
        for l in &self.logs {
            writeln!(f, "  {:<5} {}", level_name(l.level), l.message)?;
        }
        writeln!(f, "sql ({})", self.sql.len())?;
        for (i, c) in self.sql.iter().enumerate() {
            writeln!(f, "  {}. {} {}", i + 1, c.function.name(), c.statement)?;
            if !c.batch.is_empty() {
                writeln!(f, "       batch of {} parameter lists", c.batch.len())?;
            }
            if !c.params.is_empty() {
                let params: Vec<String> = c
                    .params
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("${} = {v:?}", i + 1))
                    .collect();
                writeln!(f, "       params {}", params.join(", "))?;
            }
            match &c.result {
                Ok(SqlAnswer::Changed(n)) => writeln!(f, "       → {n} rows changed")?,
                Ok(SqlAnswer::Rows(r)) => writeln!(f, "       → {} rows", r.len())?,
                Err(e) => writeln!(f, "       → error: {e}")?,
            }
        }
        writeln!(f, "emits ({})", self.emits.len())?;
        for (i, e) in self.emits.iter().enumerate() {
            let payload = e
                .text()
                .map_or_else(|| format!("<{} bytes>", e.payload.len()), str::to_owned);
            writeln!(f, "  {}. → {} {payload}", i + 1, e.output)?;
        }
        for w in &self.blob_writes {
            writeln!(f, "blob write {} ({} bytes)", w.location, w.bytes.len())?;
        }
        for s in &self.state_changes {
            match s {
                StateChange::Set { key, value } => {
                    writeln!(f, "state set {key} ({} bytes)", value.len())?;
                }
                StateChange::Delete { key } => writeln!(f, "state delete {key}")?,
            }
        }
        for d in &self.denials {
            writeln!(f, "denied    {d}")?;
        }
        write!(f, "calls     {}", self.calls.join(", "))
    }
}

/// A log level's name, as the engine prints it.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

/// Puts the previous session back even if the plugin panics.
struct Installed {
    previous: Option<Option<Session>>,
}

impl Installed {
    fn finish(mut self) -> Option<Session> {
        let previous = self.previous.take().flatten();
        fake::uninstall(previous)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            fake::uninstall(previous);
        }
    }
}

/// Run `P::execute` on `message` with `host` installed as the capabilities
/// of the current thread, and report what happened. See the
/// [module documentation](self) for an example.
///
/// The SQL statements run in one transaction, committed if the outcome is
/// [`Outcome::Done`] and rolled back otherwise; state changes and blob
/// writes are applied to the host only for `done`, too.
///
/// Panics if the plugin panics, or if the host's database cannot begin a
/// transaction (one left open through [`FakeHost::db`]).
#[allow(clippy::panic)]
pub fn run<P: Plugin>(message: Message, host: FakeHost) -> Report {
    if let Err(e) = host.db.begin() {
        panic!("sandpipe_sdk::testing::run: cannot begin the plugin's transaction: {e}");
    }
    let session = Session {
        host,
        message: message.clone(),
        plugin: String::new(),
        effects: Effects::default(),
    };
    let installed = Installed {
        previous: Some(fake::install(session)),
    };
    let description = P::describe();
    fake::set_plugin(&description.name);
    let outcome = P::execute(message);
    let Some(session) = installed.finish() else {
        panic!("sandpipe_sdk::testing::run: the fake host disappeared while the plugin ran");
    };
    finish(description, outcome, session)
}

fn finish(plugin: Description, outcome: Result<Outcome, Error>, session: Session) -> Report {
    let Session {
        mut host, effects, ..
    } = session;
    let done = matches!(outcome, Ok(Outcome::Done));
    let outcome = match host.db.end(done) {
        Ok(()) => outcome,
        Err(e) => Err(Error::internal(format!(
            "cannot commit the plugin's SQL transaction: {e}"
        ))),
    };
    if matches!(outcome, Ok(Outcome::Done)) {
        for change in &effects.state_changes {
            match change {
                StateChange::Set { key, value } => {
                    host.state.insert(key.clone(), value.clone());
                }
                StateChange::Delete { key } => {
                    host.state.remove(key);
                }
            }
        }
        for write in &effects.blob_writes {
            host.blobs
                .insert(write.location.clone(), Arc::from(write.bytes.clone()));
        }
    }
    Report {
        plugin,
        outcome,
        logs: effects.logs,
        sql: effects.sql,
        emits: effects.emits,
        blob_writes: effects.blob_writes,
        state_changes: effects.state_changes,
        calls: effects.calls,
        denials: effects.denials,
        http_requests: effects.http_requests,
        host,
    }
}

#[cfg(test)]
mod tests;
