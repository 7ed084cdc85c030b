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

pub mod header;

use header::{Dimensions, Format, ProbeError};
use sandpipe_sdk::prelude::*;

/// The table the dimensions are stored in.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS image_meta (\
    message_id TEXT PRIMARY KEY, \
    location TEXT, \
    format TEXT NOT NULL, \
    width INTEGER NOT NULL, \
    height INTEGER NOT NULL, \
    bytes INTEGER NOT NULL)";

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
        sql::execute(CREATE_TABLE, &[])?;
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
        )?;

        sandpipe_sdk::info!(
            "{}: {} {width}x{height}, {bytes} bytes",
            location.unwrap_or(&msg.id),
            format.label()
        );
        Ok(Outcome::Done)
    }
}

sandpipe_sdk::export_plugin!(ImageMeta);
