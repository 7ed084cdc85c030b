//! The MySQL/MariaDB source (connectors/mysql-source) against the
//! machine's MariaDB, through an external database the engine opens
//! read-only (`databases:`, the password from `secrets:`): full syncs with
//! 1 % of the rows changed, deleted and added, advanced rules as custom
//! SQL per table, a plugin that tries to write through such a grant, and
//! the same source written in Python.

use mysql_async::prelude::Queryable as _;

use crate::harness::Deployment;

/// The server, as root (the machine's MariaDB: root with no password).
fn server() -> String {
    std::env::var("SANDPIPE_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A database and a read-only user of the test's own, dropped at the end.
struct TestMysql {
    name: String,
    user: String,
    password: String,
}

impl TestMysql {
    async fn new() -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let this = Self {
            name: format!("sp_src_{id}"),
            user: format!("sp_ro_{id}"),
            password: format!("pw-{id}"),
        };
        let mut conn = this.root().await;
        conn.query_drop(format!(
            "CREATE DATABASE {db}; CREATE USER '{u}'@'%' IDENTIFIED BY '{p}'; \
             GRANT SELECT ON {db}.* TO '{u}'@'%'; \
             CREATE USER '{u}_w'@'%' IDENTIFIED BY '{p}'; \
             GRANT SELECT, DELETE ON {db}.* TO '{u}_w'@'%';",
            db = this.name,
            u = this.user,
            p = this.password
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot set up MariaDB (is it running?): {e}"));
        this
    }

    async fn root(&self) -> mysql_async::Conn {
        mysql_async::Conn::from_url(server()).await.unwrap()
    }

    /// A root connection to the test's database.
    async fn conn(&self) -> mysql_async::Conn {
        mysql_async::Conn::from_url(format!("{}/{}", server(), self.name))
            .await
            .unwrap()
    }
}

impl Drop for TestMysql {
    fn drop(&mut self) {
        let (name, user) = (self.name.clone(), self.user.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut conn) = mysql_async::Conn::from_url(server()).await {
                    // One statement a call: each runs whatever the last did.
                    for statement in [
                        format!("DROP DATABASE IF EXISTS {name}"),
                        format!("DROP USER IF EXISTS '{user}'@'%'"),
                        format!("DROP USER IF EXISTS '{user}_w'@'%'"),
                    ] {
                        let _ = conn.query_drop(statement).await;
                    }
                    let _ = conn.disconnect().await;
                }
            });
        })
        .join();
    }
}

/// The deployment: mysql-source as source `shop` on the test's database,
/// `more` extra keys of the source.
fn deployment(db: &TestMysql, more: &str) -> Deployment {
    let d = Deployment::new(
        &[
            ("mysql-source", "shop"),
            ("fx-probe", "probe"),
            ("fx-probe", "rootprobe"),
        ],
        &format!(
            "secrets:\n  shop_pw: {{ file: shop.pw }}\ndatabases:\n  shop: {{ type: mysql, url: \"mysql://{user}@127.0.0.1:3306/{db}\", password: shop_pw }}\n  writer: {{ type: mysql, url: \"mysql://{user}_w@127.0.0.1:3306/{db}\", password: shop_pw }}\n  as_root: {{ type: mysql, url: \"{root}/{db}\" }}\nplugins:\n  grants:\n    shop:\n      sql: {{ database: shop }}\n      config: {{ tables: [products, customers], updated_column: updated_at }}\n    probe:\n      sql: {{ database: writer }}\n      limits: {{ timeout: 2s }}\n    rootprobe:\n      sql: {{ database: as_root }}\nsources:\n  shop: {{ page_size: 500{more} }}\n",
            user = db.user,
            db = db.name,
            root = server(),
        ),
    );
    std::fs::write(d.path("shop.pw"), &db.password).unwrap();
    d
}

/// Fill `products` with `n` rows and `customers` with 10.
async fn fill(db: &TestMysql, n: usize) {
    let mut conn = db.conn().await;
    conn.query_drop(
        "CREATE TABLE products (id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2), \
         updated_at DATETIME(6) NOT NULL, notes TEXT);
         CREATE TABLE customers (id INT PRIMARY KEY, email VARCHAR(100), updated_at DATETIME(6) NOT NULL);",
    )
    .await
    .unwrap();
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "({i}, 'Product {i}', {}.{:02}, '2026-01-01 00:00:00.000000', '{}')",
                i % 50,
                i % 100,
                "n".repeat(200)
            )
        })
        .collect();
    for chunk in rows.chunks(2000) {
        conn.query_drop(format!("INSERT INTO products VALUES {}", chunk.join(",")))
            .await
            .unwrap();
    }
    let customers: Vec<String> = (0..10)
        .map(|i| format!("({i}, 'c{i}@example.org', '2026-01-01 00:00:00')"))
        .collect();
    conn.query_drop(format!(
        "INSERT INTO customers VALUES {}",
        customers.join(",")
    ))
    .await
    .unwrap();
}

/// The sink's `(id, name)` of products and the number of customers.
fn sink(d: &Deployment) -> (Vec<(String, String)>, i64) {
    let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, body->>'$.name' FROM shop WHERE body->>'$._table' = 'products' ORDER BY body->>'$.id'")
        .unwrap();
    let products = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let customers = conn
        .query_row(
            "SELECT count(*) FROM shop WHERE body->>'$._table' = 'customers'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (products, customers)
}

fn run(d: &Deployment) -> String {
    let out = d.cli(&["sync", "shop"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_tables_sync_in_full_and_only_changed_rows_are_written() {
    let db = TestMysql::new().await;
    fill(&db, 20_000).await;
    let d = deployment(&db, "");
    let first = run(&d);
    assert!(
        first.contains("20010 indexed, 0 updated, 0 deleted, 0 skipped"),
        "{first}"
    );
    let (products, customers) = sink(&d);
    assert_eq!(products.len(), 20_000);
    assert_eq!(customers, 10);
    // A row as a document: its id, the table, typed values, the timestamp.
    let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
    let (body, timestamp): (String, String) = conn
        .query_row(
            "SELECT body, \"timestamp\" FROM shop WHERE id = 'products_1234'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["_table"], "products");
    assert_eq!(body["id"], 1234);
    assert_eq!(body["price"], "34.34");
    assert_eq!(body["updated_at"], "2026-01-01T00:00:00.000000Z");
    assert_eq!(timestamp, "2026-01-01T00:00:00.000000Z");

    // 1 % changed, 1 % deleted, 1 % added.
    let mut conn = db.conn().await;
    conn.query_drop(
        "UPDATE products SET name = concat(name, ' v2'), updated_at = '2026-06-01 00:00:00' WHERE id % 100 = 0;
         DELETE FROM products WHERE id % 100 = 1;",
    )
    .await
    .unwrap();
    let added: Vec<String> = (20_000..20_200)
        .map(|i| format!("({i}, 'Product {i}', 1.00, '2026-06-01 00:00:00', '')"))
        .collect();
    conn.query_drop(format!("INSERT INTO products VALUES {}", added.join(",")))
        .await
        .unwrap();
    let second = run(&d);
    assert!(
        second.contains("200 indexed, 200 updated, 200 deleted, 19610 skipped"),
        "{second}"
    );
    let mut want: Vec<(String, String)> = Vec::new();
    for i in 0..20_200 {
        if i < 20_000 && i % 100 == 1 {
            continue;
        }
        let v2 = if i < 20_000 && i % 100 == 0 {
            " v2"
        } else {
            ""
        };
        want.push((format!("products_{i}"), format!("Product {i}{v2}")));
    }
    assert_eq!(sink(&d).0, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn advanced_rules_are_custom_sql_and_the_database_is_read_only() {
    let db = TestMysql::new().await;
    fill(&db, 1_000).await;
    let d = deployment(
        &db,
        ", rules: { advanced: [{ tables: [products], query: \"SELECT * FROM products WHERE price >= 40\" }] }",
    );
    let first = run(&d);
    // Prices cycle 0..49 (+ cents): 10 of every 50 are 40 or more.
    assert!(first.contains("210 indexed"), "{first}");
    assert_eq!(sink(&d).0.len(), 200);

    // A query the database refuses: the job fails naming it.
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, yaml.replace("price >= 40", "no_such_column = 1")).unwrap();
    let out = d.cli(&["sync", "shop"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("the sync rules are invalid")
            && stdout.contains("advanced rules 0: the query fails")
            && stdout.contains("no_such_column"),
        "{stdout}"
    );

    // An external database is read-only whoever logs in: the probe's
    // login may delete, and the engine refuses its DELETE (a query only);
    // a login with server-wide privileges (root) is refused outright.
    for (id, action, sql) in [
        ("w", "sql-exec", "DELETE FROM products"),
        ("c", "sql-exec", "/* /* */ COMMIT -- */ SELECT 1"),
        ("r", "sql-query", "SELECT count(*) AS n FROM products"),
        ("sleep", "sql-query", "SELECT SLEEP(30)"),
    ] {
        crate::postgres::probe(&d, id, action, sql);
    }
    crate::postgres::probe(&d, "root", "sql-query", "SELECT 1");
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.failed, 0, "{summary}");
    let write = d.last("w", "probe").await;
    assert!(
        write
            .info
            .contains("database `writer` is read-only: it takes queries only"),
        "{write:?}"
    );
    // A COMMIT hidden where PostgreSQL would read a comment and MySQL
    // does not: refused before it reaches the server.
    let commit = d.last("c", "probe").await;
    assert!(
        commit
            .info
            .contains("database `writer` is read-only: on MySQL a statement may hold no"),
        "{commit:?}"
    );
    // A statement still running at the invocation's deadline fails the
    // invocation (`deadline`), and is ended on the server (a KILL), not
    // left running there.
    let slept = d.last("sleep", "probe").await;
    assert!(slept.info.starts_with("deadline"), "{slept:?}");
    let mut conn = db.conn().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let running: Option<i64> = conn
            .query_first(
                "SELECT count(*) FROM information_schema.processlist WHERE info = 'SELECT SLEEP(30)'",
            )
            .await
            .unwrap();
        if running == Some(0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SLEEP(30) still runs");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let read = d.last("r", "probe").await;
    assert_eq!(read.info, "rows: [[Value::Int(1000)]]", "{read:?}");
    let root = d.last("root", "rootprobe").await;
    assert!(
        root.info
            .contains("database `as_root`: its login has server-wide privileges"),
        "{root:?}"
    );
    let mut conn = db.conn().await;
    let left: Option<i64> = conn
        .query_first("SELECT count(*) FROM products")
        .await
        .unwrap();
    assert_eq!(left, Some(1000));
}

/// examples/sources/python-mysql (componentize-py, built by polyglot.rs)
/// against the same tables as connectors/mysql-source.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_written_in_python_yields_the_same_documents_as_the_rust_one() {
    let Some(python) = crate::polyglot::python_source("python_mysql_source") else {
        return;
    };
    let db = TestMysql::new().await;
    fill(&db, 1_500).await;
    let d = deployment(&db, ", batch: { operations: 200 }");
    std::fs::copy(&python, d.path("plugins/pyshop.wasm")).unwrap();
    let yaml = std::fs::read_to_string(&d.config).unwrap();
    let yaml = yaml.replace(
        "    probe:\n",
        "    pyshop:\n      sql: { database: shop }\n      config: { tables: [products, customers], updated_column: updated_at }\n      limits: { memory: 128MiB, timeout: 20s }\n    probe:\n",
    );
    std::fs::write(&d.config, format!("{yaml}  pyshop: {{ page_size: 200 }}\n")).unwrap();
    run(&d);
    let out = d.cli(&["sync", "pyshop"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1510 indexed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = rusqlite::Connection::open(d.path("state/sources.sqlite")).unwrap();
    let docs = |table: &str| -> Vec<(String, serde_json::Value, Option<String>)> {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, body, \"timestamp\" FROM {table} ORDER BY id"
            ))
            .unwrap();
        stmt.query_map([], |r| {
            let body: String = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_str(&body).unwrap(), r.get(2)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    let (rust, python) = (docs("shop"), docs("pyshop"));
    assert_eq!(rust.len(), 1510);
    assert_eq!(rust, python);
}
