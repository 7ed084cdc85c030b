//! Traps and limits: every runaway plugin ends as a typed failure of that
//! plugin on that message, and the engine carries on.

use crate::harness::{Deployment, component, shared_cache};
use sandpipe::config::SandboxConfig;
use sandpipe::sandbox::Sandbox;

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_is_recorded_with_the_guests_message_and_dead_lettered_after_max_attempts() {
    let d = Deployment::new(&[("fx-panic", "panicky"), ("fx-probe", "probe")], "");
    d.sqapi("a.json", "m-panic", "test/panic", None);
    d.message(
        "b.json",
        r#"{"uuid_ref":"m-ok","data_type":"test/probe","action":"done"}"#,
    );
    let summary = d.run_once().await.unwrap();
    // m-panic fails, is retried and dead-lettered: three deliveries of two
    // messages.
    assert_eq!(
        (
            summary.processed,
            summary.deliveries,
            summary.done,
            summary.failed,
            summary.dead
        ),
        (2, 3, 1, 0, 1),
        "{summary}"
    );
    let row = d.last("m-panic", "panicky").await;
    assert_eq!(row.status, "failed");
    assert!(
        row.info
            .starts_with("panic: plugin panicked: fixture panic: m-panic"),
        "{}",
        row.info
    );
    assert_eq!(row.attempt, 2);
    assert_eq!(row.component_sha256.len(), 64);
    assert!(!row.plugin_version.is_empty());
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("spool/dead/a.json.error.json")).unwrap())
            .unwrap();
    let reason = sidecar["reason"].as_str().unwrap();
    assert!(reason.contains("failed 2 of 2 attempts"), "{reason}");
    assert!(reason.contains("fixture panic"), "{reason}");
    assert_eq!(d.last("m-ok", "probe").await.status, "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_is_stopped_by_fuel() {
    let d = Deployment::new(
        &[("fx-loop", "looper")],
        "retry: { max_attempts: 1, backoff: { initial: 10ms } }\nplugins:\n  defaults: { fuel: 5000000, timeout: 30s }\n",
    );
    d.sqapi("a.json", "m-fuel", "test/loop", None);
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 1);
    let row = d.last("m-fuel", "looper").await;
    assert!(
        row.info
            .starts_with("out-of-fuel: plugin ran out of fuel (limit 5000000)"),
        "{}",
        row.info
    );
    assert!(row.fuel_used.unwrap() >= 5_000_000, "{row:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_without_fuel_is_stopped_by_the_deadline() {
    let d = Deployment::new(
        &[("fx-loop", "looper")],
        "retry: { max_attempts: 1, backoff: { initial: 10ms } }\nplugins:\n  defaults: { timeout: 300ms }\n",
    );
    d.sqapi("a.json", "m-deadline", "test/loop", None);
    d.sqapi("b.json", "m-deadline-2", "test/loop", None);
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 2);
    let row = d.last("m-deadline", "looper").await;
    assert!(
        row.info
            .starts_with("deadline: plugin exceeded its deadline of 300ms"),
        "{}",
        row.info
    );
    assert!(row.fuel_used.is_none());
    let ms = row.duration_ms.unwrap();
    assert!((300.0..5_000.0).contains(&ms), "stopped after {ms} ms");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_past_the_limit_is_a_memory_failure() {
    let d = Deployment::new(
        &[("fx-memory", "hog")],
        "retry: { max_attempts: 1, backoff: { initial: 10ms } }\nplugins:\n  grants:\n    hog: { limits: { memory: 16MiB } }\n",
    );
    d.sqapi("a.json", "m-mem", "test/memory", None);
    d.run_once().await.unwrap();
    let row = d.last("m-mem", "hog").await;
    assert!(
        row.info
            .starts_with("memory-limit: memory limit of 16.0 MiB exceeded"),
        "{}",
        row.info
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_recursion_is_a_stack_overflow() {
    let d = Deployment::new(
        &[("fx-recurse", "deep")],
        "retry: { max_attempts: 1, backoff: { initial: 10ms } }\n",
    );
    d.sqapi("a.json", "m-stack", "test/recurse", None);
    d.run_once().await.unwrap();
    let row = d.last("m-stack", "deep").await;
    assert!(row.info.starts_with("stack-overflow"), "{}", row.info);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_loads_compiled_code_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: dir.path().to_owned(),
        max_instances: 4,
        ..Default::default()
    };
    let path = component("fx-probe");
    let first = Sandbox::new(&config, 64 << 20, false)
        .unwrap()
        .load(&path)
        .unwrap();
    assert!(!first.from_cache, "a fresh cache cannot hold the component");
    let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(cached.len(), 1);
    // A new engine, as after a restart: the same component comes from disk.
    let second = Sandbox::new(&config, 64 << 20, false)
        .unwrap()
        .load(&path)
        .unwrap();
    assert!(second.from_cache);
    assert_eq!(first.sha256, second.sha256);
    // A different engine configuration (fuel on) must not reuse that code.
    let fuel = Sandbox::new(&config, 64 << 20, true)
        .unwrap()
        .load(&path)
        .unwrap();
    assert!(!fuel.from_cache);
    let _ = shared_cache();
}
