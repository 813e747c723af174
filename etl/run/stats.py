"""What a run counts: RunStats (per stage, for the summary line, etl_runs and the metrics file) and StageClock."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from etl.errors import Outcome
from etl.records import Media

if TYPE_CHECKING:
    from etl.sources import Source

MAX_ERRORS_KEPT = 200


class StageClock:
    """Seconds spent per stage. Image workers add theirs from many threads at once, so their stages sum to
    more than the wall time: they show where the work went, not how long the run took."""

    WORKER_STAGES = ("download", "store")

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] += elapsed

    def timed(self, items: Iterable[Any], stage: str) -> Iterator[Any]:
        """The items of `items`, the time spent producing them counted to `stage`."""
        iterator = iter(items)
        while True:
            with self(stage):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def line(self) -> str:
        """`stages fetch=…s load=…s | worker-seconds download=…s store=…s`: the second group is summed over the
        image workers (it can exceed the wall time), so it is labelled apart from the main thread's stages."""
        main = " ".join(f"{s}={t:.2f}s" for s, t in self.seconds.items() if s not in self.WORKER_STAGES)
        workers = " ".join(f"{s}={t:.2f}s" for s, t in self.seconds.items() if s in self.WORKER_STAGES)
        return f"stages {main}" + (f" | worker-seconds (summed over image workers) {workers}" if workers else "")


@dataclass
class RunStats(Outcome):
    """Counts of one run, per stage; what the summary line, etl_runs and the metrics file report."""

    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    images_stored: int = 0
    images_failed: int = 0
    images_skipped: int = 0
    images_retried: int = 0
    deleted_at_source: int = 0  # held posts the platform said are gone, marked or forgotten
    rechecked: int = 0  # held posts asked about at their platform (etl/recheck.py)
    forgotten_skipped: int = 0  # posts with a tombstone (etl.py forget), not archived again
    engagement_snapshots: int = 0
    quota_used: int = 0
    sentiment: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT of them
    error_count: int = 0
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_failures: int = 0
    interrupted: bool = False
    locked_streams: list[str] = field(default_factory=list)  # units another run held: skipped, not failed
    stages: StageClock = field(default_factory=StageClock)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def error(self, message: str) -> None:
        self.add_error(message)

    def add_error(self, message: str, *, first: bool = False) -> None:
        self.error_count += 1
        self._into(self.errors, message, first, MAX_ERRORS_KEPT)

    def take_rejects(self, source: Source) -> None:
        """Count a source's bad items; its kept messages become errors (it keeps the first 200 only)."""
        for message in source.rejects:
            self.error(message)
        self.error_count += source.rejected - len(source.rejects)
        self.rejected += source.rejected

    def count_images(self, media: Iterable[Media], where: str) -> None:
        for m in media:
            if m.status == "stored":
                self.images_stored += 1
            else:
                self.images_failed += 1
                self.error(f"{where}: {m.platform}/{m.post_id} image {m.position}: {m.error}")

    def snapshot(self) -> dict[str, int]:
        return {
            "fetched": self.fetched, "inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged,
            "images_stored": self.images_stored, "images_skipped": self.images_skipped,
            "images_failed": self.images_failed,
        }  # fmt: skip

    @property
    def partial(self) -> bool:
        return bool(self.rejected or self.images_failed or self.source_failures)

    def ledger(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        """What etl_runs records; `redact` is applied to every error message (secrets never reach the table)."""
        return {
            "posts_fetched": self.fetched,
            "posts_inserted": self.inserted,
            "posts_updated": self.updated,
            "posts_unchanged": self.unchanged,
            "posts_rejected": self.rejected,
            "images_stored": self.images_stored,
            "images_failed": self.images_failed,
            "images_skipped": self.images_skipped,
            "quota_used": self.quota_used,
            "sentiment": dict(self.sentiment),
            "per_source": self.per_source,
            "errors": [redact(e) for e in self.errors],
            "error_count": self.error_count,
        }

    def summary_line(self) -> str:
        s = self.sentiment
        return (
            f"posts fetched={self.fetched} inserted={self.inserted} updated={self.updated} "
            f"unchanged={self.unchanged} rejected={self.rejected} | images stored={self.images_stored} "
            f"skipped={self.images_skipped} failed={self.images_failed} | sentiment positive={s['positive']} "
            f"neutral={s['neutral']} negative={s['negative']} | {self.seconds:.1f}s"
            + (f" | {self.stages.line()}" if self.stages.seconds else "")
        )
