//! Redis against the real server on 127.0.0.1:6379: the stream listener
//! (consumer group, retries, dead letters, takeover of a dead consumer's
//! entries), the metadata store and the stream output. Every test uses its
//! own keys and deletes them.

use redis::aio::ConnectionManager;

use crate::harness::Deployment;

const URL: &str = "redis://127.0.0.1:6379";

struct Keys {
    prefix: String,
}

impl Keys {
    fn new(tag: &str) -> Self {
        Self {
            prefix: format!(
                "sandpipe-test:{tag}:{}",
                &uuid::Uuid::new_v4().simple().to_string()[..10]
            ),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    async fn conn(&self) -> ConnectionManager {
        sandpipe::listener::redis::connect(
            URL,
            std::time::Duration::from_secs(5),
            &sandpipe::tls::Tls::default(),
        )
        .await
        .unwrap()
    }

    async fn cleanup(&self) {
        let mut conn = self.conn().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        for k in keys {
            let _: () = redis::cmd("DEL")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    fn listener_yaml(&self) -> String {
        format!(
            "listener: {{ type: redis, url: \"{URL}\", stream: \"{}\", block: 100ms, claim_idle: 1s }}\n",
            self.key("in")
        )
    }

    async fn xadd(&self, stream: &str, fields: &[(&str, &str)]) -> String {
        let mut conn = self.conn().await;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut conn).await.unwrap()
    }

    async fn entries(&self, stream: &str) -> Vec<Vec<(String, String)>> {
        let mut conn = self.conn().await;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                let mut fields: Vec<(String, String)> = e
                    .map
                    .iter()
                    .map(|(k, v)| (k.clone(), redis::from_redis_value_ref::<String>(v).unwrap()))
                    .collect();
                fields.sort();
                fields
            })
            .collect()
    }
}

fn probe(id: &str, action: &str) -> String {
    serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action}).to_string()
}

const GRANTS: &str = "plugins:\n  grants:\n    probe: { sql: true }\n";

#[tokio::test(flavor = "multi_thread")]
async fn stream_entries_are_processed_retried_and_dead_lettered() {
    let k = Keys::new("stream");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}retry: {{ max_attempts: 2, backoff: {{ initial: 50ms }} }}\n",
            k.listener_yaml()
        ),
    );
    let config = sandpipe::config::Config::load(&d.config).unwrap();
    for (id, action) in [("rs-1", "sql"), ("rs-2", "sql"), ("rs-bad", "error")] {
        sandpipe::listener::send(
            &config.listener,
            probe(id, action).as_bytes(),
            "m",
            &sandpipe::tls::Tls::default(),
        )
        .await
        .unwrap();
    }
    let summary = d.run_once().await.unwrap();
    // rs-bad fails once, then is dead-lettered: four deliveries, three messages.
    assert_eq!(
        (
            summary.processed,
            summary.deliveries,
            summary.done,
            summary.failed,
            summary.dead
        ),
        (3, 4, 2, 0, 1),
        "{summary}"
    );
    assert_eq!(d.last("rs-bad", "probe").await.attempt, 2);
    let dead = k.entries(&format!("{}.dead", k.key("in"))).await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0]
        .iter()
        .find(|(f, _)| f == "x-sandpipe-reason")
        .unwrap();
    assert!(reason.1.contains("failed 2 of 2 attempts"), "{}", reason.1);
    // Nothing is left pending in the group.
    let mut conn = k.conn().await;
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(k.key("in"))
        .arg("sandpipe")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0);
    k.cleanup().await;
}

/// Add fx-probe message `rs-orphan` to `stream`, read it as `replica`
/// (which then dies without acking it), and wait past `claim_idle`.
async fn orphan(k: &Keys, conn: &mut ConnectionManager, stream: &str, replica: &str) {
    k.xadd(stream, &[("message", &probe("rs-orphan", "sql"))])
        .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("sandpipe")
        .arg(replica)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_left_pending_by_a_dead_consumer_are_taken_over() {
    let k = Keys::new("claim");
    let stream = k.key("in");
    let mut conn = k.conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("sandpipe")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A replica reads the entry and dies without acking it.
    orphan(&k, &mut conn, &stream, "dead-replica").await;
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!("{}{GRANTS}", k.listener_yaml()),
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    assert_eq!(d.last("rs-orphan", "probe").await.status, "done");
    let stored = || -> i64 {
        d.plugin_db("probe")
            .query_row("SELECT count(*) FROM t WHERE x = 'rs-orphan'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert_eq!(stored(), 1);

    // The same message again, left pending by another replica that dies
    // (as one that finished the plugin but not the XACK would): a
    // taken-over entry is not a first delivery, so the engine looks up
    // what finished it and does not run the plugin again.
    orphan(&k, &mut conn, &stream, "dead-replica-2").await;
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    assert_eq!(stored(), 1, "the taken-over entry ran the plugin again");
    k.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_comes_from_redis_strings_or_hashes_and_emits_go_to_a_stream() {
    let k = Keys::new("meta");
    let mut conn = k.conn().await;
    let _: () = redis::cmd("SET")
        .arg(k.key("m-string"))
        .arg(r#"{"origin": "sqapi", "n": 3}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(k.key("m-hash"))
        .arg("origin")
        .arg("hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "meta_store: {{ type: redis, url: \"{URL}\" }}\noutputs:\n  out: {{ type: redis, url: \"{URL}\", stream: \"{}\" }}\nplugins:\n  grants:\n    probe: {{ meta: true, emit: [out] }}\n",
            k.key("out")
        ),
    );
    for (id, location) in [
        ("r-string", "m-string"),
        ("r-hash", "m-hash"),
        ("r-none", "m-none"),
    ] {
        d.message(
            &format!("{id}.json"),
            &serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": "echo-meta", "meta_location": k.key(location)}).to_string(),
        );
    }
    d.message("e.json", &probe("r-emit", "emit"));
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (3, 1), "{summary}");
    let meta = |info: String| serde_json::from_str::<serde_json::Value>(&info).unwrap();
    assert_eq!(
        meta(d.last("r-string", "probe").await.info),
        serde_json::json!({"origin": "sqapi", "n": 3})
    );
    assert_eq!(
        meta(d.last("r-hash", "probe").await.info),
        serde_json::json!({"origin": "hash"})
    );
    let rows = d.rows("r-none").await;
    assert!(
        rows.last().unwrap().info.contains("no metadata at"),
        "{rows:?}"
    );
    let out = k.entries(&k.key("out")).await;
    assert_eq!(out.len(), 1);
    assert!(out[0].contains(&("payload".to_owned(), "hello".to_owned())));
    assert!(out[0].contains(&("message_id".to_owned(), "r-emit".to_owned())));
    k.cleanup().await;
}
