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
}

impl MetaStore {
    /// The store described by `config`.
    pub fn new(config: &MetaStoreConfig) -> Self {
        match config {
            MetaStoreConfig::File { root } => Self::File { root: root.clone() },
            MetaStoreConfig::Inline => Self::Inline,
        }
    }

    /// The JSON object at `location`.
    pub async fn fetch(&self, location: &str) -> Result<Map<String, Value>, MetaError> {
        match self {
            Self::Inline => Err(MetaError::Invalid(format!(
                "the message names meta_location `{location}` but meta_store is `inline`"
            ))),
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
