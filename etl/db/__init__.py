"""PostgreSQL, the one home of the archiver's SQL (tests/test_layout.py keeps it so). Which file holds what:

- connection.py  `Database`: the connection (embedded or DATABASE_URL), `transaction()`, `run()` with reconnects,
                 SQLSTATE classes (`DataRefused`, `connection_lost`), `migrate()` (sql/NNN_name.sql in order)
- ledger.py      `Ledger(db)`: etl_runs (start, finish, `recording` around a block, abandon, orchestrator
                 totals), advisory locks per unit (a stream, or a stream-less source), etl_backfill_chunks
- state.py       `StreamState(db)`: etl_state per stream: watermark and cursor (adopting a source's state of
                 before state was kept per stream), the resume point a cut run left
- archive.py     the loader, each function taking the transaction's cursor: COPY staging, upserts of posts and
                 images, stored images and scores, tombstones, the engagement history, the failed-image queue;
                 `Archive(db)`, the archiver's view of them
- platform.py    platform state handed to a source at construction (Instagram's hashtag searches, YouTube's quota)
- scans.py       server-side cursors for long reads in flat memory
- the commands'  status.py (status, check), insights.py (trends, similar, report, fingerprint), fixity.py
  reads/writes   (verify, copy-store), deletions.py (forget, deletions at source, re-check), export.py (the
                 Parquet datasets and export_partitions), reenrich.py (the scan and the new scores)

The names below are the ones callers take from `etl.db`; the rest are imported from their module.
"""

import sys
import threading


def _import_psycopg2() -> None:
    """Import psycopg2 without Python's ssl module when nothing has imported ssl yet (issue 16: a quarter of a
    rerun's start-up).

    psycopg2 imports `ssl` only so that Python, not libpq, sets up libcrypto's thread callbacks (OpenSSL before
    1.1). psycopg2-binary's libpq carries its own OpenSSL 3, which sets itself up, so the import changes nothing
    there and costs 15-30 ms (Python's _ssl loads and initializes a second OpenSSL). Connections, with or
    without SSL, are libpq's either way; `ssl` is imported as usual by whatever needs it later (HTTPS).
    Only while a single thread runs: another thread could be importing ssl at this moment.
    """
    if "psycopg2" in sys.modules or "ssl" in sys.modules or threading.active_count() > 1:
        import psycopg2  # noqa: F401
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError: psycopg2 goes on without
    try:
        import psycopg2  # noqa: F401
    finally:
        del sys.modules["ssl"]


_import_psycopg2()

from etl.db.archive import (  # noqa: E402
    Archive,
    Held,
    HeldRow,
    UpsertCounts,
    held,
    known_media,
    upsert_media,
    upsert_posts,
)
from etl.db.connection import Database, DataRefused, migration_files  # noqa: E402
from etl.db.ledger import Ledger  # noqa: E402
from etl.db.state import StreamState  # noqa: E402

__all__ = [
    "Archive", "DataRefused", "Database", "Held", "HeldRow", "Ledger", "StreamState", "UpsertCounts", "held", "known_media",
    "migration_files", "upsert_media", "upsert_posts",
]  # fmt: skip
