//! A Vantiq-style source over one PostgreSQL table: queries are answered
//! in partial pages, published events are written into the table.
//!
//! Query (JSON): `{"select": ["id", "total"], "where": {"status": "open"},
//! "limit": 1000}` — every key optional: all columns, every row, no limit.
//! The rows go out ordered by `id` in partial replies of `page_size` rows
//! (default 100), the last page as the `complete` reply (`empty` when
//! there is no row). A query naming a key, column or value it cannot use
//! is answered with an error reply, `io.sandpipe.tableService.badQuery`,
//! whose template names what is wrong (`{0}`) and what would do (`{1}`).
//!
//! Event (JSON): a row, `{"id": "o-1", "customer": "c", "total": 5,
//! "status": "open"}`, upserted by `id`; `{"delete": "o-1"}` deletes one.
//!
//! Configuration (the grant's `config`): `table` (default `orders`),
//! `page_size` (100). The grant needs `sql` (the table lives in the
//! service's own schema; `init.sql` makes the example's).

use std::collections::BTreeMap;

use sandpipe_sdk::prelude::*;
use sandpipe_sdk::serde_json::{Map, Value};
use sandpipe_sdk::service::{Event, Query, Reply, Service, ServiceDescription};
use sandpipe_sdk::sql::Value as Sql;

/// The service.
pub struct TableService;

const BAD_QUERY: &str = "io.sandpipe.tableService.badQuery";

/// The table's columns and their types, by name.
fn columns(table: &str) -> Result<BTreeMap<String, String>, Error> {
    let rows = sql::query(
        "SELECT column_name, data_type FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1",
        &params![table],
    )?;
    let columns: BTreeMap<String, String> = rows
        .iter()
        .filter_map(|r| {
            Some((
                r.get_str("column_name")?.to_owned(),
                r.get_str("data_type")?.to_owned(),
            ))
        })
        .collect();
    if !columns.contains_key("id") {
        return Err(Error::invalid(format!(
            "table `{table}` does not exist in the service's schema, or has no `id` column"
        )));
    }
    Ok(columns)
}

fn table() -> Result<String, Error> {
    let table = config::get("table")?.unwrap_or_else(|| "orders".into());
    if table.is_empty()
        || !table
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::invalid(format!(
            "config `table` = `{table}`: lower-case letters, digits and `_` only"
        )));
    }
    Ok(table)
}

/// A JSON value as the text of an SQL parameter (cast to the column's
/// type in the statement); `None` for null.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// An SQL value as JSON.
fn json_of(value: &Sql) -> Value {
    match value {
        Sql::Null => Value::Null,
        Sql::Boolean(b) => json!(b),
        Sql::Int(i) => json!(i),
        Sql::Float(f) => json!(f),
        Sql::Text(s) => json!(s),
        Sql::Json(s) => sandpipe_sdk::serde_json::from_str(s).unwrap_or(Value::Null),
        Sql::Timestamp(t) => json!(t),
        Sql::Bytes(b) => json!(b),
    }
}

/// Why a query cannot be run: (what, what would do).
type Bad = (String, String);

/// The statement and parameters of one page of `query`, after `after`.
#[derive(Debug)]
struct Plan {
    select: Vec<String>,
    filters: Vec<(String, String, Option<String>)>,
    limit: Option<u64>,
}

fn plan(query: &Value, columns: &BTreeMap<String, String>) -> Result<Plan, Bad> {
    let known = || columns.keys().cloned().collect::<Vec<_>>().join(", ");
    let Some(object) = query.as_object() else {
        return Err((
            "a query that is not a JSON object".into(),
            "{\"select\", \"where\", \"limit\"}".into(),
        ));
    };
    for key in object.keys() {
        if !["select", "where", "limit"].contains(&key.as_str()) {
            return Err((format!("the key `{key}`"), "select, where, limit".into()));
        }
    }
    let select: Vec<String> = match object.get("select") {
        None => columns.keys().cloned().collect(),
        Some(Value::Array(names)) => {
            let mut select = Vec::new();
            for name in names {
                let Some(name) = name.as_str().filter(|n| columns.contains_key(*n)) else {
                    return Err((format!("the column {name}"), known()));
                };
                select.push(name.to_owned());
            }
            select
        }
        Some(other) => {
            return Err((
                format!("`select` = {other}"),
                "a list of column names".into(),
            ));
        }
    };
    let mut filters = Vec::new();
    match object.get("where") {
        None => {}
        Some(Value::Object(conditions)) => {
            for (name, value) in conditions {
                let Some(kind) = columns.get(name) else {
                    return Err((format!("the column `{name}`"), known()));
                };
                if value.is_object() || value.is_array() {
                    return Err((
                        format!("`where.{name}` = {value}"),
                        "a string, number, boolean or null".into(),
                    ));
                }
                filters.push((name.clone(), kind.clone(), text(value)));
            }
        }
        Some(other) => {
            return Err((
                format!("`where` = {other}"),
                "an object of column: value".into(),
            ));
        }
    }
    let limit = match object.get("limit") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| (format!("`limit` = {v}"), "a whole number".into()))?,
        ),
    };
    Ok(Plan {
        select,
        filters,
        limit,
    })
}

impl Plan {
    /// One page: rows with `id` after `after`, at most `size`.
    fn page(
        &self,
        table: &str,
        after: Option<&str>,
        size: u64,
    ) -> Result<Vec<Map<String, Value>>, Error> {
        let mut params: Vec<Sql> = Vec::new();
        let mut conditions = Vec::new();
        for (name, kind, value) in &self.filters {
            match value {
                None => conditions.push(format!("\"{name}\" IS NULL")),
                Some(v) => {
                    params.push(Sql::from(v.as_str()));
                    conditions.push(format!(
                        "\"{name}\" = CAST(${}::text AS {kind})",
                        params.len()
                    ));
                }
            }
        }
        if let Some(after) = after {
            params.push(Sql::from(after));
            conditions.push(format!("id > ${}", params.len()));
        }
        let columns: Vec<String> = self.select.iter().map(|c| format!("\"{c}\"")).collect();
        let statement = format!(
            "SELECT id AS \"__id\", {} FROM \"{table}\"{} ORDER BY id LIMIT {size}",
            columns.join(", "),
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            },
        );
        let rows = sql::query(&statement, &params)?;
        Ok(rows
            .iter()
            .map(|row| {
                row.columns()
                    .iter()
                    .zip(row.values())
                    .map(|(c, v)| (c.clone(), json_of(v)))
                    .collect()
            })
            .collect())
    }
}

impl Service for TableService {
    fn describe() -> ServiceDescription {
        ServiceDescription {
            name: "table-service".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            routes: Vec::new(),
        }
    }

    fn on_connect(_source: String, _config: String) -> Result<(), Error> {
        // The table must be there: a missing one fails the connect, and
        // the engine reports the service not ready, naming it.
        columns(&table()?).map(drop)
    }

    fn on_query(query: Query, reply: Reply) -> Result<(), Error> {
        let table = table()?;
        let columns = columns(&table)?;
        let page_size: u64 = config::get("page_size")?
            .and_then(|p| p.parse().ok())
            .filter(|p| *p > 0)
            .unwrap_or(100);
        let body = match query.json() {
            Ok(body) => body,
            Err(e) => {
                return reply.error(BAD_QUERY, "the query is not JSON: {0}", &[&e.to_string()]);
            }
        };
        let plan = match plan(&body, &columns) {
            Ok(plan) => plan,
            Err((what, instead)) => {
                return reply.error(
                    BAD_QUERY,
                    "cannot query by {0}: use {1}",
                    &[&what, &instead],
                );
            }
        };
        let mut left = plan.limit.unwrap_or(u64::MAX);
        let mut after: Option<String> = None;
        let mut pending: Option<Vec<Value>> = None;
        while left > 0 {
            let mut rows = plan.page(&table, after.as_deref(), page_size.min(left))?;
            if rows.is_empty() {
                break;
            }
            left -= rows.len() as u64;
            after = rows
                .last()
                .and_then(|r| r.get("__id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let full = rows.len() as u64 == page_size;
            let page: Vec<Value> = rows
                .iter_mut()
                .map(|r| {
                    r.remove("__id");
                    Value::Object(std::mem::take(r))
                })
                .collect();
            // A page goes out once the next one is known to exist, so the
            // last one can be the `complete` reply.
            if let Some(previous) = pending.replace(page) {
                reply.partial(&Value::Array(previous))?;
            }
            if !full {
                break;
            }
        }
        match pending {
            Some(last) => reply.complete(&Value::Array(last)),
            None => reply.empty(),
        }
    }

    fn on_publish(event: Event) -> Result<(), Error> {
        let table = table()?;
        let columns = columns(&table)?;
        let body = event.json()?;
        if let Some(id) = body.get("delete") {
            let id = id
                .as_str()
                .ok_or_else(|| Error::invalid("`delete` takes an id"))?;
            sql::execute(
                &format!("DELETE FROM \"{table}\" WHERE id = $1"),
                &params![id],
            )?;
            return Ok(());
        }
        let Some(row) = body.as_object() else {
            return Err(Error::invalid("an event is a row: a JSON object"));
        };
        if !row.get("id").is_some_and(Value::is_string) {
            return Err(Error::invalid("an event's row needs a string `id`"));
        }
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut params: Vec<Sql> = Vec::new();
        for (name, value) in row {
            let Some(kind) = columns.get(name) else {
                return Err(Error::invalid(format!(
                    "table `{table}` has no column `{name}`"
                )));
            };
            params.push(text(value).map_or(Sql::Null, Sql::from));
            names.push(format!("\"{name}\""));
            values.push(format!("CAST(${}::text AS {kind})", params.len()));
        }
        let updates: Vec<String> = names
            .iter()
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        sql::execute(
            &format!(
                "INSERT INTO \"{table}\" ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}",
                names.join(", "),
                values.join(", "),
                updates.join(", ")
            ),
            &params,
        )?;
        Ok(())
    }
}

sandpipe_sdk::export_service!(TableService);

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> BTreeMap<String, String> {
        [
            ("id", "text"),
            ("customer", "text"),
            ("total", "bigint"),
            ("status", "text"),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_owned(), t.to_owned()))
        .collect()
    }

    #[test]
    fn a_query_plans_its_columns_filters_and_limit() {
        let plan = plan(
            &json!({"select": ["id", "total"], "where": {"status": "open", "total": 5, "customer": null}, "limit": 7}),
            &orders(),
        )
        .unwrap();
        assert_eq!(plan.select, ["id", "total"]);
        assert_eq!(
            plan.filters,
            [
                ("customer".to_owned(), "text".to_owned(), None),
                (
                    "status".to_owned(),
                    "text".to_owned(),
                    Some("open".to_owned())
                ),
                (
                    "total".to_owned(),
                    "bigint".to_owned(),
                    Some("5".to_owned())
                ),
            ]
        );
        assert_eq!(plan.limit, Some(7));
        let all = super::plan(&json!({}), &orders()).unwrap();
        assert_eq!(all.select, ["customer", "id", "status", "total"]);
    }

    #[test]
    fn a_bad_query_says_what_is_wrong_and_what_would_do() {
        let bad = |q: Value| super::plan(&q, &orders()).err().unwrap();
        assert_eq!(
            bad(json!({"from": "x"})),
            (
                "the key `from`".to_owned(),
                "select, where, limit".to_owned()
            )
        );
        assert_eq!(
            bad(json!({"select": ["nope"]})),
            (
                "the column \"nope\"".to_owned(),
                "customer, id, status, total".to_owned()
            )
        );
        assert_eq!(bad(json!({"where": {"nope": 1}})).0, "the column `nope`");
        assert_eq!(
            bad(json!({"where": {"total": [1]}})).0,
            "`where.total` = [1]"
        );
        assert_eq!(bad(json!({"limit": -1})).0, "`limit` = -1");
        assert_eq!(bad(json!([1])).0, "a query that is not a JSON object");
    }
}
