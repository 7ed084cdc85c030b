//! What plugin SQL may do in a SQLite database: the authorizer both the
//! engine (`engine/src/store/database/sqlite.rs`) and the guest SDK's test
//! fake (`guest-sdk/src/testing/database.rs`) install, so a plugin's unit
//! tests meet exactly the policy it will meet in production.
//!
//! Denied: transaction control (the host owns the transaction), ATTACH and
//! DETACH (no other database file; the engine also sets the ATTACHED limit
//! to 0, which stops `VACUUM INTO`), virtual tables, pragmas that change
//! anything, extension loading and file functions.

use rusqlite::hooks::{AuthAction, Authorization};

/// Pragmas that take a table or index name as their "value" and only read.
const INTROSPECTION: [&str; 6] = [
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// The decision for one action. `host` is true while the host itself runs
/// its transaction control (BEGIN, COMMIT, ROLLBACK).
///
/// ```
/// use rusqlite::Connection;
///
/// let mut conn = Connection::open_in_memory()?;
/// conn.authorizer(Some(|ctx: rusqlite::hooks::AuthContext<'_>| {
///     sandpipe_sqlite_policy::authorize(&ctx.action, false)
/// }))?;
/// conn.execute_batch("CREATE TABLE t (x)")?;
/// assert!(conn.execute_batch("ATTACH DATABASE 'other.db' AS o").is_err());
/// assert!(conn.execute_batch("PRAGMA journal_mode = DELETE").is_err());
/// conn.prepare("PRAGMA table_info(t)")?;
/// # Ok::<(), rusqlite::Error>(())
/// ```
pub fn authorize(action: &AuthAction<'_>, host: bool) -> Authorization {
    match action {
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } if host => {
            Authorization::Allow
        }
        AuthAction::Attach { .. }
        | AuthAction::Detach { .. }
        | AuthAction::Transaction { .. }
        | AuthAction::Savepoint { .. }
        | AuthAction::CreateVtable { .. }
        | AuthAction::DropVtable { .. } => Authorization::Deny,
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            if INTROSPECTION.contains(&name.as_str())
                || (name == "user_version" && pragma_value.is_none())
            {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Function { function_name } => {
            let name = function_name.to_ascii_lowercase();
            if name == "load_extension"
                || name.starts_with("readfile")
                || name.starts_with("writefile")
            {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        _ => Authorization::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma<'a>(name: &'a str, value: Option<&'a str>) -> AuthAction<'a> {
        AuthAction::Pragma {
            pragma_name: name,
            pragma_value: value,
        }
    }

    #[test]
    fn reading_pragmas_pass_and_writing_ones_do_not() {
        assert_eq!(
            authorize(&pragma("table_info", Some("t")), false),
            Authorization::Allow
        );
        assert_eq!(
            authorize(&pragma("user_version", None), false),
            Authorization::Allow
        );
        assert_eq!(
            authorize(&pragma("user_version", Some("3")), false),
            Authorization::Deny
        );
        assert_eq!(
            authorize(&pragma("journal_mode", Some("delete")), false),
            Authorization::Deny
        );
    }

    #[test]
    fn transaction_control_is_the_hosts_alone() {
        let begin = AuthAction::Transaction {
            operation: rusqlite::hooks::TransactionOperation::Begin,
        };
        assert_eq!(authorize(&begin, false), Authorization::Deny);
        assert_eq!(authorize(&begin, true), Authorization::Allow);
    }
}
