//! The small HTTP server: `/healthz` (alive), `/readyz` (listener
//! connected, database reachable, plugins loaded; 503 with the reasons
//! otherwise), `/metrics` (Prometheus text format), and the sources' API
//! (`/v1/sources`: list, jobs, start a sync, cancel; docs/sources.md) and
//! the services' (`/v1/services`: list, query, publish, notifications;
//! docs/services.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::sync::{JobKind, JobRecord, Source, Trigger};

/// The sources the API serves, by name.
pub type Sources = Arc<BTreeMap<String, Arc<Source>>>;

/// The services the API serves, by name.
pub type ServiceMap = Arc<BTreeMap<String, Arc<crate::service::Service>>>;

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    ready: Readiness,
    sources: Sources,
    services: ServiceMap,
    /// The bearer token `/v1/sources/...` requests must carry
    /// (`server.token`); none: those requests are refused.
    token: Option<crate::secrets::Secret>,
    /// The jobs started over HTTP.
    jobs: Jobs,
    /// Cancels jobs started here when the server stops.
    shutdown: watch::Receiver<bool>,
}

/// Jobs started over HTTP, still running or not yet awaited.
pub type Jobs = Arc<Mutex<Vec<tokio::task::JoinHandle<anyhow::Result<Option<JobRecord>>>>>>;

/// The sources' API: the engine, its sources and who may use it.
#[derive(Clone, Default)]
pub struct Api {
    /// The sources, by name.
    pub sources: Sources,
    /// The services, by name.
    pub services: ServiceMap,
    /// `server.token`'s secret.
    pub token: Option<crate::secrets::Secret>,
    /// The jobs it starts (`app::run` awaits them when it stops).
    pub jobs: Jobs,
}

/// `403` unless the request carries the configured bearer token
/// (compared in constant time).
fn authorized(state: &AppState, headers: &axum::http::HeaderMap) -> Result<(), Reply> {
    let Some(token) = &state.token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the API (/v1/sources, /v1/services) needs `server.token` (the name of a secret under `secrets:`); requests then carry `Authorization: Bearer <its value>`".into(),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same_secret(given, token.expose()) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer` token is required (server.token)".into(),
        ))
    }
}

/// Whether `given` is `want`, compared in constant time (for equal
/// lengths).
pub fn same_secret(given: &str, want: &str) -> bool {
    given.len() == want.len()
        && given
            .as_bytes()
            .iter()
            .zip(want.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// What `/readyz` reports: each component's problem, if any.
#[derive(Clone, Default)]
pub struct Readiness {
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Readiness {
    /// Mark `component` not ready, with the reason.
    pub fn not_ready(&self, component: &'static str, reason: impl Into<String>) {
        if let Ok(mut p) = self.problems.lock() {
            p.insert(component, reason.into());
        }
    }

    /// Mark `component` ready.
    pub fn ready(&self, component: &'static str) {
        if let Ok(mut p) = self.problems.lock() {
            p.remove(component);
        }
    }

    /// The current problems, one per line; empty when ready.
    pub fn report(&self) -> Vec<String> {
        self.problems
            .lock()
            .map(|p| p.iter().map(|(k, v)| format!("{k}: {v}")).collect())
            .unwrap_or_default()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let problems = state.ready.report();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        )
    }
}

async fn metrics_text() -> String {
    crate::metrics::handle().render()
}

/// A job record as JSON.
pub fn job_json(job: &JobRecord) -> Value {
    let c = &job.counts;
    json!({
        "id": job.id,
        "source": job.source,
        "kind": job.kind.as_str(),
        "trigger": job.trigger.as_str(),
        "state": job.state.as_str(),
        "sync_cursor": job.sync_cursor,
        "counts": {
            "indexed": c.indexed, "updated": c.updated, "deleted": c.deleted,
            "skipped": c.skipped, "dropped": c.dropped, "errors": c.errors,
        },
        "started_ms": job.started_ms,
        "duration_ms": job.duration.as_millis() as u64,
        "error": job.error,
    })
}

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, message: String) -> Reply {
    (status, Json(json!({ "error": message })))
}

fn source(state: &AppState, name: &str) -> Result<Arc<Source>, Reply> {
    state.sources.get(name).cloned().ok_or_else(|| {
        let known: Vec<&String> = state.sources.keys().collect();
        error(
            StatusCode::NOT_FOUND,
            format!("no source `{name}` (sources: {known:?})"),
        )
    })
}

fn internal(e: anyhow::Error) -> Reply {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

/// `GET /v1/sources`: each source, its component, documents, last jobs
/// and next scheduled runs.
async fn list_sources(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, Reply> {
    authorized(&state, &headers)?;
    let mut out = Vec::new();
    for (name, source) in state.sources.iter() {
        let sink = source.prepared().await.map_err(internal)?;

        let jobs = sink.jobs(name, 3).await.map_err(internal)?;
        let next: Vec<Value> = source
            .next_runs()
            .await
            .map_err(internal)?
            .into_iter()
            .map(|(kind, schedule, at)| {
                json!({ "kind": kind.as_str(), "schedule": schedule, "at": at.to_rfc3339() })
            })
            .collect();
        let (component, version) = source.component();
        out.push(json!({
            "name": name,
            "component": component,
            "version": version,
            "sink": sink.describe(),
            "documents": sink.len().await.map_err(internal)?,
            "last_jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
            "next_runs": next,
        }));
    }
    Ok(Json(Value::Array(out)))
}

#[derive(serde::Deserialize)]
struct JobsQuery {
    limit: Option<u32>,
}

/// `GET /v1/sources/{name}/jobs?limit=N`: its last jobs, newest first.
async fn list_jobs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<JobsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, Reply> {
    authorized(&state, &headers)?;
    let source = source(&state, &name)?;
    let jobs = source
        .prepared()
        .await
        .map_err(internal)?
        .jobs(&name, query.limit.unwrap_or(20).min(1000))
        .await
        .map_err(internal)?;
    Ok(Json(Value::Array(jobs.iter().map(job_json).collect())))
}

#[derive(serde::Deserialize)]
struct SyncQuery {
    kind: Option<String>,
}

/// `POST /v1/sources/{name}/sync?kind=full|incremental`: start a job;
/// 202 with its id once it is recorded, 409 when one is running.
async fn start_sync(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<SyncQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Reply, Reply> {
    authorized(&state, &headers)?;
    let source = source(&state, &name)?;
    let kind = match query.kind.as_deref() {
        None | Some("full") => JobKind::Full,
        Some("incremental") => JobKind::Incremental,
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("kind `{other}` is neither `full` nor `incremental`"),
            ));
        }
    };
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let cancel = state.shutdown.clone();
    let job = tokio::spawn(async move {
        source
            .sync_with(
                kind,
                Trigger::OnDemand,
                None,
                cancel,
                Some(started_tx),
                &mut |_| {},
            )
            .await
    });
    match started.await {
        Ok(id) => {
            // Awaited when the engine stops (it cancels the job first).
            if let Ok(mut jobs) = state.jobs.lock() {
                jobs.retain(|j| !j.is_finished());
                jobs.push(job);
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(
                    json!({ "job": id, "source": name, "kind": kind.as_str(), "state": "in_progress" }),
                ),
            ))
        }
        // The job ended before it was recorded: the lock, or the sink.
        Err(_) => match job.await {
            Ok(Err(e)) if format!("{e:#}").contains("another sync") => {
                Err(error(StatusCode::CONFLICT, format!("{e:#}")))
            }
            Ok(Err(e)) => Err(internal(e)),
            Ok(Ok(_)) | Err(_) => Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the job ended before it started".into(),
            )),
        },
    }
}

/// `POST /v1/sources/{name}/cancel`: ask its running job (in any engine)
/// to stop after the page in hand.
async fn cancel_sync(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Reply, Reply> {
    authorized(&state, &headers)?;
    let source = source(&state, &name)?;
    let sink = source.prepared().await.map_err(internal)?;
    match sink.request_cancel(&name).await.map_err(internal)? {
        0 => Err(error(
            StatusCode::NOT_FOUND,
            format!("no job of source `{name}` is running"),
        )),
        n => Ok((StatusCode::ACCEPTED, Json(json!({ "canceling": n })))),
    }
}

fn service(state: &AppState, name: &str) -> Result<Arc<crate::service::Service>, Reply> {
    state.services.get(name).cloned().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!(
                "no service `{name}` (services: {})",
                crate::config::list_or_none(state.services.keys())
            ),
        )
    })
}

/// `GET /v1/services`: each service, its component, transports, routes,
/// connection state and calls.
async fn list_services(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, Reply> {
    authorized(&state, &headers)?;
    Ok(Json(Value::Array(
        state.services.values().map(|s| s.status()).collect(),
    )))
}

#[derive(serde::Deserialize)]
struct SourceQuery {
    /// The source (connection) the call is for; default: the service's own.
    source: Option<String>,
}

/// The call's source (`?source=`, default the service's own), if the
/// service has it now; else 404.
fn known_source(
    service: &crate::service::Service,
    source: Option<String>,
) -> Result<String, Reply> {
    let source = source.unwrap_or_else(|| service.name().to_owned());
    if service.knows(&source) {
        Ok(source)
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "service `{}` has no connected source `{source}`",
                service.name()
            ),
        ))
    }
}

/// The body as JSON text, or 400.
fn json_body(body: &axum::body::Bytes) -> Result<String, Reply> {
    let bad = |e: String| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON: {e}"),
        )
    };
    // Checked, not parsed into a value: the guest gets the text as sent.
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| bad(e.to_string()))?;
    String::from_utf8(body.to_vec()).map_err(|e| bad(e.to_string()))
}

/// Request headers a call passes on to the guest: all but credentials
/// (`Authorization`, `Cookie`).
pub fn passed_headers(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            *name != axum::http::header::AUTHORIZATION && *name != axum::http::header::COOKIE
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// `POST /v1/services/{name}/query?source=S`: the body (JSON) is the
/// query; the answer streams as NDJSON, one reply per line
/// (`{"status": 100|200|204|400, "body": ...}`), the last one final.
async fn query_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SourceQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, Reply> {
    authorized(&state, &headers)?;
    let service = service(&state, &name)?;
    let query = json_body(&body)?;
    let source = known_source(&service, q.source)?;
    let frames = service.query(source, query, passed_headers(&headers));
    Ok(crate::service::http::ndjson(frames).await)
}

/// `POST /v1/services/{name}/publish?source=S`: the body (JSON) is an
/// event for `on-publish`; 202 once it was handled and its effects
/// applied.
async fn publish_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SourceQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, Reply> {
    use axum::response::IntoResponse as _;
    authorized(&state, &headers)?;
    let service = service(&state, &name)?;
    let event = json_body(&body)?;
    let source = known_source(&service, q.source)?;
    match service
        .publish(source, event, passed_headers(&headers))
        .await
    {
        Ok(()) => Ok((StatusCode::ACCEPTED, Json(json!({ "published": true }))).into_response()),
        Err(e) => Ok(crate::service::http::call_error(&name, &e)),
    }
}

/// `POST /v1/services/{name}/configure?source=S`: the body (a JSON object)
/// is the source's new configuration; each instance closes the source
/// and connects it again with it before its next call (calls in flight
/// finish on the old one). 202.
async fn configure_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SourceQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), Reply> {
    authorized(&state, &headers)?;
    let service = service(&state, &name)?;
    let config: Value = serde_json::from_slice(&body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object: the source's configuration".into(),
            )
        })?;
    let source = q.source.unwrap_or_else(|| name.clone());
    service
        .reconfigure(&source, config.to_string())
        .map_err(|e| error(StatusCode::NOT_FOUND, e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "source": source, "configured": true })),
    ))
}

/// `GET /v1/services/{name}/notifications?source=S`: the service's
/// notifications from now on, as NDJSON (`{"source", "body"}`; a
/// `{"missed": N}` line when the client fell behind), until the client
/// or the server goes away.
async fn follow_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SourceQuery>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, Reply> {
    authorized(&state, &headers)?;
    let service = service(&state, &name)?;
    let receiver = service.notifications().follow();
    let shutdown = state.shutdown.clone();
    let wanted = q.source;
    let stream =
        futures::stream::unfold((receiver, shutdown), move |(mut receiver, mut shutdown)| {
            let wanted = wanted.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        _ = shutdown.wait_for(|stop| *stop) => return None,
                        next = receiver.recv() => next,
                    };
                    let line = match next {
                        Ok(n) if wanted.as_ref().is_none_or(|w| *w == n.source) => {
                            json!({ "source": n.source, "body": n.body })
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            json!({ "missed": missed })
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    };
                    let mut text = line.to_string();
                    text.push('\n');
                    return Some((
                        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(text)),
                        (receiver, shutdown),
                    ));
                }
            }
        });
    let mut response = axum::response::Response::new(axum::body::Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// The router (public for tests).
pub fn router(ready: Readiness, api: Api, shutdown: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/sources", get(list_sources))
        .route("/v1/sources/{name}/jobs", get(list_jobs))
        .route("/v1/sources/{name}/sync", post(start_sync))
        .route("/v1/sources/{name}/cancel", post(cancel_sync))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}/query", post(query_service))
        .route("/v1/services/{name}/publish", post(publish_service))
        .route("/v1/services/{name}/notifications", get(follow_service))
        .route("/v1/services/{name}/configure", post(configure_service))
        .with_state(AppState {
            ready,
            sources: api.sources,
            services: api.services,
            token: api.token,
            jobs: api.jobs,
            shutdown,
        })
}

/// Serve on `addr` until `shutdown` turns true. Returns the bound address
/// (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    api: Api,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("server.listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    crate::metrics::describe();
    let app = router(ready, api, shutdown.clone());
    tokio::spawn(async move {
        let result = axum::serve(
            // Replies stream in several writes: without NODELAY, Nagle's
            // algorithm holds each small one for the client's delayed ACK
            // (40 ms a query).
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
        if let Err(e) = result {
            tracing::error!("HTTP server failed: {e}");
        }
    });
    tracing::info!(%bound, "serving /healthz, /readyz, /metrics, /v1/sources, /v1/services");
    Ok(bound)
}
