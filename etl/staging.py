"""COPY into a per-connection temporary staging table: rows in PostgreSQL's text COPY format, one round trip."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import psycopg2.extensions

# COPY's text format: a backslash, tab, newline and carriage return inside a value are escaped; \N is NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_SPECIAL = ("\\", "\t", "\n", "\r")


def _text(value: str) -> str:
    # Most values hold none of the four characters: checking first is cheaper than translating every one.
    for ch in _SPECIAL:
        if ch in value:
            return value.translate(_COPY_ESCAPES)
    return value


def _array_item(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def copy_value(value: Any) -> str:
    """One value in COPY's text format. Lists become text[] literals, dicts JSON, None \\N."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return _text("{" + ",".join("NULL" if v is None else _array_item(str(v)) for v in value) + "}")
    if isinstance(value, dict):
        return _text(json.dumps(value, ensure_ascii=False, default=str))
    return _text(str(value))


def stage_sql(table: str, like: str, columns: Sequence[str]) -> tuple[str, str]:
    """The two statements that stage rows for a temporary table `table` typed as `like`'s `columns`, built once at
    import into module constants: (create it if need be and empty it, COPY into it).

    The table lives as long as the connection and is emptied at each commit (and by a rollback, which
    takes back the COPY), so it holds exactly this transaction's rows; it is created on first use and
    again after a reconnect."""
    cols = ", ".join(columns)
    prepare = (
        f"CREATE TEMP TABLE IF NOT EXISTS {table} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {like} WITH NO DATA;"
        f" DELETE FROM {table}"
    )
    return prepare, f"COPY {table} ({cols}) FROM STDIN"


def copy_rows(cur: psycopg2.extensions.cursor, copy: str, rows: Iterable[Sequence[Any]]) -> None:
    """Send `rows` by one COPY (`copy`, the second statement of stage_sql(), run after the first)."""
    buf = io.StringIO()
    buf.writelines("\t".join([copy_value(v) for v in row]) + "\n" for row in rows)
    buf.seek(0)
    cur.copy_expert(copy, buf)
