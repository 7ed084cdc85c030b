//! `http`: outbound requests through `wasi:http/outgoing-handler`, sent by
//! the host for the guest to the destinations the plugin's `http` grant
//! allows (`config::http`), and nowhere else.
//!
//! Every request goes through [`HostState`]'s `send_request` hook:
//!
//! 1. the `http` grant and the host-call count ([`HostState::enter`]), the
//!    request quota (`limits.http_requests`) and the allow-list, checked on
//!    the URL before anything leaves the engine (a denial is recorded like
//!    any other: the status log, the `denied` metric);
//! 2. the name is resolved by the host, and an address that is loopback,
//!    private, link-local, unspecified or otherwise special is refused
//!    unless the allow-list names it literally (`config::http::is_special`):
//!    the check is on the address connected to, so DNS cannot lead a
//!    request around the list;
//! 3. a connection of its own (TCP; TLS with rustls, the webpki roots and
//!    `tls.ca_file`), HTTP/1.1; redirects are not followed (the guest sees
//!    the 3xx and may follow it, through the list again);
//! 4. the bodies are metered both ways (`limits.http_request_bytes`,
//!    `limits.http_response_bytes`), the response streamed to the guest as
//!    it reads, never held whole; every wait (a turn among the plugin's
//!    requests in flight, `limits.http_concurrency`; name lookup; connect;
//!    the first byte; every next byte) ends at the invocation's deadline
//!    at the latest, so a slow peer cannot hold a guest that waits in a
//!    host call past it.
//!
//! What the asynchronous part finds (a refused address, the journal entry
//! of a response) is kept in [`HttpUse`] and gathered into the host state
//! when the call returns ([`HostState::gather`]).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use serde_json::json;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::capability::journal::HostCall;
use crate::capability::{HostState, Interface, PluginContext, cut};
use crate::config::http::{default_port, is_special};
use crate::sandbox::bindings::WitError;
use crate::tls::Tls;

/// What every plugin's requests share: the TLS client configuration, and
/// for `sandpipe exec --record` / `replay` the tape of exchanges.
pub struct HttpClient {
    /// The TLS client configuration, or why there is none.
    tls: Result<Arc<rustls::ClientConfig>, String>,
    tape: Tape,
}

impl HttpClient {
    /// The client of an engine whose TLS settings are `tls`: the webpki
    /// roots plus `tls.ca_file`'s certificates.
    pub fn new(tls: &Tls) -> Self {
        Self::with_tape(tls, Tape::Live)
    }

    /// [`HttpClient::new`], recording or replaying exchanges.
    pub fn with_tape(tls: &Tls, tape: Tape) -> Self {
        Self {
            tls: tls.web().map_err(|e| e.to_string()),
            tape,
        }
    }

    /// The exchanges recorded so far (with [`Tape::record`]).
    pub fn recorded(&self) -> Vec<Exchange> {
        match &self.tape {
            Tape::Record(tape) => tape.lock().map(|t| t.clone()).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// One request and the response it got, as `exec --record` keeps it (in
/// `recording.json`; the body base64). The request's headers are not kept:
/// they may hold a secret the engine added.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exchange {
    /// The method.
    pub method: String,
    /// The URL.
    pub url: String,
    /// The response's status.
    pub status: u16,
    /// The response's headers.
    pub headers: Vec<(String, String)>,
    /// The response's body (at most the plugin's `http_response_bytes`),
    /// base64.
    pub body: String,
}

/// Where responses come from.
pub enum Tape {
    /// The network.
    Live,
    /// The network, each exchange kept (the response read whole, up to the
    /// plugin's quota, before the guest sees it).
    Record(Mutex<Vec<Exchange>>),
    /// The exchanges of a recording, each served once, in order, for the
    /// same method and URL; nothing is sent.
    Replay(Mutex<Vec<Option<Exchange>>>),
}

impl Tape {
    /// A tape that records.
    pub fn record() -> Self {
        Self::Record(Mutex::new(Vec::new()))
    }

    /// A tape that serves `exchanges`.
    pub fn replay(exchanges: Vec<Exchange>) -> Self {
        Self::Replay(Mutex::new(exchanges.into_iter().map(Some).collect()))
    }
}

/// What the asynchronous part of one invocation's requests records.
#[derive(Default)]
pub struct HttpUse {
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    denials: Mutex<Vec<String>>,
    journal: Mutex<Vec<HostCall>>,
}

impl HttpUse {
    fn deny(&self, plugin: &str, message: String) {
        let message = cut(message, super::MAX_DENIAL);
        tracing::warn!(plugin, "denied: {message}");
        metrics::counter!(crate::metrics::DENIED, "plugin" => plugin.to_owned()).increment(1);
        if let Ok(mut denials) = self.denials.lock()
            && denials.len() < 100
        {
            denials.push(message);
        }
    }
}

/// One request that passed the checks made before it is sent.
struct Allowed {
    plugin: Arc<PluginContext>,
    client: Arc<HttpClient>,
    usage: Arc<HttpUse>,
    journal: bool,
    scheme: String,
    host: String,
    /// The host as the metrics name it (`AllowedHost::metric_host`).
    metric_host: String,
    port: u16,
    deadline: Instant,
}

type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl HostState {
    /// The checks made before a request leaves: the grant, the quotas,
    /// the allow-list. A refusal is recorded here.
    fn admit(&mut self, request: &http::Request<WasiBody>) -> Result<Allowed, Error> {
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let journal = self.journal_call(
            Interface::Http,
            "handle",
            || json!({ "request": format!("{} {}", request.method(), uri) }),
        );
        let result = self.admit_inner(request, &scheme);
        if let Err(error) = &result {
            let error = match error {
                Error::HttpRequestDenied => WitError::AccessDenied(
                    self.denials
                        .last()
                        .cloned()
                        .unwrap_or_else(|| "denied".into()),
                ),
                other => WitError::LimitExceeded(other.to_string()),
            };
            self.journal_result::<()>(journal, &Err(error), |_| json!(null));
        }
        result
    }

    fn admit_inner(
        &mut self,
        request: &http::Request<WasiBody>,
        scheme: &str,
    ) -> Result<Allowed, Error> {
        let denied = |e: WitError| match e {
            WitError::AccessDenied(_) => Error::HttpRequestDenied,
            other => Error::InternalError(Some(crate::pipeline::wit_error_text(&other))),
        };
        self.enter(Interface::Http, "outgoing-handler.handle")
            .map_err(denied)?;
        let plugin = self.plugin.clone();
        // TRACE echoes the request (and a bound secret) back; CONNECT
        // would tunnel past the engine.
        if matches!(
            *request.method(),
            http::Method::TRACE | http::Method::CONNECT
        ) {
            return Err(denied(self.deny(format!(
                "plugin `{}` sent a {} request, which the engine does not send",
                plugin.name,
                request.method()
            ))));
        }
        let limits = &plugin.limits;
        self.http_requests += 1;
        if self.http_requests > limits.http_requests {
            return Err(denied(self.limit(
                "http_requests",
                format!(
                    "more than {} HTTP requests in one invocation",
                    limits.http_requests
                ),
            )));
        }
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or_else(|| default_port(scheme));
        let grant = plugin.grant.http.as_ref();
        let Some(entry) = grant.and_then(|g| g.allows(scheme, &host, port)) else {
            let listed = grant
                .map(|g| {
                    g.allow
                        .iter()
                        .map(|a| a.text.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            return Err(denied(self.deny(format!(
                "plugin `{}` sent a request to {scheme}://{}:{port}, which its `http.allow` \
                 list does not allow (allowed: [{listed}]; add the destination under \
                 plugins.grants.{}.http.allow)",
                plugin.name,
                bracket(&host),
                plugin.name
            ))));
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let metric_host = entry.metric_host();
        let usage = self.http_use.get_or_insert_with(Default::default).clone();
        Ok(Allowed {
            client: plugin.services.http.clone(),
            plugin,
            usage,
            journal: self.journaling(),
            scheme: scheme.to_owned(),
            host: bare.to_owned(),
            metric_host,
            port,
            deadline: self.deadline,
        })
    }

    /// Gather what the invocation's requests found after their host call
    /// returned (refused addresses, journal entries) into this state.
    pub fn gather(&mut self) {
        let Some(usage) = self.http_use.take() else {
            return;
        };
        // Someone else holds it: a request or response body the guest
        // kept (in its resource table) or a connection still running.
        self.http_open = Arc::strong_count(&usage) > 1;
        if let Ok(mut denials) = usage.denials.lock() {
            for denial in denials.drain(..) {
                if self.denials.len() < 100 {
                    self.denials.push(denial);
                }
            }
        }
        if let (Some(journal), Ok(mut entries)) = (self.journal.as_mut(), usage.journal.lock()) {
            journal.append(&mut entries);
        }
    }
}

/// `[::1]` for an IPv6 address, the host as it is otherwise.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

impl WasiHttpHooks for HostState {
    /// `Host` is set by the engine from the checked host (`exchange`), not
    /// from the guest's authority (which may carry user info).
    fn set_host_header(&mut self) -> bool {
        false
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let mut request = request;
        match self
            .admit(&request)
            .and_then(|allowed| authorize(&allowed, &mut request).map(|oauth| (allowed, oauth)))
        {
            Ok((allowed, None)) => Box::new(send(allowed, request, options)),
            Ok((allowed, Some((service, user)))) => Box::new(async move {
                let mut request = request;
                with_user_token(&allowed, &mut request, &service, &user).await?;
                send(allowed, request, options).await
            }),
            Err(error) => Box::new(async move { Err(error) }),
        }
    }
}

/// The request header naming the user whose OAuth token an `oauth_user`
/// binding attaches; the engine removes it from every request.
pub const USER_HEADER: &str = "x-sandpipe-user";

/// Put `user`'s OAuth token for `service` (from the token storage) in the
/// request's `Authorization` header, marked sensitive.
async fn with_user_token(
    allowed: &Allowed,
    request: &mut http::Request<WasiBody>,
    service: &str,
    user: &str,
) -> Result<(), Error> {
    let Some(tokens) = &allowed.plugin.services.tokens else {
        return Err(Error::InternalError(Some(
            "`oauth_user` needs `token_storage:` in the configuration".into(),
        )));
    };
    let token = tokens
        .access_token(user, service)
        .await
        .map_err(|e| Error::InternalError(Some(e)))?;
    let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| Error::InternalError(Some("the token cannot be a header value".into())))?;
    value.set_sensitive(true);
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, value);
    Ok(())
}

/// Add the credentials the grant binds to the request's destination
/// (`http.auth`), replacing any header of the same name the guest set.
/// Header values made from a secret are marked sensitive; an error never
/// quotes one. An `oauth_user` binding is returned as (service, user), for
/// the token to be fetched before the request goes.
fn authorize(
    allowed: &Allowed,
    request: &mut http::Request<WasiBody>,
) -> Result<Option<(String, String)>, Error> {
    use crate::config::http::HttpAuth;
    use base64::Engine as _;
    let user = request
        .headers_mut()
        .remove(USER_HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let Some(auth) = allowed
        .plugin
        .grant
        .http
        .as_ref()
        .and_then(|g| g.auth_for(&allowed.scheme, &allowed.host, allowed.port))
    else {
        return Ok(None);
    };
    let secrets = &allowed.plugin.services.secrets;
    let secret = |name: &str| {
        secrets.get(name).ok_or_else(|| {
            Error::InternalError(Some(format!(
                "secret `{name}` is not loaded (declare it under `secrets:`)"
            )))
        })
    };
    let mut set = |name: &str, value: String, secret_name: &str| -> Result<(), Error> {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::InternalError(Some(format!("`{name}` is not a header name"))))?;
        let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
            Error::InternalError(Some(format!(
                "secret `{secret_name}` cannot be a header value (control characters?)"
            )))
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(name, value);
        Ok(())
    };
    match auth {
        HttpAuth::Bearer(name) => {
            let token = secret(name)?;
            set("authorization", format!("Bearer {}", token.expose()), name)?;
        }
        HttpAuth::Header(headers) => {
            for (header, name) in headers {
                set(header, secret(name)?.expose().to_owned(), name)?;
            }
        }
        HttpAuth::Basic { user, password } => {
            let pair = format!("{user}:{}", secret(password)?.expose());
            set(
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ),
                password,
            )?;
        }
        HttpAuth::OauthUser(service) => {
            let Some(user) = user.filter(|u| !u.is_empty()) else {
                return Err(Error::InternalError(Some(format!(
                    "requests to this destination carry the token of a user of `{service}`: name the user in the `{USER_HEADER}` header"
                ))));
            };
            return Ok(Some((service.clone(), user)));
        }
    }
    Ok(None)
}

/// The earlier of `deadline` and `timeout` from now.
fn until(deadline: Instant, timeout: Option<Duration>) -> tokio::time::Instant {
    let by_timeout = timeout.map(|t| Instant::now() + t).unwrap_or(deadline);
    tokio::time::Instant::from_std(by_timeout.min(deadline))
}

async fn send(
    allowed: Allowed,
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Sent {
    let started = Instant::now();
    // `METHOD URL`, for the journal and the replay tape only.
    let url = if allowed.journal || matches!(allowed.client.tape, Tape::Replay(_)) {
        format!("{} {}", request.method(), request.uri())
    } else {
        String::new()
    };
    let plugin = allowed.plugin.name.clone();
    let host = allowed.metric_host.clone();
    let result = match &allowed.client.tape {
        Tape::Live => exchange(&allowed, request, options).await,
        Tape::Record(tape) => record(&allowed, request, options, tape).await,
        Tape::Replay(tape) => replay(&url, tape),
    };
    let status = match &result {
        Ok(response) => format!("{}xx", response.status().as_u16() / 100),
        Err(_) => "error".to_owned(),
    };
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "plugin" => plugin.clone(), "host" => host.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::HTTP_SECONDS, "plugin" => plugin, "host" => host)
        .record(started.elapsed().as_secs_f64());
    if allowed.journal
        && let Ok(mut journal) = allowed.usage.journal.lock()
    {
        let result = match &result {
            Ok(response) => json!({ "ok": { "status": response.status().as_u16() } }),
            Err(error) => json!({ "error": error.to_string() }),
        };
        journal.push(HostCall {
            interface: "http".into(),
            function: "handle".into(),
            args: json!({ "request": url }),
            result,
        });
    }
    result.map(|response| {
        (
            response,
            Box::new(async { Ok(()) }) as Box<dyn Future<Output = Result<(), Error>> + Send>,
        )
    })
}

/// [`exchange`], the response read whole (up to the plugin's quota) and
/// kept on the tape.
async fn record(
    allowed: &Allowed,
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    tape: &Mutex<Vec<Exchange>>,
) -> Result<http::Response<WasiBody>, Error> {
    use base64::Engine as _;
    let method = request.method().to_string();
    let url = request.uri().to_string();
    let response = exchange(allowed, request, options).await?;
    let (head, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    if let Ok(mut tape) = tape.lock() {
        tape.push(Exchange {
            method,
            url,
            status: head.status.as_u16(),
            headers: head
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: base64::engine::general_purpose::STANDARD.encode(&bytes),
        });
    }
    Ok(http::Response::from_parts(head, full(bytes)))
}

/// The recorded response to `METHOD URL` (`url` is both), served once.
fn replay(
    url: &str,
    tape: &Mutex<Vec<Option<Exchange>>>,
) -> Result<http::Response<WasiBody>, Error> {
    use base64::Engine as _;
    let missing = || {
        Error::InternalError(Some(format!(
            "replay: the recording has no (further) response to {url}"
        )))
    };
    let mut tape = tape.lock().map_err(|_| missing())?;
    let slot = tape
        .iter_mut()
        .find(|e| {
            e.as_ref()
                .is_some_and(|e| format!("{} {}", e.method, e.url) == url)
        })
        .ok_or_else(missing)?;
    let exchange = slot.take().ok_or_else(missing)?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(&exchange.body)
        .map_err(|_| Error::InternalError(Some("replay: a recorded body is not base64".into())))?;
    let mut response = http::Response::builder().status(exchange.status);
    for (name, value) in &exchange.headers {
        response = response.header(name, value);
    }
    response
        .body(full(Bytes::from(body)))
        .map_err(|e| Error::InternalError(Some(format!("replay: {e}"))))
}

/// A body of `bytes`, whole.
fn full(bytes: Bytes) -> WasiBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Send one allowed request and return the response head with its body
/// still streaming.
async fn exchange(
    allowed: &Allowed,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<http::Response<WasiBody>, Error> {
    let deadline = tokio::time::Instant::from_std(allowed.deadline);
    let options = options.unwrap_or_default();
    let limits = &allowed.plugin.limits;

    // A turn among the plugin's requests in flight.
    let permit =
        tokio::time::timeout_at(deadline, allowed.plugin.http_slots.clone().acquire_owned())
            .await
            .map_err(|_| Error::ConnectionLimitReached)?
            .map_err(|_| Error::ConnectionLimitReached)?;

    // A kept-alive connection of this plugin to this destination (its
    // address was checked when it was made), else a new one.
    let key = PoolKey {
        scheme: allowed.scheme.clone(),
        host: allowed.host.clone(),
        port: allowed.port,
    };
    let mut sender = match allowed.plugin.http_pool.take(&key).await {
        Some(sender) => sender,
        None => connect(allowed, &options, deadline).await?,
    };

    // `Host` is the checked host (and port when not the scheme's).
    let authority = if allowed.port == default_port(&allowed.scheme) {
        bracket(&allowed.host)
    } else {
        format!("{}:{}", bracket(&allowed.host), allowed.port)
    };
    let host_header =
        http::HeaderValue::from_str(&authority).map_err(|_| Error::HttpRequestUriInvalid)?;
    request
        .headers_mut()
        .insert(http::header::HOST, host_header);
    // The request line names the path only (the host is in `Host`).
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let request = request.map(|body| {
        Metered {
            inner: body,
            usage: allowed.usage.clone(),
            counter: Direction::Request,
            limit: limits.http_request_bytes.as_u64(),
            idle: None,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            plugin: allowed.plugin.name.clone(),
            host: allowed.metric_host.clone(),
            _permit: None,
            give_back: None,
        }
        .boxed_unsync()
    });

    let response = tokio::time::timeout_at(
        until(allowed.deadline, options.first_byte_timeout),
        sender.send_request(request),
    )
    .await
    .map_err(|_| Error::ConnectionReadTimeout)?
    .map_err(|e| {
        if e.is_timeout() {
            Error::HttpResponseTimeout
        } else {
            Error::Hyper(e)
        }
    })?;
    let between = options.between_bytes_timeout;
    Ok(response.map(|incoming| {
        Metered {
            inner: incoming.map_err(Error::Hyper).boxed_unsync(),
            usage: allowed.usage.clone(),
            counter: Direction::Response,
            limit: limits.http_response_bytes.as_u64(),
            idle: between.map(|t| (t, Box::pin(tokio::time::sleep(t)))),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            plugin: allowed.plugin.name.clone(),
            host: allowed.metric_host.clone(),
            _permit: Some(permit),
            give_back: Some((sender, key, allowed.plugin.clone())),
        }
        .boxed_unsync()
    }))
}

/// A new connection for `allowed`: the name resolved, the addresses
/// checked, TCP (and TLS) connected, HTTP/1.1 handshaken; its driver runs
/// in a task of its own, at most [`MAX_CONNECTION_LIFE`].
async fn connect(
    allowed: &Allowed,
    options: &RequestOptions,
    deadline: tokio::time::Instant,
) -> Result<Sender, Error> {
    // Where to connect: only addresses the list allows.
    let addresses: Vec<IpAddr> = match allowed.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => resolve(&allowed.host, allowed.port, deadline).await?,
    };
    let grant = allowed.plugin.grant.http.as_ref();
    let (usable, refused): (Vec<IpAddr>, Vec<IpAddr>) = addresses.into_iter().partition(|ip| {
        !is_special(*ip)
            || grant.is_some_and(|g| g.names_address(&allowed.scheme, *ip, allowed.port))
    });
    if usable.is_empty() {
        let refused: Vec<String> = refused.iter().map(ToString::to_string).collect();
        allowed.usage.deny(
            &allowed.plugin.name,
            format!(
                "plugin `{}` sent a request to {}, which resolves to {} only: a loopback, \
                 private, link-local or otherwise special address, refused unless the \
                 `http.allow` list names it literally (e.g. `{}://{}:{}`)",
                allowed.plugin.name,
                bracket(&allowed.host),
                if refused.is_empty() {
                    "no address".to_owned()
                } else {
                    refused.join(", ")
                },
                allowed.scheme,
                refused
                    .first()
                    .map(|a| bracket(a))
                    .unwrap_or_else(|| "ADDRESS".into()),
                allowed.port
            ),
        );
        return Err(Error::HttpRequestDenied);
    }

    // Connect to the first that answers.
    let connect_by = until(allowed.deadline, options.connect_timeout);
    let mut last = None;
    let mut stream = None;
    for ip in usable {
        match tokio::time::timeout_at(
            connect_by,
            TcpStream::connect(SocketAddr::new(ip, allowed.port)),
        )
        .await
        {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = Some(Error::Connect(e)),
            Err(_) => {
                last = Some(Error::ConnectionTimeout);
                break;
            }
        }
    }
    let stream = stream.ok_or_else(|| last.unwrap_or(Error::ConnectionRefused))?;
    let _ = stream.set_nodelay(true);

    let io: Box<dyn Io> = if allowed.scheme == "https" {
        let config = allowed
            .client
            .tls
            .clone()
            .map_err(|why| Error::InternalError(Some(why)))?;
        let name = rustls::pki_types::ServerName::try_from(allowed.host.clone())
            .map_err(|e| Error::InternalError(Some(format!("not a TLS server name: {e}"))))?;
        let tls = tokio::time::timeout_at(
            connect_by,
            tokio_rustls::TlsConnector::from(config).connect(name, stream),
        )
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (sender, connection) = tokio::time::timeout_at(
        connect_by,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(io)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // Driven until every sender is gone (a pooled one expires after
    // `IDLE_FOR`), at most `MAX_CONNECTION_LIFE`.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(MAX_CONNECTION_LIFE, connection).await;
    });
    Ok(sender)
}

/// The sending half of an HTTP/1.1 connection.
type Sender = hyper::client::conn::http1::SendRequest<WasiBody>;

/// How long an idle kept-alive connection may wait for its next request.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// Idle connections kept per plugin and destination.
pub const IDLE_PER_DESTINATION: usize = 8;
/// The longest a connection lives, kept alive or not.
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(300);

/// Where a kept-alive connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    scheme: String,
    host: String,
    port: u16,
}

/// One plugin's idle kept-alive connections, by destination. Never
/// shared between plugins; a connection's address was checked against
/// the plugin's allow-list when it was made.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<std::collections::HashMap<PoolKey, Vec<(Sender, Instant)>>>,
}

impl Pool {
    /// An idle connection to `key` that can take a request (one just
    /// given back may need a moment to finish its last response).
    async fn take(&self, key: &PoolKey) -> Option<Sender> {
        loop {
            let (mut sender, since) = self.idle.lock().ok()?.get_mut(key)?.pop()?;
            if since.elapsed() >= IDLE_FOR || sender.is_closed() {
                continue;
            }
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_millis(200), sender.ready()).await
            {
                return Some(sender);
            }
        }
    }

    /// Keep `sender` for the next request to `key` (the stale ones of
    /// `key` are dropped, which closes them).
    fn put(&self, key: PoolKey, sender: Sender) {
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(key).or_default();
            list.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
            if list.len() < IDLE_PER_DESTINATION && !sender.is_closed() {
                list.push((sender, Instant::now()));
            }
        }
    }
}

/// Name lookups in flight at once, engine-wide. The system resolver runs
/// on a blocking thread that a timeout cannot stop: each lookup holds a
/// turn until its thread returns, so a resolver that never answers ties up
/// at most this many threads.
const MAX_LOOKUPS: usize = 32;

/// The addresses `host` resolves to (the system resolver), by `deadline`.
async fn resolve(
    host: &str,
    port: u16,
    deadline: tokio::time::Instant,
) -> Result<Vec<IpAddr>, Error> {
    static LOOKUPS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let lookups = LOOKUPS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)));
    let turn = tokio::time::timeout_at(deadline, lookups.clone().acquire_owned())
        .await
        .map_err(|_| Error::DnsTimeout)?
        .map_err(|_| Error::DnsTimeout)?;
    let name = host.to_owned();
    let lookup = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        use std::net::ToSocketAddrs as _;
        (name.as_str(), port)
            .to_socket_addrs()
            .map(|found| found.map(|a| a.ip()).collect::<Vec<_>>())
    });
    tokio::time::timeout_at(deadline, lookup)
        .await
        .map_err(|_| Error::DnsTimeout)?
        .map_err(|e| Error::InternalError(Some(e.to_string())))?
        .map_err(|e| Error::DnsError {
            rcode: Some(e.to_string()),
            info_code: None,
        })
}

/// A stream TLS or plain TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

#[derive(Clone, Copy)]
enum Direction {
    Request,
    Response,
}

/// A body counted against the invocation's quota for its direction, and
/// cut at the deadline (and, for a response, after the idle time between
/// bytes the guest asked for).
struct Metered {
    inner: WasiBody,
    usage: Arc<HttpUse>,
    counter: Direction,
    limit: u64,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    plugin: String,
    host: String,
    /// A response holds its plugin's turn until it is read or dropped.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A response's connection, given back to the plugin's pool when the
    /// body has been read to its end (dropped with it otherwise).
    give_back: Option<(Sender, PoolKey, Arc<PluginContext>)>,
}

impl Body for Metered {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let (counter, metric) = match this.counter {
                        Direction::Request => {
                            (&this.usage.request_bytes, crate::metrics::HTTP_SENT_BYTES)
                        }
                        Direction::Response => (
                            &this.usage.response_bytes,
                            crate::metrics::HTTP_RECEIVED_BYTES,
                        ),
                    };
                    let total = counter.fetch_add(n, Ordering::Relaxed) + n;
                    metrics::counter!(metric, "plugin" => this.plugin.clone(), "host" => this.host.clone())
                        .increment(n);
                    if total > this.limit {
                        let key = match this.counter {
                            Direction::Request => "http_request_bytes",
                            Direction::Response => "http_response_bytes",
                        };
                        metrics::counter!(crate::metrics::LIMIT_EXCEEDED, "plugin" => this.plugin.clone(), "limit" => key)
                            .increment(1);
                        tracing::warn!(plugin = %this.plugin, limit = key, "limit exceeded: more than {} bytes", this.limit);
                        return Poll::Ready(Some(Err(match this.counter {
                            Direction::Request => Error::HttpRequestBodySize(Some(total)),
                            Direction::Response => Error::HttpResponseBodySize(Some(total)),
                        })));
                    }
                }
                if let Some((timeout, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                if let Some((_, sleep)) = this.idle.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                // Read to its end: the connection may serve the
                // plugin's next request to the same destination.
                if let Some((sender, key, plugin)) = this.give_back.take() {
                    plugin.http_pool.put(key, sender);
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
