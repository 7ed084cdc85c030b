//! The fake host, capability by capability, through the SDK's public
//! functions.

use std::cell::RefCell;
use std::io::Read as _;

use super::*;
use crate::prelude::*;

type Body = Box<dyn FnOnce(Message) -> Result<Outcome, Error>>;

thread_local! {
    static BODY: RefCell<Option<Body>> = const { RefCell::new(None) };
}

/// A plugin whose `execute` is the closure given to [`exec`].
struct Probe;

impl Plugin for Probe {
    fn describe() -> Description {
        Description {
            name: "probe".into(),
            version: "0.0.1".into(),
            mime_types: vec!["*/*".into()],
            capabilities: Capability::ALL.to_vec(),
        }
    }

    fn execute(msg: Message) -> Result<Outcome, Error> {
        let body = BODY.with(|b| b.borrow_mut().take()).expect("a body");
        body(msg)
    }
}

fn exec(
    message: Message,
    host: FakeHost,
    body: impl FnOnce(Message) -> Result<Outcome, Error> + 'static,
) -> Report {
    BODY.with(|b| *b.borrow_mut() = Some(Box::new(body)));
    run::<Probe>(message, host)
}

fn with_data(location: &str) -> Message {
    Message {
        data_location: Some(location.into()),
        ..message("m-1", "text/plain")
    }
}

#[test]
#[should_panic(
    expected = "no sandpipe_sdk::testing host is installed; use sandpipe_sdk::testing::run"
)]
fn a_capability_outside_run_panics_with_a_hint() {
    let _ = config::get("x");
}

#[test]
fn config_values_render_like_the_engine() {
    let host = FakeHost::new()
        .config("output", "stats")
        .config("limit", 10)
        .config("tags", json!(["a"]));
    let report = exec(message("m", "t"), host, |_| {
        assert_eq!(config::get("output")?, Some("stats".into()));
        assert_eq!(config::get("limit")?, Some("10".into()));
        assert_eq!(config::get_parsed::<u32>("limit")?, Some(10));
        assert_eq!(config::get("tags")?, Some(r#"["a"]"#.into()));
        assert_eq!(config::get("missing")?, None);
        assert_eq!(config::keys()?, ["limit", "output", "tags"]);
        Ok(Outcome::Done)
    });
    report.assert_done();
    assert_eq!(report.calls.len(), 6);
    assert_eq!(report.calls[0], "config.get");
}

#[test]
fn metadata_and_state() {
    let host = FakeHost::new()
        .meta("source", "cam")
        .meta_json(json!({ "n": 2, "tags": ["x"] }))
        .state("seen", "41")
        .state("old", "x");
    let report = exec(message("m", "t"), host, |_| {
        assert_eq!(meta::get("source")?, Some("cam".into()));
        assert_eq!(meta::get("n")?, Some("2".into()));
        assert_eq!(
            meta::all_json()?,
            json!({ "source": "cam", "n": 2, "tags": ["x"] })
        );
        let seen: u64 = meta::state_get_str("seen")?
            .unwrap_or_default()
            .parse()
            .unwrap();
        meta::state_set("seen", (seen + 1).to_string().as_bytes())?;
        // The invocation sees its own pending changes.
        assert_eq!(meta::state_get_str("seen")?, Some("42".into()));
        meta::state_delete("old")?;
        assert_eq!(meta::state_get("old")?, None);
        assert!(matches!(meta::state_set("", b"x"), Err(Error::Invalid(_))));
        Ok(Outcome::Done)
    });
    report.assert_done();
    assert_eq!(report.state("seen"), Some(&b"42"[..]));
    assert_eq!(report.state("old"), None);
    assert_eq!(report.state_changes.len(), 2);

    // Not applied unless done.
    let host = FakeHost::new().state("seen", "1");
    let report = exec(message("m", "t"), host, |_| {
        meta::state_set("seen", b"2")?;
        Ok(Outcome::skip("not mine"))
    });
    assert_eq!(report.state("seen"), Some(&b"1"[..]));
    assert_eq!(
        report.state_changes,
        [StateChange::Set {
            key: "seen".into(),
            value: b"2".to_vec()
        }]
    );
}

#[test]
fn blob_reads_the_data_object_and_other_objects_in_chunks() {
    let text = "line\n".repeat(1000);
    let host = FakeHost::new()
        .data(text.clone())
        .blob("lookup/codes.csv", "a,1\n");
    let expected = text.clone();
    let report = exec(with_data("in/a.txt"), host, move |_| {
        let mut reader = blob::open_data()?;
        assert_eq!(reader.size(), Some(5000));
        assert_eq!(reader.read_chunk(7)?, b"line\nli");
        let mut rest = String::new();
        reader.read_to_string(&mut rest)?;
        assert_eq!(format!("line\nli{rest}"), expected);
        assert!(reader.read_chunk(10)?.is_empty());
        // The data object is also readable at its location.
        assert_eq!(blob::open("in/a.txt")?.read_all()?.len(), 5000);
        assert_eq!(blob::open("lookup/codes.csv")?.read_all()?, b"a,1\n");
        assert_eq!(
            blob::open("lookup/nope.csv").err(),
            Some(Error::not_found("no object at `lookup/nope.csv`"))
        );
        assert!(matches!(
            blob::open("../etc/passwd"),
            Err(Error::Invalid(_))
        ));
        blob::put("out/a.txt", b"written")?;
        Ok(Outcome::Done)
    });
    report.assert_done();
    assert_eq!(report.blob_writes.len(), 1);
    assert_eq!(report.blob("out/a.txt"), Some(&b"written"[..]));
    assert_eq!(
        report.calls[..3],
        ["blob.open-data", "blob.reader.read", "blob.reader.read"]
    );
}

#[test]
fn no_data_object_is_not_found() {
    let report = exec(message("m-9", "t"), FakeHost::new(), |_| {
        assert_eq!(
            blob::open_data().err(),
            Some(Error::not_found("message `m-9` has no data location"))
        );
        assert_eq!(
            blob::open_data().err(),
            Some(Error::not_found("message `m-9` has no data location"))
        );
        Ok(Outcome::Done)
    });
    report.assert_done();
    let report = exec(with_data("gone.txt"), FakeHost::new(), |_| {
        blob::open_data()?;
        Ok(Outcome::Done)
    });
    assert_eq!(
        report.outcome,
        Err(Error::not_found("no object at `gone.txt`"))
    );
}

#[test]
fn sql_binds_dollar_parameters_and_commits_only_when_done() {
    let host = FakeHost::new()
        .sql("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, b BLOB, f REAL, ok INTEGER)");
    let report = exec(message("m", "t"), host, |msg| {
        let changed = sql::execute(
            "INSERT INTO t VALUES ($1, $2, $3, $4, $5)",
            &params![msg.id.as_str(), 7, vec![1u8, 2], 0.5, true],
        )?;
        assert_eq!(changed, 1);
        let rows = sql::query("SELECT n, b, f, ok FROM t WHERE id = $1", &params!["m"])?;
        let row = rows.first().expect("a row");
        assert_eq!(row.get_i64("n"), Some(7));
        assert_eq!(row.get_bytes("b"), Some(&[1u8, 2][..]));
        assert_eq!(row.get_f64("f"), Some(0.5));
        // Booleans are stored as integers, as in the engine's SQLite.
        assert_eq!(row.get("ok"), Some(&sql::Value::Int(1)));
        Ok(Outcome::Done)
    });
    report.assert_done();
    assert_eq!(report.sql.len(), 2);
    assert_eq!(report.sql[0].changed(), Some(1));
    assert_eq!(report.sql[0].function, SqlFunction::Execute);
    assert_eq!(report.query("SELECT id FROM t", &[]).unwrap().len(), 1);

    // Anything but done rolls back.
    for outcome in [
        Ok(Outcome::skip("no")),
        Ok(Outcome::retry_after(10, "later")),
        Ok(Outcome::dead_letter("never")),
        Err(Error::internal("boom")),
    ] {
        let report = exec(message("m2", "t"), report_host(), move |msg| {
            sql::execute("INSERT INTO t (id) VALUES ($1)", &params![msg.id.as_str()])?;
            outcome
        });
        assert_eq!(report.sql[0].changed(), Some(1));
        let rows = report
            .query("SELECT id FROM t WHERE id = 'm2'", &[])
            .unwrap();
        assert!(rows.is_empty(), "{:?} committed", report.outcome);
    }
}

#[test]
fn sql_batches_run_once_per_list_and_name_the_failing_list() {
    let host = FakeHost::new().sql("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)");
    let report = exec(message("m", "t"), host, |_| {
        let insert = "INSERT INTO t VALUES ($1, $2)";
        let batch = vec![params!["a", 1], params!["b", 2], params!["c", 3]];
        assert_eq!(sql::execute_batch(insert, &batch)?, 3);
        let failing = vec![params!["d", 4], params!["e", None::<i64>]];
        let err = sql::execute_batch(insert, &failing).expect_err("NOT NULL");
        assert_eq!(err.kind(), "invalid");
        assert!(
            err.message().starts_with("parameter list 1 of 2: "),
            "{err}"
        );
        Ok(Outcome::Done)
    });
    report.assert_done();
    assert_eq!(report.sql.len(), 2);
    assert_eq!(report.sql[0].function, SqlFunction::ExecuteBatch);
    assert_eq!(report.sql[0].batch.len(), 3);
    assert_eq!(report.sql[0].changed(), Some(3));
    // The list before the failing one is applied, as in the engine.
    let rows = report.query("SELECT id FROM t ORDER BY id", &[]).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        report.to_string().contains("batch of 3 parameter lists"),
        "{report}"
    );
}

fn report_host() -> FakeHost {
    FakeHost::new().sql("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)")
}

#[test]
fn plugin_sql_may_not_control_the_transaction_or_reach_other_files() {
    let report = exec(message("m", "t"), FakeHost::new(), |_| {
        for statement in [
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT s",
            "ATTACH DATABASE ':memory:' AS other",
            "PRAGMA journal_mode = DELETE",
        ] {
            let result = sql::execute(statement, &[]);
            assert!(
                matches!(result, Err(Error::AccessDenied(_))),
                "{statement}: {result:?}"
            );
        }
        // Introspection pragmas are fine (as in the engine), and
        // `user_version` without a value; two statements at once are not.
        sql::query("PRAGMA user_version", &[])?;
        sql::query("PRAGMA table_info(t)", &[])?;
        assert!(matches!(
            sql::execute("PRAGMA user_version = 3", &[]),
            Err(Error::AccessDenied(_))
        ));
        assert!(matches!(
            sql::execute("CREATE TABLE a (x); CREATE TABLE b (x)", &[]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            sql::execute("SELEC 1", &[]),
            Err(Error::Invalid(_))
        ));
        Ok(Outcome::Done)
    });
    report.assert_done();
    // The inspection connection is not locked down.
    report.db().execute_batch("BEGIN; COMMIT").unwrap();
}

#[test]
fn emits_are_captured_and_outputs_checked() {
    let host = FakeHost::new().outputs(["stats"]);
    let report = exec(message("m", "t"), host, |_| {
        emit::publish_json("stats", &json!({ "n": 1 }))?;
        emit::publish("stats", b"raw", &[("x-a", "1")])?;
        emit::publish("other", b"x", &[])
            .map(|()| Outcome::Done)
            .or_else(|e| match e {
                Error::AccessDenied(m) => Ok(Outcome::skip(m)),
                other => Err(other),
            })
    });
    assert_eq!(
        report.outcome,
        Ok(Outcome::skip(
            "plugin `probe` may not emit to output `other` (granted: stats)"
        ))
    );
    assert_eq!(report.denials.len(), 1);
    assert_eq!(report.emits.len(), 2);
    assert_eq!(report.emits[0].json().unwrap(), json!({ "n": 1 }));
    assert_eq!(
        report.emits[0].header("Content-Type"),
        Some("application/json")
    );
    assert_eq!(report.emits[1].text(), Some("raw"));
    assert_eq!(report.emits_to("stats").count(), 2);
}

#[test]
fn a_narrowed_grant_denies_with_the_engines_text() {
    let host = FakeHost::new().grant(&[Capability::Blob]);
    let report = exec(message("m", "t"), host, |_| {
        log::info("log is always granted")?;
        config::keys()?;
        sql::execute("CREATE TABLE t (x)", &[])?;
        Ok(Outcome::Done)
    });
    assert_eq!(
        report.outcome,
        Err(Error::access_denied(
            "plugin `probe` called sql.execute but has no `sql` grant \
             (add `sql: true` under plugins.grants.probe)"
        ))
    );
    assert_eq!(report.denials.len(), 1);
    assert_eq!(report.calls, ["log.write", "config.keys", "sql.execute"]);
    assert!(report.logged("always granted"));
    assert!(report.sql.is_empty());
}

#[test]
fn injected_failures() {
    let host = FakeHost::new().fail(Capability::Sql, Error::unavailable("db down"));
    let report = exec(message("m", "t"), host, |_| {
        match sql::execute("CREATE TABLE t (x)", &[]) {
            Err(e) if e.is_transient() => Ok(Outcome::retry_after(1000, e.to_string())),
            Err(e) => Err(e),
            Ok(_) => Ok(Outcome::Done),
        }
    });
    assert_eq!(
        report.outcome,
        Ok(Outcome::retry_after(1000, "unavailable: db down"))
    );
}

#[test]
fn the_next_message_sees_what_the_last_one_committed() {
    let first = exec(with_data("a"), FakeHost::new().data("x"), |_| {
        sql::execute("CREATE TABLE seen (id TEXT)", &[])?;
        sql::execute("INSERT INTO seen VALUES ('a')", &[])?;
        meta::state_set("count", b"1")?;
        Ok(Outcome::Done)
    });
    first.assert_done();
    let second = exec(with_data("b"), first.into_host().data("y"), |_| {
        assert_eq!(blob::open_data()?.read_all()?, b"y");
        assert_eq!(meta::state_get_str("count")?, Some("1".into()));
        let rows = sql::query("SELECT count(*) AS n FROM seen", &[])?;
        assert_eq!(rows.first().and_then(|r| r.get_i64("n")), Some(1));
        Ok(Outcome::Done)
    });
    second.assert_done();
}

#[test]
fn a_panicking_plugin_fails_the_test_and_leaves_no_host_behind() {
    let result = std::panic::catch_unwind(|| {
        exec(message("m", "t"), FakeHost::new(), |_| panic!("plugin bug"))
    });
    assert!(result.is_err());
    let after = std::panic::catch_unwind(|| config::get("x"));
    let message = after
        .err()
        .and_then(|p| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(
        message.starts_with("no sandpipe_sdk::testing host"),
        "{message}"
    );
}

#[test]
fn the_report_prints_like_exec() {
    let report = exec(message("m", "t"), FakeHost::new(), |_| {
        sandpipe_sdk_info("hi");
        sql::execute("CREATE TABLE t (x)", &[])?;
        emit::publish("out", b"{}", &[])?;
        Ok(Outcome::dead_letter("bad input"))
    });
    let text = report.to_string();
    assert!(text.contains("outcome   dead-letter: bad input"), "{text}");
    assert!(text.contains("  info  hi"), "{text}");
    assert!(text.contains("1. execute CREATE TABLE t (x)"), "{text}");
    assert!(text.contains("1. → out {}"), "{text}");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        report.assert_done();
    }));
    assert!(panicked.is_err());
}

fn sandpipe_sdk_info(text: &str) {
    crate::info!("{text}");
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sandpipe-sdk-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_scenario_runs_natively_and_round_trips_through_its_folder() {
    let scenario = Scenario::new("m-7", "text/plain")
        .data("texts/a.txt", "hello world\n")
        .meta("source", "test")
        .meta_json(json!({ "n": 1 }))
        .config("output", "stats")
        .config("limit", 10)
        .config("quoted", "10")
        .config("it's", "a b");

    let msg = scenario.message();
    assert_eq!(msg.id, "m-7");
    assert_eq!(msg.data_location.as_deref(), Some("texts/a.txt"));
    assert_eq!(
        msg.body_json().unwrap(),
        json!({ "uuid_ref": "m-7", "data_type": "text/plain", "data_location": "texts/a.txt" })
    );

    BODY.with(|b| {
        *b.borrow_mut() = Some(Box::new(|_msg: Message| {
            assert_eq!(blob::open_data()?.read_all()?, b"hello world\n");
            assert_eq!(meta::get("source")?, Some("test".into()));
            assert_eq!(config::get("quoted")?, Some("10".into()));
            Ok(Outcome::Done)
        }))
    });
    scenario.run::<Probe>().assert_done();

    let dir = temp_dir("scenario");
    scenario.write_to(&dir).unwrap();
    assert_eq!(Scenario::load(&dir).unwrap(), scenario);
    for (name, bytes) in scenario.files() {
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(std::fs::read(dir.join("data")).unwrap(), b"hello world\n");

    let args: Vec<String> = scenario
        .exec_args(&dir)
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let d = dir.display();
    assert_eq!(
        args,
        [
            "--message".to_owned(),
            format!("{d}/message.json"),
            "--data".into(),
            format!("{d}/data"),
            "--meta-file".into(),
            format!("{d}/meta.json"),
            "--config".into(),
            "it's=a b".into(),
            "--config".into(),
            "limit=10".into(),
            "--config".into(),
            "output=stats".into(),
            "--config".into(),
            // Would be read as the number 10: written as a JSON string.
            r#"quoted="10""#.into(),
        ]
    );
    let script = std::fs::read_to_string(dir.join("exec.sh")).unwrap();
    assert!(
        script.contains(
            r#"--meta-file "$here/meta.json" --config 'it'\''s=a b' --config 'limit=10'"#
        ),
        "{script}"
    );

    // Without data, a stale data file goes.
    let no_data = Scenario::new("m-8", "text/plain");
    no_data.write_to(&dir).unwrap();
    assert!(!dir.join("data").exists());
    assert_eq!(Scenario::load(&dir).unwrap(), no_data);
    let _ = std::fs::remove_dir_all(&dir);
}

const WORDS_INIT: &str = "-- the plugin's table\n\
    CREATE TABLE IF NOT EXISTS words (message_id TEXT PRIMARY KEY, words BIGINT NOT NULL);\n\
    CREATE INDEX IF NOT EXISTS words_by_count ON words (words);\n";

#[test]
fn an_init_script_sets_up_the_tables_the_plugin_then_uses() {
    // Idempotent, as the engine runs it at every start.
    let host = FakeHost::new().sql_init(WORDS_INIT).sql_init(WORDS_INIT);
    let report = exec(message("m-1", "t"), host, |msg| {
        sql::execute(
            "INSERT INTO words VALUES ($1, $2)",
            &params![msg.id.as_str(), 6],
        )?;
        Ok(Outcome::Done)
    });
    report.assert_done();
    // Only the plugin's own statement is in the report.
    assert_eq!(report.sql.len(), 1);
    let rows = report.query("SELECT words FROM words", &[]).unwrap();
    assert_eq!(rows.first().and_then(|r| r.get_i64("words")), Some(6));
}

#[test]
fn an_init_script_runs_under_the_plugin_policy_in_one_transaction() {
    for script in [
        "PRAGMA user_version = 3",
        "ATTACH DATABASE ':memory:' AS other",
        "CREATE TABLE a (x); COMMIT",
    ] {
        let db = database::Database::open().unwrap();
        let err = db.init(script).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("not authorized")),
            "{script}: {err:?}"
        );
    }
    // A failing statement leaves nothing of the script behind.
    let db = database::Database::open().unwrap();
    assert!(db.init("CREATE TABLE a (x); CREATE TABLE a (x)").is_err());
    let tables: i64 = db
        .conn()
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 0);
    // And the connection is usable again (not left locked down).
    db.conn().execute_batch("BEGIN; COMMIT").unwrap();
}

#[test]
#[should_panic(expected = "FakeHost::sql_init: the init script failed")]
fn a_failing_init_script_fails_the_test() {
    let _ = FakeHost::new().sql_init("CREATE TABLE words (");
}

#[test]
fn a_scenario_keeps_its_init_script_in_the_folder() {
    let scenario = Scenario::new("m-9", "text/plain")
        .data("a.txt", "one two\n")
        .sql_init(WORDS_INIT);
    BODY.with(|b| {
        *b.borrow_mut() = Some(Box::new(|msg: Message| {
            sql::execute(
                "INSERT INTO words VALUES ($1, 2)",
                &params![msg.id.as_str()],
            )?;
            Ok(Outcome::Done)
        }))
    });
    scenario.run::<Probe>().assert_done();

    let dir = temp_dir("scenario-init");
    scenario.write_to(&dir).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("init.sql")).unwrap(),
        WORDS_INIT
    );
    assert_eq!(Scenario::load(&dir).unwrap(), scenario);
    let args: Vec<String> = scenario
        .exec_args(&dir)
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--sql-init").unwrap();
    assert_eq!(args[at + 1], format!("{}/init.sql", dir.display()));
    let script = std::fs::read_to_string(dir.join("exec.sh")).unwrap();
    assert!(
        script.contains(
            r#"if [ -f "$here/init.sql" ]; then set -- --sql-init "$here/init.sql" "$@"; fi"#
        ),
        "{script}"
    );

    // Without one, a stale init.sql goes.
    let plain = Scenario::new("m-9", "text/plain").data("a.txt", "one two\n");
    plain.write_to(&dir).unwrap();
    assert!(!dir.join("init.sql").exists());
    assert_eq!(Scenario::load(&dir).unwrap(), plain);
    assert!(!plain.exec_args(&dir).contains(&"--sql-init".into()));
    let _ = std::fs::remove_dir_all(&dir);
}
