//! Outbound HTTP requests, sent by the engine through `wasi:http`. Requires
//! the `http` grant, whose `allow` list names every destination:
//!
//! ```yaml
//! plugins:
//!   grants:
//!     enrich:
//!       http: { allow: ["https://api.example.org"] }
//! ```
//!
//! A request elsewhere fails with [`Error::AccessDenied`]; so does one to a
//! name that resolves to a loopback, private or link-local address the
//! list does not name literally. The engine does not follow redirects: a
//! 3xx comes back as it is, and following it is a new request, checked
//! against the list again. Quotas (`limits.http_requests`,
//! `limits.http_request_bytes`, `limits.http_response_bytes`) fail with
//! [`Error::LimitExceeded`]; an unreachable or slow peer with
//! [`Error::Unavailable`] (every wait ends at the invocation's deadline).
//!
//! The response body is a stream: read it in chunks with
//! [`Response::read`], or whole, up to a size you choose, with
//! [`Response::bytes`], [`Response::text`] or [`Response::json`].
//!
//! ```no_run
//! use sandpipe_sdk::http;
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! let response = http::Request::get("https://api.example.org/v1/items/42")
//!     .header("accept", "application/json")
//!     .send()?;
//! if response.status() == 200 {
//!     let item = response.json(1 << 20)?;
//!     sandpipe_sdk::log::info(&format!("item: {item}"))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! In unit tests ([`testing`](crate::testing)) requests are answered by
//! the canned responses of [`FakeHost::http`](crate::testing::FakeHost::http).

use std::time::Duration;

use crate::{Error, host};

/// An HTTP request, built step by step and sent with [`Request::send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method (`GET`, `POST`, ...).
    pub method: String,
    /// The whole URL: `https://host[:port]/path?query`.
    pub url: String,
    /// Headers, in order (`host` is set by the engine).
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
    /// How long to wait for the connection (the engine clamps every wait
    /// to the invocation's deadline).
    pub connect_timeout: Option<Duration>,
    /// How long to wait for the response's first byte.
    pub first_byte_timeout: Option<Duration>,
    /// How long to wait between two chunks of the response body.
    pub between_bytes_timeout: Option<Duration>,
}

impl Request {
    /// A request with `method` to `url`.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_ascii_uppercase(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            connect_timeout: None,
            first_byte_timeout: None,
            between_bytes_timeout: None,
        }
    }

    /// A `GET` of `url`.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` to `url`.
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// A `PUT` to `url`.
    pub fn put(url: &str) -> Self {
        Self::new("PUT", url)
    }

    /// A `DELETE` of `url`.
    pub fn delete(url: &str) -> Self {
        Self::new("DELETE", url)
    }

    /// Add a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Set the body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Set the body to `value` as JSON, with `content-type:
    /// application/json`.
    #[must_use]
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Set how long to wait for the response's first byte.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = Some(timeout);
        self
    }

    /// Send the request; the response comes back once its head has
    /// arrived, its body still streaming.
    pub fn send(self) -> Result<Response, Error> {
        let (status, headers, body) = host::http_send(&self)?;
        Ok(Response {
            status,
            headers,
            body,
            url: self.url,
        })
    }

    /// The URL in parts: scheme, authority (`host[:port]`) and path with
    /// query (`/` when empty); the fragment is dropped.
    pub(crate) fn parts(&self) -> Result<(String, String, String), Error> {
        let (scheme, rest) = self.url.split_once("://").ok_or_else(|| {
            Error::invalid(format!(
                "`{}` is not an absolute http(s) URL (scheme://host/path)",
                self.url
            ))
        })?;
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(Error::invalid(format!("`{}` has no host", self.url)));
        }
        let path = if path.is_empty() {
            "/".to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok((scheme.to_ascii_lowercase(), authority.to_owned(), path))
    }
}

/// What the host answers a request with: status, headers, body.
pub(crate) type Answer = (u16, Vec<(String, String)>, host::HttpBody);

/// `GET url`.
pub fn get(url: &str) -> Result<Response, Error> {
    Request::get(url).send()
}

/// A response: its status and headers, and its body as a stream.
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: host::HttpBody,
    url: String,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Every header, in order, names in lowercase.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Read the next bytes of the body into `buf`; 0 at its end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let chunk = host::http_read(&mut self.body, buf.len())?;
        buf[..chunk.len()].copy_from_slice(&chunk);
        Ok(chunk.len())
    }

    /// The next chunk of the body, at most `max` bytes (what has arrived,
    /// waiting for at least one byte); empty at its end.
    pub fn read_chunk(&mut self, max: usize) -> Result<Vec<u8>, Error> {
        host::http_read(&mut self.body, max)
    }

    /// The whole body, if it is at most `max` bytes
    /// ([`Error::LimitExceeded`] otherwise, having read at most `max + 1`).
    pub fn bytes(mut self, max: usize) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        loop {
            let room = (max - body.len()).saturating_add(1).min(64 * 1024);
            let chunk = self.read_chunk(room)?;
            if chunk.is_empty() {
                return Ok(body);
            }
            if body.len() + chunk.len() > max {
                return Err(Error::limit_exceeded(format!(
                    "the response from {} is longer than {max} bytes",
                    self.url
                )));
            }
            if body.is_empty() {
                body = chunk;
            } else {
                body.extend_from_slice(&chunk);
            }
        }
    }

    /// The whole body as UTF-8 text, if it is at most `max` bytes.
    pub fn text(self, max: usize) -> Result<String, Error> {
        let url = self.url.clone();
        String::from_utf8(self.bytes(max)?)
            .map_err(|_| Error::invalid(format!("the response from {url} is not UTF-8")))
    }

    /// The whole body as JSON, if it is at most `max` bytes.
    pub fn json(self, max: usize) -> Result<serde_json::Value, Error> {
        let url = self.url.clone();
        serde_json::from_slice(&self.bytes(max)?)
            .map_err(|e| Error::invalid(format!("the response from {url} is not JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let parts = |url: &str| Request::get(url).parts();
        assert_eq!(
            parts("HTTPS://api.example.org:8443/a/b?c=1#frag").unwrap(),
            (
                "https".to_owned(),
                "api.example.org:8443".to_owned(),
                "/a/b?c=1".to_owned()
            )
        );
        assert_eq!(
            parts("http://[::1]:80").unwrap(),
            ("http".to_owned(), "[::1]:80".to_owned(), "/".to_owned())
        );
        assert_eq!(parts("http://h?x").unwrap().2, "/?x");
        assert!(matches!(parts("api.example.org/x"), Err(Error::Invalid(_))));
        assert!(matches!(parts("https:///x"), Err(Error::Invalid(_))));
    }
}
