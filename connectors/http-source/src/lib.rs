//! A source for a paginated JSON HTTP API, the common shape of REST
//! listings:
//!
//! ```text
//! GET {url}?limit=100                          → {"items": [...], "next": "c2"}
//! GET {url}?limit=100&cursor=c2                → {"items": [...], "next": null}
//! GET {url}?limit=100&updated_since=T[&cursor] → the items changed after T,
//!                                                deleted ones as tombstones
//! ```
//!
//! Each item is a JSON object with an id (`id_field`) and the time it last
//! changed (`updated_field`, compared as text: ISO-8601 in UTC sorts right);
//! a tombstone has `deleted_field` true. A full sync pages through the
//! listing; an incremental sync asks for what changed since the largest
//! `updated_field` the last sync saw (its sync cursor). That largest value
//! travels from page to page inside the page cursor, so the component
//! keeps nothing between calls. The API does not tell a new item from a
//! changed one, so an incremental sync yields both as `update` (and counts
//! them so); tombstones are `delete`.
//!
//! Configuration (the grant's `config`): `url` (required), and the names
//! `id_field` (`id`), `updated_field` (`updated_at`), `deleted_field`
//! (`deleted`), `items_field` (`items`), `next_field` (`next`),
//! `limit_param` (`limit`), `cursor_param` (`cursor`), `since_param`
//! (`updated_since`); `max_page_bytes` (8 MiB), the largest response read.
//! The grant's `http.allow` must name the API.

use sandpipe_sdk::prelude::*;
use sandpipe_sdk::serde_json::{self, Value};
use sandpipe_sdk::source::{
    Document, Operation, Page, PageRequest, Source, SourceDescription, SyncKind,
};
use sandpipe_sdk::{export_source, http};

/// The source.
pub struct HttpSource;

/// The configuration, with its defaults.
struct Settings {
    url: String,
    id_field: String,
    updated_field: String,
    deleted_field: String,
    items_field: String,
    next_field: String,
    limit_param: String,
    cursor_param: String,
    since_param: String,
    max_page_bytes: usize,
}

fn setting(key: &str, default: &str) -> Result<String, Error> {
    Ok(config::get(key)?.unwrap_or_else(|| default.to_owned()))
}

impl Settings {
    fn read() -> Result<Self, Error> {
        let url = config::get("url")?
            .ok_or_else(|| Error::invalid("config `url` is required: the API's listing URL"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::invalid(format!(
                "config `url` must be an http:// or https:// URL, not `{url}`"
            )));
        }
        Ok(Self {
            url,
            id_field: setting("id_field", "id")?,
            updated_field: setting("updated_field", "updated_at")?,
            deleted_field: setting("deleted_field", "deleted")?,
            items_field: setting("items_field", "items")?,
            next_field: setting("next_field", "next")?,
            limit_param: setting("limit_param", "limit")?,
            cursor_param: setting("cursor_param", "cursor")?,
            since_param: setting("since_param", "updated_since")?,
            max_page_bytes: setting("max_page_bytes", "8388608")?
                .parse()
                .map_err(|_| Error::invalid("config `max_page_bytes` must be a number"))?,
        })
    }

    /// The listing's URL with `params` in its query.
    fn url(&self, params: &[(&str, &str)]) -> String {
        let mut url = self.url.clone();
        for (i, (key, value)) in params.iter().enumerate() {
            let sep = if i == 0 && !self.url.contains('?') {
                '?'
            } else {
                '&'
            };
            url.push(sep);
            url.push_str(&encode(key));
            url.push('=');
            url.push_str(&encode(value));
        }
        url
    }

    /// GET `url` as JSON: an `unavailable` error for a status other than
    /// 200 (the job fails and the next one tries again).
    fn get(&self, url: &str) -> Result<Value, Error> {
        let response = http::Request::get(url)
            .header("accept", "application/json")
            .send()?;
        if response.status() != 200 {
            return Err(Error::unavailable(format!(
                "GET {url} answered {}",
                response.status()
            )));
        }
        response.json(self.max_page_bytes)
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the page cursor carries: the API's own cursor and the largest
/// update time seen so far in this sync.
fn split_cursor(cursor: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(cursor) = cursor else {
        return (None, None);
    };
    let parsed: Value = serde_json::from_str(cursor).unwrap_or(Value::Null);
    let text = |key: &str| parsed.get(key).and_then(Value::as_str).map(str::to_owned);
    (text("api"), text("max"))
}

impl Source for HttpSource {
    fn describe() -> SourceDescription {
        SourceDescription {
            name: "http-source".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            config_schema: json!({
                "type": "object",
                "required": ["url"],
                "properties": {
                    "url": {"type": "string", "format": "uri"},
                    "id_field": {"type": "string"},
                    "updated_field": {"type": "string"},
                    "deleted_field": {"type": "string"},
                    "items_field": {"type": "string"},
                    "next_field": {"type": "string"},
                    "limit_param": {"type": "string"},
                    "cursor_param": {"type": "string"},
                    "since_param": {"type": "string"},
                    "max_page_bytes": {"type": "integer"}
                }
            })
            .to_string(),
            incremental: true,
            advanced_rules: false,
        }
    }

    fn validate_config() -> Result<(), Error> {
        Settings::read().map(drop)
    }

    fn ping() -> Result<(), Error> {
        let s = Settings::read()?;
        s.get(&s.url(&[(&s.limit_param, "1")])).map(drop)
    }

    fn get_docs(request: PageRequest) -> Result<Page, Error> {
        let s = Settings::read()?;
        let (api_cursor, mut max) = split_cursor(request.cursor.as_deref());
        let size = request.size.to_string();
        let mut params: Vec<(&str, &str)> = vec![(&s.limit_param, &size)];
        let incremental = request.kind == SyncKind::Incremental;
        if incremental && let Some(since) = request.sync_cursor.as_deref() {
            params.push((&s.since_param, since));
        }
        if let Some(c) = api_cursor.as_deref() {
            params.push((&s.cursor_param, c));
        }
        let url = s.url(&params);
        let body = s.get(&url)?;
        let items = body
            .get(&s.items_field)
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "GET {url}: the answer has no list `{}`",
                    s.items_field
                ))
            })?;
        let mut docs = Vec::with_capacity(items.len());
        for item in items {
            let id = match item.get(&s.id_field) {
                Some(Value::String(id)) => id.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(Error::invalid(format!(
                        "GET {url}: an item without a string or number `{}`",
                        s.id_field
                    )));
                }
            };
            let updated = item
                .get(&s.updated_field)
                .and_then(Value::as_str)
                .map(str::to_owned);
            if let Some(u) = &updated
                && max.as_ref().is_none_or(|m| u > m)
            {
                max = Some(u.clone());
            }
            let deleted = item.get(&s.deleted_field) == Some(&Value::Bool(true));
            let op = match (incremental, deleted) {
                (true, true) => Operation::Delete,
                (true, false) => Operation::Update,
                (false, _) => Operation::Index,
            };
            if deleted && !incremental {
                // A full listing should not hold tombstones; skip them.
                continue;
            }
            docs.push(Document {
                id,
                timestamp: updated,
                body: item.to_string(),
                op,
            });
        }
        let next = body
            .get(&s.next_field)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let last = next.is_none();
        Ok(Page {
            docs,
            next: next.map(|api| json!({ "api": api, "max": max }).to_string()),
            // The largest update time of the whole sync (else the last
            // sync's): where the next incremental sync starts.
            sync_cursor: if last {
                max.or(request.sync_cursor)
            } else {
                None
            },
        })
    }
}

export_source!(HttpSource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("2026-01-01T00:00:00Z"), "2026-01-01T00%3A00%3A00Z");
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn the_page_cursor_carries_the_api_cursor_and_the_largest_time() {
        let cursor = json!({"api": "c2", "max": "2026-01-02"}).to_string();
        assert_eq!(
            split_cursor(Some(&cursor)),
            (Some("c2".into()), Some("2026-01-02".into()))
        );
        assert_eq!(split_cursor(None), (None, None));
    }
}
