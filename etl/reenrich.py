"""Re-score stored posts with the current enricher, without fetching: streamed, batched, changed rows only."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from datetime import datetime
from typing import Any

from etl import prefork
from etl.ahead import FORKING, fork_scorers, task_size
from etl.db import Database
from etl.db.reenrich import unscored_posts, write_decisions
from etl.enrich import SentimentEnricher
from etl.rescore import decide_in_worker, decide_rows, kept
from etl.run.stats import RunStats

log = logging.getLogger(__name__)

_AHEAD = 2  # batches read and handed to the workers beyond the one being written (the workers never wait for it)


class _Scorers:
    """Worker processes scoring captions (every core), taken for the first batch that has captions to score: those
    `etl.py reenrich` forked as it started (etl/prefork.py), else forked now (etl/ahead.py's fork_scorers). A batch
    that is only relabelled (kept()) is decided here, with no model loaded."""

    def __init__(self, enricher: SentimentEnricher, workers: int):
        self.enricher = enricher
        self.workers = workers
        self.pool: Executor | prefork.Preforked | None = None

    def submit(self, rows: list[tuple]) -> list[Future] | list[str]:
        if self.workers <= 1 or all(kept(self.enricher, row) for row in rows):
            return [decide_rows(self.enricher, rows)]
        if self.pool is None:
            self.pool = prefork.take(self.enricher.threshold, self.enricher.detector is not None, self.workers)
            if self.pool is None:
                self.pool = fork_scorers(self.enricher, self.workers)
        size = task_size(len(rows), self.workers)  # a task per worker or more (the writer scores nothing)
        try:
            return [
                self.pool.submit(decide_in_worker, rows[k : k + size]) for k in range(0, len(rows), size)
            ]  # fmt: skip
        except (BrokenExecutor, RuntimeError) as exc:  # the pool is gone: the rest is scored here
            log.warning("scoring workers unavailable (%s); scoring in the main process", exc)
            self.workers = 0
            return [decide_rows(self.enricher, rows)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        prefork.release()  # the workers etl.py forked as it started, when no batch needed them


def _collect(enricher: SentimentEnricher, rows: list[tuple], pending: list[Future] | list[str]) -> list[str]:
    """The decided parts of a batch; scored here when a worker died (killed, out of memory), as ahead.py does."""
    try:
        return [part.result() if isinstance(part, Future) else part for part in pending]
    except (BrokenExecutor, OSError) as exc:
        log.warning("scoring worker failed (%s); this batch is scored in the main process", exc)
        return [decide_rows(enricher, rows)]


def reenrich(
    db: Database,
    enricher: SentimentEnricher,
    stats: RunStats,
    *,
    platform: str | None = None,
    since: datetime | None = None,
    batch_size: int = 2000,
    should_stop: Callable[[], bool] = lambda: False,
    workers: int | None = None,
) -> None:
    """Score every stored post not yet scored by this enricher version; rewrite those whose result changed and
    stamp the others with the version (so that no later reenrich reads them again).

    Rows are read through a server-side cursor on a connection of their own (memory stays flat for millions
    of rows) and the changes are written and committed a batch at a time on the main connection, so an
    interrupted re-enrichment keeps what it did and the next one carries on from there.

    Captions are scored by `workers` processes (default: one per core; forked as etl.py starts, etl/prefork.py)
    while the earlier batches are written (by _Writer's thread): up to _AHEAD + 1 batches are read and handed to
    them, one more waits for the writer and one is being written, so at most _AHEAD + 3 batches are in memory at a
    time. Small batches keep the first write and the last one (which nothing else overlaps) short.
    Rows whose stored decision was made by the same scorer and language detector (SENTIMENT_THRESHOLD alone
    changed) are only labelled again (kept()).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    reader = db.connect()
    try:
        scorers = _Scorers(enricher, workers)
        try:
            _reenrich(db, reader, scorers, enricher, stats, platform, since, batch_size, should_stop)
        finally:
            scorers.close()
    finally:
        reader.close()


def _reenrich(
    db: Database, reader: Any, scorers: _Scorers, enricher: SentimentEnricher, stats: RunStats,
    platform: str | None, since: datetime | None, batch_size: int, should_stop: Callable[[], bool],
) -> None:  # fmt: skip
    writer = _Writer(db, enricher, stats, should_stop)
    try:
        with unscored_posts(reader, platform, since, enricher.version, batch_size) as scan:
            ahead: deque[tuple[list[tuple], list[Future] | list[str]]] = deque()
            reading = True
            while (reading or ahead) and not writer.stopped:
                if reading:
                    rows = scan.fetchmany(batch_size)
                    reading = bool(rows)
                    if rows:
                        ahead.append((rows, scorers.submit(rows)))
                if ahead and (not reading or len(ahead) > _AHEAD):
                    rows, pending = ahead.popleft()
                    writer.put(rows, _collect(enricher, rows, pending))
    except BaseException:
        writer.close(raise_error=False)  # the error going on is this one: the writer's, if any, is logged
        raise
    writer.close()


class _Writer:
    """Writes the decided batches on the main connection, one after another, in a thread of its own: the database
    (what a re-enrichment waits for most) is never idle while the next batch is read or collected. After each
    batch, should_stop(); once it is true, or a write failed, the batches still queued are dropped (not written:
    the next reenrich reads them again) and close() raises the failure."""

    def __init__(self, db: Database, enricher: SentimentEnricher, stats: RunStats, should_stop: Callable[[], bool]):
        self.db, self.enricher, self.stats, self.should_stop = db, enricher, stats, should_stop
        self.queue: queue.Queue[tuple[list[tuple], list[str]] | None] = queue.Queue(maxsize=1)
        self.stopped = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def put(self, rows: list[tuple], parts: list[str]) -> None:
        if self.thread is None:  # started with the first batch decided: after the workers' fork, as a rule
            self.thread = threading.Thread(target=self._run, name="reenrich-writer", daemon=True)
            self.thread.start()
        self.queue.put((rows, parts))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.stopped:
                continue  # dropped: the producer is told by self.stopped and puts at most one more
            try:
                with FORKING.working():  # no scoring worker is forked while this thread is inside libpq (etl/ahead.py)
                    _write(self.db, self.enricher, self.stats, *item)
                if self.should_stop():
                    self.stats.interrupted = True
                    self.stopped = True
            except BaseException as exc:  # raised again in the caller's thread by close()
                self.error = exc
                self.stopped = True

    def close(self, *, raise_error: bool = True) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            if raise_error:
                raise self.error
            log.warning("writing the re-enriched rows failed too: %s", self.error)


def _write(db: Database, enricher: SentimentEnricher, stats: RunStats, rows: list[tuple], parts: list[str]) -> None:
    with db.transaction() as cur:
        applied = write_decisions(cur, parts, enricher.version, [row[0] for row in rows])
    # Counted once committed, from what was written: a decision dropped because a run changed the post meanwhile
    # is neither changed nor unchanged (the next reenrich reads the row again if its version is not this one).
    written = 0
    for changed, label, count in applied:
        written += count
        if changed:
            stats.updated += count
        else:
            stats.unchanged += count
        stats.sentiment[label or "unscored"] += count
    stats.fetched += len(rows)
    if written < len(rows):
        log.info("%d post(s) changed by a run while reenrich scored them: left as the run wrote them", len(rows) - written)
    log.info("re-enriched %d posts so far, %d changed", stats.fetched, stats.updated)
