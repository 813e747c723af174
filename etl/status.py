"""What `etl.py status` reports: the last runs, totals per platform, failed images, watermarks, live runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from etl.config import Settings
from etl.db import Database
from etl.db.status import archive_exists, archive_status
from etl.errors import ConfigError


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
    if not archive_exists(db):
        db.close()
        setting = f"ETL_DATA_DIR={str(settings.data_dir)!r}" if settings.embedded_db else "DATABASE_URL"
        raise ConfigError(f"{setting}: there is no archive in {db.display} (no etl_runs table); a run creates one")
    db.migrate()
    return db


def collect_status(db: Database, runs: int = 10) -> dict[str, Any]:
    return {"database": db.display, **archive_status(db, runs)}


def utc_minute(value: datetime) -> str:
    """YYYY-MM-DD HH:MM in UTC, as every table and line of ours labels its times. PostgreSQL hands a TIMESTAMPTZ
    over in the session's zone (the server's `timezone`, which initdb takes from the OS), not in UTC."""
    return (value.astimezone(timezone.utc) if value.tzinfo else value).strftime("%Y-%m-%d %H:%M")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return utc_minute(value)
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
