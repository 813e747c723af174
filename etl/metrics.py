"""The Prometheus textfile (node_exporter's textfile collector) of the last run, through prometheus_client."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etl.run.stats import RunStats

PREFIX = "social_archiver_"
STATUSES = ("ok", "partial", "interrupted", "failed")

Samples = Iterable[tuple[Mapping[str, str], float]]


class Textfile:
    """Gauges collected into one registry, written at once (write_to_textfile writes a temp file and renames it)."""

    def __init__(self) -> None:
        # Imported here: prometheus_client (and the HTTP server it brings) costs every run's start-up, and only a
        # run with ETL_METRICS_FILE set writes the file.
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    def gauge(self, name: str, help_text: str, samples: Samples, labels: Iterable[str] = ()) -> None:
        from prometheus_client import Gauge

        gauge = Gauge(PREFIX + name, help_text, labelnames=tuple(labels), registry=self.registry)
        for values, value in samples:
            (gauge.labels(**values) if values else gauge).set(value)

    def write(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        from prometheus_client import write_to_textfile

        write_to_textfile(str(target), self.registry)


def write_run_metrics(path: str | Path, mode: str, status: str, stats: RunStats) -> None:
    """The last run's outcome and counts per source, for alerting on a failed or stale run."""
    out = Textfile()
    out.gauge("last_run_timestamp_seconds", "When the last run finished (unix time).", [({"mode": mode}, time.time())], ["mode"])
    out.gauge("last_run_duration_seconds", "How long the last run took.", [({"mode": mode}, stats.seconds)], ["mode"])
    out.gauge(
        "last_run_status", "1 for the last run's status, 0 for the others.",
        [({"mode": mode, "status": st}, 1.0 if st == status else 0.0) for st in STATUSES], ["mode", "status"],
    )  # fmt: skip
    out.gauge("last_run_exit_code", "The exit code of the last run.", [({"mode": mode}, float(stats.exit_code))], ["mode"])
    posts, images = [], []
    for source, counts in sorted(stats.per_source.items()):
        for result in ("fetched", "inserted", "updated", "unchanged", "rejected"):
            posts.append(({"source": source, "result": result}, float(counts.get(result, 0))))
        for result in ("stored", "skipped", "failed"):
            images.append(({"source": source, "result": result}, float(counts.get(f"images_{result}", 0))))
    out.gauge("last_run_posts", "Posts of the last run per source and result.", posts, ["source", "result"])
    out.gauge("last_run_images", "Images of the last run per source and result.", images, ["source", "result"])
    out.gauge("last_run_quota_units", "API quota units the last run used.", [({"mode": mode}, float(stats.quota_used))], ["mode"])
    out.write(path)
