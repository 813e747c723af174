"""Deletions: `etl.py forget` (on request) and posts a platform says are gone (ETL_DELETED_AT_SOURCE).

Forgetting a post records a tombstone first (forgotten_posts: platform, post_id, when, reason; no content), so
that no run or backfill started meanwhile archives it again (the load path drops tombstoned posts), then
deletes its stored objects, then its rows in every table that has (platform, post_id) columns. Interrupted,
it is finished by running the same command again.

Export hook: an export must skip tombstoned posts; rows already exported are the tombstones of forgotten_posts
newer than the last export (their partitions are to be rewritten).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from etl.config import Settings
from etl.db import Database
from etl.db.deletions import delete_post_rows, held_posts, mark_deleted_at_source, posts_named, tombstone
from etl.errors import UsageError
from etl.records import clean_text
from etl.store import ObjectStore
from etl.store_ops import delete_object, iter_keys, keys_of_post_any_day, post_prefix

log = logging.getLogger(__name__)
BATCH = 500


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
    if post is not None:
        return posts_named(db, post=post) or [(post[0], post[1], None)]
    assert author is not None
    return posts_named(db, author=author)


def forget_posts(
    db: Database, store: ObjectStore | None, settings: Settings, posts: list, reason: str | None
) -> ForgetResult:
    """Tombstone, then delete objects, then rows, a batch at a time."""
    result = ForgetResult(posts=list(posts))
    reason = clean_text(reason)[:500] if reason else None
    for start in range(0, len(posts), BATCH):
        batch = posts[start : start + BATCH]
        keys = [(p[0], clean_text(p[1])) for p in batch]
        stored_keys = tombstone(db, keys, reason)
        result.tombstones += len(keys)
        if store is not None:
            doomed = set(stored_keys)
            for platform, post_id, created_at in batch:
                # and whatever else lies in the post's folder (an unrecorded upload); a post the archive does not
                # hold (a killed run stored its images, never its row) has no date: its folder is looked for by day
                doomed.update(
                    iter_keys(store, post_prefix(settings.s3_prefix, platform, created_at, post_id))
                    if created_at is not None
                    else keys_of_post_any_day(store, settings.s3_prefix, platform, post_id)
                )
            for key in sorted(doomed):
                if delete_object(store, key):
                    result.objects += 1
        for table, n in delete_post_rows(db, keys).items():
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
        if settings.deleted_at_source == "mark":
            marked = mark_deleted_at_source(db, list(why))
            held += marked
            if marked:
                log.info("%d post(s) marked deleted at source", marked)
            continue
        # Forgotten together where the platform gave the same reason: a tombstone waits for the loads under way in
        # every run (etl/db/archive.py, LOADS_LOCK), once per call rather than once per post.
        by_reason: dict[str, list] = {}
        for row in held_posts(db, list(why)):
            by_reason.setdefault(f"deleted at source: {why[(row[0], row[1])]}", []).append(row)
        for reason, rows in by_reason.items():
            forget_posts(db, store, settings, rows, reason)
            held += len(rows)
    return held
