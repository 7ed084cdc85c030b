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
