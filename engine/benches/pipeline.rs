//! End-to-end benchmark of the embedded path, sandboxed against native.
//!
//! The whole pipeline runs — envelope, routing, the plugin, effects, the
//! SQLite status log, the dir output, settlement — fed by an in-memory
//! listener, for a trivial plugin and for text-stats on 4 KiB texts. Each
//! plugin runs twice: as its wasm component, and as the native baseline,
//! the same logic compiled into the engine (`sandpipe::sandbox::NativePlugin`:
//! the same host code for every capability, no wasm boundary). Each run is
//! a child process (so peak RSS is the run's own); native and sandboxed runs
//! alternate, and the report gives medians over the runs and the ratio of
//! the medians, measured side by side in one invocation.
//!
//! `just bench` runs it (`cargo bench --bench pipeline`, an optimised build);
//! `-- --messages N --runs R` change the size. Results: docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/support/guests.rs"]
mod guests;
#[path = "../../tests/support/postgres.rs"]
mod pg_support;

use std::collections::VecDeque;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use sandpipe::app::assemble_with;
use sandpipe::config::Config;
use sandpipe::listener::{Acker, Delivery, Listener, Settlement};
use sandpipe::sandbox::bindings::sandpipe::connector::{blob, config, emit, log, sql};
use sandpipe::sandbox::bindings::{Description, Message, Outcome, WitError};
use sandpipe::sandbox::{InvocationState, NativePlugin};
use wasmtime::component::Resource;

/// One workload: a plugin, its grant, its messages.
struct Scenario {
    name: &'static str,
    /// The component: a guest crate, or `polyglot:NAME` for a Python or
    /// JavaScript example built by the polyglot tests / `just polyglot`.
    krate: &'static str,
    /// The plugin name (the same in every mode).
    plugin: &'static str,
    grant: &'static str,
    /// Message `i`'s body.
    body: fn(usize) -> String,
    /// Whether a native baseline exists.
    native: bool,
    /// A run's messages, as a multiple of `--messages`: more for
    /// microseconds per message (a run must last long enough to measure),
    /// fewer for milliseconds.
    share: f64,
    /// `pipeline.concurrency` (16 is the default).
    concurrency: usize,
    /// More `sandbox:` settings, e.g. `, dirty_page_reset: true`.
    sandbox: &'static str,
    /// Whether the grant's `sql.init` is the connector's init.sql (copied
    /// beside the config as `PLUGIN.init.sql`).
    init: bool,
}

/// How a run executes the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The native baseline (`NativePlugin`).
    Native,
    /// The component, a fresh instance per message (the default).
    Fresh,
    /// The component with the grant's `reuse` (warm instances).
    Reused,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Fresh => "sandboxed, fresh instance",
            Mode::Reused => "sandboxed, reused instance",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Fresh => "fresh",
            Mode::Reused => "reused",
        }
    }

    fn parse(arg: &str) -> Self {
        match arg {
            "native" => Mode::Native,
            "fresh" => Mode::Fresh,
            _ => Mode::Reused,
        }
    }
}

/// fx-probe's `done`: parse the body, return done.
const TRIVIAL: Scenario = Scenario {
    name: "trivial",
    krate: "fx-probe",
    plugin: "probe",
    grant: "{}",
    body: |i| format!(r#"{{"uuid_ref":"m-{i}","data_type":"test/probe","action":"done"}}"#),
    native: true,
    share: 5.0,
    concurrency: 16,
    sandbox: "",
    init: false,
};

const SCENARIOS: [Scenario; 9] = [
    TRIVIAL,
    // The same with four times the messages in flight: bigger status-log
    // group commits.
    Scenario {
        name: "trivial-c64",
        concurrency: 64,
        ..TRIVIAL
    },
    // The same with the opt-in dirty-page reset of pooling slots.
    Scenario {
        name: "trivial-dirty-reset",
        sandbox: ", dirty_page_reset: true",
        ..TRIVIAL
    },
    Scenario {
        name: "text-stats-4k",
        krate: "text-stats",
        plugin: "text-stats",
        grant: "{ blob: true, sql: { init: text-stats.init.sql }, emit: [stats], config: { output: stats } }",
        body: |i| {
            format!(r#"{{"uuid_ref":"m-{i}","data_type":"text/plain","data_location":"t4k.txt"}}"#)
        },
        native: true,
        share: 1.0,
        concurrency: 16,
        sandbox: "",
        init: true,
    },
    Scenario {
        name: "image-meta",
        krate: "image-meta",
        plugin: "image-meta",
        grant: "{ blob: true, sql: { init: image-meta.init.sql } }",
        body: |i| {
            format!(
                r#"{{"uuid_ref":"m-{i}","data_type":"image/jpeg","data_location":"gradient.jpg"}}"#
            )
        },
        native: true,
        share: 1.0,
        concurrency: 16,
        sandbox: "",
        init: true,
    },
    // One outbound HTTP GET of 1 KiB per message (fx-http's `fetch`), from
    // a server the benchmark's parent process runs on 127.0.0.1.
    Scenario {
        name: "http-get-1k",
        krate: "fx-http",
        plugin: "fetch",
        grant: "{ http: { allow: [\"http://127.0.0.1:*\"] } }",
        body: http_fetch,
        native: true,
        share: 1.0,
        concurrency: 16,
        sandbox: "",
        init: false,
    },
    // The same with the opt-in dirty-page reset of pooling slots.
    Scenario {
        name: "http-get-1k-dirty-reset",
        krate: "fx-http",
        plugin: "fetch",
        grant: "{ http: { allow: [\"http://127.0.0.1:*\"] } }",
        body: http_fetch,
        native: true,
        share: 1.0,
        concurrency: 16,
        sandbox: ", dirty_page_reset: true",
        init: false,
    },
    Scenario {
        name: "python-csv",
        krate: "polyglot:python-csv",
        plugin: "python-csv",
        grant: "{ blob: true, sql: true, limits: { memory: 128MiB, timeout: 20s } }",
        body: |i| {
            format!(r#"{{"uuid_ref":"m-{i}","data_type":"text/csv","data_location":"people.csv"}}"#)
        },
        native: false,
        share: 0.25,
        concurrency: 16,
        sandbox: "",
        init: false,
    },
    Scenario {
        name: "js-validate",
        krate: "polyglot:js-validate",
        plugin: "js-validate",
        grant: "{ blob: true, emit: [stats], config: { output: stats, schema: '{\"type\": \"object\", \"required\": [\"id\"], \"properties\": {\"id\": {\"type\": \"integer\", \"minimum\": 1}}}' }, limits: { memory: 128MiB, timeout: 20s } }",
        body: |i| {
            format!(
                r#"{{"uuid_ref":"m-{i}","data_type":"application/json","data_location":"order.json"}}"#
            )
        },
        native: false,
        share: 0.25,
        concurrency: 16,
        sandbox: "",
        init: false,
    },
];

/// fx-http's `fetch` of the parent's 1 KiB.
fn http_fetch(i: usize) -> String {
    let port = std::env::var(HTTP_PORT).unwrap_or_default();
    format!(
        r#"{{"uuid_ref":"m-{i}","data_type":"test/http","action":"fetch","url":"http://127.0.0.1:{port}/kib"}}"#
    )
}

/// The environment variable that tells a run where the HTTP server is.
const HTTP_PORT: &str = "SANDPIPE_BENCH_HTTP_PORT";

/// The port of a server answering `GET /kib` with 1 KiB, started once (on
/// a thread of its own) by the parent process for the `http-get-1k` runs.
fn http_server() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                let kib = Bytes::from(vec![b'k'; 1024]);
                let app = axum::Router::new().route(
                    "/kib",
                    axum::routing::get(move || {
                        let kib = kib.clone();
                        async move { kib }
                    }),
                );
                axum::serve(listener, app).await.unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

/// The component of `scenario`, or `None` for a polyglot example that has
/// not been built: the newest of `target/plugins/NAME.wasm` (`just
/// polyglot`) and the polyglot tests' builds.
fn component(scenario: &Scenario) -> Option<std::path::PathBuf> {
    let Some(name) = scenario.krate.strip_prefix("polyglot:") else {
        return Some(guests::component(scenario.krate));
    };
    let built = guests::guest_target_dir().join("polyglot").join("built");
    let prefix = format!("{name}-");
    let tested = std::fs::read_dir(built)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path());
    let recipe = guests::root()
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    tested
        .chain(std::iter::once(recipe).filter(|p| p.exists()))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    peak_rss_kib: f64,
    /// The process's CPU time (user + system) per message, µs.
    cpu_us: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(i) = args.iter().position(|a| a == "--replica") {
        replica(
            Path::new(&args[i + 1]),
            Mode::parse(&args[i + 2]),
            Path::new(&args[i + 3]),
            Path::new(&args[i + 4]),
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--loaded") {
        let (rss, per_message_us) = loaded(args[i + 1].parse().unwrap());
        println!("{rss} {per_message_us}");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let scenario = SCENARIOS.iter().find(|s| s.name == args[i + 1]).unwrap();
        let m = child(
            scenario,
            Mode::parse(&args[i + 2]),
            arg("--messages").unwrap(),
        );
        println!(
            "{} {} {} {} {}",
            m.per_second, m.p50_us, m.p99_us, m.peak_rss_kib, m.cpu_us
        );
        return;
    }
    // `cargo bench` passes `--bench`; other arguments are ours.
    let messages = arg("--messages").unwrap_or(4000);
    let runs = arg("--runs").unwrap_or(5);
    guests::guests();
    // `--only NAME`: one workload (and no scaling table).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    if only.is_none_or(|o| SCENARIOS.iter().any(|s| s.name == o)) {
        println!(
            "embedded path: {messages} messages per run ({} for the trivial plugin, {} for Python and JavaScript), {runs} runs per mode, medians; ratio = this mode / the first mode of the workload",
            messages * 5,
            messages / 4
        );
        println!();
        println!(
            "| workload | mode | msg/s | p50 latency | p99 latency | peak RSS | CPU per message | throughput ratio |"
        );
        println!("|---|---|---|---|---|---|---|---|");
    }
    for scenario in SCENARIOS
        .iter()
        .filter(|s| only.is_none_or(|o| o == s.name))
    {
        if component(scenario).is_none() {
            println!(
                "| {} | not built: run `just polyglot` (or the polyglot tests) first | | | | | |",
                scenario.name
            );
            continue;
        }
        let modes: &[Mode] = if scenario.native {
            &[Mode::Native, Mode::Fresh, Mode::Reused]
        } else {
            &[Mode::Fresh, Mode::Reused]
        };
        let count = (messages as f64 * scenario.share) as usize;
        let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
        for run in 0..runs {
            // Rotate which goes first, so drift hits every mode alike.
            for k in 0..modes.len() {
                let index = (k + run) % modes.len();
                results[index].push(spawn(scenario, modes[index], count));
            }
        }
        let medians: Vec<Measured> = results.iter().map(|r| median_of(r)).collect();
        let base = medians[0].per_second;
        for (index, (mode, m)) in modes.iter().zip(&medians).enumerate() {
            let ratio = if index == 0 {
                String::new()
            } else {
                format!("**{:.2}**", m.per_second / base)
            };
            println!(
                "| {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} MiB | {:.0} µs | {ratio} |",
                scenario.name,
                mode.name(),
                m.per_second,
                m.p50_us,
                m.p99_us,
                m.peak_rss_kib / 1024.0,
                m.cpu_us
            );
        }
    }
    if only.is_none() {
        scaling(runs.min(3));
    }
    if only.is_none_or(|o| o == "rabbitmq") {
        rabbitmq(runs, messages / 2);
        replicas(runs, messages / 2);
    }
}

/// text-stats through RabbitMQ, Redis metadata and the PostgreSQL status
/// log and plugin database, at prefetch 1, 16 and 128: natively, sandboxed
/// and with reuse, each run a child process against its own queue, Redis
/// key and database.
fn rabbitmq(runs: usize, messages: usize) {
    println!();
    println!(
        "RabbitMQ path (text-stats, 4 KiB texts, Redis metadata, PostgreSQL): {messages} messages per run, {runs} runs per mode, medians"
    );
    println!();
    println!("| prefetch | mode | msg/s | peak RSS | throughput ratio |");
    println!("|---|---|---|---|---|");
    let modes = [Mode::Native, Mode::Fresh, Mode::Reused];
    for prefetch in [1u16, 16, 128] {
        let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
        for run in 0..runs {
            for k in 0..modes.len() {
                let index = (k + run) % modes.len();
                let m = rabbit_child(prefetch, modes[index], messages, 1);
                let v = [m.per_second, m.peak_rss_kib];
                results[index].push((v[0], v[1]));
            }
        }
        let medians: Vec<(f64, f64)> = results
            .iter()
            .map(|r| {
                (
                    median(r.iter().map(|x| x.0).collect()),
                    median(r.iter().map(|x| x.1).collect()),
                )
            })
            .collect();
        for (index, (mode, (rate, rss))) in modes.iter().zip(&medians).enumerate() {
            let ratio = if index == 0 {
                String::new()
            } else {
                format!("**{:.2}**", rate / medians[0].0)
            };
            println!(
                "| {prefetch} | {} | {rate:.0} | {:.1} MiB | {ratio} |",
                mode.name(),
                rss / 1024.0
            );
        }
    }
}

/// 1 and 2 engine replicas (processes) on one queue and one database,
/// sandboxed, prefetch 16.
fn replicas(runs: usize, messages: usize) {
    println!();
    println!(
        "| replicas (prefetch 16, sandboxed) | msg/s | peak RSS per replica | throughput ratio |"
    );
    println!("|---|---|---|---|");
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(), Vec::new()];
    for run in 0..runs {
        for k in 0..2 {
            let index = (k + run) % 2;
            results[index].push(rabbit_child(16, Mode::Fresh, messages, index + 1));
        }
    }
    let one = median_of(&results[0]);
    let two = median_of(&results[1]);
    for (n, m) in [(1, one), (2, two)] {
        let ratio = if n == 1 {
            String::new()
        } else {
            format!("**{:.2}**", m.per_second / one.per_second)
        };
        println!(
            "| {n} | {:.0} | {:.1} MiB | {ratio} |",
            m.per_second,
            m.peak_rss_kib / 1024.0
        );
    }
}

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// One RabbitMQ run: publish `messages`, then drain the queue with
/// `run --once` semantics; everything it made is removed afterwards.
fn rabbit_child(prefetch: u16, mode: Mode, messages: usize, replicas: usize) -> Measured {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (queue, exchange, db, meta_key) = (
        format!("q_bench_{id}"),
        format!("x_bench_{id}"),
        format!("sp_bench_{id}"),
        format!("sp_bench:{id}:meta"),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/t4k.txt"), text_4k()).unwrap();
    if mode != Mode::Native {
        std::fs::copy(
            guests::component("text-stats"),
            root.join("plugins/text-stats.wasm"),
        )
        .unwrap();
    }
    std::fs::copy(
        guests::init_script("text-stats"),
        root.join("text-stats.init.sql"),
    )
    .unwrap();
    // As many warm instances as messages in flight, leaving half the
    // pool's 128 slots to fresh instances.
    let reuse = if mode == Mode::Reused {
        format!("reuse: {{ instances: {} }}, ", prefetch.clamp(1, 64))
    } else {
        String::new()
    };
    let cache = guests::guest_target_dir().join("bench-code-cache");
    let yaml = format!(
        "listener:\n  type: rabbitmq\n  url: \"{AMQP}\"\n  exchange: {{ name: {exchange}, type: fanout }}\n  queue: {queue}\n  prefetch: {prefetch}\n\
         data_store: {{ type: disk, root: data }}\n\
         meta_store: {{ type: redis, url: \"redis://127.0.0.1:6379\" }}\n\
         database: {{ type: postgres, url: \"{POSTGRES}/{db}\" }}\n\
         outputs: {{ stats: {{ type: dir, path: out }} }}\n\
         sandbox: {{ cache_dir: \"{}\" }}\n\
         pipeline: {{ concurrency: {} }}\n\
         plugins:\n  grants:\n    text-stats: {{ {reuse}blob: true, sql: {{ init: text-stats.init.sql }}, emit: [stats], config: {{ output: stats }} }}\n",
        cache.display(),
        prefetch.max(1)
    );
    let file = root.join("sandpipe.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = Config::load(&file).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let admin = postgres_admin("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        // The engine makes its schema and the plugin's role when it opens
        // the database: once here, so the replicas do not race to.
        let first = assemble_with(config.clone(), Vec::new()).await.unwrap();
        drop(first);
        let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(&meta_key)
            .arg(r#"{"source": "bench"}"#)
            .query_async(&mut redis)
            .await
            .unwrap();

        let body = |i: usize| {
            format!(
                r#"{{"uuid_ref":"m-{i}","data_type":"text/plain","data_location":"t4k.txt","meta_location":"{meta_key}"}}"#
            )
        };
        // The first message declares the topology; the rest go on one
        // confirm-mode channel.
        sandpipe::listener::send(&config.listener, body(0).as_bytes(), "m.json", &sandpipe::tls::Tls::default())
            .await
            .unwrap();
        let connection = sandpipe::listener::rabbitmq::connect(AMQP, &sandpipe::tls::Tls::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 1..messages {
            sandpipe::listener::rabbitmq::publish_confirmed(
                &channel,
                &exchange,
                "",
                body(i).as_bytes(),
                lapin::BasicProperties::default(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        }

        // The replicas: each assembles its engine, says it is ready, waits
        // for `go`, drains the queue and reports when it finished.
        let go = root.join("go");
        let mut children = Vec::new();
        for k in 0..replicas {
            let child = Command::new(std::env::current_exe().unwrap())
                .arg("--replica")
                .arg(&file)
                .arg(mode.arg())
                .arg(root.join(format!("ready-{k}")))
                .arg(&go)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            children.push(child);
        }
        while !(0..replicas).all(|k| root.join(format!("ready-{k}")).exists()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = std::time::SystemTime::now();
        std::fs::write(&go, b"").unwrap();
        let mut done = 0;
        let mut rss: f64 = 0.0;
        let mut finished = started;
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
            done += v[0] as u64;
            let end = std::time::UNIX_EPOCH + Duration::from_micros(v[1] as u64);
            finished = finished.max(end);
            rss = rss.max(v[2]);
        }
        assert_eq!(done, messages as u64);
        let elapsed = finished.duration_since(started).unwrap_or_default();
        let measured = Measured {
            per_second: messages as f64 / elapsed.as_secs_f64(),
            p50_us: 0.0,
            p99_us: 0.0,
            peak_rss_kib: rss,
            cpu_us: 0.0,
        };

        // Clean up: queues, exchanges, the Redis key, the database and
        // the roles made for it.
        for q in [queue.clone(), format!("{queue}.retry"), format!("{queue}.dead")] {
            let _ = channel
                .queue_delete(q.as_str().into(), lapin::options::QueueDeleteOptions::default())
                .await;
        }
        for x in [exchange.clone(), format!("{queue}.dead")] {
            let _ = channel
                .exchange_delete(x.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
        let _: () = redis::cmd("DEL").arg(&meta_key).query_async(&mut redis).await.unwrap();
        pg_support::drop_database(&admin, &db).await;
        measured
    })
}

/// One engine replica of a RabbitMQ run: `--replica CONFIG MODE READY GO`.
/// Prints the messages it settled as done and when it finished (µs since
/// the epoch).
fn replica(config: &Path, mode: Mode, ready: &Path, go: &Path) {
    let config = Config::load(config).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let natives: Vec<(String, Arc<dyn NativePlugin>)> = if mode == Mode::Native {
            vec![("text-stats".into(), Arc::new(TextStats))]
        } else {
            Vec::new()
        };
        let assembled = assemble_with(config, natives).await.unwrap();
        assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
        let listener: Arc<dyn Listener> = Arc::from(
            sandpipe::listener::build(
                &assembled.config.listener,
                true,
                assembled.config.pipeline.max_message_bytes.as_u64(),
                sandpipe::server::Readiness::default(),
                &assembled.tls,
            )
            .await
            .unwrap(),
        );
        let pipeline = assembled.pipeline();
        std::fs::write(ready, b"").unwrap();
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let summary = pipeline.run(listener, shutdown).await.unwrap();
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        println!("{} {} {}", summary.done, end.as_micros(), peak_rss_kib());
    });
}

async fn postgres_admin(db: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/{db}"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// RSS with 1, 10 and 100 plugins loaded and idle, and the per-message
/// cost with that many loaded (the messages go to one of them).
fn scaling(runs: usize) {
    println!();
    println!(
        "| plugins loaded | RSS, loaded and idle | trivial message, µs each (sandboxed, 1000 messages) |"
    );
    println!("|---|---|---|");
    for n in [1usize, 10, 100] {
        let mut rss = Vec::new();
        let mut cost = Vec::new();
        for _ in 0..runs {
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--loaded", &n.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = text
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            rss.push(v[0]);
            cost.push(v[1]);
        }
        println!(
            "| {n} | {:.1} MiB | {:.0} |",
            median(rss) / 1024.0,
            median(cost)
        );
    }
}

/// Load `n` copies of fx-probe (probe-0 .. probe-N-1, each its own MIME
/// type), measure RSS once idle, then run 1000 trivial messages to probe-0.
fn loaded(n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    let mut grants = String::new();
    for i in 0..n {
        std::fs::copy(
            guests::component("fx-probe"),
            root.join("plugins").join(format!("probe-{i}.wasm")),
        )
        .unwrap();
        grants.push_str(&format!("    probe-{i}: {{ mime: [test/probe-{i}] }}\n"));
    }
    let cache = guests::guest_target_dir().join("bench-code-cache");
    let yaml = format!(
        "listener: {{ type: dir, path: unused }}\n\
         database: {{ type: sqlite }}\n\
         sandbox: {{ cache_dir: \"{}\" }}\n\
         plugins:\n  grants:\n{grants}",
        cache.display()
    );
    let file = root.join("sandpipe.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = Config::load(&file).unwrap();
    let runtime = runtime();
    runtime.block_on(async {
        let assembled = assemble_with(config, Vec::new()).await.unwrap();
        assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = current_rss_kib();
        let pipeline = assembled.pipeline();
        let messages = 1000;
        let listener = Arc::new(MemoryListener::new(
            (0..messages)
                .map(|i| {
                    format!(r#"{{"uuid_ref":"m-{i}","data_type":"test/probe-0","action":"done"}}"#)
                })
                .collect(),
        ));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let summary = pipeline.run(listener, shutdown).await.unwrap();
        assert_eq!(summary.done, messages as u64, "{summary}");
        (rss, started.elapsed().as_secs_f64() * 1e6 / messages as f64)
    })
}

/// The process's resident set size now (VmRSS), in KiB.
fn current_rss_kib() -> f64 {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
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
        cpu_us: of(|m| m.cpu_us),
    }
}

fn spawn(scenario: &Scenario, mode: Mode, messages: usize) -> Measured {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if scenario.name.starts_with("http") {
        command.env(HTTP_PORT, http_server().to_string());
    }
    let out = command
        .args(["--child", scenario.name, mode.arg(), "--messages"])
        .arg(messages.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {mode:?}: {}",
        scenario.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    Measured {
        per_second: v[0],
        p50_us: v[1],
        p99_us: v[2],
        peak_rss_kib: v[3],
        cpu_us: v[4],
    }
}

/// One run in this process: assemble, feed `messages`, drain, measure.
fn child(scenario: &Scenario, mode: Mode, messages: usize) -> Measured {
    let native = mode == Mode::Native;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/t4k.txt"), text_4k()).unwrap();
    std::fs::copy(
        guests::root().join("examples/quickstart/data/images/gradient.jpg"),
        root.join("data/gradient.jpg"),
    )
    .unwrap();
    let examples = guests::root().join("examples/plugins");
    std::fs::copy(
        examples.join("python-csv/sample/people.csv"),
        root.join("data/people.csv"),
    )
    .unwrap();
    std::fs::copy(
        examples.join("js-validate/sample/order.json"),
        root.join("data/order.json"),
    )
    .unwrap();
    if !native {
        std::fs::copy(
            component(scenario).unwrap(),
            root.join("plugins")
                .join(format!("{}.wasm", scenario.plugin)),
        )
        .unwrap();
    }
    // The connector's table, made at start in every mode.
    if scenario.init {
        std::fs::copy(
            guests::init_script(scenario.krate),
            root.join(format!("{}.init.sql", scenario.plugin)),
        )
        .unwrap();
    }
    // The reused mode adds `reuse` to the grant: as many warm instances as
    // messages in flight.
    let reuse = format!("reuse: {{ instances: {} }}", scenario.concurrency);
    let grant = match (mode, scenario.grant) {
        (Mode::Reused, "{}") => format!("{{ {reuse} }}"),
        (Mode::Reused, grant) => format!("{{ {reuse}, {}", &grant[2..]),
        _ => scenario.grant.to_owned(),
    };
    let cache = guests::guest_target_dir().join("bench-code-cache");
    let yaml = format!(
        "listener: {{ type: dir, path: unused }}\n\
         data_store: {{ type: disk, root: data }}\n\
         database: {{ type: sqlite }}\n\
         outputs: {{ stats: {{ type: dir, path: out }} }}\n\
         sandbox: {{ cache_dir: \"{}\"{} }}\n\
         pipeline: {{ concurrency: {} }}\n\
         plugins:\n  grants:\n    {}: {}\n",
        cache.display(),
        scenario.sandbox,
        scenario.concurrency,
        scenario.plugin,
        grant
    );
    let file = root.join("sandpipe.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = Config::load(&file).unwrap();

    let runtime = runtime();
    runtime.block_on(async {
        let natives: Vec<(String, Arc<dyn NativePlugin>)> = match (native, scenario.name) {
            (false, _) => Vec::new(),
            (true, "trivial" | "trivial-c64" | "trivial-dirty-reset") => {
                vec![(scenario.plugin.into(), Arc::new(Trivial))]
            }
            (true, "image-meta") => vec![(scenario.plugin.into(), Arc::new(ImageMetaNative))],
            (true, "http-get-1k" | "http-get-1k-dirty-reset") => {
                vec![(scenario.plugin.into(), Arc::new(HttpFetch))]
            }
            (true, _) => vec![(scenario.plugin.into(), Arc::new(TextStats))],
        };
        let assembled = assemble_with(config, natives).await.unwrap();
        assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
        let pipeline = assembled.pipeline();
        let listener = Arc::new(MemoryListener::new(
            (0..messages).map(|i| (scenario.body)(i)).collect(),
        ));
        let latencies = listener.latencies.clone();
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let cpu_before = cpu_seconds();
        let summary = pipeline.run(listener, shutdown).await.unwrap();
        let elapsed = started.elapsed();
        let cpu = cpu_seconds() - cpu_before;
        assert_eq!(summary.done, messages as u64, "{summary}");
        let mut latencies: Vec<f64> = latencies
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_secs_f64() * 1e6)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        Measured {
            per_second: messages as f64 / elapsed.as_secs_f64(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            peak_rss_kib: peak_rss_kib(),
            cpu_us: cpu * 1e6 / messages as f64,
        }
    })
}

/// The process's CPU time so far (user + system, /proc/self/stat, in
/// clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12
    // after the state field.
    (ticks(11) + ticks(12)) / 100.0
}

/// A multi-threaded runtime, as the engine's binary uses.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// 4 KiB of words and lines.
fn text_4k() -> Vec<u8> {
    let line = b"the quick brown fox jumps over the lazy dog, again and again\n";
    line.iter().copied().cycle().take(4096).collect()
}

/// The process's peak resident set size (VmHWM), in KiB.
fn peak_rss_kib() -> f64 {
    proc_status_kib("VmHWM:")
}

/// Every message there from the start; each delivery's latency is from the
/// moment the pipeline takes it to its settlement.
struct MemoryListener {
    queue: Mutex<VecDeque<String>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl MemoryListener {
    fn new(bodies: Vec<String>) -> Self {
        let n = bodies.len();
        Self {
            queue: Mutex::new(bodies.into()),
            latencies: Arc::new(Mutex::new(Vec::with_capacity(n))),
        }
    }
}

#[async_trait]
impl Listener for MemoryListener {
    async fn recv(&self) -> anyhow::Result<Option<Delivery>> {
        let Some(body) = self.queue.lock().unwrap().pop_front() else {
            return Ok(None);
        };
        Ok(Some(Delivery {
            body: Bytes::from(body),
            headers: Vec::new(),
            attempt: 1,
            first: true,
            name: String::new(),
            acker: Box::new(Timer {
                taken: Instant::now(),
                latencies: self.latencies.clone(),
            }),
        }))
    }
}

struct Timer {
    taken: Instant,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl Acker for Timer {
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()> {
        assert!(matches!(settlement, Settlement::Ack), "{settlement:?}");
        self.latencies.lock().unwrap().push(self.taken.elapsed());
        Ok(())
    }
}

/// What a native baseline says of itself: `name`, routed `mime` types.
fn native_description(name: &str, mime: &[&str]) -> Description {
    Description {
        name: name.into(),
        version: "native".into(),
        mime_types: mime.iter().map(|m| (*m).to_owned()).collect(),
        capabilities: Vec::new(),
    }
}

/// The message's body as JSON (as the fixtures' `msg.body_json()`).
fn body_json(msg: &Message) -> Result<serde_json::Value, WitError> {
    serde_json::from_slice(&msg.body).map_err(|e| WitError::Invalid(e.to_string()))
}

/// fx-probe's `done` action natively: parse the body, find the action.
struct Trivial;

impl NativePlugin for Trivial {
    fn describe(&self) -> Description {
        native_description("fx-probe", &["test/probe"])
    }

    fn execute<'a>(
        &'a self,
        _: &'a mut InvocationState,
        msg: Message,
    ) -> BoxFuture<'a, Result<Outcome, WitError>> {
        Box::pin(async move {
            let body = body_json(&msg)?;
            match body.get("action").and_then(|a| a.as_str()) {
                Some("done") => Ok(Outcome::Done),
                other => Err(WitError::Invalid(format!("unexpected action {other:?}"))),
            }
        })
    }
}

/// fx-http's `fetch` natively: one GET through the same host code a
/// component's `wasi:http/outgoing-handler.handle` reaches (the `http`
/// capability's `send_request`: grant, quota, allow-list, address check,
/// connection, metered body), the body read whole.
struct HttpFetch;

impl NativePlugin for HttpFetch {
    fn describe(&self) -> Description {
        native_description("fx-http", &["test/http"])
    }

    fn execute<'a>(
        &'a self,
        state: &'a mut InvocationState,
        msg: Message,
    ) -> BoxFuture<'a, Result<Outcome, WitError>> {
        use http_body_util::BodyExt as _;
        use wasmtime_wasi_http::WasiHttpHooks as _;
        Box::pin(async move {
            let body = body_json(&msg)?;
            let url = body.get("url").and_then(|u| u.as_str()).unwrap_or_default();
            let uri: http::Uri = url.parse().map_err(|_| WitError::Invalid(url.into()))?;
            let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let request = http::Request::get(uri)
                .header(http::header::HOST, host)
                .body(
                    http_body_util::Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .unwrap();
            let sent = state
                .host
                .send_request(request, None, Box::new(async { Ok(()) }));
            let (response, _io) = Box::into_pin(sent)
                .await
                .map_err(|e| WitError::Unavailable(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| WitError::Unavailable(e.to_string()))?
                .to_bytes();
            if status != 200 || bytes.len() > 1 << 20 {
                return Err(WitError::Unavailable(format!("{url} answered {status}")));
            }
            Ok(Outcome::Done)
        })
    }
}

/// text-stats natively: its own counter and summary (the crate, linked as
/// a library), through the same host calls its component makes.
struct TextStats;

impl NativePlugin for TextStats {
    fn describe(&self) -> Description {
        native_description("text-stats", &["text/plain"])
    }

    fn execute<'a>(
        &'a self,
        state: &'a mut InvocationState,
        msg: Message,
    ) -> BoxFuture<'a, Result<Outcome, WitError>> {
        Box::pin(async move {
            let reader = match blob::Host::open_data(state).await {
                Ok(reader) => reader,
                Err(WitError::NotFound(what)) => {
                    return Ok(Outcome::DeadLetter(format!("no data object: {what}")));
                }
                Err(other) => return Err(other),
            };
            let mut counter = text_stats::TextCounter::new();
            loop {
                let borrowed = Resource::new_borrow(reader.rep());
                let chunk = blob::HostReader::read(state, borrowed, text_stats::CHUNK).await?;
                if chunk.is_empty() {
                    break;
                }
                counter.feed(&chunk);
            }
            blob::HostReader::drop(state, reader)
                .await
                .map_err(|e| WitError::Internal(e.to_string()))?;
            let stats = counter.stats();
            let location = msg.data_location.clone();
            let int = |n: u64| sql::Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
            sql::Host::execute(
                state,
                text_stats::UPSERT.into(),
                vec![
                    sql::Value::Text(msg.id.clone()),
                    location.clone().map_or(sql::Value::Null, sql::Value::Text),
                    int(stats.lines),
                    int(stats.words),
                    int(stats.bytes),
                ],
            )
            .await?;
            let output = config::Host::get(state, "output".into())
                .await?
                .unwrap_or_else(|| text_stats::DEFAULT_OUTPUT.into());
            let summary = text_stats::summary(&msg.id, location.as_deref(), stats);
            emit::Host::publish(
                state,
                output.clone(),
                serde_json::to_vec(&summary).unwrap_or_default(),
                vec![("content-type".into(), "application/json".into())],
            )
            .await?;
            log::Host::write(
                state,
                log::Level::Info,
                format!(
                    "{}: {} lines, {} words, {} bytes -> {output}",
                    location.as_deref().unwrap_or(&msg.id),
                    stats.lines,
                    stats.words,
                    stats.bytes
                ),
            )
            .await?;
            Ok(Outcome::Done)
        })
    }
}

/// image-meta natively: its own header parser (the crate, linked as a
/// library) on the first chunk of the object, read through the same host
/// calls as its component (one 64 KiB chunk, as the SDK's reader asks for),
/// then the upsert and the log line (the table is init.sql's, as for the
/// component).
struct ImageMetaNative;

impl NativePlugin for ImageMetaNative {
    fn describe(&self) -> Description {
        native_description("image-meta", &["image/jpeg", "image/png", "image/gif"])
    }

    fn execute<'a>(
        &'a self,
        state: &'a mut InvocationState,
        msg: Message,
    ) -> BoxFuture<'a, Result<Outcome, WitError>> {
        use image_meta::header::{self, Dimensions, Format};
        Box::pin(async move {
            let Some(format) = Format::from_mime(&msg.kind) else {
                return Ok(Outcome::Skip(format!(
                    "type {:?} is not an image",
                    msg.kind
                )));
            };
            let reader = blob::Host::open_data(state).await?;
            let chunk =
                blob::HostReader::read(state, Resource::new_borrow(reader.rep()), 64 * 1024)
                    .await?;
            let size = blob::HostReader::size(state, Resource::new_borrow(reader.rep())).await;
            blob::HostReader::drop(state, reader)
                .await
                .map_err(|e| WitError::Internal(e.to_string()))?;
            let Dimensions { width, height } =
                match header::probe(format, &mut std::io::Cursor::new(&chunk)) {
                    Ok(dims) => dims,
                    Err(e) => return Ok(Outcome::DeadLetter(format!("not valid: {e}"))),
                };
            let bytes = size.unwrap_or(chunk.len() as u64);
            let location = msg.data_location.clone();
            sql::Host::execute(
                state,
                image_meta::UPSERT.into(),
                vec![
                    sql::Value::Text(msg.id.clone()),
                    location.clone().map_or(sql::Value::Null, sql::Value::Text),
                    sql::Value::Text(format.name().into()),
                    sql::Value::Int(i64::from(width)),
                    sql::Value::Int(i64::from(height)),
                    sql::Value::Int(i64::try_from(bytes).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
            log::Host::write(
                state,
                log::Level::Info,
                format!(
                    "{}: {} {width}x{height}, {bytes} bytes",
                    location.as_deref().unwrap_or(&msg.id),
                    format.label()
                ),
            )
            .await?;
            Ok(Outcome::Done)
        })
    }
}
