"""Deletions: `etl.py forget` (on request) and posts a platform says are gone (ETL_DELETED_AT_SOURCE).

Forgetting a post records a tombstone first (forgotten_posts: platform, post_id, when, reason; no content), so
that no run or backfill started meanwhile archives it again (the load path drops tombstoned posts), then
deletes its stored objects, then its rows in every table that has (platform, post_id) columns. Interrupted,
it is finished by running the same command again.

Export hook: an export must skip tombstoned posts; rows already exported are found by
`SELECT platform, post_id FROM forgotten_posts WHERE forgotten_at > <the last export>` (their partitions are
to be rewritten).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg2.extras

from etl.config import Settings
from etl.db import Database
from etl.errors import UsageError
from etl.records import clean_text
from etl.store import ObjectStore
from etl.store_ops import delete_object, iter_keys, post_prefix

log = logging.getLogger(__name__)
BATCH = 500
TOMBSTONE_SQL = (
    "INSERT INTO forgotten_posts (platform, post_id, reason) VALUES %s ON CONFLICT (platform, post_id)"
    " DO UPDATE SET reason = COALESCE(EXCLUDED.reason, forgotten_posts.reason)"
)
# sql/008's forget_post_rows: every table with platform and post_id columns, social_posts last.
DELETE_ROWS_SQL = "SELECT table_name, deleted FROM forget_post_rows(%s::text[], %s::text[])"


def parse_target(value: str, what: str) -> tuple[str, str]:
    """'PLATFORM:ID' -> (platform, id); the id may itself contain ':' (Bluesky's at:// URIs)."""
    platform, sep, rest = value.partition(":")
    platform, rest = platform.strip().lower(), rest.strip()
    if not sep or not platform or not rest:
        raise UsageError(f"{what} must be PLATFORM:{'POST_ID' if what == '--post' else 'USERNAME'} (got {value!r})")
    return platform, rest


@dataclass
class ForgetResult:
    """What a forget did (or, dry, would do)."""

    posts: list[tuple[str, str, datetime | None]] = field(default_factory=list)  # platform, post_id, created_at
    tombstones: int = 0
    objects: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows deleted


def find_posts(db: Database, *, post: tuple[str, str] | None = None, author: tuple[str, str] | None = None) -> list:
    """(platform, post_id, created_at) of the posts a forget names; a --post not held is still listed (None)."""

    def read(cur: Any) -> list:
        if post is not None:
            cur.execute(
                "SELECT platform, post_id, created_at FROM social_posts WHERE platform = %s AND post_id = %s", post
            )
            return cur.fetchall() or [(post[0], post[1], None)]
        assert author is not None
        cur.execute(
            "SELECT platform, post_id, created_at FROM social_posts WHERE platform = %s AND author_username = %s"
            " ORDER BY created_at, post_id",
            author,
        )
        return cur.fetchall()

    return db.run(read, what="finding the posts to forget")


def forget_posts(
    db: Database, store: ObjectStore | None, settings: Settings, posts: list, reason: str | None
) -> ForgetResult:
    """Tombstone, then delete objects, then rows, a batch at a time."""
    result = ForgetResult(posts=list(posts))
    reason = clean_text(reason)[:500] if reason else None
    for start in range(0, len(posts), BATCH):
        batch = posts[start : start + BATCH]
        keys = [(p[0], clean_text(p[1])) for p in batch]

        def tombstone(cur: Any, keys: list = keys) -> int:
            psycopg2.extras.execute_values(cur, TOMBSTONE_SQL, [(k[0], k[1], reason) for k in keys])
            cur.execute(
                "SELECT m.storage_key FROM post_media m JOIN unnest(%s::text[], %s::text[]) AS k(platform, post_id)"
                " USING (platform, post_id) WHERE m.storage_key IS NOT NULL",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            return [row[0] for row in cur.fetchall()]

        stored_keys = db.run(tombstone, what="recording tombstones")
        result.tombstones += len(keys)
        if store is not None:
            doomed = set(stored_keys)
            for platform, post_id, created_at in batch:
                if created_at is not None:  # and whatever else lies in the post's folder (an unrecorded upload)
                    doomed.update(iter_keys(store, post_prefix(settings.s3_prefix, platform, created_at, post_id)))
            for key in sorted(doomed):
                if delete_object(store, key):
                    result.objects += 1

        def delete_rows(cur: Any, keys: list = keys) -> dict[str, int]:
            cur.execute(DELETE_ROWS_SQL, ([k[0] for k in keys], [k[1] for k in keys]))
            return {table: n for table, n in cur.fetchall()}

        for table, n in db.run(delete_rows, what="deleting forgotten posts").items():
            result.rows[table] = result.rows.get(table, 0) + n
    log.info(
        "forgot %d post(s): %d object(s), rows %s", result.tombstones, result.objects,
        ", ".join(f"{t} {n}" for t, n in sorted(result.rows.items())) or "none",
    )  # fmt: skip
    return result


def apply_gone(db: Database, store: ObjectStore | None, settings: Settings, gone: list[tuple[str, str, str]]) -> int:
    """Posts a platform says are gone: of those the archive holds, mark them deleted at source (keep them) or
    forget them, as ETL_DELETED_AT_SOURCE says. Returns how many held posts were marked or forgotten."""
    held = 0
    for start in range(0, len(gone), BATCH):
        batch = gone[start : start + BATCH]
        why = {(p, clean_text(i)): w for p, i, w in batch}
        platforms, ids = [k[0] for k in why], [k[1] for k in why]
        if settings.deleted_at_source == "mark":

            def mark(cur: Any, platforms: list = platforms, ids: list = ids) -> int:
                cur.execute(
                    "UPDATE social_posts p SET deleted_at_source = now(), updated_at = now()"
                    " FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)"
                    " WHERE p.platform = k.platform AND p.post_id = k.post_id AND p.deleted_at_source IS NULL",
                    (platforms, ids),
                )
                return cur.rowcount

            marked = db.run(mark, what="marking posts deleted at source")
            held += marked
            if marked:
                log.info("%d post(s) marked deleted at source", marked)
            continue

        def read(cur: Any, platforms: list = platforms, ids: list = ids) -> list:
            cur.execute(
                "SELECT p.platform, p.post_id, p.created_at FROM social_posts p"
                " JOIN unnest(%s::text[], %s::text[]) AS k(platform, post_id) USING (platform, post_id)",
                (platforms, ids),
            )
            return cur.fetchall()

        for row in db.run(read, what="finding posts deleted at source"):
            forget_posts(db, store, settings, [row], f"deleted at source: {why[(row[0], row[1])]}")
            held += 1
    return held
