//! The small HTTP server: `/healthz` (alive), `/readyz` (listener
//! connected, database reachable, plugins loaded; 503 with the reasons
//! otherwise) and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

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

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, String) {
    let problems = ready.report();
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

/// The router (public for tests).
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ready)
}

/// Serve on `addr` until `shutdown` turns true. Returns the bound address
/// (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("server.listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    crate::metrics::describe();
    tokio::spawn(async move {
        let result = axum::serve(listener, router(ready))
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("HTTP server failed: {e}");
        }
    });
    tracing::info!(%bound, "serving /healthz, /readyz, /metrics");
    Ok(bound)
}
