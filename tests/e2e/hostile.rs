//! The hostile plugin corpus (fx-hostile) against a running engine: each
//! attack on a host-side limit or on isolation ends as a typed failure of
//! that plugin on that message, with a clear reason, in the status log and
//! in the metrics; the engine stays ready, and a well-behaved plugin's
//! message in the same run is done.

use std::io::Write as _;
use std::time::{Duration, Instant};

use sandpipe::pipeline::Summary;

use crate::harness::{Deployment, free_port, get};

/// A deployment of `plugins` serving `/readyz` and `/metrics` on a port of
/// its own; failures are final at once (one attempt).
pub fn served(plugins: &[(&str, &str)], extra: &str) -> (Deployment, u16) {
    let port = free_port();
    let d = Deployment::new(
        plugins,
        &format!(
            "server: {{ listen: \"127.0.0.1:{port}\" }}\nretry: {{ max_attempts: 1, backoff: {{ initial: 10ms }} }}\n{extra}"
        ),
    );
    (d, port)
}

/// What a served run saw.
pub struct Served {
    /// The run's counts.
    pub summary: Summary,
    /// `/readyz` (status, body) once every message was settled.
    pub ready: Option<(u16, String)>,
    /// The process's Prometheus text afterwards.
    pub metrics: String,
}

/// Run the engine (`run`, not `--once`) until `n` messages are settled
/// (in `spool/done` or `spool/dead`), ask `/readyz`, then stop it.
pub async fn serve(d: &Deployment, port: u16, n: usize) -> Served {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let dead = d
            .files("spool/dead")
            .iter()
            .filter(|f| !f.ends_with(".error.json"))
            .count();
        if d.files("spool/done").len() + dead >= n {
            break;
        }
        assert!(
            !engine.is_finished(),
            "the engine stopped: {:?}",
            engine.await
        );
        assert!(
            Instant::now() < deadline,
            "{n} messages were not settled in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = tokio::task::spawn_blocking(move || get(port, "/readyz"))
        .await
        .unwrap();
    tx.send(true).unwrap();
    let summary = engine.await.unwrap().unwrap();
    Served {
        summary,
        ready,
        metrics: sandpipe::metrics::handle().render(),
    }
}

/// The value of one Prometheus series, e.g.
/// `sandpipe_limit_exceeded_total{plugin="x",limit="emits"}`; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Put a `test/hostile` message asking for `fields` (an object with at
/// least `action`) in the spool, as `<id>.json`.
pub fn hostile(d: &Deployment, id: &str, fields: serde_json::Value) {
    put(d, id, "test/hostile", fields);
}

/// Put a message of type `kind` with id `id` and `fields` (an object; a
/// `data_type` among them replaces `kind`) in the spool, as `<id>.json`.
pub fn put(d: &Deployment, id: &str, kind: &str, fields: serde_json::Value) {
    let mut body = serde_json::json!({"uuid_ref": id, "data_type": kind});
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    d.message(&format!("{id}.json"), &body.to_string());
}

/// A well-behaved fx-probe message doing `action`.
fn probe(d: &Deployment, id: &str, action: &str) {
    let body = serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action});
    d.message(&format!("{id}.json"), &body.to_string());
}

/// The engine answered `/readyz` with 200 while and after the attacks.
fn assert_ready(served: &Served) {
    assert_eq!(
        served.ready,
        Some((200, "ready\n".to_owned())),
        "the engine was not ready after the attacks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_log_line_and_a_flood_of_log_calls_hit_the_log_quotas() {
    let (d, port) = served(
        &[("fx-hostile", "hl-log"), ("fx-probe", "hl-log-probe")],
        "",
    );
    hostile(
        &d,
        "m-log-line",
        serde_json::json!({"action": "log-line", "bytes": 1 << 20}),
    );
    hostile(
        &d,
        "m-log-flood",
        serde_json::json!({"action": "log-flood", "count": 1_000_000, "bytes": 100}),
    );
    // Empty lines use no log bytes: the host-call quota stops them.
    hostile(
        &d,
        "m-log-empty",
        serde_json::json!({"action": "log-flood", "count": 1_000_000, "bytes": 0}),
    );
    // Under the quota, the same plugin logs fine.
    hostile(
        &d,
        "m-log-fine",
        serde_json::json!({"action": "log-flood", "count": 100, "bytes": 100}),
    );
    probe(&d, "m-log-probe", "log");
    let served = serve(&d, port, 5).await;
    assert_ready(&served);
    assert_eq!(
        (served.summary.done, served.summary.dead),
        (2, 3),
        "{}",
        served.summary
    );

    let line = d.last("m-log-line", "hl-log").await;
    assert_eq!(line.status, "failed");
    assert!(
        line.info.starts_with("plugin-error: limit-exceeded: log quota of 64.0 KiB per invocation exceeded (1048576 bytes written or asked for) (limits.log_bytes)"),
        "{}",
        line.info
    );
    let flood = d.last("m-log-flood", "hl-log").await;
    // 655 lines of 100 bytes fit in 64 KiB; the 656th is refused.
    assert!(
        flood.info.starts_with("plugin-error: limit-exceeded: log quota of 64.0 KiB per invocation exceeded (65600 bytes written or asked for) (limits.log_bytes)"),
        "{}",
        flood.info
    );
    let empty = d.last("m-log-empty", "hl-log").await;
    assert!(
        empty.info.starts_with("plugin-error: limit-exceeded: more than 100000 host calls in one invocation (limits.host_calls)"),
        "{}",
        empty.info
    );
    assert_eq!(d.last("m-log-fine", "hl-log").await.status, "done");
    assert_eq!(d.last("m-log-probe", "hl-log-probe").await.status, "done");

    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-log",limit="log_bytes"}"#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-log",limit="host_calls"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-log",status="failed"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-log",status="done"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-log-probe",status="done"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_emit_and_thousands_of_emits_hit_the_emit_quotas_and_publish_nothing() {
    let (d, port) = served(
        &[("fx-hostile", "hl-emit"), ("fx-probe", "hl-emit-probe")],
        "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    hl-emit: { emit: [out] }\n    hl-emit-probe: { emit: [out] }\n",
    );
    // 32 MiB in one emit: past the 16 MiB per invocation.
    hostile(
        &d,
        "m-emit-big",
        serde_json::json!({"action": "emit-big", "bytes": 32 << 20}),
    );
    // 100000 emits: past the 1000 per invocation.
    hostile(
        &d,
        "m-emit-many",
        serde_json::json!({"action": "emit-many", "count": 100_000}),
    );
    hostile(
        &d,
        "m-emit-fine",
        serde_json::json!({"action": "emit-many", "count": 10}),
    );
    probe(&d, "m-emit-probe", "emit");
    let served = serve(&d, port, 4).await;
    assert_ready(&served);
    assert_eq!(
        (served.summary.done, served.summary.dead),
        (2, 2),
        "{}",
        served.summary
    );

    let big = d.last("m-emit-big", "hl-emit").await;
    assert!(
        big.info.starts_with("plugin-error: limit-exceeded: emitting 33554432 more bytes would exceed 16.0 MiB in one invocation (0 already emitted) (limits.emit_bytes)"),
        "{}",
        big.info
    );
    let many = d.last("m-emit-many", "hl-emit").await;
    assert!(
        many.info.starts_with(
            "plugin-error: limit-exceeded: more than 1000 emits in one invocation (limits.emits)"
        ),
        "{}",
        many.info
    );
    // Only the well-behaved invocations published: 10 + 1 files, none of
    // the 1000 emits queued before the refusal.
    let out = d.files("out");
    assert_eq!(out.len(), 11, "{out:?}");
    assert!(
        out.iter()
            .all(|f| f.starts_with("m-emit-fine.") || f.starts_with("m-emit-probe.")),
        "{out:?}"
    );

    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-emit",limit="emit_bytes"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-emit",limit="emits"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-emit",status="failed"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-emit-probe",status="done"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_sql_result_hits_the_row_and_byte_limits_on_sqlite() {
    let (d, port) = served(
        &[("fx-hostile", "hl-sql"), ("fx-probe", "hl-sql-probe")],
        "plugins:\n  grants:\n    hl-sql: { sql: true }\n    hl-sql-probe: { sql: true }\n",
    );
    let rows = |n: u32| {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c"
        )
    };
    hostile(
        &d,
        "m-sql-rows",
        serde_json::json!({"action": "sql-query", "sql": rows(1_000_000)}),
    );
    // One row, one value of 48 MiB: past the 16 MiB of values per query.
    hostile(
        &d,
        "m-sql-wide",
        serde_json::json!({"action": "sql-query", "sql": "SELECT zeroblob(50331648)"}),
    );
    // 2000 rows of 10 KiB: under the row limit, past the bytes.
    hostile(
        &d,
        "m-sql-many-wide",
        serde_json::json!({"action": "sql-query", "sql": format!("SELECT zeroblob(10240) FROM ({})", rows(2000))}),
    );
    hostile(
        &d,
        "m-sql-fine",
        serde_json::json!({"action": "sql-query", "sql": rows(10_000)}),
    );
    probe(&d, "m-sql-probe", "sql");
    let served = serve(&d, port, 5).await;
    assert_ready(&served);
    assert_eq!(
        (served.summary.done, served.summary.dead),
        (2, 3),
        "{}",
        served.summary
    );

    let many = d.last("m-sql-rows", "hl-sql").await;
    assert!(
        many.info.starts_with(
            "plugin-error: limit-exceeded: query returned more than 10000 rows (limits.sql_rows)"
        ),
        "{}",
        many.info
    );
    for id in ["m-sql-wide", "m-sql-many-wide"] {
        let wide = d.last(id, "hl-sql").await;
        assert!(
            wide.info.starts_with("plugin-error: limit-exceeded: query returned more than 16.0 MiB of values (limits.sql_bytes)"),
            "{id}: {}",
            wide.info
        );
    }
    // Exactly at the row limit is fine.
    assert_eq!(d.last("m-sql-fine", "hl-sql").await.info, "rows: 10000");
    assert_eq!(d.last("m-sql-probe", "hl-sql-probe").await.status, "done");

    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-sql",limit="sql_rows"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-sql",limit="sql_bytes"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-sql",status="failed"}"#
        ),
        3.0
    );
}

/// FNV-1a 64 as the fixture computes it.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_object_far_larger_than_the_memory_limit_is_streamed_to_done() {
    let (d, port) = served(
        &[("fx-hostile", "hl-blob"), ("fx-probe", "hl-blob-probe")],
        "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    hl-blob: { blob: true, emit: [out], limits: { memory: 16MiB, timeout: 120s } }\n",
    );
    // 200 MiB of pseudo-random bytes, each MiB different.
    const MIB: usize = 1 << 20;
    std::fs::create_dir_all(d.path("data/big")).unwrap();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(d.path("data/big/object.bin")).unwrap());
    let (mut hash, mut x) = (0xcbf2_9ce4_8422_2325_u64, 0x2545_f491_4f6c_dd1d_u64);
    let mut block = vec![0u8; MIB];
    for _ in 0..200 {
        for b in block.iter_mut() {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            *b = (x >> 56) as u8;
        }
        fnv1a(&mut hash, &block);
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    let streamed = serde_json::json!({"action": "blob-digest", "data_location": "big/object.bin"});
    hostile(&d, "m-blob-stream", streamed);
    // The same object read into one buffer: the plugin's own memory limit
    // stops it, not the engine.
    hostile(
        &d,
        "m-blob-slurp",
        serde_json::json!({"action": "blob-slurp", "data_location": "big/object.bin"}),
    );
    probe(&d, "m-blob-probe", "done");
    let served = serve(&d, port, 3).await;
    assert_ready(&served);

    let row = d.last("m-blob-stream", "hl-blob").await;
    assert_eq!(
        (row.status.as_str(), row.info.as_str()),
        ("done", ""),
        "{row:?}"
    );
    let out = d.files("out");
    assert_eq!(out.len(), 1, "{out:?}");
    let emitted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("out").join(&out[0])).unwrap()).unwrap();
    let report = emitted["payload"].as_str().unwrap();
    let expected = format!("bytes={} fnv1a={hash:016x} memory=", 200 * MIB);
    assert!(
        report.starts_with(&expected),
        "{report} (expected {expected}...)"
    );
    let memory: usize = report.rsplit('=').next().unwrap().parse().unwrap();
    assert!(memory <= 16 * MIB, "the plugin's memory grew to {memory}");

    let slurp = d.last("m-blob-slurp", "hl-blob").await;
    assert!(
        slurp
            .info
            .starts_with("memory-limit: memory limit of 16.0 MiB exceeded"),
        "{}",
        slurp.info
    );
    assert_eq!(d.last("m-blob-probe", "hl-blob-probe").await.status, "done");
    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-blob",status="done"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-blob",status="failed"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn holding_data_objects_open_cannot_exhaust_the_engines_files() {
    let (d, port) = served(
        &[("fx-hostile", "hl-open"), ("fx-probe", "hl-open-probe")],
        "plugins:\n  grants:\n    hl-open: { blob: true }\n    hl-open-probe: { sql: true }\n",
    );
    d.data("x.bin", b"x");
    // Each open reader holds a file of the engine's: 100000 of them would
    // run the process out of file descriptors.
    hostile(
        &d,
        "m-open-many",
        serde_json::json!({"action": "blob-open-many", "count": 100_000, "data_location": "x.bin"}),
    );
    hostile(
        &d,
        "m-open-fine",
        serde_json::json!({"action": "blob-open-many", "count": 16, "data_location": "x.bin"}),
    );
    probe(&d, "m-open-probe", "sql");
    let served = serve(&d, port, 3).await;
    assert_ready(&served);
    let row = d.last("m-open-many", "hl-open").await;
    assert!(
        row.info.starts_with("plugin-error: limit-exceeded: more than 16 objects open at once in one invocation (drop a reader to open another) (limits.blob_readers)"),
        "{}",
        row.info
    );
    assert_eq!(d.last("m-open-fine", "hl-open").await.status, "done");
    assert_eq!(d.last("m-open-probe", "hl-open-probe").await.status, "done");
    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-open",limit="blob_readers"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_reasons_denials_and_state_changes_are_bounded() {
    let (d, port) = served(
        &[("fx-hostile", "hl-big"), ("fx-probe", "hl-big-probe")],
        "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    hl-big: { emit: [out], meta: true }\n",
    );
    // A 10 MiB error message: the status log keeps 16 KiB of it.
    hostile(
        &d,
        "m-error-big",
        serde_json::json!({"action": "error-big", "bytes": 10 << 20}),
    );
    // 1000 denied emits, each naming a 1 MiB output: each denial keeps
    // 1 KiB, the status log 16 KiB of them all.
    hostile(
        &d,
        "m-deny-big",
        serde_json::json!({"action": "deny-big", "count": 1000, "bytes": 1 << 20}),
    );
    // 100 state values of 1 MiB: past the 16 MiB of state changes.
    hostile(
        &d,
        "m-state-flood",
        serde_json::json!({"action": "state-flood", "count": 100, "bytes": 1 << 20}),
    );
    probe(&d, "m-big-probe", "done");
    let served = serve(&d, port, 4).await;
    assert_ready(&served);
    let max = sandpipe::pipeline::MAX_INFO + 64;

    let error = d.last("m-error-big", "hl-big").await;
    assert_eq!(error.status, "failed");
    assert!(
        error.info.starts_with("plugin-error: invalid: eeee"),
        "{}",
        &error.info[..100]
    );
    assert!(
        error.info.len() <= max
            && error
                .info
                .ends_with(&format!("(cut, {} bytes in all)", 10 << 20)),
        "{} bytes: …{}",
        error.info.len(),
        &error.info[error.info.len() - 60..]
    );

    let denied = d.last("m-deny-big", "hl-big").await;
    assert_eq!(denied.status, "done");
    assert!(
        denied
            .info
            .starts_with(" [denied: plugin `hl-big` may not emit to output `oooo"),
        "{}",
        &denied.info[..100]
    );
    assert!(
        denied.info.contains("… (cut, 1048632 bytes in all)"),
        "…{}",
        &denied.info[..1200]
    );
    assert!(denied.info.len() <= max, "{} bytes", denied.info.len());

    let state = d.last("m-state-flood", "hl-big").await;
    assert!(
        state.info.starts_with("plugin-error: limit-exceeded: a state change of 1048579 bytes would exceed 16.0 MiB in one invocation")
            && state.info.ends_with("(limits.state_bytes)"),
        "{}",
        state.info
    );
    assert_eq!(d.last("m-big-probe", "hl-big-probe").await.status, "done");
    let m = &served.metrics;
    assert_eq!(
        metric(m, r#"sandpipe_denied_calls_total{plugin="hl-big"}"#),
        1000.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="hl-big",limit="state_bytes"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_random_of_the_plugins_size_is_refused_before_the_engine_allocates_it() {
    let (d, port) = served(
        &[("fx-hostile", "hl-random"), ("fx-probe", "hl-random-probe")],
        "plugins:\n  grants:\n    hl-random: { limits: { memory: 16MiB } }\n",
    );
    // 32 MiB asked of the host (under wasmtime's own 64 MiB cap), by a
    // plugin with 16 MiB of memory: without the engine's cap, the host
    // allocated it all, then the plugin failed to take it.
    hostile(
        &d,
        "m-random-big",
        serde_json::json!({"action": "wasi-random", "bytes": 32 << 20}),
    );
    hostile(
        &d,
        "m-random-fine",
        serde_json::json!({"action": "wasi-random", "bytes": 4096}),
    );
    probe(&d, "m-random-probe", "done");
    let served = serve(&d, port, 3).await;
    assert_ready(&served);
    let big = d.last("m-random-big", "hl-random").await;
    assert_eq!(big.status, "failed");
    assert_eq!(
        big.info,
        "trap: requested len 33554432 exceeds limit 1048576"
    );
    assert_eq!(
        d.last("m-random-fine", "hl-random").await.info,
        "got 4096 random bytes"
    );
    assert_eq!(
        d.last("m-random-probe", "hl-random-probe").await.status,
        "done"
    );
}

/// Every file under `dir` (recursively) whose content is what `blob-put`
/// writes, relative to `dir`.
fn escaped_files(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path).is_ok_and(|b| b.starts_with(b"escaped ")) {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_blob_locations_are_refused_and_nothing_is_written_outside() {
    let (d, port) = served(
        &[("fx-hostile", "hl-paths"), ("fx-probe", "hl-paths-probe")],
        "plugins:\n  grants:\n    hl-paths: { blob: { read: [shared/], write: [out/] } }\n",
    );
    d.data("shared/ok.txt", b"granted");
    d.data("secret.txt", b"not granted");
    let outside = format!("/tmp/sandpipe-escape-{}", uuid::Uuid::new_v4().simple());
    let config = d.config.display().to_string();
    // (location, "denied" for access-denied | "invalid")
    let opens: Vec<(String, &str)> = vec![
        ("secret.txt".into(), "denied"),
        ("sharedX/ok.txt".into(), "denied"),
        ("../sandpipe.yaml".into(), "denied"),
        ("/etc/passwd".into(), "denied"),
        (config.clone(), "denied"),
        ("file:///etc/passwd".into(), "denied"),
        ("http://127.0.0.1:1/x".into(), "denied"),
        ("shared/../secret.txt".into(), "invalid"),
        ("shared/../../sandpipe.yaml".into(), "invalid"),
        ("shared/%2e%2e/secret.txt".into(), "invalid"),
        ("shared/..%2fsecret.txt".into(), "invalid"),
        ("shared\\..\\secret.txt".into(), "denied"),
        ("shared/./ok.txt".into(), "invalid"),
        ("shared//ok.txt".into(), "invalid"),
        ("shared/ok.txt\u{0}".into(), "invalid"),
        ("shared/s3://bucket/key".into(), "invalid"),
        ("shared/C:\\Windows\\win.ini".into(), "invalid"),
    ];
    let puts: Vec<(String, &str)> = vec![
        ("escape.txt".into(), "denied"),
        ("../escape.txt".into(), "denied"),
        (outside.clone(), "denied"),
        (format!("file://{outside}"), "denied"),
        ("out/../escape.txt".into(), "invalid"),
        ("out/../../escape.txt".into(), "invalid"),
        (format!("out/../../../../../../../..{outside}"), "invalid"),
        ("out/%2e%2e/escape.txt".into(), "invalid"),
        ("out\\..\\escape.txt".into(), "denied"),
        ("out/./x.txt".into(), "invalid"),
        ("out//x.txt".into(), "invalid"),
        ("out/x.txt\u{0}".into(), "invalid"),
        (format!("out/file:{outside}"), "invalid"),
    ];
    for (i, (location, _)) in opens.iter().enumerate() {
        hostile(
            &d,
            &format!("m-open-{i:02}"),
            serde_json::json!({"action": "blob-open", "location": location}),
        );
    }
    for (i, (location, _)) in puts.iter().enumerate() {
        hostile(
            &d,
            &format!("m-put-{i:02}"),
            serde_json::json!({"action": "blob-put", "location": location}),
        );
    }
    hostile(
        &d,
        "m-open-ok",
        serde_json::json!({"action": "blob-open", "location": "shared/ok.txt"}),
    );
    hostile(
        &d,
        "m-put-ok",
        serde_json::json!({"action": "blob-put", "location": "out/ok.txt"}),
    );
    // A message whose own data location escapes is refused before any plugin runs.
    d.message(
        "m-own.json",
        r#"{"uuid_ref":"m-own","data_type":"test/hostile","action":"blob-digest","data_location":"../sandpipe.yaml"}"#,
    );
    probe(&d, "m-paths-probe", "done");
    let n = opens.len() + puts.len() + 4;
    let served = serve(&d, port, n).await;
    assert_ready(&served);
    assert_eq!(
        (served.summary.done, served.summary.dead),
        (3, (n - 3) as u64),
        "{}",
        served.summary
    );

    let mut denied = 0;
    for (prefix, cases) in [("m-open", &opens), ("m-put", &puts)] {
        for (i, (location, kind)) in cases.iter().enumerate() {
            let row = d.last(&format!("{prefix}-{i:02}"), "hl-paths").await;
            assert_eq!(row.status, "failed", "{location:?}: {row:?}");
            let expected = if *kind == "denied" {
                denied += 1;
                "denied-call: access-denied: plugin `hl-paths` may not"
            } else {
                "plugin-error: invalid: invalid location"
            };
            assert!(row.info.starts_with(expected), "{location:?}: {}", row.info);
        }
    }
    assert_eq!(d.last("m-open-ok", "hl-paths").await.status, "done");
    assert_eq!(d.last("m-put-ok", "hl-paths").await.status, "done");
    let own = d.rows("m-own").await;
    let last = own.last().unwrap();
    assert_eq!(last.status, "dead");
    assert!(
        last.info
            .starts_with("bad data_location: invalid location `../sandpipe.yaml`"),
        "{}",
        last.info
    );
    assert_eq!(
        d.last("m-paths-probe", "hl-paths-probe").await.status,
        "done"
    );

    // The one granted write is the only file written, anywhere.
    assert_eq!(
        escaped_files(d.dir.path()),
        vec!["data/out/ok.txt".to_owned()]
    );
    assert!(
        !std::path::Path::new(&outside).exists(),
        "{outside} was written"
    );
    let m = &served.metrics;
    assert_eq!(
        metric(m, r#"sandpipe_denied_calls_total{plugin="hl-paths"}"#),
        f64::from(denied),
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-paths",status="failed"}"#
        ),
        (n - 4) as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_attacks_through_the_component_are_refused_on_sqlite() {
    let (d, port) = served(
        &[("fx-hostile", "hl-sqlite"), ("fx-probe", "hl-sqlite-probe")],
        "plugins:\n  grants:\n    hl-sqlite: { sql: true }\n    hl-sqlite-probe: { sql: true }\n",
    );
    let engine_db = d.path("state/sandpipe.sqlite").display().to_string();
    let other = d
        .path("state/plugins/hl-sqlite-probe.sqlite")
        .display()
        .to_string();
    let outside = d.path("outside.sqlite").display().to_string();
    // (action, statement, "denied" | "invalid")
    let attacks: Vec<(&str, String, &str)> = vec![
        (
            "sql",
            "CREATE TABLE a(x); CREATE TABLE b(x)".into(),
            "invalid",
        ),
        (
            "sql",
            "INSERT INTO mine VALUES (1); DROP TABLE mine".into(),
            "invalid",
        ),
        (
            "sql",
            format!("ATTACH DATABASE '{engine_db}' AS engine"),
            "denied",
        ),
        (
            "sql",
            format!("ATTACH DATABASE '{other}' AS other"),
            "denied",
        ),
        ("sql", format!("ATTACH DATABASE '{outside}' AS o"), "denied"),
        ("sql", format!("VACUUM INTO '{outside}'"), "invalid"),
        ("sql", "DETACH DATABASE main".into(), "denied"),
        ("sql-query", "SELECT * FROM status".into(), "invalid"),
        ("sql-query", "SELECT * FROM engine.status".into(), "invalid"),
        ("sql-query", "PRAGMA database_list".into(), "denied"),
        ("sql", "PRAGMA writable_schema = ON".into(), "denied"),
        ("sql", "PRAGMA journal_mode = DELETE".into(), "denied"),
        ("sql", "PRAGMA query_only = OFF".into(), "denied"),
        ("sql", "BEGIN".into(), "denied"),
        ("sql", "COMMIT".into(), "denied"),
        ("sql", "ROLLBACK".into(), "denied"),
        ("sql", "SAVEPOINT s".into(), "denied"),
        ("sql", "RELEASE s".into(), "denied"),
        (
            "sql-query",
            "SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')".into(),
            "denied",
        ),
        (
            "sql",
            "CREATE VIRTUAL TABLE v USING fts5(x)".into(),
            "denied",
        ),
        (
            "sql",
            "INSERT INTO sqlite_master VALUES ('table', 'x', 'x', 0, 'CREATE TABLE x(y)')".into(),
            "invalid",
        ),
        ("sql", "DROP TABLE sqlite_master".into(), "invalid"),
        ("sql", "CREATE TABLE engine.t(x)".into(), "invalid"),
    ];
    for (i, (action, sql, _)) in attacks.iter().enumerate() {
        hostile(
            &d,
            &format!("m-sql-{i:02}"),
            serde_json::json!({"action": action, "sql": sql}),
        );
    }
    // DDL in its own database is allowed.
    hostile(
        &d,
        "m-sql-own-ddl",
        serde_json::json!({"action": "sql", "sql": "CREATE TABLE mine(x)"}),
    );
    probe(&d, "m-sqlite-probe", "sql");
    let n = attacks.len() + 2;
    let served = serve(&d, port, n).await;
    assert_ready(&served);
    assert_eq!(
        (served.summary.done, served.summary.dead),
        (2, attacks.len() as u64),
        "{}",
        served.summary
    );

    for (i, (_, sql, kind)) in attacks.iter().enumerate() {
        let row = d.last(&format!("m-sql-{i:02}"), "hl-sqlite").await;
        assert_eq!(row.status, "failed", "{sql}: {row:?}");
        let expected = if *kind == "denied" {
            "denied-call: access-denied: statement not allowed in a plugin database"
        } else {
            "plugin-error: invalid:"
        };
        assert!(row.info.starts_with(expected), "{sql}: {}", row.info);
    }
    assert!(
        !std::path::Path::new(&outside).exists(),
        "{outside} was written"
    );
    let tables: Vec<String> = d
        .plugin_db("hl-sqlite")
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tables, vec!["mine".to_owned()]);
    // The engine's status log and the other plugin's rows are intact.
    assert_eq!(
        d.last("m-sqlite-probe", "hl-sqlite-probe").await.status,
        "done"
    );
    let probed: i64 = d
        .plugin_db("hl-sqlite-probe")
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(probed, 1);
    let m = &served.metrics;
    let denied = attacks.iter().filter(|a| a.2 == "denied").count();
    assert_eq!(
        metric(m, r#"sandpipe_denied_calls_total{plugin="hl-sqlite"}"#),
        denied as f64,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_plugin_results_total{plugin="hl-sqlite",status="failed"}"#
        ),
        attacks.len() as f64
    );
}

/// The highest resident set size `pid` reached so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

const MIB: u64 = 1 << 20;

/// A deployment running `n` invocations at once, each under `memory`
/// bytes of linear memory and a minute's deadline, failing at their first
/// error; with an output `out` and the YAML `grants` under `plugins:`.
fn at_once(plugins: &[(&str, &str)], n: u64, memory: u64, grants: &str) -> Deployment {
    Deployment::new(
        plugins,
        &format!(
            "pipeline: {{ concurrency: {n} }}\nretry: {{ max_attempts: 1 }}\n\
             outputs:\n  out: {{ type: dir, path: out }}\n\
             plugins:\n  defaults: {{ memory: {}MiB, timeout: 60s }}\n{grants}",
            memory / MIB
        ),
    )
}

/// Run the engine binary (`run --once`) on what `d`'s spool holds, its
/// log (plugins' lines at `info`) in `engine.log`, and return the highest
/// resident set size it reached. Panics, with the log, if it failed.
fn run_once_measuring_peak_rss(d: &Deployment) -> u64 {
    // Its log goes to a file: a pipe nobody reads would fill and stop it.
    let log = std::fs::File::create(d.path("engine.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["run", "--once", "-c"])
        .arg(&d.config)
        .env("SANDPIPE_LOG", "warn,sandpipe=info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(d.path("engine.log")).unwrap_or_default()
    );
    peak
}

/// `peak` is under what `concurrency` instances of `memory` bytes hold,
/// plus a margin for the engine itself (runtime, wasmtime, SQLite, a debug
/// build's code), which with nothing in flight is well under 200 MiB.
fn assert_within_the_instances_memory(what: &str, peak: u64, concurrency: u64, memory: u64) {
    let bound = concurrency * memory + 256 * MIB;
    eprintln!(
        "{what}: peak RSS {} MiB (bound {} MiB)",
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak > 0 && peak < bound,
        "{what}: peak RSS {} MiB, bound {} MiB",
        peak / MIB,
        bound / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_huge_reasons_at_once_cost_no_more_than_the_instances_memory() {
    // 16 invocations at once, each returning a 50 MiB error under a 64 MiB
    // memory limit. The reason is copied out of the guest only as far as
    // the status log keeps it (16 KiB), so the engine holds little more
    // than the 16 instances' memory: before, each reason was lifted and
    // formatted whole (1.6 GiB peak for 16 such messages).
    let (concurrency, memory) = (16u64, 64 * MIB);
    let d = at_once(&[("fx-hostile", "hl-rss")], concurrency, memory, "");
    for i in 0..concurrency {
        hostile(
            &d,
            &format!("m-rss-{i}"),
            serde_json::json!({"action": "error-big", "bytes": 50 << 20}),
        );
    }
    let peak = run_once_measuring_peak_rss(&d);
    for i in 0..concurrency {
        let row = d.last(&format!("m-rss-{i}"), "hl-rss").await;
        assert!(
            row.status == "failed" && row.info.ends_with("… (cut, 52428800 bytes in all)"),
            "{}: {}",
            row.status,
            &row.info[..row.info.len().min(200)]
        );
    }
    assert_within_the_instances_memory("16 reasons of 50 MiB", peak, concurrency, memory);
}

/// Run `concurrency` invocations at once of fx-hostile's `action` (as
/// plugin `plugin`, with the YAML `grants`), each handing the engine
/// `bytes` from untouched memory, under `memory` bytes of linear memory:
/// first with 1 byte each (the control), then with `bytes`. Returns the
/// deployment of the second run, and both runs' peak RSS.
fn zeroed_at_once(
    plugin: &str,
    action: &str,
    bytes: u64,
    (concurrency, memory): (u64, u64),
    grants: &str,
) -> (Deployment, u64, u64) {
    let mut peaks = Vec::new();
    let mut deployment = None;
    for size in [1, bytes] {
        let d = at_once(&[("fx-hostile", plugin)], concurrency, memory, grants);
        for i in 0..concurrency {
            hostile(
                &d,
                &format!("m-{i}"),
                serde_json::json!({"action": action, "bytes": size, "zeroed": true}),
            );
        }
        peaks.push(run_once_measuring_peak_rss(&d));
        deployment = Some(d);
    }
    (deployment.unwrap(), peaks[0], peaks[1])
}

/// The engine's resident memory grew by less than one `bytes` while it
/// handled invocations handing it `bytes` each from untouched memory
/// (`peak`) rather than 1 byte (`control`): it copied none of them.
fn assert_not_copied(what: &str, control: u64, peak: u64, bytes: u64) {
    let grown = peak.saturating_sub(control);
    eprintln!(
        "{what}: peak RSS {} MiB, with 1 byte each {} MiB",
        peak / MIB,
        control / MIB
    );
    assert!(
        grown < bytes / 2,
        "{what}: the engine's peak RSS grew by {} MiB (from {} MiB): it copied what it refuses",
        grown / MIB,
        control / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_huge_log_lines_at_once_are_refused_without_being_copied() {
    // 16 invocations at once, each writing one 50 MiB log line under a
    // 64 MiB memory limit and the default 64 KiB log quota. The quota
    // counts the line's whole length, read in place: the line is refused
    // and never copied (before, each was lifted whole first). The lines
    // are pages the guest never wrote, so the guests' memory holds none of
    // them resident and a copy would show as growth of the engine's peak
    // RSS over the same run with 1-byte lines (it did: +50 to +100 MiB,
    // one line per worker thread at a time).
    let (concurrency, memory) = (16u64, 64 * MIB);
    let bytes = 50 << 20;
    let (d, control, peak) =
        zeroed_at_once("hl-rss-log", "log-line", bytes, (concurrency, memory), "");
    for i in 0..concurrency {
        let row = d.last(&format!("m-{i}"), "hl-rss-log").await;
        assert_eq!(row.status, "failed", "{}", row.info);
        assert!(
            row.info.starts_with("plugin-error: limit-exceeded: log quota of 64.0 KiB per invocation exceeded (52428800 bytes written or asked for) (limits.log_bytes)"),
            "{}",
            row.info
        );
    }
    assert_within_the_instances_memory("16 log lines of 50 MiB", peak, concurrency, memory);
    assert_not_copied("16 log lines of 50 MiB", control, peak, bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_huge_emits_at_once_are_refused_without_being_copied() {
    // 16 invocations at once, each emitting one 50 MiB payload under a
    // 64 MiB memory limit and the default 16 MiB of emits: larger than
    // any plugin of the engine may emit, so it is measured in place and
    // refused, never copied (see the log lines' test for the method).
    let (concurrency, memory) = (16u64, 64 * MIB);
    let bytes = 50 << 20;
    let (d, control, peak) = zeroed_at_once(
        "hl-rss-emit",
        "emit-big",
        bytes,
        (concurrency, memory),
        "  grants:\n    hl-rss-emit: { emit: [out] }\n",
    );
    for i in 0..concurrency {
        let row = d.last(&format!("m-{i}"), "hl-rss-emit").await;
        assert_eq!(row.status, "failed", "{}", row.info);
        assert!(
            row.info.starts_with("plugin-error: limit-exceeded: emitting 52428800 more bytes would exceed 16.0 MiB in one invocation (0 already emitted) (limits.emit_bytes)"),
            "{}",
            row.info
        );
    }
    assert!(d.files("out").is_empty(), "{:?}", d.files("out"));
    assert_within_the_instances_memory("16 emits of 50 MiB", peak, concurrency, memory);
    assert_not_copied("16 emits of 50 MiB", control, peak, bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_line_longer_than_the_cap_and_within_the_quota_is_kept_cut() {
    // The quota raised to 1 MiB: a 100 KiB line passes it and is kept,
    // cut to its first 64 KiB with the note of its whole length.
    let d = Deployment::new(
        &[("fx-hostile", "hl-line")],
        "retry: { max_attempts: 1 }\nplugins:\n  defaults: { log_bytes: 1MiB }\n",
    );
    hostile(
        &d,
        "m-line",
        serde_json::json!({"action": "log-line", "bytes": 100 << 10}),
    );
    run_once_measuring_peak_rss(&d);
    let row = d.last("m-line", "hl-line").await;
    assert_eq!(row.status, "done", "{}", row.info);
    let log = std::fs::read_to_string(d.path("engine.log")).unwrap();
    let kept = format!("{}… (cut, 102400 bytes in all)", "x".repeat(64 << 10));
    assert!(
        log.contains(&kept),
        "no line of 64 KiB with the note in the log ({} bytes): …{}",
        log.len(),
        &log[log.len().saturating_sub(300)..]
    );
    assert!(!log.contains(&"x".repeat((64 << 10) + 1)));
}
