"""The run: sources -> sentiment -> images (concurrently) -> one transaction per batch, and the run ledger."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

from etl import db as dbm
from etl.config import Settings
from etl.db import Database
from etl.enrich import SentimentEnricher
from etl.errors import ConfigError, ETLError, ExitCode, LoadError, MediaError, SourceError, StoreError
from etl.logs import RedactingFilter
from etl.media import Downloader
from etl.records import Media, Post, chunked
from etl.sources import FetchWindow, Source, source_class
from etl.store import ObjectStore, object_key, store_from_settings

log = logging.getLogger(__name__)
MAX_ERRORS_KEPT = 200


class StageClock:
    """Seconds spent per stage. Image workers add theirs from many threads at once, so their stages sum to
    more than the wall time: they show where the work went, not how long the run took."""

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
        return " ".join(f"{stage}={seconds:.2f}s" for stage, seconds in self.seconds.items())


@dataclass
class RunStats:
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
    quota_used: int = 0
    sentiment: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT of them
    error_count: int = 0
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_failures: int = 0
    interrupted: bool = False
    stages: StageClock = field(default_factory=StageClock)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

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
    def exit_code(self) -> ExitCode:
        failed = self.rejected or self.images_failed or self.source_failures or self.interrupted
        return ExitCode.PARTIAL if failed else ExitCode.OK

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "ok" if self.exit_code == ExitCode.OK else "partial"

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
            + (f" | stages {self.stages.line()}" if self.stages.seconds else "")
        )


@dataclass
class _Batch:
    posts: list[Post]
    futures: dict[tuple[str, str, int], Future]  # images being archived
    known: dict[tuple[str, str, int], tuple[str, str]]  # images already stored: key, url


class Archiver:
    """Takes a stream of posts to the archive: scores, archives images, loads rows, in bounded memory."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None,
        store: ObjectStore | None,
        *,
        downloader: Downloader | None = None,
        enricher: SentimentEnricher | None = None,
    ):
        self.settings = settings
        self.db = db
        self.store = store
        self.downloader = downloader or Downloader(settings)
        self.enricher = enricher or SentimentEnricher(settings.sentiment_threshold)
        self.clock = StageClock()  # shared with the image workers; RunStats.stages points here

    # -- images ----------------------------------------------------------------------------------

    def archive_image(self, platform: str, post_id: str, created_at: datetime, position: int, url: str) -> Media:
        """Download, verify and store one image; never raises (a failure is a Media with status failed)."""
        media = Media(platform, post_id, position, url)
        try:
            with self.clock("download"):
                fetched = self.downloader.fetch(url)
            key = object_key(self.settings.s3_prefix, platform, created_at, post_id, position, fetched.content_type)
            assert self.store is not None
            with self.clock("store"):
                self.store.put(key, fetched.body, fetched.content_type, fetched.sha256)
        except MediaError as exc:
            media.status, media.error, media.permanent = "failed", str(exc), exc.permanent
        except StoreError as exc:
            media.status, media.error = "failed", str(exc)
        except Exception as exc:  # one image must never stop the run
            log.exception("unexpected error archiving %s/%s image %d", platform, post_id, position)
            media.status, media.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            log.debug("stored %s (%d bytes, %s) as %s", url[:200], len(fetched.body), fetched.content_type, key)
            media.status = "stored"
            media.key, media.url = key, self.store.url(key)
            media.sha256, media.bytes, media.content_type = fetched.sha256, len(fetched.body), fetched.content_type
            media.width, media.height = fetched.width, fetched.height
        if media.status == "failed":
            log.warning("image failed: %s/%s #%d %s: %s", platform, post_id, position, url[:200], media.error)
        return media

    # -- the stream ------------------------------------------------------------------------------

    def archive(self, posts: Iterable[Post], stats: RunStats, *, source: str) -> datetime | None:
        """Archive every post; returns the newest created_at loaded (the next watermark).

        Batch N is loaded while batch N+1's images download. When the stream fails (a SourceError, a bug in
        a source), every post it yielded is still loaded before the error goes on; when loading itself
        fails (LoadError: the database is gone), nothing more can be done and the error goes on at once.
        """
        newest: datetime | None = None
        stats.stages = self.clock
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="images") as pool:
            pending: _Batch | None = None
            try:
                for posts_batch in chunked(self.clock.timed(self._allowed(posts, stats), "fetch"), self.settings.batch_size):
                    current = self._start(posts_batch, pool, stats)
                    finishing, pending = pending, current
                    if finishing is not None:
                        newest = _later(newest, self._finish(finishing, stats, source))
            except (LoadError, KeyboardInterrupt):
                raise
            except BaseException:
                if pending is not None:
                    self._finish(pending, stats, source)
                raise
            if pending is not None:
                newest = _later(newest, self._finish(pending, stats, source))
        return newest

    def _allowed(self, posts: Iterable[Post], stats: RunStats) -> Iterator[Post]:
        """Refuses posts of a platform named like ETL_EXPORT_PREFIX: their image keys would meet the export's."""
        reserved = self.settings.reserved_platform
        for post in posts:
            if post.platform == reserved:
                stats.rejected += 1
                stats.error(f"{post.platform}/{post.post_id}: platform {post.platform!r} is reserved by ETL_EXPORT_PREFIX; post refused")
                continue
            yield post

    def _start(self, posts: list[Post], pool: ThreadPoolExecutor, stats: RunStats) -> _Batch:
        image_keys = list({(p.platform, p.post_id) for p in posts if p.image_urls})
        captioned = list({(p.platform, p.post_id) for p in posts if p.caption})

        def lookup(cur: Any) -> tuple[dict, dict, dict]:
            known, hopeless = dbm.known_media(cur, image_keys) if image_keys else ({}, {})
            scores = dbm.stored_sentiments(cur, captioned, self.enricher.version) if captioned else {}
            return known, hopeless, scores

        with self.clock("lookup"):
            known, hopeless, scores = self.db.run(lookup, what="looking up stored images and scores")
        with self.clock("enrich"):
            # A caption already scored by this enricher (a rerun, an overlap window) keeps its score.
            scored = [self.enricher.enrich(p, scores.get((p.platform, p.post_id))) for p in posts]
        stats.fetched += len(scored)
        futures: dict[tuple[str, str, int], Future] = {}
        for post in scored:
            for position, url in enumerate(post.image_urls):
                key = (post.platform, post.post_id, position)
                if hopeless.get(key) == url:
                    continue  # failed for good at this URL (404, not an image...): not fetched again
                if key not in known and key not in futures:
                    futures[key] = pool.submit(self.archive_image, post.platform, post.post_id, post.created_at, position, url)
        return _Batch(scored, futures, known)

    def _finish(self, batch: _Batch, stats: RunStats, source: str) -> datetime | None:
        with self.clock("wait_images"):
            media = [f.result() for f in batch.futures.values()]
        first_urls: dict[tuple[str, str], str] = {}
        for (platform, post_id, position), (_, url) in batch.known.items():
            if position == 0:
                first_urls[(platform, post_id)] = url
        for m in media:
            if m.status == "stored" and m.position == 0:
                first_urls[(m.platform, m.post_id)] = m.url
        def load(cur: Any) -> dbm.UpsertCounts:
            counts = dbm.upsert_posts(cur, batch.posts, first_image_urls=first_urls, sentiment_version=self.enricher.version)
            dbm.upsert_media(cur, media)
            return counts

        with self.clock("load"):
            counts = self.db.run(load, what=f"loading a batch of {len(batch.posts)} posts")
        log.debug(
            "loaded %d posts (%d new, %d updated, %d unchanged) and %d image rows",
            len(batch.posts), counts.inserted, counts.updated, counts.unchanged, len(media),
        )  # fmt: skip
        # Counted only once committed.
        stats.inserted += counts.inserted
        stats.updated += counts.updated
        stats.unchanged += counts.unchanged
        skipped = sum(1 for p in batch.posts for n in range(len(p.image_urls)) if (p.platform, p.post_id, n) in batch.known)
        stats.images_skipped += skipped
        stats.count_images(media, source)
        for post in batch.posts:
            stats.sentiment[post.sentiment.label if post.sentiment else "neutral"] += 1
        return max((p.created_at for p in batch.posts), default=None)

    # -- failed images from earlier runs ---------------------------------------------------------

    def retry_failed_images(self, stats: RunStats) -> None:
        """Retry images still marked failed (not permanent, under the attempt cap, past their backoff)."""
        last_id = 0
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="retry") as pool:
            while rows := self.db.run(partial(self._failed_images, after=last_id), what="finding failed images"):
                last_id = rows[-1][0]
                media = list(pool.map(lambda r: self.archive_image(r[1], r[2], r[5], r[3], r[4]), rows))
                self.db.run(partial(_record_retries, media), what="recording retried images")
                stats.images_retried += len(media)
                stats.count_images(media, "retry")

    def _failed_images(self, cur: Any, *, after: int) -> list[tuple]:
        # Backoff between runs: the base wait doubles with each attempt, up to 48 times the base.
        cur.execute(
            "SELECT m.id, m.platform, m.post_id, m.position, m.source_url, p.created_at FROM post_media m"
            " JOIN social_posts p USING (platform, post_id)"
            " WHERE m.status = 'failed' AND NOT m.permanent AND m.attempts < %s AND m.id > %s"
            " AND m.updated_at <= now() - %s * LEAST(power(2, m.attempts - 1), 48) * interval '1 minute'"
            " ORDER BY m.id LIMIT %s",
            (self.settings.image_max_attempts, after, self.settings.image_retry_backoff_minutes, self.settings.batch_size),
        )
        return cur.fetchall()


def _record_retries(media: list[Media], cur: Any) -> None:
    dbm.upsert_media(cur, media)
    dbm.set_first_image_urls(cur, [m for m in media if m.status == "stored" and m.position == 0])


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# -- the run as a whole -----------------------------------------------------------------------------


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


def build_sources(settings: Settings, request: RunRequest) -> list[Source]:
    """Instantiate the requested sources after checking every one's settings (ConfigError before any work)."""
    classes = [source_class(name) for name in request.sources]
    for cls in classes:
        cls.check_settings(settings)
    return [cls(settings, **request.source_options.get(cls.name, {})) for cls in classes]


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
    """One run of the archiver: locks, ledger, sources in turn, watermarks, failed-image retries."""

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
        self.run_id: int | None = None

    def open_services(self, *, store: bool = True) -> None:
        """Object store and database, each checked before any work (ConfigError names the setting)."""
        if store:
            if self.store is None:
                self.store = store_from_settings(self.settings)
            self.store.check()
        if self.db is None:
            self.db = Database.from_settings(self.settings)
        self.db.migrate()

    def execute(self, request: RunRequest) -> RunStats:
        sources = build_sources(self.settings, request)
        stats = RunStats()
        if request.dry_run:
            self._dry_run(sources, request, stats)
            return stats
        self.open_services()
        assert self.db is not None
        names = [s.name for s in sources]
        lock = self.db.lock_sources(names)
        try:
            # We hold every lock of these sources: a run still marked running for one of them is dead.
            self.db.abandon_dead_runs(names)
            self.run_id = self.db.start_run(request.mode, names, request.arguments)
            log.info("run %d started: %s of %s", self.run_id, request.mode, ", ".join(names))
            status = "failed"
            try:
                archiver = Archiver(self.settings, self.db, self.store)
                if request.mode == "run":
                    archiver.retry_failed_images(stats)
                for source in sources:
                    self._check_stop()
                    if request.mode == "backfill":
                        self._backfill_source(archiver, source, request, stats)
                    else:
                        self._run_source(archiver, source, request, stats)
                status = stats.status
            except (Interrupted, KeyboardInterrupt):
                status = "interrupted"
                stats.interrupted = True
                stats.error("interrupted: the run was asked to stop; the rest is archived by the next run")
            finally:
                stats.seconds = time.monotonic() - stats.started
                self.db.finish_run(self.run_id, status, stats.ledger(RedactingFilter(self.settings.secrets()).redact))
                if self.settings.metrics_path:
                    write_metrics(self.settings.metrics_path, request.mode, status, stats)
        finally:
            lock.close()
        return stats

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("stop requested")

    def _stoppable(self, posts: Iterable[Post]) -> Iterator[Post]:
        """Ends the stream when a stop is requested; the batches already fetched are still loaded."""
        for post in posts:
            yield post
            if self.stop.is_set():
                return

    def _window(self, source: Source, request: RunRequest) -> tuple[FetchWindow, str, bool]:
        key = source.config_key()
        if not source.incremental:
            return FetchWindow(since=request.since, until=request.until, limit=request.limit), key, False
        assert self.db is not None
        watermark, cursor = self.db.get_state(source.name, key)
        since = watermark - timedelta(minutes=self.settings.overlap_minutes) if watermark else None
        return FetchWindow(since=since, cursor=cursor, limit=request.limit), key, True

    def _archive_window(
        self, archiver: Archiver, source: Source, window: FetchWindow, stats: RunStats
    ) -> tuple[bool, datetime | None]:
        """Archive what the source yields for a window; (completed, newest created_at loaded)."""
        archiver.downloader.guard.trusted = set(source.trusted_hosts)
        try:
            posts = self._stoppable(_limited(source.fetch(window), window.limit))
            newest = archiver.archive(posts, stats, source=source.name)
        except SourceError as exc:
            stats.source_failures += 1
            stats.error(f"{source.name}: {exc}")
            log.error("source %s stopped: %s", source.name, exc)
            return False, None
        except (LoadError, ConfigError):
            raise
        except Exception as exc:  # a bug in a source ends that source, not the run
            stats.source_failures += 1
            stats.error(f"{source.name}: failed unexpectedly: {type(exc).__name__}: {exc}")
            log.exception("source %s failed unexpectedly", source.name)
            return False, None
        self._check_stop()
        return True, newest

    def _run_source(self, archiver: Archiver, source: Source, request: RunRequest, stats: RunStats) -> None:
        assert self.db is not None
        before = stats.snapshot()
        window, key, incremental = self._window(source, request)
        source.db = self.db
        completed = False
        try:
            with source:
                completed, newest = self._archive_window(archiver, source, window, stats)
            if completed and incremental:
                # Only now is every post up to `newest` loaded; the watermark never moves back (db.save_state).
                self.db.save_state(source.name, key, newest, source.cursor)
        finally:
            self._account(source, stats, before, completed)

    def _backfill_source(self, archiver: Archiver, source: Source, request: RunRequest, stats: RunStats) -> None:
        """Walk [since, until) in chunks, oldest first, skipping chunks an earlier backfill finished.

        The incremental watermark is never touched: a backfill fills the past, the cron run owns the present.
        """
        assert self.db is not None and request.since is not None
        until = request.until or datetime.now(timezone.utc)
        key = source.config_key()
        chunks = backfill_chunks(request.since, until, request.chunk)
        done = self.db.finished_chunks(source.name, key, request.since, until)
        before = stats.snapshot()
        source.db = self.db
        completed = True
        try:
            with source:
                for n, (start, end) in enumerate(chunks, start=1):
                    if (start, end) in done:
                        log.info("backfill %s: chunk %s..%s already done", source.name, start, end)
                    else:
                        fetched = stats.fetched
                        window = FetchWindow(since=start, until=end, limit=request.limit)
                        chunk_completed, _ = self._archive_window(archiver, source, window, stats)
                        if not chunk_completed:
                            completed = False
                            break  # quota or rate limit: the next backfill resumes from this chunk
                        self.db.finish_chunk(source.name, key, start, end, stats.fetched - fetched, self.run_id)
                    if self.progress:
                        self.progress(n, len(chunks), stats)
        finally:
            self._account(source, stats, before, completed)

    @staticmethod
    def _account(source: Source, stats: RunStats, before: dict[str, int], completed: bool) -> None:
        stats.take_rejects(source)
        stats.quota_used += source.quota_used
        after = stats.snapshot()
        stats.per_source[source.name] = {
            **{k: after[k] - before[k] for k in after},
            "rejected": source.rejected,
            "quota_used": source.quota_used,
            "completed": completed,
        }

    def _dry_run(self, sources: list[Source], request: RunRequest, stats: RunStats) -> None:
        """Fetch and score only: no database, no object store, no image downloads."""
        enricher = SentimentEnricher(self.settings.sentiment_threshold)
        for source in sources:
            window = FetchWindow(since=request.since, until=request.until, limit=request.limit)
            with source:
                try:
                    for post in _limited(source.fetch(window), request.limit):
                        stats.fetched += 1
                        stats.sentiment[enricher.enrich(post).sentiment.label] += 1
                except SourceError as exc:
                    stats.source_failures += 1
                    stats.error(f"{source.name}: {exc}")
            stats.take_rejects(source)
        stats.seconds = time.monotonic() - stats.started


def _limited(posts: Iterable[Post], limit: int | None) -> Iterator[Post]:
    for n, post in enumerate(posts):
        if limit is not None and n >= limit:
            return
        yield post


def write_metrics(path: str, mode: str, status: str, stats: RunStats) -> None:
    """A Prometheus textfile-collector file (node_exporter --collector.textfile.directory), written atomically."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP social_archiver_{name} {help_text}")
        lines.append(f"# TYPE social_archiver_{name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(float(value))
            lines.append(f"social_archiver_{name}{{{shown}}} {number}" if shown else f"social_archiver_{name} {number}")

    metric("last_run_timestamp_seconds", "gauge", "When the last run finished (unix time).", [({"mode": mode}, time.time())])
    metric("last_run_duration_seconds", "gauge", "How long the last run took.", [({"mode": mode}, stats.seconds)])
    metric(
        "last_run_status", "gauge", "1 for the last run's status, 0 for the others.",
        [({"mode": mode, "status": st}, 1.0 if st == status else 0.0) for st in ("ok", "partial", "interrupted", "failed")],
    )  # fmt: skip
    metric("last_run_exit_code", "gauge", "The exit code of the last run.", [({"mode": mode}, float(stats.exit_code))])
    posts, images = [], []
    for source, counts in sorted(stats.per_source.items()):
        for result in ("fetched", "inserted", "updated", "unchanged", "rejected"):
            posts.append(({"source": source, "result": result}, float(counts.get(result, 0))))
        for result in ("stored", "skipped", "failed"):
            images.append(({"source": source, "result": result}, float(counts.get(f"images_{result}", 0))))
    metric("last_run_posts", "gauge", "Posts of the last run per source and result.", posts)
    metric("last_run_images", "gauge", "Images of the last run per source and result.", images)
    metric("last_run_quota_units", "gauge", "API quota units the last run used.", [({"mode": mode}, float(stats.quota_used))])
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["Archiver", "Interrupted", "RunRequest", "RunStats", "Runner", "backfill_chunks", "write_metrics"]
