//! The sqAPI workload through RabbitMQ, Redis and PostgreSQL: the engine
//! side by side with an independent consumer.
//!
//! sqAPI envelopes in a RabbitMQ queue (all published before the consumer
//! starts), their metadata a JSON string in one Redis key, a 1 KiB data
//! file on disk; per message: fetch the metadata, read the data, one INSERT
//! into PostgreSQL, a status record, the ack after the commit. At each
//! prefetch (concurrency = prefetch) the modes take turns, each run a child
//! process against a queue, exchange, Redis key and database of its own,
//! removed afterwards:
//!
//! - **independent consumer**: bench/native-consumer, written directly on
//!   lapin, redis and tokio-postgres without any Sandpipe code (built here
//!   once, in the bench profile). One statement per message inserts the
//!   result row and a status row. It is the bar: what the workload costs.
//! - **engine, sandboxed**: `sandpipe run --once` semantics with
//!   tests/fixtures/fx-insert as its wasm component (a fresh instance per
//!   message), the status log on PostgreSQL.
//! - **engine, compiled in**: the same with fx-insert's logic compiled into
//!   the engine (`NativePlugin`: the same host calls, no wasm): the old
//!   "native" baseline of pipeline.rs, so sandboxed ÷ compiled in is what
//!   the sandbox costs and compiled in ÷ independent what the rest of the
//!   engine costs.
//!
//! A run's clock starts when the consumer starts taking deliveries (the
//! engine has assembled and connected; the independent consumer has
//! connected and sent basic.consume) and stops at the last ack. A message's
//! latency runs from its delivery being taken to its ack having been sent:
//! the engine's is measured here, by wrapping its listener
//! (`sandpipe::listener::build`) so that `recv` and the `Acker`'s `settle`
//! are timed. Each run also samples the database's connections
//! (`pg_stat_activity`), counts the transactions committed in it
//! (`pg_stat_database.xact_commit`, read-only ones included) and checks
//! the rows.
//!
//! `cargo bench --bench sqapi -- --messages N --runs R --prefetch 1,16,128
//! [--modes independent,sandboxed,native]` (`just bench-sqapi`). Results:
//! docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/support/bins.rs"]
mod bins;
#[path = "../../tests/support/guests.rs"]
mod guests;
#[path = "../../tests/support/postgres.rs"]
mod pg_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use lapin::BasicProperties;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use sandpipe::app::assemble_with;
use sandpipe::config::Config;
use sandpipe::listener::{Acker, Delivery, Listener, Settlement};
use sandpipe::sandbox::bindings::sandpipe::connector::{blob, meta, sql};
use sandpipe::sandbox::bindings::{Description, Message, Outcome, WitError};
use sandpipe::sandbox::{InvocationState, NativePlugin};
use wasmtime::component::Resource;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
/// The plugin's name, and its PostgreSQL schema.
const PLUGIN: &str = "fx-insert";
const SCHEMA: &str = "fx_insert";
/// The data file every message names.
const DATA: &str = "d1k.txt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Independent,
    Sandboxed,
    CompiledIn,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Independent, Mode::Sandboxed, Mode::CompiledIn];

    fn name(self) -> &'static str {
        match self {
            Mode::Independent => "independent consumer",
            Mode::Sandboxed => "engine, sandboxed",
            Mode::CompiledIn => "engine, plugin compiled in",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Mode::Independent => "independent",
            Mode::Sandboxed => "sandboxed",
            Mode::CompiledIn => "native",
        }
    }

    fn parse(arg: &str) -> Self {
        Mode::ALL
            .into_iter()
            .find(|m| m.arg() == arg)
            .unwrap_or_else(|| panic!("unknown mode {arg:?}: independent, sandboxed or native"))
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    peak_rss_kib: f64,
    /// The most connections to the run's database seen at once.
    connections: f64,
    /// Transactions committed in the run's database (read-only ones too:
    /// every statement outside a transaction is one), per message.
    commits_per_message: f64,
    /// Settlements other than an ack (requeues, retries).
    not_acked: f64,
    /// CPU time per message of the consumer (the engine or the independent
    /// consumer) from its first delivery to its last ack, in ms.
    consumer_cpu_ms: f64,
    /// CPU time per message of every PostgreSQL process during the run
    /// (the engine's start-up statements included), in ms.
    postgres_cpu_ms: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(i) = args.iter().position(|a| a == "--engine") {
        engine(
            Path::new(&args[i + 1]),
            Mode::parse(&args[i + 2]),
            Path::new(&args[i + 3]),
            Path::new(&args[i + 4]),
        );
        return;
    }
    // `cargo bench` passes `--bench`; the rest are ours.
    let messages: usize = value("--messages").map_or(10_000, |v| v.parse().unwrap());
    let runs: usize = value("--runs").map_or(3, |v| v.parse().unwrap());
    let list =
        |v: &str| -> Vec<String> { v.split(',').map(str::trim).map(str::to_owned).collect() };
    let prefetches: Vec<u16> = value("--prefetch")
        .map_or_else(|| vec!["1".into(), "16".into(), "128".into()], |v| list(v))
        .iter()
        .map(|p: &String| p.parse().unwrap())
        .collect();
    let modes: Vec<Mode> = value("--modes").map_or(Mode::ALL.to_vec(), |v| {
        list(v).iter().map(|m: &String| Mode::parse(m)).collect()
    });

    guests::guests();
    let consumer = build_consumer();
    println!(
        "sqAPI workload (RabbitMQ, Redis metadata, 1 KiB data file, one INSERT, PostgreSQL status): {messages} messages per run, {runs} runs per mode, medians; concurrency = prefetch"
    );
    println!();
    println!(
        "| prefetch | mode | msg/s | p50 latency | p99 latency | peak RSS | PostgreSQL connections | PostgreSQL transactions per message | consumer CPU ms per message | PostgreSQL CPU ms per message | msg/s ÷ independent | p50 ÷ independent | p99 ÷ independent |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut sandbox_only = Vec::new();
    let mut not_acked = 0.0;
    for &prefetch in &prefetches {
        let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
        for run in 0..runs {
            // Rotate which goes first, so drift hits every mode alike.
            for k in 0..modes.len() {
                let index = (k + run) % modes.len();
                let m = one_run(prefetch, modes[index], messages, &consumer);
                eprintln!(
                    "prefetch {prefetch}, {}, run {}: {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms, {} connections, {:.2} transactions per message, CPU per message {:.3} ms (consumer) {:.3} ms (PostgreSQL), {} not acked at first",
                    modes[index].name(),
                    run + 1,
                    m.per_second,
                    m.p50_us / 1000.0,
                    m.p99_us / 1000.0,
                    m.connections,
                    m.commits_per_message,
                    m.consumer_cpu_ms,
                    m.postgres_cpu_ms,
                    m.not_acked
                );
                not_acked += m.not_acked;
                results[index].push(m);
            }
        }
        let medians: Vec<Measured> = results.iter().map(|r| median_of(r)).collect();
        let find = |mode: Mode| modes.iter().position(|m| *m == mode).map(|i| medians[i]);
        let independent = find(Mode::Independent);
        for (mode, m) in modes.iter().zip(&medians) {
            let ratios = match independent {
                Some(base) if *mode != Mode::Independent => format!(
                    "**{:.2}** | {:.2} | {:.2}",
                    m.per_second / base.per_second,
                    m.p50_us / base.p50_us,
                    m.p99_us / base.p99_us
                ),
                _ => " | | ".to_owned(),
            };
            println!(
                "| {prefetch} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} MiB | {:.0} | {:.2} | {:.3} | {:.3} | {ratios} |",
                mode.name(),
                m.per_second,
                m.p50_us / 1000.0,
                m.p99_us / 1000.0,
                m.peak_rss_kib / 1024.0,
                m.connections,
                m.commits_per_message,
                m.consumer_cpu_ms,
                m.postgres_cpu_ms,
            );
        }
        if let (Some(sandboxed), Some(compiled)) = (find(Mode::Sandboxed), find(Mode::CompiledIn)) {
            sandbox_only.push(format!(
                "{prefetch}: {:.2}",
                sandboxed.per_second / compiled.per_second
            ));
        }
    }
    if !sandbox_only.is_empty() {
        println!();
        println!(
            "sandbox only (engine sandboxed ÷ engine with the plugin compiled in, msg/s), by prefetch: {}",
            sandbox_only.join(", ")
        );
    }
    if not_acked > 0.0 {
        println!();
        println!(
            "note: {not_acked} deliveries were settled otherwise than by an ack (requeued or retried) and processed again"
        );
    }
}

/// Build bench/native-consumer in the bench profile; its executable.
fn build_consumer() -> PathBuf {
    bins::build_bench_binary(&guests::root(), "native-consumer")
}

/// 1 KiB of text lines.
fn data_1k() -> Vec<u8> {
    let line = b"the quick brown fox jumps over the lazy dog, again and again\n";
    line.iter().copied().cycle().take(1024).collect()
}

/// One run: a queue, exchange, Redis key and database of its own, every
/// message published (with confirms) before the consumer starts, then the
/// mode's child process; everything removed afterwards.
fn one_run(prefetch: u16, mode: Mode, messages: usize, consumer: &Path) -> Measured {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (queue, exchange, db, meta_key) = (
        format!("q_sqapi_{id}"),
        format!("x_sqapi_{id}"),
        format!("sp_sqapi_{id}"),
        format!("sp_sqapi:{id}:meta"),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data").join(DATA), data_1k()).unwrap();
    if mode == Mode::Sandboxed {
        std::fs::copy(
            guests::component(PLUGIN),
            root.join("plugins").join(format!("{PLUGIN}.wasm")),
        )
        .unwrap();
    }
    let cache = guests::guest_target_dir().join("bench-code-cache");
    // More `sandbox` keys for the engine, to measure a knob:
    // SANDPIPE_BENCH_SANDBOX="keep_resident: 1MiB".
    let knobs = std::env::var("SANDPIPE_BENCH_SANDBOX")
        .map(|k| format!(", {k}"))
        .unwrap_or_default();
    // In plain text, as the independent consumer talks to it: the
    // engine's default (`sslmode=prefer`, libpq's) would encrypt every
    // exchange with the local server, which offers TLS, and the two would
    // not do the same work (SANDPIPE_BENCH_SSLMODE=prefer measures that).
    let sslmode = std::env::var("SANDPIPE_BENCH_SSLMODE").unwrap_or_else(|_| "disable".into());
    let yaml = format!(
        "listener:\n  type: rabbitmq\n  url: \"{AMQP}\"\n  exchange: {{ name: {exchange}, type: fanout }}\n  queue: {queue}\n  prefetch: {prefetch}\n\
         data_store: {{ type: disk, root: data }}\n\
         meta_store: {{ type: redis, url: \"{REDIS}\" }}\n\
         database: {{ type: postgres, url: \"{POSTGRES}/{db}?sslmode={sslmode}\" }}\n\
         sandbox: {{ cache_dir: \"{}\"{knobs} }}\n\
         pipeline: {{ concurrency: {} }}\n\
         plugins:\n  grants:\n    {PLUGIN}: {{ meta: true, blob: true, sql: true }}\n",
        cache.display(),
        prefetch.max(1)
    );
    let file = root.join("sandpipe.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = Config::load(&file).unwrap();

    runtime().block_on(async {
        let admin = postgres("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        if mode != Mode::Independent {
            // The engine makes the plugin's schema and role when it opens
            // the database; the table goes in there before the run.
            let first = assemble_with(config.clone(), natives(mode)).await.unwrap();
            assert!(first.problems.is_empty(), "{:?}", first.problems);
            drop(first);
            let on_db = postgres(&db).await;
            pg_support::create_results_table(&on_db, &db, SCHEMA).await;
        }
        let redis = redis::Client::open(REDIS).unwrap();
        let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(&meta_key)
            .arg(r#"{"source": "bench"}"#)
            .query_async(&mut redis)
            .await
            .unwrap();

        // The first message declares the engine's topology (the queue,
        // its retry queue and dead-letter exchange), the same for every
        // mode; the rest go on one confirm-mode channel, 500 at a time.
        let body = |i: usize| {
            format!(
                r#"{{"uuid_ref":"m-{i}","data_type":"text/plain","data_location":"{DATA}","meta_location":"{meta_key}"}}"#
            )
        };
        sandpipe::listener::send(&config.listener, body(0).as_bytes(), "m.json", &sandpipe::tls::Tls::default())
            .await
            .unwrap();
        let connection = sandpipe::listener::rabbitmq::connect(AMQP, &sandpipe::tls::Tls::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let all: Vec<usize> = (1..messages).collect();
        for batch in all.chunks(500) {
            let mut confirms = Vec::with_capacity(batch.len());
            for &i in batch {
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        body(i).as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap();
                confirms.push(confirm);
            }
            for confirm in confirms {
                assert!(!confirm.await.unwrap().is_nack(), "the broker nacked");
            }
        }

        // Count the database's connections while the child runs.
        let commits_before = commits(&admin, &db).await;
        let postgres_before = server_cpu_ms("postgres");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let sampler = tokio::spawn(peak_connections(db.clone(), stopped));
        let line = match mode {
            Mode::Independent => {
                let mut command = Command::new(consumer);
                command
                    .args(["--amqp", AMQP, "--queue", &queue, "--redis", REDIS])
                    .arg("--postgres")
                    .arg(format!("{POSTGRES}/{db}"))
                    .arg("--data-dir")
                    .arg(root.join("data"))
                    .args(["--prefetch", &prefetch.to_string()])
                    .args(["--messages", &messages.to_string()]);
                run_child(command, root, None).await
            }
            _ => {
                let mut command = Command::new(std::env::current_exe().unwrap());
                let (ready, go) = (root.join("ready"), root.join("go"));
                command
                    .arg("--engine")
                    .arg(&file)
                    .arg(mode.arg())
                    .arg(&ready)
                    .arg(&go);
                run_child(command, root, Some((&ready, &go))).await
            }
        };
        let _ = stop.send(true);
        let connections = sampler.await.unwrap();
        let number = |key: &str| -> f64 {
            line.get(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in the child's line {line:?}"))
        };
        assert_eq!(number("acked") as usize, messages, "{line:?}");
        let log = std::fs::read_to_string(root.join("child.stderr")).unwrap_or_default();
        for steps in log.lines().filter(|l| l.starts_with("steps: ")) {
            eprintln!("  {steps}");
        }
        if number("requeued") > 0.0 {
            // Say why, once per distinct reason (the child's log lines,
            // without their timestamps and delivery names).
            let log = std::fs::read_to_string(root.join("child.stderr")).unwrap_or_default();
            let mut reasons: Vec<String> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("requeued"))
                .map(|l| {
                    // Without the timestamp and the per-message fields.
                    let l = l.split_once(' ').map_or(l, |(_, rest)| rest);
                    l.split(' ')
                        .filter(|w| !w.starts_with("message_id=") && !w.starts_with("delivery="))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            reasons.sort();
            reasons.dedup();
            eprintln!(
                "{} deliveries not acked at first ({} distinct reasons), e.g.:\n  {}",
                number("requeued"),
                reasons.len(),
                reasons.iter().take(3).cloned().collect::<Vec<_>>().join("\n  ")
            );
        }

        // The child's connections are gone, and with them their backends,
        // which report their statistics as they exit: wait for the count
        // to settle.
        let mut committed = commits(&admin, &db).await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = commits(&admin, &db).await;
            if now == committed {
                break;
            }
            committed = now;
        }
        let commits_per_message = (committed - commits_before) as f64 / messages as f64;
        let postgres_cpu_ms = (server_cpu_ms("postgres") - postgres_before) / messages as f64;

        // Every message has its row.
        let on_db = postgres(&db).await;
        let table = match mode {
            Mode::Independent => "public.results".to_owned(),
            _ => format!("{SCHEMA}.results"),
        };
        let rows: i64 = on_db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, messages as i64, "rows in {table}");
        drop(on_db);

        // Clean up: queues, exchanges, the Redis key, the database and
        // the roles made for it.
        for q in [queue.clone(), format!("{queue}.retry"), format!("{queue}.dead")] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [exchange.clone(), format!("{queue}.dead")] {
            let _ = channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "done".into()).await;
        let _: () = redis::cmd("DEL")
            .arg(&meta_key)
            .query_async(&mut redis)
            .await
            .unwrap();
        pg_support::drop_database(&admin, &db).await;
        Measured {
            per_second: number("msg_per_s"),
            p50_us: number("p50_us"),
            p99_us: number("p99_us"),
            peak_rss_kib: number("peak_rss_kib"),
            connections: connections as f64,
            commits_per_message,
            not_acked: number("requeued"),
            consumer_cpu_ms: number("cpu_ms") / messages as f64,
            postgres_cpu_ms,
        }
    })
}

/// Run a child to its end (at most 15 minutes): for an engine, wait for
/// its `ready` file, then write `go`. Its stderr goes to a file in `root`
/// (shown when it fails); its last stdout line is `key=value` pairs.
async fn run_child(
    mut command: Command,
    root: &Path,
    handshake: Option<(&Path, &Path)>,
) -> HashMap<String, String> {
    let log = root.join("child.stderr");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    let failed = |why: &str| -> ! {
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = stderr
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{command:?}: {why}\n{tail}")
    };
    if let Some((ready, go)) = handshake {
        while !ready.exists() {
            if child.try_wait().unwrap().is_some() {
                failed("ended before it was ready");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::write(go, b"").unwrap();
    }
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            if !status.success() {
                failed(&format!("failed: {status}"));
            }
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            failed("did not finish within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Transactions committed in database `db` so far (as far as its backends
/// have reported them).
async fn commits(admin: &tokio_postgres::Client, db: &str) -> i64 {
    admin
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

/// The most connections to database `db` seen at once, sampled every
/// 20 ms until `stop`.
async fn peak_connections(db: String, mut stop: tokio::sync::watch::Receiver<bool>) -> i64 {
    let client = postgres("postgres").await;
    let mut peak = 0;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .await
            .unwrap();
        peak = peak.max(row.get::<_, i64>(0));
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return peak,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

async fn postgres(db: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/{db}"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// A multi-threaded runtime, as the engine's binary uses.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn natives(mode: Mode) -> Vec<(String, Arc<dyn NativePlugin>)> {
    match mode {
        Mode::CompiledIn => vec![(PLUGIN.into(), Arc::new(FxInsertNative))],
        _ => Vec::new(),
    }
}

/// The engine child: `--engine CONFIG MODE READY GO`. Assembles the
/// engine, connects its listener (wrapped to time every delivery), says it
/// is ready, waits for `go`, drains the queue as `run --once` does and
/// prints one line of `key=value` pairs.
fn engine(config: &Path, mode: Mode, ready: &Path, go: &Path) {
    // Warnings and errors to stderr, as the binary logs them (it also logs
    // `sandpipe=info`: start-up lines only).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(config).unwrap();
    // The engine's step histograms (`sandpipe_message_step_seconds`)
    // record into this process's recorder from now on.
    let metrics = sandpipe::metrics::handle();
    runtime().block_on(async {
        let assembled = assemble_with(config, natives(mode)).await.unwrap();
        assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
        let readiness = sandpipe::server::Readiness::default();
        let inner = sandpipe::listener::build(
            &assembled.config.listener,
            true,
            assembled.config.pipeline.max_message_bytes.as_u64(),
            readiness.clone(),
            &assembled.tls,
        )
        .await
        .unwrap();
        let connected = Instant::now() + Duration::from_secs(30);
        while !readiness.report().is_empty() {
            assert!(Instant::now() < connected, "{:?}", readiness.report());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let timing = Arc::new(Timing::default());
        let listener = Arc::new(TimedListener {
            inner,
            timing: timing.clone(),
        });
        let pipeline = assembled.pipeline();
        std::fs::write(ready, b"").unwrap();
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let cpu_before = own_cpu_ms();
        let summary = pipeline.run(listener, shutdown).await.unwrap();
        let mut latencies = std::mem::take(&mut *timing.latencies.lock().unwrap());
        latencies.sort();
        let last = timing.last_ack.lock().unwrap().unwrap_or(started);
        let seconds = (last - started).as_secs_f64();
        let at = |q: f64| {
            latencies
                .get(((latencies.len().saturating_sub(1)) as f64 * q) as usize)
                .map_or(0, |d| d.as_micros())
        };
        let cpu = own_cpu_ms() - cpu_before;
        eprintln!("steps: {}", step_means(&metrics.render()));
        println!(
            "engine done={} acked={} requeued={} seconds={seconds:.6} msg_per_s={:.1} p50_us={} p99_us={} peak_rss_kib={} cpu_ms={cpu:.0}",
            summary.done,
            latencies.len(),
            timing.not_acked.load(Ordering::SeqCst),
            latencies.len() as f64 / seconds,
            at(0.5),
            at(0.99),
            peak_rss_kib()
        );
    });
}

/// Mean milliseconds per message step (`sandpipe_message_step_seconds`)
/// and per invocation (`sandpipe_invocation_seconds`), from the Prometheus
/// text: `resolve 0.21 ms, lookup 0.40 ms, ...`.
fn step_means(text: &str) -> String {
    let value = |series: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut out = Vec::new();
    for step in ["resolve", "lookup", "plugins", "commit", "status"] {
        let labels = format!("{{step=\"{step}\"}}");
        let sum = value(&format!("sandpipe_message_step_seconds_sum{labels}"));
        let count = value(&format!("sandpipe_message_step_seconds_count{labels}"));
        if count > 0.0 {
            out.push(format!("{step} {:.2} ms", sum / count * 1000.0));
        }
    }
    let sum = value("sandpipe_invocation_seconds_sum");
    let count = value("sandpipe_invocation_seconds_count");
    if count > 0.0 {
        out.push(format!("invocation {:.2} ms", sum / count * 1000.0));
    }
    out.join(", ")
}

/// Every acked delivery's latency, the last ack, and the settlements that
/// were not acks.
#[derive(Default)]
struct Timing {
    latencies: Mutex<Vec<Duration>>,
    last_ack: Mutex<Option<Instant>>,
    not_acked: AtomicUsize,
}

/// The engine's listener, with every delivery timed from `recv` to the
/// end of its `settle`.
struct TimedListener {
    inner: Box<dyn Listener>,
    timing: Arc<Timing>,
}

#[async_trait]
impl Listener for TimedListener {
    async fn recv(&self) -> anyhow::Result<Option<Delivery>> {
        let Some(mut delivery) = self.inner.recv().await? else {
            return Ok(None);
        };
        delivery.acker = Box::new(TimedAcker {
            inner: delivery.acker,
            received: Instant::now(),
            timing: self.timing.clone(),
        });
        Ok(Some(delivery))
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

struct TimedAcker {
    inner: Box<dyn Acker>,
    received: Instant,
    timing: Arc<Timing>,
}

#[async_trait]
impl Acker for TimedAcker {
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()> {
        let ack = matches!(settlement, Settlement::Ack);
        let result = self.inner.settle(settlement).await;
        let now = Instant::now();
        if ack && result.is_ok() {
            self.timing
                .latencies
                .lock()
                .unwrap()
                .push(now - self.received);
            let mut last = self.timing.last_ack.lock().unwrap();
            *last = Some(last.map_or(now, |l| l.max(now)));
        } else {
            self.timing.not_acked.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

/// fx-insert compiled into the engine: its own counter (the crate, linked
/// as a library) through the same host calls its component makes.
struct FxInsertNative;

impl NativePlugin for FxInsertNative {
    fn describe(&self) -> Description {
        Description {
            name: PLUGIN.into(),
            version: "native".into(),
            mime_types: vec!["text/plain".into()],
            capabilities: Vec::new(),
        }
    }

    fn execute<'a>(
        &'a self,
        state: &'a mut InvocationState,
        msg: Message,
    ) -> BoxFuture<'a, Result<Outcome, WitError>> {
        Box::pin(async move {
            let source = meta::Host::get(state, "source".into()).await?;
            let reader = blob::Host::open_data(state).await?;
            let mut counter = fx_insert::Counter::default();
            loop {
                let borrowed = Resource::new_borrow(reader.rep());
                let chunk = blob::HostReader::read(state, borrowed, fx_insert::CHUNK).await?;
                if chunk.is_empty() {
                    break;
                }
                counter.feed(&chunk);
            }
            blob::HostReader::drop(state, reader)
                .await
                .map_err(|e| WitError::Internal(e.to_string()))?;
            let int = |n: u64| sql::Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
            sql::Host::execute(
                state,
                fx_insert::INSERT.into(),
                vec![
                    sql::Value::Text(msg.id.clone()),
                    int(counter.bytes),
                    int(counter.lines()),
                    source.map_or(sql::Value::Null, sql::Value::Text),
                ],
            )
            .await?;
            Ok(Outcome::Done)
        })
    }
}

/// The process's peak resident set size (VmHWM), in KiB.
/// CPU milliseconds (user and system) of `/proc/PID/stat`: `own` for the
/// process itself, else with its waited-for children's (`cutime`,
/// `cstime`) too.
fn stat_cpu_ms(stat: &str, children: bool) -> (String, i64, f64) {
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return (String::new(), 0, 0.0);
    };
    let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After `(comm)`: ppid is field 4, utime 14, stime 15, cutime 16,
    // cstime 17 (1-based, so indices 1, 11..=14 here); ticks of 10 ms
    // (`getconf CLK_TCK` is 100 on Linux).
    let mut ticks = number(11) + number(12);
    if children {
        ticks += number(13) + number(14);
    }
    (comm, number(1) as i64, ticks * 10.0)
}

/// This process's CPU time so far, in milliseconds.
fn own_cpu_ms() -> f64 {
    stat_cpu_ms(
        &std::fs::read_to_string("/proc/self/stat").unwrap_or_default(),
        false,
    )
    .2
}

/// CPU milliseconds used so far by every process named `comm` (e.g. every
/// PostgreSQL process), those that ended included: their parent (the
/// postmaster) counts them once it has waited for them.
fn server_cpu_ms(comm: &str) -> f64 {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let pid: i64 = entry.file_name().to_string_lossy().parse().unwrap_or(-1);
        let (name, ppid, _) = stat_cpu_ms(&stat, false);
        if name == comm {
            found.push((pid, ppid, stat));
        }
    }
    let pids: std::collections::HashSet<i64> = found.iter().map(|(pid, ..)| *pid).collect();
    found
        .iter()
        .map(|(_, ppid, stat)| stat_cpu_ms(stat, !pids.contains(ppid)).2)
        .sum()
}

fn peak_rss_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn median_of(runs: &[Measured]) -> Measured {
    let of = |f: fn(&Measured) -> f64| median(runs.iter().map(f).collect());
    Measured {
        per_second: of(|m| m.per_second),
        p50_us: of(|m| m.p50_us),
        p99_us: of(|m| m.p99_us),
        peak_rss_kib: of(|m| m.peak_rss_kib),
        connections: of(|m| m.connections),
        commits_per_message: of(|m| m.commits_per_message),
        not_acked: of(|m| m.not_acked),
        consumer_cpu_ms: of(|m| m.consumer_cpu_ms),
        postgres_cpu_ms: of(|m| m.postgres_cpu_ms),
    }
}
