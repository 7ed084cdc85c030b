//! `http-enrich`: for each message, GET a REST API's answer about it and
//! emit the message's id with that answer; the Rust version of the
//! examples `js-enrich` and `python-enrich`.
//!
//! Config:
//!
//! | key | meaning |
//! |---|---|
//! | `url` | the API's URL; `{id}` is replaced by the message id (percent-encoded), `{meta.KEY}` by a metadata value (needs the `meta` grant) |
//! | `output` | the output the enriched document goes to (granted under `emit`) |
//! | `max_bytes` | the largest answer read (default 1048576); a longer one is `limit-exceeded` |
//!
//! 200 with JSON: emits `{"id": <message id>, "found": <the answer>}` to
//! `output`; 404: skips the message (`not found`); 429 or 5xx: asks for a
//! retry (at least the `retry-after` seconds the API gives, else 5 s); any
//! other status, or an answer that is not JSON: dead-letters the message
//! with the reason. A network failure is `unavailable` (retried); a
//! destination outside the grant's `http.allow` list is `access-denied`.
//!
//! ```yaml
//! outputs:
//!   enriched: { type: dir, path: out }
//! secrets:
//!   api_token: { env: API_TOKEN }
//! plugins:
//!   grants:
//!     http-enrich:
//!       mime: [application/json]
//!       emit: [enriched]
//!       http:
//!         allow: ["https://api.example.org"]
//!         auth: { "https://api.example.org": { bearer: api_token } }
//!       config: { url: "https://api.example.org/items/{id}", output: enriched }
//! ```

use sandpipe_sdk::prelude::*;
use sandpipe_sdk::{config, emit, http, meta, serde_json};

/// The plugin.
pub struct HttpEnrich;

/// The default of `max_bytes`.
pub const MAX_BYTES: usize = 1 << 20;

/// `text` with `{id}` and `{meta.KEY}` filled in, each percent-encoded.
pub fn fill(
    template: &str,
    id: &str,
    meta_value: impl Fn(&str) -> Result<Option<String>, Error>,
) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err(Error::invalid(format!(
                "config `url`: `{{` without `}}` in `{template}`"
            )));
        };
        let name = &after[..end];
        let value = match name {
            "id" => id.to_owned(),
            _ => match name.strip_prefix("meta.") {
                Some(key) => meta_value(key)?.ok_or_else(|| {
                    Error::invalid(format!(
                        "config `url` needs metadata `{key}`, which the message has not"
                    ))
                })?,
                None => {
                    return Err(Error::invalid(format!(
                        "config `url`: unknown placeholder `{{{name}}}` (use {{id}} or {{meta.KEY}})"
                    )));
                }
            },
        };
        out.push_str(&encode(&value));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Percent-encode everything but unreserved characters (RFC 3986).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Plugin for HttpEnrich {
    fn describe() -> Description {
        Description {
            name: "http-enrich".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mime_types: vec!["application/json".into()],
            capabilities: vec![Capability::Config, Capability::Emit, Capability::Meta],
        }
    }

    fn execute(msg: Message) -> Result<Outcome, Error> {
        let template = config::get("url")?
            .ok_or_else(|| Error::invalid("config needs `url` (the API's URL, with {id})"))?;
        let output = config::get("output")?
            .ok_or_else(|| Error::invalid("config needs `output` (an output name)"))?;
        let max = match config::get("max_bytes")? {
            Some(text) => text.parse::<usize>().map_err(|_| {
                Error::invalid(format!("config `max_bytes` is not a number: {text}"))
            })?,
            None => MAX_BYTES,
        };
        let url = fill(&template, &msg.id, meta::get)?;
        let response = http::Request::get(&url)
            .header("accept", "application/json")
            .send()?;
        let status = response.status();
        match status {
            200 => {}
            404 => return Ok(Outcome::skip(format!("{url}: not found"))),
            429 | 500..=599 => {
                let seconds = response
                    .header("retry-after")
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(5);
                return Ok(Outcome::retry_after(
                    seconds.saturating_mul(1000),
                    format!("{url} answered {status}"),
                ));
            }
            other => {
                return Ok(Outcome::DeadLetter(format!("{url} answered {other}")));
            }
        }
        let found = match response.json(max) {
            Ok(found) => found,
            Err(Error::Invalid(why)) => return Ok(Outcome::DeadLetter(why)),
            Err(other) => return Err(other),
        };
        emit::publish_json(
            &output,
            &serde_json::json!({ "id": msg.id, "found": found }),
        )?;
        Ok(Outcome::Done)
    }
}

sandpipe_sdk::export_plugin!(HttpEnrich);

#[cfg(test)]
mod tests {
    use super::*;
    use sandpipe_sdk::testing::{FakeHost, message, run};

    const API: &str = "https://api.example.org/items";

    fn host() -> FakeHost {
        FakeHost::new()
            .config("url", format!("{API}/{{id}}?source={{meta.source}}"))
            .config("output", "enriched")
            .meta("source", "scanner 7")
    }

    #[test]
    fn an_answer_is_emitted_with_the_message_id() {
        let report = run::<HttpEnrich>(
            message("m/1", "application/json"),
            host().http(
                "GET",
                &format!("{API}/m%2F1?source=scanner%207"),
                200,
                r#"{"price": 3}"#,
            ),
        );
        report.assert_done();
        assert_eq!(report.http_requests.len(), 1);
        assert_eq!(
            report.http_requests[0].headers,
            vec![("accept".to_owned(), "application/json".to_owned())]
        );
        let payload: serde_json::Value =
            serde_json::from_slice(&report.emits[0].payload).unwrap_or_default();
        assert_eq!(
            payload,
            serde_json::json!({"id": "m/1", "found": {"price": 3}})
        );
    }

    #[test]
    fn statuses_decide_skip_retry_and_dead_letter() {
        let url = format!("{API}/m1?source=scanner%207");
        for (status, body, expected) in [
            (404, "", Outcome::skip(format!("{url}: not found"))),
            (
                503,
                "",
                Outcome::retry_after(5000, format!("{url} answered 503")),
            ),
            (403, "", Outcome::DeadLetter(format!("{url} answered 403"))),
        ] {
            let report = run::<HttpEnrich>(
                message("m1", "application/json"),
                host().http("GET", &url, status, body),
            );
            assert_eq!(report.outcome, Ok(expected), "{status}");
            assert!(report.emits.is_empty());
        }
        let report = run::<HttpEnrich>(
            message("m1", "application/json"),
            host().http("GET", &url, 200, "not json"),
        );
        assert!(
            matches!(report.outcome, Ok(Outcome::DeadLetter(ref why)) if why.contains("is not JSON")),
            "{report}"
        );
    }

    #[test]
    fn a_request_nothing_answers_is_denied_and_bad_templates_are_invalid() {
        let report = run::<HttpEnrich>(message("m1", "application/json"), host());
        assert!(
            matches!(report.outcome, Err(Error::AccessDenied(_))),
            "{report}"
        );
        let report = run::<HttpEnrich>(
            message("m1", "application/json"),
            host().config("url", format!("{API}/{{nope}}")),
        );
        assert!(
            matches!(report.outcome, Err(Error::Invalid(ref why)) if why.contains("{nope}")),
            "{report}"
        );
    }
}
