//! The data store: where messages' data objects live (object_store).
//!
//! Locations are relative paths. A location that is absolute, contains `..`
//! or `.` segments, empty segments, backslashes, control characters or a URL
//! scheme is refused before it reaches the store, so a plugin or a message
//! can never name an object outside the configured root.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::config::DataStoreConfig;

/// Why a data store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    /// No object at that location.
    #[error("no object at `{0}`")]
    NotFound(String),
    /// The location is malformed or escapes the root.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; retrying later may work.
    #[error("data store unavailable: {0}")]
    Unavailable(String),
}

/// An object opened for reading.
pub struct ObjectStream {
    /// Its bytes, in chunks.
    pub stream: BoxStream<'static, Result<Bytes, DataError>>,
    /// Its size, when known.
    pub size: Option<u64>,
}

/// The configured data store.
#[derive(Clone)]
pub struct DataStore {
    store: Arc<dyn ObjectStore>,
}

impl DataStore {
    /// The store described by `config` (a disk root is created if missing).
    pub fn new(config: &DataStoreConfig) -> anyhow::Result<Self> {
        let store: Arc<dyn ObjectStore> = match config {
            DataStoreConfig::Disk { root } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| anyhow::anyhow!("data_store.root {}: {e}", root.display()))?;
                Arc::new(LocalFileSystem::new_with_prefix(root)?)
            }
            DataStoreConfig::Memory => Arc::new(InMemory::new()),
            DataStoreConfig::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
                virtual_hosted_style,
            } => {
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key)
                    .with_allow_http(*allow_http)
                    .with_virtual_hosted_style_request(*virtual_hosted_style);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                Arc::new(
                    builder
                        .build()
                        .map_err(|e| anyhow::anyhow!("data_store (s3, bucket `{bucket}`): {e}"))?,
                )
            }
        };
        Ok(Self { store })
    }

    /// Refuse locations that could escape the root.
    pub fn check_location(&self, location: &str) -> Result<ObjectPath, DataError> {
        parse_location(location)
    }

    /// Open the object at `location` for streaming.
    pub async fn open(&self, location: &str) -> Result<ObjectStream, DataError> {
        let path = parse_location(location)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| store_error(location, e))?;
        let size = Some(result.meta.size);
        let owned = location.to_owned();
        let stream = result
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| store_error(&owned, e)))
            .boxed();
        Ok(ObjectStream { stream, size })
    }

    /// Whether an object exists at `location`.
    pub async fn exists(&self, location: &str) -> Result<bool, DataError> {
        let path = parse_location(location)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(location, e)),
        }
    }

    /// Write `bytes` at `location`.
    pub async fn put(&self, location: &str, bytes: Bytes) -> Result<(), DataError> {
        let path = parse_location(location)?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| store_error(location, e))
    }
}

fn store_error(location: &str, err: object_store::Error) -> DataError {
    match err {
        object_store::Error::NotFound { .. } => DataError::NotFound(location.to_owned()),
        object_store::Error::InvalidPath { source } => {
            DataError::Invalid(format!("invalid location `{location}`: {source}"))
        }
        other => DataError::Unavailable(other.to_string()),
    }
}

/// Validate a location and turn it into an object path.
pub fn parse_location(location: &str) -> Result<ObjectPath, DataError> {
    let bad = |why: &str| DataError::Invalid(format!("invalid location `{location}`: {why}"));
    if location.is_empty() {
        return Err(bad("empty"));
    }
    if location.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    if location.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if location.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    if location.contains("://") || location.contains(':') {
        return Err(bad("URLs and drive letters are not allowed"));
    }
    if location.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    if location.contains('%') {
        return Err(bad("percent-encoding is not allowed"));
    }
    for segment in location.split('/') {
        match segment {
            "" => return Err(bad("empty path segments are not allowed")),
            "." | ".." => return Err(bad("`.` and `..` segments are not allowed")),
            _ => {}
        }
    }
    ObjectPath::parse(location).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_that_escape_the_root_are_refused() {
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "/etc/passwd",
            "a//b",
            "./a",
            "file:///etc/passwd",
            "s3://bucket/key",
            "a\\..\\b",
            "a/%2e%2e/b",
            "a\u{0}b",
            "",
        ] {
            assert!(parse_location(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["a", "images/cat.png", "x/y/z.txt", "dots.in.name", "a..b/c"] {
            assert!(parse_location(good).is_ok(), "{good:?} was refused");
        }
    }

    #[tokio::test]
    async fn disk_store_reads_writes_and_reports_missing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = DataStore::new(&DataStoreConfig::Disk {
            root: dir.path().to_owned(),
        })?;
        store.put("a/b.txt", Bytes::from_static(b"hello")).await?;
        assert!(std::fs::read(dir.path().join("a/b.txt"))? == b"hello");
        assert!(store.exists("a/b.txt").await?);
        assert!(!store.exists("a/nope.txt").await?);
        let mut object = store.open("a/b.txt").await?;
        assert_eq!(object.size, Some(5));
        let mut all = Vec::new();
        while let Some(chunk) = object.stream.next().await {
            all.extend_from_slice(&chunk?);
        }
        assert_eq!(all, b"hello");
        assert!(matches!(
            store.open("a/nope.txt").await.err(),
            Some(DataError::NotFound(_))
        ));
        Ok(())
    }
}

#[cfg(test)]
mod properties {
    use std::path::{Component, Path};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any location that is accepted stays below the root: joined to a
        /// root it has only normal components.
        #[test]
        fn accepted_locations_never_leave_the_root(location in "[a-z./%\\\\:~ -]{0,24}") {
            if let Ok(path) = parse_location(&location) {
                let joined = Path::new("/root").join(path.as_ref());
                prop_assert!(joined.starts_with("/root"));
                prop_assert!(
                    joined.components().skip(2).all(|c| matches!(c, Component::Normal(_))),
                    "{location:?} -> {joined:?}"
                );
                prop_assert!(!location.split('/').any(|s| s == ".."));
            }
        }
    }
}
