//! Host-side limits with config defaults: each one lets through what is
//! at the limit and refuses what is past it, with a clear reason naming
//! its key; a refused delivery is dead-lettered unread, a refused host call
//! is a `limit-exceeded` error of that plugin.

use crate::harness::Deployment;
use crate::hostile::{hostile, metric, serve, served};

fn reason(d: &Deployment, file: &str) -> String {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.path(&format!("spool/dead/{file}.error.json"))).unwrap(),
    )
    .unwrap();
    v["reason"].as_str().unwrap().to_owned()
}

/// An fx-probe `done` message of exactly `size` bytes (padded).
fn probe_of_size(id: &str, size: usize) -> String {
    let head = format!(r#"{{"uuid_ref":"{id}","data_type":"test/probe","action":"done","pad":""#);
    let tail = r#""}"#;
    format!("{head}{}{tail}", " ".repeat(size - head.len() - tail.len()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_larger_than_max_message_bytes_is_dead_lettered_unparsed() {
    let counted = |m: &str| {
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{limit="max_message_bytes"}"#,
        )
    };
    let before = counted(&sandpipe::metrics::handle().render());
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "pipeline: { max_message_bytes: 4KiB }\n",
    );
    d.message("at-limit.json", &probe_of_size("m-at-limit", 4096));
    d.message("past-limit.json", &probe_of_size("m-past-limit", 4097));
    // Not JSON at all, and far larger: refused for its size, never parsed.
    d.message("huge.json", &"{".repeat(10 << 20));
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 2), "{summary}");
    assert_eq!(d.last("m-at-limit", "probe").await.status, "done");
    assert_eq!(
        reason(&d, "past-limit.json"),
        "message too large: 4097 bytes or more, larger than 4.0 KiB (pipeline.max_message_bytes); not parsed"
    );
    assert_eq!(
        reason(&d, "huge.json"),
        "message too large: 4097 bytes or more, larger than 4.0 KiB (pipeline.max_message_bytes); not parsed"
    );
    // Its id was not read: the status log knows it by its delivery.
    let rows = d.rows("delivery:huge.json").await;
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses, ["received", "dead"]);
    assert!(d.rows("m-past-limit").await.is_empty());
    // The dead letter keeps the whole message.
    let kept = std::fs::metadata(d.path("spool/dead/huge.json")).unwrap();
    assert_eq!(kept.len(), 10 << 20);
    let after = counted(&sandpipe::metrics::handle().render());
    assert!(after >= before + 2.0, "{before} -> {after}");

    // The default is 1 MiB.
    let d = Deployment::new(&[("fx-probe", "probe")], "");
    d.message(
        "at-limit.json",
        &probe_of_size("m-default-at-limit", 1 << 20),
    );
    d.message(
        "past-limit.json",
        &probe_of_size("m-default-past-limit", (1 << 20) + 1),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 1), "{summary}");
    assert!(
        reason(&d, "past-limit.json")
            .ends_with("larger than 1.0 MiB (pipeline.max_message_bytes); not parsed")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_larger_than_max_metadata_bytes_is_dead_lettered_from_a_file() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "pipeline: { max_metadata_bytes: 4KiB }\nplugins: { grants: { probe: { meta: true } } }\n",
    );
    let meta = |size: usize| format!(r#"{{"pad":"{}"}}"#, "m".repeat(size - 10));
    std::fs::create_dir_all(d.path("meta")).unwrap();
    std::fs::write(d.path("meta/at-limit.json"), meta(4096)).unwrap();
    std::fs::write(d.path("meta/past-limit.json"), meta(4097)).unwrap();
    std::fs::write(d.path("meta/huge.json"), meta(50 << 20)).unwrap();
    for name in ["at-limit", "past-limit", "huge"] {
        d.message(
            &format!("{name}.json"),
            &format!(
                r#"{{"uuid_ref":"m-meta-{name}","data_type":"test/probe","action":"echo-meta","meta_location":"{name}.json"}}"#
            ),
        );
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 2), "{summary}");
    let fine = d.last("m-meta-at-limit", "probe").await;
    assert_eq!(
        fine.info.len(),
        4096,
        "the metadata did not reach the plugin whole"
    );
    for name in ["past-limit", "huge"] {
        assert_eq!(
            reason(&d, &format!("{name}.json")),
            format!("metadata `{name}.json` is larger than 4.0 KiB (pipeline.max_metadata_bytes)")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_larger_than_max_metadata_bytes_is_dead_lettered_from_redis() {
    let url = "redis://127.0.0.1:6379";
    let prefix = format!(
        "sandpipe-test:meta-limit:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut conn = sandpipe::listener::redis::connect(
        url,
        std::time::Duration::from_secs(5),
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    let key = |k: &str| format!("{prefix}:{k}");
    let set = |k: String, v: String| redis::cmd("SET").arg(k).arg(v).clone();
    let string = |size: usize| format!(r#"{{"pad":"{}"}}"#, "s".repeat(size - 10));
    for (k, v) in [
        ("string-at-limit", string(4096)),
        ("string-past-limit", string(4097)),
        ("string-huge", string(20 << 20)),
    ] {
        let _: () = set(key(k), v).query_async(&mut conn).await.unwrap();
    }
    // A hash: field names and values count. 4096 bytes, then one more.
    let _: () = redis::cmd("HSET")
        .arg(key("hash-at-limit"))
        .arg("f")
        .arg("h".repeat(4095))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key("hash-past-limit"))
        .arg("f")
        .arg("h".repeat(4095))
        .arg("g")
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "meta_store: {{ type: redis, url: \"{url}\" }}\npipeline: {{ max_metadata_bytes: 4KiB }}\nplugins: {{ grants: {{ probe: {{ meta: true }} }} }}\n"
        ),
    );
    let names = [
        "string-at-limit",
        "string-past-limit",
        "string-huge",
        "hash-at-limit",
        "hash-past-limit",
    ];
    for name in names {
        d.message(
            &format!("{name}.json"),
            &format!(
                r#"{{"uuid_ref":"m-{name}","data_type":"test/probe","action":"echo-meta","meta_location":"{}"}}"#,
                key(name)
            ),
        );
    }
    let summary = d.run_once().await.unwrap();
    for name in names {
        let _: () = redis::cmd("DEL")
            .arg(key(name))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!((summary.done, summary.dead), (2, 3), "{summary}");
    assert_eq!(d.last("m-string-at-limit", "probe").await.info.len(), 4096);
    let hash = d.last("m-hash-at-limit", "probe").await.info;
    assert_eq!(hash, format!(r#"{{"f":"{}"}}"#, "h".repeat(4095)));
    for name in ["string-past-limit", "string-huge", "hash-past-limit"] {
        assert_eq!(
            reason(&d, &format!("{name}.json")),
            format!(
                "metadata `{}` is larger than 4.0 KiB (pipeline.max_metadata_bytes)",
                key(name)
            )
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_quota_lets_the_limit_through_refuses_past_it_and_is_overridable_per_plugin() {
    let (d, port) = served(
        &[("fx-hostile", "quota")],
        "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    quota:\n      emit: [out]\n      sql: true\n      blob: true\n      limits: { log_bytes: 1000, emits: 3, emit_bytes: 100, sql_rows: 5, sql_bytes: 1000, host_calls: 50, blob_readers: 3, state_bytes: 1000, state_changes: 3, state_value_bytes: 500 }\n      meta: true\n",
    );
    let rows = |n: u32| {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c"
        )
    };
    // (id, request, the limit it passes, or None when it is within them all)
    let cases: Vec<(&str, serde_json::Value, Option<&str>)> = vec![
        (
            "log-at",
            serde_json::json!({"action": "log-line", "bytes": 1000}),
            None,
        ),
        (
            "log-past",
            serde_json::json!({"action": "log-line", "bytes": 1001}),
            Some("log_bytes"),
        ),
        (
            "emits-at",
            serde_json::json!({"action": "emit-many", "count": 3}),
            None,
        ),
        (
            "emits-past",
            serde_json::json!({"action": "emit-many", "count": 4}),
            Some("emits"),
        ),
        (
            "emit-bytes-at",
            serde_json::json!({"action": "emit-big", "bytes": 100}),
            None,
        ),
        (
            "emit-bytes-past",
            serde_json::json!({"action": "emit-big", "bytes": 101}),
            Some("emit_bytes"),
        ),
        (
            "rows-at",
            serde_json::json!({"action": "sql-query", "sql": rows(5)}),
            None,
        ),
        (
            "rows-past",
            serde_json::json!({"action": "sql-query", "sql": rows(6)}),
            Some("sql_rows"),
        ),
        (
            "sql-bytes-at",
            serde_json::json!({"action": "sql-query", "sql": "SELECT zeroblob(1000)"}),
            None,
        ),
        (
            "sql-bytes-past",
            serde_json::json!({"action": "sql-query", "sql": "SELECT zeroblob(1001)"}),
            Some("sql_bytes"),
        ),
        (
            "calls-at",
            serde_json::json!({"action": "calls", "count": 50}),
            None,
        ),
        (
            "calls-past",
            serde_json::json!({"action": "calls", "count": 51}),
            Some("host_calls"),
        ),
        (
            "readers-at",
            serde_json::json!({"action": "blob-open-many", "count": 3, "data_location": "x.bin"}),
            None,
        ),
        (
            "readers-past",
            serde_json::json!({"action": "blob-open-many", "count": 4, "data_location": "x.bin"}),
            Some("blob_readers"),
        ),
        (
            "state-at",
            serde_json::json!({"action": "state-flood", "count": 2, "bytes": 498}),
            None,
        ),
        (
            "state-past",
            serde_json::json!({"action": "state-flood", "count": 2, "bytes": 499}),
            Some("state_bytes"),
        ),
        (
            "changes-at",
            serde_json::json!({"action": "state-flood", "count": 3, "bytes": 10}),
            None,
        ),
        (
            "changes-past",
            serde_json::json!({"action": "state-flood", "count": 4, "bytes": 10}),
            Some("state_changes"),
        ),
        (
            "value-at",
            serde_json::json!({"action": "state-flood", "count": 1, "bytes": 500}),
            None,
        ),
        (
            "value-past",
            serde_json::json!({"action": "state-flood", "count": 1, "bytes": 501}),
            Some("state_value_bytes"),
        ),
        // Dropped readers make room for new ones.
        (
            "readers-dropped",
            serde_json::json!({"action": "blob-open-many", "count": 20, "keep": false, "data_location": "x.bin"}),
            None,
        ),
    ];
    d.data("x.bin", b"x");
    for (id, request, _) in &cases {
        hostile(&d, id, request.clone());
    }
    let served = serve(&d, port, cases.len()).await;
    assert_eq!(served.ready, Some((200, "ready\n".to_owned())));
    for (id, _, limit) in &cases {
        let row = d.last(id, "quota").await;
        match limit {
            None => assert!(
                ["done", "skipped"].contains(&row.status.as_str()),
                "{id}: {row:?}"
            ),
            Some(key) => {
                assert_eq!(row.status, "failed", "{id}: {row:?}");
                assert!(
                    row.info.starts_with("plugin-error: limit-exceeded: ")
                        && row.info.ends_with(&format!("(limits.{key})")),
                    "{id}: {}",
                    row.info
                );
                let series =
                    format!(r#"sandpipe_limit_exceeded_total{{plugin="quota",limit="{key}"}}"#);
                assert_eq!(metric(&served.metrics, &series), 1.0, "{series}");
            }
        }
    }
    // 3 emits of 8 bytes and one of 100 bytes were published; nothing of
    // the refused invocations.
    assert_eq!(d.files("out").len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_rows_and_bytes_are_limits_on_postgresql_too() {
    let db = crate::postgres::TestDb::new().await;
    let (d, port) = served(
        &[("fx-hostile", "pgq")],
        &format!(
            "database: {{ type: postgres, url: \"{}\" }}\nplugins:\n  grants:\n    pgq:\n      sql: true\n      limits: {{ sql_rows: 300, sql_bytes: 4000 }}\n",
            db.url()
        ),
    );
    let query = |sql: &str| serde_json::json!({"action": "sql-query", "sql": sql});
    // (id, query, the limit it passes)
    let cases = [
        // More than one fetch batch (256 rows), exactly at the limit.
        ("rows-at", "SELECT 1 FROM generate_series(1, 300)", None),
        (
            "rows-past",
            "SELECT 1 FROM generate_series(1, 100000)",
            Some("sql_rows"),
        ),
        ("text-at", "SELECT repeat('x', 4000)", None),
        ("text-past", "SELECT repeat('x', 4001)", Some("sql_bytes")),
        (
            "bytea-past",
            "SELECT decode(repeat('ab', 4001), 'hex')",
            Some("sql_bytes"),
        ),
        (
            "many-past",
            "SELECT repeat('x', 100) FROM generate_series(1, 41)",
            Some("sql_bytes"),
        ),
        // Fixed-size values count 8 bytes each.
        (
            "ints-at",
            "SELECT g, g FROM generate_series(1, 250) g",
            None,
        ),
        (
            "ints-past",
            "SELECT g, g FROM generate_series(1, 251) g",
            Some("sql_bytes"),
        ),
    ];
    for (id, sql, _) in &cases {
        hostile(&d, id, query(sql));
    }
    let served = serve(&d, port, cases.len()).await;
    assert_eq!(served.ready, Some((200, "ready\n".to_owned())));
    for (id, sql, limit) in &cases {
        let row = d.last(id, "pgq").await;
        match limit {
            None => assert_eq!(row.status, "skipped", "{sql}: {row:?}"),
            Some(key) => assert!(
                row.status == "failed"
                    && row
                        .info
                        .starts_with("plugin-error: limit-exceeded: query returned more than")
                    && row.info.ends_with(&format!("(limits.{key})")),
                "{sql}: {row:?}"
            ),
        }
    }
    assert_eq!(d.last("rows-at", "pgq").await.info, "rows: 300");
    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="pgq",limit="sql_bytes"}"#
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="pgq",limit="sql_rows"}"#
        ),
        1.0
    );
}
