//! Capabilities and grants through a real component (fx-probe): what is
//! granted works and commits only on `done`; what is not is answered
//! `access-denied`, recorded, and refused outright for strict plugins.

use crate::harness::Deployment;

fn probe(d: &Deployment, id: &str, action: &str) {
    d.message(
        &format!("{id}.json"),
        &serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action})
            .to_string(),
    );
}

const GRANTED: &str = "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    probe:\n      sql: true\n      emit: [out]\n      meta: true\n      blob: true\n      config: { greeting: hello }\n";

#[tokio::test(flavor = "multi_thread")]
async fn granted_capabilities_work_and_commit_on_done() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    probe(&d, "m-sql", "sql");
    probe(&d, "m-emit", "emit");
    probe(&d, "m-state-1", "state");
    probe(&d, "m-config", "config");
    d.data("docs/a.txt", &vec![b'x'; 300_000]);
    d.message(
        "m-blob.json",
        r#"{"uuid_ref":"m-blob","data_type":"test/probe","action":"blob","data_location":"docs/a.txt"}"#,
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 5, "{summary}");
    let n: i64 = d
        .plugin_db("probe")
        .query_row("SELECT count(*) FROM t WHERE x = 'm-sql'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let out = d.files("out");
    assert_eq!(out, vec!["m-emit.probe.0.json".to_string()]);
    let emitted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("out/m-emit.probe.0.json")).unwrap()).unwrap();
    assert_eq!(emitted["payload"], "hello");
    for id in ["m-sql", "m-emit", "m-state-1", "m-config", "m-blob"] {
        assert_eq!(d.last(id, "probe").await.status, "done", "{id}");
    }
    assert_eq!(d.files("spool/done").len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_other_than_done_are_recorded_and_publish_nothing() {
    // Every outcome but `done` ends in the right status, with its reason,
    // and publishes nothing.
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    probe(&d, "m-skip", "skip");
    probe(&d, "m-dead", "dead");
    probe(&d, "m-error", "error");
    probe(&d, "m-retry", "retry");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}"); // the skip
    assert_eq!(d.last("m-skip", "probe").await.status, "skipped");
    assert_eq!(d.last("m-dead", "probe").await.status, "dead");
    let err = d.last("m-error", "probe").await;
    assert_eq!((err.status.as_str(), err.attempt), ("failed", 2));
    assert!(
        err.info.contains("plugin-error: invalid: asked"),
        "{}",
        err.info
    );
    let retry = d.last("m-retry", "probe").await;
    assert!(
        retry.info.contains("plugin asked for a retry: asked"),
        "{}",
        retry.info
    );
    assert!(d.files("out").is_empty());
    let dead = d.files("spool/dead");
    assert_eq!(dead.len(), 6, "{dead:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ungranted_interface_answers_access_denied_and_says_which_grant() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "retry: { max_attempts: 1, backoff: { initial: 10ms } }\nplugins:\n  grants:\n    probe: { mime: [test/probe] }\n",
    );
    probe(&d, "m-denied", "sql");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 1);
    let row = d.last("m-denied", "probe").await;
    assert_eq!(row.status, "failed");
    assert!(
        row.info.starts_with("denied-call: access-denied:"),
        "{}",
        row.info
    );
    assert!(
        row.info.contains("plugin `probe` called sql.execute but has no `sql` grant (add `sql: true` under plugins.grants.probe)"),
        "{}",
        row.info
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn undeclared_outputs_are_denied_even_with_an_emit_grant() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    d.message(
        "m.json",
        r#"{"uuid_ref":"m-other-output","data_type":"test/probe","action":"emit","output":"elsewhere"}"#,
    );
    d.run_once().await.unwrap();
    let row = d.last("m-other-output", "probe").await;
    assert!(
        row.info
            .contains("may not emit to output `elsewhere` (granted: out)"),
        "{}",
        row.info
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_lists_ungranted_imports_and_strict_plugins_are_refused() {
    let lenient = Deployment::new(&[("fx-probe", "probe")], "");
    let out = lenient.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("plugin `probe` 0.1.0 (world plugin, sha256 "),
        "{stdout}"
    );
    for interface in ["sql", "emit", "blob", "meta"] {
        assert!(
            stdout.contains(&format!(
                "plugin `probe` imports `{interface}` but has no `{interface}` grant"
            )),
            "{stdout}"
        );
    }

    let strict = Deployment::new(
        &[("fx-probe", "probe")],
        "plugins:\n  grants:\n    probe: { strict: true, sql: true }\n",
    );
    let out = strict.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .contains("error: plugin `probe`: is strict and imports `blob` without a `blob` grant"),
        "{stdout}"
    );
    assert!(!stdout.contains("imports `sql` without"), "{stdout}");

    let out = strict.cli(&["run", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(stderr.contains("is strict and imports"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_hash_that_does_not_match_is_refused() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "plugins:\n  grants:\n    probe: {{ sha256: \"{}\" }}\n",
            "0".repeat(64)
        ),
    );
    let out = d.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("refusing it"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_are_dead_lettered_with_their_reason() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    d.message("broken.json", "{not json");
    d.message("noid.json", r#"{"data_type":"test/probe"}"#);
    d.sqapi("unknown.json", "m-unknown", "application/x-nothing", None);
    d.sqapi(
        "missing.json",
        "m-missing",
        "test/probe",
        Some("nowhere/x.bin"),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 4, "{summary}");
    let reason = |f: &str| -> String {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.path(&format!("spool/dead/{f}.error.json"))).unwrap(),
        )
        .unwrap();
        v["reason"].as_str().unwrap().to_owned()
    };
    assert!(reason("broken.json").starts_with("bad message: message is not valid JSON"));
    assert!(reason("noid.json").contains("required field `uuid_ref`"));
    assert!(reason("unknown.json").contains("no plugin handles MIME type `application/x-nothing`"));
    assert!(reason("missing.json").contains("data object `nowhere/x.bin` not found"));
    let rows = d.rows("m-missing").await;
    assert_eq!(rows.last().unwrap().status, "dead");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_invocation_commits_none_of_its_effects() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    probe(&d, "m-sql-ok", "sql");
    probe(&d, "m-sql-then-error", "sql-then-error");
    probe(&d, "m-emit-then-retry", "emit-then-retry");
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 2), "{summary}");
    let db = d.plugin_db("probe");
    let ids: Vec<String> = db
        .prepare("SELECT x FROM t ORDER BY x")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, vec!["m-sql-ok".to_string()], "rolled-back rows leaked");
    assert!(
        d.files("out").is_empty(),
        "an emit of a failed invocation was published"
    );
    let row = d.last("m-sql-then-error", "probe").await;
    assert!(row.info.contains("internal: after sql"), "{}", row.info);
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_config_and_state_reach_the_plugin() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    std::fs::create_dir_all(d.path("meta")).unwrap();
    std::fs::write(
        d.path("meta/m1.json"),
        r#"{"from_file": "yes", "shared": "file"}"#,
    )
    .unwrap();
    d.message(
        "a.json",
        r#"{"uuid_ref":"m-meta","data_type":"test/probe","action":"echo-meta","meta_location":"m1.json","metadata":{"inline":1,"shared":"inline"}}"#,
    );
    probe(&d, "m-config", "echo-config");
    probe(&d, "m-state-1", "echo-state");
    d.run_once().await.unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&d.last("m-meta", "probe").await.info).unwrap();
    assert_eq!(
        meta,
        serde_json::json!({"from_file": "yes", "inline": 1, "shared": "file"})
    );
    assert_eq!(d.last("m-config", "probe").await.info, "greeting=hello");
    assert_eq!(d.last("m-state-1", "probe").await.info, "counter=1");
    // `skip` discards effects, so that counter was never stored; `done`
    // stores it, and state survives across messages and runs.
    probe(&d, "m-state-2", "echo-state");
    d.run_once().await.unwrap();
    assert_eq!(d.last("m-state-2", "probe").await.info, "counter=1");
    // State is last-writer-wins across concurrent invocations of a plugin,
    // so the two increments run one after the other.
    probe(&d, "m-state-3", "state");
    d.run_once().await.unwrap();
    probe(&d, "m-state-4", "state");
    d.run_once().await.unwrap();
    probe(&d, "m-state-5", "echo-state");
    d.run_once().await.unwrap();
    assert_eq!(d.last("m-state-5", "probe").await.info, "counter=3");
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_reaches_nothing_on_the_host() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    probe(&d, "m-wasi", "wasi");
    let _ = std::fs::remove_file("/tmp/sandpipe-fx-probe-escape");
    d.run_once().await.unwrap();
    let info = d.last("m-wasi", "probe").await.info;
    for expected in [
        "file=error",
        "dir=error",
        "write=error",
        "env=0;",
        "args=0;",
        "tcp=error",
        "dns=error",
    ] {
        assert!(info.contains(expected), "expected `{expected}` in: {info}");
    }
    assert!(!std::path::Path::new("/tmp/sandpipe-fx-probe-escape").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_lists_names_versions_mime_and_denied_imports() {
    let d = Deployment::new(
        &[("fx-probe", "probe"), ("text-stats", "text-stats")],
        "plugins:\n  grants:\n    probe: { sql: true }\n",
    );
    let out = d.cli(&["plugins"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let probe_line = stdout.lines().find(|l| l.starts_with("probe ")).unwrap();
    assert!(probe_line.contains("test/probe"), "{probe_line}");
    assert!(probe_line.contains(" plugin "), "the world: {probe_line}");
    assert!(probe_line.contains("sql"), "{probe_line}");
    assert!(probe_line.contains("EMIT"), "{probe_line}");
    let text_line = stdout
        .lines()
        .find(|l| l.starts_with("text-stats "))
        .unwrap();
    assert!(
        text_line.contains("0.1.0") && text_line.contains("text/plain"),
        "{text_line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn send_then_run_processes_the_message_and_sigterm_stops_cleanly() {
    let d = Deployment::new(&[("fx-probe", "probe")], GRANTED);
    let msg = d.path("msg.json");
    std::fs::write(
        &msg,
        r#"{"uuid_ref":"m-sent","data_type":"test/probe","action":"sql"}"#,
    )
    .unwrap();
    let out = d.cli(&["send", msg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.files("spool").len(), 1);

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["run", "-c"])
        .arg(&d.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the message is done, then ask the engine to stop.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while d.files("spool/done").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the message was never processed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("processed 1 message (1 delivery): 1 done, 0 failed, 0 dead-lettered"),
        "{stdout}"
    );
    assert_eq!(d.last("m-sent", "probe").await.status, "done");
}

/// A message asking fx-probe for one `sql.execute-batch` of `rows`.
pub(crate) fn batch(d: &Deployment, id: &str, rows: serde_json::Value) {
    d.message(
        &format!("{id}.json"),
        &serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": "sql-batch", "rows": rows})
            .to_string(),
    );
}

/// The failing batch's skip reason names the list and the constraint.
pub(crate) fn assert_batch_failure(info: &str) {
    assert!(
        info.starts_with("error: invalid: parameter list 1 of 3: "),
        "{info}"
    );
    assert!(info.to_lowercase().contains("null"), "{info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn execute_batch_applies_every_list_or_names_the_failing_one() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "pipeline: { concurrency: 1 }\nplugins:\n  grants:\n    probe: { sql: true }\n",
    );
    batch(
        &d,
        "m-ok",
        serde_json::json!([["a", 1], ["b", 2], ["c", 3]]),
    );
    batch(
        &d,
        "m-bad",
        serde_json::json!([["d", 4], ["e", null], ["f", 6]]),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 2, "{summary}");
    assert_eq!(d.last("m-ok", "probe").await.status, "done");
    let bad = d.last("m-bad", "probe").await;
    assert_eq!(bad.status, "skipped", "{bad:?}");
    assert_batch_failure(&bad.info);
    // The good batch committed; the skipped one committed nothing.
    let ids: Vec<String> = d
        .plugin_db("probe")
        .prepare("SELECT id FROM b ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_init_script_sets_up_its_sqlite_database_under_the_plugin_policy() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "plugins:\n  grants:\n    probe: { sql: { init: probe-init.sql } }\n",
    );
    std::fs::write(
        d.path("probe-init.sql"),
        "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY);\n\
         INSERT OR IGNORE INTO seen VALUES ('from-init');\n",
    )
    .unwrap();
    d.message(
        "m-init.json",
        &serde_json::json!({"uuid_ref": "m-init", "data_type": "test/probe", "action": "sql-exec",
            "sql": "INSERT INTO seen VALUES ('m-init')"})
        .to_string(),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.processed, 1, "{summary}");
    assert_eq!(d.last("m-init", "probe").await.info, "ok: 1");
    let n: i64 = d
        .plugin_db("probe")
        .query_row("SELECT count(*) FROM seen", [], |r| r.get(0))
        .unwrap();
    // (sql-exec skips, so its own INSERT was rolled back.)
    assert_eq!(n, 1);
    // The policy holds for the script too: no ATTACH, and the engine stops
    // naming the plugin and the file.
    std::fs::write(
        d.path("probe-init.sql"),
        "ATTACH DATABASE 'elsewhere.sqlite' AS x;\n",
    )
    .unwrap();
    let err = d.run_once().await.err().map(|e| format!("{e:#}")).unwrap();
    assert!(
        err.contains("probe") && err.contains("probe-init.sql") && err.contains("init"),
        "{err}"
    );
    assert!(!d.path("elsewhere.sqlite").exists());
}
