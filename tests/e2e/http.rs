//! The `http` capability end to end: fx-http (a Rust guest on the SDK's
//! `http` module) against a test HTTP server this file starts on
//! 127.0.0.1. A plugin enriches messages from an allowed service; every
//! way around the allow-list and the quotas ends as a typed failure of that
//! plugin on that message, recorded in the status log and the metrics,
//! with the server never reached where it must not be, and the engine
//! ready throughout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::harness::Deployment;
use crate::hostile::{metric, serve, served};

/// Requests the test server received, by path.
#[derive(Clone, Default)]
pub struct Hits(Arc<Mutex<BTreeMap<String, u64>>>);

impl Hits {
    /// Requests received for `path`.
    pub fn get(&self, path: &str) -> u64 {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn count(&self, uri: &Uri) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(uri.path().to_owned())
            .or_default() += 1;
    }
}

/// A test HTTP server on 127.0.0.1: its port and what it received. It
/// serves until the test's runtime ends.
///
/// | route | answer |
/// |---|---|
/// | `GET /item` | `{"name": "widget", "price": 3}` |
/// | `GET /headers` | the request's `host` header, as text |
/// | `GET /redirect` | 302 to `http://169.254.169.254/latest/meta-data` |
/// | `GET /big` | 1 GiB, made as it is sent, 64 KiB at a time |
/// | `GET /slow` | one byte a second, for a minute |
/// | `POST /length` | the length of the body it read, as text |
/// | `GET /auth` | 200 `ok` if `Authorization` is `Bearer <secret>`, else 401 `no` |
/// | `GET /secure/{id}` | with that header, 200 `{"item": id, "stock": 12}`; else 401 `no` |
pub async fn server() -> (u16, Hits) {
    server_expecting("no secret here").await
}

/// [`server`], whose `/auth` expects `secret`.
pub async fn server_expecting(secret: &str) -> (u16, Hits) {
    let hits = Hits::default();
    let expected = format!("Bearer {secret}");
    let secure = expected.clone();
    let app = Router::new()
        .route(
            "/secure/{id}",
            get(
                move |headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| async move {
                    if headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok())
                        == Some(secure.as_str())
                    {
                        (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/json")],
                            serde_json::json!({"item": id, "stock": 12}).to_string(),
                        )
                            .into_response()
                    } else {
                        (StatusCode::UNAUTHORIZED, "no").into_response()
                    }
                },
            ),
        )
        .route(
            "/auth",
            get(move |headers: HeaderMap| async move {
                if headers
                    .get(header::AUTHORIZATION)
                    .and_then(|h| h.to_str().ok())
                    == Some(expected.as_str())
                {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::UNAUTHORIZED, "no")
                }
            }),
        )
        .route(
            "/item",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"name":"widget","price":3}"#,
                )
            }),
        )
        .route(
            "/headers",
            get(|headers: HeaderMap| async move {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("none")
                    .to_owned()
            }),
        )
        .route(
            "/redirect",
            get(|| async {
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header(header::LOCATION, "http://169.254.169.254/latest/meta-data")
                    .body(Body::empty())
                    .unwrap()
            }),
        )
        .route(
            "/big",
            get(|| async {
                let chunk = Bytes::from(vec![b'b'; 64 << 10]);
                let stream = futures::stream::iter(
                    (0..(1u64 << 30) / (64 << 10))
                        .map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                Body::from_stream(stream).into_response()
            }),
        )
        .route(
            "/slow",
            get(|| async {
                let stream = futures::stream::unfold(0u32, |n| async move {
                    if n >= 60 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b"s")), n + 1))
                });
                Body::from_stream(stream).into_response()
            }),
        )
        .route(
            "/length",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .layer(axum::middleware::from_fn_with_state(
            hits.clone(),
            |State(hits): State<Hits>,
             request: axum::extract::Request,
             next: axum::middleware::Next| async move {
                hits.count(request.uri());
                next.run(request).await
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, hits)
}

/// Put a `test/http` message asking for `fields` in the spool (a
/// `data_type` among them replaces the type).
fn request(d: &Deployment, id: &str, fields: serde_json::Value) {
    crate::hostile::put(d, id, "test/http", fields);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_enriches_messages_from_an_allowed_service() {
    let (http_port, hits) = server().await;
    let (d, port) = served(
        &[("fx-http", "enrich")],
        &format!(
            "outputs:\n  out: {{ type: dir, path: out }}\nplugins:\n  grants:\n    enrich:\n      \
             emit: [out]\n      http: {{ allow: [\"http://127.0.0.1:{http_port}\"] }}\n"
        ),
    );
    for i in 0..3 {
        request(
            &d,
            &format!("m-enrich-{i}"),
            serde_json::json!({"action": "enrich", "url": format!("http://127.0.0.1:{http_port}/item")}),
        );
    }
    request(
        &d,
        "m-post",
        serde_json::json!({"action": "post", "url": format!("http://127.0.0.1:{http_port}/length"), "bytes": 100_000}),
    );
    request(
        &d,
        "m-host",
        serde_json::json!({"action": "get", "url": format!("http://127.0.0.1:{http_port}/headers")}),
    );
    // User info in the URL does not reach `Host`: the engine sets it from
    // the host it checked.
    request(
        &d,
        "m-userinfo",
        serde_json::json!({"action": "get", "url": format!("http://evil.example@127.0.0.1:{http_port}/headers")}),
    );
    let served = serve(&d, port, 6).await;
    assert_eq!(served.summary.done, 6, "{}", served.summary);
    assert_eq!(hits.get("/item"), 3);

    let emitted = d.files("out");
    assert_eq!(emitted.len(), 3, "{emitted:?}");
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("out").join(&emitted[0])).unwrap()).unwrap();
    let text = first["payload"].as_str().unwrap().to_owned();
    assert!(
        text.contains("widget") && text.contains("m-enrich-"),
        "{text}"
    );

    let post = d.last("m-post", "enrich").await;
    assert_eq!(post.info, "status=200 body=100000");
    // The engine sets `Host` from the URL.
    let host = d.last("m-host", "enrich").await;
    assert_eq!(
        host.info,
        format!("status=200 bytes=15 body=127.0.0.1:{http_port}")
    );

    assert_eq!(
        d.last("m-userinfo", "enrich").await.info,
        format!("status=200 bytes=15 body=127.0.0.1:{http_port}")
    );

    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_http_requests_total{plugin="enrich",host="127.0.0.1",status="2xx"}"#
        ),
        6.0,
        "{m}"
    );
    assert!(
        metric(
            m,
            r#"sandpipe_http_sent_bytes_total{plugin="enrich",host="127.0.0.1"}"#
        ) >= 100_000.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_way_around_the_allow_list_and_the_quotas_fails_typed() {
    let (http_port, hits) = server().await;
    // A second server that the list names only by a name resolving to
    // loopback: it must never be reached.
    let (named_port, named_hits) = server().await;
    let (d, port) = served(
        &[("fx-http", "web"), ("fx-http", "nogrant")],
        &format!(
            "plugins:\n  grants:\n    web:\n      mime: [test/http]\n      http: {{ allow: \
             [\"http://127.0.0.1:{http_port}\", \"http://localhost:{named_port}\", \"http://*:80\"] \
             }}\n      limits: {{ timeout: 3s, http_requests: 20, http_response_bytes: 1MiB }}\n    \
             nogrant: {{ mime: [test/nogrant] }}\n"
        ),
    );
    let at = |path: &str| format!("http://127.0.0.1:{http_port}{path}");
    let cases = [
        // A host outside the list.
        (
            "m-outside",
            serde_json::json!({"action": "get", "url": "http://example.org:8080/item"}),
        ),
        // An address outside the list (`*` names never match an address).
        (
            "m-metadata",
            serde_json::json!({"action": "get", "url": "http://169.254.169.254/latest/meta-data"}),
        ),
        // An allowed name that resolves to loopback only.
        (
            "m-rebind",
            serde_json::json!({"action": "get", "url": format!("http://localhost:{named_port}/item")}),
        ),
        // A redirect is not followed: the guest sees the 302.
        (
            "m-redirect",
            serde_json::json!({"action": "get", "url": at("/redirect")}),
        ),
        // A forged Host header is refused before anything is sent.
        (
            "m-host",
            serde_json::json!({"action": "get", "url": at("/headers"), "headers": {"host": "evil.example"}}),
        ),
        // 1 GiB: bounded by the response quota, streamed, never held.
        (
            "m-big",
            serde_json::json!({"action": "stream", "url": at("/big")}),
        ),
        // One byte a second: ends at the deadline.
        (
            "m-slow",
            serde_json::json!({"action": "stream", "url": at("/slow")}),
        ),
        // TRACE would echo a bound secret back.
        (
            "m-trace",
            serde_json::json!({"action": "request", "method": "TRACE", "url": at("/item")}),
        ),
        // 100,000 requests: the request quota.
        (
            "m-many",
            serde_json::json!({"action": "get-many", "url": at("/item"), "count": 100_000}),
        ),
    ];
    for (id, fields) in &cases {
        request(&d, id, fields.clone());
    }
    // No `http` grant at all.
    request(
        &d,
        "m-nogrant",
        serde_json::json!({"data_type": "test/nogrant", "action": "get", "url": at("/item")}),
    );
    let started = Instant::now();
    let served = serve(&d, port, cases.len() + 1).await;
    assert_eq!(
        served.ready,
        Some((200, "ready\n".to_owned())),
        "the engine was not ready after the attacks"
    );
    // The slow server did not hold its message much past the 3 s deadline.
    assert!(started.elapsed() < Duration::from_secs(30));

    let outside = d.last("m-outside", "web").await;
    assert_eq!(outside.status, "failed");
    assert!(
        outside.info.starts_with("denied-call: access-denied: the engine denied the request to http://example.org:8080/item")
            && outside.info.contains("[denied: plugin `web` sent a request to http://example.org:8080, which its `http.allow` list does not allow"),
        "{}",
        outside.info
    );
    let metadata = d.last("m-metadata", "web").await;
    assert!(
        metadata
            .info
            .contains("[denied: plugin `web` sent a request to http://169.254.169.254:80"),
        "{}",
        metadata.info
    );
    let rebind = d.last("m-rebind", "web").await;
    assert!(
        rebind.info.starts_with("denied-call: access-denied")
            && rebind
                .info
                .contains("which resolves to 127.0.0.1 only: a loopback, private, link-local"),
        "{}",
        rebind.info
    );
    let redirect = d.last("m-redirect", "web").await;
    assert_eq!(redirect.status, "skipped");
    assert!(
        redirect.info.starts_with("status=302 "),
        "{}",
        redirect.info
    );
    let host = d.last("m-host", "web").await;
    assert!(
        host.info.starts_with("plugin-error: invalid: request to")
            && host.info.contains("a header was refused"),
        "{}",
        host.info
    );
    let big = d.last("m-big", "web").await;
    assert!(
        big.info.starts_with(
            "plugin-error: limit-exceeded: the response body is over the plugin's quota"
        ) && big.info.contains("limits.http_response_bytes"),
        "{}",
        big.info
    );
    // The body's wait ends at the deadline, and so does the invocation.
    let slow = d.last("m-slow", "web").await;
    assert_eq!(
        slow.info, "deadline: plugin exceeded its deadline of 3s",
        "{}",
        slow.info
    );
    let trace = d.last("m-trace", "web").await;
    assert!(
        trace
            .info
            .contains("[denied: plugin `web` sent a TRACE request, which the engine does not send"),
        "{}",
        trace.info
    );
    let many = d.last("m-many", "web").await;
    assert!(
        many.info.starts_with(
            "plugin-error: limit-exceeded: more than 20 HTTP requests in one invocation (limits.http_requests)"
        ),
        "{}",
        many.info
    );
    let nogrant = d.last("m-nogrant", "nogrant").await;
    assert!(
        nogrant.info.contains(
            "[denied: plugin `nogrant` called http.outgoing-handler.handle but has no `http` grant"
        ),
        "{}",
        nogrant.info
    );

    // What must not reach the server did not; what was allowed did, and
    // no more than the quota.
    assert_eq!(hits.get("/headers"), 0);
    assert_eq!(named_hits.get("/item"), 0);
    assert_eq!(hits.get("/redirect"), 1);
    assert_eq!(hits.get("/item"), 20);
    assert_eq!(hits.get("/big"), 1);

    let m = &served.metrics;
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="web",limit="http_requests"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            r#"sandpipe_limit_exceeded_total{plugin="web",limit="http_response_bytes"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(metric(m, r#"sandpipe_denied_calls_total{plugin="web"}"#) >= 3.0);
    assert_eq!(
        metric(
            m,
            r#"sandpipe_http_requests_total{plugin="web",host="127.0.0.1",status="3xx"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_reaches_its_destination_and_never_the_plugin() {
    let (secret, masked) = crate::leaks::secret();
    let (http_port, hits) = server_expecting(&secret).await;
    let origin = format!("http://127.0.0.1:{http_port}");
    let (d, port) = served(
        &[
            ("fx-hostile", "leaky"),
            ("fx-http", "web"),
            ("fx-http", "other"),
        ],
        &format!(
            "secrets:\n  api_token: {{ file: token.txt }}\nplugins:\n  grants:\n    leaky:\n      \
             mime: [test/hostile]\n      http: {{ allow: [\"{origin}\"], auth: {{ \"{origin}\": {{ \
             bearer: api_token }} }} }}\n    web:\n      mime: [test/http]\n      http: {{ allow: \
             [\"{origin}\"], auth: {{ \"{origin}\": {{ bearer: api_token }} }} }}\n      config: {{ \
             where: \"{origin}\" }}\n    other:\n      mime: [test/other]\n      http: {{ allow: \
             [\"{origin}\"] }}\n"
        ),
    );
    // A Kubernetes secret volume's file: the value and a newline.
    std::fs::write(d.path("token.txt"), format!("{secret}\n")).unwrap();
    let auth = format!("{origin}/auth");
    // Requests that carried the secret, then a scan of the same instance's
    // whole memory for it.
    crate::hostile::hostile(
        &d,
        "m-scan",
        serde_json::json!({"action": "http-scan", "url": auth, "count": 20, "masked": masked}),
    );
    // A header the plugin sets is replaced by the bound one.
    request(
        &d,
        "m-guess",
        serde_json::json!({"action": "get", "url": auth, "headers": {"authorization": "Bearer guessed"}}),
    );
    // Without a binding, no credentials.
    request(
        &d,
        "m-other",
        serde_json::json!({"data_type": "test/other", "action": "get", "url": auth}),
    );
    let served = serve(&d, port, 3).await;
    assert_eq!(served.summary.dead, 0, "{}", served.summary);

    let scan = d.last("m-scan", "leaky").await;
    assert!(
        scan.info
            .starts_with(&format!("statuses {:?}; clean: scanned ", vec![200; 20])),
        "{}",
        scan.info
    );
    assert_eq!(
        d.last("m-guess", "web").await.info,
        "status=200 bytes=2 body=ok"
    );
    assert_eq!(
        d.last("m-other", "other").await.info,
        "status=401 bytes=2 body=no"
    );
    assert_eq!(hits.get("/auth"), 22);

    // Nothing the engine shows holds the secret.
    for id in ["m-scan", "m-guess", "m-other"] {
        for row in d.rows(id).await {
            assert!(!row.info.contains(&secret), "{}", row.info);
        }
    }
    assert!(!served.metrics.contains(&secret));
    assert!(!served.ready.unwrap().1.contains(&secret));
}

#[test]
fn check_warns_about_config_values_from_the_environment() {
    let d = Deployment::new(
        &[("fx-http", "web")],
        "plugins:\n  grants:\n    web:\n      config: { token: \"${HOME}\", url: \"https://example.org\" }\n",
    );
    let out = d.cli(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: plugins.grants.web.config.token comes from an ${ENV} reference")
            && !text.contains("config.url"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_enrich_connector_enriches_messages_from_an_authenticated_api() {
    let (secret, _) = crate::leaks::secret();
    let (http_port, hits) = server_expecting(&secret).await;
    let origin = format!("http://127.0.0.1:{http_port}");
    let grant = |name: &str, auth: bool| {
        let auth = if auth {
            format!(", auth: {{ \"{origin}\": {{ bearer: api_token }} }}")
        } else {
            String::new()
        };
        format!(
            "    {name}:\n      mime: [application/json]\n      emit: [enriched]\n      http: {{ allow: \
             [\"{origin}\"]{auth} }}\n      config: {{ url: \"{origin}/secure/{{id}}\", output: \
             enriched }}\n"
        )
    };
    let (d, port) = served(
        &[("http-enrich", "enrich"), ("http-enrich", "anonymous")],
        &format!(
            "outputs:\n  enriched: {{ type: dir, path: out }}\nsecrets:\n  api_token: {{ file: \
             token }}\nplugins:\n  grants:\n{}{}",
            grant("enrich", true),
            grant("anonymous", false)
        ),
    );
    std::fs::write(d.path("token"), &secret).unwrap();
    d.message(
        "m-7.json",
        r#"{"uuid_ref": "item 7", "data_type": "application/json"}"#,
    );
    let served = serve(&d, port, 1).await;
    assert_eq!(served.summary.dead, 1, "{}", served.summary);
    let enriched = d.last("item 7", "enrich").await;
    assert_eq!(enriched.status, "done", "{}", enriched.info);
    let emitted = d.files("out");
    assert_eq!(emitted.len(), 1, "{emitted:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("out").join(&emitted[0])).unwrap()).unwrap();
    let payload: serde_json::Value =
        serde_json::from_str(doc["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"id": "item 7", "found": {"item": "item 7", "stock": 12}})
    );
    // Without the binding the API refuses, and the connector dead-letters.
    let anonymous = d.last("item 7", "anonymous").await;
    assert_eq!(anonymous.status, "dead", "{}", anonymous.info);
    assert!(
        anonymous
            .info
            .ends_with(&format!("{origin}/secure/item%207 answered 401")),
        "{}",
        anonymous.info
    );
    assert_eq!(hits.get("/secure/item%207"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_instance_that_keeps_a_response_is_not_reused() {
    let (http_port, _hits) = server().await;
    let (d, port) = served(
        &[("fx-http", "keeper")],
        &format!(
            "pipeline: {{ concurrency: 1 }}\nplugins:\n  grants:\n    keeper:\n      http: {{ allow: \
             [\"http://127.0.0.1:{http_port}\"] }}\n      reuse: {{ instances: 1, messages: 100 }}\n"
        ),
    );
    let item = format!("http://127.0.0.1:{http_port}/item");
    // One message at a time, in order (the spool is read sorted): reused
    // as usual while nothing is left open, but a call that keeps a
    // response (its connection, the plugin's turn) ends its instance.
    request(&d, "m-1", serde_json::json!({"action": "calls"}));
    request(&d, "m-2", serde_json::json!({"action": "calls"}));
    request(
        &d,
        "m-3",
        serde_json::json!({"action": "keep", "url": item}),
    );
    request(&d, "m-4", serde_json::json!({"action": "calls"}));
    let _ = serve(&d, port, 4).await;
    assert_eq!(d.last("m-2", "keeper").await.info, "calls 2");
    assert_eq!(d.last("m-3", "keeper").await.status, "done");
    // The next call is served by a new instance.
    assert_eq!(d.last("m-4", "keeper").await.info, "calls 1");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_is_verified_against_the_webpki_roots_and_tls_ca_file() {
    use crate::harness::tls::{TestCa, TlsProxy};
    let (http_port, hits) = server().await;
    let ca = TestCa::new();
    let proxy = TlsProxy::start(http_port, &ca.server(&["127.0.0.1"]), false).await;
    let url = format!("https://127.0.0.1:{}/item", proxy.port);
    let grant = format!(
        "plugins:\n  grants:\n    web:\n      http: {{ allow: [\"https://127.0.0.1:{}\"] }}\n",
        proxy.port
    );
    // The test CA in tls.ca_file: the server's certificate is trusted.
    let (trusted, port) = served(&[("fx-http", "web")], &grant);
    let ca_file = ca.write(trusted.dir.path());
    std::fs::write(
        &trusted.config,
        format!(
            "{}tls: {{ ca_file: \"{}\" }}\n",
            std::fs::read_to_string(&trusted.config).unwrap(),
            ca_file.display()
        ),
    )
    .unwrap();
    request(
        &trusted,
        "m-tls",
        serde_json::json!({"action": "get", "url": url}),
    );
    // Five requests in a row: one connection, kept alive between them.
    request(
        &trusted,
        "m-tls-many",
        serde_json::json!({"action": "get-many", "url": url, "count": 5}),
    );
    let _ = serve(&trusted, port, 2).await;
    let row = trusted.last("m-tls", "web").await;
    assert!(row.info.starts_with("status=200 bytes=27 "), "{}", row.info);
    assert_eq!(trusted.last("m-tls-many", "web").await.info, "sent 5");
    assert_eq!(hits.get("/item"), 6);
    assert!(
        (1..=2).contains(&proxy.handshakes()),
        "{} TLS handshakes for 6 requests",
        proxy.handshakes()
    );

    // Without it, the webpki roots do not know the test CA: no request
    // reaches the server.
    let (untrusted, port) = served(&[("fx-http", "web")], &grant);
    request(
        &untrusted,
        "m-tls",
        serde_json::json!({"action": "get", "url": url}),
    );
    let _ = serve(&untrusted, port, 1).await;
    let row = untrusted.last("m-tls", "web").await;
    assert_eq!(row.status, "failed", "{}", row.info);
    assert!(
        row.info
            .starts_with("plugin-error: unavailable: request to")
            && row.info.contains("Tls"),
        "{}",
        row.info
    );
    assert_eq!(hits.get("/item"), 6);
}
