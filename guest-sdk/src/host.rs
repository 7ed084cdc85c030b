//! Where the capability functions go: on `wasm32` to the component's
//! imports (the engine), elsewhere to the fake host that
//! [`testing::run`](crate::testing::run) installs for the current thread.
//!
//! Both sides have the same functions with the same WIT types, so the
//! capability modules (`log`, `config`, `blob`, `meta`, `sql`, `emit`) are
//! written once.

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::fake::*;

#[cfg(target_arch = "wasm32")]
pub(crate) use imports::*;

#[cfg(target_arch = "wasm32")]
mod imports {
    use crate::bindings::sandpipe::connector::log::Level;
    use crate::bindings::sandpipe::connector::sql::{Rows, Value};
    use crate::bindings::sandpipe::connector::types::Error as WitError;
    use crate::bindings::sandpipe::connector::{blob, config, emit, log, meta, sql};

    /// An open object: the engine's `reader` resource.
    pub(crate) type Reader = blob::Reader;

    pub(crate) fn log_write(level: Level, message: &str) -> Result<(), WitError> {
        log::write(level, message)
    }

    pub(crate) fn config_get(key: &str) -> Result<Option<String>, WitError> {
        config::get(key)
    }

    pub(crate) fn config_keys() -> Result<Vec<String>, WitError> {
        config::keys()
    }

    pub(crate) fn blob_open_data() -> Result<Reader, WitError> {
        blob::open_data()
    }

    pub(crate) fn blob_open(location: &str) -> Result<Reader, WitError> {
        blob::open(location)
    }

    pub(crate) fn blob_put(location: &str, bytes: &[u8]) -> Result<(), WitError> {
        blob::put(location, bytes)
    }

    pub(crate) fn reader_read(reader: &mut Reader, max: u32) -> Result<Vec<u8>, WitError> {
        reader.read(max)
    }

    pub(crate) fn reader_size(reader: &Reader) -> Option<u64> {
        reader.size()
    }

    pub(crate) fn meta_all() -> Result<String, WitError> {
        meta::all()
    }

    pub(crate) fn meta_get(key: &str) -> Result<Option<String>, WitError> {
        meta::get(key)
    }

    pub(crate) fn meta_state_get(key: &str) -> Result<Option<Vec<u8>>, WitError> {
        meta::state_get(key)
    }

    pub(crate) fn meta_state_set(key: &str, value: &[u8]) -> Result<(), WitError> {
        meta::state_set(key, value)
    }

    pub(crate) fn meta_state_delete(key: &str) -> Result<(), WitError> {
        meta::state_delete(key)
    }

    pub(crate) fn sql_query(statement: &str, params: &[Value]) -> Result<Rows, WitError> {
        sql::query(statement, params)
    }

    pub(crate) fn sql_execute(statement: &str, params: &[Value]) -> Result<u64, WitError> {
        sql::execute(statement, params)
    }

    pub(crate) fn sql_execute_batch(
        statement: &str,
        batch: &[Vec<Value>],
    ) -> Result<u64, WitError> {
        sql::execute_batch(statement, batch)
    }

    pub(crate) fn emit_publish(
        output: &str,
        payload: &[u8],
        headers: &[(String, String)],
    ) -> Result<(), WitError> {
        emit::publish(output, payload, headers)
    }
}
