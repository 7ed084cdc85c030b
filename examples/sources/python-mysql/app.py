"""python-mysql: a Sandpipe *source* in Python (componentize-py).

The same source as connectors/mysql-source (Rust), written in Python to
show that a source, like a plugin, can be written in any language that
builds a component of the `source` world: every row of the configured
MySQL/MariaDB tables becomes a document whose id is `{table}_{id}` and
whose body is the row as a JSON object (with `_table`), paged by keyset
(`WHERE id > ? ORDER BY id LIMIT size`), table after table.

The database is the grant's `sql: { database: NAME }`, an external
database the engine opens read-only; the component never sees its URL or
password.

Config: `tables` (a list of table names, required), `id_column` (`id`),
`updated_column` (optional: the document's timestamp, so unchanged rows
are skipped without comparing bodies).

Build: `just py-source` (examples/plugins/componentize-py.sh with the
`source` world).
"""

import datetime
import json
import re

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, sql
from wit_world.imports.source_types import Document, Operation, Page, SourceDescription
from wit_world.imports.sql import (
    Value_Boolean,
    Value_Bytes,
    Value_Float,
    Value_Int,
    Value_Json,
    Value_Null,
    Value_Text,
    Value_Timestamp,
)
from wit_world.imports.types import Error_Invalid

VERSION = "0.1.0"
PLAIN = re.compile(r"^[A-Za-z0-9_]+$")


def settings():
    raw = config.get("tables")
    if raw is None:
        raise Err(Error_Invalid("config `tables` is required: a list of table names"))
    try:
        tables = json.loads(raw)
    except ValueError:
        raise Err(Error_Invalid(f"config `tables` must be a list of names, not {raw}"))
    id_column = config.get("id_column") or "id"
    updated = config.get("updated_column")
    for name in [*tables, id_column, *([updated] if updated else [])]:
        if not isinstance(name, str) or not PLAIN.match(name):
            raise Err(Error_Invalid(f"`{name}` is not a plain table or column name"))
    if not tables:
        raise Err(Error_Invalid("config `tables` names no table"))
    return tables, id_column, updated


def iso(micros: int) -> str:
    at = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
        microseconds=micros
    )
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value):
    """A cell as JSON, as the Rust source maps it."""
    if isinstance(value, Value_Null):
        return None
    if isinstance(value, (Value_Boolean, Value_Int, Value_Float, Value_Text)):
        return value.value
    if isinstance(value, Value_Json):
        return json.loads(value.value)
    if isinstance(value, Value_Bytes):
        return bytes(value.value).hex()
    if isinstance(value, Value_Timestamp):
        return iso(value.value)
    return None


class WitWorld(wit_world.WitWorld):
    def describe(self) -> SourceDescription:
        return SourceDescription(
            name="python-mysql",
            version=VERSION,
            config_schema=json.dumps(
                {
                    "type": "object",
                    "required": ["tables"],
                    "properties": {
                        "tables": {"type": "array", "items": {"type": "string"}},
                        "id_column": {"type": "string"},
                        "updated_column": {"type": "string"},
                    },
                }
            ),
            incremental=False,
            advanced_rules=False,
        )

    def validate_config(self) -> None:
        settings()

    def ping(self) -> None:
        sql.query("SELECT 1", [])

    def changed(self, sync_cursor) -> bool:
        return True

    def get_docs(self, request) -> Page:
        tables, id_column, updated = settings()
        cursor = json.loads(request.cursor) if request.cursor else {"t": 0}
        t = cursor.get("t", 0)
        if t >= len(tables):
            return Page(docs=[], next=None, sync_cursor=None)
        table = tables[t]
        after = cursor.get("after")
        if after is None:
            where, params = "", []
        else:
            where = f"WHERE `{id_column}` > ?"
            params = [Value_Int(after) if isinstance(after, int) else Value_Text(after)]
        rows = sql.query(
            f"SELECT * FROM `{table}` {where} ORDER BY `{id_column}` LIMIT {request.size}",
            params,
        )
        docs = []
        last = None
        for values in rows.values:
            row = {"_table": table}
            for column, value in zip(rows.columns, values):
                row[column] = to_json(value)
            key = row.get(id_column)
            if not isinstance(key, (int, str)):
                raise Err(Error_Invalid(f"table `{table}`: `{id_column}` is not a number or text"))
            stamp = row.get(updated) if updated else None
            docs.append(
                Document(
                    id=f"{table}_{key}",
                    timestamp=None if stamp is None else str(stamp),
                    body=json.dumps(row, separators=(",", ":")),
                    op=Operation.INDEX,
                )
            )
            last = key
        if len(docs) == request.size:
            following = {"t": t, "after": last}
        elif t + 1 < len(tables):
            following = {"t": t + 1}
        else:
            following = None
        return Page(
            docs=docs,
            next=json.dumps(following) if following else None,
            sync_cursor=None,
        )

    def validate_advanced_rules(self, rules: str):
        return []
