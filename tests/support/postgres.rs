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

/// fx-insert's table `results`, made as the admin (`admin`: a superuser
/// connection to database `database`) in the plugin's schema `schema` and
/// given to the plugin's role. The schema and the role must exist: a first
/// assemble of the engine on the database makes them. fx-insert runs no
/// DDL; this stands in for a per-plugin init script
/// (`plugins.grants.NAME.sql.init`), which should replace it.
#[allow(dead_code)] // not every file that includes this one uses it
pub async fn create_results_table(admin: &tokio_postgres::Client, database: &str, schema: &str) {
    let role = sandpipe::store::database::postgres::role_name(database, schema);
    admin
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".results (
                 message_id TEXT PRIMARY KEY,
                 bytes BIGINT NOT NULL,
                 lines BIGINT NOT NULL,
                 source TEXT);
             ALTER TABLE \"{schema}\".results OWNER TO \"{role}\";"
        ))
        .await
        .unwrap_or_else(|e| panic!("creating {schema}.results in {database}: {e}"));
}
