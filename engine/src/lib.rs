//! Sandpipe: a WebAssembly-sandboxed connector engine.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod app;
pub mod capability;
pub mod error;
pub use sandpipe_config as config;
pub mod exec;
pub mod listener;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod plugins;
pub mod sandbox;
pub mod scaffold;
pub mod secrets;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod sync;
pub mod tls;
