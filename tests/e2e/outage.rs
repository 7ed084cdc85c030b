//! Outages are not the message's fault: while a backend is unreachable,
//! messages are requeued with their attempt unchanged (never dead-lettered)
//! and the engine resumes when it comes back. The outage is real: the
//! engine talks to Redis through a TCP proxy that the test cuts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::harness::Deployment;

/// A TCP proxy to `upstream` that can be cut (closing every connection and
/// refusing new ones) and restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Proxy {
    async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accept = {
            let up = up.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: connection refused, in effect
                    }
                    connections.lock().await.spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            })
        };
        Self {
            port,
            up,
            connections,
            accept,
        }
    }

    async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.connections.lock().await.abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_metadata_outage_requeues_without_using_attempts_and_recovers() {
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let prefix = format!(
        "sandpipe-test:outage:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut redis = sandpipe::listener::redis::connect(
        "redis://127.0.0.1:6379",
        Duration::from_secs(5),
        &sandpipe::tls::Tls::default(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}:{i}"))
            .arg(format!("{{\"n\": {i}}}"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "meta_store: {{ type: redis, url: \"redis://127.0.0.1:{}\", timeout: 300ms }}\nretry: {{ max_attempts: 2, backoff: {{ initial: 50ms, max: 300ms }} }}\nplugins:\n  grants:\n    probe: {{ meta: true }}\n",
            proxy.port
        ),
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = d.config.clone();
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, rx).await });
    // The engine is up (it connected through the proxy); now cut Redis off
    // and send work that needs it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut().await;
    for i in 0..5 {
        d.message(
            &format!("m{i}.json"),
            &serde_json::json!({"uuid_ref": format!("outage-{i}"), "data_type": "test/probe", "action": "echo-meta", "meta_location": format!("{prefix}:{i}")}).to_string(),
        );
    }
    // Each message is requeued, more often than max_attempts allows, and
    // none is dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let requeued = d
            .rows("outage-0")
            .await
            .into_iter()
            .filter(|r| r.info.starts_with("backend unavailable") || r.status == "failed")
            .count();
        if requeued >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outage-0 was not requeued repeatedly"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        d.files("spool/dead").is_empty(),
        "{:?}",
        d.files("spool/dead")
    );
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.files("spool/done").len() < 5 {
        assert!(
            Instant::now() < deadline,
            "work did not resume: {:?}",
            d.files("spool/done")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tx.send(true).unwrap();
    let summary = engine.await.unwrap().unwrap();
    assert_eq!((summary.done, summary.dead), (5, 0), "{summary}");
    for i in 0..5 {
        let last = d.last(&format!("outage-{i}"), "probe").await;
        assert_eq!(last.attempt, 1, "the outage used up attempts: {last:?}");
        assert_eq!(last.info, format!("{{\"n\":{i}}}"));
    }
    let _: () = redis::cmd("DEL")
        .arg((0..5).map(|i| format!("{prefix}:{i}")).collect::<Vec<_>>())
        .query_async(&mut redis)
        .await
        .unwrap();
}
