"""PostgreSQL, the one home of the archiver's SQL. Which file holds what:

- connection.py  `Database`: the connection (embedded or DATABASE_URL), `transaction()`, `run()` with reconnects,
                 SQLSTATE classes (`DataRefused`, `connection_lost`), `migrate()` (sql/NNN_name.sql in order)
- ledger.py      `Ledger(db)`: etl_runs (start, finish, abandon, orchestrator totals), advisory locks per unit
                 (a stream, or a stream-less source), etl_backfill_chunks
- state.py       `StreamState(db)`: etl_state per stream: watermark and cursor (adopting a source's state of
                 before state was kept per stream), the resume point a cut run left
- archive.py     the loader, each function taking the transaction's cursor: COPY staging, upserts of posts and
                 images, stored images and scores, tombstones, engagement snapshots, the failed-image queue

`from etl.db import Database` (and the names below) keeps working for every caller.
"""

from etl.db.archive import (
    UPSERT_MEDIA_SQL,
    UPSERT_POSTS_SQL,
    Archive,
    Held,
    UpsertCounts,
    copy_rows,
    copy_value,
    failed_images,
    held,
    known_media,
    record_retries,
    set_first_image_urls,
    stage_sql,
    upsert_media,
    upsert_posts,
)
from etl.db.connection import (
    _MIGRATION_RE,
    SQL_DIR,
    Database,
    DataRefused,
    adapt_json,
    connection_lost,
    refused_data,
    server_reason,
)
from etl.db.ledger import FINISH_RUN_SQL, Ledger
from etl.db.state import StreamState

__all__ = [
    "FINISH_RUN_SQL", "SQL_DIR", "Archive", "Held", "UPSERT_MEDIA_SQL", "UPSERT_POSTS_SQL", "_MIGRATION_RE", "DataRefused", "Database",
    "Ledger", "StreamState", "UpsertCounts", "adapt_json", "connection_lost", "copy_rows", "copy_value",
    "failed_images", "held", "known_media", "record_retries", "refused_data",
    "server_reason", "set_first_image_urls", "stage_sql", "upsert_media", "upsert_posts",
]  # fmt: skip
