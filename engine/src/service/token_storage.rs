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
    let (status, answer) = tokio::time::timeout(TIMEOUT, post_json(&target, body, tls))
        .await
        .map_err(|_| format!("{target}: no answer within {TIMEOUT:?}"))??;
    let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    match (status, answer["success"].as_bool()) {
        (200, Some(true)) => Ok(true),
        (200, Some(false)) if answer["message"] == "ServiceExistsAlreadyError" => Ok(false),
        _ => Err(format!("{target} answered {status}: {answer}")),
    }
}

/// POST `body` as JSON to `target` (`http://` or `https://`, checked
/// against the engine's trusted roots): the status and the body.
async fn post_json(
    target: &str,
    body: &Value,
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
    let request = hyper::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
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
