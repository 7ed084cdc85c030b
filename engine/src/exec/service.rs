//! `sandpipe exec` of a `service` component: `on-connect` with the given
//! configuration, then one call — a query (`--query`: its replies are
//! listed), an event (`--event`) or a request to a declared route
//! (`--request`: the response is shown) — on one warm instance, with the
//! same private backends, grants, limits and host-call journal as a
//! plugin's exec. `--record` and `replay` work the same way.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{ExecArgs, Report, read, usage};
use crate::capability::{HostState, MessageContext, PluginContext};
use crate::sandbox::bindings::{Event, Query, Request};
use crate::sandbox::{LoadedComponent, Sandbox, Session};
use crate::service::reply::{Frame, Reply};
use crate::service::{Call, Output, wasm_call};

/// The call `exec` makes of a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceCall {
    /// `query`, `event` or `request`.
    pub kind: String,
    /// The query, event or request, as JSON.
    pub body: Json,
    /// What `on-connect` gets.
    pub connect: Json,
    /// The source, if given (default: the component's name).
    pub source: Option<String>,
}

impl ServiceCall {
    /// The call `exec`'s arguments name, if any.
    pub fn from_args(args: &ExecArgs) -> anyhow::Result<Option<Self>> {
        let (kind, file) = match (&args.query, &args.event, &args.request) {
            (Some(f), _, _) => ("query", f),
            (_, Some(f), _) => ("event", f),
            (_, _, Some(f)) => ("request", f),
            _ => return Ok(None),
        };
        let json = |file: &Path, what: &str| -> anyhow::Result<Json> {
            serde_json::from_slice(&read(file, what)?)
                .map_err(|e| usage(format!("{}: not JSON: {e}", file.display())))
        };
        let body = json(file, kind)?;
        let connect = match &args.connect {
            Some(file) => json(file, "the configuration")?,
            None => json!({}),
        };
        if !connect.is_object() {
            return Err(usage("--connect: the configuration must be a JSON object"));
        }
        Ok(Some(Self {
            kind: kind.to_owned(),
            body,
            connect,
            source: args.source.clone(),
        }))
    }

    /// A request's JSON as the world's record.
    fn request(&self) -> anyhow::Result<Request> {
        let pairs = |key: &str| -> Vec<(String, String)> {
            match &self.body[key] {
                Json::Object(map) => map
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                        )
                    })
                    .collect(),
                Json::Array(items) => items
                    .iter()
                    .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let text = |key: &str| self.body[key].as_str().map(str::to_owned);
        let path = text("path").ok_or_else(|| usage("--request: give at least `path`"))?;
        Ok(Request {
            method: text("method")
                .unwrap_or_else(|| "GET".into())
                .to_ascii_uppercase(),
            route: text("route").unwrap_or_else(|| path.clone()),
            path,
            params: pairs("params"),
            query: pairs("query"),
            headers: pairs("headers"),
            body: match &self.body["body"] {
                Json::Null => Vec::new(),
                Json::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            },
            parts: Vec::new(),
        })
    }
}

/// Run `call` on `component` and report it.
pub async fn run(
    path: &Path,
    inputs: &super::Inputs,
    call: &ServiceCall,
    sandbox: &Arc<Sandbox>,
    component: LoadedComponent,
    context: Arc<PluginContext>,
    grants: Vec<String>,
) -> anyhow::Result<Report> {
    let source = call.source.clone().unwrap_or_else(|| inputs.name.clone());
    let shown = MessageContext {
        id: format!("{} on source `{source}`", call.kind),
        kind: format!("service/{}", call.kind),
        ..MessageContext::default()
    };
    let mut report = Report::new(path, &inputs.name, &component.sha256, &shown, grants);
    let limits = context.limits.clone();
    let (described, _, _) = sandbox
        .describe_service(&component, &limits, HostState::new(context.clone(), None))
        .await;
    match described {
        Ok(d) => report.plugin.version = d.version,
        Err(failure) => {
            report.fail_describe(&failure);
            return Ok(report);
        }
    }
    let mut session = Session::new(sandbox.clone(), &component, context.clone())?;
    // on-connect, as the engine does before a fresh instance serves.
    let connect = Call::Connect {
        source: source.clone(),
        config: call.connect.to_string(),
    };
    let (connected, _, _) = session
        .call(None, move |instance, store| {
            Box::pin(wasm_call(instance, store, connect))
        })
        .await;
    match connected {
        Ok(Ok(_)) => {}
        other => {
            let why = match other {
                Ok(Err(e)) => crate::pipeline::wit_error_text(&e),
                Err(f) => f.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            report
                .notes
                .push(format!("on-connect({source}) failed: {why}"));
            report.outcome.detail = format!("on-connect failed: {why}");
            return Ok(report);
        }
    }
    let mut host = HostState::new(context, None);
    host.journal = Some(Vec::new());
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel::<Frame>(1024);
    let collect = tokio::spawn(async move {
        let mut frames = Vec::new();
        while let Some(frame) = frames_rx.recv().await {
            frames.push(frame.to_json());
        }
        frames
    });
    let (reply, shared) = Reply::new(frames_tx, crate::service::reply::DEFAULT_MAX_BYTES);
    let body = call.body.to_string();
    let the_call = match call.kind.as_str() {
        "query" => Call::Query(
            Query {
                source,
                body,
                headers: Vec::new(),
            },
            reply,
        ),
        "event" => Call::Publish(Event {
            source,
            body,
            headers: Vec::new(),
        }),
        _ => Call::Request(call.request()?),
    };
    let (result, host, cost) = session
        .call_with(host, move |instance, store| {
            Box::pin(wasm_call(instance, store, the_call))
        })
        .await;
    let last = shared.close();
    let outcome = match result {
        Ok(Ok(output)) => {
            if let Output::Response(response) = output {
                report.response = Some(json!({
                    "status": response.status,
                    "headers": response.headers,
                    "body": String::from_utf8_lossy(&response.body),
                }));
            }
            Ok(Ok(crate::sandbox::bindings::Outcome::Done))
        }
        Ok(Err(e)) => Ok(Err(e)),
        Err(f) => Err(f),
    };
    report.finish(outcome, &host, &cost);
    host.effects.discard().await;
    let mut frames = collect.await.unwrap_or_default();
    if call.kind == "query" {
        match last {
            Some(last) => frames.push(last.to_json()),
            None if report.exit_code == super::EXIT_OK => {
                report
                    .notes
                    .push("the query ended without a final reply: the engine answers it with an error (io.sandpipe.service.noReply)".into());
                report.exit_code = super::EXIT_FAILED;
                report.outcome.status = "failed".into();
                report.outcome.detail = "no final reply".into();
            }
            None => {}
        }
        if frames.last().is_some_and(|f| f["status"] == 400) {
            report.exit_code = super::EXIT_FAILED;
        }
        report.replies = frames;
    }
    if report.exit_code == super::EXIT_OK {
        report.outcome.status = "ok".into();
    }
    Ok(report)
}
