"""Re-checking held posts at their platform, a bounded slice per run: are they still there?

Each run (`etl.py run`, not backfills) asks every source that can (`Source.can_recheck`) about at most
ETL_RECHECK_POSTS of the posts the archive holds for it, those never checked first, then the least recently
checked (post_checks.checked_at, sql/012), so the whole archive is covered over time without spending a day's
quota at once. What the platform says is gone goes through `Source.report_gone`, and so through the policy of
ETL_DELETED_AT_SOURCE (mark or forget, etl.forget.apply_gone). A re-check that fails (quota, a refused token,
a 5xx past the retries) ends that source's re-check for this run and is reported; the posts it did ask about
are recorded as checked, the others come first next run.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from etl.db import Database
from etl.errors import SourceError
from etl.sources.base import Source

log = logging.getLogger(__name__)

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


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def pick_posts(db: Database, platform: str, limit: int, prefix: str = "") -> list[str]:
    """The `limit` held, not yet marked posts of a platform checked least recently (never checked first)."""

    def read(cur: Any) -> list[str]:
        cur.execute(PICK_SQL, (platform, _like_prefix(prefix), limit))
        return [row[0] for row in cur.fetchall()]

    return db.run(read, what=f"choosing {platform} posts to re-check")


def record_checked(db: Database, platform: str, post_ids: list[str]) -> None:
    def write(cur: Any) -> None:
        cur.execute(CHECKED_SQL, (platform, post_ids, platform))

    if post_ids:
        db.run(write, what=f"recording re-checked {platform} posts")


def load_state(db: Database, platform: str) -> dict[str, Any]:
    def read(cur: Any) -> dict[str, Any]:
        cur.execute("SELECT state FROM recheck_state WHERE platform = %s", (platform,))
        row = cur.fetchone()
        return dict(row[0]) if row and isinstance(row[0], dict) else {}

    return db.run(read, what=f"reading the {platform} re-check state")


def save_state(db: Database, platform: str, state: dict[str, Any]) -> None:
    def write(cur: Any) -> None:
        cur.execute(
            "INSERT INTO recheck_state (platform, state, updated_at) VALUES (%s, %s::jsonb, now())"
            " ON CONFLICT (platform) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
            (platform, json.dumps(state)),
        )

    db.run(write, what=f"saving the {platform} re-check state")


def recheck_source(db: Database, source: Source, limit: int) -> tuple[int, str | None]:
    """Ask the platform about up to `limit` held posts of `source`; (posts answered about, error or None).

    Gone posts are left in `source.gone` for the runner's `_apply_gone`."""
    if not source.can_recheck or limit <= 0:
        return 0, None
    platform = source.name
    if source.recheck_cap is not None:
        limit = min(limit, source.recheck_cap)
    post_ids = pick_posts(db, platform, limit, source.recheck_prefix)
    source.recheck_state = load_state(db, platform)
    before = dict(source.recheck_state)
    if not post_ids and not source.recheck_state:
        return 0, None
    answered: list[str] = []
    error: str | None = None
    try:
        for post_id in source.recheck(post_ids):
            answered.append(post_id)
    except SourceError as exc:
        error = f"{platform}: re-checking held posts: {exc}"
        log.error("%s (%d post(s) answered before it; the rest come first next run)", error, len(answered))
    except Exception as exc:  # a bug in a re-check ends that re-check, not the run
        error = f"{platform}: re-checking held posts failed unexpectedly: {type(exc).__name__}: {exc}"
        log.exception("%s: re-checking held posts failed unexpectedly", platform)
    finally:
        record_checked(db, platform, answered)
        if source.recheck_state != before:
            save_state(db, platform, source.recheck_state)
    gone = sum(1 for p, _, _ in source.gone if p == platform)
    log.info(
        "%s: re-checked %d held post(s) (of %d chosen); the platform says %d are gone",
        platform, len(answered), len(post_ids), gone,
    )  # fmt: skip
    return len(answered), error


__all__ = ["pick_posts", "recheck_source", "record_checked"]
