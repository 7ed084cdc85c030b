//! `image-meta`: a Sandpipe connector that records the dimensions of PNG,
//! JPEG and GIF images.
//!
//! For each message of type `image/png`, `image/jpeg` or `image/gif` it
//! opens the data object, reads only its header (streaming, and for JPEG
//! skipping the segments before the frame header without keeping them),
//! takes the object's byte size from the store (or counts the rest of the
//! object when the store does not know it), and upserts one row into
//! `image_meta` keyed by the message id, so a redelivered message is stored
//! once. It logs one info line.
//!
//! Outcomes:
//! - `done`: the row is stored;
//! - `skip`: the message's type is not one of the three;
//! - `dead-letter`: the data object is not a valid image of the message's
//!   type (`not a valid PNG: missing PNG signature`), or the message has no
//!   data object / the object does not exist;
//! - an error: any other host error (for example a missing grant, or the
//!   database being unavailable).
//!
//! The table comes from the connector's `init.sql` ([`INIT_SQL`]), which
//! the operator names in the grant (`sql: { init: FILE }`) and the engine
//! runs at every start; `execute` runs no DDL. Without it every image
//! fails, with an error that says so.

pub mod header;

use header::{Dimensions, Format, ProbeError};
use sandpipe_sdk::prelude::*;

/// The table the dimensions are stored in: the connector's `init.sql`,
/// for the grant's `sql.init` (and the native tests' `Scenario::sql_init`).
pub const INIT_SQL: &str = include_str!("../init.sql");

/// Idempotent insert: a redelivered message overwrites its own row.
pub const UPSERT: &str = "INSERT INTO image_meta (message_id, location, format, width, height, bytes) \
    VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT(message_id) DO UPDATE SET \
    location = excluded.location, \
    format = excluded.format, \
    width = excluded.width, \
    height = excluded.height, \
    bytes = excluded.bytes";

/// The `image-meta` plugin.
pub struct ImageMeta;

impl Plugin for ImageMeta {
    fn describe() -> Description {
        Description {
            name: "image-meta".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mime_types: vec!["image/jpeg".into(), "image/png".into(), "image/gif".into()],
            capabilities: vec![Capability::Log, Capability::Blob, Capability::Sql],
        }
    }

    fn execute(msg: Message) -> Result<Outcome, Error> {
        let Some(format) = Format::from_mime(&msg.kind) else {
            return Ok(Outcome::Skip(format!(
                "type {:?} is not image/png, image/jpeg or image/gif",
                msg.kind
            )));
        };

        let mut reader = match blob::open_data() {
            Ok(reader) => reader,
            Err(Error::NotFound(what)) => {
                return Ok(Outcome::DeadLetter(format!("no data object: {what}")));
            }
            Err(other) => return Err(other),
        };

        let Dimensions { width, height } = match header::probe(format, &mut reader) {
            Ok(dims) => dims,
            Err(ProbeError::Invalid(why)) => {
                return Ok(Outcome::DeadLetter(format!(
                    "not a valid {}: {why}",
                    format.label()
                )));
            }
            Err(ProbeError::Io(err)) => return Err(Error::from(err)),
        };

        let bytes = match reader.size() {
            Some(size) => size,
            None => reader.position() + reader.skip_rest()?,
        };

        let location = msg.data_location.as_deref();
        sql::execute(
            UPSERT,
            &params![
                msg.id.as_str(),
                location,
                format.name(),
                width,
                height,
                sql::Value::try_from(bytes)?,
            ],
        )
        .map_err(without_init)?;

        sandpipe_sdk::info!(
            "{}: {} {width}x{height}, {bytes} bytes",
            location.unwrap_or(&msg.id),
            format.label()
        );
        Ok(Outcome::Done)
    }
}

/// An upsert that failed for want of the table says how to set it up.
fn without_init(error: Error) -> Error {
    match error {
        Error::Invalid(m)
            if m.contains("no such table: image_meta")
                || m.contains("relation \"image_meta\" does not exist") =>
        {
            Error::Invalid(format!(
                "{m}: the table is made by image-meta's init script: name connectors/image-meta/init.sql \
                 in its grant (plugins.grants.image-meta.sql: {{ init: FILE }})"
            ))
        }
        other => other,
    }
}

sandpipe_sdk::export_plugin!(ImageMeta);

/// `execute` as a whole, natively, against the SDK's fake host
/// (`sandpipe_sdk::testing`), on the quickstart's sample images.
#[cfg(test)]
mod tests {
    use super::*;
    use sandpipe_sdk::testing::{self, FakeHost, Report, Scenario};

    const PNG_ID: &str = "705f6acb-8dbe-5ff4-a033-9efa0c943932";
    const JPEG_ID: &str = "ffca5292-7e74-5dcf-be68-823a878fc2cb";
    const GIF_ID: &str = "29d321a6-ee09-5a7e-aa52-fd9a21d7dd6b";
    const RED_SQUARE: &[u8] =
        include_bytes!("../../../examples/quickstart/data/images/red-square.png");
    const GRADIENT: &[u8] = include_bytes!("../../../examples/quickstart/data/images/gradient.jpg");
    const CHECKER: &[u8] = include_bytes!("../../../examples/quickstart/data/images/checker.gif");

    /// The quickstart's three image messages (examples/quickstart/spool).
    fn images() -> [Scenario; 3] {
        [
            Scenario::new(PNG_ID, "image/png")
                .sql_init(INIT_SQL)
                .data("images/red-square.png", RED_SQUARE),
            Scenario::new(JPEG_ID, "image/jpeg")
                .sql_init(INIT_SQL)
                .data("images/gradient.jpg", GRADIENT),
            Scenario::new(GIF_ID, "image/gif")
                .sql_init(INIT_SQL)
                .data("images/checker.gif", CHECKER),
        ]
    }

    type Row = (String, String, String, i64, i64, i64);

    fn row(id: &str, location: &str, format: &str, w: i64, h: i64, bytes: i64) -> Row {
        (id.into(), location.into(), format.into(), w, h, bytes)
    }

    /// The rows of `image_meta`.
    fn rows(report: &Report) -> Vec<Row> {
        let rows = report
            .query(
                "SELECT message_id, location, format, width, height, bytes \
                 FROM image_meta ORDER BY location",
                &[],
            )
            .expect("image_meta");
        rows.iter()
            .map(|r| {
                let text = |c: &str| r.get_str(c).unwrap_or_default().to_owned();
                let int = |c: &str| r.get_i64(c).unwrap_or(-1);
                (
                    text("message_id"),
                    text("location"),
                    text("format"),
                    int("width"),
                    int("height"),
                    int("bytes"),
                )
            })
            .collect()
    }

    #[test]
    fn each_quickstart_image_gets_its_row() {
        let expected = [
            row(PNG_ID, "images/red-square.png", "png", 16, 16, 83),
            row(JPEG_ID, "images/gradient.jpg", "jpeg", 32, 24, 715),
            row(GIF_ID, "images/checker.gif", "gif", 20, 10, 96),
        ];
        for (scenario, expected) in images().iter().zip(&expected) {
            let report = scenario.run::<ImageMeta>();
            report.assert_done();
            assert_eq!(rows(&report), std::slice::from_ref(expected));
            assert_eq!(report.logs.len(), 1);
            assert!(report.emits.is_empty() && report.denials.is_empty());
        }
        let png = images()[0].run::<ImageMeta>();
        assert_eq!(
            png.logs[0].message,
            "images/red-square.png: PNG 16x16, 83 bytes"
        );
        // The upsert alone: no DDL per message.
        assert_eq!(png.sql.len(), 1);
        assert_eq!(png.sql[0].statement, UPSERT);
        assert_eq!(
            png.sql[0].params,
            sandpipe_sdk::params![PNG_ID, "images/red-square.png", "png", 16, 16, 83]
        );
    }

    #[test]
    fn all_three_in_one_database_and_redelivery_upserts() {
        // The three messages, then the PNG again, against one host.
        let mut host = FakeHost::new().sql_init(INIT_SQL);
        for scenario in images().iter().chain(&images()[..1]) {
            let data = scenario.data.clone().unwrap_or_default();
            let report = testing::run::<ImageMeta>(scenario.message(), host.data(data));
            report.assert_done();
            host = report.into_host();
        }
        let count: i64 = host
            .db()
            .query_row("SELECT count(*) FROM image_meta", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, 3);
    }

    #[test]
    fn the_missing_object_is_dead_lettered() {
        // examples/quickstart/spool/missing.json
        let message = Message {
            data_location: Some("images/does-not-exist.png".into()),
            ..testing::message("a7fa7047-9abd-53f3-aab7-f52b187cfbcd", "image/png")
        };
        let report = testing::run::<ImageMeta>(message, FakeHost::new());
        assert_eq!(
            report.outcome,
            Ok(Outcome::dead_letter(
                "no data object: no object at `images/does-not-exist.png`"
            ))
        );
        assert!(report.sql.is_empty());
    }

    #[test]
    fn a_text_posing_as_a_png_is_dead_lettered() {
        let hello = include_bytes!("../../../examples/quickstart/data/texts/hello.txt");
        let report = Scenario::new("m-fake", "image/png")
            .data("images/fake.png", &hello[..])
            .run::<ImageMeta>();
        assert_eq!(
            report.outcome,
            Ok(Outcome::dead_letter(
                "not a valid PNG: missing PNG signature"
            ))
        );
        assert!(report.sql.is_empty());
    }

    #[test]
    fn other_types_are_skipped_without_reading() {
        let report = Scenario::new("m-text", "text/plain")
            .data("texts/a.txt", "hello")
            .run::<ImageMeta>();
        assert_eq!(
            report.outcome,
            Ok(Outcome::skip(
                "type \"text/plain\" is not image/png, image/jpeg or image/gif"
            ))
        );
        assert!(report.calls.is_empty());
    }

    #[test]
    fn without_the_init_script_the_message_fails_and_says_how_to_fix_it() {
        let mut scenario = images()[0].clone();
        scenario.sql_init = None;
        let report = scenario.run::<ImageMeta>();
        assert!(
            matches!(&report.outcome, Err(Error::Invalid(m))
                if m.starts_with("no such table: image_meta: the table is made by image-meta's init script")
                    && m.contains("plugins.grants.image-meta.sql: { init: FILE }")),
            "{report}"
        );
    }

    #[test]
    fn without_the_sql_grant_the_message_fails_and_says_why() {
        let scenario = &images()[0];
        let host = scenario.host().grant(&[Capability::Blob]);
        let report = testing::run::<ImageMeta>(scenario.message(), host);
        assert_eq!(
            report.outcome,
            Err(Error::access_denied(
                "plugin `image-meta` called sql.execute but has no `sql` grant \
                 (add `sql: true` under plugins.grants.image-meta)"
            ))
        );
        assert_eq!(report.denials.len(), 1);
    }
}
