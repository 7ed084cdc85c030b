//! Removing a throw-away PostgreSQL database and the plugin roles the
//! engine made for it (`sandpipe_<database>_<schema>`). Shared by the
//! end-to-end tests and the benchmarks (`#[path]`-included by both).

/// Drop database `name` (closing its connections) and its plugin roles,
/// through `admin`, a superuser connection to another database.
pub async fn drop_database(admin: &tokio_postgres::Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap_or_else(|e| panic!("DROP DATABASE {name}: {e}"));
    let roles = admin
        .query(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
            &[&format!("sandpipe_{name}_")],
        )
        .await
        .unwrap_or_else(|e| panic!("listing the roles of {name}: {e}"));
    for row in roles {
        let role: String = row.get(0);
        admin
            .batch_execute(&format!("DROP ROLE \"{role}\""))
            .await
            .unwrap_or_else(|e| panic!("DROP ROLE {role}: {e}"));
    }
}
