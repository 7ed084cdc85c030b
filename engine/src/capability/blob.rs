//! `blob`: the message's data object as a bounded stream, reads under
//! granted prefixes, and writes under granted prefixes (applied on `done`).

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde_json::json;
use wasmtime::component::Resource;

use crate::capability::{Interface, journal};
use crate::config::list_or_none;
use crate::sandbox::InvocationState;
use crate::sandbox::bindings::WitError;
use crate::sandbox::bindings::sandpipe::connector::blob::{Host, HostReader};
use crate::store::data::{DataError, ObjectStream};

/// An open object, read front to back.
pub struct BlobReader {
    stream: BoxStream<'static, Result<Bytes, DataError>>,
    pending: Bytes,
    size: Option<u64>,
    done: bool,
    /// A store error met after some bytes of a read: reported by the next.
    failed: Option<DataError>,
}

impl From<ObjectStream> for BlobReader {
    fn from(object: ObjectStream) -> Self {
        Self {
            stream: object.stream,
            pending: Bytes::new(),
            size: object.size,
            done: false,
            failed: None,
        }
    }
}

impl BlobReader {
    /// Up to `max` bytes, gathered from as many of the store's chunks as it
    /// takes (a disk object streams in 8 KiB chunks), so a large object
    /// takes few host calls; empty at the end. Never holds more than `max`
    /// bytes plus one store chunk.
    pub async fn read(&mut self, max: usize) -> Result<Bytes, DataError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        let mut out: Option<BytesMut> = None;
        loop {
            let have = out.as_ref().map_or(0, BytesMut::len);
            if have >= max {
                break;
            }
            if self.pending.is_empty() {
                if self.done {
                    break;
                }
                match self.stream.next().await {
                    Some(Ok(chunk)) => self.pending = chunk,
                    Some(Err(err)) if have == 0 => return Err(err),
                    Some(Err(err)) => {
                        self.failed = Some(err);
                        break;
                    }
                    None => self.done = true,
                }
                continue;
            }
            let part = self.pending.split_to(self.pending.len().min(max - have));
            match &mut out {
                // The store's chunk alone fills the read: no copy.
                None if part.len() == max => return Ok(part),
                None => {
                    let mut buf = BytesMut::with_capacity(max);
                    buf.extend_from_slice(&part);
                    out = Some(buf);
                }
                Some(buf) => buf.extend_from_slice(&part),
            }
        }
        Ok(out.map(BytesMut::freeze).unwrap_or_default())
    }
}

fn data_error(err: DataError) -> WitError {
    match err {
        DataError::NotFound(l) => WitError::NotFound(format!("no object at `{l}`")),
        DataError::Invalid(m) => WitError::Invalid(m),
        DataError::Unavailable(m) => WitError::Unavailable(m),
    }
}

/// Whether `location` is `prefix` itself or lies below it, on a path
/// segment boundary (`thumbs` grants `thumbs/a`, not `thumbsX/a`).
fn under(location: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('/');
        location == p
            || location
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/') || p.is_empty())
    })
}

impl InvocationState {
    /// Deny unless the grant's `blob.read` / `blob.write` covers `location`.
    fn check_prefix(&mut self, location: &str, access: &str) -> Result<(), WitError> {
        let plugin = self.host.plugin.clone();
        let allowed = plugin
            .grant
            .blob
            .as_ref()
            .map(|b| {
                if access == "write" {
                    b.write.as_slice()
                } else {
                    b.read.as_slice()
                }
            })
            .unwrap_or_default();
        if under(location, allowed) {
            return Ok(());
        }
        let message = format!(
            "plugin `{}` may not {access} `{location}` (granted {access} prefixes: {})",
            plugin.name,
            list_or_none(allowed)
        );
        Err(self.host.deny(message))
    }

    /// Deny before opening when `limits.blob_readers` are open already:
    /// each holds one of the engine's files or connections.
    fn check_readers(&mut self) -> Result<(), WitError> {
        let limit = self.host.plugin.limits.blob_readers;
        if self.host.readers >= limit {
            return Err(self.host.limit(
                "blob_readers",
                format!("more than {limit} objects open at once in one invocation (drop a reader to open another)"),
            ));
        }
        Ok(())
    }

    fn open_reader(&mut self, object: ObjectStream) -> Result<Resource<BlobReader>, WitError> {
        let reader = self.table.push(BlobReader::from(object)).map_err(|e| {
            self.host
                .limit("blob_readers", format!("too many open readers: {e}"))
        })?;
        self.host.readers += 1;
        Ok(reader)
    }
}

impl InvocationState {
    /// Open `location` (already allowed) as a new reader, within the
    /// open-readers limit; an outage of the store is recorded as one.
    async fn open_object(&mut self, location: &str) -> Result<Resource<BlobReader>, WitError> {
        self.check_readers()?;
        let object = self
            .host
            .plugin
            .services
            .data
            .open(location)
            .await
            .map_err(|e| self.host.note(data_error(e)))?;
        self.open_reader(object)
    }

    async fn blob_open_data(&mut self) -> Result<Resource<BlobReader>, WitError> {
        self.host.enter(Interface::Blob, "open-data")?;
        let message = self.host.message()?;
        let location = message.data_location.clone().ok_or_else(|| {
            WitError::NotFound(format!("message `{}` has no data location", message.id))
        })?;
        self.open_object(&location).await
    }

    async fn blob_open(&mut self, location: String) -> Result<Resource<BlobReader>, WitError> {
        self.host.enter(Interface::Blob, "open")?;
        let own = self
            .host
            .message
            .as_ref()
            .and_then(|m| m.data_location.as_deref())
            == Some(location.as_str());
        if !own {
            self.check_prefix(&location, "read")?;
        }
        self.open_object(&location).await
    }

    async fn blob_put(&mut self, location: String, bytes: Vec<u8>) -> Result<(), WitError> {
        self.host.enter(Interface::Blob, "put")?;
        self.check_prefix(&location, "write")?;
        let plugin = self.host.plugin.clone();
        plugin
            .services
            .data
            .check_location(&location)
            .map_err(data_error)?;
        let limit = plugin.limits.blob_put_bytes;
        let written = self.host.effects.put_bytes;
        if written + bytes.len() as u64 > limit.as_u64() {
            return Err(self.host.limit(
                "blob_put_bytes",
                format!(
                    "writing {} more bytes would exceed {limit} in one invocation ({written} already written)",
                    bytes.len()
                ),
            ));
        }
        let effects = &mut self.host.effects;
        effects.put_bytes += bytes.len() as u64;
        effects.puts.push((location, Bytes::from(bytes)));
        Ok(())
    }
}

impl InvocationState {
    async fn blob_read(
        &mut self,
        reader: Resource<BlobReader>,
        max: u32,
    ) -> Result<Vec<u8>, WitError> {
        self.host.enter(Interface::Blob, "reader.read")?;
        let cap = self.host.plugin.limits.blob_chunk.as_u64();
        let max = (max as u64).min(cap) as usize;
        let reader = self
            .table
            .get_mut(&reader)
            .map_err(|e| WitError::Invalid(format!("bad reader handle: {e}")))?;
        let chunk = match reader.read(max).await {
            Ok(chunk) => chunk,
            Err(e) => return Err(self.host.note(data_error(e))),
        };
        Ok(chunk.to_vec())
    }
}

/// The WIT functions: each journaled (see [`journal`]), then run.
impl Host for InvocationState {
    async fn open_data(&mut self) -> Result<Resource<BlobReader>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Blob, "open-data", || json!({}));
        let result = self.blob_open_data().await;
        self.host.journal_result(call, &result, |_| json!("reader"));
        result
    }

    async fn open(&mut self, location: String) -> Result<Resource<BlobReader>, WitError> {
        let call =
            self.host
                .journal_call(Interface::Blob, "open", || json!({ "location": location }));
        let result = self.blob_open(location).await;
        self.host.journal_result(call, &result, |_| json!("reader"));
        result
    }

    async fn put(&mut self, location: String, bytes: Vec<u8>) -> Result<(), WitError> {
        let call = self.host.journal_call(
            Interface::Blob,
            "put",
            || json!({ "location": location, "bytes": journal::bytes(&bytes) }),
        );
        let result = self.blob_put(location, bytes).await;
        self.host.journal_result(call, &result, |_| json!(null));
        result
    }
}

impl HostReader for InvocationState {
    async fn read(&mut self, reader: Resource<BlobReader>, max: u32) -> Result<Vec<u8>, WitError> {
        let call = self
            .host
            .journal_call(Interface::Blob, "reader.read", || json!({ "max": max }));
        let result = self.blob_read(reader, max).await;
        self.host
            .journal_result(call, &result, |chunk| journal::bytes(chunk));
        result
    }

    async fn size(&mut self, reader: Resource<BlobReader>) -> Option<u64> {
        let call = self
            .host
            .journal_call(Interface::Blob, "reader.size", || json!({}));
        let size = self.table.get(&reader).ok().and_then(|r| r.size);
        self.host.journal_result(call, &Ok(size), |s| json!(s));
        size
    }

    async fn drop(&mut self, reader: Resource<BlobReader>) -> wasmtime::Result<()> {
        self.table.delete(reader)?;
        self.host.readers = self.host.readers.saturating_sub(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let p = vec!["thumbs/".to_owned(), "a/b".to_owned()];
        assert!(under("thumbs/x.png", &p));
        assert!(under("a/b/c", &p));
        assert!(under("a/b", &p));
        assert!(!under("thumbsX/x.png", &p));
        assert!(!under("a/bc", &p));
        assert!(!under("other", &p));
        assert!(!under("thumbs/x", &[]));
    }

    #[tokio::test]
    async fn reader_returns_bounded_chunks_across_stream_items() -> anyhow::Result<()> {
        let items: Vec<Result<Bytes, DataError>> = vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ];
        let mut r = BlobReader::from(ObjectStream {
            stream: futures::stream::iter(items).boxed(),
            size: Some(11),
        });
        let mut all = Vec::new();
        loop {
            let chunk = r.read(4).await?;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 4);
            all.extend_from_slice(&chunk);
        }
        assert_eq!(all, b"hello world");
        Ok(())
    }

    #[tokio::test]
    async fn a_read_gathers_small_store_chunks_and_reports_a_late_error_next() {
        let mut items: Vec<Result<Bytes, DataError>> = (0..10)
            .map(|_| Ok(Bytes::from_static(b"12345678")))
            .collect();
        items.push(Err(DataError::Unavailable("gone".into())));
        let mut r = BlobReader::from(ObjectStream {
            stream: futures::stream::iter(items).boxed(),
            size: None,
        });
        // 8-byte store chunks fill a 20-byte read: one host call, not three.
        assert_eq!(r.read(20).await.ok().map(|b| b.len()), Some(20));
        assert_eq!(r.read(8).await.ok().map(|b| b.len()), Some(8));
        // The rest (52 bytes) comes back, then the store's error.
        assert_eq!(r.read(1000).await.ok().map(|b| b.len()), Some(52));
        assert!(matches!(r.read(1000).await, Err(DataError::Unavailable(_))));
    }
}
