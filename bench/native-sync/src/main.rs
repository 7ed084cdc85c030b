//! An independent full sync of one MySQL/MariaDB table into a PostgreSQL
//! table, written directly on mysql_async and tokio-postgres with no
//! Sandpipe code: the baseline `engine/benches/sync.rs` measures the
//! engine's source sync against. It does the same work as the engine with
//! `connectors/mysql-source` on the same table and sink shape:
//!
//! - reads the sink's index (`id_hash`, `version`) into memory;
//! - pages through the table by keyset (`WHERE id > ? ORDER BY id LIMIT n`);
//! - turns each row into the same JSON document (`_table`, every column;
//!   DATETIME as ISO-8601), its id `{table}_{id}`, its version a hash of
//!   `updated_at` (the timestamp);
//! - skips a row whose version the sink has, upserts the others in
//!   batches (`INSERT ... SELECT FROM unnest(...) ON CONFLICT`), each batch
//!   in one transaction, and deletes what the table no longer has.
//!
//! `native-sync MYSQL_URL PG_URL TABLE SINK_TABLE PAGE BATCH` prints
//! `indexed N updated N deleted N skipped N` and exits.

use std::collections::HashMap;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use mysql_async::prelude::Queryable as _;
use sha2::Digest as _;

fn hash16(text: &str) -> [u8; 16] {
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn version(timestamp: &str) -> i64 {
    let mut hash = sha2::Sha256::new();
    hash.update(b"t");
    hash.update(timestamp.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// A MySQL value as JSON (the mysql-source connector's mapping).
fn json(value: mysql_async::Value, column: &mysql_async::Column) -> serde_json::Value {
    use mysql_async::Value as M;
    use mysql_async::consts::ColumnType;
    match value {
        M::NULL => serde_json::Value::Null,
        M::Int(i) => i.into(),
        M::UInt(u) => u.into(),
        M::Float(f) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(serde_json::Value::Null, Into::into)
        }
        M::Double(d) => serde_json::Number::from_f64(d).map_or(serde_json::Value::Null, Into::into),
        M::Bytes(b) => String::from_utf8_lossy(&b).into_owned().into(),
        M::Date(y, mo, d, h, mi, s, us) => {
            if column.column_type() == ColumnType::MYSQL_TYPE_DATE {
                format!("{y:04}-{mo:02}-{d:02}").into()
            } else {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z").into()
            }
        }
        M::Time(..) => serde_json::Value::Null,
    }
}

struct Doc {
    key: [u8; 16],
    id: String,
    version: i64,
    timestamp: String,
    body: String,
}

async fn write(
    pg: &mut tokio_postgres::Client,
    sink: &str,
    docs: &[Doc],
    deletes: &[[u8; 16]],
) -> anyhow::Result<()> {
    let tx = pg.transaction().await?;
    if !docs.is_empty() {
        let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        let keys: Vec<&[u8]> = docs.iter().map(|d| &d.key[..]).collect();
        let versions: Vec<i64> = docs.iter().map(|d| d.version).collect();
        let stamps: Vec<&str> = docs.iter().map(|d| d.timestamp.as_str()).collect();
        let bodies: Vec<&str> = docs.iter().map(|d| d.body.as_str()).collect();
        tx.execute(
            &format!(
                "INSERT INTO {sink} (id, id_hash, version, \"timestamp\", body)
                 SELECT u.id, u.h, u.v, u.ts, u.b::jsonb
                 FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::text[], $5::text[]) AS u(id, h, v, ts, b)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                     \"timestamp\" = excluded.\"timestamp\", body = excluded.body, synced_at = now()"
            ),
            &[&ids, &keys, &versions, &stamps, &bodies],
        )
        .await?;
    }
    if !deletes.is_empty() {
        let keys: Vec<&[u8]> = deletes.iter().map(|k| &k[..]).collect();
        tx.execute(
            &format!("DELETE FROM {sink} WHERE id_hash = ANY($1::bytea[])"),
            &[&keys],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mysql_url, pg_url, table, sink, page, batch] = &args[..] else {
        anyhow::bail!("usage: native-sync MYSQL_URL PG_URL TABLE SINK_TABLE PAGE BATCH");
    };
    let page: usize = page.parse()?;
    let batch: usize = batch.parse()?;
    let (mut pg, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .context("PostgreSQL")?;
    tokio::spawn(connection);
    pg.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {sink} (
             id text PRIMARY KEY, id_hash bytea NOT NULL UNIQUE, version bigint NOT NULL,
             \"timestamp\" text, body jsonb NOT NULL,
             search tsvector GENERATED ALWAYS AS
                 (jsonb_to_tsvector('simple'::regconfig, body, '[\"string\"]')) STORED,
             synced_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX IF NOT EXISTS {sink}_search ON {sink} USING GIN (search);"
    ))
    .await?;
    // The sink's index, streamed.
    let mut index: HashMap<[u8; 16], i64> = HashMap::new();
    {
        let rows = pg
            .query_raw(
                &format!("SELECT id_hash, version FROM {sink}"),
                Vec::<String>::new(),
            )
            .await?;
        futures::pin_mut!(rows);
        while let Some(row) = rows.try_next().await? {
            let hash: &[u8] = row.get(0);
            let mut key = [0u8; 16];
            key.copy_from_slice(&hash[..16.min(hash.len())]);
            index.insert(key, row.get(1));
        }
    }
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(mysql_url)?);
    let mut conn = pool.get_conn().await?;
    let (mut indexed, mut updated, mut deleted, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let mut docs: Vec<Doc> = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let statement = match after {
            Some(_) => format!("SELECT * FROM `{table}` WHERE id > ? ORDER BY id LIMIT {page}"),
            None => format!("SELECT * FROM `{table}` ORDER BY id LIMIT {page}"),
        };
        let params: Vec<mysql_async::Value> =
            after.map(mysql_async::Value::Int).into_iter().collect();
        let mut result = conn.exec_iter(statement, params).await?;
        let columns: Vec<mysql_async::Column> =
            result.columns().map(|c| c.to_vec()).unwrap_or_default();
        let mut n = 0;
        while let Some(mut row) = result.next().await? {
            n += 1;
            let mut body = serde_json::Map::new();
            body.insert("_table".into(), table.clone().into());
            for (i, column) in columns.iter().enumerate() {
                let value = row.take(i).unwrap_or(mysql_async::Value::NULL);
                body.insert(column.name_str().into_owned(), json(value, column));
            }
            let row_id = body
                .get("id")
                .and_then(serde_json::Value::as_i64)
                .context("no id")?;
            after = Some(row_id);
            let timestamp = body
                .get("updated_at")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let id = format!("{table}_{row_id}");
            let key = hash16(&id);
            let v = version(&timestamp);
            match index.remove(&key) {
                Some(known) if known == v => {
                    skipped += 1;
                    continue;
                }
                Some(_) => updated += 1,
                None => indexed += 1,
            }
            docs.push(Doc {
                key,
                id,
                version: v,
                timestamp,
                body: serde_json::Value::Object(body).to_string(),
            });
            if docs.len() >= batch {
                write(&mut pg, sink, &docs, &[]).await?;
                docs.clear();
            }
        }
        if n < page {
            break;
        }
    }
    write(&mut pg, sink, &docs, &[]).await?;
    let gone: Vec<[u8; 16]> = index.into_keys().collect();
    deleted += gone.len() as u64;
    for chunk in gone.chunks(batch) {
        write(&mut pg, sink, &[], chunk).await?;
    }
    println!("indexed {indexed} updated {updated} deleted {deleted} skipped {skipped}");
    drop(conn);
    pool.disconnect().await?;
    Ok(())
}
