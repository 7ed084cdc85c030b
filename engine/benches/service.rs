//! Services: an HTTP query's round trip and queries per second for a
//! trivial service on a warm instance, in three modes side by side in one
//! run —
//!
//! - **sandboxed**: fx-service (a component) answering `{"op": "echo"}`
//!   through `POST /v1/services/svc/query`, the engine's whole path (the
//!   API's token check, the instance pool, the call, the reply resource,
//!   the NDJSON stream);
//! - **compiled in**: the same answer from a `NativeService` compiled into
//!   the engine, through the same path and the same host code for the
//!   reply (sandboxed ÷ compiled in is what the sandbox costs);
//! - **independent**: an axum handler with no engine code, parsing the same
//!   query and writing the same NDJSON line (compiled in ÷ independent is
//!   what the rest of the engine costs).
//!
//! Each mode is served in this process on a port of its own; `C` client
//! tasks (keep-alive HTTP/1.1 connections, one request at a time each) send
//! queries for `S` seconds. The modes take turns, `R` rounds, in an order
//! that rotates from round to round; the report is the median round.
//!
//! Last, a 10,000-row query answered by fx-service in partial pages of 100
//! rows over the Vantiq protocol (a WebSocket test server in this process
//! sends the query and times its 101 replies).
//!
//! `cargo bench --bench service -- [--seconds S] [--clients 1,16] [--rounds R]
//! [--only sandboxed|compiled-in|independent]`
//! (`just bench-service`). Results: docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/support/guests.rs"]
mod guests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use sandpipe::sandbox::bindings::service::sandpipe::connector::service_types::HostReply as _;
use sandpipe::sandbox::bindings::{Event, Query, Request, Response, ServiceDescription, WitError};
use sandpipe::sandbox::{InvocationState, NativeService};
use sandpipe::service::reply::Reply;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use wasmtime::component::Resource;

const TOKEN: &str = "bench-token";

/// `--name value` from the arguments, parsed, or `default`.
fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// fx-service's `echo` answer, compiled in: the same reply through the
/// same host code (`HostReply::complete` on the call's state).
struct NativeEcho;

impl NativeService for NativeEcho {
    fn describe(&self) -> ServiceDescription {
        ServiceDescription {
            name: "fx-service (compiled in)".into(),
            version: "1.0.0".into(),
            routes: Vec::new(),
        }
    }

    fn on_query<'a>(
        &'a self,
        state: &'a mut InvocationState,
        query: Query,
        reply: Resource<Reply>,
    ) -> BoxFuture<'a, Result<(), WitError>> {
        Box::pin(async move {
            let q: Value = serde_json::from_str(&query.body)
                .map_err(|e| WitError::Invalid(format!("the query is not JSON: {e}")))?;
            state
                .complete(reply, json!({ "echo": q["n"] }).to_string())
                .await
        })
    }

    fn on_publish<'a>(
        &'a self,
        _state: &'a mut InvocationState,
        _event: Event,
    ) -> BoxFuture<'a, Result<(), WitError>> {
        Box::pin(async { Ok(()) })
    }

    fn on_request<'a>(
        &'a self,
        _state: &'a mut InvocationState,
        _request: Request,
    ) -> BoxFuture<'a, Result<Response, WitError>> {
        Box::pin(async {
            Ok(Response {
                status: 404,
                headers: Vec::new(),
                body: Vec::new(),
            })
        })
    }
}

/// A running engine serving service `svc` (sandboxed or compiled in) on
/// the returned address, until the sender says stop.
async fn engine(native: bool, dir: &std::path::Path) -> (SocketAddr, watch::Sender<bool>) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    if !native {
        std::fs::copy(guests::component("fx-service"), plugins.join("svc.wasm")).unwrap();
    }
    std::fs::write(dir.join("api.token"), TOKEN).unwrap();
    let config = dir.join("sandpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{ type: dir, path: spool }}\n\
             sandbox: {{ cache_dir: \"{}\" }}\n\
             secrets:\n  api_token: {{ file: api.token }}\n\
             plugins:\n  grants:\n    svc: {{}}\n\
             services:\n  svc: {{ instances: 2 }}\n",
            guests::guest_target_dir()
                .join("bench-code-cache")
                .display()
        ),
    )
    .unwrap();
    let config = sandpipe::config::Config::load(&config).unwrap();
    let natives = sandpipe::app::Natives {
        services: if native {
            vec![(
                "svc".to_owned(),
                Arc::new(NativeEcho) as Arc<dyn NativeService>,
            )]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let assembled = sandpipe::app::assemble_native(config, natives)
        .await
        .unwrap();
    assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
    let (services, problems) = assembled.service_connectors();
    assert!(problems.is_empty(), "{problems:?}");
    let services: BTreeMap<String, Arc<sandpipe::service::Service>> = services
        .into_iter()
        .map(|s| (s.name().to_owned(), Arc::new(s)))
        .collect();
    for service in services.values() {
        service.start().await.unwrap();
    }
    let token = assembled.services.secrets.get("api_token").cloned();
    let (stop, shutdown) = watch::channel(false);
    let api = sandpipe::server::Api {
        services: Arc::new(services),
        token,
        ..Default::default()
    };
    let addr = sandpipe::server::serve(
        "127.0.0.1:0".parse().unwrap(),
        sandpipe::server::Readiness::default(),
        api,
        shutdown,
    )
    .await
    .unwrap();
    // The engine lives as long as the process.
    Box::leak(Box::new(assembled));
    (addr, stop)
}

/// The independent handler: parse the query, write the same NDJSON line.
async fn independent() -> SocketAddr {
    async fn query(
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let authorized = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {TOKEN}"));
        if !authorized {
            return axum::http::StatusCode::UNAUTHORIZED.into_response();
        }
        let Ok(q) = serde_json::from_slice::<Value>(&body) else {
            return axum::http::StatusCode::BAD_REQUEST.into_response();
        };
        let mut line = json!({ "status": 200, "body": { "echo": q["n"] } }).to_string();
        line.push('\n');
        (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            line,
        )
            .into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/v1/services/svc/query", axum::routing::post(query));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// `clients` connections sending echo queries to `addr` for `seconds`:
/// queries per second and the latencies.
async fn load(addr: SocketAddr, clients: usize, seconds: f64) -> (f64, Vec<Duration>) {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            let mut n: u64 = 0;
            while Instant::now() < until {
                n += 1;
                let body = format!("{{\"op\":\"echo\",\"n\":{}}}", n * 1000 + client as u64);
                let request = hyper::Request::post("/v1/services/svc/query")
                    .header("host", "127.0.0.1")
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("content-type", "application/json")
                    .body(Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let started = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                latencies.push(started.elapsed());
                let line: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(line["body"]["echo"], n * 1000 + client as u64, "{line}");
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64().max(seconds);
    all.sort();
    (all.len() as f64 / elapsed, all)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One round of one mode: (qps, p50, p99).
type Round = (f64, Duration, Duration);

fn median(rounds: &mut [Round]) -> Round {
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    rounds[rounds.len() / 2]
}

/// A 10,000-row query answered in partial pages of 100 over the Vantiq
/// protocol: the time from the query frame to the final reply.
async fn vantiq_rows(rows: u64) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (result_tx, mut result_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
        let _validate = socket.next().await;
        socket
            .send(Message::Text(json!({"status": 200}).to_string().into()))
            .await
            .unwrap();
        let _connect = socket.next().await;
        socket
            .send(Message::Text(
                json!({"op": "configureExtension", "object": {"config": {}}})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        // Warm: one small query first.
        for (address, n) in [("warm", 100), ("timed", rows)] {
            let started = Instant::now();
            socket
                .send(Message::Text(
                    json!({"op": "query", "object": {"op": "rows", "n": n, "page": 100}, "messageHeaders": {"REPLY_ADDR_HEADER": address}})
                        .to_string()
                        .into(),
                ))
                .await
                .unwrap();
            let mut got = 0;
            while let Some(Ok(frame)) = socket.next().await {
                let Message::Text(text) = frame else { continue };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["headers"]["X-Reply-Address"] != address {
                    continue;
                }
                if reply["status"] == 100 {
                    got += reply["body"].as_array().unwrap().len() as u64;
                } else {
                    assert_eq!(reply["status"], 204, "{reply}");
                    break;
                }
            }
            assert_eq!(got, n);
            if address == "timed" {
                result_tx.send(started.elapsed()).await.unwrap();
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(guests::component("fx-service"), plugins.join("svc.wasm")).unwrap();
    std::fs::write(dir.path().join("vantiq.token"), "t").unwrap();
    let config = dir.path().join("sandpipe.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{ type: dir, path: spool }}\n\
             sandbox: {{ cache_dir: \"{}\" }}\n\
             secrets:\n  vt: {{ file: vantiq.token }}\n\
             plugins:\n  grants:\n    svc: {{ limits: {{ timeout: 60s }} }}\n\
             services:\n  svc:\n    vantiq: {{ url: \"http://127.0.0.1:{port}\", token: vt, sources: [rows] }}\n",
            guests::guest_target_dir().join("bench-code-cache").display()
        ),
    )
    .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(async move { sandpipe::app::run(&config, false, shutdown).await });
    let took = result_rx.recv().await.unwrap();
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
    took
}

fn main() {
    let seconds: f64 = arg("--seconds", 5.0);
    let rounds: usize = arg("--rounds", 3);
    let clients: String = arg("--clients", "1,16".to_owned());
    let rows: u64 = arg("--rows", 10_000);
    // `--only MODE`: that mode alone (for a profile), no Vantiq query.
    let only: String = arg("--only", String::new());
    let clients: Vec<usize> = clients.split(',').filter_map(|c| c.parse().ok()).collect();
    guests::guests();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sandboxed, _s) = engine(false, dirs.0.path()).await;
        let (compiled, _c) = engine(true, dirs.1.path()).await;
        let independent = independent().await;
        let all = [
            ("sandboxed", sandboxed),
            ("compiled in", compiled),
            ("independent", independent),
        ];
        if !only.is_empty() {
            let (name, addr) = all
                .into_iter()
                .find(|(name, _)| name.replace(' ', "-") == only)
                .unwrap_or_else(|| panic!("--only: one of sandboxed, compiled-in, independent"));
            for &c in &clients {
                let (qps, latencies) = load(addr, c, seconds).await;
                println!(
                    "{name}, {c} clients: {qps:.0} queries/s, p50 {:.0} µs",
                    percentile(&latencies, 0.5).as_secs_f64() * 1e6
                );
            }
            return;
        }
        let modes = all;
        // Warm every path (connections, the code cache, the allocator).
        for (_, addr) in modes {
            load(addr, 2, 0.5).await;
        }
        println!(
            "services: echo query over HTTP, {seconds} s per round, {rounds} rounds (median round)"
        );
        println!("| clients | mode | queries/s | p50 | p99 | ÷ independent | ÷ compiled in |");
        println!("|---|---|---|---|---|---|---|");
        for &c in &clients {
            let mut results: BTreeMap<&str, Vec<Round>> = BTreeMap::new();
            for round in 0..rounds {
                for k in 0..modes.len() {
                    let (name, addr) = modes[(round + k) % modes.len()];
                    let (qps, latencies) = load(addr, c, seconds).await;
                    results.entry(name).or_default().push((
                        qps,
                        percentile(&latencies, 0.5),
                        percentile(&latencies, 0.99),
                    ));
                }
            }
            let medians: BTreeMap<&str, Round> = results
                .iter_mut()
                .map(|(name, rounds)| (*name, median(rounds)))
                .collect();
            let independent = medians["independent"].0;
            let compiled = medians["compiled in"].0;
            for (name, _) in modes {
                let (qps, p50, p99) = medians[name];
                println!(
                    "| {c} | {name} | {qps:.0} | {:.0} µs | {:.0} µs | {:.2} | {:.2} |",
                    p50.as_secs_f64() * 1e6,
                    p99.as_secs_f64() * 1e6,
                    qps / independent,
                    qps / compiled,
                );
            }
            let overhead = medians["sandboxed"].1.as_secs_f64() - medians["compiled in"].1.as_secs_f64();
            println!(
                "clients {c}: p50 overhead of the sandbox (sandboxed − compiled in): {:.0} µs",
                overhead * 1e6
            );
        }
        let took = vantiq_rows(rows).await;
        println!(
            "Vantiq protocol: a {rows}-row query in {} partial pages of 100: {:.1} ms ({:.0} rows/s)",
            rows / 100,
            took.as_secs_f64() * 1e3,
            rows as f64 / took.as_secs_f64()
        );
    });
}
