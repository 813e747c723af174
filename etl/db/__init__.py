"""PostgreSQL, the one home of the archiver's SQL (tests/test_layout.py keeps it so). Which file holds what:

- connection.py  `Database`: the connection (embedded or DATABASE_URL), `transaction()`, `run()` with reconnects,
                 SQLSTATE classes (`DataRefused`, `connection_lost`), `migrate()` (sql/NNN_name.sql in order)
- ledger.py      `Ledger(db)`: etl_runs (start, finish, `recording` around a block, abandon, orchestrator
                 totals), advisory locks per unit (a stream, or a stream-less source), etl_backfill_chunks
- state.py       `StreamState(db)`: etl_state per stream: watermark and cursor (adopting a source's state of
                 before state was kept per stream), the resume point a cut run left
- archive.py     the loader, each function taking the transaction's cursor: COPY staging, upserts of posts and
                 images, stored images and scores, tombstones, engagement snapshots, the failed-image queue;
                 `Archive(db)`, the archiver's view of them
- platform.py    platform state handed to a source at construction (Instagram's hashtag searches, YouTube's quota)
- scans.py       server-side cursors for long reads in flat memory
- the commands'  status.py (status, check), insights.py (trends, similar, report, fingerprint), fixity.py
  reads/writes   (verify, copy-store), deletions.py (forget, deletions at source, re-check), export.py (the
                 Parquet datasets and export_partitions), reenrich.py (the scan and the new scores)

The names below are the ones callers take from `etl.db`; the rest are imported from their module.
"""

from etl.db.archive import (
    Archive,
    Held,
    HeldRow,
    UpsertCounts,
    held,
    known_media,
    upsert_media,
    upsert_posts,
)
from etl.db.connection import Database, DataRefused, migration_files
from etl.db.ledger import Ledger
from etl.db.state import StreamState

__all__ = [
    "Archive", "DataRefused", "Database", "Held", "HeldRow", "Ledger", "StreamState", "UpsertCounts", "held", "known_media",
    "migration_files", "upsert_media", "upsert_posts",
]  # fmt: skip
