//! Parameterised SQL in the plugin's own database. Requires the `sql`
//! grant.
//!
//! All statements of one invocation run in one transaction, committed only
//! if the plugin's outcome is [`Outcome::Done`](crate::Outcome::Done).
//!
//! Write parameters as `$1, $2, ...`, used in ascending order: that works on
//! both SQLite and PostgreSQL. Build the parameter list with [`params!`](crate::params!)
//! (any value with a `From` conversion into [`Value`]: integers, floats,
//! booleans, strings, byte vectors and `Option`s of those, `None` being
//! NULL).
//!
//! Set the tables up in the plugin's init script (`init.sql`, named by the
//! grant's `sql: { init: ... }` and run by the engine at every start), not
//! in `execute`:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, size BIGINT, note TEXT);
//! ```
//!
//! ```no_run
//! use sandpipe_sdk::{params, sql};
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! let note: Option<&str> = None;
//! sql::execute(
//!     "INSERT INTO seen (id, size, note) VALUES ($1, $2, $3) \
//!      ON CONFLICT(id) DO UPDATE SET size = excluded.size, note = excluded.note",
//!     &params!["m-1", 1024_i64, note],
//! )?;
//!
//! let rows = sql::query("SELECT id, size FROM seen WHERE size > $1", &params![100])?;
//! for row in &rows {
//!     let id = row.get_str("id").unwrap_or("?");
//!     let size = row.get_i64("size").unwrap_or(0);
//!     sandpipe_sdk::info!("{id}: {size} bytes");
//! }
//! # Ok(())
//! # }
//! ```

use crate::bindings::sandpipe::connector::sql as wit;
use crate::{Error, host};

/// A typed SQL value, used for parameters and results.
///
/// ```
/// use sandpipe_sdk::sql::Value;
///
/// assert_eq!(Value::from(3), Value::Int(3));
/// assert_eq!(Value::from("x"), Value::Text("x".into()));
/// assert_eq!(Value::from(None::<i64>), Value::Null);
/// assert_eq!(Value::Int(7).as_i64(), Some(7));
/// ```
pub use wit::Value;

/// The result of a query: column names and rows of values. Iterate it (by
/// reference) to get [`Row`]s.
pub use wit::Rows;

/// Run one statement that changes data or schema; returns the number of
/// rows changed.
pub fn execute(statement: &str, params: &[Value]) -> Result<u64, Error> {
    host::sql_execute(statement, params).map_err(Error::from)
}

/// Run one statement that changes data once per parameter list in `batch`,
/// in order, with one host call (the engine prepares it once); returns the
/// total number of rows changed. The first failing list stops the batch,
/// and the error names its index (`parameter list 3 of 500: ...`). Needs an
/// engine that links `sandpipe:connector@0.2` or later.
///
/// ```no_run
/// use sandpipe_sdk::{params, sql};
///
/// # fn run() -> Result<(), sandpipe_sdk::Error> {
/// let words = ["alpha", "beta", "gamma"];
/// let batch: Vec<_> = words.iter().map(|w| params![*w, w.len() as i64]).collect();
/// let changed = sql::execute_batch("INSERT INTO words (word, len) VALUES ($1, $2)", &batch)?;
/// assert_eq!(changed, 3);
/// # Ok(())
/// # }
/// ```
pub fn execute_batch(statement: &str, batch: &[Vec<Value>]) -> Result<u64, Error> {
    host::sql_execute_batch(statement, batch).map_err(Error::from)
}

/// Run one statement that returns rows. Fails with
/// [`Error::LimitExceeded`] past the configured row limit.
pub fn query(statement: &str, params: &[Value]) -> Result<Rows, Error> {
    host::sql_query(statement, params).map_err(Error::from)
}

/// Build a `Vec<`[`Value`]`>` of SQL parameters from values that convert
/// into [`Value`].
///
/// ```
/// use sandpipe_sdk::{params, sql::Value};
///
/// let p = params!["a", 2, 2.5, true, None::<String>];
/// assert_eq!(
///     p,
///     vec![
///         Value::Text("a".into()),
///         Value::Int(2),
///         Value::Float(2.5),
///         Value::Boolean(true),
///         Value::Null,
///     ]
/// );
/// assert!(params![].is_empty());
/// ```
#[macro_export]
macro_rules! params {
    () => {
        ::std::vec::Vec::<$crate::sql::Value>::new()
    };
    ($($value:expr),+ $(,)?) => {
        ::std::vec![$($crate::sql::Value::from($value)),+]
    };
}

impl Value {
    /// Whether this is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The integer, for [`Value::Int`] (and a [`Value::Boolean`] as 0 or 1,
    /// since SQLite stores booleans as integers).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Boolean(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The number, for [`Value::Float`] or [`Value::Int`].
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            #[allow(clippy::cast_precision_loss)]
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The boolean, for [`Value::Boolean`] (and a [`Value::Int`] 0 or 1).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Boolean(b) => Some(*b),
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }

    /// The text, for [`Value::Text`] or [`Value::Json`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) | Value::Json(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, for [`Value::Bytes`] (or the UTF-8 of a
    /// [`Value::Text`]).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            Value::Text(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// Microseconds since 1970-01-01T00:00:00Z, for [`Value::Timestamp`].
    pub fn as_timestamp_micros(&self) -> Option<i64> {
        match self {
            Value::Timestamp(t) => Some(*t),
            _ => None,
        }
    }

    /// The variant's name: `null`, `boolean`, `int`, `float`, `text`,
    /// `bytes`, `json` or `timestamp`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Boolean(_) => "boolean",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Json(_) => "json",
            Value::Timestamp(_) => "timestamp",
        }
    }

    /// A [`Value::Json`] holding `value` serialised as text.
    pub fn json(value: &serde_json::Value) -> Self {
        Value::Json(value.to_string())
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(i64::from(v))
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32);

/// A `u64` larger than `i64::MAX` cannot be stored.
impl TryFrom<u64> for Value {
    type Error = Error;

    fn try_from(v: u64) -> Result<Self, Error> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| Error::invalid(format!("{v} does not fit a 64-bit signed integer")))
    }
}

/// A `usize` larger than `i64::MAX` cannot be stored.
impl TryFrom<usize> for Value {
    type Error = Error;

    fn try_from(v: usize) -> Result<Self, Error> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| Error::invalid(format!("{v} does not fit a 64-bit signed integer")))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(f64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Boolean(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl Rows {
    /// The number of rows.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The position of the column named `name`, if any.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Row number `index`, if it exists.
    pub fn row(&self, index: usize) -> Option<Row<'_>> {
        self.values.get(index).map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row, if any.
    pub fn first(&self) -> Option<Row<'_>> {
        self.row(0)
    }

    /// Iterate over the rows.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.values.iter().map(|values| Row {
            columns: &self.columns,
            values,
        })
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = Row<'a>;
    type IntoIter = Box<dyn Iterator<Item = Row<'a>> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// One row of [`Rows`]: its values, looked up by column name or position.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The value of the column named `name` (the first one, if several
    /// columns share the name).
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let index = self.columns.iter().position(|c| c == name)?;
        self.values.get(index)
    }

    /// The value at column position `index`.
    pub fn get_index(&self, index: usize) -> Option<&'a Value> {
        self.values.get(index)
    }

    /// The values, in column order.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }

    /// The column names, in order.
    pub fn columns(&self) -> &'a [String] {
        self.columns
    }

    /// The column named `name` as an integer; see [`Value::as_i64`].
    pub fn get_i64(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(Value::as_i64)
    }

    /// The column named `name` as a float; see [`Value::as_f64`].
    pub fn get_f64(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(Value::as_f64)
    }

    /// The column named `name` as a boolean; see [`Value::as_bool`].
    pub fn get_bool(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(Value::as_bool)
    }

    /// The column named `name` as text; see [`Value::as_str`].
    pub fn get_str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(Value::as_str)
    }

    /// The column named `name` as bytes; see [`Value::as_bytes`].
    pub fn get_bytes(&self, name: &str) -> Option<&'a [u8]> {
        self.get(name).and_then(Value::as_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rows {
        Rows {
            columns: vec!["id".into(), "n".into(), "ok".into()],
            values: vec![
                vec![Value::from("a"), Value::from(1), Value::from(true)],
                vec![Value::from("b"), Value::Null, Value::Int(0)],
            ],
        }
    }

    #[test]
    fn rows_by_name() {
        let rows = sample();
        assert_eq!(rows.len(), 2);
        let names: Vec<&str> = rows.iter().filter_map(|r| r.get_str("id")).collect();
        assert_eq!(names, ["a", "b"]);
        let second = rows.row(1);
        assert_eq!(second.and_then(|r| r.get_i64("n")), None);
        assert_eq!(second.and_then(|r| r.get_bool("ok")), Some(false));
        assert_eq!(rows.first().and_then(|r| r.get_i64("n")), Some(1));
        assert_eq!(rows.column_index("ok"), Some(2));
        assert!(rows.first().and_then(|r| r.get("missing")).is_none());
        let mut count = 0;
        for row in &rows {
            assert_eq!(row.values().len(), 3);
            count += 1;
        }
        assert_eq!(count, 2);
    }

    #[test]
    fn conversions() {
        assert_eq!(Value::from(5u32), Value::Int(5));
        assert_eq!(Value::from(String::from("s")), Value::Text("s".into()));
        assert_eq!(Value::from(vec![1u8, 2]), Value::Bytes(vec![1, 2]));
        assert_eq!(Value::from(Some(1.5)), Value::Float(1.5));
        assert!(Value::try_from(u64::MAX).is_err());
        assert_eq!(Value::try_from(7u64), Ok(Value::Int(7)));
        assert_eq!(Value::Int(2).as_f64(), Some(2.0));
        assert_eq!(Value::Json("{}".into()).as_str(), Some("{}"));
        assert_eq!(Value::Null.type_name(), "null");
    }
}
