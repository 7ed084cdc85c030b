//! `sandpipe exec` and `sandpipe replay` through the binary: real
//! connectors and fixtures, the printed report, the exit codes, and
//! record → replay.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::{component, init_script, root, shared_cache};

/// Run the `sandpipe` binary with `args` and the shared code cache.
fn sandpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(args)
        .arg("--cache-dir")
        .arg(shared_cache())
        .env_remove("SANDPIPE_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run sandpipe: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A folder with files for one test.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

fn wasm(name: &str) -> String {
    component(name).display().to_string()
}

/// A connector's init.sql, for `--sql-init`.
fn init(name: &str) -> String {
    init_script(name).display().to_string()
}

fn text_message(files: &Files) -> (String, String) {
    let message = files.write(
        "message.json",
        br#"{"uuid_ref":"m-text","data_type":"text/plain","data_location":"texts/a.txt"}"#,
    );
    let data = files.write("a.txt", b"hello world\nsecond line\n");
    (message, data)
}

#[test]
fn text_stats_prints_its_outcome_sql_emit_logs_and_fuel() {
    let f = Files::new();
    let (message, data) = text_message(&f);
    let plugin = wasm("text-stats");
    let init = init("text-stats");
    let out = sandpipe(&[
        "exec",
        &plugin,
        "--message",
        &message,
        "--data",
        &data,
        "--config",
        "output=counts",
        "--sql-init",
        &init,
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("outcome   done"), "{text}");
    assert!(
        text.contains("grants    log, config, blob, sql, emit (any output)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("sql init  {init} (run before the message)")),
        "{text}"
    );
    // The upsert alone (the table is init.sql's), with its parameters and
    // result.
    assert!(text.contains("sql (1)\n"), "{text}");
    assert!(text.contains("1. execute INSERT INTO text_stats"), "{text}");
    assert!(
        text.contains(r#"params $1 = "m-text", $2 = "texts/a.txt", $3 = 2, $4 = 4, $5 = 24"#),
        "{text}"
    );
    assert!(text.contains("→ 1 row changed"), "{text}");
    // The emit went to the configured output, captured with its header.
    assert!(
        text.contains("1. → counts (") && text.contains("[content-type: application/json]"),
        "{text}"
    );
    assert!(text.contains(r#""lines":2"#), "{text}");
    assert!(
        text.contains("info  texts/a.txt: 2 lines, 4 words, 24 bytes -> counts"),
        "{text}"
    );
    let fuel_line = text.lines().find(|l| l.starts_with("fuel")).unwrap();
    let fuel: u64 = fuel_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(fuel > 0, "{fuel_line}");
    assert!(text.contains("duration  "), "{text}");

    // The same as JSON.
    let out = sandpipe(&[
        "exec",
        &plugin,
        "--message",
        &message,
        "--data",
        &data,
        "--sql-init",
        &init,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"]["status"], "done");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["sql"].as_array().unwrap().len(), 1);
    assert_eq!(v["sql"][0]["result"]["ok"]["changed"], 1);
    assert_eq!(v["emits"][0]["output"], "stats");
    assert_eq!(v["logs"][0]["level"], "info");
    assert!(v["fuel"].as_u64().unwrap() > 0);
    let calls: Vec<String> = v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}.{}",
                c["interface"].as_str().unwrap(),
                c["function"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(calls[0], "blob.open-data");
    assert!(calls.contains(&"emit.publish".to_owned()), "{calls:?}");

    // Without its init script the table is missing: the message fails and
    // the connector says what to grant.
    let out = sandpipe(&["exec", &plugin, "--message", &message, "--data", &data]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("outcome   failed: plugin-error: invalid: no such table: text_stats: the table is made by text-stats's init script"),
        "{text}"
    );
}

#[test]
fn image_meta_records_the_dimensions_of_a_png() {
    let f = Files::new();
    let message = f.write(
        "message.json",
        br#"{"uuid_ref":"m-png","data_type":"image/png","data_location":"images/red-square.png"}"#,
    );
    let png = root().join("examples/quickstart/data/images/red-square.png");
    let out = sandpipe(&[
        "exec",
        &wasm("image-meta"),
        "--message",
        &message,
        "--data",
        &png.display().to_string(),
        "--sql-init",
        &init("image-meta"),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("outcome   done"), "{text}");
    assert!(
        text.contains("grants    log, config, blob, sql\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"params $1 = "m-png", $2 = "images/red-square.png", $3 = "png", $4 = 16, $5 = 16, $6 = 83"#),
        "{text}"
    );
    assert!(text.contains("emits (0)"), "{text}");
}

#[test]
fn probe_sees_meta_and_config_and_a_narrowed_grant_is_denied() {
    let f = Files::new();
    let message = f.write(
        "echo-meta.json",
        br#"{"uuid_ref":"m-meta","data_type":"test/probe","action":"echo-meta","metadata":{"inline":1}}"#,
    );
    let probe = wasm("fx-probe");
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--meta",
        "owner=ann",
        "--meta",
        "n=[1,2]",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains(r#"outcome   skip: {"inline":1,"n":[1,2],"owner":"ann"}"#),
        "{text}"
    );

    // --meta-file stands for the metadata store, under --meta.
    let meta = f.write("meta.json", br#"{"owner":"bob","title":"T"}"#);
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--meta-file",
        &meta,
        "--meta",
        "owner=ann",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(r#"outcome   skip: {"inline":1,"owner":"ann","title":"T"}"#),
        "{}",
        stdout(&out)
    );

    let message = f.write(
        "echo-config.json",
        br#"{"uuid_ref":"m-config","data_type":"test/probe","action":"echo-config"}"#,
    );
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--config",
        "greeting=hi",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("outcome   skip: greeting=hi"),
        "{}",
        stdout(&out)
    );

    // State changes are captured, and shown.
    let message = f.write(
        "state.json",
        br#"{"uuid_ref":"m-state","data_type":"test/probe","action":"state"}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("state changes (1)\n  set counter = 1"),
        "{text}"
    );

    // --grant narrows: emit is not granted, so the call is denied.
    let message = f.write(
        "emit.json",
        br#"{"uuid_ref":"m-emit","data_type":"test/probe","action":"emit","output":"out"}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message, "--grant", "sql,meta"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("grants    log, config, sql, meta\n"),
        "{text}"
    );
    assert!(
        text.contains("outcome   failed: denied-call: access-denied: plugin `fx_probe` called emit.publish but has no `emit` grant"),
        "{text}"
    );
    // emit:OUTPUT grants that output only.
    let out = sandpipe(&["exec", &probe, "--message", &message, "--grant", "emit:out"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1. → out (5 bytes)\n       hello"),
        "{}",
        stdout(&out)
    );
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--grant",
        "emit:other",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("may not emit to output `out` (granted: other)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn sql_queries_show_their_rows_and_failed_statements_their_error() {
    let f = Files::new();
    let probe = wasm("fx-probe");
    let message = f.write(
        "query.json",
        br#"{"uuid_ref":"m-q","data_type":"test/probe","action":"sql-query","sql":"SELECT 1 AS one, 'x' AS two"}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(r#"→ 1 row ["one","two"] [[1,"x"]]"#),
        "{text}"
    );
    // The plugin database is locked down as under `run`.
    let message = f.write(
        "pragma.json",
        br#"{"uuid_ref":"m-a","data_type":"test/probe","action":"sql-exec","sql":"PRAGMA writable_schema = ON"}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message]);
    let text = stdout(&out);
    assert!(
        text.contains("→ error: access-denied: statement not allowed"),
        "{text}"
    );
}

#[test]
fn an_execute_batch_shows_its_lists_and_total_in_the_report() {
    let f = Files::new();
    let probe = wasm("fx-probe");
    let message = f.write(
        "batch.json",
        br#"{"uuid_ref":"m-b","data_type":"test/probe","action":"sql-batch","rows":[["a",1],["b",2],["c",3]]}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let batch = v["sql"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["function"] == "execute-batch")
        .unwrap_or_else(|| panic!("no execute-batch in {}", v["sql"]));
    assert_eq!(batch["args"]["batch"]["count"], 3, "{batch}");
    assert_eq!(
        batch["args"]["batch"]["lists"],
        serde_json::json!([["a", 1], ["b", 2], ["c", 3]])
    );
    assert_eq!(batch["result"]["ok"]["changed"], 3, "{batch}");
}

#[test]
fn a_panicking_plugin_exits_1_with_its_panic_message() {
    let f = Files::new();
    let message = f.write(
        "m.json",
        br#"{"uuid_ref":"m-panic","data_type":"test/panic"}"#,
    );
    let out = sandpipe(&["exec", &wasm("fx-panic"), "--message", &message]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("outcome   failed: panic: plugin panicked: fixture panic: m-panic"),
        "{text}"
    );
    let out = sandpipe(&["exec", &wasm("fx-panic"), "--message", &message, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"]["failure"], "panic");
}

#[test]
fn an_endless_loop_runs_out_of_the_fuel_given() {
    let f = Files::new();
    let message = f.write(
        "m.json",
        br#"{"uuid_ref":"m-loop","data_type":"test/loop"}"#,
    );
    let out = sandpipe(&[
        "exec",
        &wasm("fx-loop"),
        "--message",
        &message,
        "--fuel",
        "200000",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("outcome   failed: out-of-fuel: plugin ran out of fuel (limit 200000)"),
        "{text}"
    );
    assert!(text.contains("fuel      200000\n"), "{text}");
}

#[test]
fn usage_errors_exit_2() {
    let f = Files::new();
    let (message, data) = text_message(&f);
    let plugin = wasm("text-stats");
    for (args, expected) in [
        (
            vec!["exec", &plugin, "--message", &message],
            "give its content with --data FILE",
        ),
        (
            vec!["exec", &plugin, "--message", "/nonexistent/m.json"],
            "cannot read the message",
        ),
        (
            vec![
                "exec",
                &plugin,
                "--message",
                &message,
                "--data",
                &data,
                "--grant",
                "disk",
            ],
            "--grant \"disk\"",
        ),
        (
            vec![
                "exec",
                &plugin,
                "--message",
                &message,
                "--data",
                &data,
                "--meta",
                "novalue",
            ],
            "expected KEY=VALUE",
        ),
        (
            vec!["exec", &message, "--message", &message, "--data", &data],
            "cannot compile",
        ),
        (
            vec!["replay", "/nonexistent", &plugin],
            "is not a recording",
        ),
    ] {
        let out = sandpipe(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

fn record(f: &Files, dir: &Path) {
    let (message, data) = text_message(f);
    let out = sandpipe(&[
        "exec",
        &wasm("text-stats"),
        "--message",
        &message,
        "--data",
        &data,
        "--sql-init",
        &init("text-stats"),
        "--record",
        &dir.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("recorded in {}", dir.display())));
    for file in ["message.json", "data", "init.sql", "recording.json"] {
        assert!(dir.join(file).exists(), "{file} was not recorded");
    }
    // The init script is kept, so the replay has the table too.
    assert_eq!(
        std::fs::read(dir.join("init.sql")).unwrap(),
        std::fs::read(init_script("text-stats")).unwrap()
    );
}

#[test]
fn replaying_the_same_build_shows_no_difference() {
    let f = Files::new();
    let dir = f.path("rec");
    record(&f, &dir);
    let rec = dir.display().to_string();
    let out = sandpipe(&["replay", &rec, &wasm("text-stats")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains("no difference: the outcome and all 7 host calls match"),
        "{text}"
    );
    let out = sandpipe(&["replay", &rec, &wasm("text-stats"), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["same"], true);
}

#[test]
fn replaying_changed_data_or_another_component_shows_the_difference() {
    let f = Files::new();
    let dir = f.path("rec");
    record(&f, &dir);
    let rec = dir.display().to_string();

    // Another component: a different outcome, none of the calls.
    let out = sandpipe(&["replay", &rec, &wasm("image-meta")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("outcome differs\n  recorded: done\n  replayed: skip: type \"text/plain\" is not image/png"),
        "{text}"
    );
    assert!(
        text.contains("call 1 missing in the replay\n  recorded: blob.open-data"),
        "{text}"
    );

    // Changed data: the read, the upsert's parameters, the emit and the log differ.
    std::fs::write(dir.join("data"), b"hello world\nsecond line\nthird\n").unwrap();
    let out = sandpipe(&["replay", &rec, &wasm("text-stats")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("outcome differs"), "{text}");
    assert!(
        text.contains("call 2 blob.reader.read: result differs"),
        "{text}"
    );
    assert!(
        text.contains("call 4 sql.execute: arguments differ"),
        "{text}"
    );
    assert!(
        text.contains(r#"replayed: sql.execute {"params":["m-text","texts/a.txt",3,5,30]"#),
        "{text}"
    );
    assert!(
        text.contains("call 6 emit.publish: arguments differ"),
        "{text}"
    );
    assert!(text.contains("\n4 differences\n"), "{text}");
    let out = sandpipe(&["replay", &rec, &wasm("text-stats"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["same"], false);
    assert_eq!(v["changes"].as_array().unwrap().len(), 4);
    assert_eq!(v["changes"][0]["change"], "changed");
}

#[test]
fn an_sql_init_script_sets_up_the_database_before_the_message() {
    let f = Files::new();
    let probe = wasm("fx-probe");
    let init = f.write(
        "init.sql",
        b"-- the plugin's tables\nCREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, n BIGINT);\n\
          INSERT INTO seen VALUES ('a', 1) ON CONFLICT (id) DO NOTHING;\n",
    );
    let message = f.write(
        "query.json",
        br#"{"uuid_ref":"m-q","data_type":"test/probe","action":"sql-query","sql":"SELECT id, n FROM seen"}"#,
    );
    let out = sandpipe(&["exec", &probe, "--message", &message, "--sql-init", &init]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains(&format!("sql init  {init} (run before the message)\n")),
        "{text}"
    );
    assert!(text.contains(r#"→ 1 row ["id","n"] [["a",1]]"#), "{text}");
    // Only the plugin's own statement is in the report.
    assert!(text.contains("sql (1)\n"), "{text}");
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--sql-init",
        &init,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sql_init"], init.as_str());

    // Without the sql grant it is not run, and the report says so.
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--sql-init",
        &init,
        "--grant",
        "none",
    ]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "note      the SQL init script {init} was not run: the grant has no `sql`"
        )),
        "{text}"
    );
    assert!(!text.contains("sql init  "), "{text}");
}

#[test]
fn a_failing_sql_init_script_stops_exec_naming_the_file_and_line() {
    let f = Files::new();
    let probe = wasm("fx-probe");
    let message = f.write(
        "m.json",
        br#"{"uuid_ref":"m-i","data_type":"test/probe","action":"done"}"#,
    );
    // A syntax error on line 3.
    let broken = f.write(
        "broken.sql",
        b"CREATE TABLE IF NOT EXISTS a (x TEXT);\n\
          CREATE TABLE IF NOT EXISTS b (x TEXT);\n\
          CREATE TABLE c (x TEXT,);\n",
    );
    let out = sandpipe(&["exec", &probe, "--message", &message, "--sql-init", &broken]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "sql.init: plugin `fx_probe`'s init script {broken} failed at line 3: near \")\": syntax error"
        )),
        "{said}"
    );
    // The plugin policy applies, as under `run`.
    let pragma = f.write("pragma.sql", b"PRAGMA writable_schema = ON;\n");
    let out = sandpipe(&["exec", &probe, "--message", &message, "--sql-init", &pragma]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("init script {pragma} failed: not authorized")),
        "{}",
        stderr(&out)
    );
    // A missing file is a usage error naming it.
    let out = sandpipe(&[
        "exec",
        &probe,
        "--message",
        &message,
        "--sql-init",
        "/nonexistent/init.sql",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read the SQL init script /nonexistent/init.sql"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_responses_are_recorded_and_replayed_without_a_network() {
    let (port, hits) = crate::http::server().await;
    let f = Files::new();
    let message = f.write(
        "message.json",
        format!(
            r#"{{"uuid_ref":"m-http","data_type":"test/http","action":"get","url":"http://127.0.0.1:{port}/item"}}"#
        )
        .as_bytes(),
    );
    let dir = f.path("rec");
    let rec = dir.display().to_string();
    let plugin = wasm("fx-http");
    let grant = format!("http:http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "exec",
        &plugin,
        "--message",
        &message,
        "--grant",
        &grant,
        "--record",
        &rec,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    // The server runs on this test's runtime: the binary runs beside it.
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sandpipe(&args)
    })
    .await
    .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains(r#"skip: status=200 bytes=27 body={"name":"widget","price":3}"#),
        "{text}{}",
        stderr(&out)
    );
    assert!(text.contains("http.handle"), "{text}");
    assert_eq!(hits.get("/item"), 1);
    let recording = std::fs::read_to_string(dir.join("recording.json")).unwrap();
    assert!(
        recording.contains(&format!("http://127.0.0.1:{port}/item")),
        "{recording}"
    );

    // The replay is served from the recording: the server sees nothing.
    let (rec2, plugin2) = (rec.clone(), plugin.clone());
    let out = tokio::task::spawn_blocking(move || sandpipe(&["replay", &rec2, &plugin2]))
        .await
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("no difference"), "{text}");
    assert_eq!(hits.get("/item"), 1);
}

#[test]
fn a_service_runs_a_query_an_event_and_a_request_and_replays_them() {
    let files = Files::new();
    let svc = wasm("fx-service");
    // A query: on-connect with the configuration, then the replies listed.
    let query = files.write("query.json", br#"{"op": "rows", "n": 250, "page": 100}"#);
    let out = sandpipe(&["exec", &svc, "--query", &query]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(
        text.contains("message   query on source `fx_service` (service/query)"),
        "{text}"
    );
    assert!(text.contains("outcome   ok"), "{text}");
    assert!(text.contains("replies (4)"), "{text}");
    assert!(text.contains(r#"{"status":204}"#), "{text}");
    let config = files.write("connect.json", br#"{"generation": 7}"#);
    let state = files.write("state.json", br#"{"op": "config"}"#);
    let out = sandpipe(&[
        "exec",
        &svc,
        "--query",
        &state,
        "--connect",
        &config,
        "--source",
        "orders",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["replies"][0]["status"], 200, "{report}");
    assert_eq!(
        report["replies"][0]["body"]["config"],
        serde_json::json!({"generation": 7})
    );
    // An error reply and a trap: exit 1.
    let bad = files.write("bad.json", br#"{"op": "fail", "table": "t"}"#);
    let out = sandpipe(&["exec", &svc, "--query", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("io.test.badQuery"),
        "{}",
        stdout(&out)
    );
    let trap = files.write("trap.json", br#"{"op": "trap"}"#);
    let out = sandpipe(&["exec", &svc, "--query", &trap]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("panic"), "{}", stdout(&out));
    // An event: its SQL in the report, nothing committed.
    let event = files.write("event.json", br#"{"id": "e1", "v": 3}"#);
    let out = sandpipe(&["exec", &svc, "--event", &event]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("INSERT INTO events"), "{text}");
    // A request to a declared route: the response.
    let request = files.write(
        "request.json",
        br#"{"method": "GET", "path": "/items/42", "route": "/items/{id}", "params": {"id": "42"}, "query": {"x": "1"}}"#,
    );
    let out = sandpipe(&["exec", &svc, "--request", &request, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["response"]["status"], 200, "{report}");
    let body: serde_json::Value =
        serde_json::from_str(report["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["params"], serde_json::json!([["id", "42"]]));
    // Recorded, then replayed against the same build: no difference (a
    // query whose answer does not depend on the instance).
    let dir = files.path("recording");
    let echo = files.write("echo.json", br#"{"op": "echo", "n": 5}"#);
    let out = sandpipe(&[
        "exec",
        &svc,
        "--query",
        &echo,
        "--record",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = sandpipe(&["replay", dir.to_str().unwrap(), &svc]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // A recording whose replies differ from what the build answers now.
    let file = dir.join("recording.json");
    let recording = std::fs::read_to_string(&file).unwrap();
    assert!(recording.contains("\"echo\": 5"), "{recording}");
    std::fs::write(&file, recording.replace("\"echo\": 5", "\"echo\": 6")).unwrap();
    let out = sandpipe(&["replay", dir.to_str().unwrap(), &svc]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("the service's replies or response differ"),
        "{}",
        stdout(&out)
    );
    // The wrong inputs for the world: usage errors.
    let out = sandpipe(&["exec", &wasm("text-stats"), "--query", &query]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("are for services"),
        "{}",
        stderr(&out)
    );
    let message = files.write(
        "message.json",
        br#"{"uuid_ref": "m", "data_type": "text/plain"}"#,
    );
    let out = sandpipe(&["exec", &svc, "--message", &message]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is a `service` component"),
        "{}",
        stderr(&out)
    );
}
