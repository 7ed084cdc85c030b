//! End-to-end tests: the engine running real wasm components (the
//! connectors and the fixtures in tests/fixtures), on the embedded
//! defaults. One test binary; the components are built once per run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod compat;
mod crash;
mod examples;
mod exec;
mod fx_insert;
mod harness;
mod hostile;
mod http;
mod leaks;
mod limits;
mod mysql_source;
mod outage;
mod plugins;
mod poison;
mod polyglot;
mod postgres;
mod quickstart;
mod rabbitmq;
mod reuse;
mod s3;
mod sandbox;
mod scaffold;
mod sdk_scenarios;
mod server;
mod services;
mod session;
mod sources;
mod sqapi;
mod tls;
mod vantiq;
mod with_redis;
