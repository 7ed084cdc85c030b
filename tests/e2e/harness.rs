//! Shared test environment: the guest components (built once per test run,
//! then reused from cargo's cache), a temporary deployment folder, and
//! helpers to run the engine and read its status log.

use std::path::PathBuf;
use std::process::Command;

use sandpipe::pipeline::Summary;
use sandpipe::status::{Row, StatusLog};
use sandpipe::store::database::Database;

#[path = "../support/guests.rs"]
mod guests;
#[path = "../support/postgres.rs"]
pub mod postgres;
#[path = "../support/tls.rs"]
pub mod tls;
pub use guests::{component, guest_target_dir, init_script, root};

/// A code cache shared by all tests, so each component compiles once.
pub fn shared_cache() -> PathBuf {
    guest_target_dir().join("e2e-code-cache")
}

/// A deployment in a temporary folder.
pub struct Deployment {
    /// Keeps the folder alive.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
}

impl Deployment {
    /// A deployment with the given plugins (crate name → plugin name) and
    /// the YAML `extra` added to a base config (dir listener, disk data,
    /// file metadata, sqlite, short retries; no `plugins:` section). A
    /// top-level key in `extra` replaces the base's section of that name.
    pub fn new(plugins: &[(&str, &str)], extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap_or_else(|e| panic!("{e}"));
        for (krate, name) in plugins {
            std::fs::copy(component(krate), plugin_dir.join(format!("{name}.wasm")))
                .unwrap_or_else(|e| panic!("copy {krate}: {e}"));
        }
        let config = dir.path().join("sandpipe.yaml");
        let base = [
            "listener: { type: dir, path: spool, poll_interval: 20ms }".to_owned(),
            "data_store: { type: disk, root: data }".to_owned(),
            "meta_store: { type: file, root: meta }".to_owned(),
            "database: { type: sqlite }".to_owned(),
            format!("sandbox: {{ cache_dir: \"{}\" }}", shared_cache().display()),
            "retry: { max_attempts: 2, backoff: { initial: 10ms, max: 50ms } }".to_owned(),
        ];
        // A top-level section in `extra` replaces the base's.
        let mut yaml: String = base
            .iter()
            .filter(|line| {
                let key = line.split(':').next().unwrap_or_default();
                !extra.lines().any(|l| l.starts_with(&format!("{key}:")))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        yaml.push_str(extra);
        std::fs::write(&config, yaml).unwrap_or_else(|e| panic!("{e}"));
        Self { dir, config }
    }

    /// A path inside the deployment.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Write a data object.
    pub fn data(&self, location: &str, bytes: &[u8]) {
        let p = self.path("data").join(location);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(p, bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Put a message (raw text) in the spool.
    pub fn message(&self, file: &str, body: &str) {
        let spool = self.path("spool");
        std::fs::create_dir_all(&spool).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(spool.join(file), body).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A sqAPI message for `kind`.
    pub fn sqapi(&self, file: &str, id: &str, kind: &str, data: Option<&str>) {
        let body = serde_json::json!({
            "uuid_ref": id, "data_type": kind, "data_location": data,
        });
        self.message(file, &body.to_string());
    }

    /// `sandpipe run --once` in this process.
    pub async fn run_once(&self) -> anyhow::Result<Summary> {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        sandpipe::app::run(&self.config, true, rx).await
    }

    /// The status log rows of a message (from the configured database).
    pub async fn rows(&self, id: &str) -> Vec<Row> {
        let config = sandpipe::config::Config::load(&self.config).unwrap_or_else(|e| panic!("{e}"));
        let tls = sandpipe::tls::Tls::new(&config).unwrap_or_else(|e| panic!("{e}"));
        let log = StatusLog::new(
            Database::connect(&config.database, &tls).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        log.rows(id).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The final row of `plugin` for message `id`.
    pub async fn last(&self, id: &str, plugin: &str) -> Row {
        self.rows(id)
            .await
            .into_iter()
            .rfind(|r| r.plugin == plugin && r.status != "running")
            .unwrap_or_else(|| panic!("no status for {id}/{plugin}"))
    }

    /// A query on a plugin's own database.
    pub fn plugin_db(&self, plugin: &str) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path(&format!("state/plugins/{plugin}.sqlite")))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Files in a spool subfolder.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(sub))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Run the `sandpipe` binary with `args` (the config is appended).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_sandpipe"))
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sandpipe: {e}"))
    }
}

/// A free TCP port on 127.0.0.1 (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("{e}"))
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port()
}

/// A plain HTTP/1.0 GET on 127.0.0.1: (status code, body).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}
