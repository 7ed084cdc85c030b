//! A service's declared routes, on a listener of its own
//! (`services.NAME.http`): each request to a declared route becomes one
//! `on-request` call; anything else is answered by the engine without the
//! guest (404 for an undeclared path, 405 for a declared path's other
//! methods, 413 past `max_body`, 408 for a client slower than
//! `read_timeout`, 400 for a malformed multipart body). `GET /openapi.json`
//! is the routes' OpenAPI 3 document.

// A refusal is the HTTP response itself, made once per refused request.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, RawPathParams, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{CallError, Frame, Service, routes};
use crate::config::service::ServiceHttp;
use crate::sandbox::bindings::{Part, Request, WitError};

/// What the route handlers share.
#[derive(Clone)]
struct Routes {
    service: Arc<Service>,
    http: ServiceHttp,
    token: Option<crate::secrets::Secret>,
}

/// A JSON error answer, counted as refused when the engine answers it.
fn refuse(service: &str, status: StatusCode, message: String) -> Response {
    metrics::counter!(crate::metrics::SERVICE_REFUSED, "service" => service.to_owned(), "status" => status.as_u16().to_string())
        .increment(1);
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// Serve `service`'s declared routes on `http.listen` until `shutdown`;
/// the bound address.
pub async fn serve(
    service: Arc<Service>,
    http: ServiceHttp,
    token: Option<crate::secrets::Secret>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(http.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "services.{}.http.listen {}: {e}",
                service.name(),
                http.listen
            )
        })?;
    let bound = listener.local_addr()?;
    let name = service.name().to_owned();
    let app = router(Routes {
        service,
        http,
        token,
    });
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
            tracing::error!(service = %name, "the service's listener failed: {e}");
        }
    });
    Ok(bound)
}

fn filter(method: &str) -> Option<MethodFilter> {
    Some(match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        "PATCH" => MethodFilter::PATCH,
        "DELETE" => MethodFilter::DELETE,
        _ => return None,
    })
}

/// The router of the declared routes (checked by [`routes::check`] when
/// the component was loaded, so none conflicts).
fn router(state: Routes) -> Router {
    let mut by_path: BTreeMap<String, MethodRouter<Routes>> = BTreeMap::new();
    for route in &state.service.description().routes {
        let Some(filter) = filter(&route.method) else {
            continue;
        };
        let template = route.path.clone();
        let handler = move |state: State<Routes>,
                            method: Method,
                            params: RawPathParams,
                            Query(query): Query<Vec<(String, String)>>,
                            headers: HeaderMap,
                            uri: axum::http::Uri,
                            body: Body| {
            let template = template.clone();
            async move {
                let params = params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                handle(state.0, template, method, uri, params, query, headers, body).await
            }
        };
        let entry = by_path
            .remove(&route.path)
            .unwrap_or_default()
            .on(filter, handler);
        by_path.insert(route.path.clone(), entry);
    }
    let mut app = Router::new();
    for (path, methods) in by_path {
        app = app.route(&path, methods);
    }
    app.route(routes::OPENAPI_PATH, get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .with_state(state)
}

async fn openapi(State(state): State<Routes>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorized(&state, &headers) {
        return refused;
    }
    axum::Json(routes::openapi(
        state.service.name(),
        state.service.description(),
    ))
    .into_response()
}

async fn not_allowed(
    State(state): State<Routes>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorized(&state, &headers) {
        return refused;
    }
    refuse(
        state.service.name(),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn not_found(
    State(state): State<Routes>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorized(&state, &headers) {
        return refused;
    }
    let declared: Vec<String> = state
        .service
        .description()
        .routes
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    refuse(
        state.service.name(),
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}: service `{}` declares {}",
            uri.path(),
            state.service.name(),
            crate::config::list_or_none(declared)
        ),
    )
}

fn authorized(state: &Routes, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if crate::server::same_secret(given, token.expose()) {
        Ok(())
    } else {
        Err(refuse(
            state.service.name(),
            StatusCode::UNAUTHORIZED,
            format!(
                "a valid `Authorization: Bearer` token is required (services.{}.http.token)",
                state.service.name()
            ),
        ))
    }
}

/// The body, read within the listener's size and time limits.
async fn read_body(state: &Routes, body: Body) -> Result<Bytes, Response> {
    let name = state.service.name();
    let max = state.http.max_body.as_u64();
    let limited = http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
    match tokio::time::timeout(state.http.read_timeout, limited.collect()).await {
        Err(_) => Err(refuse(
            name,
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?} (services.{name}.http.read_timeout)",
                state.http.read_timeout
            ),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(refuse(
            name,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {} (services.{name}.http.max_body)",
                state.http.max_body
            ),
        )),
        Ok(Err(e)) => Err(refuse(
            name,
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The parts of a `multipart/form-data` body.
async fn parts(state: &Routes, boundary: String, body: Bytes) -> Result<Vec<Part>, Response> {
    let name = state.service.name();
    let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Err(refuse(
                    name,
                    StatusCode::BAD_REQUEST,
                    format!("malformed multipart/form-data body: {e}"),
                ));
            }
        };
        if parts.len() >= state.http.max_parts as usize {
            return Err(refuse(
                name,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "more than {} parts (services.{name}.http.max_parts)",
                    state.http.max_parts
                ),
            ));
        }
        let part_name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.to_string());
        let bytes = field.bytes().await.map_err(|e| {
            refuse(
                name,
                StatusCode::BAD_REQUEST,
                format!("malformed multipart/form-data part `{part_name}`: {e}"),
            )
        })?;
        parts.push(Part {
            name: part_name,
            filename,
            content_type,
            body: bytes.to_vec(),
        });
    }
    Ok(parts)
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    state: Routes,
    route: String,
    method: Method,
    uri: axum::http::Uri,
    params: Vec<(String, String)>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refused) = authorized(&state, &headers) {
        return refused;
    }
    let bytes = match read_body(&state, body).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (body, parts) = if content_type.starts_with("multipart/form-data") {
        let boundary = match multer::parse_boundary(content_type) {
            Ok(b) => b,
            Err(e) => {
                return refuse(
                    state.service.name(),
                    StatusCode::BAD_REQUEST,
                    format!("multipart/form-data without a boundary: {e}"),
                );
            }
        };
        match parts(&state, boundary, bytes).await {
            Ok(parts) => (Vec::new(), parts),
            Err(refused) => return refused,
        }
    } else {
        (bytes.to_vec(), Vec::new())
    };
    let headers = crate::server::passed_headers(&headers);
    let request = Request {
        method: method.as_str().to_owned(),
        route,
        path: uri.path().to_owned(),
        params,
        query,
        headers,
        body,
        parts,
    };
    match state.service.request(request).await {
        Ok(response) => respond(state.service.name(), response),
        Err(e) => call_error(state.service.name(), &e),
    }
}

/// Headers of a response that are the server's to set, not the guest's:
/// dropped from its response.
const SERVER_HEADERS: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The guest's response, checked: a status outside 200–599 or a header
/// that is not one is the service's fault (502); the headers that are the
/// server's to set are dropped.
fn respond(service: &str, response: crate::sandbox::bindings::Response) -> Response {
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()));
    let Some(status) = status else {
        return refuse(
            service,
            StatusCode::BAD_GATEWAY,
            format!(
                "service `{service}` answered with status {}, which is none",
                response.status
            ),
        );
    };
    let mut answer = Response::new(Body::from(response.body));
    *answer.status_mut() = status;
    for (name, value) in response.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            return refuse(
                service,
                StatusCode::BAD_GATEWAY,
                format!("service `{service}` answered with a malformed header `{name}`"),
            );
        };
        if SERVER_HEADERS.contains(&name.as_str()) {
            continue;
        }
        answer.headers_mut().append(name, value);
    }
    answer
}

/// A failed call as an HTTP answer: the guest's error by its kind, the
/// engine's by what failed.
pub fn call_error(service: &str, error: &CallError) -> Response {
    let status = match error {
        CallError::Guest(WitError::NotFound(_)) => StatusCode::NOT_FOUND,
        CallError::Guest(WitError::Invalid(_)) => StatusCode::BAD_REQUEST,
        CallError::Guest(WitError::AccessDenied(_)) => StatusCode::FORBIDDEN,
        CallError::Guest(WitError::LimitExceeded(_)) => StatusCode::TOO_MANY_REQUESTS,
        CallError::Guest(WitError::Unavailable(_))
        | CallError::Busy(_)
        | CallError::NotConnected(_) => StatusCode::SERVICE_UNAVAILABLE,
        CallError::Failed(f) if f.kind == crate::sandbox::FailureKind::Deadline => {
            StatusCode::GATEWAY_TIMEOUT
        }
        CallError::Guest(WitError::Internal(_)) | CallError::Failed(_) | CallError::Commit(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let body = json!({ "error": format!("service `{service}`: {error}"), "kind": error.kind() });
    (status, axum::Json(body)).into_response()
}

/// A query's replies as an NDJSON body: one line per frame, in order, the
/// last one final. A reply that is final at once goes out as one plain
/// body; a longer one streams. A client that goes away drops the receiver,
/// and the guest's next `partial` fails.
pub async fn ndjson(mut frames: mpsc::Receiver<Frame>) -> Response {
    let line = |frame: &Frame| Bytes::from(frame.to_line());
    let first = frames.recv().await;
    let body = match first {
        None => Body::empty(),
        Some(frame) if frame.is_final() => Body::from(line(&frame)),
        Some(frame) => {
            let first = line(&frame);
            let rest =
                futures::stream::unfold((frames, false), move |(mut frames, done)| async move {
                    if done {
                        return None;
                    }
                    let frame = frames.recv().await?;
                    let last = frame.is_final();
                    Some((
                        Ok::<_, std::convert::Infallible>(line(&frame)),
                        (frames, last),
                    ))
                });
            let first = futures::stream::once(async move { Ok(first) });
            Body::from_stream(futures::StreamExt::chain(first, rest))
        }
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}
