"""What `etl.py status` reports: the last runs, totals per platform, failed images, watermarks, live runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from etl.config import Settings
from etl.db import Database
from etl.errors import ConfigError

# A run is live while its connection holds its units' advisory locks (db.lock_units); pg_locks shows
# the two int4 keys as unsigned oids.
_LOCK_HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND classid::bigint = (hashtext('social-archiver:source')::bigint & 4294967295)"
    " AND objid::bigint = (hashtext(%s)::bigint & 4294967295))"
)


def open_archive(settings: Settings) -> Database:
    """The archive's database, to read: never created here. An embedded data directory without a database,
    or a database without the archive's tables, is a ConfigError naming the setting (a mistyped ETL_DATA_DIR
    must not show an empty archive). An existing archive is migrated, as every command does."""
    if settings.embedded_db:
        pgdata = (settings.data_dir / "postgres").resolve()
        if not (pgdata / "PG_VERSION").is_file():
            raise ConfigError(
                f"ETL_DATA_DIR={str(settings.data_dir)!r}: there is no archive there (no embedded database in {pgdata});"
                " check ETL_DATA_DIR, or set DATABASE_URL"
            )
    db = Database.from_settings(settings)

    def exists(cur: Any) -> bool:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AND to_regclass('etl_runs') IS NOT NULL")
        return bool(cur.fetchone()[0])

    if not db.run(exists, what="looking for the archive"):
        db.close()
        setting = f"ETL_DATA_DIR={str(settings.data_dir)!r}" if settings.embedded_db else "DATABASE_URL"
        raise ConfigError(f"{setting}: there is no archive in {db.display} (no etl_runs table); a run creates one")
    db.migrate()
    return db


def collect_status(db: Database, runs: int = 10) -> dict[str, Any]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT id, mode, sources, status, started_at, finished_at,"
            " EXTRACT(EPOCH FROM (COALESCE(finished_at, now()) - started_at))::float8, posts_fetched, posts_inserted,"
            " posts_updated, posts_unchanged, posts_rejected, images_stored, images_skipped, images_failed, quota_used, host, pid,"
            " error_summary FROM etl_runs ORDER BY id DESC LIMIT %s",
            (runs,),
        )
        names = (
            "id", "mode", "sources", "status", "started_at", "finished_at", "seconds", "fetched", "inserted",
            "updated", "unchanged", "rejected", "images_stored", "images_skipped", "images_failed", "quota_used", "host", "pid",
            "error_summary",
        )  # fmt: skip
        last_runs = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        in_progress = []
        cur.execute(
            "SELECT id, COALESCE(units, sources), host, pid, started_at FROM etl_runs WHERE status = 'running' ORDER BY id"
        )
        for run_id, sources, host, pid, started in cur.fetchall():
            live = False
            for source in sources:
                cur.execute(_LOCK_HELD_SQL, (source,))
                live = live or cur.fetchone()[0]
            in_progress.append(
                {"id": run_id, "sources": sources, "host": host, "pid": pid, "started_at": started, "live": live}
            )
        cur.execute(
            "SELECT p.platform, count(*), min(p.created_at), max(p.created_at),"
            " count(*) FILTER (WHERE p.sentiment = 'positive'), count(*) FILTER (WHERE p.sentiment = 'neutral'),"
            " count(*) FILTER (WHERE p.sentiment = 'negative') FROM social_posts p GROUP BY p.platform ORDER BY 1"
        )
        platforms = {
            row[0]: {"posts": row[1], "oldest": row[2], "newest": row[3], "positive": row[4], "neutral": row[5], "negative": row[6]}
            for row in cur.fetchall()
        }
        cur.execute(
            "SELECT platform, count(*) FILTER (WHERE status = 'stored'), count(*) FILTER (WHERE status = 'failed'),"
            " COALESCE(sum(bytes) FILTER (WHERE status = 'stored'), 0) FROM post_media GROUP BY platform"
        )
        for platform, stored, failed, size in cur.fetchall():
            platforms.setdefault(platform, {"posts": 0})
            platforms[platform].update({"images_stored": stored, "images_failed": failed, "bytes_stored": int(size)})
        cur.execute(
            "SELECT platform, left(COALESCE(last_error, ''), 160), permanent, count(*), max(attempts) FROM post_media"
            " WHERE status = 'failed' GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1 LIMIT 15"
        )
        failures = [
            {"platform": r[0], "error": r[1], "permanent": r[2], "images": r[3], "max_attempts": r[4]}
            for r in cur.fetchall()
        ]
        trust = _trust(cur)
        cur.execute("SELECT source, config_key, watermark, cursor, updated_at FROM etl_state ORDER BY source, config_key")
        watermarks = [
            {"source": r[0], "config_key": r[1], "watermark": r[2], "cursor": r[3], "updated_at": r[4]}
            for r in cur.fetchall()
        ]
    return {
        "database": db.display,
        "runs": last_runs,
        "in_progress": in_progress,
        "platforms": platforms,
        "failed_images": failures,
        "watermarks": watermarks,
        **trust,
    }


def _trust(cur: Any) -> dict[str, Any]:
    """The last fixity check, posts not scored and why, deletions (sql/008)."""
    cur.execute(
        "SELECT id, status, started_at, finished_at, per_source -> 'verify', sources FROM etl_runs"
        " WHERE mode = 'verify' ORDER BY id DESC LIMIT 1"
    )
    row = cur.fetchone()
    last_verify = (
        {"id": row[0], "status": row[1], "started_at": row[2], "finished_at": row[3], "counts": row[4] or {}, "scope": row[5]}
        if row
        else None
    )
    cur.execute(
        "SELECT platform, sentiment_skipped, count(*) FROM social_posts WHERE sentiment IS NULL"
        " GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 20"
    )
    unscored = [{"platform": r[0], "reason": r[1] or "not scored yet", "posts": r[2]} for r in cur.fetchall()]
    cur.execute("SELECT count(*) FROM social_posts WHERE deleted_at_source IS NOT NULL")
    deleted = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM forgotten_posts")
    forgotten = cur.fetchone()[0]
    return {"last_verify": last_verify, "unscored": unscored, "deleted_at_source": deleted, "forgotten": forgotten}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def _tried(attempts: int | None) -> str:
    """How often the most-tried image of a group was tried: the first try counts (one try is not a retry)."""
    if not attempts:
        return "not yet tried"
    return "tried once" if attempts == 1 else f"tried up to {attempts} times"


def format_status(report: dict[str, Any]) -> str:
    out = [f"Database: {report['database']}", ""]
    if report["in_progress"]:
        for run in report["in_progress"]:
            state = "IN PROGRESS" if run["live"] else "not running (abandoned: its process ended)"
            out.append(
                f"Run {run['id']} ({_cell(run['sources'])}) on {run['host']} pid {run['pid']} since "
                f"{_cell(run['started_at'])}: {state}"
            )
    else:
        out.append("No run in progress.")
    out += ["", "Last runs:"]
    out.append(
        table(
            ["run", "mode", "sources", "started (UTC)", "secs", "status", "fetched", "new", "updated", "unchanged", "rejected",
             "img stored", "img already", "img failed"],
            [
                [r["id"], r["mode"], r["sources"], r["started_at"], r["seconds"], r["status"], r["fetched"], r["inserted"],
                 r["updated"], r["unchanged"], r["rejected"], r["images_stored"], r["images_skipped"], r["images_failed"]]
                for r in report["runs"]
            ],
        )  # fmt: skip
    )
    out += ["", "Archive per platform:"]
    out.append(
        table(
            ["platform", "posts", "oldest", "newest", "pos", "neu", "neg", "images", "failed", "MB"],
            [
                [name, p.get("posts", 0), p.get("oldest"), p.get("newest"), p.get("positive", 0), p.get("neutral", 0),
                 p.get("negative", 0), p.get("images_stored", 0), p.get("images_failed", 0),
                 round(p.get("bytes_stored", 0) / 1e6, 1)]
                for name, p in report["platforms"].items()
            ],
        )  # fmt: skip
    )
    out += ["", "Failed images by reason:"]
    if report["failed_images"]:
        out.append(
            table(
                ["platform", "images", "attempts", "permanent", "error"],
                [[f["platform"], f["images"], _tried(f["max_attempts"]), "yes" if f["permanent"] else "no", f["error"]]
                 for f in report["failed_images"]],
            )
        )
    else:
        out.append("none")
    out += ["", "Last fixity check (etl.py verify):"]
    v = report.get("last_verify")
    if v:
        c = v["counts"]
        out.append(
            f"run {v['id']} ({_cell(v['scope'])}) {v['status']} at {_cell(v['finished_at'] or v['started_at'])}: "
            f"checked {c.get('checked', 0)}, ok {c.get('ok', 0)}, missing {c.get('missing', 0)}, "
            f"changed {c.get('changed', 0)}, unreadable {c.get('unreadable', 0)}, "
            f"unexpected {c.get('unexpected', 0) if c.get('listed') else 'not looked for'}"
        )
    else:
        out.append("never run")
    out += ["", "Posts without a sentiment label:"]
    if report.get("unscored"):
        out.append(table(["platform", "posts", "why"], [[u["platform"], u["posts"], u["reason"]] for u in report["unscored"]]))
    else:
        out.append("none")
    out += ["", f"Deletions: {report.get('deleted_at_source', 0)} post(s) marked deleted at source, "
            f"{report.get('forgotten', 0)} tombstone(s)"]  # fmt: skip
    out += ["", "Watermarks:"]
    out.append(
        table(
            ["source", "config", "watermark", "cursor", "updated"],
            [[w["source"], w["config_key"], w["watermark"], w["cursor"] or "-", w["updated_at"]] for w in report["watermarks"]],
        )
    )
    return "\n".join(out)
