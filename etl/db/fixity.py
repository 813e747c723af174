"""Where the stored images are and whether they are intact: what `verify` and `copy-store` read and record."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg2.extensions
import psycopg2.extras

from etl.db import Database
from etl.db.scans import named_cursor

# -- verify ------------------------------------------------------------------------------------------------

LAST_VERIFY_SQL = (
    "SELECT status, started_at FROM etl_runs WHERE mode = 'verify' AND arguments @> %s AND status <> 'running'"
    " ORDER BY id DESC LIMIT 1"
)
_SCOPE_SQL = (
    " FROM post_media m JOIN social_posts p USING (platform, post_id)"
    " WHERE m.status = 'stored' AND m.storage_key IS NOT NULL"
    " AND (%(platform)s::text IS NULL OR m.platform = %(platform)s)"
    " AND (%(since)s::timestamptz IS NULL OR p.created_at >= %(since)s)"
)
COUNT_SQL = "SELECT count(*)" + _SCOPE_SQL
SCAN_SQL = (
    "SELECT m.id, m.storage_key, m.sha256, m.bytes, m.platform, m.post_id, m.position"
    + _SCOPE_SQL
    + " AND (%(resume)s::timestamptz IS NULL OR m.verified_at IS NULL OR m.verified_at < %(resume)s)"
    " ORDER BY m.verified_at NULLS FIRST, m.id"
)
SCAN_SAMPLE_SQL = SCAN_SQL + " LIMIT %(limit)s"
# A result is for the row as the scan read it: a row a run stored again meanwhile (a repair: another object, another
# sha256), or whose post was forgotten (tombstone first, then its objects deleted: "missing"), is not judged by it.
# Each statement returns the rows it judged: Database.run may run the transaction again after a lost COMMIT reply,
# so a row this verify marked failed already (status failed, fixity set, the same key and sha256) is one it judged.
_AS_READ = (
    " WHERE m.id = v.id AND m.storage_key = v.key AND m.sha256 IS NOT DISTINCT FROM v.sha256"
    " AND NOT EXISTS (SELECT 1 FROM forgotten_posts f WHERE f.platform = m.platform AND f.post_id = m.post_id)"
)
FIXITY_OK_SQL = (
    "UPDATE post_media m SET fixity = 'ok', verified_at = now() FROM (VALUES %s) AS v(id, key, sha256)"
    + _AS_READ + " AND m.status = 'stored' RETURNING m.id"
)
# Failed, with its attempts reset: the next run refetches it from its source URL and overwrites the object
# (Archiver.retry_failed_images, etl/run/archiver.py); a 404 there marks it failed for good.
FIXITY_BAD_SQL = (
    "UPDATE post_media m SET status = 'failed', fixity = v.fixity, verified_at = now(), attempts = 0,"
    " permanent = false, last_error = v.error, updated_at = now()"
    " FROM (VALUES %s) AS v(id, key, sha256, fixity, error)"
    + _AS_READ + " AND (m.status = 'stored' OR m.status = 'failed' AND m.fixity = v.fixity) RETURNING m.id"
)
KNOWN_KEYS_SQL = "SELECT storage_key FROM post_media WHERE storage_key = ANY(%s)"


def last_finished_verify(db: Database, scope: dict[str, Any]) -> tuple[str, datetime] | None:
    """(status, started_at) of the last verify of this scope that is not running, or None."""

    def read(cur: psycopg2.extensions.cursor) -> Any:
        cur.execute(LAST_VERIFY_SQL, (psycopg2.extras.Json({"scope": scope}),))
        return cur.fetchone()

    return db.run(read, what="reading the last verify")


def stored_images_in_scope(db: Database, params: dict[str, Any]) -> int:
    """How many stored images a verify of this scope (platform, since) covers."""

    def count(cur: psycopg2.extensions.cursor) -> int:
        cur.execute(COUNT_SQL, params)
        return cur.fetchone()[0]

    return db.run(count, what="counting stored images")


@contextmanager
def images_to_verify(
    reader: psycopg2.extensions.connection, params: dict[str, Any], limit: int | None, batch: int
) -> Iterator[psycopg2.extensions.cursor]:
    """A server-side cursor on `reader` over the stored images in scope (platform, since; those verified since
    `resume` skipped), least recently verified first, at most `limit`: (id, storage_key, sha256, bytes,
    platform, post_id, position)."""
    with named_cursor(reader, "verify_scan", batch) as scan:
        if limit is None:
            scan.execute(SCAN_SQL, params)
        else:
            scan.execute(SCAN_SAMPLE_SQL, {**params, "limit": limit})
        yield scan


def record_fixity(
    db: Database, ok: Sequence[tuple[int, str, str]], bad: Sequence[tuple[int, str, str, str, str]]
) -> set[int]:
    """Images found intact (id, key, sha256) and damaged or missing (id, key, sha256, fixity, error), the latter
    failed to be refetched; each only where its row is still as the scan read it. Returns the ids judged."""

    def write(cur: psycopg2.extensions.cursor) -> set[int]:
        judged: set[int] = set()
        if ok:
            judged.update(r[0] for r in psycopg2.extras.execute_values(cur, FIXITY_OK_SQL, ok, fetch=True, page_size=len(ok)))
        if bad:
            judged.update(r[0] for r in psycopg2.extras.execute_values(cur, FIXITY_BAD_SQL, bad, fetch=True, page_size=len(bad)))
        return judged

    return db.run(write, what="recording fixity results")


def recorded_keys(db: Database, keys: list[str]) -> set[str]:
    """Which of these object keys a post_media row knows."""

    def known(cur: psycopg2.extensions.cursor) -> set[str]:
        cur.execute(KNOWN_KEYS_SQL, (keys,))
        return {row[0] for row in cur.fetchall()}

    return db.run(known, what="looking up listed objects")


# -- copy-store --------------------------------------------------------------------------------------------

# The lowest store name and the highest (NULL first) of the stored images: two probes of
# post_media_store_idx, whatever the table's size. When both are the target, every image is in place.
STORE_BOUNDS_SQL = (
    "SELECT (SELECT media_store(storage_url) FROM post_media WHERE status = 'stored'"
    " ORDER BY media_store(storage_url) LIMIT 1),"
    " (SELECT media_store(storage_url) FROM post_media WHERE status = 'stored'"
    " ORDER BY media_store(storage_url) DESC NULLS FIRST LIMIT 1)"
)
# Stored images outside `target`, counted per store (only when the bounds say there are some).
ELSEWHERE_SQL = (
    "SELECT media_store(storage_url), count(*) FROM post_media"
    " WHERE status = 'stored' AND media_store(storage_url) IS DISTINCT FROM %s GROUP BY 1 ORDER BY 2 DESC, 1"
)
TO_COPY_SQL = (
    "SELECT m.id, m.platform, m.post_id, m.position, m.storage_key, m.storage_url, m.sha256, m.bytes,"
    " m.content_type, p.created_at, media_store(m.storage_url) FROM post_media m"
    " JOIN social_posts p USING (platform, post_id)"
    " WHERE m.status = 'stored' AND m.id > %s AND media_store(m.storage_url) IS DISTINCT FROM %s"
    " ORDER BY m.id LIMIT %s"
)
MOVED_MEDIA_SQL = (
    "UPDATE post_media m SET storage_key = v.key, storage_url = v.url, updated_at = now()"
    " FROM (VALUES %s) AS v(id, old_url, key, url)"
    " WHERE m.id = v.id AND m.storage_url = v.old_url AND m.status = 'stored'"
)
MOVED_FIRST_IMAGES_SQL = (
    "UPDATE social_posts p SET image_s3_url = v.url, updated_at = now()"
    " FROM (VALUES %s) AS v(platform, post_id, old_url, url)"
    " WHERE p.platform = v.platform AND p.post_id = v.post_id AND p.image_s3_url = v.old_url"
)


def images_elsewhere(db: Database, target: str) -> dict[str | None, int]:
    """Stored images that live outside `target`, counted per store."""

    def count(cur: psycopg2.extensions.cursor) -> dict[str | None, int]:
        cur.execute(STORE_BOUNDS_SQL)
        if cur.fetchone() == (target, target):
            return {}
        cur.execute(ELSEWHERE_SQL, (target,))
        return {name: n for name, n in cur.fetchall()}

    # Reads only: each statement on its own (a run asks this before any work; in place, that is one round trip).
    return db.alone(count, what="counting images in other object stores")


def images_to_copy(db: Database, target: str, after: int, limit: int) -> list[tuple]:
    """Up to `limit` stored images outside `target`, ids above `after` in order: (id, platform, post_id,
    position, storage_key, storage_url, sha256, bytes, content_type, the post's created_at, store)."""

    def read(cur: psycopg2.extensions.cursor) -> list[tuple]:
        cur.execute(TO_COPY_SQL, (after, target, limit))
        return cur.fetchall()

    return db.run(read, what="reading images to copy")


def record_copies(
    db: Database, moved: Sequence[tuple[int, str, str, str]], firsts: Sequence[tuple[str, str, str, str]]
) -> None:
    """Point the rows at their verified copies: `moved` (id, old_url, key, url), and the posts whose first image
    moved, `firsts` (platform, post_id, old_url, url). A row changed meanwhile (compared on the old URL) is
    left alone."""

    def write(cur: psycopg2.extensions.cursor) -> None:
        psycopg2.extras.execute_values(cur, MOVED_MEDIA_SQL, moved)
        if firsts:
            psycopg2.extras.execute_values(cur, MOVED_FIRST_IMAGES_SQL, firsts)

    db.run(write, what=f"recording {len(moved)} copied images")
