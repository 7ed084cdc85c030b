//! Source syncs: a MariaDB table of ~1 KiB rows into PostgreSQL, the engine
//! (`sandpipe sync` with connectors/mysql-source, sandboxed) side by side
//! with an independent program (bench/native-sync, written directly on
//! mysql_async and tokio-postgres, no Sandpipe code, doing the same
//! reconciliation into the same table shape); and a paginated HTTP API
//! (connectors/http-source against a server in this process) into
//! PostgreSQL, in full and incrementally with nothing changed.
//!
//! A third mode, **compiled in**, runs the engine with mysql-source's logic
//! compiled into it (`NativeSource`: the same host `sql` calls, no wasm):
//! sandboxed ÷ compiled in is what the sandbox costs, compiled in ÷
//! independent what the rest of the engine costs.
//!
//! Each run of a mode is a child process against a fresh sink: a full sync
//! of every row, then the same sync again with nothing changed (every row
//! skipped). The clock is the child's wall time (start-up, component load
//! and connections included); peak RSS is the child's `VmHWM`. The modes
//! take turns, in an order that rotates from run to run, so a noisy
//! machine (or a checkpoint after the previous mode's writes) hits each
//! alike.
//!
//! Last, what a full sync's reconciliation holds per document: the index
//! (`HashMap<u128, i64>`) and the set of seen keys (`HashSet<u128>`) built
//! for 1,000,000 ids, measured as this process's resident memory before
//! and after.
//!
//! `cargo bench --bench sync -- [--rows N] [--runs R] [--http-items N]`
//! (`just bench-sync`). Results: docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/support/bins.rs"]
mod bins;
#[path = "../../tests/support/guests.rs"]
mod guests;
#[path = "../../tests/support/postgres.rs"]
mod pg_support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use mysql_async::prelude::Queryable as _;
use sandpipe::sandbox::bindings::sandpipe::connector::sql::{self, Host as _};
use sandpipe::sandbox::bindings::{
    Document, Operation, Page, PageRequest, SourceDescription, WitError,
};
use sandpipe::sandbox::{InvocationState, NativeSource};

const MYSQL: &str = "mysql://root@127.0.0.1:3306";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// `--name value` from the arguments, parsed, or `default`.
fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one child did: wall time, peak RSS, its last line of output.
struct Measured {
    seconds: f64,
    peak_kib: u64,
    said: String,
}

/// Run `command` to its end, polling its peak RSS.
fn measure(mut command: Command) -> Measured {
    let started = Instant::now();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let peak = Arc::new(Mutex::new(0u64));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(kib);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak_kib = *peak.lock().unwrap();
    Measured {
        seconds,
        peak_kib,
        said: stdout.lines().last().unwrap_or_default().to_owned(),
    }
}

/// A MariaDB database with `items`: `rows` rows of about 1 KiB.
async fn mariadb(name: &str, rows: usize) {
    let mut conn = mysql_async::Conn::from_url(MYSQL).await.unwrap();
    // The engine reads with a SELECT-only login (it refuses root's).
    conn.query_drop(format!(
        "CREATE DATABASE {name}; USE {name};
         CREATE TABLE items (id INT PRIMARY KEY, title VARCHAR(200), price DECIMAL(10,2),
             body TEXT, updated_at DATETIME(6) NOT NULL);
         CREATE USER '{name}'@'%' IDENTIFIED BY 'bench';
         GRANT SELECT ON {name}.* TO '{name}'@'%';"
    ))
    .await
    .unwrap();
    let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(20);
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    "({i}, 'Item number {i}', {}.{:02}, '{}', '2026-01-01 00:00:00')",
                    i % 500,
                    i % 100,
                    &text[..900]
                )
            })
            .collect();
        conn.query_drop(format!("INSERT INTO items VALUES {}", values.join(",")))
            .await
            .unwrap();
    }
    conn.disconnect().await.unwrap();
}

/// A connection to PostgreSQL database `db`.
async fn pg(db: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/{db}"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// A deployment folder for `sandpipe sync`: `component` as source `src`
/// with `grant` (YAML lines under its grant), the status log and the sink
/// in PostgreSQL database `db`.
fn deployment(
    dir: &Path,
    component: &str,
    db: &str,
    grant: &str,
    databases: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::create_dir_all(dir.join("spool")).unwrap();
    std::fs::copy(guests::component(component), dir.join("plugins/src.wasm")).unwrap();
    let config = dir.join("sandpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{ type: dir, path: spool }}\n\
             database: {{ type: postgres, url: \"{POSTGRES}/{db}?sslmode=disable\" }}\n\
             sandbox: {{ cache_dir: \"{}\" }}\n\
             {databases}\
             plugins:\n  grants:\n    src:\n{grant}\
             sources:\n  src: {{ page_size: 500 }}\n",
            guests::guest_target_dir()
                .join("bench-code-cache")
                .display()
        ),
    )
    .unwrap();
    config
}

/// connectors/mysql-source's work on table `items` compiled into the
/// engine: the same statement per page through the engine's `sql` host
/// code, the same documents.
struct NativeMysql;

/// A cell as JSON, as mysql-source maps it.
fn cell_json(value: &sql::Value) -> serde_json::Value {
    match value {
        sql::Value::Null => serde_json::Value::Null,
        sql::Value::Boolean(b) => (*b).into(),
        sql::Value::Int(i) => (*i).into(),
        sql::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        sql::Value::Text(t) => t.clone().into(),
        sql::Value::Json(j) => serde_json::from_str(j).unwrap_or_else(|_| j.clone().into()),
        sql::Value::Bytes(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
        sql::Value::Timestamp(micros) => chrono::DateTime::from_timestamp_micros(*micros)
            .map(|d| d.format("%Y-%m-%dT%H:%M:%S.%6fZ").to_string())
            .into(),
    }
}

impl NativeSource for NativeMysql {
    fn describe(&self) -> SourceDescription {
        SourceDescription {
            name: "mysql-source (compiled in)".into(),
            version: "bench".into(),
            config_schema: "{}".into(),
            incremental: false,
            advanced_rules: false,
        }
    }

    fn get_docs<'a>(
        &'a self,
        state: &'a mut InvocationState,
        request: PageRequest,
    ) -> BoxFuture<'a, Result<Page, WitError>> {
        Box::pin(async move {
            let after: Option<i64> = request.cursor.as_deref().and_then(|c| c.parse().ok());
            let (filter, params) = match after {
                Some(after) => ("WHERE q.`id` > ?", vec![sql::Value::Int(after)]),
                None => ("", Vec::new()),
            };
            let statement = format!(
                "SELECT * FROM `items` AS q {filter} ORDER BY q.`id` LIMIT {}",
                request.size
            );
            let rows = state.query(statement, params).await?;
            let id_at = rows.columns.iter().position(|c| c == "id").unwrap();
            let updated_at = rows.columns.iter().position(|c| c == "updated_at");
            let mut docs = Vec::with_capacity(rows.values.len());
            let mut last = None;
            for values in &rows.values {
                let mut body = serde_json::Map::new();
                body.insert("_table".into(), "items".into());
                for (column, value) in rows.columns.iter().zip(values) {
                    body.insert(column.clone(), cell_json(value));
                }
                let sql::Value::Int(key) = values[id_at] else {
                    panic!("items.id is an integer");
                };
                docs.push(Document {
                    id: format!("items_{key}"),
                    timestamp: updated_at.map(|i| match cell_json(&values[i]) {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    }),
                    body: serde_json::Value::Object(body).to_string(),
                    op: Operation::Index,
                });
                last = Some(key);
            }
            let next = (docs.len() as u32 == request.size)
                .then(|| last.map(|k| k.to_string()))
                .flatten();
            Ok(Page {
                docs,
                next,
                sync_cursor: None,
            })
        })
    }
}

/// `--native-child CONFIG`: one full sync of source `src` with
/// [`NativeMysql`] as its code, printing the job's line.
fn native_child(config: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let line = runtime.block_on(async {
        let config = sandpipe::config::Config::load(config).unwrap();
        let assembled = sandpipe::app::assemble_native(
            config,
            sandpipe::app::Natives {
                sources: vec![(
                    "src".to_owned(),
                    Arc::new(NativeMysql) as Arc<dyn NativeSource>,
                )],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
        let source = sandpipe::sync::Source::new(
            "src",
            &assembled.config,
            &assembled.plugins,
            assembled.sandbox.clone(),
            &assembled.tls,
        )
        .unwrap();
        let (_cancel, cancelled) = tokio::sync::watch::channel(false);
        let job = source
            .sync(
                sandpipe::sync::JobKind::Full,
                sandpipe::sync::Trigger::OnDemand,
                cancelled,
                &mut |_| {},
            )
            .await
            .unwrap();
        assert_eq!(job.state, sandpipe::sync::JobState::Completed, "{job:?}");
        sandpipe::app::job_line(&job)
    });
    println!("{line}");
}

fn sandpipe(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandpipe"));
    command
        .args(args)
        .arg("-c")
        .arg(config)
        .env("SANDPIPE_LOG", "warn");
    command
}

/// The documents per second of a full sync of `rows` in `m`.
fn rate(rows: usize, m: &Measured) -> f64 {
    rows as f64 / m.seconds
}

/// A paginated JSON API of `items` items of about 1 KiB, as
/// connectors/http-source reads it; its port.
async fn api(items: usize) -> u16 {
    use axum::extract::{Query, State};
    #[derive(serde::Deserialize)]
    struct Params {
        limit: usize,
        cursor: Option<usize>,
        updated_since: Option<String>,
    }
    let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(20);
    let all: Arc<Vec<serde_json::Value>> = Arc::new(
        (0..items)
            .map(|i| {
                serde_json::json!({
                    "id": format!("item-{i:07}"), "updated_at": "2026-01-01T00:00:00Z",
                    "title": format!("Item {i}"), "body": &text[..900],
                })
            })
            .collect(),
    );
    async fn list(
        State(all): State<Arc<Vec<serde_json::Value>>>,
        Query(p): Query<Params>,
    ) -> axum::Json<serde_json::Value> {
        if p.updated_since.is_some() {
            // Nothing changed since.
            return axum::Json(serde_json::json!({ "items": [], "next": null }));
        }
        let from = p.cursor.unwrap_or(0);
        let page: Vec<&serde_json::Value> = all.iter().skip(from).take(p.limit).collect();
        let next = (from + p.limit < all.len()).then(|| (from + p.limit).to_string());
        axum::Json(serde_json::json!({ "items": page, "next": next }))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/items", axum::routing::get(list))
        .with_state(all);
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// The resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--native-child") {
        native_child(Path::new(&args[i + 1]));
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test` runs benches once with no `--bench`: nothing to do.
        return;
    }
    let rows: usize = arg("--rows", 100_000);
    let runs: usize = arg("--runs", 3);
    let http_items: usize = arg("--http-items", 100_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let native = bins::build_bench_binary(&guests::root(), "native-sync");
    let _ = guests::guests();
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (my_db, pg_db) = (format!("sp_bench_{id}"), format!("sp_bench_{id}"));
    runtime.block_on(mariadb(&my_db, rows));
    runtime.block_on(async {
        pg("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {pg_db}"))
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let config = deployment(
        &dir.path().join("mysql"),
        "mysql-source",
        &pg_db,
        "      sql: { database: shop }\n      config: { tables: [items], updated_column: updated_at }\n",
        &format!(
            "secrets:\n  shop_pw: {{ file: shop.pw }}\ndatabases:\n  shop: {{ type: mysql, url: \"mysql://{my_db}@127.0.0.1:3306/{my_db}\", password: shop_pw }}\n"
        ),
    );
    std::fs::write(dir.path().join("mysql/shop.pw"), "bench").unwrap();
    // The compiled-in mode's deployment: the same, without the component.
    let native_dir = dir.path().join("native");
    std::fs::create_dir_all(native_dir.join("plugins")).unwrap();
    std::fs::create_dir_all(native_dir.join("spool")).unwrap();
    std::fs::copy(dir.path().join("mysql/shop.pw"), native_dir.join("shop.pw")).unwrap();
    let native_config = native_dir.join("sandpipe.yaml");
    std::fs::copy(&config, &native_config).unwrap();
    // Compiled once, outside the clock (as a deployment's `sandpipe compile`).
    let compiled = sandpipe(&config, &["compile"]).output().unwrap();
    assert!(compiled.status.success(), "{compiled:?}");
    println!(
        "MariaDB table of {rows} rows (~1 KiB each) into PostgreSQL, page 500, batch 500; {runs} run(s)"
    );
    println!(
        "{:<12} {:>4} {:>10} {:>10} {:>11} {:>12}   output",
        "mode", "run", "full s", "docs/s", "peak MiB", "unchanged s"
    );
    let reset = |pg_db: &str| {
        let sql =
            "DROP SCHEMA IF EXISTS sandpipe_sources CASCADE; DROP TABLE IF EXISTS items_native;";
        runtime.block_on(async { pg(pg_db).await.batch_execute(sql).await.unwrap() });
    };
    let mut results: HashMap<&str, Vec<(f64, f64, u64)>> = HashMap::new();
    for run in 1..=runs {
        // The first mode of a run goes first in the next: no mode always
        // follows the same one (a checkpoint or autovacuum after a 100k-row
        // write lands on whoever is next).
        let mut modes = ["independent", "sandboxed", "compiled-in"];
        modes.rotate_left((run - 1) % 3);
        for mode in modes {
            reset(&pg_db);
            let command = |_: ()| match mode {
                "independent" => {
                    let mut c = Command::new(&native);
                    c.args([
                        &format!("{MYSQL}/{my_db}"),
                        &format!("{POSTGRES}/{pg_db}"),
                        "items",
                        "items_native",
                        "500",
                        "500",
                    ]);
                    c
                }
                "compiled-in" => {
                    let mut c = Command::new(std::env::current_exe().unwrap());
                    c.arg("--native-child").arg(&native_config);
                    c.env("SANDPIPE_LOG", "warn");
                    c
                }
                _ => sandpipe(&config, &["sync", "src", "--full"]),
            };
            let full = measure(command(()));
            let again = measure(command(()));
            println!(
                "{mode:<12} {run:>4} {:>10.2} {:>10.0} {:>11.1} {:>12.2}   {} | {}",
                full.seconds,
                rate(rows, &full),
                full.peak_kib as f64 / 1024.0,
                again.seconds,
                full.said,
                again.said
            );
            results
                .entry(mode)
                .or_default()
                .push((full.seconds, again.seconds, full.peak_kib));
        }
    }
    let best = |mode: &str| {
        results[mode]
            .iter()
            .map(|r| r.0)
            .fold(f64::INFINITY, f64::min)
    };
    println!(
        "best full sync: independent {:.2} s, compiled in {:.2} s, sandboxed {:.2} s: sandboxed at {:.2} of the independent program's throughput and {:.2} of compiled in; compiled in at {:.2} of independent",
        best("independent"),
        best("compiled-in"),
        best("sandboxed"),
        best("independent") / best("sandboxed"),
        best("compiled-in") / best("sandboxed"),
        best("independent") / best("compiled-in"),
    );

    // The HTTP API source: full, then incremental with nothing changed.
    let port = runtime.block_on(api(http_items));
    reset(&pg_db);
    let http = deployment(
        &dir.path().join("http"),
        "http-source",
        &pg_db,
        &format!(
            "      config: {{ url: \"http://127.0.0.1:{port}/items\" }}\n      http: {{ allow: [\"http://127.0.0.1:{port}\"] }}\n      limits: {{ timeout: 30s }}\n"
        ),
        "",
    );
    let compiled = sandpipe(&http, &["compile"]).output().unwrap();
    assert!(compiled.status.success(), "{compiled:?}");
    // The runtime's worker threads serve the API while the children run.
    let full = measure(sandpipe(&http, &["sync", "src", "--full"]));
    let incremental = measure(sandpipe(&http, &["sync", "src", "--incremental"]));
    println!(
        "HTTP API of {http_items} items (~1 KiB): full {:.2} s ({:.0} docs/s, peak {:.1} MiB) | incremental, nothing changed: {:.2} s\n  {}\n  {}",
        full.seconds,
        rate(http_items, &full),
        full.peak_kib as f64 / 1024.0,
        incremental.seconds,
        full.said,
        incremental.said
    );

    // A full sync's per-document memory: the index and the seen keys.
    let before = rss_kib();
    let mut index: HashMap<u128, i64> = HashMap::new();
    let mut seen: HashSet<u128> = HashSet::new();
    for i in 0..1_000_000u128 {
        let key = i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        index.insert(key, i as i64);
        seen.insert(key);
    }
    let after = rss_kib();
    println!(
        "reconciliation memory for 1,000,000 ids: {:.1} MiB (index {} + seen {} entries)",
        after.saturating_sub(before) as f64 / 1024.0,
        index.len(),
        seen.len()
    );

    runtime.block_on(async {
        let mut conn = mysql_async::Conn::from_url(MYSQL).await.unwrap();
        conn.query_drop(format!("DROP DATABASE {my_db}"))
            .await
            .unwrap();
        conn.query_drop(format!("DROP USER '{my_db}'@'%'"))
            .await
            .unwrap();
        pg_support::drop_database(&pg("postgres").await, &pg_db).await;
    });
}
