//! The metadata store: where a message's `meta_location` points.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt as _;

use crate::config::MetaStoreConfig;
use crate::store::data::{escape, parse_location};
use crate::tls::Tls;

/// Why metadata could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Nothing at that location.
    #[error("no metadata at `{0}`")]
    NotFound(String),
    /// The location or the content is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; retrying later may work.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The object is larger than `pipeline.max_metadata_bytes`; it was not
    /// read.
    #[error("metadata `{0}` is larger than {1} (pipeline.max_metadata_bytes)")]
    TooLarge(String, ByteSize),
}

/// The configured metadata store.
#[derive(Clone)]
pub enum MetaStore {
    /// One JSON object per file under a root folder.
    File {
        /// The root folder.
        root: PathBuf,
    },
    /// No store: metadata only inline in messages.
    Inline,
    /// Redis keys: a JSON object as a string, or a hash.
    Redis(redis::aio::ConnectionManager),
}

impl MetaStore {
    /// The store described by `config` (a `rediss://` URL trusts what
    /// `tls` does).
    pub async fn new(config: &MetaStoreConfig, tls: &Tls) -> anyhow::Result<Self> {
        Ok(match config {
            MetaStoreConfig::File { root } => Self::File { root: root.clone() },
            MetaStoreConfig::Inline => Self::Inline,
            MetaStoreConfig::Redis { url, timeout } => {
                Self::Redis(crate::listener::redis::connect(url, *timeout, tls).await?)
            }
        })
    }

    /// The JSON object at `location`; `TooLarge`, unread, past `max`
    /// bytes.
    pub async fn fetch(
        &self,
        location: &str,
        max: ByteSize,
    ) -> Result<Map<String, Value>, MetaError> {
        let too_large = || MetaError::TooLarge(location.to_owned(), max);
        match self {
            Self::Inline => Err(MetaError::Invalid(format!(
                "the message names meta_location `{location}` but meta_store is `inline`"
            ))),
            Self::Redis(conn) => fetch_redis(conn.clone(), location, max).await,
            Self::File { root } => {
                let path =
                    parse_location(location).map_err(|e| MetaError::Invalid(e.to_string()))?;
                // No symbolic link out of the root either.
                let real_root = tokio::fs::canonicalize(root).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        MetaError::NotFound(location.to_owned())
                    } else {
                        MetaError::Unavailable(format!("{}: {e}", root.display()))
                    }
                })?;
                if let Some(how) = escape(&real_root, std::path::Path::new(path.as_ref())).await {
                    return Err(MetaError::Invalid(format!(
                        "invalid meta_location `{location}`: {how}, outside the metadata store's root `{}`",
                        real_root.display()
                    )));
                }
                let file = real_root.join(path.as_ref());
                let unavailable = |e: std::io::Error| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        MetaError::NotFound(location.to_owned())
                    } else {
                        MetaError::Unavailable(format!("{}: {e}", file.display()))
                    }
                };
                let opened = tokio::fs::File::open(&file).await.map_err(unavailable)?;
                if opened.metadata().await.map_err(unavailable)?.len() > max.as_u64() {
                    return Err(too_large());
                }
                // Never more than the limit, even if the file grows meanwhile.
                let mut bytes = Vec::new();
                opened
                    .take(max.as_u64().saturating_add(1))
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(unavailable)?;
                if bytes.len() as u64 > max.as_u64() {
                    return Err(too_large());
                }
                json_object(location, &bytes)
            }
        }
    }
}

fn json_object(location: &str, bytes: &[u8]) -> Result<Map<String, Value>, MetaError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(MetaError::Invalid(format!(
            "metadata `{location}` is not a JSON object"
        ))),
        Err(e) => Err(MetaError::Invalid(format!(
            "metadata `{location}` is not valid JSON: {e}"
        ))),
    }
}

/// A hash's fields and values, or (when together they pass `ARGV[1]`
/// bytes) only their total size, so a huge hash never leaves Redis.
const HASH_WITHIN: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #all do n = n + #all[i] end
if n > tonumber(ARGV[1]) then return n end
return all
";

/// sqAPI deployments store a JSON object as a string; others use a hash.
/// Read whichever the key holds.
async fn fetch_redis(
    mut conn: redis::aio::ConnectionManager,
    location: &str,
    max: ByteSize,
) -> Result<Map<String, Value>, MetaError> {
    let too_large = || MetaError::TooLarge(location.to_owned(), max);
    let unavailable = |e: redis::RedisError| MetaError::Unavailable(format!("Redis: {e}"));
    let kind: String = redis::cmd("TYPE")
        .arg(location)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    match kind.as_str() {
        "none" => Err(MetaError::NotFound(location.to_owned())),
        "string" => {
            let len: u64 = redis::cmd("STRLEN")
                .arg(location)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if len > max.as_u64() {
                return Err(too_large());
            }
            // GETRANGE, not GET: never more than the limit, even if the
            // value grew since STRLEN.
            let text: Vec<u8> = redis::cmd("GETRANGE")
                .arg(location)
                .arg(0)
                .arg(max.as_u64())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if text.len() as u64 > max.as_u64() {
                return Err(too_large());
            }
            json_object(location, &text)
        }
        "hash" => {
            let reply: redis::Value = redis::Script::new(HASH_WITHIN)
                .key(location)
                .arg(max.as_u64())
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let redis::Value::Array(items) = reply else {
                return Err(too_large());
            };
            let text = |v: &redis::Value| match v {
                redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
                other => Err(MetaError::Invalid(format!(
                    "metadata key `{location}`: unexpected Redis reply {other:?}"
                ))),
            };
            items
                .chunks(2)
                .map(|pair| match pair {
                    [k, v] => Ok((text(k)?, Value::String(text(v)?))),
                    _ => Err(MetaError::Invalid(format!(
                        "metadata key `{location}`: odd HGETALL reply"
                    ))),
                })
                .collect()
        }
        other => Err(MetaError::Invalid(format!(
            "metadata key `{location}` holds a Redis {other}, not a string or a hash"
        ))),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_store_reads_objects_but_no_link_out_of_its_root() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("meta");
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("m.json"), br#"{"a": 1}"#)?;
        std::fs::write(dir.path().join("other.json"), br#"{"secret": 1}"#)?;
        std::os::unix::fs::symlink(dir.path().join("other.json"), root.join("link.json"))?;
        let store = MetaStore::File { root };
        let max = ByteSize::kib(4);
        let found = store.fetch("m.json", max).await?;
        assert_eq!(found.get("a"), Some(&Value::from(1)));
        assert!(matches!(
            store.fetch("none.json", max).await,
            Err(MetaError::NotFound(_))
        ));
        match store.fetch("link.json", max).await {
            Err(MetaError::Invalid(why)) => {
                assert!(why.contains("symbolic link"), "{why}");
                assert!(why.contains("`link.json`"), "{why}");
            }
            other => panic!("a link out of the root was followed: {other:?}"),
        }
        Ok(())
    }
}
