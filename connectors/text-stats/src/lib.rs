//! `text-stats`: a Sandpipe connector that counts the lines, words and bytes
//! of `text/plain` data objects.
//!
//! For each message it streams the data object in bounded chunks (it never
//! holds the whole object), stores the counts in the table `text_stats`
//! (an upsert keyed by the message id, so a redelivered message is counted
//! once) and publishes a JSON summary
//! `{"message_id", "location", "lines", "words", "bytes"}` with the header
//! `content-type: application/json` to the output named by the config key
//! `output` (default `stats`).
//!
//! A message without a data object, or whose object does not exist, is
//! dead-lettered. Any other host error fails the message.
//!
//! See [`TextCounter`] for the exact definitions of a line and a word.

use sandpipe_sdk::prelude::*;

/// The table the counts are stored in.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS text_stats (\
    message_id TEXT PRIMARY KEY, \
    location TEXT, \
    lines INTEGER NOT NULL, \
    words INTEGER NOT NULL, \
    bytes INTEGER NOT NULL)";

/// Idempotent insert: a redelivered message overwrites its own row.
const UPSERT: &str = "INSERT INTO text_stats (message_id, location, lines, words, bytes) \
    VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT(message_id) DO UPDATE SET \
    location = excluded.location, \
    lines = excluded.lines, \
    words = excluded.words, \
    bytes = excluded.bytes";

/// How much of the object is asked for per host call.
const CHUNK: u32 = 64 * 1024;

/// The output the summary goes to when the config key `output` is not set.
const DEFAULT_OUTPUT: &str = "stats";

/// Line, word and byte counts of one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextStats {
    /// Number of lines; see [`TextCounter`].
    pub lines: u64,
    /// Number of words; see [`TextCounter`].
    pub words: u64,
    /// Number of bytes.
    pub bytes: u64,
}

/// Counts lines, words and bytes of a text fed in chunks of any size; the
/// result does not depend on where the chunks are cut.
///
/// Definitions (byte-oriented, so any encoding and even invalid UTF-8 is
/// counted without error):
///
/// - **bytes**: the number of bytes.
/// - **lines**: the number of `\n` bytes, plus one if the text is not empty
///   and its last byte is not `\n` (an unterminated last line still counts).
///   So `""` has 0 lines, `"a"` 1, `"a\n"` 1, `"a\nb"` 2 and `"\n\n"` 2. This
///   differs from `wc -l`, which counts only `\n` bytes.
/// - **words**: maximal runs of bytes that are not ASCII whitespace (space,
///   `\t`, `\n`, vertical tab, form feed, `\r`), like `wc -w` in the C
///   locale. Non-ASCII whitespace such as U+00A0 does not separate words.
#[derive(Debug, Clone, Default)]
pub struct TextCounter {
    newlines: u64,
    words: u64,
    bytes: u64,
    in_word: bool,
    last_byte: Option<u8>,
}

/// Whether `b` separates words (C `isspace` in the C locale).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

impl TextCounter {
    /// A counter that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count the next chunk of the text.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.newlines += 1;
            }
            if is_space(b) {
                self.in_word = false;
            } else if !self.in_word {
                self.in_word = true;
                self.words += 1;
            }
        }
        self.bytes += chunk.len() as u64;
        if let Some(&last) = chunk.last() {
            self.last_byte = Some(last);
        }
    }

    /// The counts of everything fed so far.
    pub fn stats(&self) -> TextStats {
        let unterminated = matches!(self.last_byte, Some(b) if b != b'\n');
        TextStats {
            lines: self.newlines + u64::from(unterminated),
            words: self.words,
            bytes: self.bytes,
        }
    }
}

/// Count a whole text at once (for tests and small inputs).
pub fn count(text: &[u8]) -> TextStats {
    let mut counter = TextCounter::new();
    counter.feed(text);
    counter.stats()
}

/// The JSON summary published for one message.
pub fn summary(message_id: &str, location: Option<&str>, stats: TextStats) -> serde_json::Value {
    json!({
        "message_id": message_id,
        "location": location,
        "lines": stats.lines,
        "words": stats.words,
        "bytes": stats.bytes,
    })
}

use sandpipe_sdk::serde_json;

/// The `text-stats` plugin.
pub struct TextStatsPlugin;

impl Plugin for TextStatsPlugin {
    fn describe() -> Description {
        Description {
            name: "text-stats".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mime_types: vec!["text/plain".into()],
            capabilities: vec![
                Capability::Log,
                Capability::Config,
                Capability::Blob,
                Capability::Sql,
                Capability::Emit,
            ],
        }
    }

    fn execute(msg: Message) -> Result<Outcome, Error> {
        let mut reader = match blob::open_data() {
            Ok(reader) => reader,
            Err(Error::NotFound(what)) => {
                return Ok(Outcome::DeadLetter(format!("no data object: {what}")));
            }
            Err(other) => return Err(other),
        };

        let mut counter = TextCounter::new();
        loop {
            let chunk = reader.read_chunk(CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            counter.feed(&chunk);
        }
        let stats = counter.stats();

        let location = msg.data_location.as_deref();
        sql::execute(CREATE_TABLE, &[])?;
        sql::execute(
            UPSERT,
            &[
                sql::Value::from(msg.id.as_str()),
                sql::Value::from(location),
                sql::Value::try_from(stats.lines)?,
                sql::Value::try_from(stats.words)?,
                sql::Value::try_from(stats.bytes)?,
            ],
        )?;

        let output = config::get_or("output", DEFAULT_OUTPUT)?;
        emit::publish_json(&output, &summary(&msg.id, location, stats))?;

        sandpipe_sdk::info!(
            "{}: {} lines, {} words, {} bytes -> {output}",
            location.unwrap_or(&msg.id),
            stats.lines,
            stats.words,
            stats.bytes
        );
        Ok(Outcome::Done)
    }
}

sandpipe_sdk::export_plugin!(TextStatsPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(lines: u64, words: u64, bytes: u64) -> TextStats {
        TextStats {
            lines,
            words,
            bytes,
        }
    }

    #[test]
    fn empty_text() {
        assert_eq!(count(b""), stats(0, 0, 0));
    }

    #[test]
    fn line_definition() {
        assert_eq!(count(b"a").lines, 1);
        assert_eq!(count(b"a\n").lines, 1);
        assert_eq!(count(b"a\nb").lines, 2);
        assert_eq!(count(b"\n").lines, 1);
        assert_eq!(count(b"\n\n").lines, 2);
        assert_eq!(count(b"a\r\nb\r\n").lines, 2);
    }

    #[test]
    fn words_and_whitespace() {
        assert_eq!(count(b"hello world"), stats(1, 2, 11));
        assert_eq!(count(b"  leading and trailing  \n"), stats(1, 3, 25));
        assert_eq!(count(b"tabs\tand\x0bvt\x0cff\rcr"), stats(1, 5, 17));
        assert_eq!(count(b" \t\n "), stats(2, 0, 4));
        // U+00A0 (no-break space) is not a separator.
        assert_eq!(count("a\u{a0}b".as_bytes()).words, 1);
        // Invalid UTF-8 is just bytes.
        assert_eq!(count(b"\xff\xfe x"), stats(1, 2, 4));
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let text: &[u8] = b"The quick brown fox\njumps over\n\n  the lazy dog.\nend";
        let whole = count(text);
        assert_eq!(whole, stats(5, 10, text.len() as u64));
        for size in 1..text.len() {
            let mut counter = TextCounter::new();
            for chunk in text.chunks(size) {
                counter.feed(chunk);
            }
            assert_eq!(counter.stats(), whole, "chunk size {size}");
        }
        // Every two-way split, including empty chunks.
        for cut in 0..=text.len() {
            let mut counter = TextCounter::new();
            counter.feed(&text[..cut]);
            counter.feed(&[]);
            counter.feed(&text[cut..]);
            assert_eq!(counter.stats(), whole, "cut at {cut}");
        }
    }

    /// The quickstart's sample texts; their README quotes these numbers.
    #[test]
    fn quickstart_samples() {
        let hello = include_bytes!("../../../examples/quickstart/data/texts/hello.txt");
        let poem = include_bytes!("../../../examples/quickstart/data/texts/poem.txt");
        assert_eq!(count(hello), stats(2, 6, 41));
        // The last line has no newline: 5 `\n` + 1.
        assert_eq!(count(poem), stats(6, 37, 180));
    }

    #[test]
    fn summary_shape() {
        let v = summary("m-1", Some("texts/a.txt"), stats(2, 3, 10));
        assert_eq!(
            v.to_string(),
            r#"{"bytes":10,"lines":2,"location":"texts/a.txt","message_id":"m-1","words":3}"#
        );
        let v = summary("m-2", None, TextStats::default());
        assert_eq!(v["location"], serde_json::Value::Null);
    }
}
