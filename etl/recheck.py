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

import logging

from etl.db import Database
from etl.db.deletions import posts_to_recheck, recheck_state, record_rechecked, save_recheck_state
from etl.errors import SourceError
from etl.sources.base import Source

log = logging.getLogger(__name__)

def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def pick_posts(db: Database, platform: str, limit: int, prefix: str = "") -> list[str]:
    """The `limit` held, not yet marked posts of a platform checked least recently (never checked first)."""
    return posts_to_recheck(db, platform, _like_prefix(prefix), limit)


def record_checked(db: Database, platform: str, post_ids: list[str]) -> None:
    if post_ids:
        record_rechecked(db, platform, post_ids)


def recheck_source(db: Database, source: Source, limit: int) -> tuple[int, str | None]:
    """Ask the platform about up to `limit` held posts of `source`; (posts answered about, error or None).

    Gone posts are left in `source.gone` for the runner's `_apply_gone`."""
    if not source.can_recheck or limit <= 0:
        return 0, None
    platform = source.name
    if source.recheck_cap is not None:
        limit = min(limit, source.recheck_cap)
    post_ids = pick_posts(db, platform, limit, source.recheck_prefix)
    source.recheck_state = recheck_state(db, platform)
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
            save_recheck_state(db, platform, source.recheck_state)
    gone = sum(1 for p, _, _ in source.gone if p == platform)
    log.info(
        "%s: re-checked %d held post(s) (of %d chosen); the platform says %d are gone",
        platform, len(answered), len(post_ids), gone,
    )  # fmt: skip
    return len(answered), error


__all__ = ["pick_posts", "recheck_source", "record_checked"]
