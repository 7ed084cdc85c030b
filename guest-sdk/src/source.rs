//! Source connectors: the `source` world (docs/sources.md). Implement
//! [`Source`] on a type and export it with
//! [`export_source!`](crate::export_source); the engine's sync jobs call it
//! page after page on one warm instance, and reconcile the documents it
//! yields into the source's sink. The capability modules ([`http`](crate::http),
//! [`config`](crate::config), [`log`](crate::log), [`sql`](crate::sql), ...)
//! work as they do in a plugin, under the source's grant.
//!
//! ```no_run
//! use sandpipe_sdk::prelude::*;
//! use sandpipe_sdk::source::{Document, Operation, Page, PageRequest, Source, SourceDescription};
//!
//! struct Numbers;
//!
//! impl Source for Numbers {
//!     fn describe() -> SourceDescription {
//!         SourceDescription {
//!             name: "numbers".into(),
//!             version: "1.0.0".into(),
//!             config_schema: "{}".into(),
//!             incremental: false,
//!             advanced_rules: false,
//!         }
//!     }
//!
//!     fn get_docs(request: PageRequest) -> Result<Page, Error> {
//!         let from: u32 = request.cursor.as_deref().unwrap_or("0").parse().map_err(|_| Error::invalid("bad cursor"))?;
//!         let to = (from + request.size).min(1000);
//!         let docs = (from..to)
//!             .map(|n| Document {
//!                 id: n.to_string(),
//!                 timestamp: None,
//!                 body: json!({ "n": n }).to_string(),
//!                 op: Operation::Index,
//!             })
//!             .collect();
//!         Ok(Page { docs, next: (to < 1000).then(|| to.to_string()), sync_cursor: None })
//!     }
//! }
//!
//! sandpipe_sdk::export_source!(Numbers);
//! ```

use crate::Error;
use crate::bindings::sandpipe::connector::types::Error as WitError;
pub use crate::source_bindings::sandpipe::connector::source_types::{
    Document, Operation, Page, PageRequest, RuleError, SourceDescription, SyncKind,
};

/// A source connector. Only `describe` and `get_docs` are required; the
/// others have Elastic's defaults.
pub trait Source {
    /// Describe the source. Called once when the engine loads it.
    fn describe() -> SourceDescription;

    /// Check the configuration (read it with [`config`](crate::config)).
    /// Called before every sync. Default: valid.
    fn validate_config() -> Result<(), Error> {
        Ok(())
    }

    /// Check that the external system answers. Called before every sync.
    /// Default: it does.
    fn ping() -> Result<(), Error> {
        Ok(())
    }

    /// Whether anything changed since `sync_cursor`; `false` ends the job
    /// with nothing to do. Default: something may have.
    fn changed(_sync_cursor: Option<String>) -> Result<bool, Error> {
        Ok(true)
    }

    /// One page of documents, at most `request.size` of them.
    fn get_docs(request: PageRequest) -> Result<Page, Error>;

    /// Check advanced rules (the source's own JSON). Default: a source
    /// that takes none finds none invalid (the engine refuses advanced
    /// rules when `describe` says it takes none).
    fn validate_advanced_rules(_rules: String) -> Vec<RuleError> {
        Vec::new()
    }
}

#[doc(hidden)]
pub fn validate_config<S: Source>() -> Result<(), WitError> {
    S::validate_config().map_err(WitError::from)
}

#[doc(hidden)]
pub fn ping<S: Source>() -> Result<(), WitError> {
    S::ping().map_err(WitError::from)
}

#[doc(hidden)]
pub fn changed<S: Source>(sync_cursor: Option<String>) -> Result<bool, WitError> {
    S::changed(sync_cursor).map_err(WitError::from)
}

#[doc(hidden)]
pub fn get_docs<S: Source>(request: PageRequest) -> Result<Page, WitError> {
    S::get_docs(request).map_err(WitError::from)
}

/// Export a [`Source`] implementation as the component's `source`-world
/// functions. Call it exactly once per source crate, at the top level.
#[macro_export]
macro_rules! export_source {
    ($source:ty) => {
        const _: () = {
            #[doc(hidden)]
            #[allow(dead_code)]
            struct __SandpipeSourceExport;

            impl $crate::source_bindings::Guest for __SandpipeSourceExport {
                fn describe() -> $crate::source::SourceDescription {
                    <$source as $crate::source::Source>::describe()
                }

                fn validate_config() -> ::core::result::Result<(), $crate::source_bindings::Error> {
                    $crate::__private::validate_config::<$source>()
                }

                fn ping() -> ::core::result::Result<(), $crate::source_bindings::Error> {
                    $crate::__private::ping::<$source>()
                }

                fn changed(
                    sync_cursor: ::core::option::Option<::std::string::String>,
                ) -> ::core::result::Result<bool, $crate::source_bindings::Error> {
                    $crate::__private::changed::<$source>(sync_cursor)
                }

                fn get_docs(
                    request: $crate::source::PageRequest,
                ) -> ::core::result::Result<$crate::source::Page, $crate::source_bindings::Error> {
                    $crate::__private::get_docs::<$source>(request)
                }

                fn validate_advanced_rules(
                    rules: ::std::string::String,
                ) -> ::std::vec::Vec<$crate::source::RuleError> {
                    <$source as $crate::source::Source>::validate_advanced_rules(rules)
                }
            }

            // Only a component exports the world (see `export_plugin!`).
            #[cfg(target_arch = "wasm32")]
            $crate::source_bindings::__export_source_world!(__SandpipeSourceExport with_types_in $crate::source_bindings);
        };
    };
}
