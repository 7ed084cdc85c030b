//! The shipped examples run as written: `examples/rabbitmq-redis-postgres`
//! against the real RabbitMQ, Redis and PostgreSQL, with only its names
//! made unique (database, exchanges, queue, Redis keys, port) so tests can
//! run side by side; `examples/redis-s3`; `examples/sources/http-api`;
//! `examples/services/orders`.

use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sandpipe::listener::rabbitmq::connect;

use crate::harness::{component, init_script, root};
use crate::postgres::TestDb;

#[tokio::test(flavor = "multi_thread")]
async fn the_rabbitmq_redis_postgres_example_runs_as_written() {
    let example = root().join("examples/rabbitmq-redis-postgres");
    let db = TestDb::new().await;
    let u = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // As `just guests` puts them there: the components and their init scripts.
    for name in ["image-meta", "text-stats"] {
        std::fs::copy(component(name), plugins.join(format!("{name}.wasm"))).unwrap();
        std::fs::copy(init_script(name), plugins.join(format!("{name}.init.sql"))).unwrap();
    }
    std::fs::copy(example.join("init.sql"), dir.path().join("init.sql")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rename = |text: &str| {
        text.replace("x_sandpipe_stats", &format!("x_ex_stats_{u}"))
            .replace("x_sandpipe", &format!("x_ex_{u}"))
            .replace("q_sandpipe", &format!("q_ex_{u}"))
            .replace("sandpipe:example:meta", &format!("sandpipe-test:ex:{u}"))
            .replace("example-", &format!("ex-{u}-"))
    };
    let yaml = rename(&std::fs::read_to_string(example.join("sandpipe.yaml")).unwrap())
        .replace("${RABBITMQ_PASSWORD}", "guest")
        .replace(
            "postgres://postgres@127.0.0.1:5432/sandpipe_example",
            &db.url(),
        )
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{port}"))
        .replace(
            "../quickstart/data",
            &root()
                .join("examples/quickstart/data")
                .display()
                .to_string(),
        )
        .replace("../../target/plugins", &plugins.display().to_string());
    let config_path = dir.path().join("sandpipe.yaml");
    std::fs::write(&config_path, yaml).unwrap();

    // The metadata the messages point at (as the recipe stores it).
    let mut redis = sandpipe::listener::redis::connect(
        "redis://127.0.0.1:6379",
        Duration::from_secs(5),
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    let key = |name: &str| format!("sandpipe-test:ex:{u}:{name}");
    let _: () = redis::cmd("SET")
        .arg(key("red-square"))
        .arg(r#"{"camera": "none", "source": "example"}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key("gradient"))
        .arg("camera")
        .arg("none")
        .query_async(&mut redis)
        .await
        .unwrap();

    // Catch what text-stats publishes.
    let amqp = connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    let ch = amqp.create_channel().await.unwrap();
    let stats_exchange = format!("x_ex_stats_{u}");
    let stats_queue = format!("q_ex_stats_{u}");
    ch.exchange_declare(
        stats_exchange.as_str().into(),
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
        stats_queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        stats_queue.as_str().into(),
        stats_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let config = sandpipe::config::Config::load(&config_path).unwrap();
    for entry in std::fs::read_dir(example.join("messages")).unwrap() {
        let body = rename(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        sandpipe::listener::send(
            &config.listener,
            body.as_bytes(),
            "m.json",
            &sandpipe::tls::Tls::default(),
        )
        .await
        .unwrap();
    }
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let summary = sandpipe::app::run(&config_path, true, rx).await.unwrap();
    assert_eq!((summary.done, summary.dead), (3, 0), "{summary}");

    let admin = db.admin().await;
    let images: Vec<(String, i32, i32)> = admin
        .query(
            "SELECT format, width, height FROM image_meta.image_meta ORDER BY format",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        images,
        vec![("jpeg".into(), 32, 24), ("png".into(), 16, 16)]
    );
    let words: i64 = admin
        .query_one("SELECT words FROM text_stats.text_stats", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(words, 37);
    let statuses: i64 = admin
        .query_one(
            "SELECT count(*) FROM sandpipe.status WHERE status = 'done' AND plugin <> ''",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(statuses, 3);
    let published = ch
        .basic_get(
            stats_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("text-stats published its summary to the stats exchange");
    let summary: serde_json::Value = serde_json::from_slice(&published.delivery.data).unwrap();
    assert_eq!(summary["words"], 37);

    // Clean up the broker and Redis (the database goes with `db`).
    for q in [
        stats_queue.clone(),
        format!("q_ex_{u}"),
        format!("q_ex_{u}.retry"),
        format!("q_ex_{u}.dead"),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for x in [
        stats_exchange,
        format!("x_ex_{u}"),
        format!("q_ex_{u}.dead"),
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
    let _: () = redis::cmd("DEL")
        .arg(key("red-square"))
        .arg(key("gradient"))
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_s3_example_runs_as_written() {
    let example = root().join("examples/redis-s3");
    let server = tokio::task::spawn_blocking(crate::s3::S3Server::start)
        .await
        .unwrap();
    let u = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let bucket = format!("sandpipe-example-{u}");
    server.create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["image-meta", "text-stats"] {
        std::fs::copy(component(name), plugins.join(format!("{name}.wasm"))).unwrap();
        std::fs::copy(init_script(name), plugins.join(format!("{name}.init.sql"))).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = std::fs::read_to_string(example.join("sandpipe.yaml"))
        .unwrap()
        .replace("sandpipe-example-in", &format!("sandpipe-test:ex-in:{u}"))
        .replace(
            "sandpipe-example-stats",
            &format!("sandpipe-test:ex-stats:{u}"),
        )
        .replace("bucket: sandpipe-example", &format!("bucket: {bucket}"))
        .replace(
            "${S3_ENDPOINT}",
            &format!("http://127.0.0.1:{}", server.port),
        )
        .replace("${S3_ACCESS_KEY_ID}", "testing")
        .replace("${S3_SECRET_ACCESS_KEY}", "testing")
        .replace("127.0.0.1:9091", &format!("127.0.0.1:{port}"))
        .replace("../../target/plugins", &plugins.display().to_string());
    let config_path = dir.path().join("sandpipe.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    let config = sandpipe::config::Config::load(&config_path).unwrap();

    // Upload the quickstart's objects (what upload.py does) and queue the
    // messages (what the recipe does).
    let data =
        sandpipe::store::data::DataStore::new(&config.data_store, &sandpipe::tls::Tls::default())
            .unwrap();
    let quickstart = root().join("examples/quickstart/data");
    let objects = [
        ("image/png", "images/red-square.png"),
        ("image/jpeg", "images/gradient.jpg"),
        ("text/plain", "texts/poem.txt"),
    ];
    for (i, (kind, location)) in objects.iter().enumerate() {
        let bytes = std::fs::read(quickstart.join(location)).unwrap();
        data.put(location, bytes::Bytes::from(bytes)).await.unwrap();
        let body = serde_json::json!({"uuid_ref": format!("ex-s3-{u}-{i}"), "data_type": kind, "data_location": location});
        sandpipe::listener::send(
            &config.listener,
            body.to_string().as_bytes(),
            "m",
            &sandpipe::tls::Tls::default(),
        )
        .await
        .unwrap();
    }
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let summary = sandpipe::app::run(&config_path, true, rx).await.unwrap();
    assert_eq!((summary.done, summary.dead), (3, 0), "{summary}");

    let mut redis = sandpipe::listener::redis::connect(
        "redis://127.0.0.1:6379",
        Duration::from_secs(5),
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    let stats: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("sandpipe-test:ex-stats:{u}"))
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stats.ids.len(), 1);
    let payload: String = redis::from_redis_value_ref(&stats.ids[0].map["payload"]).unwrap();
    assert!(payload.contains("\"words\":37"), "{payload}");
    for key in [
        format!("sandpipe-test:ex-in:{u}"),
        format!("sandpipe-test:ex-in:{u}.retry"),
        format!("sandpipe-test:ex-in:{u}.dead"),
        format!("sandpipe-test:ex-stats:{u}"),
    ] {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_api_source_example_runs_as_written() {
    let example = root().join("examples/sources/http-api");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(
        component("http-source"),
        dir.path().join("plugins/books.wasm"),
    )
    .unwrap();
    // Its api/books, served as `just example-source` serves it, on a port
    // of the test's own.
    let books = std::fs::read_to_string(example.join("api/books")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/api/books",
        axum::routing::get(move || {
            let books = books.clone();
            async move { books }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let yaml = std::fs::read_to_string(example.join("sandpipe.yaml"))
        .unwrap()
        .replace("8765", &port.to_string());
    let config = dir.path().join("sandpipe.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandpipe"))
        .args(["sync", "books", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The basic rule keeps the 8 books from before 1980 of the 12.
    assert!(
        stdout.contains("(full): completed") && stdout.contains("8 indexed"),
        "{stdout}"
    );
    let conn = rusqlite::Connection::open(dir.path().join("state/sources.sqlite")).unwrap();
    let latest: i64 = conn
        .query_row("SELECT max(body->>'$.year') FROM books", [], |r| r.get(0))
        .unwrap();
    assert_eq!(latest, 1979);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_orders_service_example_runs_as_written() {
    let example = root().join("examples/services/orders");
    let db = crate::postgres::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(
        component("table-service"),
        dir.path().join("plugins/orders.wasm"),
    )
    .unwrap();
    std::fs::copy(
        crate::harness::init_script("table-service"),
        dir.path().join("plugins/orders.init.sql"),
    )
    .unwrap();
    std::fs::write(dir.path().join("api.token"), "example-token").unwrap();
    // As `just example-service` runs it, with a database, ports and a
    // code cache of the test's own.
    let (api, probe) = (crate::harness::free_port(), crate::harness::free_port());
    let yaml = std::fs::read_to_string(example.join("sandpipe.yaml"))
        .unwrap()
        .replace(
            "postgres://postgres@127.0.0.1:5432/sandpipe_example_orders",
            &db.url(),
        )
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{api}"))
        .replace("127.0.0.1:9091", &format!("127.0.0.1:{probe}"));
    let yaml = format!(
        "{yaml}sandbox: {{ cache_dir: \"{}\" }}\n",
        crate::harness::shared_cache().display()
    );
    let config = dir.path().join("sandpipe.yaml");
    std::fs::write(&config, yaml).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
    let call = move |path: &'static str, body: &'static str| {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", api)).ok()?;
            write!(
                stream,
                "POST {path} HTTP/1.0\r\nAuthorization: Bearer example-token\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let status: u16 = response.split_whitespace().nth(1)?.parse().ok()?;
            Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !matches!(crate::harness::get(api, "/readyz"), Some((200, _))) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for order in [
        r#"{"id":"o-1","customer":"ada","total":12,"status":"open"}"#,
        r#"{"id":"o-2","customer":"bob","total":7,"status":"closed"}"#,
        r#"{"id":"o-3","customer":"ada","total":30,"status":"open"}"#,
    ] {
        let (status, body) = call("/v1/services/orders/publish", order)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = call(
        "/v1/services/orders/query",
        r#"{"select":["id","total"],"where":{"status":"open"}}"#,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"status": 200, "body": [{"id": "o-1", "total": 12}, {"id": "o-3", "total": 30}]})
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", probe)).is_ok());
    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
}
