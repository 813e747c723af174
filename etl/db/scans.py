"""Server-side cursors: long reads that stream in batches on a connection of their own (memory stays flat)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2.extensions


@contextmanager
def named_cursor(conn: psycopg2.extensions.connection, name: str, itersize: int) -> Iterator[psycopg2.extensions.cursor]:
    """A server-side cursor on `conn` fetching `itersize` rows a round trip; closed at the end of the block."""
    with conn.cursor(name=name) as scan:
        scan.itersize = itersize
        yield scan
