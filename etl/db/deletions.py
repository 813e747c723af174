"""Posts that go away: tombstones and `forget`, posts marked deleted at source, and the re-check of held posts.

Export hook: an export must skip tombstoned posts; rows already exported are those of forgotten_posts with a
forgotten_at after the last export (their partitions are to be rewritten).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg2.extensions
import psycopg2.extras

from etl.db import Database
from etl.db.archive import TOMBSTONE_LOCK_SQL

POST_SQL = "SELECT platform, post_id, created_at FROM social_posts WHERE platform = %s AND post_id = %s"
AUTHOR_POSTS_SQL = (
    "SELECT platform, post_id, created_at FROM social_posts WHERE platform = %s AND author_username = %s"
    " ORDER BY created_at, post_id"
)
# The loads' lock exclusive first (etl/db/archive.py, LOADS_LOCK): the tombstone waits for the loads under way, and
# every load after it drops the post. Its time is taken once the wait is over (_TOMBSTONE_ROW), not as the transaction
# began: an export that started meanwhile (and saw the post) is older than it, so the next export rewrites that
# partition (etl/db/export.py: tombstones after the last export).
TOMBSTONE_SQL = (
    TOMBSTONE_LOCK_SQL + "; INSERT INTO forgotten_posts (platform, post_id, reason, forgotten_at) VALUES %s"
    " ON CONFLICT (platform, post_id) DO UPDATE SET reason = COALESCE(EXCLUDED.reason, forgotten_posts.reason)"
)
_TOMBSTONE_ROW = "(%s, %s, %s, clock_timestamp())"
STORED_KEYS_SQL = (
    "SELECT m.storage_key FROM post_media m JOIN unnest(%s::text[], %s::text[]) AS k(platform, post_id)"
    " USING (platform, post_id) WHERE m.storage_key IS NOT NULL"
)
# sql/008's forget_post_rows: every table with platform and post_id columns, social_posts last.
DELETE_ROWS_SQL = "SELECT table_name, deleted FROM forget_post_rows(%s::text[], %s::text[])"
MARK_DELETED_SQL = (
    "UPDATE social_posts p SET deleted_at_source = now(), updated_at = now()"
    " FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)"
    " WHERE p.platform = k.platform AND p.post_id = k.post_id AND p.deleted_at_source IS NULL"
)
HELD_SQL = (
    "SELECT p.platform, p.post_id, p.created_at FROM social_posts p"
    " JOIN unnest(%s::text[], %s::text[]) AS k(platform, post_id) USING (platform, post_id)"
)
PICK_SQL = (
    "SELECT p.post_id FROM social_posts p LEFT JOIN post_checks c USING (platform, post_id)"
    " WHERE p.platform = %s AND p.deleted_at_source IS NULL AND p.post_id LIKE %s"
    " ORDER BY c.checked_at ASC NULLS FIRST, p.created_at, p.post_id LIMIT %s"
)
CHECKED_SQL = (
    "INSERT INTO post_checks (platform, post_id, checked_at)"
    " SELECT %s, k.post_id, now() FROM unnest(%s::text[]) AS k(post_id)"
    " JOIN social_posts p ON p.platform = %s AND p.post_id = k.post_id"
    " ON CONFLICT (platform, post_id) DO UPDATE SET checked_at = EXCLUDED.checked_at"
)
RECHECK_STATE_SQL = "SELECT state FROM recheck_state WHERE platform = %s"
SAVE_RECHECK_STATE_SQL = (
    "INSERT INTO recheck_state (platform, state, updated_at) VALUES (%s, %s::jsonb, now())"
    " ON CONFLICT (platform) DO UPDATE SET state = EXCLUDED.state, updated_at = now()"
)

Key = tuple[str, str]  # (platform, post_id)


def _columns(keys: Sequence[Key]) -> tuple[list[str], list[str]]:
    """(platforms, post_ids): the two arrays the unnest joins take."""
    return [k[0] for k in keys], [k[1] for k in keys]


# -- forget ------------------------------------------------------------------------------------------------


def posts_named(db: Database, *, post: Key | None = None, author: Key | None = None) -> list:
    """(platform, post_id, created_at) of one post, or of every post of one author (oldest first)."""

    def read(cur: psycopg2.extensions.cursor) -> list:
        if post is not None:
            cur.execute(POST_SQL, post)
        else:
            cur.execute(AUTHOR_POSTS_SQL, author)
        return cur.fetchall()

    return db.run(read, what="finding the posts to forget")


def tombstone(db: Database, keys: Sequence[Key], reason: str | None) -> list[str]:
    """Record a tombstone for each post (its reason kept when none is given now), once the loads under way have
    committed; the storage keys of their images (those loads' included)."""

    def write(cur: psycopg2.extensions.cursor) -> list[str]:
        psycopg2.extras.execute_values(cur, TOMBSTONE_SQL, [(k[0], k[1], reason) for k in keys], template=_TOMBSTONE_ROW)
        cur.execute(STORED_KEYS_SQL, _columns(keys))
        return [row[0] for row in cur.fetchall()]

    return db.run(write, what="recording tombstones")


def delete_post_rows(db: Database, keys: Sequence[Key]) -> dict[str, int]:
    """Delete the posts' rows from every table that has them; table -> rows deleted."""

    def delete(cur: psycopg2.extensions.cursor) -> dict[str, int]:
        cur.execute(DELETE_ROWS_SQL, _columns(keys))
        return {table: n for table, n in cur.fetchall()}

    return db.run(delete, what="deleting forgotten posts")


# -- deleted at source -------------------------------------------------------------------------------------


def mark_deleted_at_source(db: Database, keys: Sequence[Key]) -> int:
    """Mark the held posts among these deleted at source (those not marked yet); how many were marked."""

    def mark(cur: psycopg2.extensions.cursor) -> int:
        cur.execute(MARK_DELETED_SQL, _columns(keys))
        return cur.rowcount

    return db.run(mark, what="marking posts deleted at source")


def held_posts(db: Database, keys: Sequence[Key]) -> list[tuple[str, str, datetime]]:
    """(platform, post_id, created_at) of those of these posts the archive holds."""

    def read(cur: psycopg2.extensions.cursor) -> list:
        cur.execute(HELD_SQL, _columns(keys))
        return cur.fetchall()

    return db.run(read, what="finding posts deleted at source")


# -- re-checking held posts --------------------------------------------------------------------------------


def posts_to_recheck(db: Database, platform: str, like: str, limit: int) -> list[str]:
    """The `limit` held, not yet marked posts of a platform whose id is LIKE `like`, checked least recently
    (never checked first)."""

    def read(cur: psycopg2.extensions.cursor) -> list[str]:
        cur.execute(PICK_SQL, (platform, like, limit))
        return [row[0] for row in cur.fetchall()]

    return db.run(read, what=f"choosing {platform} posts to re-check")


def record_rechecked(db: Database, platform: str, post_ids: list[str]) -> None:
    """Stamp these held posts as checked now."""
    db.run(lambda cur: cur.execute(CHECKED_SQL, (platform, post_ids, platform)), what=f"recording re-checked {platform} posts")


def recheck_state(db: Database, platform: str) -> dict[str, Any]:
    """A platform's saved re-check state (an empty dict when it has none)."""

    def read(cur: psycopg2.extensions.cursor) -> dict[str, Any]:
        cur.execute(RECHECK_STATE_SQL, (platform,))
        row = cur.fetchone()
        return dict(row[0]) if row and isinstance(row[0], dict) else {}

    return db.run(read, what=f"reading the {platform} re-check state")


def save_recheck_state(db: Database, platform: str, state: dict[str, Any]) -> None:
    db.run(
        lambda cur: cur.execute(SAVE_RECHECK_STATE_SQL, (platform, json.dumps(state))),
        what=f"saving the {platform} re-check state",
    )
