//! The Vantiq-protocol transport: the engine is the connector's client
//! of a Vantiq server (docs/services.md, "Vantiq"). One WebSocket per
//! source, to `/api/v1/wsock/websocket`, JSON text frames:
//!
//! ```text
//! → {"op":"validate","resourceName":"system.credentials","object":TOKEN}
//! ← {"status":200}
//! → {"op":"connectExtension","resourceName":"sources","resourceId":SOURCE,
//!    "parameters":{"reconnectSecret":SECRET}}
//! ← {"op":"configureExtension","object":{"config":{...}}}   → on-connect
//! ← {"op":"publish","object":{...}}                          → on-publish
//! ← {"op":"query","object":{...},"messageHeaders":{"REPLY_ADDR_HEADER":A}}
//! → {"status":100|200|204|400,"headers":{"X-Reply-Address":A},"body":...}
//! → {"op":"notification","resourceName":"sources","resourceId":SOURCE,"object":{...}}
//! ← {"op":"reconnectRequired"}                                → on-close, reconnect
//! ```
//!
//! A dropped socket, a refused connect or `reconnectRequired` closes the
//! source (`on-close` before the instances' next call) and connects again
//! after a backoff (none after `reconnectRequired`), with the same
//! reconnect secret. Queries in flight when the socket drops lose their
//! receiver: the guest's next `partial` fails and the query ends.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::{Frame, Service};
use crate::config::service::VantiqConfig;

/// The header a query's reply carries its address back in.
pub const REPLY_ADDRESS: &str = "X-Reply-Address";
/// Where a query frame carries the reply address.
pub const REPLY_ADDRESS_KEY: &str = "REPLY_ADDR_HEADER";
/// Frames waiting to be written to one socket.
const OUTGOING: usize = 64;
/// Events and queries of one connection being handled at once; the next
/// frame is read when one ends.
const IN_FLIGHT: usize = 64;
/// The largest frame read from the server.
const MAX_FRAME: usize = 16 << 20;
/// The longest the WebSocket handshake and authentication may take.
const HANDSHAKE: Duration = Duration::from_secs(30);

/// The WebSocket URL of a Vantiq server's `url`: `http` becomes `ws`,
/// `https` `wss`, and the path `/api/v1/wsock/websocket` (as Vantiq's
/// Python connector SDK does).
pub fn websocket_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL"))?;
    let scheme = match scheme {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(format!("`{other}` is not http(s) or ws(s)")),
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(format!("{scheme}://{host}/api/v1/wsock/websocket"))
}

/// How one connection ended.
#[derive(Debug)]
enum Ended {
    /// The engine is stopping.
    Shutdown,
    /// The server asked for a reconnect.
    ReconnectRequired,
    /// The server closed the socket.
    Closed,
}

/// Run `service`'s connections to the Vantiq server, one task per source,
/// until `shutdown`.
pub fn spawn(
    service: Arc<Service>,
    config: VantiqConfig,
    token: crate::secrets::Secret,
    tls: &crate::tls::Tls,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let url = websocket_url(&config.url)
        .map_err(|e| anyhow::anyhow!("services.{}.vantiq.url: {e}", service.name()))?;
    let tls = if url.starts_with("wss://") {
        Some(tls.web()?)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for source in &config.sources {
        let link = Link {
            service: service.clone(),
            url: url.clone(),
            token: token.clone(),
            source: source.clone(),
            secret: format!("{source}_{}", uuid::Uuid::new_v4()),
            config: config.clone(),
            tls: tls.clone(),
        };
        service.link_attempt(source);
        tasks.push(tokio::spawn(link.run(shutdown.clone())));
    }
    Ok(tasks)
}

/// One source's connection.
struct Link {
    service: Arc<Service>,
    url: String,
    token: crate::secrets::Secret,
    source: String,
    secret: String,
    config: VantiqConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Link {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let epoch = self.service.link_attempt(&self.source);
            let ended = self.connection(epoch, &mut shutdown).await;
            if matches!(ended, Ok(Ended::Shutdown)) {
                // `Service::close` closes the sources.
                break;
            }
            self.service.disconnect(&self.source);
            let backoff = |failures: u32| {
                self.config
                    .reconnect
                    .saturating_mul(1 << failures.saturating_sub(1).min(16))
                    .min(self.config.reconnect_max)
            };
            let (wait, note) = match ended {
                Ok(Ended::ReconnectRequired) => {
                    tracing::info!(service = %self.service.name(), source = %self.source, "Vantiq asked for a reconnect");
                    failures = 0;
                    (Duration::ZERO, "reconnecting".to_owned())
                }
                // A server that accepts and closes at once is dialled
                // again at the pace of failures, not in a loop.
                Ok(Ended::Closed) => {
                    failures = failures.saturating_add(1);
                    (
                        backoff(failures),
                        "the server closed the connection".to_owned(),
                    )
                }
                Ok(Ended::Shutdown) => break,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(service = %self.service.name(), source = %self.source, "Vantiq connection: {e}; again in {wait:?}");
                    metrics::counter!(crate::metrics::RECONNECTS, "backend" => "vantiq")
                        .increment(1);
                    (wait, e)
                }
            };
            self.service
                .link_state(&self.source, epoch, false, Some(note));
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let epoch = self.service.link_attempt(&self.source);
        self.service
            .link_state(&self.source, epoch, false, Some("stopped".into()));
    }

    /// One connection, from the handshake to its end.
    async fn connection(
        &self,
        epoch: u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, String> {
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let mut limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        limits.max_message_size = Some(MAX_FRAME);
        limits.max_frame_size = Some(MAX_FRAME);
        let handshake = tokio_tungstenite::connect_async_tls_with_config(
            self.url.as_str(),
            Some(limits),
            // Frames are small and many (a partial reply each): no Nagle.
            true,
            connector,
        );
        let mut socket = tokio::select! {
            () = async { drop(shutdown.wait_for(|stop| *stop).await) } => return Ok(Ended::Shutdown),
            connected = tokio::time::timeout(HANDSHAKE, handshake) => match connected {
                Err(_) => return Err(format!("cannot connect to {}: no answer within {HANDSHAKE:?}", self.url)),
                Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", self.url)),
                Ok(Ok((socket, _))) => socket,
            },
        };
        let send = |value: Value| Message::Text(value.to_string().into());
        socket
            .send(send(json!({
                "op": "validate",
                "resourceName": "system.credentials",
                "object": self.token.expose(),
            })))
            .await
            .map_err(|e| format!("cannot authenticate: {e}"))?;
        match next_json(&mut socket).await? {
            Some(reply) if reply["status"] == 200 => {}
            Some(reply) => {
                return Err(format!(
                    "the server refused the token (services.{}.vantiq.token): {}",
                    self.service.name(),
                    error_text(&reply)
                ));
            }
            None => return Err("the server closed the connection during authentication".into()),
        }
        socket
            .send(send(json!({
                "op": "connectExtension",
                "resourceName": "sources",
                "resourceId": self.source,
                "parameters": { "reconnectSecret": self.secret },
            })))
            .await
            .map_err(|e| format!("cannot connect source `{}`: {e}", self.source))?;
        let (out, mut outgoing) = mpsc::channel::<Value>(OUTGOING);
        let turns = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut notifications = self.service.notifications().follow();
        let mut ping = tokio::time::interval(self.config.ping.unwrap_or(Duration::from_secs(3600)));
        ping.tick().await;
        loop {
            tokio::select! {
                () = async { drop(shutdown.wait_for(|stop| *stop).await) } => {
                    let _ = socket.close(None).await;
                    return Ok(Ended::Shutdown);
                }
                // A turn first, then a frame: with every turn taken, the
                // connection still writes replies and notifications.
                turn = turns.clone().acquire_owned(), if held.is_none() => {
                    held = turn.ok();
                }
                frame = socket.next(), if held.is_some() => {
                    let text = match frame {
                        None | Some(Ok(Message::Close(_))) => return Ok(Ended::Closed),
                        Some(Err(e)) => return Err(format!("the connection failed: {e}")),
                        Some(Ok(Message::Text(text))) => text.to_string(),
                        Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                        Some(Ok(_)) => continue,
                    };
                    let message: Value = match serde_json::from_str(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(service = %self.service.name(), source = %self.source, "a frame that is not JSON: {e}");
                            continue;
                        }
                    };
                    let Some(turn) = held.take() else { continue };
                    if let Some(ended) = self.dispatch(message, &out, epoch, turn)? {
                        return Ok(ended);
                    }
                }
                Some(reply) = outgoing.recv() => {
                    socket.send(send(reply)).await.map_err(|e| format!("cannot send: {e}"))?;
                }
                notification = notifications.recv() => {
                    match notification {
                        Ok(n) if n.source == self.source => {
                            let frame = json!({
                                "op": "notification",
                                "resourceName": "sources",
                                "resourceId": self.source,
                                "object": n.body,
                            });
                            socket.send(send(frame)).await.map_err(|e| format!("cannot send: {e}"))?;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(service = %self.service.name(), source = %self.source, missed, "notifications dropped: the connection fell behind");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                    }
                }
                _ = ping.tick(), if self.config.ping.is_some() => {
                    socket.send(Message::Ping(Vec::new().into())).await.map_err(|e| format!("cannot ping: {e}"))?;
                }
            }
        }
    }

    /// Act on one message from the server; `Some` when it ends the
    /// connection.
    fn dispatch(
        &self,
        message: Value,
        out: &mpsc::Sender<Value>,
        epoch: u64,
        turn: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<Ended>, String> {
        let service = &self.service;
        let source = self.source.clone();
        let headers = |message: &Value| -> Vec<(String, String)> {
            message["messageHeaders"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        match message["op"].as_str() {
            Some("configureExtension") => {
                let Some(config) = message["object"].get("config").filter(|c| c.is_object()) else {
                    return Err(format!(
                        "a malformed configureExtension for source `{source}`: no object `object.config`"
                    ));
                };
                service.reconfigure(&source, config.to_string())?;
                let service = service.clone();
                tokio::spawn(async move {
                    let _turn = turn;
                    match service.start().await {
                        Ok(()) => service.link_state(&source, epoch, true, None),
                        Err(e) => service.link_state(&source, epoch, false, Some(e)),
                    }
                });
            }
            Some("publish") => {
                let (service, event, headers) = (
                    service.clone(),
                    message["object"].to_string(),
                    headers(&message),
                );
                tokio::spawn(async move {
                    let _turn = turn;
                    if let Err(e) = service.publish(source.clone(), event, headers).await {
                        tracing::warn!(service = %service.name(), %source, "a published event failed: {e}");
                    }
                });
            }
            Some("query") => {
                let address = message["messageHeaders"][REPLY_ADDRESS_KEY]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let mut frames =
                    service.query(source, message["object"].to_string(), headers(&message));
                let out = out.clone();
                tokio::spawn(async move {
                    let _turn = turn;
                    while let Some(frame) = frames.recv().await {
                        let last = frame.is_final();
                        if out.send(reply(&frame, &address)).await.is_err() || last {
                            break;
                        }
                    }
                });
            }
            Some("reconnectRequired") => return Ok(Some(Ended::ReconnectRequired)),
            Some(other) => {
                tracing::warn!(service = %service.name(), %source, "an unknown op `{other}` from the server");
            }
            None => {
                if message["status"].as_u64().is_some_and(|s| s >= 300) {
                    tracing::warn!(service = %service.name(), %source, "the server reports an error: {}", error_text(&message));
                }
            }
        }
        Ok(None)
    }
}

/// A query reply frame for reply address `address`.
pub fn reply(frame: &Frame, address: &str) -> Value {
    let mut reply = frame.to_json();
    if let Some(object) = reply.as_object_mut() {
        object.insert("headers".into(), json!({ REPLY_ADDRESS: address }));
    }
    reply
}

/// The text of an error frame (`body: [{code, message}]`), or the frame.
fn error_text(frame: &Value) -> String {
    match frame["body"].get(0) {
        Some(error) => format!(
            "status {}: {}: {}",
            frame["status"],
            error["code"].as_str().unwrap_or("?"),
            error["message"].as_str().unwrap_or("?")
        ),
        None => frame.to_string(),
    }
}

/// The next JSON message, skipping pings; `None` when the socket closed.
async fn next_json<S>(socket: &mut S) -> Result<Option<Value>, String>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let wait = Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout(wait, socket.next())
            .await
            .map_err(|_| format!("no answer within {wait:?}"))?;
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(e)) => return Err(format!("the connection failed: {e}")),
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Ok(_)) => continue,
        };
        return serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("a frame that is not JSON: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_become_the_websocket_endpoint() {
        assert_eq!(
            websocket_url("https://dev.vantiq.com").unwrap(),
            "wss://dev.vantiq.com/api/v1/wsock/websocket"
        );
        assert_eq!(
            websocket_url("http://127.0.0.1:8080/ui/index.html?x=1").unwrap(),
            "ws://127.0.0.1:8080/api/v1/wsock/websocket"
        );
        assert!(websocket_url("ftp://x").is_err());
        assert!(websocket_url("https://").is_err());
    }

    #[test]
    fn a_reply_carries_its_address() {
        let frame = reply(&Frame::Empty, "addr-1");
        assert_eq!(
            frame,
            json!({"status": 204, "headers": {"X-Reply-Address": "addr-1"}})
        );
        let error = json!({"status": 401, "body": [{"code": "authFailure", "message": "invalid authToken"}]});
        assert_eq!(
            error_text(&error),
            "status 401: authFailure: invalid authToken"
        );
    }
}
