//! The Vantiq-protocol transport against a Vantiq-protocol test server
//! (below, written from the protocol as Vantiq's connector SDKs speak it;
//! docs/services.md): authentication, `connectExtension`,
//! `configureExtension` to `on-connect`, queries with partial replies
//! carrying the reply address, publish, notifications, a configuration
//! change, a drop mid-query and `reconnectRequired` (a reconnect with the
//! same secret), the TCP health probe, and a refused token.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Deployment, free_port};

/// What the test server tells a connection to do.
enum Command {
    Send(Value),
    Drop,
}

/// One connection the test server accepted.
#[derive(Debug, Clone)]
struct Connected {
    source: String,
    secret: String,
    path: String,
}

/// A Vantiq-protocol server for the tests.
#[derive(Clone)]
struct VantiqServer {
    port: u16,
    /// Every connection that authenticated and connected a source, in order.
    connections: Arc<Mutex<Vec<Connected>>>,
    /// The live connection of each source.
    commands: Arc<Mutex<BTreeMap<String, mpsc::UnboundedSender<Command>>>>,
    /// Every frame the engine sent after connecting, with its source.
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl VantiqServer {
    async fn start(token: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            port: listener.local_addr().unwrap().port(),
            connections: Arc::default(),
            commands: Arc::default(),
            received: Arc::default(),
        };
        let this = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(this.clone().serve(stream, token));
            }
        });
        server
    }

    async fn serve(self, stream: tokio::net::TcpStream, token: &'static str) {
        let path = Arc::new(Mutex::new(String::new()));
        let seen = path.clone();
        // The callback's error type is tungstenite's, not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback =
            move |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                  response| {
                *seen.lock().unwrap() = request.uri().path().to_owned();
                Ok(response)
            };
        let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        let next = |frame: Option<Result<Message, _>>| match frame {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).ok(),
            _ => None,
        };
        let Some(validate) = next(socket.next().await) else {
            return;
        };
        assert_eq!(validate["op"], "validate", "{validate}");
        assert_eq!(validate["resourceName"], "system.credentials", "{validate}");
        if validate["object"] != token {
            let refusal = json!({"status": 401, "body": [{"code": "authFailure", "message": "invalid authToken"}]});
            let _ = socket.send(Message::Text(refusal.to_string().into())).await;
            let _ = socket.close(None).await;
            return;
        }
        socket
            .send(Message::Text(json!({"status": 200}).to_string().into()))
            .await
            .unwrap();
        let Some(connect) = next(socket.next().await) else {
            return;
        };
        assert_eq!(connect["op"], "connectExtension", "{connect}");
        assert_eq!(connect["resourceName"], "sources", "{connect}");
        let source = connect["resourceId"].as_str().unwrap().to_owned();
        let secret = connect["parameters"]["reconnectSecret"]
            .as_str()
            .unwrap()
            .to_owned();
        let (tx, mut commands) = mpsc::unbounded_channel();
        self.commands.lock().unwrap().insert(source.clone(), tx);
        self.connections.lock().unwrap().push(Connected {
            source: source.clone(),
            secret,
            path: path.lock().unwrap().clone(),
        });
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Send(frame)) => {
                        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                    Some(Command::Drop) | None => return,
                },
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let value: Value = serde_json::from_str(&text).unwrap();
                        self.received.lock().unwrap().push((source.clone(), value));
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    }

    fn send(&self, source: &str, frame: Value) {
        let commands = self.commands.lock().unwrap();
        commands[source].send(Command::Send(frame)).unwrap();
    }

    fn drop_connection(&self, source: &str) {
        let commands = self.commands.lock().unwrap();
        commands[source].send(Command::Drop).unwrap();
    }

    fn connections(&self) -> Vec<Connected> {
        self.connections.lock().unwrap().clone()
    }

    async fn wait_connections(&self, n: usize) -> Vec<Connected> {
        eventually(&format!("{n} connection(s)"), || {
            self.connections().len() >= n
        })
        .await;
        self.connections()
    }

    /// Send a query with reply address `address`; its replies, the last
    /// one final.
    async fn query(&self, source: &str, address: &str, query: Value) -> Vec<Value> {
        self.send(
            source,
            json!({"op": "query", "resourceName": "sources", "resourceId": source, "object": query, "messageHeaders": {"REPLY_ADDR_HEADER": address}}),
        );
        let mut replies = Vec::new();
        eventually(&format!("the final reply to {address}"), || {
            replies = self.replies(address);
            replies.last().is_some_and(|r| r["status"] != 100)
        })
        .await;
        replies
    }

    /// The replies received for `address`, in order.
    fn replies(&self, address: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["headers"]["X-Reply-Address"] == address)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Poll `check` every 20 ms for up to 30 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether something listens on `port`.
fn open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// An engine serving `svc` (fx-service) for Vantiq source `orders` of
/// `server`, with token `token` and a health probe on the returned port.
fn deployment(server: &VantiqServer, token: &str) -> (Deployment, u16) {
    let probe = free_port();
    let d = Deployment::new(
        &[("fx-service", "svc")],
        &format!(
            "secrets:\n  vantiq_token: {{ file: vantiq.token }}\n\
             plugins:\n  grants:\n    svc:\n      sql: true\n      limits: {{ timeout: 30s }}\n\
             services:\n  svc:\n    vantiq: {{ url: \"http://127.0.0.1:{}/ui\", token: vantiq_token, sources: [orders], reconnect: 100ms, reconnect_max: 500ms }}\n    health: {{ listen: \"127.0.0.1:{probe}\" }}\n",
            server.port
        ),
    );
    std::fs::write(d.path("vantiq.token"), token).unwrap();
    (d, probe)
}

fn configure(server: &VantiqServer, config: Value) {
    server.send(
        "orders",
        json!({"op": "configureExtension", "resourceName": "sources", "resourceId": "orders", "object": {"config": config}}),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vantiq_source_is_served_through_configuration_changes_drops_and_reconnects() {
    let server = VantiqServer::start("vantiq-token").await;
    let (d, probe) = deployment(&server, "vantiq-token");
    let config = d.config.clone();
    let (stop, shutdown) = watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });

    let first = server.wait_connections(1).await;
    assert_eq!(first[0].source, "orders");
    assert_eq!(first[0].path, "/api/v1/wsock/websocket");
    assert!(first[0].secret.starts_with("orders_"), "{:?}", first[0]);
    assert!(!open(probe), "healthy before the source was configured");
    configure(&server, json!({"generation": 1}));
    eventually("the health probe open", || open(probe)).await;

    // A query in pages of partial replies, each with the reply address.
    let replies = server
        .query("orders", "r1", json!({"op": "rows", "n": 250, "page": 100}))
        .await;
    let statuses: Vec<&Value> = replies.iter().map(|r| &r["status"]).collect();
    assert_eq!(statuses, [100, 100, 100, 204], "{replies:?}");
    assert_eq!(replies[2]["body"].as_array().unwrap().len(), 50);
    assert_eq!(
        replies[3],
        json!({"status": 204, "headers": {"X-Reply-Address": "r1"}})
    );
    let state = server.query("orders", "r2", json!({"op": "config"})).await;
    assert_eq!(state[0]["status"], 200, "{state:?}");
    assert_eq!(state[0]["body"]["config"], json!({"generation": 1}));
    // An error reply, as Vantiq's SDKs send it.
    let error = server
        .query("orders", "r3", json!({"op": "fail", "table": "t"}))
        .await;
    assert_eq!(
        error[0]["body"],
        json!({"messageCode": "io.test.badQuery", "messageTemplate": "no table {0} in schema {1}", "parameters": ["t", "public"]})
    );
    // Publish: the event's effects are applied.
    server.send(
        "orders",
        json!({"op": "publish", "resourceName": "sources", "resourceId": "orders", "object": {"id": "p1", "v": 5}}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0.. {
        let events = server
            .query("orders", &format!("e{attempt}"), json!({"op": "events"}))
            .await;
        if events[0]["body"]["events"] == json!([{"id": "p1", "v": "5"}]) {
            break;
        }
        assert!(Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A notification goes to the source's connection.
    let notified = server
        .query("orders", "r4", json!({"op": "notify", "body": {"x": 1}}))
        .await;
    assert_eq!(notified[0]["status"], 204, "{notified:?}");
    let find = || {
        server
            .received
            .lock()
            .unwrap()
            .iter()
            .find(|(_, v)| v["op"] == "notification")
            .cloned()
    };
    eventually("the notification", || find().is_some()).await;
    let notification = find().unwrap();
    assert_eq!(
        notification.1,
        json!({"op": "notification", "resourceName": "sources", "resourceId": "orders", "object": {"x": 1}})
    );

    // A configuration change: closed, then connected with the new one.
    configure(&server, json!({"generation": 2}));
    let state = server.query("orders", "g2", json!({"op": "config"})).await;
    assert_eq!(
        state[0]["body"]["config"],
        json!({"generation": 2}),
        "{state:?}"
    );
    assert_eq!(state[0]["body"]["closes"], 1, "{state:?}");

    // The connection drops mid-query: the engine reconnects with the same
    // secret, and answers again once configured.
    server.send(
        "orders",
        json!({"op": "query", "object": {"op": "rows", "n": 1000000, "page": 1}, "messageHeaders": {"REPLY_ADDR_HEADER": "big"}}),
    );
    eventually("the big query streaming", || {
        server.replies("big").len() > 10
    })
    .await;
    server.drop_connection("orders");
    let second = server.wait_connections(2).await;
    assert_eq!(second[1].secret, first[0].secret);
    // Reconnected but not configured yet: the source is gone (the drop
    // closed it), its queries never reach the guest, and the service is
    // unhealthy.
    let unconfigured = server
        .query("orders", "r-none", json!({"op": "config"}))
        .await;
    assert_eq!(
        unconfigured[0]["body"]["messageCode"], "io.sandpipe.service.notConnected",
        "{unconfigured:?}"
    );
    eventually("the health probe closed", || !open(probe)).await;
    configure(&server, json!({"generation": 3}));
    let state = server.query("orders", "r5", json!({"op": "config"})).await;
    assert_eq!(
        state[0]["body"]["config"],
        json!({"generation": 3}),
        "{state:?}"
    );
    // generation 1 → 2, then the drop: two closes; generation 3 only
    // connected (the source was already closed).
    assert_eq!(state[0]["body"]["closes"], 2, "{state:?}");
    assert!(
        server.replies("big").iter().all(|r| r["status"] == 100),
        "the dropped query's final reply went nowhere"
    );
    // reconnectRequired: the same again, at once.
    server.send("orders", json!({"op": "reconnectRequired"}));
    let third = server.wait_connections(3).await;
    assert_eq!(third[2].secret, first[0].secret);
    configure(&server, json!({"generation": 4}));
    let state = server.query("orders", "r6", json!({"op": "config"})).await;
    assert_eq!(
        state[0]["body"]["config"],
        json!({"generation": 4}),
        "{state:?}"
    );
    eventually("the health probe open again", || open(probe)).await;

    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
    assert!(!open(probe), "the probe outlived the engine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_keeps_the_service_unhealthy_and_says_why() {
    let server = VantiqServer::start("the-right-token").await;
    let api = free_port();
    let (d, probe) = deployment(&server, "a-wrong-token");
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        format!("{yaml}server: {{ listen: \"127.0.0.1:{api}\", token: vantiq_token }}\n"),
    )
    .unwrap();
    let config = d.config.clone();
    let (stop, shutdown) = watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
    let mut status = Value::Null;
    eventually("the refusal reported", || {
        let Some((200, body)) = get_with_token(api, "/v1/services", "a-wrong-token") else {
            return false;
        };
        status = serde_json::from_str(&body).unwrap();
        status[0]["transports"][1]["sources"]["orders"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("refused the token") && n.contains("authFailure"))
    })
    .await;
    assert_eq!(status[0]["healthy"], false, "{status}");
    assert!(!open(probe));
    assert!(server.connections().is_empty());
    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
}

fn get_with_token(port: u16, path: &str, token: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_table_service_answers_from_postgresql_in_pages_of_a_hundred_and_writes_published_rows()
{
    let db = crate::postgres::TestDb::new().await;
    let server = VantiqServer::start("table-token").await;
    let init = crate::harness::init_script("table-service");
    let d = Deployment::new(
        &[("table-service", "tables")],
        &format!(
            "database: {{ type: postgres, url: \"{}\" }}\n\
             secrets:\n  vantiq_token: {{ file: vantiq.token }}\n\
             plugins:\n  grants:\n    tables:\n      sql: {{ init: \"{}\" }}\n      limits: {{ timeout: 30s }}\n\
             services:\n  tables:\n    vantiq: {{ url: \"http://127.0.0.1:{}\", token: vantiq_token, sources: [orders], reconnect: 100ms }}\n",
            db.url(),
            init.display(),
            server.port
        ),
    );
    std::fs::write(d.path("vantiq.token"), "table-token").unwrap();
    let config = d.config.clone();
    let (stop, shutdown) = watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
    server.wait_connections(1).await;
    configure(&server, json!({}));

    // 250 orders published: written into the table.
    for i in 0..250 {
        server.send(
            "orders",
            json!({"op": "publish", "object": {"id": format!("o-{i:03}"), "customer": format!("c{}", i % 7), "total": i, "status": if i % 2 == 0 { "open" } else { "closed" }}}),
        );
    }
    let admin = db.admin().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count: i64 = admin
            .query_one("SELECT count(*) FROM tables.orders", &[])
            .await
            .unwrap()
            .get(0);
        if count == 250 {
            break;
        }
        assert!(Instant::now() < deadline, "{count} of 250 orders written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every row, in pages of a hundred: two partial replies, the last page
    // as the complete one.
    let all = server.query("orders", "all", json!({})).await;
    let shape: Vec<(u64, usize)> = all
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["body"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [(100, 100), (100, 100), (200, 50)],
        "{:?}",
        all.last()
    );
    let ids: Vec<&str> = all
        .iter()
        .flat_map(|r| r["body"].as_array().unwrap())
        .map(|row| row["id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..250).map(|i| format!("o-{i:03}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(
        all[0]["body"][7],
        json!({"id": "o-007", "customer": "c0", "total": 7, "status": "closed"})
    );
    // A filter and a projection; a limit.
    let open = server
        .query(
            "orders",
            "open",
            json!({"select": ["id", "total"], "where": {"status": "open"}}),
        )
        .await;
    assert_eq!(open.len(), 2, "{:?}", open.last());
    assert_eq!(open[1]["status"], 200);
    assert_eq!(open[1]["body"].as_array().unwrap().len(), 25);
    assert_eq!(open[1]["body"][24], json!({"id": "o-248", "total": 248}));
    let few = server.query("orders", "few", json!({"limit": 3})).await;
    assert_eq!(few.len(), 1);
    assert_eq!(few[0]["body"].as_array().unwrap().len(), 3);
    let none = server
        .query("orders", "none", json!({"where": {"customer": "nobody"}}))
        .await;
    assert_eq!(
        none,
        [json!({"status": 204, "headers": {"X-Reply-Address": "none"}})]
    );
    // A bad query: an error reply with its template and parameters.
    let bad = server
        .query("orders", "bad", json!({"select": ["nope"]}))
        .await;
    assert_eq!(
        bad[0]["body"],
        json!({"messageCode": "io.sandpipe.tableService.badQuery", "messageTemplate": "cannot query by {0}: use {1}", "parameters": ["the column \"nope\"", "customer, id, status, total"]})
    );
    // An update and a delete through events.
    server.send(
        "orders",
        json!({"op": "publish", "object": {"id": "o-001", "customer": "c1", "total": 1000, "status": "open"}}),
    );
    server.send(
        "orders",
        json!({"op": "publish", "object": {"delete": "o-002"}}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = admin
            .query(
                "SELECT id, total FROM tables.orders WHERE id IN ('o-001', 'o-002') ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        let seen: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if seen == [("o-001".to_owned(), 1000)] {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
}
