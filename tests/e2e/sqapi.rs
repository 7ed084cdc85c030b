//! sqAPI as a drop-in: messages as sqAPI producers send them — an absolute
//! `data_location` inside the disk store's root, no type field, the MIME
//! type in the metadata sqAPI keeps in Redis (a JSON string) — processed
//! unchanged; an absolute location outside the root, or leaving it through
//! a symbolic link, and a message with no type anywhere, dead-lettered
//! with the reason. Redis on 127.0.0.1:6379; the keys are the test's own.

use crate::harness::{Deployment, init_script};

const URL: &str = "redis://127.0.0.1:6379";

/// The reason a dead-lettered spool file was given.
fn reason(d: &Deployment, file: &str) -> String {
    let path = d.path(&format!("spool/dead/{file}.error.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    v["reason"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sqapi_messages_with_absolute_locations_and_the_type_in_redis_are_processed() {
    let prefix = format!(
        "sandpipe-test:sqapi:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let key = |name: &str| format!("{prefix}:{name}");
    let mut conn = sandpipe::listener::redis::connect(
        URL,
        std::time::Duration::from_secs(5),
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    for (name, value) in [
        (
            "text",
            r#"{"mime": {"type": "text/plain", "path": "mime.type"}, "origin": "sqapi"}"#,
        ),
        ("untyped", r#"{"origin": "sqapi"}"#),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key(name))
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    let d = Deployment::new(
        &[("text-stats", "text-stats")],
        &format!(
            "meta_store: {{ type: redis, url: \"{URL}\" }}\n\
             message_fields: {{ mime_path: mime.type }}\n\
             outputs:\n  stats: {{ type: dir, path: out/stats }}\n\
             plugins:\n  grants:\n    text-stats: {{ blob: true, sql: {{ init: \"{}\" }}, emit: [stats], config: {{ output: stats }} }}\n",
            init_script("text-stats").display()
        ),
    );
    d.data("texts/a.txt", b"hello sqapi\nworld\n");
    // Outside the root, and a link in the root that leads there.
    std::fs::write(d.path("outside.txt"), b"not yours\n").unwrap();
    std::os::unix::fs::symlink(d.path("outside.txt"), d.path("data/link.txt")).unwrap();
    let root = d.path("data");
    let message = |file: &str, id: &str, location: &std::path::Path, meta: &str| {
        d.message(
            &format!("{file}.json"),
            &serde_json::json!({
                "uuid_ref": id,
                "data_location": location,
                "meta_location": key(meta),
            })
            .to_string(),
        );
    };
    message("abs", "sq-abs", &root.join("texts/a.txt"), "text");
    message("outside", "sq-outside", &d.path("outside.txt"), "text");
    message("link", "sq-link", &root.join("link.txt"), "text");
    message(
        "untyped",
        "sq-untyped",
        &root.join("texts/a.txt"),
        "untyped",
    );

    let summary = d.run_once().await.unwrap();
    assert_eq!(
        (summary.processed, summary.done, summary.dead),
        (4, 1, 3),
        "{summary}"
    );

    // Done, routed by the metadata's type; the plugin saw the location
    // relative to the root, as it would any other.
    assert_eq!(d.last("sq-abs", "text-stats").await.status, "done");
    let rows = d.rows("sq-abs").await;
    let received = rows.iter().find(|r| r.status == "received").unwrap();
    assert_eq!(received.info, "text/plain (metadata mime.type)");
    let (location, words): (String, i64) = d
        .plugin_db("text-stats")
        .query_row(
            "SELECT location, words FROM text_stats WHERE message_id = 'sq-abs'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((location.as_str(), words), ("texts/a.txt", 3));

    // Refused, naming the location and the root.
    let outside = reason(&d, "outside.json");
    assert!(
        outside.contains(&format!("`{}`", d.path("outside.txt").display())),
        "{outside}"
    );
    assert!(
        outside.contains("must lie inside the data store's root")
            && outside.contains(&std::fs::canonicalize(&root).unwrap().display().to_string()),
        "{outside}"
    );
    let link = reason(&d, "link.json");
    assert!(
        link.contains("symbolic link")
            && link.contains(&format!("`{}`", root.join("link.txt").display())),
        "{link}"
    );
    assert_eq!(
        reason(&d, "untyped.json"),
        "no MIME type: the message has no `data_type` field (message_fields.type) and its metadata has no `mime.type` (message_fields.mime_path)"
    );
    for id in ["sq-outside", "sq-link", "sq-untyped"] {
        let rows = d.rows(id).await;
        assert_eq!(rows.last().unwrap().status, "dead", "{id}: {rows:?}");
        assert!(
            rows.iter().all(|r| r.plugin.is_empty()),
            "{id}: no plugin ran: {rows:?}"
        );
    }
    assert_eq!(
        std::fs::read(d.path("outside.txt")).unwrap(),
        b"not yours\n"
    );

    for name in ["text", "untyped"] {
        let _: () = redis::cmd("DEL")
            .arg(key(name))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
