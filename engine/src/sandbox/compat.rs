//! Older versions of the WIT package: the engine links the current version
//! and the previous ones (see `bindings::v0_2`, `bindings::v0_1`), and
//! refuses a component built against any other with a message naming the
//! ones it links.
//!
//! A previous version's imports are served by the current host code: each
//! function below converts its arguments (the few types an interface
//! declares itself, such as `log.level` and `sql.value`; the shared `types`
//! interface is one Rust type for every version) and calls the current
//! implementation, so grants, limits, journaling and metrics are the same
//! whatever the version a plugin was built against. One macro writes the
//! forwarding for each old version; what a version lacks (0.1 has no
//! `sql.execute-batch`) it does not forward.

/// The WIT package's name, as it prefixes every import.
pub const PACKAGE: &str = "sandpipe:connector";

/// The lines this engine links, newest first: `(major, minor)`, where a
/// minor of `None` stands for every minor of that major (from 1.0 on,
/// minor releases only add).
pub const SUPPORTED: [(u64, Option<u64>); 3] = [(1, None), (0, Some(2)), (0, Some(1))];

/// Check a component's imports against [`SUPPORTED`]: an error naming the
/// version it was built against and the versions the engine links, or
/// `None` when every `sandpipe:connector` import is of a supported line.
pub fn unsupported(imports: &[String]) -> Option<String> {
    let prefix = format!("{PACKAGE}/");
    for import in imports {
        let Some(rest) = import.strip_prefix(&prefix) else {
            continue;
        };
        let version = rest.split_once('@').map(|(_, v)| v);
        let line = version.and_then(|v| {
            let mut parts = v.split(['.', '-', '+']);
            let major = parts.next()?.parse::<u64>().ok()?;
            let minor = parts.next()?.parse::<u64>().ok()?;
            Some((major, minor))
        });
        let linked = |(major, minor): (u64, u64)| {
            SUPPORTED
                .iter()
                .any(|&(m, n)| m == major && n.is_none_or(|n| n == minor))
        };
        if line.is_some_and(linked) {
            continue;
        }
        let built = version.map_or_else(|| "no version".to_owned(), |v| format!("{PACKAGE}@{v}"));
        let supported: Vec<String> = SUPPORTED
            .iter()
            .map(|(major, minor)| match minor {
                Some(minor) => format!("{major}.{minor}.x"),
                None => format!("{major}.x"),
            })
            .collect();
        return Some(format!(
            "it was built against {built} (import `{import}`), but this engine links {PACKAGE} {} only: rebuild the plugin against one of them (the guest SDK and wit/ hold the current version)",
            supported.join(", ")
        ));
    }
    None
}

/// The host side of an old version `$v` (a module of `bindings`): its
/// imports forwarded to the current ones; `$batch` is the forwarding of
/// the `sql` functions the version has beyond 0.1's `query` and `execute`.
macro_rules! forward {
    ($v:ident { $($batch:tt)* }) => {
        mod $v {
            use wasmtime::component::Resource;

            use crate::capability::blob::BlobReader;
            use crate::sandbox::InvocationState;
            use crate::sandbox::bindings::WitError;
            use crate::sandbox::bindings::sandpipe::connector as current;
            use crate::sandbox::bindings::$v::sandpipe::connector as old;

            fn level(level: old::log::Level) -> current::log::Level {
                use current::log::Level as L;
                use old::log::Level as Old;
                match level {
                    Old::Trace => L::Trace,
                    Old::Debug => L::Debug,
                    Old::Info => L::Info,
                    Old::Warn => L::Warn,
                    Old::Error => L::Error,
                }
            }

            fn value(value: old::sql::Value) -> current::sql::Value {
                use current::sql::Value as V;
                use old::sql::Value as Old;
                match value {
                    Old::Null => V::Null,
                    Old::Boolean(b) => V::Boolean(b),
                    Old::Int(i) => V::Int(i),
                    Old::Float(f) => V::Float(f),
                    Old::Text(t) => V::Text(t),
                    Old::Bytes(b) => V::Bytes(b),
                    Old::Json(j) => V::Json(j),
                    Old::Timestamp(t) => V::Timestamp(t),
                }
            }

            fn old_value(value: current::sql::Value) -> old::sql::Value {
                use current::sql::Value as V;
                use old::sql::Value as Old;
                match value {
                    V::Null => Old::Null,
                    V::Boolean(b) => Old::Boolean(b),
                    V::Int(i) => Old::Int(i),
                    V::Float(f) => Old::Float(f),
                    V::Text(t) => Old::Text(t),
                    V::Bytes(b) => Old::Bytes(b),
                    V::Json(j) => Old::Json(j),
                    V::Timestamp(t) => Old::Timestamp(t),
                }
            }

            fn values(params: Vec<old::sql::Value>) -> Vec<current::sql::Value> {
                params.into_iter().map(value).collect()
            }

            impl old::log::Host for InvocationState {
                async fn write(&mut self, l: old::log::Level, message: String) -> Result<(), WitError> {
                    current::log::Host::write(self, level(l), message).await
                }
            }

            impl old::config::Host for InvocationState {
                async fn get(&mut self, key: String) -> Result<Option<String>, WitError> {
                    current::config::Host::get(self, key).await
                }

                async fn keys(&mut self) -> Result<Vec<String>, WitError> {
                    current::config::Host::keys(self).await
                }
            }

            impl old::blob::Host for InvocationState {
                async fn open_data(&mut self) -> Result<Resource<BlobReader>, WitError> {
                    current::blob::Host::open_data(self).await
                }

                async fn open(&mut self, location: String) -> Result<Resource<BlobReader>, WitError> {
                    current::blob::Host::open(self, location).await
                }

                async fn put(&mut self, location: String, bytes: Vec<u8>) -> Result<(), WitError> {
                    current::blob::Host::put(self, location, bytes).await
                }
            }

            impl old::blob::HostReader for InvocationState {
                async fn read(
                    &mut self,
                    reader: Resource<BlobReader>,
                    max: u32,
                ) -> Result<Vec<u8>, WitError> {
                    current::blob::HostReader::read(self, reader, max).await
                }

                async fn size(&mut self, reader: Resource<BlobReader>) -> Option<u64> {
                    current::blob::HostReader::size(self, reader).await
                }

                async fn drop(&mut self, reader: Resource<BlobReader>) -> wasmtime::Result<()> {
                    current::blob::HostReader::drop(self, reader).await
                }
            }

            impl old::meta::Host for InvocationState {
                async fn all(&mut self) -> Result<String, WitError> {
                    current::meta::Host::all(self).await
                }

                async fn get(&mut self, key: String) -> Result<Option<String>, WitError> {
                    current::meta::Host::get(self, key).await
                }

                async fn state_get(&mut self, key: String) -> Result<Option<Vec<u8>>, WitError> {
                    current::meta::Host::state_get(self, key).await
                }

                async fn state_set(&mut self, key: String, value: Vec<u8>) -> Result<(), WitError> {
                    current::meta::Host::state_set(self, key, value).await
                }

                async fn state_delete(&mut self, key: String) -> Result<(), WitError> {
                    current::meta::Host::state_delete(self, key).await
                }
            }

            impl old::sql::Host for InvocationState {
                async fn query(
                    &mut self,
                    statement: String,
                    params: Vec<old::sql::Value>,
                ) -> Result<old::sql::Rows, WitError> {
                    let rows = current::sql::Host::query(self, statement, values(params)).await?;
                    Ok(old::sql::Rows {
                        columns: rows.columns,
                        values: rows
                            .values
                            .into_iter()
                            .map(|row| row.into_iter().map(old_value).collect())
                            .collect(),
                    })
                }

                async fn execute(
                    &mut self,
                    statement: String,
                    params: Vec<old::sql::Value>,
                ) -> Result<u64, WitError> {
                    current::sql::Host::execute(self, statement, values(params)).await
                }

                $($batch)*
            }

            impl old::emit::Host for InvocationState {
                async fn publish(
                    &mut self,
                    output: String,
                    payload: Vec<u8>,
                    headers: Vec<(String, String)>,
                ) -> Result<(), WitError> {
                    current::emit::Host::publish(self, output, payload, headers).await
                }
            }
        }
    };
}

forward!(v0_2 {
    async fn execute_batch(
        &mut self,
        statement: String,
        batch: Vec<Vec<old::sql::Value>>,
    ) -> Result<u64, WitError> {
        let batch = batch.into_iter().map(values).collect();
        current::sql::Host::execute_batch(self, statement, batch).await
    }
});

forward!(v0_1 {});

#[cfg(test)]
mod tests {
    use super::*;

    fn imports(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_current_and_the_previous_versions_are_supported() {
        for version in ["1.0.0", "1.3.2", "0.2.0", "0.2.7", "0.1.0", "0.1.3"] {
            let names = imports(&[
                "wasi:cli/environment@0.2.0",
                &format!("sandpipe:connector/log@{version}"),
            ]);
            assert_eq!(unsupported(&names), None, "{version}");
        }
    }

    #[test]
    fn another_version_is_refused_naming_it_and_the_supported_ones() {
        for version in ["0.3.0", "0.0.9", "2.0.0", "x"] {
            let import = format!("sandpipe:connector/sql@{version}");
            let message = unsupported(&imports(&[&import])).unwrap_or_default();
            assert!(message.contains(&import), "{message}");
            assert!(message.contains("1.x, 0.2.x, 0.1.x only"), "{message}");
        }
        let message = unsupported(&imports(&["sandpipe:connector/sql"])).unwrap_or_default();
        assert!(message.contains("no version"), "{message}");
    }
}
