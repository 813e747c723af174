"""Progress of a long run: a live bar on a terminal (tqdm), a log line every ETL_PROGRESS_SECONDS under cron."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from etl.logs import console_handler

log = logging.getLogger(__name__)


class LiveCounts:
    """What is happening right now, updated from the fetch loop and the image workers (thread-safe).

    RunStats counts what is committed; these count what is under way, for the progress display only.
    """

    def __init__(self) -> None:
        self.fetched = 0
        self.images_in_flight = 0
        self.images_stored = 0
        self.images_failed = 0
        self.chunks_done = 0
        self.chunks_total = 0
        self._lock = threading.Lock()

    def counting(self, posts: Iterable[Any]) -> Iterator[Any]:
        for post in posts:
            self.fetched += 1  # only the fetching thread writes it
            yield post

    def image_started(self) -> None:
        with self._lock:
            self.images_in_flight += 1

    def image_done(self, stored: bool) -> None:
        with self._lock:
            self.images_in_flight -= 1
            if stored:
                self.images_stored += 1
            else:
                self.images_failed += 1


def describe(live: LiveCounts, elapsed: float) -> str:
    """`1,200 posts fetched (400/s), images 310 stored, 32 in flight, 2 failed, 3s elapsed`."""
    rate = live.fetched / elapsed if elapsed > 0 else 0.0
    chunks = f"chunk {live.chunks_done}/{live.chunks_total}, " if live.chunks_total else ""
    return (
        f"{chunks}{live.fetched:,} posts fetched ({rate:,.0f}/s), images {live.images_stored:,} stored, "
        f"{live.images_in_flight} in flight, {live.images_failed:,} failed, {elapsed:.0f}s elapsed"
    )


class ProgressReporter:
    """Watches a LiveCounts from a thread until closed.

    On a terminal: one tqdm line redrawn in place; log lines are written with the bar cleared first and the
    bar redrawn after them, so the two never share a line. Elsewhere (cron, a pipe): a progress log line
    every `interval` seconds, no bar (0 = none).
    """

    def __init__(self, live: LiveCounts, *, title: str, tty: bool, interval: float, stream: IO[str]):
        self.live = live
        self.title = title
        self.tty = tty
        self.interval = 0.25 if tty else interval
        self.stream = stream
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._handler = console_handler()

    def start(self) -> ProgressReporter:
        if self.interval <= 0:
            return self
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None, desc=self.title, unit=" posts", file=self.stream, dynamic_ncols=True, leave=False,
                bar_format="{desc}: {n_fmt} posts fetched [{elapsed}, {rate_fmt}]{postfix}",
            )  # fmt: skip
            if self._handler is not None:
                self._handler.pause = lambda: tqdm.external_write_mode(file=self.stream)
        self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.show()

    def show(self) -> None:
        live = self.live
        if self._bar is not None:
            chunks = f"chunk {live.chunks_done}/{live.chunks_total}, " if live.chunks_total else ""
            self._bar.n = live.fetched
            self._bar.set_postfix_str(
                f"{chunks}images {live.images_stored} stored, {live.images_in_flight} in flight, "
                f"{live.images_failed} failed",
                refresh=False,
            )
            self._bar.refresh()
        else:
            log.info("progress: %s: %s", self.title, describe(live, time.monotonic() - self.started))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            if self._handler is not None:
                self._handler.pause = None
            self._bar.close()  # leave=False: the line is cleared, the summary follows

    def __enter__(self) -> ProgressReporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

