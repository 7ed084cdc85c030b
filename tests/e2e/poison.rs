//! A poison message (its plugin traps every time) is dead-lettered after
//! `max_attempts` with its reason, while the messages around it in the same
//! prefetch window go through at their first attempt — on classic and on
//! quorum queues. And a plugin burning CPU does not hold up another
//! plugin's messages by more than its own deadline.

use std::time::{Duration, Instant};

use crate::harness::Deployment;

async fn poison_on(queue_type: &str) {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (exchange, queue) = (format!("x_test_poison_{id}"), format!("q_test_poison_{id}"));
    let d = Deployment::new(
        &[("fx-probe", "probe"), ("fx-panic", "poison")],
        &format!(
            "listener:\n  type: rabbitmq\n  url: \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n  exchange: {{ name: {exchange}, type: fanout }}\n  queue: {queue}\n  queue_type: {queue_type}\n  prefetch: 8\nretry: {{ max_attempts: 3, backoff: {{ initial: 100ms, max: 400ms }} }}\n"
        ),
    );
    let config = sandpipe::config::Config::load(&d.config).unwrap();
    let send = |body: String| {
        let listener = config.listener.clone();
        async move {
            sandpipe::listener::send(
                &listener,
                body.as_bytes(),
                "m",
                &sandpipe::tls::Tls::default(),
            )
            .await
            .unwrap();
        }
    };
    send(
        serde_json::json!({"uuid_ref": format!("poison-{queue_type}"), "data_type": "test/panic"})
            .to_string(),
    )
    .await;
    for i in 0..20 {
        send(
            serde_json::json!({"uuid_ref": format!("fine-{queue_type}-{i}"), "data_type": "test/probe", "action": "done"})
                .to_string(),
        )
        .await;
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (20, 1), "{summary}");
    let poison = d.last(&format!("poison-{queue_type}"), "poison").await;
    assert_eq!(poison.attempt, 3);
    assert!(poison.info.contains("fixture panic"), "{}", poison.info);
    for i in 0..20 {
        let row = d.last(&format!("fine-{queue_type}-{i}"), "probe").await;
        assert_eq!((row.status.as_str(), row.attempt), ("done", 1), "{row:?}");
    }
    let conn = sandpipe::listener::rabbitmq::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dead = ch
        .basic_get(
            format!("{queue}.dead").as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the poison message is in the dead-letter queue");
    assert!(String::from_utf8_lossy(&dead.delivery.data).contains("poison-"));
    for q in [
        queue.clone(),
        format!("{queue}.retry"),
        format!("{queue}.dead"),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for x in [exchange, format!("{queue}.dead")] {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_on_a_classic_queue_does_not_hold_up_its_neighbours() {
    poison_on("classic").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_on_a_quorum_queue_does_not_hold_up_its_neighbours() {
    poison_on("quorum").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cpu_burning_plugin_delays_others_by_at_most_its_deadline() {
    // Four messages for a plugin that loops until its 500 ms deadline, on
    // every attempt, come first; twenty quick messages for another plugin
    // come after them. The quick ones must all be done within about one
    // deadline, not after the hostile ones have used up their attempts.
    let d = Deployment::new(
        &[("fx-loop", "hog"), ("fx-probe", "quick")],
        "pipeline: { concurrency: 8 }\nretry: { max_attempts: 3, backoff: { initial: 300ms, max: 300ms } }\nplugins:\n  grants:\n    hog: { limits: { timeout: 500ms } }\n",
    );
    for i in 0..4 {
        d.sqapi(
            &format!("a-hog-{i}.json"),
            &format!("hog-{i}"),
            "test/loop",
            None,
        );
    }
    for i in 0..20 {
        d.message(
            &format!("b-quick-{i:02}.json"),
            &serde_json::json!({"uuid_ref": format!("quick-{i}"), "data_type": "test/probe", "action": "done"}).to_string(),
        );
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let started = Instant::now();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    let quick_done = loop {
        let done = d.files("spool/done").len();
        if done == 20 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {done} quick messages done"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let hogs_dead = loop {
        if d.files("spool/dead").len() == 8 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hogs were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tx.send(true).unwrap();
    engine.await.unwrap().unwrap();
    // The hogs take at least three deadlines plus two backoffs (~2.1 s);
    // the quick messages finish within a deadline plus start-up slack.
    assert!(
        hogs_dead >= Duration::from_millis(2_000),
        "hogs dead after {hogs_dead:?}"
    );
    assert!(
        quick_done < Duration::from_millis(500 + 1_000),
        "quick messages took {quick_done:?} (hogs dead after {hogs_dead:?})"
    );
}
