"""What `status` and `check` read: the archive's presence, its migrations, the last runs and the archive's totals."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions

from etl.db import Database

ARCHIVE_EXISTS_SQL = "SELECT to_regclass('schema_migrations') IS NOT NULL AND to_regclass('etl_runs') IS NOT NULL"
MIGRATIONS_TABLE_SQL = "SELECT to_regclass('schema_migrations') IS NOT NULL"
APPLIED_SQL = "SELECT version FROM schema_migrations"
LAST_RUNS_SQL = (
    "SELECT id, mode, sources, status, started_at, finished_at,"
    " EXTRACT(EPOCH FROM (COALESCE(finished_at, now()) - started_at))::float8, posts_fetched, posts_inserted,"
    " posts_updated, posts_unchanged, posts_rejected, images_stored, images_skipped, images_failed, quota_used, host, pid,"
    " error_summary FROM etl_runs ORDER BY id DESC LIMIT %s"
)
_LAST_RUN_NAMES = (
    "id", "mode", "sources", "status", "started_at", "finished_at", "seconds", "fetched", "inserted",
    "updated", "unchanged", "rejected", "images_stored", "images_skipped", "images_failed", "quota_used", "host", "pid",
    "error_summary",
)  # fmt: skip
RUNNING_SQL = "SELECT id, COALESCE(units, sources), host, pid, started_at FROM etl_runs WHERE status = 'running' ORDER BY id"
# A run is live while its connection holds its units' advisory locks (db.lock_units); pg_locks shows
# the two int4 keys as unsigned oids.
LOCK_HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"  # another archive's are not ours
    " AND classid::bigint = (hashtext('social-archiver:source')::bigint & 4294967295)"
    " AND objid::bigint = (hashtext(%s)::bigint & 4294967295))"
)
POSTS_PER_PLATFORM_SQL = (
    "SELECT p.platform, count(*), min(p.created_at), max(p.created_at),"
    " count(*) FILTER (WHERE p.sentiment = 'positive'), count(*) FILTER (WHERE p.sentiment = 'neutral'),"
    " count(*) FILTER (WHERE p.sentiment = 'negative') FROM social_posts p GROUP BY p.platform ORDER BY 1"
)
IMAGES_PER_PLATFORM_SQL = (
    "SELECT platform, count(*) FILTER (WHERE status = 'stored'), count(*) FILTER (WHERE status = 'failed'),"
    " COALESCE(sum(bytes) FILTER (WHERE status = 'stored'), 0) FROM post_media GROUP BY platform"
)
FAILURES_SQL = (
    "SELECT platform, left(COALESCE(last_error, ''), 160), permanent, count(*), max(attempts) FROM post_media"
    " WHERE status = 'failed' GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1 LIMIT 15"
)
WATERMARKS_SQL = "SELECT source, config_key, watermark, cursor, updated_at FROM etl_state ORDER BY source, config_key"
LAST_VERIFY_SQL = (
    "SELECT id, status, started_at, finished_at, per_source -> 'verify', sources FROM etl_runs"
    " WHERE mode = 'verify' ORDER BY id DESC LIMIT 1"
)
UNSCORED_SQL = (
    "SELECT platform, sentiment_skipped, count(*) FROM social_posts WHERE sentiment IS NULL"
    " GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 20"
)
DELETED_AT_SOURCE_SQL = "SELECT count(*) FROM social_posts WHERE deleted_at_source IS NOT NULL"
TOMBSTONES_SQL = "SELECT count(*) FROM forgotten_posts"


def archive_exists(db: Database) -> bool:
    """Whether the database holds the archive's tables (a run creates them)."""

    def exists(cur: psycopg2.extensions.cursor) -> bool:
        cur.execute(ARCHIVE_EXISTS_SQL)
        return bool(cur.fetchone()[0])

    return db.run(exists, what="looking for the archive")


def applied_migrations(db: Database) -> set[int]:
    """The versions recorded in schema_migrations (none when the table is not there yet)."""
    with db.transaction() as cur:
        cur.execute(MIGRATIONS_TABLE_SQL)
        if not cur.fetchone()[0]:
            return set()
        cur.execute(APPLIED_SQL)
        return {row[0] for row in cur.fetchall()}


def archive_status(db: Database, runs: int) -> dict[str, Any]:
    """The status report's figures, read in one transaction: runs, live runs, platforms, failures, watermarks."""
    with db.transaction() as cur:
        cur.execute(LAST_RUNS_SQL, (runs,))
        last_runs = [dict(zip(_LAST_RUN_NAMES, row, strict=True)) for row in cur.fetchall()]
        in_progress = _runs_in_progress(cur)
        cur.execute(POSTS_PER_PLATFORM_SQL)
        # Every platform with the same fields (a platform without images has them at 0, not missing in --json).
        none: dict[str, Any] = {"images_stored": 0, "images_failed": 0, "bytes_stored": 0}
        platforms = {
            row[0]: {"posts": row[1], "oldest": row[2], "newest": row[3], "positive": row[4], "neutral": row[5],
                     "negative": row[6], **none}
            for row in cur.fetchall()
        }  # fmt: skip
        cur.execute(IMAGES_PER_PLATFORM_SQL)
        for platform, stored, failed, size in cur.fetchall():
            platforms.setdefault(platform, {"posts": 0, "oldest": None, "newest": None, "positive": 0, "neutral": 0, "negative": 0})
            platforms[platform].update({"images_stored": stored, "images_failed": failed, "bytes_stored": int(size)})
        cur.execute(FAILURES_SQL)
        failures = [
            {"platform": r[0], "error": r[1], "permanent": r[2], "images": r[3], "max_attempts": r[4]}
            for r in cur.fetchall()
        ]
        trust = _trust(cur)
        cur.execute(WATERMARKS_SQL)
        watermarks = [
            {"source": r[0], "config_key": r[1], "watermark": r[2], "cursor": r[3], "updated_at": r[4]}
            for r in cur.fetchall()
        ]
    return {
        "runs": last_runs,
        "in_progress": in_progress,
        "platforms": platforms,
        "failed_images": failures,
        "watermarks": watermarks,
        **trust,
    }


def _runs_in_progress(cur: psycopg2.extensions.cursor) -> list[dict[str, Any]]:
    """Runs the ledger calls running, each with whether its process still holds its locks."""
    cur.execute(RUNNING_SQL)
    in_progress = []
    for run_id, sources, host, pid, started in cur.fetchall():
        live = False
        for source in sources:
            cur.execute(LOCK_HELD_SQL, (source,))
            live = live or cur.fetchone()[0]
        in_progress.append({"id": run_id, "sources": sources, "host": host, "pid": pid, "started_at": started, "live": live})
    return in_progress


def _trust(cur: psycopg2.extensions.cursor) -> dict[str, Any]:
    """The last fixity check, posts not scored and why, deletions (sql/008)."""
    cur.execute(LAST_VERIFY_SQL)
    row = cur.fetchone()
    last_verify = (
        {"id": row[0], "status": row[1], "started_at": row[2], "finished_at": row[3], "counts": row[4] or {}, "scope": row[5]}
        if row
        else None
    )
    cur.execute(UNSCORED_SQL)
    unscored = [{"platform": r[0], "reason": r[1] or "not scored yet", "posts": r[2]} for r in cur.fetchall()]
    cur.execute(DELETED_AT_SOURCE_SQL)
    deleted = cur.fetchone()[0]
    cur.execute(TOMBSTONES_SQL)
    forgotten = cur.fetchone()[0]
    return {"last_verify": last_verify, "unscored": unscored, "deleted_at_source": deleted, "forgotten": forgotten}
