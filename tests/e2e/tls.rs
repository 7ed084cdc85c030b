//! TLS to RabbitMQ (`amqps://`), Redis (`rediss://`) and PostgreSQL
//! (`sslmode`), against the local servers through TLS-terminating proxies
//! (tests/support/tls.rs) presenting certificates of a CA each test makes:
//! a whole message through the engine over TLS with the CA configured;
//! without it, each backend refuses the server's certificate with a message
//! that names the backend, the URL without its password and `tls.ca_file`;
//! `verify-full` refuses a certificate for another name where `verify-ca`
//! accepts it; `require` needs no CA; a statement past its deadline is
//! cancelled over TLS; a missing or empty CA file stops `sandpipe check`.
//! Each proxy counts its handshakes, so a test cannot pass by going around
//! TLS.

use std::time::{Duration, Instant};

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sandpipe::capability::sql::Transaction;
use sandpipe::config::Config;
use sandpipe::sandbox::bindings::WitError;
use sandpipe::store::database::Database;
use sandpipe::tls::Tls;

use crate::harness::Deployment;
use crate::harness::tls::{TestCa, TlsProxy};
use crate::postgres::TestDb;

const AMQP_PORT: u16 = 5672;
const REDIS_PORT: u16 = 6379;
const PG_PORT: u16 = 5432;

/// The names a server certificate for the local servers carries.
const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn parse(dir: &std::path::Path, yaml: &str) -> Config {
    Config::parse(&dir.join("sandpipe.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_goes_through_amqps_rediss_and_postgres_verify_full() {
    let ca = TestCa::new();
    let cert = ca.server(LOCAL);
    let amqp = TlsProxy::start(AMQP_PORT, &cert, false).await;
    let redis = TlsProxy::start(REDIS_PORT, &cert, false).await;
    let pg = TlsProxy::start(PG_PORT, &cert, true).await;
    let db = TestDb::new().await;
    let u = unique();
    let (exchange, queue) = (format!("x_tls_{u}"), format!("q_tls_{u}"));
    let (feed, feed_queue) = (format!("x_tls_feed_{u}"), format!("q_tls_feed_{u}"));
    let meta_key = format!("sandpipe-test:tls:{u}:meta");
    let stream = format!("sandpipe-test:tls:{u}:events");

    // The metadata, and a queue catching the RabbitMQ output (plain).
    let plain = Tls::default();
    let mut conn = sandpipe::listener::redis::connect(
        "redis://127.0.0.1:6379",
        Duration::from_secs(5),
        &plain,
    )
    .await
    .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&meta_key)
        .arg(r#"{"carried": "over rediss"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    let rabbit =
        sandpipe::listener::rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f", &plain)
            .await
            .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    ch.exchange_declare(
        feed.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        feed_queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        feed_queue.as_str().into(),
        feed.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/%2f", amqp.port);
    let rediss = format!("rediss://127.0.0.1:{}", redis.port);
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "listener:\n  type: rabbitmq\n  url: \"{amqps}\"\n  exchange: {{ name: {exchange}, type: fanout }}\n  queue: {queue}\n\
             meta_store: {{ type: redis, url: \"{rediss}\" }}\n\
             database: {{ type: postgres, url: \"postgres://postgres@127.0.0.1:{}/{}?sslmode=verify-full\" }}\n\
             tls: {{ ca_file: ca.pem }}\n\
             outputs:\n  events: {{ type: redis, url: \"{rediss}\", stream: \"{stream}\" }}\n  \
             feed: {{ type: rabbitmq, url: \"{amqps}\", exchange: {{ name: {feed}, type: fanout }} }}\n\
             plugins:\n  grants:\n    probe: {{ sql: true, meta: true, emit: [events, feed] }}\n",
            pg.port, db.name
        ),
    );
    // Relative to the config file, as the config's other paths.
    ca.write(d.dir.path());
    let config = Config::load(&d.config).unwrap();
    let tls = Tls::new(&config).unwrap();
    let probe = |id: &str, more: serde_json::Value| {
        let mut body = serde_json::json!({"uuid_ref": id, "data_type": "test/probe"});
        if let (Some(b), Some(m)) = (body.as_object_mut(), more.as_object()) {
            b.extend(m.clone());
        }
        body.to_string()
    };
    for body in [
        probe("tls-sql", serde_json::json!({"action": "sql"})),
        probe(
            "tls-meta",
            serde_json::json!({"action": "echo-meta", "meta_location": meta_key}),
        ),
        probe(
            "tls-redis-out",
            serde_json::json!({"action": "emit", "output": "events"}),
        ),
        probe(
            "tls-amqp-out",
            serde_json::json!({"action": "emit", "output": "feed"}),
        ),
    ] {
        // Published over amqps too (`sandpipe send`'s code).
        sandpipe::listener::send(&config.listener, body.as_bytes(), "m.json", &tls)
            .await
            .unwrap();
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (4, 0), "{summary}");

    // The plugin's SQL ran through its role's pool over TLS.
    let admin = db.admin().await;
    let n: i64 = admin
        .query_one("SELECT count(*) FROM probe.t WHERE x = 'tls-sql'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // The status log, read back through the same TLS settings.
    assert_eq!(d.last("tls-sql", "probe").await.status, "done");
    let meta = d.last("tls-meta", "probe").await;
    assert!(meta.info.contains("over rediss"), "{}", meta.info);
    // The outputs.
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), 1);
    let got = ch
        .basic_get(
            feed_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .map(|m| m.delivery.data.clone());
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    // Every backend was reached through its proxy, over TLS.
    assert!(amqp.handshakes() >= 3, "amqp {}", amqp.handshakes()); // send, listener, output
    assert!(redis.handshakes() >= 2, "redis {}", redis.handshakes()); // metadata, output
    assert!(pg.handshakes() >= 3, "postgres {}", pg.handshakes()); // start-up, pool, plugin role

    for q in [
        queue.clone(),
        format!("{queue}.retry"),
        format!("{queue}.dead"),
        feed_queue,
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [exchange, format!("{queue}.dead"), feed] {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
    let _: () = redis::cmd("DEL")
        .arg(&meta_key)
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The parts of a certificate error every backend's message has.
fn assert_certificate_error(text: &str, backend: &str) {
    eprintln!("{backend}: {text}");
    for part in [
        "TLS certificate problem",
        &format!("connecting to {backend} at "),
        "unknown issuer",
        "tls.ca_file",
    ] {
        assert!(text.contains(part), "no {part:?} in: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_ca_each_backend_refuses_the_certificate_and_says_what_to_set() {
    let ca = TestCa::new();
    let cert = ca.server(LOCAL);
    let amqp = TlsProxy::start(AMQP_PORT, &cert, false).await;
    let redis = TlsProxy::start(REDIS_PORT, &cert, false).await;
    let pg = TlsProxy::start(PG_PORT, &cert, true).await;
    let db = TestDb::new().await;
    let untrusting = Tls::default();

    // RabbitMQ, through `sandpipe send`: the password is not shown.
    let d = Deployment::new(
        &[],
        &format!(
            "listener: {{ type: rabbitmq, url: \"amqps://guest:s3cret@127.0.0.1:{}/%2f\", exchange: {{ name: x_tls_never }}, queue: q_tls_never }}\n",
            amqp.port
        ),
    );
    std::fs::write(d.path("m.json"), "{}").unwrap();
    let out = d.cli(&["send", d.path("m.json").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_certificate_error(&stderr, "RabbitMQ");
    assert!(
        stderr.contains(&format!("amqps://guest:***@127.0.0.1:{}/%2f", amqp.port)),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");

    // Redis.
    let err = sandpipe::listener::redis::connect(
        &format!("rediss://:s3cret@127.0.0.1:{}", redis.port),
        Duration::from_secs(5),
        &untrusting,
    )
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert_certificate_error(&err, "Redis");
    assert!(!err.contains("s3cret"), "{err}");

    // Redis's own way to turn the check off is refused.
    let insecure = sandpipe::listener::redis::connect(
        &format!("rediss://127.0.0.1:{}/#insecure", redis.port),
        Duration::from_secs(5),
        &untrusting,
    )
    .await;
    assert!(insecure.is_err(), "#insecure was accepted");

    // PostgreSQL, through `sandpipe check`.
    let d = Deployment::new(
        &[],
        &format!(
            "database: {{ type: postgres, url: \"postgres://postgres@127.0.0.1:{}/{}?sslmode=verify-full\" }}\n",
            pg.port, db.name
        ),
    );
    let out = d.cli(&["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert_certificate_error(&text, "PostgreSQL");
    assert!(text.contains("sslmode=verify-full"), "{text}");

    // No handshake completed anywhere; with the CA, the same calls work.
    assert_eq!(
        (amqp.handshakes(), redis.handshakes(), pg.handshakes()),
        (0, 0, 0)
    );
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path());
    let trusting = Tls::new(&parse(
        dir.path(),
        "listener: { type: dir, path: s }\ntls: { ca_file: ca.pem }\n",
    ))
    .unwrap();
    sandpipe::listener::rabbitmq::connect(
        &format!("amqps://guest:guest@127.0.0.1:{}/%2f", amqp.port),
        &trusting,
    )
    .await
    .unwrap();
    sandpipe::listener::redis::connect(
        &format!("rediss://127.0.0.1:{}", redis.port),
        Duration::from_secs(5),
        &trusting,
    )
    .await
    .unwrap();
    assert_eq!((amqp.handshakes(), redis.handshakes()), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_certificate_for_another_name_and_verify_ca_accepts_it() {
    let ca = TestCa::new();
    let wrong = ca.server(&["wrong.example"]);
    let pg = TlsProxy::start(PG_PORT, &wrong, true).await;
    let amqp = TlsProxy::start(AMQP_PORT, &wrong, false).await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path());
    let config = |mode: &str| {
        parse(
            dir.path(),
            &format!(
                "listener: {{ type: dir, path: s }}\ntls: {{ ca_file: ca.pem }}\n\
                 database: {{ type: postgres, url: \"postgres://postgres@127.0.0.1:{}/{}?sslmode={mode}\" }}\n\
                 plugins:\n  grants:\n    alpha: {{ sql: true }}\n",
                pg.port, db.name
            ),
        )
    };

    let full = config("verify-full");
    let err = Database::open(&full, &Tls::new(&full).unwrap())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    eprintln!("{err}");
    assert!(err.contains("TLS certificate problem"), "{err}");
    assert!(err.contains("not valid for"), "{err}");
    assert!(err.contains("wrong.example"), "{err}");
    assert!(err.contains("sslmode=verify-full"), "{err}");
    assert!(err.contains("verify-ca"), "the hint names verify-ca: {err}");

    // verify-ca: the chain is the test CA's, the name is not looked at;
    // the plugin's own pool connects the same way.
    let ca_only = config("verify-ca");
    let database = Database::open(&ca_only, &Tls::new(&ca_only).unwrap())
        .await
        .unwrap();
    let alpha = database
        .plugin_db("alpha", &ca_only.limits_for("alpha"))
        .unwrap();
    let mut tx = Transaction::begin(&alpha).await.unwrap();
    let rows = tx.query("SELECT current_user::text", vec![], 10).await;
    tx.rollback().await;
    assert!(rows.is_ok(), "{rows:?}");
    assert!(pg.handshakes() >= 2, "{}", pg.handshakes());

    // RabbitMQ always checks the name.
    let err = sandpipe::listener::rabbitmq::connect(
        &format!("amqps://guest:guest@127.0.0.1:{}/%2f", amqp.port),
        &Tls::new(&full).unwrap(),
    )
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.contains("not valid for"), "{err}");
    assert_eq!(amqp.handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn require_encrypts_without_any_ca_and_verify_ca_without_it_refuses() {
    let ca = TestCa::new();
    let pg = TlsProxy::start(PG_PORT, &ca.server(LOCAL), true).await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = |mode: &str| {
        parse(
            dir.path(),
            &format!(
                "listener: {{ type: dir, path: s }}\n\
                 database: {{ type: postgres, url: \"postgres://postgres@127.0.0.1:{}/{}?sslmode={mode}\" }}\n",
                pg.port, db.name
            ),
        )
    };
    let require = config("require");
    let database = Database::open(&require, &Tls::new(&require).unwrap()).await;
    assert!(database.is_ok(), "{:?}", database.err());
    let after_require = pg.handshakes();
    assert!(after_require >= 1);

    let verify = config("verify-ca");
    let err = Database::open(&verify, &Tls::new(&verify).unwrap())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert_certificate_error(&err, "PostgreSQL");
    assert_eq!(pg.handshakes(), after_require);

    // The proxy takes TLS only: `disable` cannot get through it.
    let disable = config("disable");
    assert!(
        Database::open(&disable, &Tls::new(&disable).unwrap())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_past_its_deadline_is_cancelled_over_tls() {
    let ca = TestCa::new();
    let pg = TlsProxy::start(PG_PORT, &ca.server(LOCAL), true).await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path());
    let config = parse(
        dir.path(),
        &format!(
            "listener: {{ type: dir, path: s }}\ntls: {{ ca_file: ca.pem }}\n\
             database: {{ type: postgres, url: \"postgres://postgres@127.0.0.1:{}/{}?sslmode=verify-full\" }}\n\
             plugins:\n  defaults: {{ timeout: 1s }}\n  grants:\n    alpha: {{ sql: true }}\n",
            pg.port, db.name
        ),
    );
    let database = Database::open(&config, &Tls::new(&config).unwrap())
        .await
        .unwrap();
    let alpha = database
        .plugin_db("alpha", &config.limits_for("alpha"))
        .unwrap();
    let sleep = format!("SELECT pg_sleep(60) AS tls_{}", unique());
    let mut tx = Transaction::begin(&alpha).await.unwrap();
    tx.execute("SET LOCAL statement_timeout = 0", vec![])
        .await
        .unwrap();
    let before = pg.handshakes();
    let started = Instant::now();
    let result = tx.query(&sleep, vec![], 1).await;
    assert!(
        matches!(&result, Err(WitError::LimitExceeded(m)) if m.contains("deadline")),
        "{result:?}"
    );
    tx.rollback().await;
    // Only a cancel request through the proxy (TLS, as the connection)
    // stops it: closing the connection would leave it sleeping.
    let admin = db.admin().await;
    let mut running = 1;
    for _ in 0..50 {
        running = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                &[&sleep],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running, 0, "the statement still runs");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(pg.handshakes() > before, "no cancel request came over TLS");
}

#[test]
fn a_missing_or_certificate_less_ca_file_stops_check_naming_the_key() {
    let d = Deployment::new(&[], "tls: { ca_file: certs/none.pem }\n");
    let out = d.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("tls.ca_file"), "{stdout}");
    assert!(stdout.contains("certs/none.pem"), "{stdout}");
    assert!(stdout.contains("cannot read"), "{stdout}");

    std::fs::create_dir_all(d.path("certs")).unwrap();
    std::fs::write(
        d.path("certs/none.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = d.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("tls.ca_file"), "{stdout}");
    assert!(stdout.contains("holds no certificate"), "{stdout}");

    std::fs::write(d.path("certs/none.pem"), TestCa::new().pem()).unwrap();
    let out = d.cli(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_s3_endpoint_is_trusted_through_the_ca_file_only() {
    let server = tokio::task::spawn_blocking(crate::s3::S3Server::start)
        .await
        .unwrap();
    server.create_bucket("sandpipe-tls");
    let ca = TestCa::new();
    let https = TlsProxy::start(server.port, &ca.server(LOCAL), false).await;
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path());
    let config = |tls: &str| {
        parse(
            dir.path(),
            &format!(
                "listener: {{ type: dir, path: s }}\n{tls}\
                 data_store: {{ type: s3, bucket: sandpipe-tls, endpoint: \"https://127.0.0.1:{}\", access_key_id: testing, secret_access_key: testing }}\n",
                https.port
            ),
        )
    };
    let trusting = config("tls: { ca_file: ca.pem }\n");
    let data =
        sandpipe::store::data::DataStore::new(&trusting.data_store, &Tls::new(&trusting).unwrap())
            .unwrap();
    data.put("a/b.txt", bytes::Bytes::from_static(b"over https"))
        .await
        .unwrap();
    assert!(data.exists("a/b.txt").await.unwrap());
    assert!(https.handshakes() >= 1);

    let untrusting = config("");
    let data = sandpipe::store::data::DataStore::new(
        &untrusting.data_store,
        &Tls::new(&untrusting).unwrap(),
    )
    .unwrap();
    let before = https.handshakes();
    let refused = data.exists("a/b.txt").await;
    eprintln!("S3 without the CA: {refused:?}");
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(https.handshakes(), before);
}
