"""python-csv: a Sandpipe plugin in Python (componentize-py).

Parses the message's CSV data object, streamed through `blob` in bounded
chunks (never the whole object in memory), and writes every row through
`sql` into its own tables:

    csv_rows(message_id, row_number, record)   one row per CSV record;
                                               `record` is a JSON object
                                               {column: value} (values as text)
    csv_files(message_id, location, columns, row_count, byte_count)

Both are upserts keyed by the message id (plus the row number), so a
redelivered message leaves the same rows. The first CSV record is the
header. A malformed file (not UTF-8, a record with a different number of
fields than the header, a quoting error) is dead-lettered with the line
number: it can never succeed.

Config (all optional): `delimiter` (default `,`), `chunk_bytes` (bytes per
`blob` read, default 65536), `batch_rows` (rows per INSERT, default 50).

Build: `just py-plugin` (see build.sh beside this file).
"""

import codecs
import csv

# componentize-py bundles the modules the app imports when it is built;
# codecs are looked up by name at run time, so import the one used here.
import encodings.utf_8_sig  # noqa: F401
import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import blob, config, log, sql
from wit_world.imports.log import Level
from wit_world.imports.sql import Value_Int, Value_Text
from wit_world.imports.types import (
    Capability,
    Description,
    Error_Invalid,
    Outcome_DeadLetter,
    Outcome_Done,
)

VERSION = "0.1.0"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS csv_rows (
        message_id TEXT NOT NULL,
        row_number BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (message_id, row_number)
    )""",
    """CREATE TABLE IF NOT EXISTS csv_files (
        message_id TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        columns TEXT NOT NULL,
        row_count BIGINT NOT NULL,
        byte_count BIGINT NOT NULL
    )""",
]


class Malformed(Exception):
    """The data object can never be parsed: dead-letter the message."""


class WitWorld(wit_world.WitWorld):
    def describe(self) -> Description:
        return Description(
            name="python-csv",
            version=VERSION,
            mime_types=["text/csv"],
            capabilities=[Capability.LOG, Capability.CONFIG, Capability.BLOB, Capability.SQL],
        )

    def execute(self, msg):
        delimiter = setting("delimiter", ",")
        chunk_bytes = int_setting("chunk_bytes", 65536)
        batch_rows = int_setting("batch_rows", 50)
        if len(delimiter) != 1:
            raise Err(Error_Invalid(f"config `delimiter` must be one character, not {delimiter!r}"))

        for statement in SCHEMA:
            sql.execute(statement, [])

        source = ChunkedLines(blob.open_data(), chunk_bytes)
        records = csv.reader(source, delimiter=delimiter, strict=True)
        header = None
        batch = []
        rows = 0
        try:
            for record in records:
                if not record or record == [""]:
                    continue  # blank line
                if header is None:
                    header = record
                    continue
                if len(record) != len(header):
                    raise Malformed(
                        f"line {records.line_num}: {len(record)} fields, the header has {len(header)}"
                    )
                rows += 1
                batch.append((rows, json.dumps(dict(zip(header, record)), ensure_ascii=False)))
                if len(batch) >= batch_rows:
                    upsert(msg.id, batch)
                    batch = []
        except (csv.Error, Malformed) as e:
            return Outcome_DeadLetter(f"malformed CSV in {msg.data_location}: {e}")
        except UnicodeDecodeError as e:
            return Outcome_DeadLetter(
                f"malformed CSV in {msg.data_location}: not UTF-8 near byte {source.consumed}: {e.reason}"
            )
        if batch:
            upsert(msg.id, batch)
        if header is None:
            return Outcome_DeadLetter(f"malformed CSV in {msg.data_location}: no header line")

        # A redelivered, shorter object must not leave stale rows behind.
        sql.execute(
            "DELETE FROM csv_rows WHERE message_id = $1 AND row_number > $2",
            [Value_Text(msg.id), Value_Int(rows)],
        )
        sql.execute(
            "INSERT INTO csv_files (message_id, location, columns, row_count, byte_count) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id) DO UPDATE SET "
            "location = excluded.location, columns = excluded.columns, "
            "row_count = excluded.row_count, byte_count = excluded.byte_count",
            [
                Value_Text(msg.id),
                Value_Text(msg.data_location or ""),
                Value_Text(json.dumps(header, ensure_ascii=False)),
                Value_Int(rows),
                Value_Int(source.consumed),
            ],
        )
        log.write(
            Level.INFO,
            f"{msg.data_location}: {rows} rows x {len(header)} columns "
            f"({', '.join(header)}), {source.consumed} bytes in {source.reads} reads",
        )
        return Outcome_Done()


def setting(key: str, default: str) -> str:
    value = config.get(key)
    return default if value is None else value


def int_setting(key: str, default: int) -> int:
    value = setting(key, str(default))
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise Err(Error_Invalid(f"config `{key}` must be a positive integer, not {value!r}"))
    return number


def upsert(message_id: str, batch) -> None:
    """One multi-row INSERT ... ON CONFLICT for a batch of (row number, JSON)."""
    placeholders = []
    params = []
    for number, record in batch:
        n = len(params)
        placeholders.append(f"(${n + 1}, ${n + 2}, ${n + 3})")
        params += [Value_Text(message_id), Value_Int(number), Value_Text(record)]
    sql.execute(
        "INSERT INTO csv_rows (message_id, row_number, record) VALUES "
        + ", ".join(placeholders)
        + " ON CONFLICT (message_id, row_number) DO UPDATE SET record = excluded.record",
        params,
    )


class ChunkedLines:
    """Iterate over the lines of a `blob` reader, reading `chunk` bytes at a
    time and decoding UTF-8 incrementally: only the current partial line is
    held in memory. Lines keep their `\\n` (the csv module wants them)."""

    def __init__(self, reader, chunk: int):
        self.reader = reader
        self.chunk = chunk
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.consumed = 0
        self.reads = 0

    def __iter__(self):
        pending = ""
        while True:
            data = self.reader.read(self.chunk)
            self.reads += 1
            if not data:
                break
            self.consumed += len(data)
            pending += self.decoder.decode(data)
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line + "\n"
        pending += self.decoder.decode(b"", final=True)
        if pending:
            yield pending
