"""`etl.py trends`: hashtags ranked by how far their last window rises above their own trailing baseline."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from etl.db import Database
from etl.db.insights import rising_hashtags
from etl.status import table

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta:
    """24h, 28d, 90m, 2w -> timedelta (ValueError naming the value otherwise)."""
    match = _DURATION.match(value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a duration (a positive number and m, h, d or w, e.g. 24h or 28d)")
    return timedelta(**{_UNITS[match.group(2).lower()]: float(match.group(1))})


def collect_trends(
    db: Database, window: timedelta, baseline: timedelta, platform: str | None, min_count: int, limit: int = 25
) -> dict[str, Any]:
    rows = db.run(lambda cur: rising_hashtags(cur, window, baseline, platform, min_count, None, limit), what="ranking hashtags")
    return {
        "window_hours": window.total_seconds() / 3600,
        "baseline_days": baseline.total_seconds() / 86400,
        "platform": platform,
        "min_count": min_count,
        "hashtags": rows,
    }


def format_trends(report: dict[str, Any]) -> str:
    scope = report["platform"] or "all platforms"
    head = (
        f"Rising hashtags, {scope}: the last {report['window_hours']:g} h against the {report['baseline_days']:g} days "
        f"before (z = (x - mean) / max(sd, sqrt(mean), 1); growth = (x+1)/(mean+1); at least {report['min_count']} posts)"
    )
    if not report["hashtags"]:
        return head + "\nno hashtag reached the minimum count in the window"
    return head + "\n" + table(
        ["hashtag", "posts", "baseline mean", "sd", "z", "growth"],
        [
            ["#" + r["hashtag"], r["window_posts"], round(r["baseline_mean"], 2), round(r["baseline_stddev"], 2),
             round(r["z_score"], 2), round(r["growth"], 2)]
            for r in report["hashtags"]
        ],
    )  # fmt: skip
