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
//! The table comes from the connector's `init.sql` ([`INIT_SQL`]), which
//! the operator names in the grant (`sql: { init: FILE }`) and the engine
//! runs at every start; `execute` runs no DDL. Without it every message
//! fails, with an error that says so.
//!
//! See [`TextCounter`] for the exact definitions of a line and a word.

use sandpipe_sdk::prelude::*;

/// The table the counts are stored in: the connector's `init.sql`, for
/// the grant's `sql.init` (and the native tests' `Scenario::sql_init`).
pub const INIT_SQL: &str = include_str!("../init.sql");

/// Idempotent insert: a redelivered message overwrites its own row.
pub const UPSERT: &str = "INSERT INTO text_stats (message_id, location, lines, words, bytes) \
    VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT(message_id) DO UPDATE SET \
    location = excluded.location, \
    lines = excluded.lines, \
    words = excluded.words, \
    bytes = excluded.bytes";

/// How much of the object is asked for per host call.
pub const CHUNK: u32 = 64 * 1024;

/// The output the summary goes to when the config key `output` is not set.
pub const DEFAULT_OUTPUT: &str = "stats";

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
        sql::execute(
            UPSERT,
            &[
                sql::Value::from(msg.id.as_str()),
                sql::Value::from(location),
                sql::Value::try_from(stats.lines)?,
                sql::Value::try_from(stats.words)?,
                sql::Value::try_from(stats.bytes)?,
            ],
        )
        .map_err(without_init)?;

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

/// An upsert that failed for want of the table says how to set it up.
fn without_init(error: Error) -> Error {
    match error {
        Error::Invalid(m)
            if m.contains("no such table: text_stats")
                || m.contains("relation \"text_stats\" does not exist") =>
        {
            Error::Invalid(format!(
                "{m}: the table is made by text-stats's init script: name connectors/text-stats/init.sql \
                 in its grant (plugins.grants.text-stats.sql: {{ init: FILE }})"
            ))
        }
        other => other,
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

/// `execute` as a whole, natively, against the SDK's fake host
/// (`sandpipe_sdk::testing`), on the quickstart's sample texts.
#[cfg(test)]
mod execute_tests {
    use super::*;
    use sandpipe_sdk::testing::{self, FakeHost, Scenario};
    use std::path::Path;

    const HELLO_ID: &str = "82c514aa-327a-5c08-a8e7-b0dba562b3cd";
    const POEM_ID: &str = "88a80731-ef50-51f8-909d-680111c209b4";
    const ROWS: &str =
        "SELECT message_id, location, lines, words, bytes FROM text_stats ORDER BY message_id";

    /// examples/quickstart/spool/text-hello.json with its data, its metadata
    /// (inline and meta/hello.json) and the quickstart's config for
    /// text-stats. Kept as a folder in tests/scenarios/hello, which the
    /// engine's end-to-end test (tests/e2e/sdk_scenarios.rs) runs through
    /// `sandpipe exec` on the built component, expecting what
    /// `hello_natively` asserts.
    fn hello() -> Scenario {
        let meta = include_bytes!("../../../examples/quickstart/meta/hello.json");
        Scenario::new(HELLO_ID, "text/plain")
            .sql_init(INIT_SQL)
            .data(
                "texts/hello.txt",
                &include_bytes!("../../../examples/quickstart/data/texts/hello.txt")[..],
            )
            .meta("source", "quickstart")
            .meta_json(serde_json::from_slice(meta).expect("meta/hello.json"))
            .config("output", "stats")
    }

    /// examples/quickstart/spool/text-poem.json with its data.
    fn poem() -> Scenario {
        Scenario::new(POEM_ID, "text/plain")
            .sql_init(INIT_SQL)
            .data(
                "texts/poem.txt",
                &include_bytes!("../../../examples/quickstart/data/texts/poem.txt")[..],
            )
            .meta("source", "quickstart")
            .config("output", "stats")
    }

    /// The rows of `text_stats` as (message_id, location, lines, words, bytes).
    fn rows(report: &testing::Report) -> Vec<(String, String, i64, i64, i64)> {
        let rows = report.query(ROWS, &[]).expect("text_stats");
        rows.iter()
            .map(|r| {
                (
                    r.get_str("message_id").unwrap_or_default().to_owned(),
                    r.get_str("location").unwrap_or_default().to_owned(),
                    r.get_i64("lines").unwrap_or(-1),
                    r.get_i64("words").unwrap_or(-1),
                    r.get_i64("bytes").unwrap_or(-1),
                )
            })
            .collect()
    }

    fn row(
        id: &str,
        location: &str,
        lines: i64,
        words: i64,
        bytes: i64,
    ) -> (String, String, i64, i64, i64) {
        (id.into(), location.into(), lines, words, bytes)
    }

    #[test]
    fn hello_natively() {
        let report = hello().run::<TextStatsPlugin>();
        report.assert_done();
        assert_eq!(rows(&report), [row(HELLO_ID, "texts/hello.txt", 2, 6, 41)]);
        // The upsert, with its parameters: no DDL per message.
        assert_eq!(report.sql.len(), 1);
        assert_eq!(report.sql[0].statement, UPSERT);
        assert_eq!(
            report.sql[0].params,
            sandpipe_sdk::params![HELLO_ID, "texts/hello.txt", 2, 6, 41]
        );
        assert_eq!(report.sql[0].changed(), Some(1));
        // One summary to the configured output.
        assert_eq!(report.emits.len(), 1);
        let emit = &report.emits[0];
        assert_eq!(emit.output, "stats");
        assert_eq!(emit.header("content-type"), Some("application/json"));
        assert_eq!(
            emit.text(),
            Some(
                r#"{"bytes":41,"lines":2,"location":"texts/hello.txt","message_id":"82c514aa-327a-5c08-a8e7-b0dba562b3cd","words":6}"#
            )
        );
        assert_eq!(report.logs.len(), 1);
        assert_eq!(
            report.logs[0].message,
            "texts/hello.txt: 2 lines, 6 words, 41 bytes -> stats"
        );
        // Nothing else.
        assert!(report.blob_writes.is_empty() && report.state_changes.is_empty());
        assert!(report.denials.is_empty());
        assert_eq!(
            report.calls,
            [
                "blob.open-data",
                "blob.reader.read",
                "blob.reader.read",
                "sql.execute",
                "config.get",
                "emit.publish",
                "log.write",
            ]
        );
    }

    #[test]
    fn poem_natively_and_redelivery_upserts() {
        let first = hello().run::<TextStatsPlugin>();
        first.assert_done();
        let poem = poem();
        let second = testing::run::<TextStatsPlugin>(
            poem.message(),
            first
                .into_host()
                .data(poem.data.clone().unwrap_or_default()),
        );
        second.assert_done();
        assert_eq!(
            second.emits[0].json().ok(),
            Some(json!({
                "message_id": POEM_ID, "location": "texts/poem.txt",
                "lines": 6, "words": 37, "bytes": 180,
            }))
        );
        // Redelivered: the same row, not a second one.
        let third = testing::run::<TextStatsPlugin>(poem.message(), second.into_host());
        third.assert_done();
        assert_eq!(
            rows(&third),
            [
                row(HELLO_ID, "texts/hello.txt", 2, 6, 41),
                row(POEM_ID, "texts/poem.txt", 6, 37, 180),
            ]
        );
    }

    #[test]
    fn a_large_object_is_streamed_in_bounded_chunks() {
        let text = "one two three\n".repeat(200_000); // 2.8 MB
        let scenario = Scenario::new("m-big", "text/plain")
            .sql_init(INIT_SQL)
            .data("texts/big.txt", text.clone());
        let report = scenario.run::<TextStatsPlugin>();
        report.assert_done();
        assert_eq!(
            rows(&report),
            [row("m-big", "texts/big.txt", 200_000, 600_000, 2_800_000)]
        );
        let reads = report
            .calls
            .iter()
            .filter(|c| *c == "blob.reader.read")
            .count();
        // 64 KiB at a time, plus the empty read at the end.
        assert_eq!(reads, text.len().div_ceil(64 * 1024) + 1);
    }

    #[test]
    fn the_output_defaults_to_stats() {
        let scenario = Scenario::new("m-1", "text/plain")
            .sql_init(INIT_SQL)
            .data("a.txt", "a b\n");
        let report = scenario.run::<TextStatsPlugin>();
        report.assert_done();
        assert_eq!(report.emits_to("stats").count(), 1);
    }

    #[test]
    fn a_missing_data_object_is_dead_lettered_without_effects() {
        let message = sandpipe_sdk::Message {
            data_location: Some("texts/gone.txt".into()),
            ..testing::message("m-gone", "text/plain")
        };
        let report = testing::run::<TextStatsPlugin>(message, FakeHost::new());
        assert_eq!(
            report.outcome,
            Ok(Outcome::dead_letter(
                "no data object: no object at `texts/gone.txt`"
            ))
        );
        assert!(report.sql.is_empty() && report.emits.is_empty());
    }

    #[test]
    fn an_undeclared_output_fails_the_message_and_nothing_is_committed() {
        let host = hello().host().outputs(["other"]);
        let report = testing::run::<TextStatsPlugin>(hello().message(), host);
        assert!(
            matches!(&report.outcome, Err(Error::AccessDenied(m)) if m.contains("may not emit to output `stats`")),
            "{report}"
        );
        // The upsert ran, and was rolled back.
        assert_eq!(report.sql.len(), 1);
        assert!(rows(&report).is_empty());
    }

    #[test]
    fn without_the_init_script_the_message_fails_and_says_how_to_fix_it() {
        let mut scenario = hello();
        scenario.sql_init = None;
        let report = scenario.run::<TextStatsPlugin>();
        assert!(
            matches!(&report.outcome, Err(Error::Invalid(m))
                if m.starts_with("no such table: text_stats: the table is made by text-stats's init script")
                    && m.contains("plugins.grants.text-stats.sql: { init: FILE }")),
            "{report}"
        );
        assert!(report.emits.is_empty());
    }

    #[test]
    fn the_init_script_is_idempotent() {
        let host = FakeHost::new().sql_init(INIT_SQL).sql_init(INIT_SQL);
        let report = testing::run::<TextStatsPlugin>(hello().message(), host.data("a b c"));
        report.assert_done();
        assert_eq!(rows(&report), [row(HELLO_ID, "texts/hello.txt", 1, 3, 5)]);
    }

    #[test]
    fn a_database_outage_fails_the_message_before_emitting() {
        let host = hello()
            .host()
            .fail(Capability::Sql, Error::unavailable("database down"));
        let report = testing::run::<TextStatsPlugin>(hello().message(), host);
        assert_eq!(report.outcome, Err(Error::unavailable("database down")));
        assert!(report.emits.is_empty());
    }

    /// tests/scenarios/hello is `hello()` written by `Scenario::write_to`;
    /// `UPDATE_SCENARIOS=1 cargo test -p text-stats` rewrites it.
    #[test]
    fn the_hello_scenario_folder_is_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/hello");
        if std::env::var_os("UPDATE_SCENARIOS").is_some() {
            hello().write_to(&dir).expect("write the scenario");
        }
        for (name, bytes) in hello().files() {
            let kept = std::fs::read(dir.join(name)).unwrap_or_default();
            assert!(
                kept == bytes,
                "{}/{name} is stale: run UPDATE_SCENARIOS=1 cargo test -p text-stats",
                dir.display()
            );
        }
    }
}
