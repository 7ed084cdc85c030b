//! The guest SDK's "same test in the real sandbox" pattern
//! (`sandpipe_sdk::testing::Scenario`): text-stats's native test
//! `execute_tests::hello_natively` (connectors/text-stats/src/lib.rs) runs
//! the quickstart's hello message against the SDK's fake host; the same
//! scenario is kept as a folder by `Scenario::write_to`
//! (connectors/text-stats/tests/scenarios/hello, checked to be current by
//! the connector's tests). Here the built component runs on that folder
//! through its `exec.sh`, i.e. `sandpipe exec --json` with the folder's
//! `init.sql` as `--sql-init`, and must show what the native test asserts:
//! the outcome, the SQL with its parameters, the rows it leaves, the
//! emitted summary, the log line and the host calls.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value as Json, json};

use crate::harness::{component, root, shared_cache};

const HELLO_ID: &str = "82c514aa-327a-5c08-a8e7-b0dba562b3cd";

/// What `hello_natively` asserts (keep the two in step).
struct Expected {
    rows: Vec<(String, String, i64, i64, i64)>,
    upsert_params: Json,
    emit_output: &'static str,
    emit_payload: &'static str,
    log: &'static str,
    calls: [&'static str; 7],
}

fn hello_expected() -> Expected {
    Expected {
        rows: vec![(HELLO_ID.into(), "texts/hello.txt".into(), 2, 6, 41)],
        upsert_params: json!([HELLO_ID, "texts/hello.txt", 2, 6, 41]),
        emit_output: "stats",
        emit_payload: r#"{"bytes":41,"lines":2,"location":"texts/hello.txt","message_id":"82c514aa-327a-5c08-a8e7-b0dba562b3cd","words":6}"#,
        log: "texts/hello.txt: 2 lines, 6 words, 41 bytes -> stats",
        calls: [
            "blob.open-data",
            "blob.reader.read",
            "blob.reader.read",
            "sql.execute",
            "config.get",
            "emit.publish",
            "log.write",
        ],
    }
}

fn scenario_dir() -> PathBuf {
    root().join("connectors/text-stats/tests/scenarios/hello")
}

/// A SQL parameter as `exec --json` reports it, back as a SQLite value
/// (plain JSON scalars only: the journal summarises bytes).
fn sqlite_value(v: &Json) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Integer(i64::from(*b)),
        Json::Number(n) if n.is_i64() => Value::Integer(n.as_i64().unwrap()),
        Json::Number(n) => Value::Real(n.as_f64().unwrap()),
        Json::String(s) => Value::Text(s.clone()),
        other => panic!("parameter {other} cannot be replayed"),
    }
}

#[test]
fn text_stats_hello_scenario_in_the_sandbox_matches_the_native_test() {
    let dir = scenario_dir();
    for file in [
        "message.json",
        "data",
        "meta.json",
        "config.json",
        "init.sql",
        "exec.sh",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: the text-stats tests write it (UPDATE_SCENARIOS=1)",
            dir.join(file).display()
        );
    }
    let out = Command::new("sh")
        .arg(dir.join("exec.sh"))
        .arg(component("text-stats"))
        .arg("--json")
        .arg("--cache-dir")
        .arg(shared_cache())
        .env("SANDPIPE", env!("CARGO_BIN_EXE_sandpipe"))
        .env_remove("SANDPIPE_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run exec.sh: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: Json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let expected = hello_expected();

    assert_eq!(report["outcome"]["status"], "done", "{report:#}");
    assert_eq!(report["message"]["id"], HELLO_ID);
    // exec.sh handed the folder's init.sql to --sql-init.
    assert_eq!(
        report["sql_init"],
        dir.join("init.sql").display().to_string(),
        "{report:#}"
    );

    // The log line.
    assert_eq!(
        report["logs"],
        json!([{ "level": "info", "message": expected.log }])
    );

    // The SQL: the upsert alone (the table is init.sql's), with the native
    // test's parameters.
    let sql = report["sql"].as_array().unwrap();
    assert_eq!(sql.len(), 1, "{report:#}");
    assert!(
        sql[0]["args"]["statement"]
            .as_str()
            .unwrap()
            .starts_with("INSERT INTO text_stats")
    );
    assert_eq!(sql[0]["args"]["params"], expected.upsert_params);
    assert_eq!(sql[0]["result"]["ok"]["changed"], 1);

    // The rows it leaves: exec rolls its throw-away database back, so the
    // init script and the statements it ran (all with plain parameters)
    // are replayed, in order, into a fresh SQLite and read with the native
    // test's query.
    let db = rusqlite::Connection::open_in_memory().unwrap();
    db.execute_batch(&std::fs::read_to_string(dir.join("init.sql")).unwrap())
        .unwrap();
    for call in sql {
        let statement = call["args"]["statement"].as_str().unwrap();
        let params: Vec<rusqlite::types::Value> = call["args"]["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(sqlite_value)
            .collect();
        db.execute(statement, rusqlite::params_from_iter(params))
            .unwrap();
    }
    let mut stmt = db
        .prepare(
            "SELECT message_id, location, lines, words, bytes FROM text_stats ORDER BY message_id",
        )
        .unwrap();
    let rows: Vec<(String, String, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, expected.rows);

    // The emitted summary, whole (113 bytes: the report's preview is not cut).
    let emits = report["emits"].as_array().unwrap();
    assert_eq!(emits.len(), 1, "{report:#}");
    assert_eq!(emits[0]["output"], expected.emit_output);
    assert_eq!(
        emits[0]["headers"],
        json!([["content-type", "application/json"]])
    );
    assert_eq!(emits[0]["bytes"], expected.emit_payload.len());
    assert_eq!(emits[0]["preview"], expected.emit_payload);

    // The same host calls as the fake host recorded.
    let calls: Vec<String> = report["calls"]
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
    assert_eq!(calls, expected.calls);
    assert!(report["denials"].as_array().unwrap().is_empty());
}
