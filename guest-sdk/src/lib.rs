//! # Sandpipe plugin SDK
//!
//! Write a Sandpipe plugin in Rust by implementing one trait, [`Plugin`],
//! and calling one macro, [`export_plugin!`]. The SDK hides the
//! WebAssembly component model bindings: plugin code never touches
//! `wit-bindgen`.
//!
//! A plugin is built as a `cdylib` for the `wasm32-wasip2` target; the result
//! is a WebAssembly component that the Sandpipe engine loads. The engine calls
//! [`Plugin::describe`] once when it loads the component and
//! [`Plugin::execute`] once per message.
//!
//! Host capabilities are plain functions, one module per capability:
//!
//! | module | what | grant needed |
//! |---|---|---|
//! | [`log`] | structured log lines | always granted |
//! | [`config`] | the plugin's configuration values | always granted |
//! | [`blob`] | the message's data object, other granted objects | `blob` |
//! | [`meta`] | the message's metadata, plugin-scoped state | `meta` |
//! | [`sql`] | parameterised SQL in the plugin's database | `sql` |
//! | [`emit`] | publishing to named outputs | `emit` |
//! | [`http`] | outbound HTTP requests to allow-listed destinations | `http` |
//!
//! Every host call returns a [`Result`] with the SDK's [`Error`]: the engine
//! never traps a plugin for a policy decision (a missing grant, an exceeded
//! quota) but answers with an error the plugin can handle or propagate with
//! `?`. An error returned from [`Plugin::execute`] fails the message; return
//! an [`Outcome`] to decide what happens to it instead (done, skip, retry
//! later, dead-letter).
//!
//! Effects (SQL statements, emitted messages, written objects, state
//! changes) are committed only if the outcome is [`Outcome::Done`].
//!
//! # Example
//!
//! A complete plugin that counts the bytes of a text object, stores the
//! count and publishes a JSON summary:
//!
//! ```no_run
//! use sandpipe_sdk::prelude::*;
//! use std::io::Read;
//!
//! struct ByteCount;
//!
//! impl Plugin for ByteCount {
//!     fn describe() -> Description {
//!         Description {
//!             name: "byte-count".into(),
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             mime_types: vec!["text/plain".into()],
//!             capabilities: vec![Capability::Blob, Capability::Sql, Capability::Emit],
//!         }
//!     }
//!
//!     fn execute(msg: Message) -> Result<Outcome, Error> {
//!         // Stream the data object in bounded chunks.
//!         let mut reader = match blob::open_data() {
//!             Ok(reader) => reader,
//!             Err(Error::NotFound(what)) => {
//!                 return Ok(Outcome::DeadLetter(format!("no data object: {what}")));
//!             }
//!             Err(other) => return Err(other),
//!         };
//!         let mut bytes: u64 = 0;
//!         let mut buf = vec![0u8; 64 * 1024];
//!         loop {
//!             let n = reader.read(&mut buf)?;
//!             if n == 0 {
//!                 break;
//!             }
//!             bytes += n as u64;
//!         }
//!
//!         // Store it; `$1, $2, ...` work on SQLite and PostgreSQL. The
//!         // table comes from the plugin's init.sql (see below).
//!         sql::execute(
//!             "INSERT INTO byte_count (message_id, bytes) VALUES ($1, $2) \
//!              ON CONFLICT(message_id) DO UPDATE SET bytes = excluded.bytes",
//!             &params![msg.id.as_str(), i64::try_from(bytes).unwrap_or(i64::MAX)],
//!         )?;
//!
//!         // Publish a summary to the output named by the `output` config key.
//!         let output = config::get_or("output", "counts")?;
//!         emit::publish_json(&output, &json!({ "message_id": msg.id, "bytes": bytes }))?;
//!
//!         log::info(&format!("{} has {bytes} bytes", msg.id))?;
//!         Ok(Outcome::Done)
//!     }
//! }
//!
//! sandpipe_sdk::export_plugin!(ByteCount);
//! ```
//!
//! Its table is set up once, not per message: the plugin ships an
//! `init.sql`, which the operator names in its grant
//! (`sql: { init: init.sql }`) and the engine runs at every start, before
//! any message, as the plugin:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS byte_count (message_id TEXT PRIMARY KEY, bytes BIGINT NOT NULL);
//! ```
//!
//! Build it with
//! `cargo build --target wasm32-wasip2 --release` (the crate must have
//! `crate-type = ["cdylib"]`); the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the component.
//!
//! # Testing
//!
//! The SDK also compiles for the host target, so a plugin is unit-tested
//! with a plain `cargo test`. On the host the capability functions answer
//! from in-memory fakes: [`testing::run`] runs [`Plugin::execute`] against
//! a [`testing::FakeHost`] (config, data object, metadata, state, objects,
//! an SQLite database, outputs) and returns a [`testing::Report`] of
//! everything the plugin did. A [`testing::Scenario`] runs the same inputs
//! natively and, written to a folder, in the real sandbox with
//! `sandpipe exec`. Outside [`testing::run`] a capability function panics.
#![deny(missing_docs)]

/// The bindings `wit-bindgen` generates for the `sandpipe:connector/plugin`
/// world. Not part of the SDK's stable API: plugins use the friendly
/// wrappers instead.
#[doc(hidden)]
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "sandpipe_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

/// The bindings `wit-bindgen` generates for the `sandpipe:connector/source`
/// world: its exports and `source-types`, the capability interfaces mapped
/// to [`bindings`]' (one set of imports whatever the world). Not part of the
/// SDK's stable API: sources use [`source`] instead. A component links only
/// the world whose export macro it calls.
#[doc(hidden)]
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod source_bindings {
    wit_bindgen::generate!({
        world: "source",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_source_world",
        default_bindings_module: "sandpipe_sdk::source_bindings",
        additional_derives: [PartialEq],
        with: {
            "sandpipe:connector/types@1.2.0": crate::bindings::sandpipe::connector::types,
            "sandpipe:connector/log@1.2.0": crate::bindings::sandpipe::connector::log,
            "sandpipe:connector/config@1.2.0": crate::bindings::sandpipe::connector::config,
            "sandpipe:connector/blob@1.2.0": crate::bindings::sandpipe::connector::blob,
            "sandpipe:connector/meta@1.2.0": crate::bindings::sandpipe::connector::meta,
            "sandpipe:connector/sql@1.2.0": crate::bindings::sandpipe::connector::sql,
            "sandpipe:connector/emit@1.2.0": crate::bindings::sandpipe::connector::emit,
        },
    });
}

/// The bindings `wit-bindgen` generates for the `sandpipe:connector/service`
/// world: its exports, `service-types` (the `reply` resource) and `notify`,
/// the capability interfaces mapped to [`bindings`]'. Not part of the SDK's
/// stable API: services use [`service`] instead.
#[doc(hidden)]
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod service_bindings {
    wit_bindgen::generate!({
        world: "service",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_service_world",
        default_bindings_module: "sandpipe_sdk::service_bindings",
        additional_derives: [PartialEq],
        with: {
            "sandpipe:connector/types@1.2.0": crate::bindings::sandpipe::connector::types,
            "sandpipe:connector/log@1.2.0": crate::bindings::sandpipe::connector::log,
            "sandpipe:connector/config@1.2.0": crate::bindings::sandpipe::connector::config,
            "sandpipe:connector/blob@1.2.0": crate::bindings::sandpipe::connector::blob,
            "sandpipe:connector/meta@1.2.0": crate::bindings::sandpipe::connector::meta,
            "sandpipe:connector/sql@1.2.0": crate::bindings::sandpipe::connector::sql,
            "sandpipe:connector/emit@1.2.0": crate::bindings::sandpipe::connector::emit,
        },
    });
}

pub mod blob;
pub mod config;
pub mod emit;
mod error;
mod host;
pub mod http;
pub mod log;
pub mod meta;
mod plugin;
pub mod service;
pub mod source;
pub mod sql;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

pub use error::Error;
pub use plugin::Plugin;
pub use types::{Capability, Description, Message, Outcome, RetryAfter};

/// The `serde_json` crate, re-exported for [`emit::publish_json`],
/// [`meta::all_json`] and [`Message::body_json`]; `json!` is in the
/// [`prelude`].
pub use serde_json;

/// Everything a plugin usually needs: `use sandpipe_sdk::prelude::*;`.
///
/// Brings in the [`Plugin`] trait, the message and outcome types, the
/// [`Error`] type, the capability modules ([`log`], [`config`], [`blob`],
/// [`meta`], [`sql`], [`emit`]), the [`params!`] macro and `serde_json`'s
/// `json!` macro.
pub mod prelude {
    pub use crate::params;
    pub use crate::serde_json::json;
    pub use crate::{
        Capability, Description, Error, Message, Outcome, Plugin, RetryAfter, blob, config, emit,
        log, meta, sql,
    };
}

/// Implementation details used by the macros. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::plugin::execute;
    pub use crate::service::{on_connect, on_publish, on_query, on_request};
    pub use crate::source::{changed, get_docs, ping, validate_config};
}
