//! Object storage: the message's data object as a stream, and locations the
//! operator granted. Requires the `blob` grant.
//!
//! Objects are read front to back in bounded chunks, so an object far larger
//! than the plugin's memory can be processed. [`Reader`] implements
//! [`std::io::Read`], so it works with [`std::io::BufReader`],
//! [`std::io::copy`] and friends.
//!
//! ```no_run
//! use sandpipe_sdk::blob;
//! use std::io::{BufRead, BufReader};
//!
//! # fn run() -> Result<(), sandpipe_sdk::Error> {
//! let reader = blob::open_data()?;
//! let mut lines = 0u64;
//! for line in BufReader::new(reader).lines() {
//!     let _line = line?;
//!     lines += 1;
//! }
//! blob::put("reports/lines.txt", lines.to_string().as_bytes())?;
//! # Ok(())
//! # }
//! ```

use std::io;

use crate::{Error, host};

/// The chunk size [`Reader`]'s [`io::Read`] implementation asks the host for:
/// 64 KiB.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;

/// Open the current message's data object (its `data-location`).
///
/// [`Error::NotFound`] if the message has none or the object does not exist.
pub fn open_data() -> Result<Reader, Error> {
    host::blob_open_data().map(Reader::new).map_err(Error::from)
}

/// Open an object under a location prefix the grant's `blob.read` lists.
pub fn open(location: &str) -> Result<Reader, Error> {
    host::blob_open(location)
        .map(Reader::new)
        .map_err(Error::from)
}

/// Write an object under a location prefix the grant's `blob.write` lists.
/// The object is written only if the plugin's outcome is
/// [`Outcome::Done`](crate::Outcome::Done).
pub fn put(location: &str, bytes: &[u8]) -> Result<(), Error> {
    host::blob_put(location, bytes).map_err(Error::from)
}

/// An open object, read front to back.
///
/// Use [`Reader::read_chunk`] to get the host's chunks directly, or the
/// [`io::Read`] implementation (which asks for [`DEFAULT_CHUNK`] bytes at a
/// time and buffers what the caller's buffer cannot take). Host errors
/// surface from `Read` as [`io::Error`]s that convert back into the original
/// [`Error`] with `?` or `Error::from`.
pub struct Reader {
    inner: host::Reader,
    /// Bytes fetched from the host but not yet handed out.
    pending: Vec<u8>,
    /// How many bytes of `pending` were already handed out.
    pos: usize,
    /// Whether the host reported the end of the object.
    eof: bool,
    /// How many bytes were handed out so far.
    consumed: u64,
}

impl Reader {
    fn new(inner: host::Reader) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            pos: 0,
            eof: false,
            consumed: 0,
        }
    }

    /// The object's size in bytes, when the store knows it.
    pub fn size(&self) -> Option<u64> {
        host::reader_size(&self.inner)
    }

    /// How many bytes were read from this reader so far.
    pub fn position(&self) -> u64 {
        self.consumed
    }

    /// The next chunk of up to `max` bytes (the engine may cap `max`
    /// further). An empty vector means the end of the object (or `max` is
    /// 0).
    pub fn read_chunk(&mut self, max: u32) -> Result<Vec<u8>, Error> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let want = usize::try_from(max).unwrap_or(usize::MAX);
        let chunk = if self.pos < self.pending.len() {
            let end = self.pending.len().min(self.pos.saturating_add(want));
            let out = self.pending[self.pos..end].to_vec();
            self.pos = end;
            out
        } else {
            let mut chunk = self.fetch(max)?;
            if chunk.len() > want {
                // A host must not return more than asked; keep the excess.
                self.pending = chunk.split_off(want);
                self.pos = 0;
            }
            chunk
        };
        self.consumed += chunk.len() as u64;
        Ok(chunk)
    }

    /// Read the rest of the object into memory. Only for objects known to
    /// be small: prefer streaming with [`Reader::read_chunk`] or
    /// [`io::Read`].
    pub fn read_all(&mut self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_chunk(DEFAULT_CHUNK)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// Read and discard the rest of the object; returns how many bytes were
    /// skipped. Useful to count an object's size when the store does not
    /// know it.
    pub fn skip_rest(&mut self) -> Result<u64, Error> {
        let mut skipped = 0u64;
        loop {
            let chunk = self.read_chunk(DEFAULT_CHUNK)?;
            if chunk.is_empty() {
                return Ok(skipped);
            }
            skipped += chunk.len() as u64;
        }
    }

    /// An iterator over the rest of the object in chunks of at most `max`
    /// bytes; it stops after the end or after the first error.
    pub fn chunks(&mut self, max: u32) -> Chunks<'_> {
        Chunks {
            reader: self,
            max,
            done: false,
        }
    }

    fn fetch(&mut self, max: u32) -> Result<Vec<u8>, Error> {
        if self.eof {
            return Ok(Vec::new());
        }
        let chunk = host::reader_read(&mut self.inner, max).map_err(Error::from)?;
        if chunk.is_empty() {
            self.eof = true;
        }
        Ok(chunk)
    }
}

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.pending.len() {
            self.pending = self.fetch(DEFAULT_CHUNK)?;
            self.pos = 0;
        }
        let available = &self.pending[self.pos..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.pos += n;
        self.consumed += n as u64;
        if self.pos >= self.pending.len() {
            // Free the chunk early: a plugin's memory is small.
            self.pending = Vec::new();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("position", &self.consumed)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

/// Iterator over an object's chunks; see [`Reader::chunks`].
pub struct Chunks<'a> {
    reader: &'a mut Reader,
    max: u32,
    done: bool,
}

impl Iterator for Chunks<'_> {
    type Item = Result<Vec<u8>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.reader.read_chunk(self.max) {
            Ok(chunk) if chunk.is_empty() => {
                self.done = true;
                None
            }
            Ok(chunk) => Some(Ok(chunk)),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
