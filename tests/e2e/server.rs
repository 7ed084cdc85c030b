//! The HTTP server: health, readiness and Prometheus metrics of a running
//! engine.

use std::time::{Duration, Instant};

use crate::harness::{Deployment, free_port, get};

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_are_served() {
    let port = free_port();
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "server: {{ listen: \"127.0.0.1:{port}\" }}\nplugins:\n  grants:\n    probe: {{ sql: true }}\n"
        ),
    );
    d.message(
        "a.json",
        r#"{"uuid_ref":"m-metrics","data_type":"test/probe","action":"sql"}"#,
    );
    d.message(
        "b.json",
        r#"{"uuid_ref":"m-denied","data_type":"test/probe","action":"emit"}"#,
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });

    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        assert!(
            Instant::now() < deadline,
            "no metrics for the processed messages"
        );
        if let Some((200, body)) = tokio::task::spawn_blocking(move || get(port, "/metrics"))
            .await
            .unwrap()
            && body.contains("sandpipe_plugin_results_total{plugin=\"probe\",status=\"done\"}")
            && body.contains("sandpipe_denied_calls_total{plugin=\"probe\"}")
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains("sandpipe_invocation_seconds_bucket{plugin=\"probe\""),
        "{body}"
    );
    assert!(body.contains("sandpipe_messages_received_total"), "{body}");
    let health = tokio::task::spawn_blocking(move || get(port, "/healthz"))
        .await
        .unwrap();
    assert_eq!(health, Some((200, "ok\n".to_owned())));
    let ready = tokio::task::spawn_blocking(move || get(port, "/readyz"))
        .await
        .unwrap();
    assert_eq!(ready, Some((200, "ready\n".to_owned())));

    tx.send(true).unwrap();
    let summary = engine.await.unwrap().unwrap();
    // m-denied fails once, is retried, then dead-lettered: three
    // settlements of two messages.
    assert_eq!(
        (
            summary.processed,
            summary.deliveries,
            summary.done,
            summary.failed,
            summary.dead
        ),
        (2, 3, 1, 0, 1),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_with_the_reason_while_the_broker_is_unreachable() {
    let port = free_port();
    let dead_port = free_port(); // nothing listens there
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "server: {{ listen: \"127.0.0.1:{port}\" }}\nlistener:\n  type: rabbitmq\n  url: \"amqp://guest:guest@127.0.0.1:{dead_port}/%2f\"\n  exchange: {{ name: x_never }}\n  queue: q_never\n  reconnect: {{ initial: 100ms, max: 200ms }}\n"
        ),
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        assert!(
            Instant::now() < deadline,
            "/readyz never said why it is not ready"
        );
        if let Some((503, body)) = tokio::task::spawn_blocking(move || get(port, "/readyz"))
            .await
            .unwrap()
            && body.contains("cannot connect to RabbitMQ")
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.starts_with("not ready:\nlistener: RabbitMQ:"),
        "{body}"
    );
    assert!(body.contains(&format!("127.0.0.1:{dead_port}")), "{body}");
    assert!(!body.contains("guest:guest"), "the password leaked: {body}");
    let health = tokio::task::spawn_blocking(move || get(port, "/healthz"))
        .await
        .unwrap();
    assert_eq!(health, Some((200, "ok\n".to_owned())));
    tx.send(true).unwrap();
    engine.await.unwrap().unwrap();
}
