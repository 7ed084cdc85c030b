//! The `rabbitmq` listener against the real broker on 127.0.0.1:5672: each
//! test declares its own exchange and queues (unique names) and deletes
//! them at the end.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use sandpipe::listener::rabbitmq::{connect, headers_of};

use crate::harness::Deployment;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Unique names for one test, and the listener YAML that uses them.
struct Broker {
    exchange: String,
    queue: String,
}

impl Broker {
    fn new(tag: &str) -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        Self {
            exchange: format!("x_test_{tag}_{id}"),
            queue: format!("q_test_{tag}_{id}"),
        }
    }

    fn listener_yaml(&self, extra: &str) -> String {
        format!(
            "listener:\n  type: rabbitmq\n  url: \"{URL}?heartbeat=2\"\n  exchange: {{ name: {}, type: fanout }}\n  queue: {}\n  prefetch: 8\n{extra}",
            self.exchange, self.queue
        )
    }

    /// Publish messages through `sandpipe::listener::send` (declares the topology).
    async fn publish(&self, d: &Deployment, bodies: &[String]) {
        let config = sandpipe::config::Config::load(&d.config).unwrap();
        for body in bodies {
            sandpipe::listener::send(
                &config.listener,
                body.as_bytes(),
                "m.json",
                &sandpipe::tls::Tls::default(),
            )
            .await
            .unwrap();
        }
    }

    /// Everything in `queue`, taken with basic.get (and acked).
    async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Vec<(String, String)>)> {
        let conn = connect(URL, &sandpipe::tls::Tls::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push((m.delivery.data.clone(), headers_of(&m.delivery.properties)));
        }
        out
    }

    async fn message_count(&self, queue: &str) -> u32 {
        let conn = connect(URL, &sandpipe::tls::Tls::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    }

    async fn cleanup(&self) {
        let conn = connect(URL, &sandpipe::tls::Tls::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        for q in [
            self.queue.clone(),
            format!("{}.retry", self.queue),
            format!("{}.dead", self.queue),
        ] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [self.exchange.clone(), format!("{}.dead", self.queue)] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

fn probe(id: &str, action: &str) -> String {
    serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action}).to_string()
}

/// `n` fx-probe messages `PREFIX-i` that each burn `ms` of CPU, then insert.
fn busy_messages(prefix: &str, n: usize, ms: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            serde_json::json!({"uuid_ref": format!("{prefix}-{i}"), "data_type": "test/probe", "action": "busy", "ms": ms})
                .to_string()
        })
        .collect()
}

const GRANTS: &str = "plugins:\n  grants:\n    probe: { sql: true }\n";

#[tokio::test(flavor = "multi_thread")]
async fn messages_are_processed_and_acked() {
    let b = Broker::new("ok");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!("{}{GRANTS}", b.listener_yaml("")),
    );
    let bodies: Vec<String> = (0..5)
        .map(|i| probe(&format!("rmq-ok-{i}"), "sql"))
        .collect();
    b.publish(&d, &bodies).await;
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (5, 0), "{summary}");
    for i in 0..5 {
        assert_eq!(d.last(&format!("rmq-ok-{i}"), "probe").await.status, "done");
    }
    assert_eq!(b.message_count(&b.queue).await, 0);
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_retry_through_the_delay_queue_then_dead_letter_with_reason() {
    let b = Broker::new("dead");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}retry: {{ max_attempts: 3, backoff: {{ initial: 50ms, max: 200ms }} }}\n",
            b.listener_yaml("")
        ),
    );
    b.publish(
        &d,
        &[
            probe("rmq-error", "error"),
            probe("rmq-fine", "done"),
            "{broken".to_owned(),
        ],
    )
    .await;
    let summary = d.run_once().await.unwrap();
    // rmq-error: two retries, then dead; five deliveries of three messages.
    assert_eq!(
        (
            summary.processed,
            summary.deliveries,
            summary.done,
            summary.failed,
            summary.dead
        ),
        (3, 5, 1, 0, 2),
        "{summary}"
    );
    let row = d.last("rmq-error", "probe").await;
    assert_eq!(
        row.attempt, 3,
        "the attempt count travels in the retried message's headers"
    );
    let dead = b.drain(&format!("{}.dead", b.queue)).await;
    assert_eq!(dead.len(), 2);
    let error = dead
        .iter()
        .find(|(body, _)| String::from_utf8_lossy(body).contains("rmq-error"))
        .unwrap();
    let header = |k: &str| error.1.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    assert_eq!(header("x-sandpipe-attempts").as_deref(), Some("3"));
    assert!(
        header("x-sandpipe-reason")
            .unwrap()
            .contains("failed 3 of 3 attempts")
    );
    let broken = dead.iter().find(|(body, _)| body == b"{broken").unwrap();
    assert!(
        broken
            .1
            .iter()
            .any(|(k, v)| k == "x-sandpipe-reason" && v.contains("not valid JSON"))
    );
    assert_eq!(b.message_count(&b.queue).await, 0);
    assert_eq!(b.message_count(&format!("{}.retry", b.queue)).await, 0);
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_plugins_never_starve_the_heartbeat() {
    // heartbeat=2s; 24 messages that each burn 400 ms of CPU, two at a time
    // on two cores: about 5 s of solid load, more than two heartbeat
    // intervals. If the connection were dropped, the broker would redeliver
    // unacked messages and some would run twice.
    let b = Broker::new("hb");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}pipeline: {{ concurrency: 2 }}\n",
            b.listener_yaml("")
        ),
    );
    let bodies = busy_messages("rmq-hb", 24, 400);
    b.publish(&d, &bodies).await;
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.processed, summary.done), (24, 24), "{summary}");
    for i in 0..24 {
        let runs = d
            .rows(&format!("rmq-hb-{i}"))
            .await
            .into_iter()
            .filter(|r| r.plugin.is_empty() && r.status == "received")
            .count();
        assert_eq!(
            runs, 1,
            "message {i} ran {runs} times: the connection was lost"
        );
    }
    let rows: i64 = d
        .plugin_db("probe")
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 24);
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_requeues_nothing_it_has_not_settled() {
    // The engine stops while messages are still queued: what it took is
    // settled, what it did not take is still in the queue.
    let b = Broker::new("stop");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}pipeline: {{ concurrency: 1 }}\n",
            b.listener_yaml("")
        ),
    );
    let bodies = busy_messages("rmq-stop", 20, 100);
    b.publish(&d, &bodies).await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    tx.send(true).unwrap();
    let summary = engine.await.unwrap().unwrap();
    assert!(summary.done > 0 && summary.done < 20, "{summary}");
    // Give the broker a moment to requeue the prefetched, unacked ones.
    let mut left = 0;
    for _ in 0..50 {
        left = b.message_count(&b.queue).await;
        if u64::from(left) + summary.done == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        u64::from(left) + summary.done,
        20,
        "{summary}, {left} left in the queue"
    );
    b.cleanup().await;
}

/// An exchange and a queue bound to it, declared by the test; `args` are
/// the queue's arguments.
async fn bound_queue(exchange: &str, queue: &str, args: FieldTable) {
    let conn = connect(URL, &sandpipe::tls::Tls::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

fn output_yaml(exchange: &str) -> String {
    format!(
        "outputs:\n  out: {{ type: rabbitmq, url: \"{URL}\", exchange: {{ name: {exchange}, type: fanout }}, confirm_timeout: 5s }}\nplugins:\n  grants:\n    probe: {{ emit: [out] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn emits_are_published_to_rabbitmq_with_confirms() {
    let b = Broker::new("out");
    bound_queue(&b.exchange, &b.queue, FieldTable::default()).await;
    let d = Deployment::new(&[("fx-probe", "probe")], &output_yaml(&b.exchange));
    d.message("a.json", &probe("rmq-emit", "emit"));
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let got = b.drain(&b.queue).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, b"hello");
    assert!(
        got[0]
            .1
            .contains(&("x-sandpipe-message-id".to_owned(), "rmq-emit".to_owned()))
    );
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nacked_emit_is_an_outage_requeued_without_using_up_attempts() {
    // The output's queue refuses everything (max-length 0, reject-publish),
    // so the broker nacks every emit: an outage of the output, not a fault
    // of the message. It is requeued with its attempt unchanged and never
    // dead-lettered, however long the outage lasts.
    let b = Broker::new("nack");
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    bound_queue(&b.exchange, &b.queue, args).await;
    let d = Deployment::new(&[("fx-probe", "probe")], &output_yaml(&b.exchange));
    requeued_three_times(&d, "rmq-nack", "nacked").await;
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_broker_that_never_answers_is_an_outage_not_a_stuck_message() {
    // A server that accepts the connection and says nothing: connecting to
    // the output must fail within its timeout, as a nack does.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        silent
            .incoming()
            .take(8)
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
    });
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "outputs:\n  out: {{ type: rabbitmq, url: \"amqp://guest:guest@127.0.0.1:{port}/%2f\", exchange: {{ name: never, type: fanout }}, confirm_timeout: 300ms }}\nplugins:\n  grants:\n    probe: {{ emit: [out] }}\n"
        ),
    );
    requeued_three_times(&d, "rmq-silent", "no connection within 300ms").await;
    drop(held);
}

/// Run the engine on a probe that emits to `out` until message `id` has
/// been requeued three times as an outage, then stop it: never
/// dead-lettered, its attempt never counted, the plugin's row naming
/// `why`.
async fn requeued_three_times(d: &Deployment, id: &str, why: &str) {
    d.message("a.json", &probe(id, "emit"));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let requeued = d
            .rows(id)
            .await
            .into_iter()
            .filter(|r| r.plugin.is_empty() && r.info.starts_with("backend unavailable"))
            .count();
        if requeued >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not requeued three times"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tx.send(true).unwrap();
    let summary = engine.await.unwrap().unwrap();
    assert_eq!(summary.dead, 0, "{summary}");
    let rows = d.rows(id).await;
    assert!(rows.iter().all(|r| r.attempt == 1), "{rows:?}");
    let probe_row = d.last(id, "probe").await;
    assert!(probe_row.info.contains(why), "{}", probe_row.info);
    assert!(d.files("spool/dead").is_empty());
}

/// Close every broker connection named `name` (as an operator or a broker
/// restart would), with rabbitmqctl.
fn close_connections(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl is needed to close connections");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(name) {
            continue;
        }
        let pid = line.split_whitespace().next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args([
                "close_connection",
                pid,
                "closed by the sandpipe reconnection test",
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "rabbitmqctl close_connection {pid}: {} {}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_connection_is_reopened_and_nothing_is_lost_or_redone() {
    let b = Broker::new("reconnect");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}pipeline: {{ concurrency: 2 }}\n",
            b.listener_yaml("  reconnect: { initial: 200ms, max: 1s }\n")
        ),
    );
    let bodies = busy_messages("rmq-rc", 30, 100);
    b.publish(&d, &bodies).await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    // Let it get going, then cut its connection (twice).
    let name = format!("sandpipe:listener:{}", b.queue);
    for _ in 0..2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut closed = 0;
        while closed == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no connection to close"
            );
            tokio::time::sleep(Duration::from_millis(400)).await;
            let n = name.clone();
            closed = tokio::task::spawn_blocking(move || close_connections(&n))
                .await
                .unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let rows: i64 = d
            .plugin_db("probe")
            .query_row("SELECT count(DISTINCT x) FROM t", [], |r| r.get(0))
            .unwrap_or(0);
        if rows == 30 && b.message_count(&b.queue).await == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {rows} of 30 processed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tx.send(true).unwrap();
    engine.await.unwrap().unwrap();
    for i in 0..30 {
        let rows = d.rows(&format!("rmq-rc-{i}")).await;
        let done = rows
            .iter()
            .filter(|r| r.plugin == "probe" && r.status == "done")
            .count();
        assert_eq!(done, 1, "message {i} was done {done} times: {rows:?}");
    }
    let total: i64 = d
        .plugin_db("probe")
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, 30, "a message's effects were committed twice");
    b.cleanup().await;
}

/// How many times fx-probe's `sql` action stored message `id`.
fn stored(d: &Deployment, id: &str) -> i64 {
    d.plugin_db("probe")
        .query_row("SELECT count(*) FROM t WHERE x = ?1", [id], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_skips_finished_plugins_and_a_first_delivery_skips_the_look_up() {
    let b = Broker::new("dedupe");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!("{}{GRANTS}", b.listener_yaml("")),
    );
    b.publish(&d, &[probe("rmq-seen", "sql")]).await;
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    assert_eq!(stored(&d, "rmq-seen"), 1);

    // The same message again, taken and handed back unacked, as a dropped
    // connection would: the broker marks it redelivered, so the engine
    // looks up what finished it and does not run the plugin again.
    b.publish(&d, &[probe("rmq-seen", "sql")]).await;
    let conn = connect(URL, &sandpipe::tls::Tls::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let taken = ch
        .basic_get(b.queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the message is in the queue");
    taken
        .delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    // A producer's duplicate: two first deliveries of one message id, each
    // run (at-least-once), since `dedupe: redeliveries` (the default) skips
    // the look-up for first deliveries.
    b.publish(&d, &[probe("rmq-dup", "sql"), probe("rmq-dup", "sql")])
        .await;
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.deliveries, 3, "{summary}");
    assert_eq!(
        stored(&d, "rmq-seen"),
        1,
        "the redelivery ran the plugin again"
    );
    assert_eq!(stored(&d, "rmq-dup"), 2);
    b.cleanup().await;

    // `dedupe: every-delivery` looks up first deliveries too.
    let b = Broker::new("dedupe_all");
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{}{GRANTS}pipeline: {{ concurrency: 1, dedupe: every-delivery }}\n",
            b.listener_yaml("")
        ),
    );
    b.publish(&d, &[probe("rmq-dup", "sql"), probe("rmq-dup", "sql")])
        .await;
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.deliveries, summary.done), (2, 2), "{summary}");
    assert_eq!(stored(&d, "rmq-dup"), 1);
    b.cleanup().await;
}
