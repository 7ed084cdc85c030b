//! The metadata store: where a message's `meta_location` points.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::config::MetaStoreConfig;
use crate::store::data::parse_location;

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
    /// The store described by `config`.
    pub async fn new(config: &MetaStoreConfig) -> anyhow::Result<Self> {
        Ok(match config {
            MetaStoreConfig::File { root } => Self::File { root: root.clone() },
            MetaStoreConfig::Inline => Self::Inline,
            MetaStoreConfig::Redis { url, timeout } => {
                Self::Redis(crate::listener::redis::connect(url, *timeout).await?)
            }
        })
    }

    /// The JSON object at `location`.
    pub async fn fetch(&self, location: &str) -> Result<Map<String, Value>, MetaError> {
        match self {
            Self::Inline => Err(MetaError::Invalid(format!(
                "the message names meta_location `{location}` but meta_store is `inline`"
            ))),
            Self::Redis(conn) => fetch_redis(conn.clone(), location).await,
            Self::File { root } => {
                let path =
                    parse_location(location).map_err(|e| MetaError::Invalid(e.to_string()))?;
                let file = root.join(path.as_ref());
                let bytes = match tokio::fs::read(&file).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(MetaError::NotFound(location.to_owned()));
                    }
                    Err(e) => {
                        return Err(MetaError::Unavailable(format!("{}: {e}", file.display())));
                    }
                };
                if bytes.len() > 1 << 20 {
                    return Err(MetaError::Invalid(format!(
                        "metadata `{location}` is larger than 1 MiB"
                    )));
                }
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(map)) => Ok(map),
                    Ok(_) => Err(MetaError::Invalid(format!(
                        "metadata `{location}` is not a JSON object"
                    ))),
                    Err(e) => Err(MetaError::Invalid(format!(
                        "metadata `{location}` is not valid JSON: {e}"
                    ))),
                }
            }
        }
    }
}

/// sqAPI deployments store a JSON object as a string; others use a hash.
/// Read whichever the key holds.
async fn fetch_redis(
    mut conn: redis::aio::ConnectionManager,
    location: &str,
) -> Result<Map<String, Value>, MetaError> {
    let unavailable = |e: redis::RedisError| MetaError::Unavailable(format!("Redis: {e}"));
    let kind: String = redis::cmd("TYPE")
        .arg(location)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    match kind.as_str() {
        "none" => Err(MetaError::NotFound(location.to_owned())),
        "string" => {
            let text: Vec<u8> = redis::cmd("GET")
                .arg(location)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if text.len() > 1 << 20 {
                return Err(MetaError::Invalid(format!(
                    "metadata `{location}` is larger than 1 MiB"
                )));
            }
            match serde_json::from_slice::<Value>(&text) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err(MetaError::Invalid(format!(
                    "metadata `{location}` is not a JSON object"
                ))),
                Err(e) => Err(MetaError::Invalid(format!(
                    "metadata `{location}` is not valid JSON: {e}"
                ))),
            }
        }
        "hash" => {
            let pairs: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(location)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect())
        }
        other => Err(MetaError::Invalid(format!(
            "metadata key `{location}` holds a Redis {other}, not a string or a hash"
        ))),
    }
}
