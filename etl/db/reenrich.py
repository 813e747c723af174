"""What `reenrich` reads and writes: the scan of posts not scored by this enricher, and their new scores."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg2.extensions
import psycopg2.extras

from etl.db import Database
from etl.db.scans import named_cursor

UNSCORED_SQL = (
    "SELECT id, caption, sentiment, sentiment_polarity, sentiment_subjectivity, language, language_source,"
    " sentiment_skipped FROM social_posts"
    " WHERE (%(platform)s::text IS NULL OR platform = %(platform)s)"
    " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
    " AND sentiment_version IS DISTINCT FROM %(version)s ORDER BY id"
)
RESCORE_SQL = (
    "UPDATE social_posts AS p SET sentiment = v.label, sentiment_polarity = v.polarity,"
    " sentiment_subjectivity = v.subjectivity, sentiment_version = v.version, language = v.language,"
    " language_source = v.language_source, sentiment_skipped = v.skipped, updated_at = now()"
    " FROM (VALUES %s) AS v(id, label, polarity, subjectivity, version, language, language_source, skipped)"
    " WHERE p.id = v.id"
)
STAMP_SQL = "UPDATE social_posts SET sentiment_version = %s WHERE id = ANY(%s)"
_RESCORE_TEMPLATE = "(%s, %s, %s::float8, %s::float8, %s, %s, %s, %s)"  # typed: a column of NULLs would read as text


@contextmanager
def unscored_posts(
    reader: psycopg2.extensions.connection, platform: str | None, since: datetime | None, version: str, batch_size: int
) -> Iterator[psycopg2.extensions.cursor]:
    """A server-side cursor on `reader` over the posts not scored by enricher `version`, in id order: (id, caption,
    sentiment, polarity, subjectivity, language, language_source, sentiment_skipped)."""
    with named_cursor(reader, "reenrich_scan", batch_size) as scan:
        scan.execute(UNSCORED_SQL, {"platform": platform, "since": since, "version": version})
        yield scan


def save_rescored(db: Database, changes: Sequence[tuple[Any, ...]], same: Sequence[int], version: str) -> None:
    """In one transaction: the new scores of `changes` (id, label, polarity, subjectivity, version, language,
    language_source, skipped), and the version stamped on the posts in `same` (scored alike)."""
    with db.transaction() as cur:
        if changes:
            psycopg2.extras.execute_values(cur, RESCORE_SQL, changes, template=_RESCORE_TEMPLATE, page_size=len(changes))
        if same:
            # Scored by this version too, with the same result: stamped (not read again by the next
            # reenrich, and its score reused by runs), updated_at left alone (the data did not change).
            cur.execute(STAMP_SQL, (version, list(same)))
