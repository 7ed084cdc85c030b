//! Where the capability functions go: on `wasm32` to the component's
//! imports (the engine), elsewhere to the fake host that
//! [`testing::run`](crate::testing::run) installs for the current thread.
//!
//! Both sides have the same functions with the same WIT types, so the
//! capability modules (`log`, `config`, `blob`, `meta`, `sql`, `emit`) are
//! written once.

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::fake::*;

#[cfg(target_arch = "wasm32")]
pub(crate) use imports::*;

#[cfg(target_arch = "wasm32")]
pub(crate) use wasi_http::*;

/// `http` on `wasi:http` (the `wasip2` crate's bindings).
#[cfg(target_arch = "wasm32")]
mod wasi_http {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{
        ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions,
        Scheme,
    };
    use wasip2::io::streams::{InputStream, StreamError};

    use crate::Error;
    use crate::http::Request;

    /// A response body being read. The stream is dropped before the body
    /// (fields drop in order), as `wasi:http` requires.
    pub(crate) struct HttpBody {
        stream: Option<InputStream>,
        _body: Option<IncomingBody>,
    }

    /// What the engine's error code means for the plugin.
    fn error(url: &str, code: ErrorCode) -> Error {
        let text = format!("{code:?}");
        match code {
            ErrorCode::HttpRequestDenied => Error::access_denied(format!(
                "the engine denied the request to {url}: its destination is not in the plugin's \
                 `http.allow` list, or resolves to an address the list does not name (the \
                 status log says which)"
            )),
            ErrorCode::InternalError(Some(message)) => {
                if let Some(rest) = message.strip_prefix("limit-exceeded: ") {
                    Error::limit_exceeded(rest)
                } else if let Some(rest) = message.strip_prefix("access-denied: ") {
                    Error::access_denied(rest)
                } else {
                    Error::internal(format!("request to {url}: {message}"))
                }
            }
            ErrorCode::HttpRequestBodySize(_) => Error::limit_exceeded(format!(
                "the request body to {url} is over the plugin's quota ({text}; \
                 limits.http_request_bytes)"
            )),
            ErrorCode::HttpResponseBodySize(_) => Error::limit_exceeded(format!(
                "the response body from {url} is over the plugin's quota ({text}; \
                 limits.http_response_bytes)"
            )),
            ErrorCode::DnsTimeout
            | ErrorCode::DnsError(_)
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationUnavailable
            | ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTerminated
            | ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::ConnectionLimitReached
            | ErrorCode::HttpResponseTimeout
            | ErrorCode::HttpResponseIncomplete
            | ErrorCode::TlsProtocolError
            | ErrorCode::TlsCertificateError
            | ErrorCode::TlsAlertReceived(_) => {
                Error::unavailable(format!("request to {url}: {text}"))
            }
            _ => Error::internal(format!("request to {url}: {text}")),
        }
    }

    fn internal(url: &str, what: &str) -> Error {
        Error::internal(format!("request to {url}: {what}"))
    }

    pub(crate) fn http_send(request: &Request) -> Result<crate::http::Answer, Error> {
        let url = request.url.as_str();
        let (scheme, authority, path) = request.parts()?;
        let entries: Vec<(String, Vec<u8>)> = request
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone().into_bytes()))
            .collect();
        let headers = Fields::from_list(&entries).map_err(|e| {
            Error::invalid(format!(
                "request to {url}: a header was refused ({e:?}; `host`, `connection`, \
                 `transfer-encoding` and other hop-by-hop headers are the engine's)"
            ))
        })?;
        let outgoing = OutgoingRequest::new(headers);
        let method = match request.method.as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        let bad = |what: &str| Error::invalid(format!("request to {url}: invalid {what}"));
        outgoing.set_method(&method).map_err(|()| bad("method"))?;
        let scheme = match scheme.as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => {
                return Err(Error::invalid(format!(
                    "request to {url}: scheme `{other}` is not http or https"
                )));
            }
        };
        outgoing
            .set_scheme(Some(&scheme))
            .map_err(|()| bad("scheme"))?;
        outgoing
            .set_authority(Some(&authority))
            .map_err(|()| bad("host"))?;
        outgoing
            .set_path_with_query(Some(&path))
            .map_err(|()| bad("path"))?;
        // Options and a body only when there are some: each is a few host
        // calls per request.
        let timeouts = [
            request.connect_timeout,
            request.first_byte_timeout,
            request.between_bytes_timeout,
        ];
        let options = timeouts.iter().any(Option::is_some).then(|| {
            let options = RequestOptions::new();
            let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            if let Some(t) = request.connect_timeout {
                let _ = options.set_connect_timeout(Some(nanos(t)));
            }
            if let Some(t) = request.first_byte_timeout {
                let _ = options.set_first_byte_timeout(Some(nanos(t)));
            }
            if let Some(t) = request.between_bytes_timeout {
                let _ = options.set_between_bytes_timeout(Some(nanos(t)));
            }
            options
        });
        let body = if request.body.is_empty() {
            None
        } else {
            Some(
                outgoing
                    .body()
                    .map_err(|()| internal(url, "no request body"))?,
            )
        };
        let future =
            outgoing_handler::handle(outgoing, options).map_err(|code| error(url, code))?;
        if let Some(body) = body {
            {
                let stream = body
                    .write()
                    .map_err(|()| internal(url, "no request body stream"))?;
                for chunk in request.body.chunks(4096) {
                    stream
                        .blocking_write_and_flush(chunk)
                        .map_err(|e| match e {
                            StreamError::LastOperationFailed(e) => {
                                match wasip2::http::types::http_error_code(&e) {
                                    Some(code) => error(url, code),
                                    None => internal(url, &e.to_debug_string()),
                                }
                            }
                            StreamError::Closed => internal(url, "the request body was closed"),
                        })?;
                }
            }
            OutgoingBody::finish(body, None).map_err(|code| error(url, code))?;
        }
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(error(url, code)),
            Some(Err(())) | None => return Err(internal(url, "the response was lost")),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| internal(url, "no response body"))?;
        let stream = incoming
            .stream()
            .map_err(|()| internal(url, "no response body stream"))?;
        Ok((
            status,
            headers,
            HttpBody {
                stream: Some(stream),
                _body: Some(incoming),
            },
        ))
    }

    pub(crate) fn http_read(body: &mut HttpBody, max: usize) -> Result<Vec<u8>, Error> {
        let Some(stream) = body.stream.as_ref() else {
            return Ok(Vec::new());
        };
        match stream.blocking_read(u64::try_from(max).unwrap_or(u64::MAX)) {
            Ok(bytes) => Ok(bytes),
            Err(StreamError::Closed) => {
                body.stream = None;
                Ok(Vec::new())
            }
            Err(StreamError::LastOperationFailed(e)) => {
                body.stream = None;
                Err(match wasip2::http::types::http_error_code(&e) {
                    Some(code) => error("the response", code),
                    // wasmtime hands body errors over as text only.
                    None => {
                        let text = e.to_debug_string();
                        if text.contains("body size exceeds limit") {
                            Error::limit_exceeded(format!(
                                "the response body is over the plugin's quota: {text} \
                                 (limits.http_response_bytes)"
                            ))
                        } else if text.contains("timeout") || text.contains("connection") {
                            Error::unavailable(format!("reading the response: {text}"))
                        } else {
                            Error::internal(format!("reading the response: {text}"))
                        }
                    }
                })
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod imports {
    use crate::bindings::sandpipe::connector::log::Level;
    use crate::bindings::sandpipe::connector::sql::{Rows, Value};
    use crate::bindings::sandpipe::connector::types::Error as WitError;
    use crate::bindings::sandpipe::connector::{blob, config, emit, log, meta, sql};

    /// An open object: the engine's `reader` resource.
    pub(crate) type Reader = blob::Reader;

    pub(crate) fn log_write(level: Level, message: &str) -> Result<(), WitError> {
        log::write(level, message)
    }

    pub(crate) fn config_get(key: &str) -> Result<Option<String>, WitError> {
        config::get(key)
    }

    pub(crate) fn config_keys() -> Result<Vec<String>, WitError> {
        config::keys()
    }

    pub(crate) fn blob_open_data() -> Result<Reader, WitError> {
        blob::open_data()
    }

    pub(crate) fn blob_open(location: &str) -> Result<Reader, WitError> {
        blob::open(location)
    }

    pub(crate) fn blob_put(location: &str, bytes: &[u8]) -> Result<(), WitError> {
        blob::put(location, bytes)
    }

    pub(crate) fn reader_read(reader: &mut Reader, max: u32) -> Result<Vec<u8>, WitError> {
        reader.read(max)
    }

    pub(crate) fn reader_size(reader: &Reader) -> Option<u64> {
        reader.size()
    }

    pub(crate) fn meta_all() -> Result<String, WitError> {
        meta::all()
    }

    pub(crate) fn meta_get(key: &str) -> Result<Option<String>, WitError> {
        meta::get(key)
    }

    pub(crate) fn meta_state_get(key: &str) -> Result<Option<Vec<u8>>, WitError> {
        meta::state_get(key)
    }

    pub(crate) fn meta_state_set(key: &str, value: &[u8]) -> Result<(), WitError> {
        meta::state_set(key, value)
    }

    pub(crate) fn meta_state_delete(key: &str) -> Result<(), WitError> {
        meta::state_delete(key)
    }

    pub(crate) fn sql_query(statement: &str, params: &[Value]) -> Result<Rows, WitError> {
        sql::query(statement, params)
    }

    pub(crate) fn sql_execute(statement: &str, params: &[Value]) -> Result<u64, WitError> {
        sql::execute(statement, params)
    }

    pub(crate) fn sql_execute_batch(
        statement: &str,
        batch: &[Vec<Value>],
    ) -> Result<u64, WitError> {
        sql::execute_batch(statement, batch)
    }

    pub(crate) fn emit_publish(
        output: &str,
        payload: &[u8],
        headers: &[(String, String)],
    ) -> Result<(), WitError> {
        emit::publish(output, payload, headers)
    }
}
