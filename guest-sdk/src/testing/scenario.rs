//! [`Scenario`]: one message with its data, metadata and config, run
//! natively or written to a folder for `sandpipe exec`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::{FakeHost, Report, run};
use crate::{Error, Message, Plugin};

/// The message, as a sqAPI JSON envelope (`sandpipe exec --message`).
pub const MESSAGE_FILE: &str = "message.json";
/// The data object's bytes (`--data`).
pub const DATA_FILE: &str = "data";
/// The metadata, one JSON object (`--meta-file`).
pub const META_FILE: &str = "meta.json";
/// The config values, one JSON object (`--config KEY=VALUE` each).
pub const CONFIG_FILE: &str = "config.json";
/// The plugin's init script, run on its database before the message
/// (`--sql-init`); only when the scenario has one.
pub const SQL_INIT_FILE: &str = "init.sql";
/// A shell script that runs `sandpipe exec` on the folder.
pub const EXEC_SCRIPT: &str = "exec.sh";

/// One message with its data object, metadata, config and the plugin's
/// SQL init script: the inputs of both a native test ([`Scenario::run`]) and `sandpipe exec`
/// ([`Scenario::write_to`]), so the same case can be checked natively and
/// in the real sandbox.
///
/// A scenario holds only what `sandpipe exec` can take. For more (plugin
/// state, other objects, a database with rows, narrowed grants), extend
/// [`Scenario::host`] and call [`run`](super::run) yourself.
///
/// ```no_run
/// # use sandpipe_sdk::prelude::*;
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     fn describe() -> Description {
/// #         Description { name: "my-plugin".into(), version: "0.1.0".into(),
/// #             mime_types: vec!["text/plain".into()], capabilities: vec![] }
/// #     }
/// #     fn execute(_: Message) -> Result<Outcome, Error> { Ok(Outcome::Done) }
/// # }
/// use sandpipe_sdk::testing::Scenario;
///
/// fn hello() -> Scenario {
///     Scenario::new("m-1", "text/plain")
///         // the plugin's tables, as the engine sets them up at start
///         .sql_init("CREATE TABLE IF NOT EXISTS counts (id TEXT PRIMARY KEY, n BIGINT);")
///         // in a plugin crate: .sql_init(include_str!("../init.sql"))
///         .data("texts/hello.txt", "Hello, Sandpipe!\n")
///         .meta("source", "example")
///         .config("output", "stats")
/// }
///
/// #[test]
/// fn hello_natively() {
///     let report = hello().run::<MyPlugin>();
///     report.assert_done();
///     // ... assert on report.query(...), report.emits, report.logs
/// }
///
/// // Keep the folder in the repository, check that it is current, and run
/// // the built component on it in the real sandbox:
/// //   tests/scenarios/hello/exec.sh target/wasm32-wasip2/release/my_plugin.wasm --json
/// #[test]
/// fn hello_folder_is_current() -> std::io::Result<()> {
///     let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/hello");
///     if std::env::var_os("UPDATE_SCENARIOS").is_some() {
///         hello().write_to(&dir)?;
///     }
///     for (name, bytes) in hello().files() {
///         let kept = std::fs::read(dir.join(name)).unwrap_or_default();
///         assert!(kept == bytes, "{name} is stale: run UPDATE_SCENARIOS=1 cargo test");
///     }
///     Ok(())
/// }
/// ```
///
/// In Rust, the command is
/// `Command::new("sandpipe").arg("exec").arg(wasm).args(scenario.exec_args(dir)).arg("--json")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The message id (the envelope's `uuid_ref`).
    pub id: String,
    /// The MIME type (`data_type`).
    pub kind: String,
    /// Where the data object is (`data_location`).
    pub data_location: Option<String>,
    /// The data object.
    pub data: Option<Vec<u8>>,
    /// The metadata.
    pub meta: Map<String, Json>,
    /// The config values.
    pub config: BTreeMap<String, Json>,
    /// The plugin's SQL init script (`init.sql`), run on its database
    /// before the message, as the engine runs `plugins.grants.NAME.sql.init`
    /// at start.
    pub sql_init: Option<String>,
}

impl Scenario {
    /// A message with this id and MIME type; no data, metadata or config.
    pub fn new(id: &str, kind: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: kind.to_owned(),
            data_location: None,
            data: None,
            meta: Map::new(),
            config: BTreeMap::new(),
            sql_init: None,
        }
    }

    /// The plugin's SQL init script (e.g. `include_str!("../init.sql")`):
    /// [`Scenario::run`] runs it on the fake database first
    /// ([`FakeHost::sql_init`]), the folder keeps it as `init.sql`, and
    /// `exec.sh` hands it to `sandpipe exec --sql-init`.
    #[must_use]
    pub fn sql_init(mut self, script: impl Into<String>) -> Self {
        self.sql_init = Some(script.into());
        self
    }

    /// The data object and its location.
    #[must_use]
    pub fn data(mut self, location: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.data_location = Some(location.to_owned());
        self.data = Some(bytes.into());
        self
    }

    /// One metadata value.
    #[must_use]
    pub fn meta(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.meta.insert(key.to_owned(), value.into());
        self
    }

    /// Every key of a JSON object as metadata (merged over what is set),
    /// e.g. a metadata file parsed with `serde_json::from_slice`.
    ///
    /// Panics if `object` is not a JSON object.
    #[must_use]
    #[allow(clippy::panic)]
    pub fn meta_json(mut self, object: Json) -> Self {
        match object {
            Json::Object(map) => self.meta.extend(map),
            other => panic!("Scenario::meta_json: metadata must be a JSON object, not {other}"),
        }
        self
    }

    /// One config value (strings as they are, other JSON values as JSON
    /// text, as the engine does).
    #[must_use]
    pub fn config(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.config.insert(key.to_owned(), value.into());
        self
    }

    /// The message as a sqAPI JSON envelope: `message.json`, and the
    /// message's [`body`](Message::body).
    pub fn envelope(&self) -> Vec<u8> {
        let mut envelope = Map::new();
        envelope.insert("uuid_ref".into(), Json::from(self.id.as_str()));
        envelope.insert("data_type".into(), Json::from(self.kind.as_str()));
        if let Some(location) = &self.data_location {
            envelope.insert("data_location".into(), Json::from(location.as_str()));
        }
        let mut text = serde_json::to_vec_pretty(&Json::Object(envelope)).unwrap_or_default();
        text.push(b'\n');
        text
    }

    /// The message the engine would hand the plugin (attempt 1, no
    /// headers, the envelope as its body).
    pub fn message(&self) -> Message {
        Message {
            id: self.id.clone(),
            kind: self.kind.clone(),
            data_location: self.data_location.clone(),
            meta_location: None,
            headers: Vec::new(),
            body: self.envelope(),
            attempt: 1,
        }
    }

    /// A [`FakeHost`] with the data object, metadata and config, its
    /// database set up by the init script.
    ///
    /// Panics if the init script fails.
    pub fn host(&self) -> FakeHost {
        let mut host = FakeHost::new();
        if let Some(script) = &self.sql_init {
            host = host.sql_init(script);
        }
        if let Some(data) = &self.data {
            host = host.data(data.clone());
        }
        host.meta = self.meta.clone();
        host.config = self.config.clone();
        host
    }

    /// Run `P` natively on the scenario: [`run`](super::run) with
    /// [`Scenario::message`] and [`Scenario::host`].
    pub fn run<P: Plugin>(&self) -> Report {
        run::<P>(self.message(), self.host())
    }

    /// The files of the scenario's folder, name and content: `message.json`,
    /// `data` (if there is a data object), `meta.json`, `config.json`,
    /// `init.sql` (if there is an init script) and `exec.sh`. They depend only on the scenario, so a test can check
    /// that a folder kept in the repository is current.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![(MESSAGE_FILE, self.envelope())];
        if let Some(data) = &self.data {
            files.push((DATA_FILE, data.clone()));
        }
        files.push((META_FILE, pretty(&Json::Object(self.meta.clone()))));
        let config: Map<String, Json> = self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        files.push((CONFIG_FILE, pretty(&Json::Object(config))));
        if let Some(script) = &self.sql_init {
            files.push((SQL_INIT_FILE, script.clone().into_bytes()));
        }
        files.push((EXEC_SCRIPT, self.script().into_bytes()));
        files
    }

    /// Write [`Scenario::files`] to `dir` (created if needed; a stale
    /// `data` or `init.sql` file is removed). `exec.sh` runs `sandpipe exec` on them:
    /// `dir/exec.sh PLUGIN.wasm [more sandpipe exec options]` (`$SANDPIPE`
    /// names the `sandpipe` binary; default: the one on `PATH`).
    pub fn write_to(&self, dir: impl AsRef<Path>) -> io::Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        for (absent, file) in [
            (self.data.is_none(), DATA_FILE),
            (self.sql_init.is_none(), SQL_INIT_FILE),
        ] {
            if absent {
                match std::fs::remove_file(dir.join(file)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        for (name, bytes) in self.files() {
            std::fs::write(dir.join(name), bytes)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let script = dir.join(EXEC_SCRIPT);
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// The arguments of `sandpipe exec PLUGIN.wasm` for the scenario written
    /// in `dir`: `--message`, `--data`, `--meta-file`, `--sql-init` and one
    /// `--config` per value.
    pub fn exec_args(&self, dir: impl AsRef<Path>) -> Vec<OsString> {
        let dir = dir.as_ref();
        let mut args: Vec<OsString> = vec!["--message".into(), dir.join(MESSAGE_FILE).into()];
        if self.data.is_some() {
            args.push("--data".into());
            args.push(dir.join(DATA_FILE).into());
        }
        args.push("--meta-file".into());
        args.push(dir.join(META_FILE).into());
        if self.sql_init.is_some() {
            args.push("--sql-init".into());
            args.push(dir.join(SQL_INIT_FILE).into());
        }
        for (key, value) in &self.config {
            args.push("--config".into());
            args.push(config_arg(key, value).into());
        }
        args
    }

    /// Read a scenario written by [`Scenario::write_to`] (`exec.sh` is
    /// not read; `init.sql` is, when the folder has one). The envelope's inline `metadata`, if any, is merged under
    /// `meta.json`, as `sandpipe exec` does.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| Error::from(e).context(format!("{}", dir.join(name).display())))
        };
        let envelope: Json = serde_json::from_slice(&read(MESSAGE_FILE)?)?;
        let field = |key: &str| envelope.get(key).and_then(Json::as_str).map(str::to_owned);
        let (Some(id), Some(kind)) = (field("uuid_ref"), field("data_type")) else {
            return Err(Error::invalid(format!(
                "{}: needs the string fields uuid_ref and data_type",
                dir.join(MESSAGE_FILE).display()
            )));
        };
        let mut scenario = Self::new(&id, &kind);
        if let Some(location) = field("data_location") {
            scenario = scenario.data(&location, read(DATA_FILE)?);
        }
        if let Some(Json::Object(inline)) = envelope.get("metadata") {
            scenario.meta = inline.clone();
        }
        if let Json::Object(meta) = serde_json::from_slice(&read(META_FILE)?)? {
            scenario.meta.extend(meta);
        }
        if let Json::Object(config) = serde_json::from_slice(&read(CONFIG_FILE)?)? {
            scenario.config = config.into_iter().collect();
        }
        if dir.join(SQL_INIT_FILE).exists() {
            let script = String::from_utf8(read(SQL_INIT_FILE)?).map_err(|_| {
                Error::invalid(format!(
                    "{}: not UTF-8 text",
                    dir.join(SQL_INIT_FILE).display()
                ))
            })?;
            scenario.sql_init = Some(script);
        }
        Ok(scenario)
    }

    /// `exec.sh`'s text.
    fn script(&self) -> String {
        let mut command = String::from(
            "exec \"${SANDPIPE:-sandpipe}\" exec \"$plugin\" --message \"$here/message.json\"",
        );
        if self.data.is_some() {
            command.push_str(" --data \"$here/data\"");
        }
        command.push_str(" --meta-file \"$here/meta.json\"");
        for (key, value) in &self.config {
            command.push_str(" --config ");
            command.push_str(&shell_quote(&config_arg(key, value)));
        }
        command.push_str(" \"$@\"");
        // `init.sql` is passed whenever the folder has one, so one written
        // by hand is picked up too.
        format!(
            "#!/bin/sh\n\
             # Run this scenario in the real sandbox:\n\
             #   {EXEC_SCRIPT} PLUGIN.wasm [more sandpipe exec options, e.g. --json]\n\
             # $SANDPIPE names the sandpipe binary (default: sandpipe on PATH).\n\
             # Written by sandpipe_sdk::testing::Scenario::write_to.\n\
             set -eu\n\
             here=$(dirname \"$0\")\n\
             plugin=${{1:?usage: {EXEC_SCRIPT} PLUGIN.wasm [sandpipe exec options]}}\n\
             shift\n\
             # The plugin's tables, set up as the engine does at start.\n\
             if [ -f \"$here/{SQL_INIT_FILE}\" ]; then set -- --sql-init \"$here/{SQL_INIT_FILE}\" \"$@\"; fi\n\
             {command}\n"
        )
    }
}

fn pretty(value: &Json) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).unwrap_or_default();
    text.push(b'\n');
    text
}

/// `KEY=VALUE` for `sandpipe exec --config`, which reads VALUE as JSON when
/// it parses and as a string otherwise: a string that would parse as JSON
/// (or has a line break) is written as a JSON string.
fn config_arg(key: &str, value: &Json) -> String {
    let text = match value {
        Json::String(s)
            if serde_json::from_str::<Json>(s).is_err() && !s.contains(['\n', '\r']) =>
        {
            s.clone()
        }
        other => other.to_string(),
    };
    format!("{key}={text}")
}

/// `text` in single quotes for `sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
