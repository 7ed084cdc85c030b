//! Registration with Sciebo RDS's central token storage
//! (`services.NAME.register`, `token_storage.url`): at start the engine
//! sends each such service, as an OAuth service, to `POST {url}/service`
//! — `servicename`, `authorize_url`, `refresh_url`, `client_id` and
//! `client_secret` (from `secrets`), `implements`, `fileTransferMode`,
//! `fileTransferArchive`, and the optional `displayName`, `infoUrl`,
//! `helpUrl`, `icon` (a `data:` URI of the file), `description` — retrying
//! with a backoff until the token storage takes it; `/readyz` reports
//! `token storage` not ready until every service is registered.
//!
//! The token storage answers 200 with `{"success": true}`, or 200 with
//! `{"success": false, "message": "ServiceExistsAlreadyError"}` for a
//! service registered before (kept as it was: logged, and counted as
//! registered); anything else is retried.

use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

use crate::config::service::{Registration, TransferArchive, TransferMode};

/// The longest one registration request may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The JSON body `POST /service` gets for `registration`.
pub fn body(
    registration: &Registration,
    secrets: &crate::secrets::Secrets,
) -> anyhow::Result<Value> {
    let secret = |name: &str| -> anyhow::Result<String> {
        secrets
            .get(name)
            .map(|s| s.expose().to_owned())
            .ok_or_else(|| anyhow::anyhow!("secret `{name}` was not read"))
    };
    let mut body = json!({
        "servicename": registration.servicename,
        "authorize_url": registration.authorize_url,
        "refresh_url": registration.refresh_url,
        "client_id": secret(&registration.client_id)?,
        "client_secret": secret(&registration.client_secret)?,
        "implements": registration.implements,
        "fileTransferMode": match registration.file_transfer_mode {
            TransferMode::Active => 0,
            TransferMode::Passive => 1,
        },
        "fileTransferArchive": match registration.file_transfer_archive {
            TransferArchive::None => 0,
            TransferArchive::Zip => 1,
        },
    });
    let Some(object) = body.as_object_mut() else {
        anyhow::bail!("not an object");
    };
    for (key, value) in [
        ("displayName", &registration.display_name),
        ("infoUrl", &registration.info_url),
        ("helpUrl", &registration.help_url),
    ] {
        if let Some(value) = value {
            object.insert(key.into(), json!(value));
        }
    }
    if let Some(description) = &registration.description {
        object.insert("description".into(), description.clone());
    }
    if let Some(icon) = &registration.icon {
        let bytes = std::fs::read(icon)
            .map_err(|e| anyhow::anyhow!("cannot read the icon {}: {e}", icon.display()))?;
        let mime = match icon.extension().and_then(|e| e.to_str()) {
            Some("png") => "image/png",
            Some("svg") => "image/svg+xml",
            Some("jpg" | "jpeg") => "image/jpeg",
            Some("gif") => "image/gif",
            _ => "application/octet-stream",
        };
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        object.insert("icon".into(), json!(format!("data:{mime};base64,{data}")));
    }
    Ok(body)
}

/// One registration attempt: `Ok(true)` registered now, `Ok(false)`
/// registered before (kept), `Err` why not.
pub async fn register(url: &str, body: &Value, tls: &crate::tls::Tls) -> Result<bool, String> {
    let target = format!("{}/service", url.trim_end_matches('/'));
    let (status, answer) = tokio::time::timeout(TIMEOUT, request("POST", &target, Some(body), tls))
        .await
        .map_err(|_| format!("{target}: no answer within {TIMEOUT:?}"))??;
    let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    match (status, answer["success"].as_bool()) {
        (200, Some(true)) => Ok(true),
        (200, Some(false)) if answer["message"] == "ServiceExistsAlreadyError" => Ok(false),
        _ => Err(format!("{target} answered {status}: {answer}")),
    }
}

/// `method` `target` (`http://` or `https://`, checked against the
/// engine's trusted roots), with `body` as JSON if any: the status and the
/// body.
async fn request(
    method: &str,
    target: &str,
    body: Option<&Value>,
    tls: &crate::tls::Tls,
) -> Result<(u16, Vec<u8>), String> {
    let uri: hyper::Uri = target
        .parse()
        .map_err(|e| format!("`{target}` is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("`{target}`: http or https only")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{target}` has no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let response = if https {
        let config = tls.web().map_err(|e| format!("{e:#}"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(wasmtime_wasi_http::io::TokioIo::new(stream), request).await?
    } else {
        send(wasmtime_wasi_http::io::TokioIo::new(tcp), request).await?
    };
    Ok(response)
}

async fn send<I>(
    io: I,
    request: hyper::Request<Full<bytes::Bytes>>,
) -> Result<(u16, Vec<u8>), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

/// A token is refreshed this long before it expires.
const EARLY: Duration = Duration::from_secs(30);

/// One user's access token for one service, and when it expires.
#[derive(Clone)]
struct Held {
    access: crate::secrets::Secret,
    expires: Option<std::time::SystemTime>,
}

/// Users' OAuth tokens, read from the token storage
/// (`GET {url}/user/{user}/token/{servicename}`), refreshed through it
/// when expired (`PUT` on the same path, then read again) and kept until
/// they expire. Never given to a guest: `capability::http` puts them in an
/// `Authorization` header of the requests `http.auth`'s `oauth_user`
/// binds.
pub struct UserTokens {
    url: String,
    tls: crate::tls::Tls,
    held: tokio::sync::Mutex<std::collections::HashMap<(String, String), Held>>,
}

impl UserTokens {
    /// The tokens of the token storage at `url`.
    pub fn new(url: &str, tls: crate::tls::Tls) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            tls,
            held: tokio::sync::Mutex::default(),
        }
    }

    /// `user`'s access token for `service`, fresh.
    pub async fn access_token(
        &self,
        user: &str,
        service: &str,
    ) -> Result<crate::secrets::Secret, String> {
        let key = (user.to_owned(), service.to_owned());
        let mut held = self.held.lock().await;
        let fresh = |h: &Held| {
            h.expires
                .is_none_or(|at| at > std::time::SystemTime::now() + EARLY)
        };
        if let Some(token) = held.get(&key).filter(|h| fresh(h)) {
            return Ok(token.access.clone());
        }
        let mut token = self.read(user, service).await?;
        if !fresh(&token) {
            // The token storage refreshes it with the service's refresh URL.
            let target = self.path(user, service);
            let (status, answer) =
                tokio::time::timeout(TIMEOUT, request("PUT", &target, None, &self.tls))
                    .await
                    .map_err(|_| format!("{target}: no answer within {TIMEOUT:?}"))??;
            if status != 200 {
                return Err(format!(
                    "the token storage did not refresh the token of user `{user}` for `{service}` ({status}: {})",
                    String::from_utf8_lossy(&answer)
                ));
            }
            token = self.read(user, service).await?;
            if !fresh(&token) {
                return Err(format!(
                    "the token of user `{user}` for `{service}` is expired, and refreshing it gave none newer"
                ));
            }
        }
        held.insert(key, token.clone());
        Ok(token.access)
    }

    fn path(&self, user: &str, service: &str) -> String {
        let escape = |s: &str| -> String {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        format!(
            "{}/user/{}/token/{}",
            self.url,
            escape(user),
            escape(service)
        )
    }

    async fn read(&self, user: &str, service: &str) -> Result<Held, String> {
        let target = self.path(user, service);
        let (status, answer) =
            tokio::time::timeout(TIMEOUT, request("GET", &target, None, &self.tls))
                .await
                .map_err(|_| format!("{target}: no answer within {TIMEOUT:?}"))??;
        if status == 404 {
            return Err(format!(
                "the token storage has no token of user `{user}` for `{service}`"
            ));
        }
        if status != 200 {
            return Err(format!("{target} answered {status}"));
        }
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|e| format!("{target}: not JSON: {e}"))?;
        // `{"type": "OAuth2Token", "data": {...}}`, or the token itself.
        let data = if answer["data"].is_object() {
            &answer["data"]
        } else {
            &answer
        };
        let access = data["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("{target}: no access_token"))?;
        Ok(Held {
            access: crate::secrets::Secret::new(&format!("oauth:{service}:{user}"), access),
            expires: expiry(&data["expiration_date"]),
        })
    }
}

/// An `expiration_date`: seconds since the epoch, or a date and time as
/// RDS writes it (`2026-12-01 12:00:00[.ffffff][+00:00]`, UTC when no
/// offset is given).
fn expiry(value: &Value) -> Option<std::time::SystemTime> {
    if let Some(seconds) = value.as_f64() {
        return Some(std::time::UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0)));
    }
    let text = value.as_str()?.trim().replace(' ', "T");
    let parsed = chrono::DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|t| t.and_utc())
        })
        .ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(parsed.timestamp().max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_dates_read_as_rds_writes_them_or_as_epoch_seconds() {
        let at = |v: Value| {
            expiry(&v).map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
        };
        assert_eq!(at(json!("1970-01-02 00:00:00")), Some(86_400));
        assert_eq!(at(json!("1970-01-02 00:00:00.123456")), Some(86_400));
        assert_eq!(at(json!("1970-01-02T01:00:00+01:00")), Some(86_400));
        assert_eq!(at(json!(86_400)), Some(86_400));
        assert_eq!(at(json!("soon")), None);
        assert_eq!(at(Value::Null), None);
    }
}
