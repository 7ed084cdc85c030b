//! Sync jobs of a `source` component (tests/fixtures/fx-source, whose
//! documents are a function of its `config`): full and incremental syncs
//! into the SQLite and PostgreSQL sinks, reconciliation (only what changed
//! is written), the job records, the lock, a SIGKILL mid-sync, and hostile
//! sources, each a failed job with its reason and the engine unharmed.

use std::sync::Arc;

use sandpipe::config::Config;
use sandpipe::sync::{JobKind, JobRecord, JobState, Trigger};
use tokio::sync::watch;

use crate::harness::Deployment;
use crate::postgres::{TestDb, connect};

/// A deployment with fx-source as source `src` (`config` its grant's
/// config, `more` extra keys of the source, `database` the database line).
fn deployment(config: &str, more: &str, database: &str) -> Deployment {
    let page = if more.contains("page_size") {
        ""
    } else {
        "page_size: 500"
    };
    let more = if page.is_empty() {
        more.trim_start_matches(", ")
    } else {
        more
    };
    Deployment::new(
        &[("fx-source", "src")],
        &format!(
            "{database}plugins:\n  grants:\n    src:\n      config: {{ {config} }}\n      limits: {{ timeout: 2s }}\nsources:\n  src: {{ {page}{more} }}\n"
        ),
    )
}

/// Set the source's `generation`.
fn set_generation(d: &Deployment, generation: u32) {
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    let mut out = String::new();
    for line in yaml.lines() {
        if line.trim_start().starts_with("config:") {
            let kept: Vec<&str> = line
                .trim_start()
                .trim_start_matches("config:")
                .trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
                .map(str::trim)
                .filter(|kv| !kv.is_empty() && !kv.starts_with("generation"))
                .collect();
            out.push_str(&format!(
                "      config: {{ {}, generation: {generation} }}\n",
                kept.join(", ")
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&d.config, out).unwrap();
}

/// Run one job of `kind` on the deployment's source, as `sandpipe sync` does.
async fn sync(d: &Deployment, kind: JobKind) -> JobRecord {
    let config = Config::load(&d.config).unwrap();
    let assembled = sandpipe::app::assemble(config).await.unwrap();
    assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
    let source = sandpipe::sync::Source::new(
        "src",
        &assembled.config,
        &assembled.plugins,
        Arc::clone(&assembled.sandbox),
        &assembled.tls,
    )
    .unwrap();
    let (_cancel, cancelled) = watch::channel(false);
    source
        .sync(kind, Trigger::OnDemand, cancelled, &mut |_| {})
        .await
        .unwrap()
}

/// The sink's documents, `(id, version, n)` sorted by id.
fn sqlite_docs(d: &Deployment) -> Vec<(String, i64, i64)> {
    let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, body->>'$.version', body->>'$.n' FROM src ORDER BY body->>'$.n'")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What fx-source holds in `generation` of `count` documents, as
/// `(id, version, n)` sorted by n.
fn expected(count: i64, generation: u32) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for n in 0..count + count / 100 {
        let exists = if n >= count {
            generation >= 2
        } else {
            generation < 2 || n % 100 != 1
        };
        if !exists {
            continue;
        }
        let version = if generation >= 2 && (n >= count || n % 100 == 0) {
            2
        } else {
            1
        };
        out.push((format!("doc-{n}"), version, n));
    }
    out
}

fn counts(job: &JobRecord) -> [u64; 6] {
    let c = &job.counts;
    [
        c.indexed, c.updated, c.deleted, c.skipped, c.dropped, c.errors,
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_sync_then_one_percent_changed_writes_only_the_changes() {
    let d = deployment("count: 20000", "", "");
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    assert_eq!(counts(&first), [20000, 0, 0, 0, 0, 0]);
    assert_eq!(first.sync_cursor.as_deref(), Some("generation-1"));
    assert_eq!(sqlite_docs(&d), expected(20000, 1));

    // Nothing changed: `changed` says so, and the job does no work.
    let idle = sync(&d, JobKind::Full).await;
    assert_eq!(idle.state, JobState::Completed, "{idle:?}");
    assert_eq!(counts(&idle), [0; 6]);

    // 1 % updated, 1 % deleted, 1 % added: only they are written.
    set_generation(&d, 2);
    let second = sync(&d, JobKind::Full).await;
    assert_eq!(second.state, JobState::Completed, "{second:?}");
    assert_eq!(counts(&second), [200, 200, 200, 19600, 0, 0]);
    assert_eq!(sqlite_docs(&d), expected(20000, 2));

    // The records are durable, newest first.
    let out = d.cli(&["sources"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("documents: 20000"), "{text}");
    assert!(
        text.contains(&format!(
            "job {} of source `src` (full): completed",
            second.id
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_sync_applies_each_operation() {
    let d = deployment("count: 5000", "", "");
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    set_generation(&d, 2);
    let second = sync(&d, JobKind::Incremental).await;
    assert_eq!(second.state, JobState::Completed, "{second:?}");
    assert_eq!(counts(&second), [50, 50, 50, 0, 0, 0]);
    assert_eq!(second.sync_cursor.as_deref(), Some("generation-2"));
    assert_eq!(sqlite_docs(&d), expected(5000, 2));
    // Caught up: nothing to do.
    let third = sync(&d, JobKind::Incremental).await;
    assert_eq!(counts(&third), [0; 6]);
    assert_eq!(third.state, JobState::Completed);
}

#[tokio::test(flavor = "multi_thread")]
async fn sandpipe_sync_prints_the_job_and_documents_without_timestamps_compare_bodies() {
    let d = deployment("count: 300, timestamps: false", "", "");
    let out = d.cli(&["sync", "src"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("of source `src` (full): completed")
            && stdout.contains("300 indexed, 0 updated, 0 deleted, 0 skipped"),
        "{stdout}"
    );
    set_generation(&d, 2);
    let out = d.cli(&["sync", "src", "--full"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 indexed, 3 updated, 3 deleted, 294 skipped"),
        "{stdout}"
    );
    // `check` and `plugins` know the world; `check` the source and its sink.
    let out = d.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("component `src` 1.0.0 (world source, sha256 ")
            && stdout.contains("synced by sources.src"),
        "{stdout}"
    );
    assert!(
        stdout.contains("source `src`: ok, into SQLite table src in ")
            && stdout.contains("1 plugin(s) ok, 1 source(s) ok, 0 service(s) ok, 0 problem(s)"),
        "{stdout}"
    );
    let out = d.cli(&["plugins"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("src") && l.contains(" source ")),
        "{stdout}"
    );
    // A source that is not declared is named with those that are.
    let out = d.cli(&["sync", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no source `nope` under `sources` (declared: src)"),
        "{stderr}"
    );
}

/// A hostile or failing source's job, with `count` documents.
async fn hostile(mode: &str, more: &str) -> JobRecord {
    let d = deployment(&format!("count: 1000, mode: {mode}"), more, "");
    sync(&d, JobKind::Full).await
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_sources_fail_their_jobs_with_the_reason() {
    for (mode, why) in [
        ("oversize", "documents for a page of at most 500"),
        ("ten-million", "memory"),
        ("stuck-cursor", "the sync would never end"),
        ("cycling-cursor", "a cursor it had returned before"),
        ("huge-cursor", "a `next` cursor of 100000 bytes, over 65536"),
        ("loop", "deadline"),
        (
            "ping-fails",
            "`ping` returned unavailable: the synthetic system is down",
        ),
        ("bad-json", "11 document errors in a row"),
    ] {
        let job = hostile(mode, "").await;
        assert_eq!(job.state, JobState::Error, "{mode}: {job:?}");
        let error = job.error.clone().unwrap_or_default();
        assert!(error.contains(why), "{mode}: {why}: {error}");
    }

    // Some errors, under the monitor's thresholds: counted, the job completes.
    let dup = hostile("duplicates", "").await;
    assert_eq!(dup.state, JobState::Completed, "{dup:?}");
    assert_eq!(counts(&dup), [998, 0, 0, 0, 0, 2]);

    let huge = hostile("huge-doc", "").await;
    assert_eq!(huge.state, JobState::Completed, "{huge:?}");
    assert_eq!(counts(&huge), [999, 0, 0, 0, 1, 0]);

    // Ids over 512 bytes are their MD5, as Elastic's.
    let d = deployment("count: 10, mode: long-ids", "", "");
    assert_eq!(sync(&d, JobKind::Full).await.state, JobState::Completed);
    let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
    let id: String = conn
        .query_row("SELECT id FROM src WHERE body->>'$.n' = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    let long = format!("doc-0-{}", "x".repeat(600));
    assert_eq!(
        id,
        format!("{:x}", md5_of(long.as_bytes())),
        "the id of doc-0"
    );

    // The engine is unharmed: a well-behaved source syncs after them.
    let d = deployment("count: 100", "", "");
    assert_eq!(sync(&d, JobKind::Full).await.state, JobState::Completed);
}

/// MD5 of `bytes`, through Python's hashlib (an implementation other
/// than the engine's).
fn md5_of(bytes: &[u8]) -> u128 {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.md5(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    u128::from_str_radix(String::from_utf8_lossy(&out.stdout).trim(), 16).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_the_error_rate_fails() {
    // Pages of 2 whose second document repeats the first: every other
    // document is an error, never 11 in a row, a rate of 0.5.
    let d = deployment(
        "count: 300, mode: duplicates",
        ", page_size: 2, errors: { max_rate: 0.3, window: 20 }",
        "",
    );
    let job = sync(&d, JobKind::Full).await;
    assert_eq!(job.state, JobState::Error, "{job:?}");
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("a rate over errors.max_rate (0.3)"),
        "{job:?}"
    );
}

/// The PostgreSQL sink's documents as `(id, version, n)`, sorted by n.
async fn pg_docs(db: &TestDb) -> Vec<(String, i64, i64)> {
    let admin = db.admin().await;
    admin
        .query(
            "SELECT id, (body->>'version')::int8, (body->>'n')::int8 FROM sandpipe_sources.src ORDER BY (body->>'n')::int8",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_thousand_documents_into_postgres_then_the_changes_searchable() {
    let db = TestDb::new().await;
    let database = format!("database: {{ type: postgres, url: \"{}\" }}\n", db.url());
    let d = deployment("count: 100000", "", &database);
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    assert_eq!(counts(&first), [100000, 0, 0, 0, 0, 0]);
    set_generation(&d, 2);
    let second = sync(&d, JobKind::Full).await;
    assert_eq!(second.state, JobState::Completed, "{second:?}");
    assert_eq!(counts(&second), [1000, 1000, 1000, 98000, 0, 0]);
    assert_eq!(pg_docs(&db).await, expected(100000, 2));

    // The mirror is searchable: the full-text column and its GIN index.
    let admin = db.admin().await;
    let hits: i64 = admin
        .query_one(
            "SELECT count(*) FROM sandpipe_sources.src WHERE search @@ to_tsquery('simple', 'document & 100042')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hits, 1);
    let indexed: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'sandpipe_sources' AND tablename = 'src' AND indexdef LIKE '%USING gin (search)%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(indexed);

    // One job at a time across engines: a held lock refuses a second.
    let holder = connect(&db.url()).await;
    let held: bool = holder
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('sandpipe:sync'), hashtext('sandpipe_sources.src'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(held);
    let config = Config::load(&d.config).unwrap();
    let assembled = sandpipe::app::assemble(config).await.unwrap();
    let source = sandpipe::sync::Source::new(
        "src",
        &assembled.config,
        &assembled.plugins,
        Arc::clone(&assembled.sandbox),
        &assembled.tls,
    )
    .unwrap();
    let (_cancel, cancelled) = watch::channel(false);
    let refused = source
        .sync(JobKind::Full, Trigger::OnDemand, cancelled, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("another sync into PostgreSQL table sandpipe_sources.src"),
        "{refused:#}"
    );
    drop(holder);

    // The job table on PostgreSQL, as `sources` and the API read it.
    let sink = source.sink();
    let jobs = sink.jobs("src", 5).await.unwrap();
    let states: Vec<(i64, JobState)> = jobs.iter().map(|j| (j.id, j.state)).collect();
    assert_eq!(
        states,
        [
            (second.id, JobState::Completed),
            (first.id, JobState::Completed)
        ]
    );
    assert_eq!(jobs[0].counts, second.counts);
    assert_eq!(jobs[0].sync_cursor.as_deref(), Some("generation-2"));
    assert_eq!(sink.request_cancel("src").await.unwrap(), 0, "nothing runs");
    assert_eq!(
        sink.job_state(second.id).await.unwrap(),
        Some(JobState::Completed)
    );
    assert_eq!(
        sink.last_started("src", JobKind::Full).await.unwrap(),
        Some(second.started_ms)
    );
    assert_eq!(
        sink.rules("src").await.unwrap().map(|r| r.0),
        Some("valid".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_killed_mid_way_is_run_again_and_the_sink_equals_the_source() {
    let db = TestDb::new().await;
    let database = format!("database: {{ type: postgres, url: \"{}\" }}\n", db.url());
    // A slow source (busy before each page), so the kill comes mid-way.
    let d = deployment(
        "count: 60000, spin: 30000000",
        ", batch: { operations: 200 }",
        &database,
    );
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    set_generation(&d, 2);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["sync", "src", "-c"])
        .arg(&d.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some of its batches are in (the job's counts move).
    let admin = db.admin().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let seen: i64 = admin
            .query_one(
                "SELECT coalesce(max(skipped + updated + indexed), 0) FROM sandpipe_sources.sandpipe_sync_jobs WHERE id > $1",
                &[&first.id],
            )
            .await
            .unwrap()
            .get(0);
        if seen > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the sync never wrote");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before it finished: {status:?}");

    let again = sync(&d, JobKind::Full).await;
    assert_eq!(again.state, JobState::Completed, "{again:?}");
    assert_eq!(pg_docs(&db).await, expected(60000, 2));
    let killed: (String, String) = {
        let row = admin
            .query_one(
                "SELECT state, error FROM sandpipe_sources.sandpipe_sync_jobs WHERE id > $1 AND id < $2",
                &[&first.id, &again.id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(killed.0, "error");
    assert!(killed.1.starts_with("interrupted"), "{killed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_rules_decide_what_goes_in_and_a_change_of_rules_reconciles() {
    let exclude_over = |n: u32| {
        format!(
            ", rules: {{ basic: [{{ id: big, policy: exclude, field: n, rule: \">\", value: {n}, order: 2 }}, {{ id: keep-7, policy: include, field: title, rule: ends_with, value: \"7\", order: 1 }}] }}"
        )
    };
    let d = deployment("count: 100", &exclude_over(49), "");
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    // 0..=49, and the titles ending in 7 come first (order 1): 57, 67, ...
    let ids: Vec<i64> = sqlite_docs(&d).iter().map(|(_, _, n)| *n).collect();
    let mut want: Vec<i64> = (0..=49).collect();
    want.extend([57, 67, 77, 87, 97]);
    assert_eq!(ids, want);
    assert_eq!(counts(&first), [55, 0, 0, 0, 0, 0]);

    // Narrower rules: what they exclude now is deleted, the rest skipped.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, yaml.replace("value: 49", "value: 19")).unwrap();
    let second = sync(&d, JobKind::Full).await;
    // Kept: 0..=19 and 27, 37, ..., 97 (28); the other 27 go.
    assert_eq!(counts(&second), [0, 0, 27, 28, 0, 0], "{second:?}");
    assert_eq!(sqlite_docs(&d).len(), 28);

    let out = d.cli(&["sources"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rules: valid"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // New rules need a full sync: an incremental one refuses to start.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, yaml.replace("value: 19", "value: 9")).unwrap();
    let refused = sync(&d, JobKind::Incremental).await;
    assert_eq!(refused.state, JobState::Error, "{refused:?}");
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("only a full sync applies them"),
        "{refused:?}"
    );
    assert_eq!(sqlite_docs(&d).len(), 28, "nothing written");

    // A source whose documents turn bad keeps what the sink has of them
    // (with rules too), under error thresholds that let the job end.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        yaml.replace("count: 100", "count: 100, mode: bad-json")
            .replace(
                "rules:",
                "errors: { max_total: 1000, max_consecutive: 1000, max_rate: 1.0 }, rules:",
            ),
    )
    .unwrap();
    let bad = sync(&d, JobKind::Full).await;
    assert_eq!(bad.state, JobState::Completed, "{bad:?}");
    assert_eq!(bad.counts.errors, 100, "{bad:?}");
    assert_eq!(sqlite_docs(&d).len(), 28, "no document lost to a bad page");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_rules_fail_the_job_and_advanced_rules_go_to_the_source() {
    let d = deployment(
        "count: 100",
        ", rules: { basic: [{ id: all, policy: include, field: title, rule: regex, value: \".*\", order: 1 }], advanced: { max_n: oops } }",
        "",
    );
    let job = sync(&d, JobKind::Full).await;
    assert_eq!(job.state, JobState::Error, "{job:?}");
    let error = job.error.clone().unwrap_or_default();
    assert!(
        error.contains("the sync rules are invalid (sources.src.rules)")
            && error.contains("rule all: the regex `.*` matches everything")
            && error.contains("advanced rules max_n: expected {\"max_n\": <a number>}"),
        "{error}"
    );
    // Nothing was written, and `sources` says why.
    assert_eq!(job.counts, sandpipe::sync::Counts::default());
    let out = d.cli(&["sources"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rules: invalid: rule all"), "{stdout}");

    // Valid advanced rules reach `get-docs`: only documents below 10.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    let yaml = yaml.replace(
        "basic: [{ id: all, policy: include, field: title, rule: regex, value: \".*\", order: 1 }], advanced: { max_n: oops }",
        "advanced: { max_n: 10 }",
    );
    std::fs::write(&d.config, yaml).unwrap();
    let job = sync(&d, JobKind::Full).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(counts(&job), [10, 0, 0, 0, 0, 0]);
}

/// The token the API test's deployment requires (`server.token`).
const TOKEN: &str = "s3cret-token";

/// A plain HTTP/1.0 POST on 127.0.0.1 with the test's bearer token:
/// (status code, body).
fn post(port: u16, path: &str) -> Option<(u16, String)> {
    request("POST", port, path, Some(TOKEN))
}

/// A request with `token` as its bearer token, if any.
fn request(method: &str, port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// GET `path` (with the token) as JSON.
fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = request("GET", port, path, Some(TOKEN)).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Poll `check` every 50 ms for up to 30 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sandpipe_run_syncs_on_schedule_and_the_http_api_starts_lists_and_cancels_jobs() {
    let port = crate::harness::free_port();
    let d = Deployment::new(
        &[("fx-source", "src"), ("fx-source", "slow")],
        &format!(
            "secrets:\n  api_token: {{ file: api.token }}\nserver: {{ listen: \"127.0.0.1:{port}\", token: api_token }}\nplugins:\n  grants:\n    src:\n      config: {{ count: 50 }}\n    slow:\n      config: {{ count: 100000, spin: 30000000 }}\nsources:\n  src: {{ page_size: 10, schedule: {{ full: 1s }} }}\n  slow: {{ page_size: 500 }}\n"
        ),
    );
    std::fs::write(d.path("api.token"), TOKEN).unwrap();
    let config = d.config.clone();
    let (stop, shutdown) = watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });

    // The schedule runs `src` at once, then every second.
    eventually("two scheduled jobs of src", || {
        let Some((200, body)) = request("GET", port, "/v1/sources/src/jobs", Some(TOKEN)) else {
            return false;
        };
        let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .filter(|j| j["trigger"] == "scheduled" && j["state"] == "completed")
            .count()
            >= 2
    })
    .await;
    let list = get_json(port, "/v1/sources");
    let src = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "src")
        .unwrap();
    assert_eq!(src["documents"], 50, "{src}");
    assert_eq!(src["component"], "src", "{src}");
    assert_eq!(src["next_runs"][0]["kind"], "full", "{src}");
    assert_eq!(src["next_runs"][0]["schedule"], "1s", "{src}");

    // The API takes the token: none or a wrong one is refused.
    for token in [None, Some("wrong-token!")] {
        let (status, body) = request("POST", port, "/v1/sources/slow/sync", token).unwrap();
        assert_eq!(status, 401, "{token:?}: {body}");
        let (status, body) = request("GET", port, "/v1/sources", token).unwrap();
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    // On demand: 202 with the job's id; a second while it runs: 409.
    let (status, body) = post(port, "/v1/sources/slow/sync?kind=full").unwrap();
    assert_eq!(status, 202, "{body}");
    let job = serde_json::from_str::<serde_json::Value>(&body).unwrap()["job"]
        .as_i64()
        .unwrap();
    let (status, body) = post(port, "/v1/sources/slow/sync").unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("another sync into"), "{body}");
    // Canceled through the job table: it stops after the page in hand.
    let (status, body) = post(port, "/v1/sources/slow/cancel").unwrap();
    assert_eq!(status, 202, "{body}");
    eventually("the slow job canceled", || {
        let jobs = get_json(port, "/v1/sources/slow/jobs?limit=1");
        jobs[0]["id"] == job && jobs[0]["state"] == "canceled"
    })
    .await;
    let (status, body) = post(port, "/v1/sources/slow/cancel").unwrap();
    assert_eq!(status, 404, "{body}");
    // Bad requests name what is wrong.
    let (status, body) = post(port, "/v1/sources/nope/sync").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no source `nope`"), "{body}");
    let (status, body) = post(port, "/v1/sources/src/sync?kind=sideways").unwrap();
    assert_eq!(status, 400, "{body}");
    // Job counts and durations in /metrics.
    let (_, metrics) = crate::harness::get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("sandpipe_sync_jobs_total{")
            && metrics.contains("source=\"src\"")
            && metrics.contains("sandpipe_sync_job_seconds"),
        "{metrics}"
    );

    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
    let out = d.cli(&["sources"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("next full sync: "), "{stdout}");
    assert!(stdout.contains("(full): canceled"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_change_goes_to_the_outputs_as_an_event() {
    let d = Deployment::new(
        &[("fx-source", "src")],
        "outputs:\n  changes: { type: dir, path: changes }\nplugins:\n  grants:\n    src:\n      config: { count: 300 }\nsources:\n  src: { page_size: 100, outputs: [changes] }\n",
    );
    let events = |d: &Deployment| -> Vec<serde_json::Value> {
        d.files("changes")
            .iter()
            .map(|f| {
                let bytes = std::fs::read(d.path("changes").join(f)).unwrap();
                let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                // The dir output keeps the payload as text beside the headers.
                let payload = file["payload"].as_str().unwrap_or_default().to_owned();
                let mut event: serde_json::Value =
                    serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{f}: {e}: {file}"));
                event["headers"] = file["headers"].clone();
                event
            })
            .collect()
    };
    let first = sync(&d, JobKind::Full).await;
    assert_eq!(first.state, JobState::Completed, "{first:?}");
    let all = events(&d);
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|e| e["op"] == "index"));
    let doc7 = all.iter().find(|e| e["id"] == "doc-7").unwrap();
    assert_eq!(doc7["doc"]["title"], "Document 7", "{doc7}");

    for f in d.files("changes") {
        std::fs::remove_file(d.path("changes").join(f)).unwrap();
    }
    set_generation(&d, 2);
    let second = sync(&d, JobKind::Full).await;
    assert_eq!(counts(&second), [3, 3, 3, 294, 0, 0]);
    let mut ops: Vec<(String, String)> = events(&d)
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_owned(),
                e["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        [
            ("delete", "doc-1"),
            ("delete", "doc-101"),
            ("delete", "doc-201"),
            ("index", "doc-300"),
            ("index", "doc-301"),
            ("index", "doc-302"),
            ("update", "doc-0"),
            ("update", "doc-100"),
            ("update", "doc-200"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let deleted = events(&d)
        .into_iter()
        .find(|e| e["op"] == "delete")
        .unwrap();
    assert!(deleted["doc"].is_null(), "{deleted}");
}

/// A paginated JSON API the HTTP source syncs: items `item-N` with an
/// `updated_at` that grows with every change; deleted items stay as
/// tombstones. `GET /items?limit&cursor&updated_since`.
#[derive(Clone, Default)]
struct Api {
    items: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    clock: Arc<std::sync::atomic::AtomicU64>,
}

impl Api {
    fn tick(&self) -> String {
        let n = self.clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("2026-12-01T00:00:00.{n:06}Z")
    }

    fn add(&self, n: usize) {
        let at = self.tick();
        self.items.lock().unwrap().push(serde_json::json!({
            "id": format!("item-{n}"), "updated_at": at, "title": format!("Item {n}"),
            "text": "x".repeat(800),
        }));
    }

    /// Change 1 % (n % 100 == 0), delete 1 % (n % 100 == 1), add 1 %.
    fn churn(&self, count: usize) {
        let mut items = self.items.lock().unwrap();
        for (n, item) in items.iter_mut().enumerate() {
            if n % 100 == 0 {
                item["updated_at"] = self.tick().into();
                item["title"] = format!("Item {n}, changed").into();
            } else if n % 100 == 1 {
                item["updated_at"] = self.tick().into();
                item["deleted"] = true.into();
            }
        }
        drop(items);
        for n in count..count + count / 100 {
            self.add(n);
        }
    }

    /// The live items, `(id, title)` sorted.
    fn live(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .items
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.get("deleted").is_none())
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_owned(),
                    i["title"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    async fn serve(self) -> u16 {
        use axum::extract::{Query, State};
        #[derive(serde::Deserialize)]
        struct Params {
            limit: usize,
            cursor: Option<usize>,
            updated_since: Option<String>,
        }
        async fn items(
            State(api): State<Api>,
            Query(p): Query<Params>,
        ) -> axum::Json<serde_json::Value> {
            let items = api.items.lock().unwrap();
            let mut chosen: Vec<&serde_json::Value> = match &p.updated_since {
                Some(since) => items
                    .iter()
                    .filter(|i| i["updated_at"].as_str().unwrap() > since.as_str())
                    .collect(),
                None => items
                    .iter()
                    .filter(|i| i.get("deleted").is_none())
                    .collect(),
            };
            chosen.sort_by_key(|i| i["id"].as_str().unwrap().to_owned());
            let from = p.cursor.unwrap_or(0);
            let page: Vec<serde_json::Value> = chosen
                .iter()
                .skip(from)
                .take(p.limit)
                .map(|i| (*i).clone())
                .collect();
            let next = (from + p.limit < chosen.len()).then(|| (from + p.limit).to_string());
            axum::Json(serde_json::json!({ "items": page, "next": next }))
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/items", axum::routing::get(items))
            .with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_source_syncs_a_paginated_api_in_full_then_incrementally() {
    let api = Api::default();
    for n in 0..10_000 {
        api.add(n);
    }
    let port = api.clone().serve().await;
    let d = Deployment::new(
        &[("http-source", "api")],
        &format!(
            "plugins:\n  grants:\n    api:\n      config: {{ url: \"http://127.0.0.1:{port}/items\" }}\n      http: {{ allow: [\"http://127.0.0.1:{port}\"] }}\nsources:\n  api: {{ page_size: 500 }}\n"
        ),
    );
    let titles = |d: &Deployment| -> Vec<(String, String)> {
        let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
        let mut stmt = conn
            .prepare("SELECT id, body->>'$.title' FROM api ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let run = |kind: &str| {
        let out = d.cli(&["sync", "api", kind]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let first = run("--full");
    assert!(
        first.contains("10000 indexed, 0 updated, 0 deleted, 0 skipped"),
        "{first}"
    );
    assert_eq!(titles(&d), api.live());

    api.churn(10_000);
    // The API does not tell new items from changed ones: the source
    // yields both as updates (100 changed + 100 new), and the tombstones
    // as deletions.
    let second = run("--incremental");
    assert!(
        second.contains("0 indexed, 200 updated, 100 deleted, 0 skipped"),
        "{second}"
    );
    assert_eq!(titles(&d), api.live());
    // A full sync now writes nothing: every timestamp is the sink's.
    let third = run("--full");
    assert!(
        third.contains("0 indexed, 0 updated, 0 deleted, 10000 skipped"),
        "{third}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_external_postgresql_database_is_read_only_and_held_to_the_sql_limits() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    // A login that may also delete: the engine must still refuse to.
    let reader = format!("sandpipe_{}_reader", db.name);
    admin
        .batch_execute(&format!(
            "CREATE TABLE things (id int PRIMARY KEY, name text, seen timestamptz);
             INSERT INTO things SELECT i, 'thing ' || i, '2026-01-01T00:00:00Z' FROM generate_series(1, 30) i;
             CREATE ROLE \"{reader}\" LOGIN PASSWORD 'pw';
             GRANT SELECT, DELETE ON things TO \"{reader}\";"
        ))
        .await
        .unwrap();
    let url = |user: &str| {
        format!(
            "{}/{}?sslmode=disable",
            crate::postgres::server().replace("postgres@", &format!("{user}@")),
            db.name
        )
    };
    let d = Deployment::new(
        &[("fx-probe", "probe"), ("fx-probe", "superprobe")],
        &format!(
            "secrets:\n  crm_pw: {{ file: crm.pw }}\ndatabases:\n  crm: {{ type: postgres, url: \"{}\", password: crm_pw }}\n  as_superuser: {{ type: postgres, url: \"{}\" }}\nplugins:\n  grants:\n    probe:\n      sql: {{ database: crm }}\n      limits: {{ sql_rows: 20, timeout: 2s }}\n    superprobe:\n      sql: {{ database: as_superuser }}\n",
            url(&reader),
            url("postgres"),
        ),
    );
    std::fs::write(d.path("crm.pw"), "pw").unwrap();
    for (id, action, sql) in [
        (
            "read",
            "sql-query",
            "SELECT id, name, seen FROM things WHERE id <= 2 ORDER BY id",
        ),
        ("delete", "sql-exec", "DELETE FROM things"),
        ("commit", "sql-exec", "COMMIT"),
        (
            "hidden",
            "sql-query",
            "WITH gone AS (DELETE FROM things RETURNING id) SELECT count(*) FROM gone",
        ),
        ("many", "sql-query", "SELECT id FROM things"),
        ("sleep", "sql-query", "SELECT pg_sleep(30)::text"),
    ] {
        crate::postgres::probe(&d, id, action, sql);
    }
    crate::postgres::probe(&d, "super", "sql-query", "SELECT 1");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.failed, 0, "{summary}");
    let info = |row: sandpipe::status::Row| row.info;
    assert_eq!(
        info(d.last("read", "probe").await),
        "rows: [[Value::Int(1), Value::Text(\"thing 1\"), Value::Timestamp(1767225600000000)], [Value::Int(2), Value::Text(\"thing 2\"), Value::Timestamp(1767225600000000)]]"
    );
    for id in ["delete", "commit"] {
        let refused = info(d.last(id, "probe").await);
        assert!(
            refused.contains("database `crm` is read-only: it takes queries only"),
            "{id}: {refused}"
        );
    }
    // A write hidden in a query: the server refuses it (PostgreSQL names
    // the statement's command, SELECT).
    let hidden = info(d.last("hidden", "probe").await);
    assert!(
        hidden.contains("cannot execute SELECT in a read-only transaction"),
        "{hidden}"
    );
    let many = info(d.last("many", "probe").await);
    assert!(
        many.contains("limit exceeded") && many.contains("more than 20 rows (limits.sql_rows)"),
        "{many}"
    );
    // A statement still running at the invocation's deadline fails the
    // invocation, and ends on the server too (not left running there).
    let slept = info(d.last("sleep", "probe").await);
    assert!(slept.starts_with("deadline"), "{slept}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let running: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pg_sleep(30) still runs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let superuser = info(d.last("super", "superprobe").await);
    assert!(
        superuser.contains("database `as_superuser`: its login is (or may become) a superuser"),
        "{superuser}"
    );
    let left: i64 = admin
        .query_one("SELECT count(*) FROM things", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 30);
}
