"""The run as a whole: services, locks, the ledger around it, and each source walked by a strategy.

`Incremental` reads each stream from its watermark and saves its state once complete; `Backfill` walks a
date range in chunks and records the chunks done; `DryRun` reads what the sources offer through the same
archiver with nothing looked up or written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from etl.ahead import EarlyScorers
from etl.config import Settings
from etl.copystore import refuse_if_elsewhere
from etl.db import Database, Ledger, StreamState
from etl.db.ledger import LockWatch, release_locks
from etl.enrich import SentimentEnricher
from etl.errors import ConfigError, ETLError, LoadError, LockedError, LocksLost, SourceError, StoreError, UsageError
from etl.logs import RedactingFilter
from etl.metrics import write_run_metrics
from etl.progress import LiveCounts
from etl.records import Post
from etl.resume import ResumePoint, ResumeTracker
from etl.run.archiver import Archiver
from etl.run.services import build_sources, open_services
from etl.run.stats import RunStats
from etl.shards import Shard, Unit, units_of
from etl.sources import FetchWindow, Source
from etl.store import ObjectStore

log = logging.getLogger(__name__)


class Interrupted(ETLError):
    """SIGTERM (or Ctrl-C) asked the run to stop; what was in flight was loaded first."""


@dataclass
class RunRequest:
    """What the command line asked for."""

    mode: str = "run"  # run | backfill
    sources: Sequence[str] = ()
    limit: int | None = None
    dry_run: bool = False
    since: datetime | None = None  # backfill range [since, until)
    until: datetime | None = None
    chunk: timedelta = timedelta(days=1)
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"jsonl": {"input": "-"}}
    arguments: dict[str, Any] = field(default_factory=dict)  # recorded in etl_runs
    shard: Shard | None = None  # only the units (streams) of shard K/N, and part K/N of the failed images
    chunk_index: int | None = None  # a backfill: only this chunk (0-based), for one worker of many
    retry_images: bool = True  # a run retries failed images of earlier runs first


def state_key(source: Source, unit: Unit) -> str:
    """The etl_state / etl_backfill_chunks key of a unit: per stream, or the source's configuration key."""
    return f"stream:{unit.stream}" if unit.stream else source.config_key()


def backfill_chunks(since: datetime, until: datetime, chunk: timedelta) -> list[tuple[datetime, datetime]]:
    """[since, until) cut into consecutive chunks, oldest first; the last may be shorter."""
    chunks = []
    start = since
    while start < until:
        end = min(start + chunk, until)
        chunks.append((start, end))
        start = end
    return chunks


Progress = Callable[[int, int, RunStats], None]  # (chunks done, chunks in all, stats so far)


class Runner:
    """One run of the archiver: locks, ledger, sources in turn (each walked by the request's strategy),
    failed-image retries."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database | None = None,
        store: ObjectStore | None = None,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
    ):
        self.settings = settings
        self.db = db
        self.store = store
        self.stop = stop or threading.Event()  # set by the SIGTERM handler
        self.progress = progress
        self.live = LiveCounts()  # read by the progress display while the run goes on
        self.run_id: int | None = None
        self.ledger: Ledger | None = None
        self.state: StreamState | None = None
        self.watch: LockWatch | None = None  # the run's locks, while it holds them

    def close(self) -> None:
        """Close the database connection this runner opened (an orchestrator's worker runs many tasks)."""
        if self.db is not None:
            self.db.close()

    def execute(self, request: RunRequest) -> RunStats:
        stats = RunStats()
        if request.dry_run:
            self._dry_run(request, stats)
            return stats
        # Every source's settings and arguments are checked before any work, by building them once without the
        # database; they are built for the run once the database is open.
        build_sources(self.settings, request)
        strategy = Backfill(self, request) if request.mode == "backfill" else Incremental(self, request)
        enricher = SentimentEnricher(self.settings.sentiment_threshold, detect_language=self.settings.detect_language)
        # A run that creates its archive scores every caption it reads: its scoring workers start with the schema.
        with EarlyScorers(enricher) as early:
            self.db, self.store = open_services(self.settings, db=self.db, store=self.store, on_new_archive=early.start)
            self._archive(request, stats, strategy, Archiver(
                self.settings, self.db, self.store, stop=self.stop, enricher=enricher, scorers=early,
            ))  # fmt: skip
        return stats

    def _archive(self, request: RunRequest, stats: RunStats, strategy: Strategy, archiver: Archiver) -> None:
        """The run's units, each under its lock and recorded in the ledger, archived one source after another."""
        self.ledger, self.state = Ledger(self.db), StreamState(self.db)
        refuse_if_elsewhere(self.db, self.store, self.settings)  # images in another store: copy-store first
        sources = build_sources(self.settings, request, db=self.db)
        for source in sources:
            source.should_stop = self.stop.is_set
        units = [(s, u) for s in sources for u in units_of(s) if request.shard is None or request.shard.owns(u.name)]
        locks = {u.name: strategy.lock_name(u) for _, u in units}
        # The failed images of earlier runs (this shard's part of them) have a lock of their own: two runs never
        # retry the same ones at once, and a run that retries only them (a retry part) is live to `status`.
        retry = f"failed images {request.shard or 'all'}" if request.mode == "run" and request.retry_images else None
        with self._locked(list(locks.values()), stats, retry) as locked:
            active = [(s, u) for s, u in units if locks[u.name] not in locked]
            retrying = retry is not None and retry not in locked
            held = [locks[u.name] for _, u in active] + ([retry] if retrying else [])
            with self._recorded(request, active, held, locked, stats):
                archiver.live, archiver.fence = self.live, self.fence
                if retrying:
                    archiver.retry_failed_images(stats, part=request.shard)
                for source in sources:
                    mine = [u for s, u in active if s is source]
                    if mine:
                        self.check_stop()
                        self._walk(strategy, archiver, source, mine, stats)

    def _dry_run(self, request: RunRequest, stats: RunStats) -> None:
        """The same archiver with no database and no store: sources are read and scored, nothing is written."""
        archiver = Archiver(self.settings, None, None, stop=self.stop)
        archiver.live = self.live
        strategy = DryRun(self, request)
        try:
            for source in build_sources(self.settings, request):
                self._walk(strategy, archiver, source, units_of(source), stats)
        except Interrupted:
            stats.interrupted = True
            stats.error("interrupted: the dry run was asked to stop")
        stats.seconds = time.monotonic() - stats.started

    @contextmanager
    def _locked(self, names: list[str], stats: RunStats, retry: str | None = None) -> Iterator[list[str]]:
        """Hold the lock of every unit no other run holds, and of the failed-image retries (`retry`), for the
        block; yields the locks another run holds (skipped: that run does them). LockedError when another run holds
        all the units (or, for a run of retries only, the retries')."""
        assert self.ledger is not None
        wanted = [*names, *([retry] if retry else [])]
        lock, locked = self.ledger.lock_units(wanted)
        watch = None
        try:
            units_locked = [name for name in locked if name != retry]
            if (units_locked and len(units_locked) == len(names)) or (not names and locked):
                holder = self.ledger.holder(locked[0])
                raise LockedError(f"{', '.join(locked)}: being archived by another run{holder}; nothing done")
            stats.locked_streams = units_locked
            for name in units_locked:
                log.warning("%s is being archived by another run: skipped (that run archives it)", name)
            if retry in locked:
                log.info("%s: retried by another run now, not by this one", retry)
            # Their connection watched: lost, the locks are taken again, or the run stops (as on SIGTERM).
            watch = self.watch = LockWatch(
                self.ledger, lock, [n for n in wanted if n not in locked], on_lost=lambda why: self.stop.set(),
                run_id=lambda: self.run_id,
            )
            yield locked
        finally:
            self.watch = None
            if watch is not None:
                watch.release()
            else:
                release_locks(lock)

    @contextmanager
    def _recorded(
        self, request: RunRequest, active: list[tuple[Source, Unit]], held: list[str], locked: list[str], stats: RunStats
    ) -> Iterator[None]:
        """The run's etl_runs row around the block (`held`: the locks it holds, its units): started, then finished
        with its status and counts (and the metrics file written). An interruption ends the block, recorded as
        such; any other error goes on."""
        assert self.ledger is not None
        names = list(dict.fromkeys(s.name for s, _ in active))
        arguments = {**request.arguments, **({"locked": locked} if locked else {})}
        redact = RedactingFilter(self.settings.secrets()).redact
        completed = False
        try:
            # We hold the locks of these units: a run still marked running that held one of them is dead (marked
            # abandoned by the statement that records this run).
            with self.ledger.recording(
                request.mode, names, arguments, stats, units=held, redact=redact, abandon=held
            ) as run_id:
                self.run_id = run_id
                log.info("run %d started: %s of %s", run_id, request.mode, ", ".join(names) or "failed images only")
                try:
                    yield
                    if self.watch is not None:
                        self.watch.confirm()  # its locks held to the end, or LocksLost
                except (Interrupted, KeyboardInterrupt):
                    stats.interrupted = True
                    stats.error("interrupted: the run was asked to stop; the rest is archived by the next run")
                except LocksLost as exc:  # stopped as on SIGTERM, nothing written after it was noticed
                    stats.locks_lost(f"interrupted: {exc}")
                except LoadError as exc:
                    stats.error(str(exc))
                    raise
                finally:
                    stats.seconds = time.monotonic() - stats.started
                completed = True
        finally:
            self._write_metrics(request.mode, stats.status if completed else "failed", stats)

    def _write_metrics(self, mode: str, status: str, stats: RunStats) -> None:
        """The metrics file (ETL_METRICS_PATH), if set; checked at start, so a full disk is logged and does not
        hide the summary."""
        if self.settings.metrics_path:
            try:
                write_run_metrics(self.settings.metrics_path, mode, status, stats)
            except OSError as exc:
                log.error("ETL_METRICS_PATH=%s could not be written: %s", self.settings.metrics_path, exc)

    def _walk(self, strategy: Strategy, archiver: Archiver, source: Source, units: list[Unit], stats: RunStats) -> None:
        """One source, opened for the strategy's walk over its units; then deletions at source, its counts."""
        before = stats.snapshot()
        completed = False
        try:
            with source:
                completed = strategy.walk(archiver, source, units, stats)
                strategy.after(source, stats)
        finally:
            self._apply_gone(source, stats)
            self._account(source, stats, before, completed)

    def check_stop(self) -> None:
        """Interrupted when a stop was requested (SIGTERM); LocksLost when the run's locks are gone."""
        self.fence()
        if self.stop.is_set():
            raise Interrupted("stop requested")

    def fence(self) -> None:
        """Before a write: LocksLost once the run's locks are gone (LockWatch), waiting while they are taken again."""
        if self.watch is not None:
            self.watch.fence()

    def _stoppable(self, posts: Iterable[Post]) -> Iterator[Post]:
        """Ends the stream when a stop is requested; the batches already fetched are still loaded."""
        for post in posts:
            yield post
            if self.stop.is_set():
                return

    def archive_window(
        self, archiver: Archiver, source: Source, window: FetchWindow, stats: RunStats, tracker: ResumeTracker
    ) -> bool:
        """Archive what the source yields for a window; True when it was read to its end (the tracker skips
        what a cut run loaded and applies the limit). A source that fails ends itself, not the run."""
        try:
            posts = self._stoppable(tracker(_from_source(source, window)))
            archiver.archive(posts, stats, source=source.name, trusted=source.trusted_hosts)
        except SourceError as exc:
            stats.source_failures += 1
            stats.error(f"{source.name}: {exc}")
            log.error("source %s stopped: %s", source.name, exc)
            return False
        except (LoadError, ConfigError, LocksLost):
            raise
        except Exception as exc:  # a bug ends that source, not the run
            stats.source_failures += 1
            if getattr(exc, "raised_by_source", False):
                stats.error(f"{source.name}: failed unexpectedly: {type(exc).__name__}: {exc}")
                log.exception("source %s failed unexpectedly", source.name)
                return False
            # The archiver's own failure (looking up, scoring or loading posts it read): those posts may not be
            # loaded, so no resume point may say they are (the tracker saw them); the next run reads them again.
            tracker.broken = True
            stats.error(
                f"{source.name}: archiving its posts failed unexpectedly: {type(exc).__name__}: {exc}; the next run "
                "reads this window again"
            )
            log.exception("archiving the posts of %s failed unexpectedly; no resume point saved", source.name)
            return False
        self.check_stop()
        return True

    def recheck(self, source: Source, request: RunRequest, stats: RunStats) -> None:
        """Ask the platform about a bounded slice of the held posts (ETL_RECHECK_POSTS); in a sharded run, only
        the shard that owns the source's first unit does it."""
        if not source.can_recheck or self.db is None or self.stop.is_set():
            return
        if request.shard is not None and not request.shard.owns(units_of(source)[0].name):
            return
        from etl.recheck import recheck_source

        try:
            self.fence()  # the re-check writes (deletions at source): not without the run's locks
        except LocksLost:
            return
        source.only_stream = None  # the re-check is the source's, not one stream's
        asked, error = recheck_source(self.db, source, self.settings.recheck_posts)
        stats.rechecked += asked
        source.rechecked += asked
        if error:
            stats.error(error)
            stats.source_failures += 1

    def _apply_gone(self, source: Source, stats: RunStats) -> None:
        """Posts the platform said are gone: marked or forgotten (ETL_DELETED_AT_SOURCE), those we hold only."""
        if not source.gone or self.db is None:
            return
        try:
            self.fence()  # waits while the locks are being taken again
        except LocksLost:
            return  # (the run's locks lost: the next run is told of them again)
        from etl.forget import apply_gone

        try:
            stats.deleted_at_source += apply_gone(self.db, self.store, self.settings, source.gone)
        except (StoreError, ETLError) as exc:
            stats.error(f"{source.name}: applying deletions at source: {exc}")
            stats.source_failures += 1
        source.gone = []

    @staticmethod
    def _account(source: Source, stats: RunStats, before: dict[str, int], completed: bool) -> None:
        stats.take_rejects(source)
        stats.quota_used += source.quota_used
        after = stats.snapshot()
        stats.per_source[source.name] = {
            **{k: after[k] - before[k] for k in after},
            "rejected": source.rejected,
            "quota_used": source.quota_used,
            "rechecked": source.rechecked,
            "completed": completed,
        }


# -- how a run walks a source's units ---------------------------------------------------------------


class Strategy:
    """How a run walks the units (streams) of one open source: which windows, what state it keeps."""

    def __init__(self, runner: Runner, request: RunRequest):
        self.runner = runner
        self.request = request

    def walk(self, archiver: Archiver, source: Source, units: list[Unit], stats: RunStats) -> bool:
        """Archive the source's units; True when every one was read to its end."""
        raise NotImplementedError

    def after(self, source: Source, stats: RunStats) -> None:
        """What follows the walk while the source is still open."""

    def lock_name(self, unit: Unit) -> str:
        """The advisory lock (and etl_runs unit) under which this run archives `unit`."""
        return unit.name


class DryRun(Strategy):
    """What the sources offer now (or in --since/--until), read and scored by the same archiver; no state."""

    def walk(self, archiver: Archiver, source: Source, units: list[Unit], stats: RunStats) -> bool:
        request = self.request
        window = FetchWindow(since=request.since, until=request.until, limit=request.limit)
        tracker = ResumeTracker(source, None, request.limit)
        return self.runner.archive_window(archiver, source, window, stats, tracker) and not tracker.limited


def _from_source(source: Source, window: FetchWindow) -> Iterator[Post]:
    """The source's posts for a window; an error the source raises is marked as its own, so that
    Runner.archive_window can tell it from the archiver's (which leaves no resume point)."""
    try:
        yield from source.fetch(window)
    except Exception as exc:
        with suppress(Exception):  # an exception that takes no attribute stays unmarked: treated as the archiver's
            exc.raised_by_source = True  # type: ignore[attr-defined]
        raise


class Incremental(Strategy):
    """Each stream from its watermark (minus ETL_OVERLAP_MINUTES), with its own state and resume point; the
    watermark moves only once a stream's window is loaded to its end. --limit is per source."""

    def walk(self, archiver: Archiver, source: Source, units: list[Unit], stats: RunStats) -> bool:
        completed = True
        passed = 0  # posts this source yielded so far (the limit is the source's, shared by its streams)
        limit = self.request.limit
        for unit in units:
            self.runner.check_stop()
            left = None if limit is None else limit - passed
            if left is not None and left <= 0:
                completed = False  # cut by the limit before this stream: its state stays as it is
                continue
            if unit.stream:
                source.restrict(unit.stream)
            done, n = self._unit(archiver, source, unit, left, stats)
            completed, passed = completed and done, passed + n
        return completed

    def after(self, source: Source, stats: RunStats) -> None:
        self.runner.recheck(source, self.request, stats)

    def _window(self, source: Source, unit: Unit, limit: int | None) -> tuple[FetchWindow, bool]:
        if not source.incremental:
            return FetchWindow(since=self.request.since, until=self.request.until, limit=limit), False
        state = self.runner.state
        assert state is not None
        legacy = source.config_key() if unit.stream else None
        watermark, cursor = state.window_state(source.name, state_key(source, unit), legacy)
        since = watermark - timedelta(minutes=self.runner.settings.overlap_minutes) if watermark else None
        return FetchWindow(since=since, cursor=cursor, limit=limit), True

    def _unit(
        self, archiver: Archiver, source: Source, unit: Unit, limit: int | None, stats: RunStats
    ) -> tuple[bool, int]:
        """One stream's window; (read to its end, posts yielded). The watermark moves only when complete."""
        state = self.runner.state
        assert state is not None
        key = state_key(source, unit)
        window, incremental = self._window(source, unit, limit)
        resume = ResumePoint.from_json(state.get_resume(source.name, key)) if incremental else None
        if resume is not None:
            log.info("%s: an earlier run was cut short; filling the gap below what it loaded first", unit.name)
            window = replace(window, limit=None)  # posts skipped as loaded must not use up the source's own limit
        tracker = ResumeTracker(source, resume, limit)
        source.cursor = {}
        try:
            completed = self.runner.archive_window(archiver, source, window, stats, tracker) and not tracker.limited
        except Interrupted:
            if incremental:
                self._save_cut(source, key, tracker, "stopped")
            raise
        if incremental and completed:
            # Only now is every post of the window loaded; the watermark never moves back (StreamState.save_state).
            self.runner.fence()
            state.save_state(source.name, key, tracker.watermark(), source.cursor)
        elif incremental and not tracker.broken:
            self._save_cut(source, key, tracker, "cut short by --limit" if tracker.limited else "stopped early")
        return completed, tracker.passed

    def _save_cut(self, source: Source, key: str, tracker: ResumeTracker, why: str) -> None:
        """A window not read to its end: the watermark stays, the resume point records what was loaded."""
        assert self.runner.state is not None
        self.runner.fence()
        self.runner.state.save_resume(source.name, key, tracker.cut_point().to_json())
        log.info(
            "%s: run %s after %d post(s); the watermark stays, the next run goes on below them",
            source.name, why, tracker.passed,
        )  # fmt: skip


class Backfill(Strategy):
    """[since, until) in chunks, oldest first, each stream of the source in turn, skipping what an earlier
    backfill finished; with `chunk_index`, that one chunk only (one worker of many).

    The incremental watermark is never touched: a backfill fills the past, the cron run owns the present.
    """

    def __init__(self, runner: Runner, request: RunRequest):
        super().__init__(runner, request)
        assert request.since is not None
        self.until = request.until or datetime.now(timezone.utc)
        self.chunks = backfill_chunks(request.since, self.until, request.chunk)
        self.picked = list(enumerate(self.chunks, start=1))
        if request.chunk_index is not None:
            if not 0 <= request.chunk_index < len(self.chunks):
                raise UsageError(
                    f"--chunk-index {request.chunk_index}: this backfill has chunks 0 to {len(self.chunks) - 1}"
                )
            self.picked = [self.picked[request.chunk_index]]

    def lock_name(self, unit: Unit) -> str:
        """One chunk (a worker's share, --chunk-index) locks its unit for that chunk only: chunks of a backfill run
        at once on several workers (they were refused as "being archived", and the DAG skipped them). A backfill
        of every chunk locks the unit, as a run does."""
        if self.request.chunk_index is None:
            return unit.name
        start, end = self.picked[0][1]
        return f"{unit.name} backfill {start.isoformat()}..{end.isoformat()}"

    def walk(self, archiver: Archiver, source: Source, units: list[Unit], stats: RunStats) -> bool:
        runner, request = self.runner, self.request
        assert runner.ledger is not None and request.since is not None
        runner.live.chunks_total += len(self.picked)
        done = {unit.name: self._finished(source, unit) for unit in units}
        for n, (start, end) in self.picked:
            for unit in units:
                if (start, end) in done[unit.name]:
                    log.info("backfill %s: chunk %s..%s already done", unit.name, start, end)
                    continue
                if unit.stream:
                    source.restrict(unit.stream)
                fetched = stats.fetched
                window = FetchWindow(since=start, until=end, limit=request.limit)
                tracker = ResumeTracker(source, None, request.limit)
                if not runner.archive_window(archiver, source, window, stats, tracker) or tracker.limited:
                    return False  # quota or rate limit: the next backfill resumes from this chunk
                runner.fence()
                runner.ledger.finish_chunk(
                    source.name, state_key(source, unit), start, end, stats.fetched - fetched, runner.run_id
                )
            runner.live.chunks_done += 1
            if runner.progress:
                runner.progress(n, len(self.chunks), stats)
        return True

    def _finished(self, source: Source, unit: Unit) -> set:
        ledger, since = self.runner.ledger, self.request.since
        assert ledger is not None and since is not None
        done = ledger.finished_chunks(source.name, state_key(source, unit), since, self.until)
        if unit.stream:  # chunks a backfill finished before state was kept per stream
            done |= ledger.finished_chunks(source.name, source.config_key(), since, self.until)
        return done


__all__ = ["Backfill", "DryRun", "Incremental", "Interrupted", "RunRequest", "Runner", "backfill_chunks", "state_key"]
