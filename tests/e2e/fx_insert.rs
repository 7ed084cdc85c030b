//! The sqAPI workload's plugin, fx-insert (the sandboxed side of
//! engine/benches/sqapi.rs), on PostgreSQL: sqAPI envelopes with metadata
//! and a data object, one INSERT per message into a table the plugin did
//! not make, a redelivery keeping its first row.

use crate::harness::Deployment;
use crate::postgres::TestDb;

#[tokio::test(flavor = "multi_thread")]
async fn fx_insert_stores_one_row_per_message_in_a_table_made_beforehand() {
    let db = TestDb::new().await;
    let d = Deployment::new(
        &[("fx-insert", "fx-insert")],
        &format!(
            "database: {{ type: postgres, url: \"{}\" }}\n\
             plugins:\n  grants:\n    fx-insert: {{ meta: true, blob: true, sql: true }}\n",
            db.url()
        ),
    );
    // A first start (nothing to do) makes the plugin's schema and role;
    // the table goes in there before any message.
    assert_eq!(d.run_once().await.unwrap().processed, 0);
    let admin = db.admin().await;
    crate::harness::postgres::create_results_table(&admin, &db.name, "fx_insert").await;

    d.data("d/one.txt", b"one line\n");
    d.data("d/three.txt", b"a\nb\nc");
    std::fs::create_dir_all(d.path("meta")).unwrap();
    std::fs::write(d.path("meta/m.json"), br#"{"source": "e2e"}"#).unwrap();
    let send = |file: &str, id: &str, data: &str| {
        let body = serde_json::json!({
            "uuid_ref": id, "data_type": "text/plain",
            "data_location": data, "meta_location": "m.json",
        });
        d.message(file, &body.to_string());
    };
    send("1.json", "m-1", "d/one.txt");
    send("2.json", "m-2", "d/three.txt");
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.processed, summary.done), (2, 2), "{summary}");
    // m-1 again, with other data: its first row stays.
    send("3.json", "m-1", "d/three.txt");
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.processed, summary.done), (1, 1), "{summary}");

    let rows: Vec<(String, i64, i64, Option<String>)> = admin
        .query(
            "SELECT message_id, bytes, lines, source FROM fx_insert.results ORDER BY message_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let e2e = Some("e2e".to_owned());
    assert_eq!(
        rows,
        [
            ("m-1".to_owned(), 9, 1, e2e.clone()),
            ("m-2".to_owned(), 5, 3, e2e)
        ]
    );
    let last = d.rows("m-2").await.pop().unwrap();
    assert_eq!((last.plugin.as_str(), last.status.as_str()), ("", "done"));
}
