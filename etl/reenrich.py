"""Re-score stored posts with the current enricher, without fetching: streamed, batched, changed rows only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import psycopg2.extras

from etl.db import Database
from etl.enrich import SentimentEnricher
from etl.pipeline import RunStats

log = logging.getLogger(__name__)

_UPDATE_SQL = (
    "UPDATE social_posts AS p SET sentiment = v.label, sentiment_polarity = v.polarity,"
    " sentiment_subjectivity = v.subjectivity, sentiment_version = v.version, language = v.language,"
    " language_source = v.language_source, sentiment_skipped = v.skipped, updated_at = now()"
    " FROM (VALUES %s) AS v(id, label, polarity, subjectivity, version, language, language_source, skipped)"
    " WHERE p.id = v.id"
)
_STAMP_SQL = "UPDATE social_posts SET sentiment_version = %s WHERE id = ANY(%s)"
_TEMPLATE = "(%s, %s, %s::float8, %s::float8, %s, %s, %s, %s)"  # typed: a column of NULLs would read as text


def reenrich(
    db: Database,
    enricher: SentimentEnricher,
    stats: RunStats,
    *,
    platform: str | None = None,
    since: datetime | None = None,
    batch_size: int = 5000,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Score every stored post not yet scored by this enricher version; rewrite those whose result changed and
    stamp the others with the version (so that no later reenrich reads them again).

    Rows are read through a server-side cursor on a connection of their own (memory stays flat for millions
    of rows) and the changes are written and committed a batch at a time on the main connection, so an
    interrupted re-enrichment keeps what it did and the next one carries on from there.
    """
    reader = db.connect()
    try:
        with reader.cursor(name="reenrich_scan") as scan:
            scan.itersize = batch_size
            scan.execute(
                "SELECT id, caption, sentiment, sentiment_polarity, sentiment_subjectivity, language, language_source,"
                " sentiment_skipped FROM social_posts"
                " WHERE (%(platform)s::text IS NULL OR platform = %(platform)s)"
                " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
                " AND sentiment_version IS DISTINCT FROM %(version)s ORDER BY id",
                {"platform": platform, "since": since, "version": enricher.version},
            )
            while rows := scan.fetchmany(batch_size):
                changes, same = [], []
                for row_id, caption, label, polarity, subjectivity, language, source, skipped in rows:
                    # The same rule as a run: the platform's language is kept, others are detected again.
                    s, lang, lang_source, why = enricher.decide_caption(caption, language if source == "platform" else None)
                    stats.sentiment[s.label if s else "unscored"] += 1
                    new = (s.label, s.polarity, s.subjectivity) if s else (None, None, None)
                    if (label, polarity, subjectivity, language, source, skipped) != (*new, lang, lang_source, why):
                        changes.append((row_id, *new, enricher.version, lang, lang_source, why))
                    else:
                        same.append(row_id)
                with db.transaction() as cur:
                    if changes:
                        psycopg2.extras.execute_values(
                            cur, _UPDATE_SQL, changes, template=_TEMPLATE, page_size=len(changes)
                        )
                    if same:
                        # Scored by this version too, with the same result: stamped (not read again by the next
                        # reenrich, and its score reused by runs), updated_at left alone (the data did not change).
                        cur.execute(_STAMP_SQL, (enricher.version, same))
                stats.fetched += len(rows)
                stats.updated += len(changes)
                stats.unchanged += len(rows) - len(changes)
                log.info("re-enriched %d posts so far, %d changed", stats.fetched, stats.updated)
                if should_stop():
                    stats.interrupted = True
                    break
    finally:
        reader.close()
