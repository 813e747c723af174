"""Answers from the archive: rising hashtags, where an image was seen again, the report's aggregates, fingerprints.

The figures themselves are SQL functions of sql/006_insights.sql (usable from any BI tool too); these read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg2.extensions

from etl.db import Database

RISING_SQL = "SELECT * FROM hashtag_trends(%s, %s, %s, %s, COALESCE(%s, now())) LIMIT %s"
POST_SQL = "SELECT author_username, created_at FROM social_posts WHERE platform = %s AND post_id = %s"
POST_IMAGES_SQL = "SELECT position, sha256, phash, status FROM post_media WHERE platform = %s AND post_id = %s ORDER BY position"
SIGHTINGS_SQL = "SELECT * FROM image_sightings(%s, %s, %s)"
REPORT_SNAPSHOT_SQL = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
REPORT_TOTALS_SQL = "SELECT * FROM report_totals(%s, %s, %s)"
REPORT_PER_DAY_SQL = "SELECT * FROM report_posts_per_day(%s, %s, %s)"
REPORT_SENTIMENT_SQL = "SELECT * FROM report_sentiment_per_day(%s, %s, %s)"
REPORT_VOICE_SQL = "SELECT * FROM report_share_of_voice(%s, %s, %s)"
REPORT_HASHTAGS_SQL = "SELECT * FROM report_top_hashtags(%s, %s, %s, %s)"
REPORT_TOP_POSTS_SQL = "SELECT * FROM report_top_posts(%s, %s, %s, %s)"
REPORT_IMAGES_SQL = "SELECT * FROM report_image_spread(%s, %s, %s, %s, %s)"
# The posts of the report's scope (created in [since, until), the platform) that gained most since `grown_since`.
REPORT_GROWING_SQL = (
    "SELECT g.* FROM fastest_growing_posts(%(grown_since)s, 2147483647) g JOIN social_posts p USING (platform, post_id)"
    " WHERE g.likes_gained + g.comments_gained > 0 AND (%(platform)s::text IS NULL OR g.platform = %(platform)s)"
    " AND (%(since)s::timestamptz IS NULL OR p.created_at >= %(since)s)"
    " AND (%(until)s::timestamptz IS NULL OR p.created_at < %(until)s)"
    " ORDER BY g.likes_gained + g.comments_gained DESC, g.platform, g.post_id LIMIT %(top)s"
)
REPORT_FAILED_SQL = "SELECT * FROM report_failed_images(%s, %s, %s)"
REPORT_RUNS_SQL = "SELECT * FROM report_runs ORDER BY id DESC LIMIT %s"
UNHASHED_SQL = (
    "SELECT id, storage_key, sha256 FROM post_media WHERE status = 'stored' AND phash IS NULL"
    " AND storage_key IS NOT NULL AND id > %s ORDER BY id LIMIT %s"
)
# Only a row still holding the object that was hashed (the same sha256: not repaired meanwhile) takes its hash.
SAVE_HASHES_SQL = (
    "UPDATE post_media m SET phash = v.phash, phash_algorithm = %s, phash_version = %s"
    " FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS v(id, phash, sha256)"
    " WHERE m.id = v.id AND m.phash IS NULL AND m.sha256 IS NOT DISTINCT FROM v.sha256"
)


def _rows(cur: psycopg2.extensions.cursor) -> list[dict[str, Any]]:
    """The rows of the statement just executed, as dicts by column name."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def rising_hashtags(
    cur: psycopg2.extensions.cursor, window: timedelta, baseline: timedelta, platform: str | None, min_count: int,
    as_of: datetime | None = None, limit: int = 25,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of sql/006 hashtag_trends, best first."""
    cur.execute(RISING_SQL, (window, baseline, platform, min_count, as_of, limit))
    return _rows(cur)


def post_images_with_sightings(db: Database, platform: str, post_id: str, max_distance: int) -> dict[str, Any] | None:
    """The post's author and time and its images, each with its sightings (sql/006 image_sightings, in the
    function's order); None when the archive does not hold the post."""

    def read(cur: psycopg2.extensions.cursor) -> dict[str, Any] | None:
        cur.execute(POST_SQL, (platform, post_id))
        post = cur.fetchone()
        if post is None:
            return None
        cur.execute(POST_IMAGES_SQL, (platform, post_id))
        images = [
            {"position": r[0], "sha256": r[1], "fingerprinted": r[2] is not None, "status": r[3], "sightings": []}
            for r in cur.fetchall()
        ]
        cur.execute(SIGHTINGS_SQL, (platform, post_id, max_distance))
        by_position = {image["position"]: image for image in images}
        for sighting in _rows(cur):
            by_position[sighting.pop("image_position")]["sightings"].append(sighting)
        return {"author_username": post[0], "created_at": post[1], "images": images}

    return db.run(read, what="looking up similar images")


def report_aggregates(
    db: Database, since: datetime | None, until: datetime | None, platform: str | None, *,
    now: datetime, period_end: Callable[[dict[str, Any]], datetime], max_distance: int, min_count: int, top: int, runs: int,
) -> dict[str, Any]:  # fmt: skip
    """Every aggregate of the report, read in one transaction (one consistent snapshot). Rising hashtags are
    ranked as of `period_end(totals)`; engagement growth over the 7 days before `now`."""
    a: Sequence[Any] = (since, until, platform)

    def read(cur: psycopg2.extensions.cursor) -> dict[str, Any]:
        cur.execute(REPORT_SNAPSHOT_SQL)
        cur.execute(REPORT_TOTALS_SQL, a)
        totals = _rows(cur)[0]
        as_of = period_end(totals)
        data: dict[str, Any] = {"as_of": as_of, "totals": totals}
        cur.execute(REPORT_PER_DAY_SQL, a)
        data["per_day"] = _rows(cur)
        cur.execute(REPORT_SENTIMENT_SQL, a)
        data["sentiment"] = _rows(cur)
        cur.execute(REPORT_VOICE_SQL, a)
        data["voice"] = _rows(cur)
        cur.execute(REPORT_HASHTAGS_SQL, (*a, top))
        data["hashtags"] = _rows(cur)
        data["rising"] = rising_hashtags(cur, timedelta(hours=24), timedelta(days=28), platform, min_count, as_of, top)
        cur.execute(REPORT_TOP_POSTS_SQL, (*a, top))
        data["top_posts"] = _rows(cur)
        cur.execute(REPORT_IMAGES_SQL, (*a, top, max_distance))
        data["images"] = _rows(cur)
        # Engagement grown over the last 7 days of snapshots (observed by the runs, sql/008), by the posts in scope.
        growing = {"grown_since": now - timedelta(days=7), "platform": platform, "since": since, "until": until, "top": top}
        cur.execute(REPORT_GROWING_SQL, growing)
        data["growing"] = _rows(cur)
        cur.execute(REPORT_FAILED_SQL, a)
        data["failed"] = _rows(cur)
        cur.execute(REPORT_RUNS_SQL, (runs,))
        data["runs"] = _rows(cur)
        return data

    return db.run(read, what="reading the report's aggregates")


def images_without_fingerprint(db: Database, after: int, limit: int) -> list[tuple[int, str, str | None]]:
    """Up to `limit` stored images without a perceptual hash, (id, storage_key, sha256), ids above `after` in order."""

    def read(cur: psycopg2.extensions.cursor) -> list[tuple[int, str, str | None]]:
        cur.execute(UNHASHED_SQL, (after, limit))
        return cur.fetchall()

    return db.run(read, what="finding images without a fingerprint")


def save_fingerprints(
    db: Database, ids: list[int], hashes: list[int], checksums: list[str | None], algorithm: str, version: int
) -> None:
    """Record each image's hash (signed 64-bit) with its algorithm, where the row still has the sha256 of the bytes
    hashed; an image hashed meanwhile keeps its own, and one stored again meanwhile is hashed by the next pass."""
    values = (algorithm, version, ids, hashes, checksums)
    db.run(lambda cur: cur.execute(SAVE_HASHES_SQL, values), what="saving fingerprints")
