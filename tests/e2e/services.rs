//! Services (the `service` world) served by `sandpipe run`: queries
//! streamed over HTTP as NDJSON, events with their effects, declared routes
//! on a listener of the service's own, a trap or a silent query answered
//! with an error and a fresh instance after it, a configuration change
//! between calls, notifications, `sandpipe services` and `check`. The
//! component is fx-service (tests/fixtures/fx-service).

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::harness::{Deployment, free_port};

const TOKEN: &str = "service-api-token";

/// A running engine with one service `svc` (fx-service): the API's port,
/// the routes' port.
struct Running {
    d: Deployment,
    api: u16,
    routes: u16,
    stop: watch::Sender<bool>,
    engine: tokio::task::JoinHandle<anyhow::Result<sandpipe::pipeline::Summary>>,
}

impl Running {
    /// Start `sandpipe run` with `svc` configured by `service` (YAML keys
    /// of `services.svc` besides `http`) and its grant's `limits`; wait
    /// until it is ready (unless `ready` is false).
    async fn start(service: &str, limits: &str, ready: bool) -> Self {
        Self::start_with(service, limits, ready, "", &[], "").await
    }

    /// [`Running::start`] with `top` (YAML) added at the top level and
    /// `secrets` (name, value) declared as files.
    async fn start_with(
        service: &str,
        limits: &str,
        ready: bool,
        top: &str,
        secrets: &[(&str, &str)],
        grant: &str,
    ) -> Self {
        let (api, routes) = (free_port(), free_port());
        let more: String = secrets
            .iter()
            .map(|(name, _)| format!("  {name}: {{ file: {name}.secret }}\n"))
            .collect();
        let d = Deployment::new(
            &[("fx-service", "svc")],
            &format!(
                "secrets:\n  api_token: {{ file: api.token }}\n{more}\
                 server: {{ listen: \"127.0.0.1:{api}\", token: api_token }}\n\
                 plugins:\n  grants:\n    svc:\n      sql: true\n      limits: {{ {limits} }}\n{grant}\
                 services:\n  svc:\n    http: {{ listen: \"127.0.0.1:{routes}\", max_body: 64KiB, read_timeout: 500ms, max_parts: 3 }}\n{service}{top}"
            ),
        );
        std::fs::write(d.path("api.token"), TOKEN).unwrap();
        for (name, value) in secrets {
            std::fs::write(d.path(&format!("{name}.secret")), value).unwrap();
        }
        let config = d.config.clone();
        let (stop, shutdown) = watch::channel(false);
        let engine =
            tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
        let running = Self {
            d,
            api,
            routes,
            stop,
            engine,
        };
        if ready {
            running.ready().await;
        }
        running
    }

    /// Wait until `/readyz` answers 200.
    async fn ready(&self) {
        let port = self.api;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = tokio::task::spawn_blocking(move || crate::harness::get(port, "/readyz"))
                .await
                .unwrap();
            if let Some((200, _)) = got {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {got:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A query's replies (one JSON value per NDJSON line).
    async fn query(&self, query: Value) -> Vec<Value> {
        let port = self.api;
        let (status, body) = tokio::task::spawn_blocking(move || {
            http(
                port,
                "POST",
                "/v1/services/svc/query",
                &[("Authorization", &format!("Bearer {TOKEN}"))],
                query.to_string().as_bytes(),
            )
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        body.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// The one final reply of a query that makes no partial ones.
    async fn answer(&self, query: Value) -> Value {
        let replies = self.query(query.clone()).await;
        assert_eq!(replies.len(), 1, "{query}: {replies:?}");
        replies.into_iter().next().unwrap()
    }

    /// An API call with the token: (status, body).
    async fn api(&self, method: &'static str, path: &str, body: Value) -> (u16, String) {
        let (port, path) = (self.api, path.to_owned());
        tokio::task::spawn_blocking(move || {
            http(
                port,
                method,
                &path,
                &[("Authorization", &format!("Bearer {TOKEN}"))],
                body.to_string().as_bytes(),
            )
        })
        .await
        .unwrap()
    }

    /// A request to the service's own listener.
    async fn route(
        &self,
        method: &'static str,
        path: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let (port, path) = (self.routes, path.to_owned());
        tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http(port, method, &path, &headers, &body)
        })
        .await
        .unwrap()
    }

    /// The service as `/v1/services` lists it.
    async fn status(&self) -> Value {
        let (status, body) = self.api("GET", "/v1/services", json!(null)).await;
        assert_eq!(status, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        list[0].clone()
    }

    async fn stop(self) -> Deployment {
        self.stop.send(true).unwrap();
        self.engine.await.unwrap().unwrap();
        self.d
    }
}

/// An HTTP/1.0 request on 127.0.0.1: (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before it read all of a large body.
    let _ = stream.write_all(body);
    read_response(&mut stream)
}

fn read_response(stream: &mut std::net::TcpStream) -> (u16, String) {
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_partial_replies_stream_in_order_from_one_warm_instance() {
    let svc = Running::start("", "", true).await;
    let replies = svc
        .query(json!({"op": "rows", "n": 10000, "page": 1}))
        .await;
    assert_eq!(replies.len(), 10001, "{:?}", replies.last());
    let instance = replies[0]["body"][0]["instance"].clone();
    for (i, reply) in replies[..10000].iter().enumerate() {
        assert_eq!(reply["status"], 100, "{reply}");
        assert_eq!(
            reply["body"],
            json!([{"i": i, "instance": instance}]),
            "{reply}"
        );
    }
    assert_eq!(replies[10000], json!({"status": 204}));
    // Pages of a hundred rows.
    let pages = svc
        .query(json!({"op": "rows", "n": 250, "page": 100}))
        .await;
    let sizes: Vec<usize> = pages[..3]
        .iter()
        .map(|p| p["body"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    // The same warm instance, connected once, with the default config.
    let state = svc.answer(json!({"op": "config"})).await;
    assert_eq!(state["status"], 200, "{state}");
    assert_eq!(state["body"]["instance"], instance, "{state}");
    assert_eq!(state["body"]["connects"], 1, "{state}");
    assert_eq!(state["body"]["config"], json!({}), "{state}");
    // What the API lists.
    let status = svc.status().await;
    assert_eq!(status["name"], "svc", "{status}");
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["routes"].as_array().unwrap().len(), 4, "{status}");
    assert_eq!(status["calls"], 3, "{status}");
    // Without the token: refused.
    let port = svc.api;
    let (code, _) = tokio::task::spawn_blocking(move || {
        http(
            port,
            "POST",
            "/v1/services/svc/query",
            &[],
            b"{\"op\":\"config\"}",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 401);
    let (code, body) = svc.api("POST", "/v1/services/nope/query", json!({})).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no service `nope`"), "{body}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_mid_query_is_an_error_reply_and_a_fresh_instance_answers_the_next() {
    let svc = Running::start("", "", true).await;
    let before = svc.answer(json!({"op": "config"})).await;
    let replies = svc.query(json!({"op": "trap"})).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(
        replies[0],
        json!({"status": 100, "body": {"before": "the trap"}})
    );
    assert_eq!(replies[1]["status"], 400, "{replies:?}");
    assert_eq!(
        replies[1]["body"]["messageCode"], "io.sandpipe.service.failed",
        "{replies:?}"
    );
    let parameters = replies[1]["body"]["parameters"].to_string();
    assert!(
        parameters.contains("fx-service traps mid-query"),
        "{parameters}"
    );
    // The next query: a new instance, connected before it answers.
    let after = svc.answer(json!({"op": "config"})).await;
    assert_eq!(after["status"], 200, "{after}");
    assert_ne!(after["body"]["instance"], before["body"]["instance"]);
    assert_eq!(after["body"]["connects"], 1, "{after}");
    let status = svc.status().await;
    assert!(
        status["last_error"].as_str().unwrap().contains("panic"),
        "{status}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_without_a_final_reply_past_their_deadline_or_failing_are_answered_with_errors() {
    let svc = Running::start("", "timeout: 1s", true).await;
    let code = |reply: &Value| {
        reply["body"]["messageCode"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let silent = svc.answer(json!({"op": "silent"})).await;
    assert_eq!(silent["status"], 400);
    assert_eq!(code(&silent), "io.sandpipe.service.noReply", "{silent}");
    let started = Instant::now();
    let hang = svc.answer(json!({"op": "hang"})).await;
    assert_eq!(code(&hang), "io.sandpipe.service.failed", "{hang}");
    assert!(hang.to_string().contains("deadline"), "{hang}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = svc.answer(json!({"op": "err"})).await;
    assert_eq!(code(&err), "io.sandpipe.service.error", "{err}");
    assert!(err.to_string().contains("refuses this query"), "{err}");
    // The guest's own error reply: its code, template and parameters.
    let fail = svc.answer(json!({"op": "fail", "table": "nope"})).await;
    assert_eq!(
        fail,
        json!({"status": 400, "body": {"messageCode": "io.test.badQuery", "messageTemplate": "no table {0} in schema {1}", "parameters": ["nope", "public"]}})
    );
    // The instance that hung was replaced, and answers.
    let ok = svc.answer(json!({"op": "config"})).await;
    assert_eq!(ok["status"], 200, "{ok}");
    // A query that is not JSON never reaches the guest.
    let (status, body) = tokio::task::spawn_blocking({
        let port = svc.api;
        move || {
            http(
                port,
                "POST",
                "/v1/services/svc/query",
                &[("Authorization", &format!("Bearer {TOKEN}"))],
                b"not json",
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_cannot_connect_is_not_ready_and_answers_so() {
    let svc = Running::start("    connect: { fail: true }\n", "", false).await;
    let port = svc.api;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::task::spawn_blocking(move || crate::harness::get(port, "/readyz"))
            .await
            .unwrap();
        if let Some((503, body)) = &got
            && body.contains("configuration says fail")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = svc.answer(json!({"op": "config"})).await;
    assert_eq!(
        reply["body"]["messageCode"], "io.sandpipe.service.notConnected",
        "{reply}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_change_reaches_the_next_calls_and_calls_in_flight_finish_on_the_old() {
    let svc = Running::start("    connect: { generation: 1 }\n", "timeout: 10s", true).await;
    let port = svc.api;
    let slow = tokio::task::spawn_blocking(move || {
        http(
            port,
            "POST",
            "/v1/services/svc/query",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            br#"{"op": "slow", "ms": 1500}"#,
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = svc
        .api(
            "POST",
            "/v1/services/svc/configure",
            json!({"generation": 2}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let in_flight: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        in_flight["body"]["config"],
        json!({"generation": 1}),
        "{in_flight}"
    );
    let next = svc.answer(json!({"op": "config"})).await;
    assert_eq!(next["body"]["config"], json!({"generation": 2}), "{next}");
    assert_eq!(next["body"]["closes"], 1, "{next}");
    assert_eq!(next["body"]["connects"], 2, "{next}");
    assert_eq!(next["body"]["instance"], in_flight["body"]["instance"]);
    let (status, body) = svc
        .api("POST", "/v1/services/svc/configure", json!([1]))
        .await;
    assert_eq!(status, 400, "{body}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_apply_their_effects_only_when_handled_and_notifications_reach_followers() {
    let svc = Running::start("", "", true).await;
    let (status, body) = svc
        .api(
            "POST",
            "/v1/services/svc/publish",
            json!({"id": "a", "v": 1}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = svc
        .api(
            "POST",
            "/v1/services/svc/publish",
            json!({"id": "b", "v": 2, "fail": true}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("the event says fail"), "{body}");
    // A source the service does not have never reaches the guest.
    let (status, body) = svc
        .api(
            "POST",
            "/v1/services/svc/publish?source=elsewhere",
            json!({"id": "c", "v": 3}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no connected source `elsewhere`"), "{body}");
    let (status, body) = svc
        .api(
            "POST",
            "/v1/services/svc/configure?source=elsewhere",
            json!({}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let events = svc.answer(json!({"op": "events"})).await;
    assert_eq!(
        events["body"],
        json!({"events": [{"id": "a", "v": "1"}]}),
        "{events}"
    );

    // Nobody follows: `notify` is unavailable, and the query says so.
    let alone = svc.answer(json!({"op": "notify", "body": {"n": 0}})).await;
    assert!(alone.to_string().contains("no one is connected"), "{alone}");
    // A follower gets the notification.
    let port = svc.api;
    let follower = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET /v1/services/svc/notifications?source=svc HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"n\":1") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = svc.answer(json!({"op": "notify", "body": {"n": 1}})).await;
        if reply["status"] == 204 {
            break;
        }
        assert!(Instant::now() < deadline, "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = follower.join().unwrap();
    let line: Value = serde_json::from_str(
        seen.lines()
            .find(|l| l.contains("\"n\":1"))
            .unwrap_or_default(),
    )
    .unwrap();
    assert_eq!(line, json!({"source": "svc", "body": {"n": 1}}), "{seen}");
    svc.stop().await;
}

/// A `multipart/form-data` body of `(name, filename, bytes)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "sandpipe-test-boundary";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_routes_reach_the_guest_and_everything_else_is_refused_without_it() {
    let svc = Running::start("", "", true).await;
    let (status, body) = svc
        .route("GET", "/items/42?x=1&y=two", vec![], vec![])
        .await;
    assert_eq!(status, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got["route"], "/items/{id}", "{got}");
    assert_eq!(got["params"], json!([["id", "42"]]), "{got}");
    assert_eq!(got["query"], json!([["x", "1"], ["y", "two"]]), "{got}");

    let (content_type, body) = multipart(&[
        ("meta", None, b"{\"title\": \"t\"}"),
        ("files", Some("a.bin"), &[7u8; 1000]),
    ]);
    let (status, answer) = svc
        .route(
            "POST",
            "/items/7/files",
            vec![("Content-Type".into(), content_type)],
            body,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let got: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        got["parts"],
        json!([
            {"name": "meta", "filename": null, "content_type": null, "len": 14},
            {"name": "files", "filename": "a.bin", "content_type": "application/octet-stream", "len": 1000},
        ]),
        "{got}"
    );
    let (status, body) = svc.route("GET", "/fail", vec![], vec![]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("nothing here"), "{body}");

    // Refused by the engine: the guest sees none of these.
    let calls = svc.status().await["calls"].as_u64().unwrap();
    let (status, body) = svc.route("GET", "/nope", vec![], vec![]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no route GET /nope"), "{body}");
    let (status, _) = svc.route("PUT", "/items/1", vec![], vec![]).await;
    assert_eq!(status, 405);
    // A body over max_body (64 KiB): the client sends one byte more than
    // the limit of the 100 KiB it announces, and gets 413.
    let port = svc.routes;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "POST /items/1/files HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
            100 * 1024
        )
        .unwrap();
        stream.write_all(&[0u8; 64 * 1024 + 1]).unwrap();
        read_response(&mut stream)
    })
    .await
    .unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("max_body"), "{body}");
    let many: Vec<(&str, Option<&str>, &[u8])> = (0..4).map(|_| ("p", None, &b"x"[..])).collect();
    let (content_type, body) = multipart(&many);
    let (status, body) = svc
        .route(
            "POST",
            "/items/1/files",
            vec![("Content-Type".into(), content_type)],
            body,
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("max_parts"), "{body}");
    let (status, body) = svc
        .route(
            "POST",
            "/items/1/files",
            vec![(
                "Content-Type".into(),
                "multipart/form-data; boundary=zz".into(),
            )],
            b"--zz\r\nnonsense".to_vec(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // A client that sends its body too slowly: 408 after read_timeout.
    let port = svc.routes;
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "POST /items/1/files HTTP/1.0\r\nContent-Length: 100\r\n\r\nonly ten b"
        )
        .unwrap();
        read_response(&mut stream)
    });
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 408, "{body}");
    assert_eq!(
        svc.status().await["calls"].as_u64().unwrap(),
        calls,
        "a refused request reached the guest"
    );
    // The OpenAPI document of the routes.
    let (status, body) = svc.route("GET", "/openapi.json", vec![], vec![]).await;
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(
        doc["paths"]["/items/{id}/files"]["post"]["parameters"][0]["name"],
        "id"
    );
    let (_, metrics) = crate::harness::get(svc.api, "/metrics").unwrap();
    assert!(
        metrics.contains("sandpipe_service_requests_refused_total{")
            && metrics.contains("status=\"413\"")
            && metrics.contains("sandpipe_service_calls_total{"),
        "{metrics}"
    );
    let d = svc.stop().await;

    // The command line shows the service, its routes and its health.
    let out = d.cli(&["services"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("service `svc`: component `svc` 1.0.0, 1 instance(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("route POST /items/{id}/files"), "{stdout}");
    assert!(stdout.contains("health: connects"), "{stdout}");
    let out = d.cli(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(world service, sha256 ")
            && stdout.contains("4 route(s), served by services.svc"),
        "{stdout}"
    );
    assert!(stdout.contains("1 service(s) ok, 0 problem(s)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_requests_get_a_reply_per_partial_and_replicas_compete_for_them() {
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let queue = format!("q_svc_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let service = format!("    rabbitmq: {{ url: \"{URL}\", queue: {queue}, prefetch: 4 }}\n");
    let (a, b) = (
        Running::start(&service, "", true).await,
        Running::start(&service, "", true).await,
    );
    let connection = sandpipe::listener::rabbitmq::connect(URL, &sandpipe::tls::Tls::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // Both replicas consume before any request goes out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if q.consumer_count() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} consumers",
            q.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replies = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            replies.name().as_str().into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publish = |body: Value, reply: Option<String>, correlation: String| {
        let channel = channel.clone();
        let queue = queue.clone();
        async move {
            let mut properties =
                lapin::BasicProperties::default().with_correlation_id(correlation.as_str().into());
            if let Some(reply) = reply {
                properties = properties.with_reply_to(reply.as_str().into());
            }
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let reply_queue = replies.name().as_str().to_owned();
    for i in 0..20 {
        publish(
            json!({"op": "rows", "n": 250, "page": 100}),
            Some(reply_queue.clone()),
            format!("q{i}"),
        )
        .await;
    }
    // Every query's replies, in order: three partial pages, then 204.
    let mut by_query: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    let mut finals = 0;
    while finals < 20 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("replies within 30 s")
            .unwrap()
            .unwrap();
        let correlation = delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_owned();
        let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
        let last = sandpipe::listener::rabbitmq::headers_of(&delivery.properties)
            .contains(&("x-sandpipe-final".to_owned(), "true".to_owned()));
        assert_eq!(last, reply["status"] != 100, "{reply}");
        finals += usize::from(last);
        by_query.entry(correlation).or_default().push(reply);
    }
    let mut instances = std::collections::BTreeSet::new();
    for (query, replies) in &by_query {
        let statuses: Vec<&Value> = replies.iter().map(|r| &r["status"]).collect();
        assert_eq!(statuses, [100, 100, 100, 204], "{query}");
        let rows: Vec<u64> = replies[..3]
            .iter()
            .flat_map(|r| r["body"].as_array().unwrap())
            .map(|row| row["i"].as_u64().unwrap())
            .collect();
        assert_eq!(rows, (0..250).collect::<Vec<_>>(), "{query}");
        instances.insert(
            replies[0]["body"][0]["instance"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(by_query.len(), 20);
    assert_eq!(instances.len(), 2, "both replicas answered: {instances:?}");

    // An event (no reply_to): handled by one replica, its effects applied.
    publish(json!({"id": "e1", "v": 1}), None, "e1".into()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = Vec::new();
        for svc in [&a, &b] {
            // A replica that never handled an event has no table yet.
            let events = svc.answer(json!({"op": "events"})).await;
            if let Some(rows) = events["body"]["events"].as_array() {
                seen.extend(rows.iter().cloned());
            }
        }
        if seen == [json!({"id": "e1", "v": "1"})] {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = a.status().await;
    assert_eq!(status["transports"][2]["type"], "rabbitmq", "{status}");
    a.stop().await;
    b.stop().await;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stream_requests_get_a_reply_per_partial_and_events_are_acked_when_handled() {
    let prefix = format!("svc-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let (stream, replies) = (format!("{prefix}:requests"), format!("{prefix}:replies"));
    let svc = Running::start(
        &format!(
            "    redis: {{ url: \"redis://127.0.0.1:6379\", stream: \"{stream}\", group: g }}\n"
        ),
        "",
        true,
    )
    .await;
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let add = |fields: Vec<(&'static str, String)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd
    };
    for i in 0..3 {
        let _: String = add(vec![
            (
                "body",
                json!({"op": "rows", "n": 150, "page": 100}).to_string(),
            ),
            ("reply_to", replies.clone()),
            ("correlation_id", format!("c{i}")),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    }
    let _: String = add(vec![("body", json!({"id": "r1", "v": 2}).to_string())])
        .query_async(&mut conn)
        .await
        .unwrap();
    // An event for a source the service does not have: acked, not applied.
    let _: String = add(vec![
        ("body", json!({"id": "x9", "v": 9}).to_string()),
        ("source", "elsewhere".to_owned()),
    ])
    .query_async(&mut conn)
    .await
    .unwrap();
    // Three replies per query (two partial pages, then 204), in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    let entries = loop {
        let read: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&replies)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        if read.ids.len() >= 9 {
            break read.ids;
        }
        assert!(Instant::now() < deadline, "{} replies", read.ids.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = |e: &redis::streams::StreamId, k: &str| -> String {
        redis::from_redis_value_ref::<String>(&e.map[k]).unwrap()
    };
    for i in 0..3 {
        let mine: Vec<(String, String, usize)> = entries
            .iter()
            .filter(|e| text(e, "correlation_id") == format!("c{i}"))
            .map(|e| {
                let body: Value = serde_json::from_str(&text(e, "body")).unwrap();
                (
                    text(e, "status"),
                    text(e, "final"),
                    body.as_array().map_or(0, Vec::len),
                )
            })
            .collect();
        assert_eq!(
            mine,
            [
                ("100".to_owned(), "0".to_owned(), 100),
                ("100".to_owned(), "0".to_owned(), 50),
                ("204".to_owned(), "1".to_owned(), 0),
            ]
        );
    }
    // The event was handled, and every entry acked: nothing pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = svc.answer(json!({"op": "events"})).await;
        // XPENDING's summary: the count first.
        let pending: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("g")
            .query_async(&mut conn)
            .await
            .unwrap();
        let count: u64 = redis::from_redis_value_ref(&pending[0]).unwrap();
        if events["body"]["events"] == json!([{"id": "r1", "v": "2"}]) && count == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{events} {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.stop().await;
    let _: u64 = redis::cmd("DEL")
        .arg(&stream)
        .arg(&replies)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_registers_with_the_token_storage_and_is_ready_only_once_it_is() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    // A token storage that refuses registrations until told otherwise.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let accept = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new().route(
        "/service",
        axum::routing::post({
            let (received, accept) = (received.clone(), accept.clone());
            move |axum::Json(body): axum::Json<Value>| {
                let (received, accept) = (received.clone(), accept.clone());
                async move {
                    received.lock().unwrap().push(body);
                    if accept.load(Ordering::SeqCst) {
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(json!({"success": true})),
                        )
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(json!({"error": "starting"})),
                        )
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let storage = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let icon = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    std::fs::write(icon.path(), b"\x89PNG fake").unwrap();
    let svc = Running::start_with(
        &format!("    register: {{ servicename: port-zenodo, authorize_url: \"https://zenodo.example/oauth/authorize\", refresh_url: \"https://zenodo.example/oauth/token\", client_id: zenodo_id, client_secret: zenodo_secret, implements: [metadata, fileStorage], file_transfer_archive: zip, display_name: Zenodo, icon: \"{}\" }}\n", icon.path().display()),
        "",
        false,
        &format!("token_storage: {{ url: \"http://127.0.0.1:{storage}\" }}\n"),
        &[("zenodo_id", "the-client-id"), ("zenodo_secret", "the-client-secret")],
        "",
    )
    .await;
    let port = svc.api;
    let readyz = move || crate::harness::get(port, "/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::task::spawn_blocking(readyz).await.unwrap();
        if let Some((503, body)) = &got
            && body.contains("token storage: service `svc` is not registered")
            && received.lock().unwrap().len() >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    accept.store(true, Ordering::SeqCst);
    svc.ready().await;
    let body = received.lock().unwrap().last().cloned().unwrap();
    assert_eq!(body["servicename"], "port-zenodo", "{body}");
    assert_eq!(body["client_id"], "the-client-id");
    assert_eq!(body["client_secret"], "the-client-secret");
    assert_eq!(body["implements"], json!(["metadata", "fileStorage"]));
    assert_eq!(body["fileTransferMode"], 0);
    assert_eq!(body["fileTransferArchive"], 1);
    assert_eq!(body["displayName"], "Zenodo");
    assert_eq!(body["refresh_url"], "https://zenodo.example/oauth/token");
    assert!(
        body["icon"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"),
        "{body}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_oauth_token_from_the_token_storage_goes_on_requests_the_guest_never_sees() {
    use std::sync::{Arc, Mutex};
    // The token storage: alice's token is expired until refreshed; bob has none.
    let refreshed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let storage_app = axum::Router::new().route(
        "/user/{user}/token/{service}",
        axum::routing::get({
            let (refreshed, reads) = (refreshed.clone(), reads.clone());
            move |axum::extract::Path((user, service)): axum::extract::Path<(String, String)>| {
                let (refreshed, reads) = (refreshed.clone(), reads.clone());
                async move {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if user != "alice" || service != "port-zenodo" {
                        return (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({})));
                    }
                    let data = if refreshed.load(std::sync::atomic::Ordering::SeqCst) {
                        json!({"access_token": "fresh-alice", "refresh_token": "r", "expiration_date": "2999-01-01 00:00:00"})
                    } else {
                        json!({"access_token": "old-alice", "refresh_token": "r", "expiration_date": "2000-01-01 00:00:00"})
                    };
                    (axum::http::StatusCode::OK, axum::Json(json!({"type": "OAuth2Token", "data": data})))
                }
            }
        })
        .put({
            let refreshed = refreshed.clone();
            move || {
                let refreshed = refreshed.clone();
                async move {
                    refreshed.store(true, std::sync::atomic::Ordering::SeqCst);
                    axum::Json(json!({"success": true}))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let storage = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, storage_app).await });
    // The destination: what each request carried.
    /// What one request carried: its `Authorization`, whether it had the
    /// user header.
    type Seen = (Option<String>, bool);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let api_app = axum::Router::new().route(
        "/me",
        axum::routing::get({
            let seen = seen.clone();
            move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let user_header = headers.contains_key("x-sandpipe-user");
                    seen.lock().unwrap().push((auth.clone(), user_header));
                    if auth.as_deref() == Some("Bearer fresh-alice") {
                        (axum::http::StatusCode::OK, "hello alice")
                    } else {
                        (axum::http::StatusCode::UNAUTHORIZED, "who?")
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, api_app).await });
    let svc = Running::start_with(
        "",
        "",
        true,
        &format!("token_storage: {{ url: \"http://127.0.0.1:{storage}\" }}\n"),
        &[],
        &format!(
            "      http: {{ allow: [\"http://127.0.0.1:{api}\"], auth: {{ \"http://127.0.0.1:{api}\": {{ oauth_user: port-zenodo }} }} }}\n"
        ),
    )
    .await;
    let url = format!("http://127.0.0.1:{api}/me");
    let alice = svc
        .answer(json!({"op": "fetch", "url": url, "user": "alice"}))
        .await;
    assert_eq!(
        alice["body"],
        json!({"status": 200, "body": "hello alice"}),
        "{alice}"
    );
    assert!(
        refreshed.load(std::sync::atomic::Ordering::SeqCst),
        "the expired token was refreshed"
    );
    // Read (expired), refreshed, read again; then cached: a second
    // request goes without asking again.
    let read = reads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(read, 2);
    let again = svc
        .answer(json!({"op": "fetch", "url": url, "user": "alice"}))
        .await;
    assert_eq!(again["body"]["status"], 200, "{again}");
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::SeqCst),
        read,
        "the token was read again"
    );
    // No token for bob, and no user named: the request fails in the host.
    let bob = svc
        .answer(json!({"op": "fetch", "url": url, "user": "bob"}))
        .await;
    assert!(bob.to_string().contains("no token of user `bob`"), "{bob}");
    let nobody = svc.answer(json!({"op": "fetch", "url": url})).await;
    assert!(nobody.to_string().contains("x-sandpipe-user"), "{nobody}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (Some("Bearer fresh-alice".to_owned()), false),
            (Some("Bearer fresh-alice".to_owned()), false),
        ],
        "only alice's requests went out, with her fresh token and without the user header"
    );
    svc.stop().await;
}

/// A Zenodo-style repository for the RDS example: depositions, their
/// metadata, files (multipart `file` + `name`; `bad.txt` is refused) and
/// publishing, for the bearer token `tok-alice` only.
#[derive(Default)]
struct Repository {
    depositions: std::sync::Mutex<std::collections::BTreeMap<u64, Value>>,
    contents: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    tokens: std::sync::Mutex<Vec<String>>,
    base: std::sync::Mutex<String>,
}

async fn repository(repo: std::sync::Arc<Repository>) -> u16 {
    let base = std::sync::Arc::clone(&repo);
    let base = &base.base;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    type Shared = State<std::sync::Arc<Repository>>;
    fn allowed(repo: &Repository, headers: &HeaderMap) -> bool {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        repo.tokens.lock().unwrap().push(token.clone());
        token == "Bearer tok-alice" && !headers.contains_key("x-sandpipe-user")
    }
    async fn list(State(repo): Shared, headers: HeaderMap) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let all: Vec<Value> = repo.depositions.lock().unwrap().values().cloned().collect();
        (StatusCode::OK, axum::Json(Value::Array(all)))
    }
    async fn create(State(repo): Shared, headers: HeaderMap) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let mut depositions = repo.depositions.lock().unwrap();
        let id = depositions.len() as u64 + 101;
        let deposition = json!({"id": id, "metadata": {}, "files": [], "submitted": false});
        depositions.insert(id, deposition.clone());
        (StatusCode::CREATED, axum::Json(deposition))
    }
    async fn update(
        State(repo): Shared,
        Path(id): Path<u64>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let mut depositions = repo.depositions.lock().unwrap();
        let Some(deposition) = depositions.get_mut(&id) else {
            return (StatusCode::NOT_FOUND, axum::Json(json!({})));
        };
        deposition["metadata"] = body["metadata"].clone();
        (StatusCode::OK, axum::Json(deposition.clone()))
    }
    async fn upload(
        State(repo): Shared,
        Path(id): Path<u64>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let boundary = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| multer::parse_boundary(ct).ok())
            .unwrap();
        let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
        let mut form = multer::Multipart::new(stream, boundary);
        let (mut name, mut content) = (String::new(), Vec::new());
        while let Some(field) = form.next_field().await.unwrap() {
            match field.name() {
                Some("name") => name = field.text().await.unwrap(),
                Some("file") => content = field.bytes().await.unwrap().to_vec(),
                _ => {}
            }
        }
        let size = content.len();
        if name == "bad.txt" {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"message": "refused"})),
            );
        }
        let mut depositions = repo.depositions.lock().unwrap();
        let deposition = depositions.get_mut(&id).unwrap();
        let files = deposition["files"].as_array_mut().unwrap();
        let file_id = format!("f{}", files.len() + 1);
        files.push(json!({"id": file_id, "filename": name, "filesize": size}));
        repo.contents.lock().unwrap().insert(file_id, content);
        (StatusCode::CREATED, axum::Json(json!({"filename": name})))
    }
    async fn files(
        State(repo): Shared,
        Path(id): Path<u64>,
        headers: HeaderMap,
    ) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let base = repo.base.lock().unwrap().clone();
        let depositions = repo.depositions.lock().unwrap();
        let listed: Vec<Value> = depositions[&id]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f["links"] =
                    json!({"download": format!("{base}/api/files/{}", f["id"].as_str().unwrap())});
                f
            })
            .collect();
        (StatusCode::OK, axum::Json(Value::Array(listed)))
    }
    async fn delete_file(
        State(repo): Shared,
        Path((id, file)): Path<(u64, String)>,
        headers: HeaderMap,
    ) -> StatusCode {
        if !allowed(&repo, &headers) {
            return StatusCode::UNAUTHORIZED;
        }
        let mut depositions = repo.depositions.lock().unwrap();
        depositions.get_mut(&id).unwrap()["files"]
            .as_array_mut()
            .unwrap()
            .retain(|f| f["id"] != file.as_str());
        StatusCode::NO_CONTENT
    }
    async fn download(
        State(repo): Shared,
        Path(file): Path<String>,
        headers: HeaderMap,
    ) -> (StatusCode, Vec<u8>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, Vec::new());
        }
        match repo.contents.lock().unwrap().get(&file) {
            Some(bytes) => (StatusCode::OK, bytes.clone()),
            None => (StatusCode::NOT_FOUND, Vec::new()),
        }
    }
    async fn publish(
        State(repo): Shared,
        Path(id): Path<u64>,
        headers: HeaderMap,
    ) -> (StatusCode, axum::Json<Value>) {
        if !allowed(&repo, &headers) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let mut depositions = repo.depositions.lock().unwrap();
        let deposition = depositions.get_mut(&id).unwrap();
        deposition["submitted"] = json!(true);
        (StatusCode::ACCEPTED, axum::Json(deposition.clone()))
    }
    let app = axum::Router::new()
        .route("/api/deposit/depositions", get(list).post(create))
        .route("/api/deposit/depositions/{id}", axum::routing::put(update))
        .route(
            "/api/deposit/depositions/{id}/files",
            post(upload).get(files),
        )
        .route(
            "/api/deposit/depositions/{id}/files/{file}",
            axum::routing::delete(delete_file),
        )
        .route("/api/files/{file}", get(download))
        .route(
            "/api/deposit/depositions/{id}/actions/publish",
            post(publish),
        )
        .with_state(repo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    *base.lock().unwrap() = format!("http://127.0.0.1:{port}");
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A token storage for the RDS example: registrations, and alice's token.
async fn token_storage(registered: std::sync::Arc<std::sync::Mutex<Vec<Value>>>) -> u16 {
    let app = axum::Router::new()
        .route(
            "/service",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let registered = registered.clone();
                async move {
                    registered.lock().unwrap().push(body);
                    axum::Json(json!({"success": true}))
                }
            }),
        )
        .route(
            "/user/{user}/token/{service}",
            axum::routing::get(
                |axum::extract::Path((user, service)): axum::extract::Path<(String, String)>| async move {
                    if user == "alice" && service == "port-zenodo" {
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(json!({"type": "OAuth2Token", "data": {"access_token": "tok-alice", "expiration_date": "2999-01-01 00:00:00"}})),
                        )
                    } else {
                        (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({})))
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn the_zenodo_port_creates_describes_fills_and_publishes_a_deposition_for_its_user() {
    let repo = std::sync::Arc::new(Repository::default());
    let repo_port = repository(repo.clone()).await;
    let registered = std::sync::Arc::default();
    let storage = token_storage(std::sync::Arc::clone(&registered)).await;
    let (api, routes) = (free_port(), free_port());
    let d = Deployment::new(
        &[("zenodo-port", "zenodo")],
        &format!(
            "secrets:\n  api_token: {{ file: api.token }}\n  zenodo_id: {{ file: id.secret }}\n  zenodo_secret: {{ file: secret.secret }}\n\
             server: {{ listen: \"127.0.0.1:{api}\", token: api_token }}\n\
             token_storage: {{ url: \"http://127.0.0.1:{storage}\" }}\n\
             plugins:\n  grants:\n    zenodo:\n      config: {{ repository: \"http://127.0.0.1:{repo_port}\" }}\n      \
             http: {{ allow: [\"http://127.0.0.1:{repo_port}\"], auth: {{ \"http://127.0.0.1:{repo_port}\": {{ oauth_user: port-zenodo }} }} }}\n\
             services:\n  zenodo:\n    http: {{ listen: \"127.0.0.1:{routes}\" }}\n    \
             register: {{ servicename: port-zenodo, authorize_url: \"https://zenodo.example/oauth/authorize\", refresh_url: \"https://zenodo.example/oauth/token\", client_id: zenodo_id, client_secret: zenodo_secret, implements: [metadata] }}\n"
        ),
    );
    for (file, value) in [
        ("api.token", TOKEN),
        ("id.secret", "cid"),
        ("secret.secret", "csecret"),
    ] {
        std::fs::write(d.path(file), value).unwrap();
    }
    let config = d.config.clone();
    let (stop, shutdown) = watch::channel(false);
    let engine = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(
        tokio::task::spawn_blocking(move || crate::harness::get(api, "/readyz"))
            .await
            .unwrap(),
        Some((200, _))
    ) {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registered.lock().unwrap()[0]["servicename"], "port-zenodo");
    let call = |method: &'static str,
                path: String,
                headers: Vec<(String, String)>,
                body: Vec<u8>| async move {
        tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http(routes, method, &path, &headers, &body)
        })
        .await
        .unwrap()
    };
    let json_header = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    let user = "port-zenodo://alice:ignored";
    // Create, then describe with RO-Crate metadata.
    let (status, body) = call(
        "POST",
        "/metadata/project".into(),
        json_header.clone(),
        json!({"userId": user}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["projectId"]
        .as_u64()
        .unwrap();
    let crate_ = json!({"@graph": [
        {"@id": "./", "@type": "Dataset", "name": "Soil samples", "description": "field work",
         "creator": [{"@id": "#ada"}], "keywords": ["soil"]},
        {"@id": "#ada", "@type": "Person", "name": "Ada"}
    ]});
    let (status, body) = call(
        "PATCH",
        format!("/metadata/project/{id}"),
        json_header.clone(),
        json!({"userId": user, "metadata": crate_})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Three files, the second refused by the repository: the others go on.
    let (content_type, form) = multipart(&[
        ("userId", None, user.as_bytes()),
        ("files", Some("a.txt"), b"alpha"),
        ("files", Some("bad.txt"), b"nope"),
        ("files", Some("c.txt"), b"gamma!"),
    ]);
    let (status, body) = call(
        "POST",
        format!("/metadata/project/{id}/files"),
        vec![("Content-Type".to_owned(), content_type)],
        form,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let uploaded: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(uploaded["success"], false, "{uploaded}");
    let outcomes: Vec<(&str, bool)> = uploaded["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["filename"].as_str().unwrap(),
                f["success"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [("a.txt", true), ("bad.txt", false), ("c.txt", true)]
    );
    // RDS's fileStorage interface on the same deposition: list, read,
    // upload into it, delete.
    let folder = |id: u64| format!("/storage/folder?userId=alice&filepath=/{id}/");
    let (status, body) = call("GET", folder(id), vec![], vec![]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"files": [format!("/{id}/a.txt"), format!("/{id}/c.txt")]})
    );
    let (status, body) = call(
        "GET",
        format!("/storage/file?userId=alice&filepath=/{id}/a.txt"),
        vec![],
        vec![],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "alpha"));
    let (content_type, form) = multipart(&[
        ("userId", None, user.as_bytes()),
        ("filepath", None, format!("/{id}/").as_bytes()),
        ("files", Some("d.txt"), b"delta"),
    ]);
    let (status, body) = call(
        "POST",
        "/storage/file".into(),
        vec![("Content-Type".to_owned(), content_type)],
        form,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["success"],
        true
    );
    let (status, body) = call(
        "DELETE",
        "/storage/file".into(),
        json_header.clone(),
        json!({"userId": user, "filepath": format!("/{id}/c.txt")})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = call(
        "GET",
        format!("/storage/file?userId=alice&filepath=/{id}/nope.txt"),
        vec![],
        vec![],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    // Publish.
    let (status, body) = call(
        "PUT",
        format!("/metadata/project/{id}"),
        json_header.clone(),
        json!({"userId": user}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = call(
        "GET",
        "/metadata/project?userId=alice".into(),
        vec![],
        vec![],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let projects: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(projects[0]["projectId"], id, "{projects}");
    // What the repository holds: the mapped metadata, two files, published.
    let deposition = repo.depositions.lock().unwrap()[&id].clone();
    assert_eq!(
        deposition["metadata"],
        json!({"upload_type": "dataset", "title": "Soil samples", "description": "field work",
               "creators": [{"name": "Ada"}], "keywords": ["soil"]})
    );
    let files: Vec<(String, u64)> = deposition["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["filename"].as_str().unwrap().to_owned(),
                f["filesize"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(files, [("a.txt".to_owned(), 5), ("d.txt".to_owned(), 5)]);
    assert_eq!(deposition["submitted"], true);
    // Every repository request carried alice's token, set by the engine.
    let tokens = repo.tokens.lock().unwrap().clone();
    assert!(
        tokens.len() >= 7 && tokens.iter().all(|t| t == "Bearer tok-alice"),
        "{tokens:?}"
    );
    // A user without a token: the port's request fails in the host.
    let (status, body) = call("GET", "/metadata/project?userId=bob".into(), vec![], vec![]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("no token of user `bob`"), "{body}");
    stop.send(true).unwrap();
    engine.await.unwrap().unwrap();
}
