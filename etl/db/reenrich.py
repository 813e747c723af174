"""What `reenrich` reads and writes: the scan of posts not scored by this enricher, and their new scores (a batch
written by one COPY and one UPDATE ... FROM, whatever its size)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import psycopg2.extensions

from etl.db.scans import named_cursor

UNSCORED_SQL = (
    "SELECT id, caption, sentiment, sentiment_polarity, sentiment_subjectivity, language, language_source,"
    " sentiment_skipped, sentiment_version, xmin FROM social_posts"
    " WHERE (%(platform)s::text IS NULL OR platform = %(platform)s)"
    " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
    " AND sentiment_version IS DISTINCT FROM %(version)s ORDER BY id"
)
@contextmanager
def unscored_posts(
    reader: psycopg2.extensions.connection, platform: str | None, since: datetime | None, version: str, batch_size: int
) -> Iterator[psycopg2.extensions.cursor]:
    """A server-side cursor on `reader` over the posts not scored by enricher `version`, in id order: (id, caption,
    sentiment, polarity, subjectivity, language, language_source, sentiment_skipped, sentiment_version, seen: the
    row version's xmin, for write_decisions to find the rows a run changed since)."""
    with named_cursor(reader, "reenrich_scan", batch_size) as scan:
        scan.execute(UNSCORED_SQL, {"platform": platform, "since": since, "version": version})
        yield scan


# One row per post scored: its new decision, and whether it differs from the stored one. Rows that did not change
# get only the version stamp, their updated_at left alone (the data did not change).
# A batch's commit does not wait for its flush to disk: a batch lost in a crash of the machine keeps its old version
# stamp, so the next reenrich reads and writes it again; the run's own record (etl_runs), committed after them,
# waits for the flush of everything before it.
_PREPARE_DECISIONS = (
    "SET LOCAL synchronous_commit = off;"
    " CREATE TEMP TABLE IF NOT EXISTS reenrich_decisions (id BIGINT, changed BOOLEAN, label TEXT,"
    " polarity DOUBLE PRECISION, subjectivity DOUBLE PRECISION, language TEXT, language_source TEXT, skipped TEXT,"
    " seen XID)"
    " ON COMMIT DELETE ROWS; DELETE FROM reenrich_decisions"
)
_COPY_DECISIONS = (
    "COPY reenrich_decisions (id, changed, label, polarity, subjectivity, language, language_source, skipped, seen)"
    " FROM STDIN"
)
_APPLY_DECISIONS = (
    "WITH applied AS (UPDATE social_posts AS p SET sentiment_version = %(version)s,"
    " sentiment = CASE WHEN v.changed THEN v.label ELSE p.sentiment END,"
    " sentiment_polarity = CASE WHEN v.changed THEN v.polarity ELSE p.sentiment_polarity END,"
    " sentiment_subjectivity = CASE WHEN v.changed THEN v.subjectivity ELSE p.sentiment_subjectivity END,"
    " language = CASE WHEN v.changed THEN v.language ELSE p.language END,"
    " language_source = CASE WHEN v.changed THEN v.language_source ELSE p.language_source END,"
    " sentiment_skipped = CASE WHEN v.changed THEN v.skipped ELSE p.sentiment_skipped END,"
    " updated_at = CASE WHEN v.changed THEN now() ELSE p.updated_at END"
    " FROM reenrich_decisions AS v WHERE p.id = v.id AND p.id BETWEEN %(first)s AND %(last)s"
    # A run that changed the post since the scan read it scored its new caption: the decision, made from the caption
    # (and platform language) the scan read, is not for that row any more, whatever version the run stamped (a run
    # configured with another threshold stamps another). The row version the scan read is known by its xmin (the
    # transaction that wrote it): any other is left as it is (a change of counts alone too, which costs the row a
    # read by the next reenrich if its version is not this one). An md5 of the caption and language cost 17% of the
    # rate of a re-score of 200,000 posts; this comparison costs nothing measurable.
    " AND p.sentiment_version IS DISTINCT FROM %(version)s AND p.xmin = v.seen"
    # What was applied, counted (a decision the guards dropped is neither changed nor unchanged: not written).
    " RETURNING v.changed, v.label) SELECT changed, label, count(*) FROM applied GROUP BY changed, label"
)


def write_decisions(
    cur: psycopg2.extensions.cursor, parts: Sequence[str], version: str, ids: Sequence[int]
) -> list[tuple[bool, str | None, int]]:
    """Apply a batch of re-enrichment decisions (etl/rescore.py decision_lines() texts) for the posts `ids` and
    stamp every row with `version`: three statements, whatever the batch size. Returns what was applied: (changed,
    label, how many rows); rows a run changed since the scan are not written, and not in it.

    The UPDATE reads social_posts only between the batch's first and last id (a batch is a run of the scan's id
    order): the planner knows nothing of the temporary table's rows, and without the range it hashed the whole
    table for each batch on an archive whose pages are dense."""
    if not any(parts):
        return []
    cur.execute(_PREPARE_DECISIONS)
    cur.copy_expert(_COPY_DECISIONS, io.StringIO("".join(parts)))
    cur.execute(_APPLY_DECISIONS, {"version": version, "first": min(ids), "last": max(ids)})
    return cur.fetchall()
