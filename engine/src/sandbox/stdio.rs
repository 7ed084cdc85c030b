//! A bounded capture of a guest's stderr: the only place a guest panic's
//! message appears. Bytes past the bound are dropped, never buffered.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// A shared, bounded byte buffer that a guest's stderr writes into.
#[derive(Clone)]
pub struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
}

impl Capture {
    /// A capture keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            buffer: Arc::new(Mutex::new(Vec::new())),
            capacity,
        }
    }

    /// What was captured, lossily decoded, trimmed.
    pub fn text(&self) -> String {
        let buffer = self.buffer.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&buffer).trim().to_owned()
    }

    /// Forget what was captured (a reused instance's next message).
    pub fn clear(&self) {
        if let Ok(mut buffer) = self.buffer.lock() {
            buffer.clear();
        }
    }

    fn push(&self, bytes: &[u8]) {
        if let Ok(mut buffer) = self.buffer.lock() {
            let room = self.capacity.saturating_sub(buffer.len());
            buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        // Report everything as written: a guest must not block or fail
        // because its stderr is full.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_its_capacity() {
        let c = Capture::new(4);
        c.push(b"ab");
        c.push(b"cdef");
        assert_eq!(c.text(), "abcd");
    }
}
