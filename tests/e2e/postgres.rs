//! Database `postgres` against a real server (127.0.0.1:5432, user
//! `postgres`, trust authentication; `SANDPIPE_TEST_POSTGRES` overrides the
//! URL without database). Each test makes a database of its own and drops
//! it, and the plugin roles the engine made for it, at the end.
//!
//! What is shown: the real components (fx-probe, text-stats) run with their
//! `sql` in PostgreSQL and the status log lands there; a failed invocation's
//! SQL is rolled back; the init script runs, and a missing or failing one
//! stops `check` and `run` with the file named; and a hostile plugin —
//! through the same `Transaction` the `sql` host interface uses, and through
//! the real fx-probe component — cannot read another plugin's tables or the
//! status log, cannot become another role, cannot run programs or write
//! files, cannot create outside its schema, cannot end the engine's
//! transaction, and cannot outlast its deadline or its row limit. Also:
//! values map both ways, whatever an init script grants a plugin role is
//! taken back, a lost connection is `unavailable`, pooled connections come
//! back clean, and an admin that is not a superuser will do.

use std::path::Path;
use std::time::{Duration, Instant};

use sandpipe::capability::sql::Transaction;
use sandpipe::config::Config;
use sandpipe::sandbox::bindings::WitError;
use sandpipe::sandbox::bindings::sandpipe::connector::sql::{Rows, Value};
use sandpipe::store::database::{Database, PluginDb};

use crate::harness::{Deployment, init_script, root};

/// The server, without a database.
pub(crate) fn server() -> String {
    std::env::var("SANDPIPE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub(crate) async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url} (is PostgreSQL running?): {e}"));
    tokio::spawn(connection);
    client
}

/// A database of the test's own, dropped (with the roles made for it) when
/// this goes out of scope, even after a failed assertion.
pub(crate) struct TestDb {
    pub(crate) name: String,
}

impl TestDb {
    pub(crate) async fn new() -> Self {
        let name = format!(
            "sp_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        connect(&format!("{}/postgres", server()))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self { name }
    }

    pub(crate) fn url(&self) -> String {
        format!("{}/{}", server(), self.name)
    }

    /// The `database:` section for this database, plus `more` keys.
    fn yaml(&self, more: &str) -> String {
        format!(
            "database: {{ type: postgres, url: \"{}\"{more} }}\n",
            self.url()
        )
    }

    /// An admin connection to this database.
    pub(crate) async fn admin(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// The role the engine made for the plugin whose schema is `schema`.
    fn role(&self, schema: &str) -> String {
        sandpipe::store::database::postgres::role_name(&self.name, schema)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = connect(&format!("{}/postgres", server())).await;
                crate::harness::postgres::drop_database(&admin, &name).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Put a message for fx-probe: `action` on `sql`.
pub(crate) fn probe(d: &Deployment, id: &str, action: &str, sql: &str) {
    d.message(
        &format!("{id}.json"),
        &serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action, "sql": sql})
            .to_string(),
    );
}

/// A value as the tests spell it.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Text(t) => format!("{t:?}"),
        Value::Bytes(b) => format!("bytes{b:?}"),
        Value::Json(j) => format!("json {j}"),
        Value::Timestamp(t) => format!("ts {t}"),
    }
}

/// Rows as `a, b; c, d`.
fn table(rows: &Rows) -> String {
    rows.values
        .iter()
        .map(|row| row.iter().map(show).collect::<Vec<_>>().join(", "))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn components_store_in_postgres_and_the_status_log_lands_there() {
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe"), ("text-stats", "text-stats")],
        &format!(
            "{}outputs:\n  stats: {{ type: dir, path: out }}\n\
             plugins:\n  grants:\n    probe: {{ sql: true }}\n    \
             text-stats: {{ sql: {{ init: \"{}\" }}, blob: true, emit: [stats] }}\n",
            db.yaml(""),
            init_script("text-stats").display()
        ),
    );
    probe(&d, "m-sql", "sql", "");
    d.data("docs/a.txt", b"one two\nthree\n");
    d.sqapi("m-text.json", "m-text", "text/plain", Some("docs/a.txt"));
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.processed), (2, 2), "{summary}");

    let admin = db.admin().await;
    // Each plugin's tables are in its own schema, owned by its own role.
    assert_eq!(
        count(&admin, "SELECT count(*) FROM probe.t WHERE x = 'm-sql'").await,
        1
    );
    let words: i64 = admin
        .query_one(
            "SELECT words FROM text_stats.text_stats WHERE message_id = 'm-text'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(words, 3);
    let owner: String = admin
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'text_stats'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, db.role("text_stats"));

    // The status log is in PostgreSQL (and nothing went to SQLite).
    let rows = d.rows("m-text").await;
    let last = rows.last().unwrap();
    assert_eq!((last.plugin.as_str(), last.status.as_str()), ("", "done"));
    assert!(
        rows.iter().any(|r| r.plugin == "text-stats"
            && r.status == "done"
            && !r.plugin_version.is_empty()),
        "{rows:?}"
    );
    assert!(
        count(
            &admin,
            "SELECT count(*) FROM sandpipe.status WHERE message_id = 'm-sql' AND status = 'done'"
        )
        .await
            >= 2
    );
    assert!(!d.path("state/sandpipe.sqlite").exists());
    assert!(!d.path("state/plugins").exists());

    // Started again on the same database, the engine reuses what exists.
    probe(&d, "m-sql-2", "sql", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.t").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_sql_plugins_status_rows_commit_in_its_own_transaction_and_cannot_be_forged() {
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}retry: {{ backoff: {{ initial: 20ms, max: 50ms }} }}\nplugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml("")
        ),
    );
    probe(&d, "m-1", "sql", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let admin = db.admin().await;
    // One transaction wrote the plugin's row and the message's three status
    // rows (received, the plugin done, the message done): one xmin.
    let effect: String = admin
        .query_one("SELECT xmin::text FROM probe.t WHERE x = 'm-1'", &[])
        .await
        .unwrap()
        .get(0);
    let status: Vec<(String, String, String)> = admin
        .query(
            "SELECT xmin::text, plugin, status FROM sandpipe.status WHERE message_id = 'm-1' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, String, String)> =
        [("", "received"), ("probe", "done"), ("", "done")]
            .iter()
            .map(|(p, s)| (effect.clone(), (*p).to_owned(), (*s).to_owned()))
            .collect();
    assert_eq!(status, expected);

    // The plugin's role may insert into the status table (that is how the
    // engine writes its rows in its transaction) and do nothing else there;
    // a row it writes itself lacks the engine's MAC and is ignored.
    let columns = "message_id, plugin, plugin_version, component_sha256, attempt, status, info";
    let forged = "'victim', 'probe', '', '', 1, 'done', 'forged'";
    let zero_mac = format!("'\\x{}'::bytea", "00".repeat(32));
    let denied = [
        (
            "m-key",
            "sql-query",
            "SELECT key FROM sandpipe.status_key".to_owned(),
        ),
        (
            "m-read",
            "sql-query",
            "SELECT info FROM sandpipe.status".to_owned(),
        ),
        (
            "m-update",
            "sql-exec",
            "UPDATE sandpipe.status SET info = 'x'".to_owned(),
        ),
        (
            "m-delete",
            "sql-exec",
            "DELETE FROM sandpipe.status".to_owned(),
        ),
        (
            "m-at",
            "sql-exec",
            format!(
                "INSERT INTO sandpipe.status ({columns}, mac, at) VALUES ({forged}, {zero_mac}, now() - interval '1 year')"
            ),
        ),
        (
            "m-returning",
            "sql-query",
            format!(
                "INSERT INTO sandpipe.status ({columns}, mac) VALUES ({forged}, {zero_mac}) RETURNING id"
            ),
        ),
    ];
    let refused = (
        "m-unsigned",
        "sql-exec",
        format!("INSERT INTO sandpipe.status ({columns}) VALUES ({forged})"),
    );
    let accepted = (
        "m-forge",
        "sql-exec",
        format!("INSERT INTO sandpipe.status ({columns}, mac) VALUES ({forged}, {zero_mac})"),
    );
    for (id, action, sql) in denied.iter().chain([&refused]) {
        probe(&d, id, action, sql);
    }
    d.message(
        &format!("{}.json", accepted.0),
        &serde_json::json!({"uuid_ref": accepted.0, "data_type": "test/probe",
            "action": accepted.1, "sql": accepted.2, "commit": true})
        .to_string(),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, denied.len() as u64 + 2, "{summary}");
    for (id, _, sql) in &denied {
        let row = d.last(id, "probe").await;
        assert_eq!(row.status, "skipped", "{id}");
        assert!(
            row.info.starts_with("error: access denied"),
            "{sql}: {}",
            row.info
        );
    }
    let row = d.last(refused.0, "probe").await;
    assert!(row.info.contains("status_signed"), "{}", row.info);
    assert_eq!(d.last(accepted.0, "probe").await.status, "done");
    // The forged row is in the table, but the engine does not see it: not
    // in the message's rows, and not a finished plugin to the idempotency
    // look-up (which would skip the plugin when `victim` is redelivered).
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sandpipe.status WHERE message_id = 'victim'"
        )
        .await,
        1
    );
    assert!(d.rows("victim").await.is_empty());
    let config = sandpipe::config::Config::load(&d.config).unwrap();
    let tls = sandpipe::tls::Tls::new(&config).unwrap();
    let log = sandpipe::status::StatusLog::new(
        sandpipe::store::database::Database::connect(&config.database, &tls).unwrap(),
    )
    .unwrap();
    assert!(log.finished_plugins("victim").await.unwrap().is_empty());
    assert!(
        log.finished_plugins("m-1").await.unwrap().contains("probe"),
        "a genuine row still counts"
    );

    // When the status rows cannot be written, the plugin's effects are not
    // committed either: the first attempt is refused (a trigger stands in
    // for the failure), requeued as an outage, and the second commits both.
    admin
        .batch_execute(
            "CREATE FUNCTION sandpipe.refuse_once() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 IF NEW.message_id = 'm-refused' AND NEW.status = 'done' AND NOT EXISTS (
                     SELECT 1 FROM sandpipe.status WHERE message_id = 'm-refused' AND status = 'failed'
                 ) THEN
                     RAISE EXCEPTION 'refused for the test';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_once BEFORE INSERT ON sandpipe.status
                 FOR EACH ROW EXECUTE FUNCTION sandpipe.refuse_once();",
        )
        .await
        .unwrap();
    probe(&d, "m-refused", "sql", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.deliveries), (1, 2), "{summary}");
    assert_eq!(
        count(&admin, "SELECT count(*) FROM probe.t WHERE x = 'm-refused'").await,
        1,
        "the refused attempt's insert was rolled back with its status rows"
    );
    let rows = d.rows("m-refused").await;
    let failed = rows
        .iter()
        .find(|r| r.plugin == "probe" && r.status == "failed")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert!(
        failed.info.contains("effects could not be committed")
            && failed.info.contains("refused for the test"),
        "{}",
        failed.info
    );
    let last = rows.last().unwrap();
    assert_eq!((last.plugin.as_str(), last.status.as_str()), ("", "done"));
}

#[tokio::test(flavor = "multi_thread")]
async fn execute_batch_applies_every_list_or_names_the_failing_one() {
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}pipeline: {{ concurrency: 1 }}\nplugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml("")
        ),
    );
    let rows: Vec<_> = (0..200)
        .map(|i| serde_json::json!([format!("r{i}"), i]))
        .collect();
    crate::plugins::batch(&d, "m-ok", serde_json::json!(rows));
    crate::plugins::batch(
        &d,
        "m-bad",
        serde_json::json!([["d", 4], ["e", null], ["f", 6]]),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 2, "{summary}");
    assert_eq!(d.last("m-ok", "probe").await.status, "done");
    let bad = d.last("m-bad", "probe").await;
    assert_eq!(bad.status, "skipped", "{bad:?}");
    crate::plugins::assert_batch_failure(&bad.info);
    let admin = db.admin().await;
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.b").await, 200);
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM probe.b WHERE id IN ('d', 'e', 'f')"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_begun_early_and_left_unused_commits_nothing_and_frees_its_connection() {
    // A plugin whose last invocation used `sql` has its next transaction
    // begun while the guest starts (`Effects::begin_early`). An invocation
    // that then runs no SQL leaves it unused: it is rolled back, and the
    // invocations after it (begun early or not) work as before. A plugin
    // pool of one connection: a leaked early transaction would hold it,
    // and the next invocation's SQL would wait out its deadline.
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}pipeline: {{ concurrency: 1 }}\nplugins:\n  defaults: {{ timeout: 5s }}\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml(", plugin_pool_size: 1")
        ),
    );
    for (id, action) in [
        ("m-a", "sql"),
        ("m-b", "done"),
        ("m-c", "sql"),
        ("m-d", "done"),
        ("m-e", "sql"),
    ] {
        probe(&d, id, action, "");
        let summary = d.run_once().await.unwrap();
        assert_eq!((summary.done, summary.processed), (1, 1), "{id}: {summary}");
    }
    // All at once in one run too: sql and no-sql invocations alternate on
    // the one connection.
    for i in 0..6 {
        let action = if i % 2 == 0 { "sql" } else { "done" };
        probe(&d, &format!("m-{i}"), action, "");
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.processed), (6, 6), "{summary}");
    let admin = db.admin().await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM probe.t").await,
        6,
        "one row per sql message: m-a, m-c, m-e, m-0, m-2, m-4"
    );
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM probe.t WHERE x IN ('m-b', 'm-d', 'm-1', 'm-3', 'm-5')"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_invocations_sql_is_rolled_back() {
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}pipeline: {{ concurrency: 1 }}\nplugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml("")
        ),
    );
    probe(&d, "m-ok", "sql", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    probe(&d, "m-err", "sql-then-error", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 1, "{summary}");
    let last = d.last("m-err", "probe").await;
    assert_eq!(last.status, "failed");
    assert!(last.info.contains("after sql"), "{}", last.info);
    let admin = db.admin().await;
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.t").await, 1);
    assert_eq!(
        count(&admin, "SELECT count(*) FROM probe.t WHERE x = 'm-err'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn whatever_the_init_script_gives_a_plugin_role_is_taken_back() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.sql");
    std::fs::write(
        &init,
        "DO $$
         DECLARE r regrole;
         BEGIN
             SELECT nspowner::regrole INTO r FROM pg_namespace WHERE nspname = 'alpha';
             EXECUTE format('ALTER ROLE %s SUPERUSER CREATEROLE BYPASSRLS INHERIT', r);
             EXECUTE format('GRANT pg_read_server_files, pg_execute_server_program TO %s', r);
         END $$;",
    )
    .unwrap();
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml(&format!(", init: \"{}\"", init.display()))
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let admin = db.admin().await;
    let role = db.role("alpha");
    let row = admin
        .query_one(
            "SELECT rolsuper OR rolcreaterole OR rolbypassrls OR rolinherit, rolcanlogin,
                    (SELECT count(*) FROM pg_auth_members WHERE member = r.oid)
             FROM pg_roles r WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "{role} kept a privileged attribute");
    assert!(row.get::<_, bool>(1));
    assert_eq!(
        row.get::<_, i64>(2),
        0,
        "{role} is still a member of a role"
    );
    for sql in [
        "SELECT pg_read_file('/etc/passwd')",
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "SET ROLE pg_read_server_files",
    ] {
        let result = attempt(&alpha, sql).await;
        assert!(
            matches!(result, Err(WitError::AccessDenied(_))),
            "{sql}: {result:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_connection_is_unavailable_and_the_next_invocation_reconnects() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml(", plugin_pool_size: 1")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let mut tx = begin(&alpha).await;
    let pid = tx
        .query("SELECT pg_backend_pid()", vec![], 1)
        .await
        .unwrap();
    let pid: i32 = table(&pid).parse().unwrap();
    db.admin()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let lost = tx.query("SELECT 1", vec![], 1).await;
    assert!(matches!(lost, Err(WitError::Unavailable(_))), "{lost:?}");
    assert!(tx.commit().await.is_err());
    assert_eq!(attempt(&alpha, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_that_is_not_a_superuser_will_do() {
    let db = TestDb::new().await;
    let admin_role = format!("sandpipe_{}_admin", db.name);
    db.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {admin_role} LOGIN CREATEROLE;
             GRANT CREATE ON DATABASE {} TO {admin_role};",
            db.name
        ))
        .await
        .unwrap();
    let url = format!(
        "{}/{}",
        server().replacen("postgres@", &format!("{admin_role}@"), 1),
        db.name
    );
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\ndatabase: {{ type: postgres, url: \"{url}\" }}\n\
         plugins:\n  grants:\n    alpha: {{ sql: true }}\n    beta: {{ sql: true }}\n"
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let beta = plugin_db(&database, &config, "beta");
    let mut tx = begin(&alpha).await;
    tx.execute("CREATE TABLE mine (x int)", vec![])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        attempt(&alpha, "SELECT count(*) FROM mine").await.unwrap(),
        "0"
    );
    let denied = attempt(&beta, "SELECT count(*) FROM alpha.mine").await;
    assert!(
        matches!(denied, Err(WitError::AccessDenied(_))),
        "{denied:?}"
    );
    let denied = attempt(&beta, "SELECT count(*) FROM sandpipe.status").await;
    assert!(
        matches!(denied, Err(WitError::AccessDenied(_))),
        "{denied:?}"
    );
    let log = sandpipe::status::StatusLog::new(database.clone()).unwrap();
    log.record(vec![sandpipe::status::Entry::message(
        "m",
        1,
        sandpipe::status::Status::Received,
        "",
    )])
    .await
    .unwrap();
    assert_eq!(log.rows("m").await.unwrap().len(), 1);
    // And again, now that everything exists.
    Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failed_statement_the_invocation_cannot_commit() {
    // PostgreSQL aborts the transaction at the first error and would answer
    // a later COMMIT by rolling back silently: the engine refuses to commit
    // instead, so the plugin fails (and is retried) rather than losing its
    // SQL without a word.
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml("")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let mut tx = begin(&alpha).await;
    tx.execute("CREATE TABLE t (x int)", vec![]).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = begin(&alpha).await;
    tx.execute("INSERT INTO t VALUES (1)", vec![])
        .await
        .unwrap();
    let failed = tx.query("SELECT * FROM no_such_table", vec![], 1).await;
    assert!(matches!(failed, Err(WitError::Invalid(_))), "{failed:?}");
    let err = tx.commit().await.err().map(|e| format!("{e:#}")).unwrap();
    assert!(
        err.contains("not committed") && err.contains("no_such_table"),
        "{err}"
    );

    // Errors found before the server sees the statement do not abort it.
    let mut tx = begin(&alpha).await;
    tx.execute("INSERT INTO t VALUES (2)", vec![])
        .await
        .unwrap();
    assert!(tx.execute("COMMIT", vec![]).await.is_err());
    assert!(
        tx.execute("INSERT INTO t VALUES ($1)", vec![Value::Text("x".into())])
            .await
            .is_err()
    );
    tx.commit().await.unwrap();
    let admin = db.admin().await;
    assert_eq!(count(&admin, "SELECT sum(x)::bigint FROM alpha.t").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_script_runs_and_a_missing_or_failing_one_stops_the_engine() {
    let db = TestDb::new().await;
    // The example script: its reference table is readable by text-stats
    // (granted through its schema's owner) and by nobody else.
    let example = root().join("examples/postgres/init.sql");
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    text-stats: {{ sql: true }}\n    other: {{ sql: true }}\n",
        db.yaml(&format!(", init: \"{}\"", example.display()))
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let other = plugin_db(&database, &config, "other");
    let text_stats = plugin_db(&database, &config, "text-stats");
    let mut reader = begin(&text_stats).await;
    let rows = reader
        .query(
            "SELECT label FROM reference.mime_type WHERE mime = 'text/plain'",
            vec![],
            10,
        )
        .await
        .unwrap();
    assert!(matches!(&rows.values[0][0], Value::Text(t) if t == "plain text"));
    reader.rollback().await;
    let mut other = begin(&other).await;
    let denied = other
        .query("SELECT * FROM reference.mime_type", vec![], 10)
        .await;
    assert!(
        matches!(denied, Err(WitError::AccessDenied(_))),
        "{denied:?}"
    );
    other.rollback().await;
    let admin = db.admin().await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM sandpipe.message_outcome").await,
        0
    );
    // It runs again at the next start (idempotently).
    Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    drop(database);

    // Missing, then failing: `check` and `run` refuse, naming the file.
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}plugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml(", init: missing.sql")
        ),
    );
    let missing = d.path("missing.sql");
    let out = d.cli(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("database.init"),
        "{stdout}{stderr}"
    );
    let err = d.run_once().await.err().map(|e| format!("{e:#}")).unwrap();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    std::fs::write(
        &missing,
        "CREATE TABLE IF NOT EXISTS fine (x int);\nCREATE TABLE broken (x nosuchtype);\n",
    )
    .unwrap();
    let out = d.cli(&["run", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&missing.display().to_string())
            && stderr.contains("line 2")
            && stderr.contains("nosuchtype"),
        "{stderr}"
    );
    // The failed script left nothing behind.
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('fine', 'broken')"
        )
        .await,
        0
    );
}

fn parse(yaml: &str) -> Config {
    Config::parse(Path::new("/nonexistent/sandpipe.yaml"), yaml).unwrap()
}

/// The own database of `plugin`, as the engine makes it once per plugin.
fn plugin_db(database: &Database, config: &Config, plugin: &str) -> PluginDb {
    database
        .plugin_db(plugin, &config.limits_for(plugin))
        .unwrap()
}

async fn begin(db: &PluginDb) -> Transaction {
    Transaction::begin(db).await.unwrap()
}

/// Run `sql` in a transaction of its own (rolled back).
async fn attempt(db: &PluginDb, sql: &str) -> Result<String, WitError> {
    let mut tx = begin(db).await;
    let result = tx.query(sql, vec![], 100).await.map(|rows| table(&rows));
    tx.rollback().await;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_plugin_stays_inside_its_schema() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  defaults: {{ timeout: 20s, sql_rows: 100 }}\n  grants:\n    alpha: {{ sql: true }}\n    beta: {{ sql: {{ schema: beta_data }} }}\n",
        db.yaml(", plugin_pool_size: 1")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let beta = plugin_db(&database, &config, "beta");
    let alpha_role = db.role("alpha");

    // alpha keeps a secret in its schema (search_path is its schema).
    let mut tx = begin(&alpha).await;
    tx.execute("CREATE TABLE secret (s TEXT)", vec![])
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO secret VALUES ($1)",
        vec![Value::Text("alpha's".into())],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        attempt(&alpha, "SELECT s FROM alpha.secret").await.unwrap(),
        "\"alpha's\""
    );

    let denied = |result: Result<String, WitError>, what: &str| match result {
        Err(WitError::AccessDenied(_)) => {}
        other => panic!("{what}: expected access-denied, got {other:?}"),
    };
    let refused = |result: Result<String, WitError>, what: &str| {
        assert!(result.is_err(), "{what} was allowed: {result:?}");
    };

    // Another plugin's tables, the status log, the engine's other tables.
    for sql in [
        "SELECT * FROM alpha.secret",
        "SELECT * FROM sandpipe.status",
        "SELECT * FROM sandpipe.plugin_state",
        "SELECT * FROM sandpipe.plugin_role",
    ] {
        denied(attempt(&beta, sql).await, sql);
    }
    // System catalogs beyond what every role sees: password hashes, server
    // files, other sessions' queries.
    for sql in [
        "SELECT rolpassword FROM pg_authid",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_ls_dir('.')",
        "SELECT lo_import('/etc/passwd')",
    ] {
        denied(attempt(&beta, sql).await, sql);
    }
    let visible = attempt(
        &beta,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE usename IS DISTINCT FROM current_user AND query IS NOT NULL \
         AND query <> '<insufficient privilege>'",
    )
    .await
    .unwrap();
    assert_eq!(visible, "0");

    // Becoming someone else.
    for sql in [
        "SET ROLE postgres",
        &format!("SET ROLE \"{alpha_role}\""),
        "SET SESSION AUTHORIZATION postgres",
        "ALTER ROLE CURRENT_USER SUPERUSER",
        "ALTER ROLE CURRENT_USER BYPASSRLS",
        &format!("GRANT \"{alpha_role}\" TO CURRENT_USER"),
    ] {
        denied(attempt(&beta, sql).await, sql);
    }
    let mut tx = begin(&beta).await;
    tx.execute("RESET ROLE", vec![]).await.unwrap();
    let who = tx
        .query("SELECT current_user::text, session_user::text", vec![], 1)
        .await
        .unwrap();
    let beta_role = db.role("beta_data");
    assert!(
        matches!(&who.values[0][..], [Value::Text(a), Value::Text(b)] if *a == beta_role && *b == beta_role),
        "{who:?}"
    );
    let after_reset = tx.query("SELECT * FROM sandpipe.status", vec![], 1).await;
    assert!(
        matches!(after_reset, Err(WitError::AccessDenied(_))),
        "{after_reset:?}"
    );
    tx.rollback().await;

    // Programs and server files.
    let marker = std::env::temp_dir().join(format!("sandpipe-pg-escape-{}", db.name));
    for sql in [
        format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", marker.display()),
        format!("COPY (SELECT 1) TO '{}'", marker.display()),
        "COPY alpha.secret FROM PROGRAM 'id'".to_owned(),
    ] {
        denied(attempt(&beta, &sql).await, &sql);
    }
    assert!(!marker.exists(), "a plugin ran a program on the server");

    // Creating outside its own schema.
    for sql in [
        "CREATE TABLE public.planted (x int)",
        "CREATE FUNCTION public.lower(text) RETURNS text AS 'SELECT $1' LANGUAGE sql",
        "CREATE TABLE alpha.planted (x int)",
        "CREATE TABLE sandpipe.planted (x int)",
        "CREATE SCHEMA planted",
    ] {
        denied(attempt(&beta, sql).await, sql);
    }
    refused(
        attempt(&beta, "CREATE EXTENSION dblink").await,
        "CREATE EXTENSION dblink",
    );
    refused(
        attempt(&beta, &format!("CREATE DATABASE {}_x", db.name)).await,
        "CREATE DATABASE",
    );

    // The engine's transaction: refused outright, and PostgreSQL refuses a
    // COMMIT from inside a DO block or procedure in it.
    for sql in [
        "COMMIT",
        "  rollback",
        "/* hidden */ END",
        "BEGIN",
        "SAVEPOINT s",
        "PREPARE TRANSACTION 'x'",
    ] {
        denied(attempt(&beta, sql).await, sql);
    }
    let mut tx = begin(&beta).await;
    tx.execute("CREATE TABLE kept (x int)", vec![])
        .await
        .unwrap();
    let sneaky = tx.execute("DO $$ BEGIN COMMIT; END $$", vec![]).await.err();
    assert!(sneaky.is_some(), "COMMIT inside DO went through");
    tx.rollback().await;
    let admin = db.admin().await;
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('kept', 'planted')"
        )
        .await,
        0,
        "work of a rolled-back invocation was committed"
    );

    // Session state does not outlive the invocation (pool of one
    // connection: the next invocation gets the same one).
    let mut tx = begin(&alpha).await;
    tx.execute("SET work_mem = '1MB'", vec![]).await.unwrap();
    tx.query("SELECT pg_advisory_lock(4242)", vec![], 1)
        .await
        .unwrap();
    tx.execute("CREATE TEMP TABLE scratch (x int)", vec![])
        .await
        .unwrap();
    let before = tx
        .query("SELECT pg_backend_pid()", vec![], 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = begin(&alpha).await;
    let after = tx
        .query("SELECT pg_backend_pid()", vec![], 1)
        .await
        .unwrap();
    assert_eq!(table(&before), table(&after), "not the same connection");
    let settings = tx
        .query(
            "SELECT current_setting('work_mem'), current_setting('search_path'), \
                    current_setting('statement_timeout')",
            vec![],
            1,
        )
        .await
        .unwrap();
    assert_eq!(table(&settings), "\"4MB\", \"alpha\", \"20s\"");
    tx.rollback().await;
    // Those are the role's defaults; an invocation with another timeout
    // (`sandpipe exec`'s) sets its own, for its transaction only.
    let mut limits = config.limits_for("alpha");
    limits.timeout = Duration::from_secs(3);
    let shorter = database.plugin_db("alpha", &limits).unwrap();
    let timeout = "SELECT current_setting('statement_timeout')";
    assert_eq!(attempt(&shorter, timeout).await.unwrap(), "\"3s\"");
    assert_eq!(attempt(&alpha, timeout).await.unwrap(), "\"20s\"");
    assert_eq!(
        attempt(&beta, "SELECT pg_try_advisory_lock(4242)")
            .await
            .unwrap(),
        "true",
        "an advisory lock outlived the invocation that took it"
    );
    refused(
        attempt(&alpha, "SELECT * FROM scratch").await,
        "a temporary table outlived its invocation",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn runaway_statements_end_at_the_deadline_and_results_at_the_row_limit() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  defaults: {{ timeout: 1s, sql_rows: 100 }}\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml("")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");

    // statement_timeout stops it.
    let started = Instant::now();
    let result = attempt(&alpha, "SELECT pg_sleep(60)").await;
    assert!(
        matches!(result, Err(WitError::LimitExceeded(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The plugin turns statement_timeout off: the host's deadline stops it.
    let started = Instant::now();
    let mut tx = begin(&alpha).await;
    tx.execute("SET LOCAL statement_timeout = 0", vec![])
        .await
        .unwrap();
    let result = tx.query("SELECT pg_sleep(60)", vec![], 1).await;
    assert!(
        matches!(&result, Err(WitError::LimitExceeded(m)) if m.contains("deadline")),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let after = tx.query("SELECT 1", vec![], 1).await;
    assert!(after.is_err(), "the transaction went on after the deadline");
    tx.rollback().await;
    // ... and the sleeping statement is gone from the server.
    let admin = db.admin().await;
    let mut sleeping = 1;
    for _ in 0..50 {
        sleeping = count(
            &admin,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query = 'SELECT pg_sleep(60)'",
        )
        .await;
        if sleeping == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sleeping, 0, "the cancelled statement still runs");
    // The plugin carries on with its next invocation.
    assert_eq!(attempt(&alpha, "SELECT 7").await.unwrap(), "7");

    // Rows past the limit: limit-exceeded, without reading them all.
    let started = Instant::now();
    let result = attempt(&alpha, "SELECT generate_series(1, 100000000) AS g").await;
    assert!(
        matches!(&result, Err(WitError::LimitExceeded(m)) if m.contains("100 rows")),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(
        attempt(&alpha, "SELECT g FROM generate_series(1, 100) g")
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn values_map_to_postgres_types_and_back() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml("")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let mut tx = begin(&alpha).await;
    tx.execute(
        "CREATE TABLE v (s SMALLINT, i INTEGER, b BIGINT, r REAL, d DOUBLE PRECISION, \
         n NUMERIC(12, 3), t TEXT, vc VARCHAR(10), j JSON, jb JSONB, by BYTEA, \
         ts TIMESTAMP, tz TIMESTAMPTZ, u UUID, ok BOOLEAN, nothing TEXT)",
        vec![],
    )
    .await
    .unwrap();
    let ts = 1_700_000_000_123_456; // 2023-11-14T22:13:20.123456Z
    let inserted = tx
        .execute(
            "INSERT INTO v VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            vec![
                Value::Int(7),
                Value::Int(70_000),
                Value::Int(i64::MAX),
                Value::Float(0.5),
                Value::Float(2.25),
                Value::Float(12.5),
                Value::Text("text".into()),
                Value::Text("short".into()),
                Value::Json("{\"a\": 1}".into()),
                Value::Json("{\"b\": [1, 2]}".into()),
                Value::Bytes(vec![0, 1, 255]),
                Value::Timestamp(ts),
                Value::Timestamp(ts),
                Value::Text("67e55044-10b1-426f-9247-bb680e5fe0c8".into()),
                Value::Boolean(true),
                Value::Null,
            ],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let rows = tx
        .query(
            "SELECT s, i, b, r, d, n, t, vc, j, jb, by, ts, tz, u, ok, nothing, \
             tz = '2023-11-14 22:13:20.123456+00' AS exact FROM v",
            vec![],
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        rows.columns,
        vec![
            "s", "i", "b", "r", "d", "n", "t", "vc", "j", "jb", "by", "ts", "tz", "u", "ok",
            "nothing", "exact"
        ]
    );
    assert_eq!(
        table(&rows),
        format!(
            "7, 70000, {}, 0.5, 2.25, \"12.500\", \"text\", \"short\", json {{\"a\": 1}}, \
             json {{\"b\": [1, 2]}}, bytes[0, 1, 255], ts {ts}, ts {ts}, \
             \"67e55044-10b1-426f-9247-bb680e5fe0c8\", true, null, true",
            i64::MAX
        )
    );
    // Aggregates come back as PostgreSQL computes them: count and the sum
    // of integers are bigint, the sum of bigints is numeric (exact, as text).
    let agg = tx
        .query("SELECT count(*), sum(i), sum(b) FROM v", vec![], 1)
        .await
        .unwrap();
    assert_eq!(table(&agg), "1, 70000, \"9223372036854775807\"");
    // A value that does not fit its placeholder says so.
    let err = tx
        .execute("UPDATE v SET s = $1", vec![Value::Int(1 << 20)])
        .await
        .err()
        .map(|e| format!("{e:?}"))
        .unwrap_or_default();
    assert!(err.contains("out of range for smallint"), "{err}");
    // A column type the interface does not return names the cast.
    let err = tx
        .query("SELECT now() - tz AS age FROM v", vec![], 1)
        .await
        .err()
        .map(|e| format!("{e:?}"))
        .unwrap_or_default();
    assert!(
        err.contains("interval") && err.contains("age::text"),
        "{err}"
    );
    tx.rollback().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn user_defined_types_work_across_invocations_on_one_connection() {
    // Enums and domains are looked up by the client with statements it
    // keeps prepared; cleaning the session between invocations must not
    // pull them from under it (pool of one: every invocation reuses it).
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml(", plugin_pool_size: 1")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let mut tx = begin(&alpha).await;
    for sql in [
        "CREATE TYPE mood AS ENUM ('sad', 'happy')",
        "CREATE TYPE color AS ENUM ('red', 'blue')",
        "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
        "CREATE TABLE feelings (m mood, c color, p positive)",
        "INSERT INTO feelings VALUES ('happy', 'blue', 3)",
        "PREPARE mine AS SELECT 1",
    ] {
        tx.execute(sql, vec![]).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut backends = std::collections::BTreeSet::new();
    for (sql, expected) in [
        ("SELECT m FROM feelings", "\"happy\""),
        ("SELECT c FROM feelings", "\"blue\""),
        ("SELECT p FROM feelings", "3"),
        ("SELECT m, p FROM feelings WHERE m = $1", "\"happy\", 3"),
    ] {
        let mut tx = begin(&alpha).await;
        let params = if sql.contains("$1") {
            vec![Value::Text("happy".into())]
        } else {
            vec![]
        };
        let rows = tx.query(sql, params, 10).await.unwrap();
        assert_eq!(table(&rows), expected, "{sql}");
        let pid = tx
            .query("SELECT pg_backend_pid()", vec![], 1)
            .await
            .unwrap();
        backends.insert(table(&pid));
        // The plugin's own PREPAREd statement did not outlive its invocation.
        tx.execute("PREPARE mine AS SELECT 2", vec![])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        backends.len(),
        1,
        "the connection was not reused: {backends:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn attacks_through_the_real_component_are_answered_access_denied() {
    let db = TestDb::new().await;
    let marker = std::env::temp_dir().join(format!("sandpipe-pg-probe-{}", db.name));
    let d = Deployment::new(
        &[("fx-probe", "probe-a"), ("fx-probe", "probe-b")],
        &format!(
            "{}pipeline: {{ concurrency: 1 }}\nplugins:\n  defaults: {{ timeout: 1s }}\n  grants:\n    probe-a: {{ sql: true }}\n    probe-b: {{ sql: true }}\n",
            db.yaml("")
        ),
    );
    // Both plugins get every message. First each makes its table `t` and
    // stores the message id (action `sql` returns done, so it commits;
    // `sql-exec` and `sql-query` return skip, so they never commit).
    probe(&d, "m-1-setup", "sql", "");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let cases = [
        ("m-2-other", "sql-query", "SELECT x FROM probe_a.t"),
        ("m-3-status", "sql-query", "SELECT * FROM sandpipe.status"),
        ("m-4-role", "sql-exec", "SET ROLE postgres"),
        (
            "m-5-program",
            "sql-exec",
            &format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", marker.display()),
        ),
        (
            "m-6-public",
            "sql-exec",
            "CREATE TABLE public.planted (x int)",
        ),
        ("m-7-commit", "sql-exec", "COMMIT"),
    ];
    for (id, action, sql) in &cases {
        probe(&d, id, action, sql);
    }
    let started = Instant::now();
    probe(&d, "m-8-sleep", "sql-query", "SELECT pg_sleep(60)");
    let summary = d.run_once().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // Every case is skipped with its error; the sleep fails (twice: dead).
    assert_eq!(
        (summary.done, summary.dead),
        (cases.len() as u64, 1),
        "{summary}"
    );

    let a_reads_its_own = d.last("m-2-other", "probe-a").await;
    assert!(
        a_reads_its_own.info.starts_with("rows: ") && a_reads_its_own.info.contains("m-1-setup"),
        "{}",
        a_reads_its_own.info
    );
    for (id, _, sql) in &cases {
        let b = d.last(id, "probe-b").await;
        assert_eq!(b.status, "skipped", "{id}");
        assert!(
            b.info.starts_with("error: access denied"),
            "{sql}: {}",
            b.info
        );
    }
    assert!(!marker.exists(), "a plugin ran a program on the server");
    let sleep = d.last("m-8-sleep", "probe-a").await;
    assert!(
        sleep.info.contains("limit-exceeded") || sleep.info.contains("deadline"),
        "{}",
        sleep.info
    );
    eprintln!("pg_sleep through the component: {}", sleep.info);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_name_the_key() {
    let db = TestDb::new().await;
    for (yaml, key, text) in [
        (db.yaml(", schema: Public"), "database.schema", "lowercase"),
        (
            db.yaml(", schema: pg_mine"),
            "database.schema",
            "PostgreSQL's own",
        ),
        (db.yaml(", pool_size: 0"), "database", "at least 1"),
        (
            "database: { type: postgres, url: \"postgres://x@h:notaport/db\" }\n".to_owned(),
            "database.url",
            "URL",
        ),
        (
            format!(
                "{}plugins:\n  grants:\n    a-b: {{ sql: true }}\n    a_b: {{ sql: true }}\n",
                db.yaml("")
            ),
            "plugins.grants.a_b.sql.schema",
            "already used by plugin `a-b`",
        ),
        (
            format!(
                "{}plugins:\n  grants:\n    x: {{ sql: {{ schema: sandpipe }} }}\n",
                db.yaml("")
            ),
            "plugins.grants.x.sql.schema",
            "the engine",
        ),
        (
            db.yaml(&format!(", schema: {}", "s".repeat(64))),
            "database.schema",
            "1 to 63 lowercase letters",
        ),
    ] {
        let err = Config::parse(
            Path::new("/etc/sandpipe.yaml"),
            &format!("listener: {{ type: dir, path: spool }}\n{yaml}"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains(key) && err.contains(text), "{yaml}: {err}");
    }
    // The component's `describe` still runs for a plugin with `sql`, with
    // the database prepared.
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}plugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml("")
        ),
    );
    let out = d.cli(&["check"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_first_messages_with_ddl_all_finish_at_their_first_attempt() {
    // fx-probe's `sql` runs `CREATE TABLE IF NOT EXISTS t` and an INSERT in
    // every message. On a fresh database, concurrent first transactions
    // used to race in PostgreSQL's catalog ("duplicate key value violates
    // unique constraint pg_type_typname_nsp_index"); the engine now takes
    // the schema's DDL lock before a plugin's first DDL statement.
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}pipeline: {{ concurrency: 64 }}\nplugins:\n  grants:\n    probe: {{ sql: true }}\n",
            db.yaml(", plugin_pool_size: 16")
        ),
    );
    for i in 0..64 {
        probe(&d, &format!("burst-{i}"), "sql", "");
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.processed, summary.done), (64, 64), "{summary}");
    let admin = db.admin().await;
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.t").await, 64);
    let failed: Vec<String> = admin
        .query(
            "SELECT message_id || ' ' || status || ' ' || info FROM sandpipe.status \
             WHERE status = 'failed' OR attempt > 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(failed.is_empty(), "a first message failed: {failed:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_init_script_runs_as_the_plugin_and_a_failing_one_stops_the_engine() {
    let db = TestDb::new().await;
    let yaml = format!(
        "{}plugins:\n  grants:\n    probe: {{ sql: {{ init: probe-init.sql }} }}\n",
        db.yaml("")
    );
    let d = Deployment::new(&[("fx-probe", "probe")], &yaml);
    std::fs::write(
        d.path("probe-init.sql"),
        "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY);\n\
         INSERT INTO seen VALUES ('from-init') ON CONFLICT DO NOTHING;\n",
    )
    .unwrap();
    probe(
        &d,
        "m-init",
        "sql-exec",
        "INSERT INTO seen VALUES ('m-init')",
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.processed, 1, "{summary}");
    let rows = d.rows("m-init").await;
    assert!(
        rows.iter()
            .any(|r| r.plugin == "probe" && r.info == "ok: 1"),
        "{rows:?}"
    );
    let admin = db.admin().await;
    // In the plugin's schema, owned by the plugin's role.
    let owner: String = admin
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'probe' AND tablename = 'seen'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, db.role("probe"));
    // (sql-exec skips, so its own INSERT was rolled back.)
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.seen").await, 1);
    // It runs again at the next start (idempotently)...
    probe(&d, "m-init-2", "sql", "");
    assert_eq!(d.run_once().await.unwrap().done, 1);
    assert_eq!(count(&admin, "SELECT count(*) FROM probe.seen").await, 1);
    // ...and a failing one stops the engine, naming the plugin, the file
    // and the line, and leaves nothing behind.
    std::fs::write(
        d.path("probe-init.sql"),
        "CREATE TABLE IF NOT EXISTS fine (x int);\nCREATE TABLE broken (x nosuchtype);\n",
    )
    .unwrap();
    let out = d.cli(&["run", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("probe")
            && stderr.contains(&d.path("probe-init.sql").display().to_string())
            && stderr.contains("line 2")
            && stderr.contains("nosuchtype"),
        "{stderr}"
    );
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('fine', 'broken')"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_are_reused_with_their_statements_and_cleaned_only_when_needed() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml(", plugin_pool_size: 1")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    let mut tx = begin(&alpha).await;
    tx.execute("CREATE TABLE t (x int)", vec![]).await.unwrap();
    tx.commit().await.unwrap();
    let admin = db.admin().await;
    let pid = || async {
        let mut tx = begin(&alpha).await;
        let pid = table(
            &tx.query("SELECT pg_backend_pid()", vec![], 1)
                .await
                .unwrap(),
        );
        tx.commit().await.unwrap();
        pid
    };
    let first = pid().await;
    // The same INSERT twice: prepared once on the connection, kept.
    for i in 0..2 {
        let mut tx = begin(&alpha).await;
        tx.execute("INSERT INTO t VALUES ($1)", vec![Value::Int(i)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        attempt(
            &alpha,
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'INSERT INTO t VALUES ($1)'"
        )
        .await
        .unwrap(),
        "1",
        "the plugin's statement was not kept prepared (once) on its connection"
    );
    assert_eq!(pid().await, first, "a clean session was not reused");
    // Nor was it reset (as by `DISCARD ALL`) when nothing was left: the
    // session's sequence state, which `DISCARD SEQUENCES` would forget, is
    // still there for the next invocation on the connection.
    let mut tx = begin(&alpha).await;
    tx.execute("CREATE SEQUENCE s", vec![]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = begin(&alpha).await;
    let next = table(&tx.query("SELECT nextval('s')", vec![], 1).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(
        attempt(&alpha, "SELECT currval('s')").await.ok(),
        Some(next),
        "a session that held nothing beyond its transaction was reset"
    );
    // A function can leave a temporary table or an advisory lock behind
    // without any statement saying so: found after the invocation, cleaned.
    let mut tx = begin(&alpha).await;
    tx.execute(
        "CREATE FUNCTION sneak() RETURNS void LANGUAGE plpgsql AS \
         $$ BEGIN CREATE TEMP TABLE hidden (x int); PERFORM pg_advisory_lock(77); END $$",
        vec![],
    )
    .await
    .unwrap();
    tx.query("SELECT sneak()::text", vec![], 1).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        attempt(
            &alpha,
            "SELECT count(*) FROM pg_class WHERE relname = 'hidden'"
        )
        .await
        .unwrap(),
        "0",
        "a temporary table made by a function outlived its invocation"
    );
    let locks = count(
        &admin,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77",
    )
    .await;
    assert_eq!(
        locks, 0,
        "an advisory lock taken by a function outlived its invocation"
    );
    assert_eq!(pid().await, first, "a cleaned session was not reused");
    // Look-alikes of the check's function and views put first in the
    // plugin's search_path hide nothing: the check names pg_catalog's.
    let mut tx = begin(&alpha).await;
    for sql in [
        "CREATE FUNCTION pg_advisory_unlock_all() RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint'",
        "CREATE VIEW pg_cursors AS SELECT false AS is_holdable WHERE false",
        "SET LOCAL search_path = alpha, pg_catalog",
    ] {
        tx.execute(sql, vec![]).await.unwrap();
    }
    tx.query("SELECT pg_advisory_lock(78)::text", vec![], 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let locks = count(
        &admin,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 78",
    )
    .await;
    assert_eq!(
        locks, 0,
        "a look-alike kept an advisory lock past its invocation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_server_refuses_more_connections_invocations_wait_for_the_pools_own() {
    let db = TestDb::new().await;
    let config = parse(&format!(
        "listener: {{ type: dir, path: spool }}\n{}plugins:\n  defaults: {{ timeout: 20s }}\n  grants:\n    alpha: {{ sql: true }}\n",
        db.yaml(", plugin_pool_size: 8")
    ));
    let database = Database::open(&config, &sandpipe::tls::Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = plugin_db(&database, &config, "alpha");
    // The server lets the plugin's role open two connections, its pool
    // would open eight: "too many connections for role" (53300) for the
    // third, as "too many clients" would be for the whole server.
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER ROLE {} CONNECTION LIMIT 2",
            quote(&db.role("alpha"))
        ))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let alpha = alpha.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = Transaction::begin(&alpha).await?;
            tx.query("SELECT pg_sleep(0.2)::text", vec![], 1).await?;
            tx.commit()
                .await
                .map_err(|e| WitError::Internal(format!("{e:#}")))?;
            Ok::<_, WitError>(i)
        }));
    }
    for task in tasks {
        let done = task.await.unwrap();
        assert!(
            done.is_ok(),
            "an invocation failed instead of waiting: {done:?}"
        );
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
