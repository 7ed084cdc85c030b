//! A source for MySQL and MariaDB tables, in the manner of Elastic's MySQL
//! connector: every row of the configured tables is a document whose id is
//! `{table}_{primary key}` and whose body is the row as a JSON object (with
//! `_table`); advanced rules replace a table's rows with a custom query.
//!
//! The database is the grant's `sql: { database: NAME }`, an external
//! database the engine opens read-only with credentials the component
//! never sees (`databases:` and `secrets:` in the engine's config).
//!
//! Configuration (the grant's `config`): `tables` (a JSON list of table
//! names, required), `id_column` (`id`: a unique, orderable column of every
//! table), `updated_column` (optional: a column that changes with the row,
//! used as the document's timestamp so unchanged rows are skipped without
//! comparing bodies).
//!
//! Pages go by keyset (`WHERE id > last ORDER BY id LIMIT size`), table
//! after table; the page cursor is `{"t": table index, "after": last id}`.
//!
//! Advanced rules: `[{"tables": ["products"], "query": "SELECT * FROM
//! products WHERE price > 10"}]` — each query must return the id column;
//! it is paged the same way, as a subquery. `validate-advanced-rules`
//! checks the shape, that each table is configured, and that each query is
//! a `SELECT` the database accepts.

use sandpipe_sdk::export_source;
use sandpipe_sdk::prelude::*;
use sandpipe_sdk::serde_json::{self, Map, Value as Json};
use sandpipe_sdk::source::{
    Document, Operation, Page, PageRequest, RuleError, Source, SourceDescription,
};
use sandpipe_sdk::sql::Value;

/// The source.
pub struct MysqlSource;

/// The configuration.
struct Settings {
    tables: Vec<String>,
    id_column: String,
    updated_column: Option<String>,
}

/// Whether `name` is a plain identifier (letters, digits, `_`).
fn plain(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Settings {
    fn read() -> Result<Self, Error> {
        let tables = config::get("tables")?
            .ok_or_else(|| Error::invalid("config `tables` is required: a list of table names"))?;
        let tables: Vec<String> = serde_json::from_str(&tables).map_err(|_| {
            Error::invalid(format!(
                "config `tables` must be a list of names, not {tables}"
            ))
        })?;
        let id_column = config::get("id_column")?.unwrap_or_else(|| "id".into());
        let updated_column = config::get("updated_column")?;
        for name in tables
            .iter()
            .chain([&id_column])
            .chain(updated_column.iter())
        {
            if !plain(name) {
                return Err(Error::invalid(format!(
                    "`{name}` is not a plain table or column name (letters, digits, `_`)"
                )));
            }
        }
        if tables.is_empty() {
            return Err(Error::invalid("config `tables` names no table"));
        }
        Ok(Self {
            tables,
            id_column,
            updated_column,
        })
    }
}

/// One advanced rule.
#[derive(Debug)]
struct Rule {
    tables: Vec<String>,
    query: String,
}

/// The advanced rules' JSON read, or what is wrong with it.
fn rules(json: &str) -> Result<Vec<Rule>, String> {
    let parsed: Json = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let list = parsed
        .as_array()
        .ok_or("expected a list of {\"tables\": [...], \"query\": \"SELECT ...\"}")?;
    let mut out = Vec::new();
    for (i, rule) in list.iter().enumerate() {
        let tables: Vec<String> = rule
            .get("tables")
            .and_then(Json::as_array)
            .map(|t| {
                t.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let query = rule.get("query").and_then(Json::as_str).unwrap_or_default();
        if tables.len() != 1 {
            return Err(format!("rule {i}: `tables` must name exactly one table"));
        }
        if !query
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("SELECT")
        {
            return Err(format!("rule {i}: `query` must be a SELECT"));
        }
        out.push(Rule {
            tables,
            query: query.trim().trim_end_matches(';').to_owned(),
        });
    }
    Ok(out)
}

/// A cell as JSON.
fn json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t.clone()),
        Value::Json(j) => serde_json::from_str(j).unwrap_or_else(|_| Json::String(j.clone())),
        Value::Bytes(b) => Json::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        Value::Timestamp(micros) => Json::String(iso(*micros)),
    }
}

/// Microseconds since 1970 as ISO-8601 UTC.
fn iso(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The id column's value as text, for the document id and the cursor.
fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::Int(i) => Some(i.to_string()),
        Value::Text(t) => Some(t.clone()),
        _ => None,
    }
}

impl Source for MysqlSource {
    fn describe() -> SourceDescription {
        SourceDescription {
            name: "mysql-source".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            config_schema: json!({
                "type": "object",
                "required": ["tables"],
                "properties": {
                    "tables": {"type": "array", "items": {"type": "string"}},
                    "id_column": {"type": "string"},
                    "updated_column": {"type": "string"}
                }
            })
            .to_string(),
            incremental: false,
            advanced_rules: true,
        }
    }

    fn validate_config() -> Result<(), Error> {
        Settings::read().map(drop)
    }

    fn ping() -> Result<(), Error> {
        sql::query("SELECT 1", &[]).map(drop)
    }

    fn get_docs(request: PageRequest) -> Result<Page, Error> {
        let s = Settings::read()?;
        let custom = match request.advanced_rules.as_deref() {
            Some(json) => rules(json).map_err(Error::invalid)?,
            None => Vec::new(),
        };
        let cursor: Json = match request.cursor.as_deref() {
            Some(c) => {
                serde_json::from_str(c).map_err(|_| Error::invalid(format!("bad cursor `{c}`")))?
            }
            None => json!({"t": 0}),
        };
        let t = cursor["t"].as_u64().unwrap_or(0) as usize;
        let Some(table) = s.tables.get(t) else {
            return Ok(Page {
                docs: Vec::new(),
                next: None,
                sync_cursor: None,
            });
        };
        let id = &s.id_column;
        let from = match custom.iter().find(|r| r.tables[0] == *table) {
            Some(rule) => format!("({}) AS q", rule.query),
            None => format!("`{table}` AS q"),
        };
        let after: Option<Value> = match &cursor["after"] {
            Json::Number(n) => n.as_i64().map(Value::Int),
            Json::String(t) => Some(Value::Text(t.clone())),
            _ => None,
        };
        let (filter, params) = match after {
            Some(after) => (format!("WHERE q.`{id}` > ?"), vec![after]),
            None => (String::new(), Vec::new()),
        };
        let statement = format!(
            "SELECT * FROM {from} {filter} ORDER BY q.`{id}` LIMIT {}",
            request.size
        );
        let rows = sql::query(&statement, &params)?;
        let id_at = rows.column_index(id).ok_or_else(|| {
            Error::invalid(format!("table `{table}`: its rows have no column `{id}`"))
        })?;
        let updated_at = s
            .updated_column
            .as_deref()
            .and_then(|c| rows.column_index(c));
        let mut docs = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter() {
            let values = row.values();
            let key = &values[id_at];
            let key_text = key_text(key).ok_or_else(|| {
                Error::invalid(format!(
                    "table `{table}`: `{id}` is {}, not a number or text",
                    key.type_name()
                ))
            })?;
            let mut body = Map::new();
            body.insert("_table".into(), Json::String(table.clone()));
            for (column, value) in row.columns().iter().zip(values) {
                body.insert(column.clone(), json(value));
            }
            docs.push(Document {
                id: format!("{table}_{key_text}"),
                timestamp: updated_at.map(|i| match json(&values[i]) {
                    Json::String(s) => s,
                    other => other.to_string(),
                }),
                body: Json::Object(body).to_string(),
                op: Operation::Index,
            });
            last = Some(json(key));
        }
        // A short page ends the table; the next table starts from its top.
        let next = if docs.len() as u32 == request.size {
            Some(json!({"t": t, "after": last}))
        } else if t + 1 < s.tables.len() {
            Some(json!({"t": t + 1}))
        } else {
            None
        };
        Ok(Page {
            docs,
            next: next.map(|n| n.to_string()),
            sync_cursor: None,
        })
    }

    fn validate_advanced_rules(json: String) -> Vec<RuleError> {
        let error = |ids: Vec<String>, message: String| RuleError { ids, message };
        let list = match rules(&json) {
            Ok(list) => list,
            Err(message) => return vec![error(Vec::new(), message)],
        };
        let tables = match Settings::read() {
            Ok(s) => s.tables,
            Err(e) => return vec![error(Vec::new(), e.to_string())],
        };
        let mut errors = Vec::new();
        for (i, rule) in list.iter().enumerate() {
            let table = &rule.tables[0];
            if !tables.contains(table) {
                errors.push(error(
                    vec![format!("{i}")],
                    format!("table `{table}` is not in config `tables`"),
                ));
                continue;
            }
            // The database checks the query (and that it is a query).
            if let Err(e) = sql::query(&format!("SELECT * FROM ({}) AS q LIMIT 0", rule.query), &[])
            {
                errors.push(error(vec![format!("{i}")], format!("the query fails: {e}")));
            }
        }
        errors
    }
}

export_source!(MysqlSource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_utc() {
        // Checked against Python's datetime.fromtimestamp(..., timezone.utc).
        assert_eq!(iso(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso(1_796_121_360_755_000), "2026-12-01T10:36:00.755000Z");
        assert_eq!(iso(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
    }

    #[test]
    fn advanced_rules_have_one_table_and_a_select() {
        assert!(rules(r#"[{"tables": ["p"], "query": "SELECT * FROM p WHERE x > 1;"}]"#).is_ok());
        assert!(
            rules(r#"[{"tables": ["p", "q"], "query": "SELECT 1"}]"#)
                .unwrap_err()
                .contains("exactly one table")
        );
        assert!(
            rules(r#"[{"tables": ["p"], "query": "DELETE FROM p"}]"#)
                .unwrap_err()
                .contains("must be a SELECT")
        );
        assert!(rules(r#"{"tables": []}"#).unwrap_err().contains("a list"));
    }
}
