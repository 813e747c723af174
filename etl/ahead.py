"""Scoring ahead: a batch's captions decided by worker processes while the batch before it loads (issue 16).

A run hands the archiver its posts a batch at a time; the archiver looks up what is stored, scores the new
captions, and loads. Scoring is the largest share of a metadata run's CPU and loading mostly waits for
PostgreSQL, so here each batch is sent to forked workers as soon as it is read and handed on one batch later,
its decisions waiting in the enricher (SentimentEnricher.ahead). Decisions are keyed by what decides them
(the caption as stored and the platform's language), so they can only be used for the caption they belong to.
Only worth it while most captions are new: a rerun, whose captions keep their stored scores, stays in-process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from etl.enrich import SentimentEnricher
from etl.records import Post, Sentiment, cap_caption

if TYPE_CHECKING:  # multiprocessing is imported only when workers are forked (a rerun never needs it)
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)

MIN_BATCH = 64  # smaller batches are scored in-process: the round trip to a worker would cost more
# Workers forked cold each load their own lexicon and language model (shared with nobody: a worker's peak RSS was 82-85
# MB in the benchmark): no more than two. Between them they decide about 65,000 captions/s (a first load's worker:
# 20,000 in 0.6 CPU s), more than the main process reads, parses and loads (about 25,000 posts/s at 1,000,000).
MAX_COLD_WORKERS = 2
# Captions per task: language detection walks a task's captions together, grouped by length, and longer groups cost
# less (20,000 captions: 0.265 CPU s in tasks of 250, 0.224 in tasks of 1,000); fewer when a batch would then keep
# some workers idle (task_size). The chunks no worker has begun when their batch is due are decided in-process.
_CHUNK = 1000
_MIN_CHUNK = 250


def task_size(count: int, parts: int) -> int:
    """Captions (or rows) per task for a batch of `count` that should give `parts` tasks or more: at most _CHUNK,
    at least _MIN_CHUNK."""
    return max(_MIN_CHUNK, min(_CHUNK, -(-count // max(parts, 1))))


Held = tuple[list[Post], list[tuple], list[Future], int]  # a batch, its items, their tasks, and the task size
_worker_enricher: SentimentEnricher | None = None


def _init_worker(enricher: SentimentEnricher) -> None:
    adopt_enricher(enricher)
    _end_with_parent()
    enricher.warm()  # nothing to do when forked warm


def adopt_enricher(enricher: SentimentEnricher) -> None:
    """Makes `enricher` this worker process's (worker_enricher())."""
    global _worker_enricher
    _worker_enricher = enricher


PARENT_CHECK_SECONDS = 1.0


def _end_with_parent() -> None:
    """End this worker once the process that forked it is gone. A parent killed outright (SIGKILL, the OOM killer)
    closes nothing: the worker, which holds a write end of its own task queue (inherited at the fork), would wait
    for a task forever, with its memory and the model's mapped pages; a cron job killed every 6 hours would leave
    two more each time. Orphaned, the worker is adopted by another process, so its parent pid changes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ForkGate:
    """Keeps forks and C libraries apart: threads that work inside a C library (the archiver's loader threads and
    reenrich's writer, in libpq) hold it shared, any number at a time; the scoring workers are forked holding it
    alone. A fork copies no lock such a thread holds at that moment. A fork waits for the work under way (whole
    loads) and keeps new work out until it is done; the workers are forked once a run."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside: dict[int, int] = {}  # threads working inside a C library (by thread id): how deep
        self._forks = 0  # forks waiting for the gate or forking

    @contextmanager
    def working(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while self._forks:
                self._cond.wait()
            self._inside[me] = self._inside.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                if self._inside[me] == 1:
                    del self._inside[me]
                else:
                    self._inside[me] -= 1
                self._cond.notify_all()

    @contextmanager
    def forking(self) -> Iterator[None]:
        with self._cond:
            self._forks += 1
            try:
                while self._inside:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting (Ctrl-C): the work kept out goes on
                self._forks -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._forks -= 1
                self._cond.notify_all()

    def busy(self) -> bool:
        """Whether any thread is working inside a C library now."""
        with self._cond:
            return bool(self._inside)

    def held_here(self) -> bool:
        """Whether this thread is working inside a C library now (holds the gate shared)."""
        with self._cond:
            return threading.get_ident() in self._inside


FORKING = ForkGate()


def fork_scorers(enricher: SentimentEnricher, workers: int, *, warm: bool = True) -> ProcessPoolExecutor:
    """`workers` processes forked with the enricher itself (not pickled; worker_enricher() in them). `warm`: its
    lexicon and language model are loaded first and shared copy-on-write; else each worker loads them as it
    starts, while this process goes on (it need never load them). A forked child never closes the parent's
    connections (it ends with os._exit), and it is given no work that touches them."""
    if warm:
        enricher.warm()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with FORKING.forking():
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker, initargs=(enricher,)
        )
        for _ in range(workers):  # the executor forks in submit(): every worker now, under the lock
            pool.submit(os.getpid)
    return pool


class EarlyScorers:
    """Scoring workers forked before the archiver asks for them: a run that creates its archive (the database held
    none) will score every caption it reads, so its workers are forked cold when that is known, and load the
    lexicon and the language model while the schema is made. The first score_ahead() takes them; whatever no
    archiving took ends with the block."""

    def __init__(self, enricher: SentimentEnricher, workers: int | None = None):
        self.enricher = enricher
        self.workers = min(MAX_COLD_WORKERS, default_workers() if workers is None else workers)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None and self.workers > 0:
            try:
                self._pool = fork_scorers(self.enricher, self.workers, warm=False)
            except Exception as exc:  # no fork: score_ahead() forks them as it would have, or scores in-process
                log.warning("scoring workers not started early (%s)", exc)

    def started(self) -> bool:
        """Whether workers were forked early and no stream has taken them yet."""
        return self._pool is not None

    def take(self) -> ProcessPoolExecutor | None:
        pool, self._pool = self._pool, None
        return pool

    def __enter__(self) -> EarlyScorers:
        return self

    def __exit__(self, *_: object) -> None:
        if (pool := self.take()) is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Scoring workers: one per core but the one the main process uses."""
    return max(1, (os.cpu_count() or 1) - 1)


def worker_enricher() -> SentimentEnricher:
    """The enricher of a process started by fork_scorers()."""
    assert _worker_enricher is not None
    return _worker_enricher


def _decide(items: list[tuple[str | None, str | None]]) -> list[tuple]:
    """Decisions with each score as a plain tuple: a quarter of the cost of pickling Sentiment objects."""
    return [
        ((s.polarity, s.subjectivity, s.label) if s else None, *rest)
        for s, *rest in worker_enricher().decide_captions(items)
    ]


def score_ahead(
    enricher: SentimentEnricher,
    batches: Iterable[list[Post]],
    *,
    workers: int | None = None,
    in_process: Callable[[list[Post]], bool] | None = None,
    unscored: Callable[[list[Post]], bool] | None = None,
    early: EarlyScorers | None = None,
) -> Iterator[list[Post]]:
    """The batches, unchanged and in order, one behind the stream: a batch is sent to the scoring workers when
    it is read and handed on when the next one has been read (or the stream ended). When the stream fails, the
    batch held back is handed on first, then the error goes on (nothing read is lost).

    The first batch is handed on as soon as it is read, scored in-process: what it holds (new captions, or
    captions with stored decisions) tells whether the next one is worth sending to the workers. Unless
    `unscored(first batch)` says most of its captions have no stored decision (a first load): then it is sent
    too, to workers forked before this process loads the lexicon and the language model. Each worker loads
    them as it starts, while this process reads on, and this process never needs them.

    A batch for which `in_process(batch)` is true is handed on as soon as it is read (after the one held back):
    on an images run the downloads keep the cores busy, the captions are scored while the image hosts answer,
    and the first downloads start without waiting for the workers' fork and model load. It is scored here,
    unless workers were forked `early` (a new archive's): they decide it while its images download, and the
    enricher collects their decisions when it needs them (SentimentEnricher.later), so this process loads no
    model then either. They are taken when the first batch is sent, used and shut down as if forked here.

    Workers forked cold are MAX_COLD_WORKERS at most."""
    cold = early is not None and early.started()  # workers forked early (cold) are at hand
    workers = early.workers if cold and early is not None else default_workers() if workers is None else workers
    pool: ProcessPoolExecutor | None = None
    held: Held | None = None
    fresh = False  # the first batch was sent to the workers (most of its captions had no stored decision)

    def hand_on(sent: Held) -> list[Post]:
        nonlocal workers
        batch, decided = _hand_on(enricher, sent)
        if not decided:
            workers = 0  # the batches after it are scored here too (not sent, then scored again)
        return batch

    def worth(batch: list[Post]) -> bool:
        """Whether the workers should take the batch: there are workers (none after one failed), and the batch is
        not so small that a worker costs more than it saves, unless they have the models and this process has not."""
        return workers > 0 and (len(batch) >= MIN_BATCH or (cold and not enricher.warmed()))

    def send(batch: list[Post], warm: bool) -> Held:
        """The batch's captions sent to the workers (forked now if need be); not sent when they cannot take it."""
        nonlocal pool, workers
        try:
            if pool is None and early is not None:
                pool = early.take()
            if pool is None:
                if not warm:
                    workers = min(workers, MAX_COLD_WORKERS)
                pool = fork_scorers(enricher, workers, warm=warm)
            items = [enricher.item(cap_caption(p)) for p in batch]
            # The workers, and this process taking back when it has the models loaded.
            size = task_size(len(items), workers + enricher.warmed())
            return batch, items, [pool.submit(_decide, items[k : k + size]) for k in range(0, len(items), size)], size
        except Exception as exc:  # no fork, the pool gone, a post it cannot take: scored in-process
            log.warning("scoring workers unavailable (%s); scoring in the main process", exc)
            workers = 0
            return batch, [], [], 0

    try:
        try:
            for number, batch in enumerate(batches):
                enricher.later = None  # the batch before had its decisions collected, or needed none
                if in_process is not None and in_process(batch):
                    if held is not None:
                        earlier, held = hand_on(held), None
                        yield earlier
                    if cold and worth(batch):
                        enricher.later = partial(hand_on, send(batch, warm=False))
                    yield batch
                    continue
                if number == 0:
                    fresh = worth(batch) and unscored is not None and unscored(batch)
                    if not fresh:
                        yield batch
                        continue
                sent: Held = (batch, [], [], 0)
                # Until the first batch has been handed on (and scored), what `unscored` found stands for it.
                if worth(batch) and ((fresh and number <= 1) or enricher.mostly_new()):
                    sent = send(batch, warm=not fresh)
                if held is not None:
                    yield hand_on(held)
                held = sent
        except Exception:  # not GeneratorExit: a consumer that stops early closes us, and the pool must go
            if held is not None:
                batch, held = hand_on(held), None
                yield batch
            raise
        if held is not None:
            batch, held = hand_on(held), None
            yield batch
    finally:
        enricher.later = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _hand_on(enricher: SentimentEnricher, held: Held) -> tuple[list[Post], bool]:
    """The batch, its workers' decisions put where the enricher finds them; and False when they failed (the
    batch is then scored in-process, none of its decisions used).

    The chunks no worker has taken yet are taken back and decided here, while the workers finish theirs: the
    main thread reaches a batch when it has read the next one, and whatever the workers have not begun by then
    would otherwise keep it waiting (one worker on two cores decides more slowly than the main thread reads).
    Only when this process has the models loaded: loading them here (0.1 CPU s) costs more than the wait."""
    batch, items, futures, size = held
    enricher.ahead.clear()
    if futures:
        back = range(len(futures) - 1, -1, -1) if enricher.warmed() else ()  # the last chunks first
        taken = [n for n in back if futures[n].cancel()]
        try:
            own = {n: enricher.decide_captions(items[n * size : (n + 1) * size]) for n in sorted(taken)}
            decisions = []
            for n, future in enumerate(futures):  # the workers' chunks, finished meanwhile or waited for
                decisions += (
                    own[n] if n in own else [(Sentiment(*s) if s else None, *rest) for s, *rest in future.result()]
                )
            decided = dict(zip(items, decisions, strict=True))  # whole, or not used at all
        except Exception as exc:  # a worker died (killed, out of memory) or failed: the batch is scored here
            log.warning("scoring worker failed (%s); this batch and the rest are scored in the main process", exc)
            return batch, False
        enricher.ahead.update(decided)
    return batch, True
