"""The run: sources -> sentiment -> images (concurrently) -> one transaction per batch, and the run ledger."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

from etl import db as dbm
from etl.ahead import score_ahead
from etl.config import Settings
from etl.copystore import refuse_if_elsewhere
from etl.db import Database
from etl.enrich import SentimentEnricher
from etl.errors import (
    ConfigError,
    ETLError,
    ExitCode,
    LoadError,
    LockedError,
    MediaError,
    SourceError,
    StoreError,
    UsageError,
)
from etl.logs import RedactingFilter
from etl.media import Downloader, without_userinfo
from etl.metrics import write_run_metrics
from etl.progress import LiveCounts
from etl.records import Media, Post, cap_caption, chunked
from etl.resume import ResumePoint, ResumeTracker
from etl.shards import Shard, Unit, units_of
from etl.sources import FetchWindow, Source, load_source_modules, source_class
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

    WORKER_STAGES = ("download", "store")

    def line(self) -> str:
        """`stages fetch=…s load=…s | worker-seconds download=…s store=…s`: the second group is summed over the
        image workers (it can exceed the wall time), so it is labelled apart from the main thread's stages."""
        main = " ".join(f"{s}={t:.2f}s" for s, t in self.seconds.items() if s not in self.WORKER_STAGES)
        workers = " ".join(f"{s}={t:.2f}s" for s, t in self.seconds.items() if s in self.WORKER_STAGES)
        return f"stages {main}" + (f" | worker-seconds (summed over image workers) {workers}" if workers else "")


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
            + (f" | {self.stages.line()}" if self.stages.seconds else "")
        )


@dataclass
class _Batch:
    posts: list[Post]
    futures: dict[tuple[str, str, int], Future]  # images being archived
    known: dict[tuple[str, str, int], tuple[str, str]]  # images already stored: key, url
    urls: dict[tuple[str, str, int], str] = field(default_factory=dict)  # of the images being archived
    number: int = 0  # the batch's place in the run of its source, for messages

    def describe(self, source: str) -> str:
        first, last = self.posts[0], self.posts[-1]
        oldest = min(p.created_at for p in self.posts)
        newest = max(p.created_at for p in self.posts)
        return (
            f"batch {self.number} of {source} ({len(self.posts)} posts, {first.platform}/{first.post_id[:60]} .. "
            f"{last.post_id[:60]}, created {oldest:%Y-%m-%d %H:%M} to {newest:%Y-%m-%d %H:%M} UTC)"
        )


def _not_loaded(exc: LoadError, batch: _Batch, source: str) -> LoadError:
    return LoadError(
        f"{exc}. Not loaded: {batch.describe(source)} and any batch after it; the watermark did not move, so the "
        "next run fetches them again"
    )


def _by_post(media: Iterable[Media]) -> dict[tuple[str, str], list[Media]]:
    grouped: dict[tuple[str, str], list[Media]] = {}
    for m in media:
        grouped.setdefault((m.platform, m.post_id), []).append(m)
    return grouped


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
        stop: threading.Event | None = None,
    ):
        self.settings = settings
        self.db = db
        self.store = store
        self.downloader = downloader or Downloader(settings)
        self.enricher = enricher or SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language)
        self.clock = StageClock()  # shared with the image workers; RunStats.stages points here
        self.stop = stop or threading.Event()  # SIGTERM: no new downloads, a short grace for those in flight
        self._grace_ends: float | None = None
        self._batches = 0
        self.live = LiveCounts()  # what is under way, for the progress display

    # -- images ----------------------------------------------------------------------------------

    def archive_image(
        self, platform: str, post_id: str, created_at: datetime, position: int, url: str, *, replace: bool = False
    ) -> Media:
        """Download, verify and store one image; never raises (a failure is a Media with status failed).
        `replace`: the stored object failed a fixity check (etl.py verify), so it is overwritten unconditionally."""
        media = Media(platform, post_id, position, without_userinfo(url))  # never stored or logged with credentials
        if self.stop.is_set():
            media.status, media.error = (
                "failed",
                "not downloaded: the run was stopped (SIGTERM); retried by the next run",
            )
            return media
        self.live.image_started()
        try:
            with self.clock("download"):
                fetched = self.downloader.fetch(url)
            key = object_key(self.settings.s3_prefix, platform, created_at, post_id, position, fetched.content_type)
            assert self.store is not None
            with self.clock("store"):
                if replace:
                    self.store.put(key, fetched.body, fetched.content_type, fetched.sha256, replace=True)
                else:
                    self.store.put(key, fetched.body, fetched.content_type, fetched.sha256)
        except MediaError as exc:
            media.status, media.error, media.permanent = "failed", str(exc), exc.permanent
        except StoreError as exc:
            media.status, media.error = "failed", str(exc)
        except Exception as exc:  # one image must never stop the run
            log.exception("unexpected error archiving %s/%s image %d", platform, post_id, position)
            media.status, media.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            log.debug(
                "stored %s (%d bytes, %s) as %s", media.source_url[:200], len(fetched.body), fetched.content_type, key
            )
            media.status = "stored"
            media.key, media.url = key, self.store.url(key)
            media.sha256, media.bytes, media.content_type = fetched.sha256, len(fetched.body), fetched.content_type
            media.width, media.height = fetched.width, fetched.height
        self.live.image_done(media.status == "stored")
        if media.status == "failed":
            log.warning(
                "image failed: %s/%s #%d %s: %s", platform, post_id, position, media.source_url[:200], media.error
            )
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
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="images")
        try:
            pending: _Batch | None = None
            try:
                fetching = self.live.counting(self.clock.timed(self._allowed(posts, stats), "fetch"))
                for posts_batch in score_ahead(self.enricher, chunked(fetching, self.settings.batch_size)):
                    current = self._start(posts_batch, pool, stats, source)
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
        finally:
            # After a stop, a download stalled past the grace is left behind (its image is recorded failed).
            pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
        return newest

    def _results(self, futures: dict[Any, Future], unfinished: Callable[[Any], Media]) -> dict[Any, Media]:
        """The Media of every future; once a stop is requested, those not done within ETL_STOP_GRACE seconds
        of it are cancelled or left behind and become unfinished(key), a failure the next run retries."""
        waiting = set(futures.values())
        while waiting:
            if self.stop.is_set() and self._grace_ends is None:
                self._grace_ends = time.monotonic() + self.settings.stop_grace
                log.warning("stopping: waiting up to %gs for the image downloads in flight", self.settings.stop_grace)
            timeout = 0.25 if self._grace_ends is None else min(0.25, self._grace_ends - time.monotonic())
            if timeout <= 0:
                break
            _, waiting = wait(waiting, timeout=timeout)
        results = {}
        for key, future in futures.items():
            if future.done() and not future.cancelled():
                results[key] = future.result()
            else:
                future.cancel()
                results[key] = unfinished(key)
        return results

    def _unfinished(self, platform: str, post_id: str, position: int, url: str) -> Media:
        media = Media(platform, post_id, position, url)
        media.status = "failed"
        media.error = (
            f"the run was stopped (SIGTERM) before this download finished (ETL_STOP_GRACE="
            f"{self.settings.stop_grace:g}s); retried by the next run"
        )
        log.warning("image not finished before the stop: %s/%s #%d %s", platform, post_id, position, url[:200])
        return media

    def _allowed(self, posts: Iterable[Post], stats: RunStats) -> Iterator[Post]:
        """Refuses posts of a platform named like ETL_EXPORT_PREFIX: their image keys would meet the export's."""
        reserved = self.settings.reserved_platform
        for post in posts:
            if post.platform == reserved:
                stats.rejected += 1
                stats.error(f"{post.platform}/{post.post_id}: platform {post.platform!r} is reserved by ETL_EXPORT_PREFIX; post refused")
                continue
            yield post

    def _start(self, posts: list[Post], pool: ThreadPoolExecutor, stats: RunStats, source: str = "") -> _Batch:
        image_keys = list({(p.platform, p.post_id) for p in posts if p.image_urls})
        captioned = list({(p.platform, p.post_id) for p in posts if p.caption})

        def lookup(cur: Any) -> tuple[dict, dict, dict, set]:
            known, hopeless = dbm.known_media(cur, image_keys) if image_keys else ({}, {})
            scores = dbm.stored_sentiments(cur, captioned, self.enricher.version) if captioned else {}
            tombstones = dbm.forgotten(cur, list({(p.platform, p.post_id) for p in posts}))
            return known, hopeless, scores, tombstones

        with self.clock("lookup"):
            try:
                known, hopeless, scores, tombstones = self.db.run(lookup, what="looking up stored images and scores")
            except LoadError as exc:
                raise _not_loaded(exc, _Batch(posts, {}, {}, number=self._batches + 1), source) from None
        if tombstones:  # forgotten on request: never archived again (etl/forget.py)
            kept = [p for p in posts if (p.platform, p.post_id) not in tombstones]
            stats.forgotten_skipped += len(posts) - len(kept)
            posts = kept
        with self.clock("enrich"):
            # A caption already scored by this enricher (a rerun, an overlap window) keeps its score. A caption
            # over the cap is cut first (and flagged), so the score is the stored caption's.
            scored = self.enricher.enrich_all(
                [cap_caption(p) for p in posts], [scores.get((p.platform, p.post_id)) for p in posts]
            )
        stats.fetched += len(scored)
        futures: dict[tuple[str, str, int], Future] = {}
        urls: dict[tuple[str, str, int], str] = {}
        for post in scored:
            for position, url in enumerate(post.image_urls):
                key = (post.platform, post.post_id, position)
                if hopeless.get(key) == without_userinfo(url):
                    continue  # failed for good at this URL (404, not an image...): not fetched again
                if key not in known and key not in futures:
                    futures[key] = pool.submit(
                        self.archive_image, post.platform, post.post_id, post.created_at, position, url
                    )
                    urls[key] = url
        self._batches += 1
        return _Batch(scored, futures, known, urls, self._batches)

    def _finish(self, batch: _Batch, stats: RunStats, source: str) -> datetime | None:
        with self.clock("wait_images"):
            media = list(self._results(batch.futures, lambda k: self._unfinished(*k, batch.urls[k])).values())
        first_urls: dict[tuple[str, str], str] = {}
        for (platform, post_id, position), (_, url) in batch.known.items():
            if position == 0:
                first_urls[(platform, post_id)] = url
        for m in media:
            if m.status == "stored" and m.position == 0:
                first_urls[(m.platform, m.post_id)] = m.url
        with self.clock("load"):
            try:
                counts, loaded, media = self._load(batch.posts, _by_post(media), first_urls, stats, source)
            except dbm.DataRefused:
                raise
            except LoadError as exc:
                raise _not_loaded(exc, batch, source) from None
        log.debug(
            "loaded %d posts (%d new, %d updated, %d unchanged) and %d image rows",
            len(loaded), counts.inserted, counts.updated, counts.unchanged, len(media),
        )  # fmt: skip
        # Counted only once committed.
        stats.inserted += counts.inserted
        stats.updated += counts.updated
        stats.unchanged += counts.unchanged
        stats.engagement_snapshots += counts.snapshots
        skipped = sum(1 for p in loaded for n in range(len(p.image_urls)) if (p.platform, p.post_id, n) in batch.known)
        stats.images_skipped += skipped
        stats.count_images(media, source)
        for post in loaded:
            stats.sentiment[post.sentiment.label if post.sentiment else "unscored"] += 1
        return max((p.created_at for p in loaded), default=None)

    def _load(
        self,
        posts: list[Post],
        media: dict[tuple[str, str], list[Media]],
        first_urls: dict,
        stats: RunStats,
        source: str,
    ) -> tuple[dbm.UpsertCounts, list[Post], list[Media]]:
        """Load posts with their image rows in one transaction. When the database refuses a row (DataRefused),
        halve the batch until the row is alone: it is reported with its line or post id and the database's
        reason, and every other row loads. Returns (counts, posts loaded, image rows loaded)."""
        rows = [m for p in posts for m in media.pop((p.platform, p.post_id), [])]

        def load(cur: Any) -> dbm.UpsertCounts:
            counts = dbm.upsert_posts(cur, posts, first_image_urls=first_urls, sentiment_version=self.enricher.version)
            dbm.upsert_media(cur, rows)
            counts.snapshots = dbm.record_staged_engagement(cur) if posts else 0
            return counts

        try:
            return self.db.run(load, what=f"{len(posts)} post(s) of {source}"), posts, rows
        except dbm.DataRefused as exc:
            if len(posts) == 1:
                post = posts[0]
                where = f"{post.origin} (post {post.platform}/{post.post_id[:100]})" if post.origin else (
                    f"post {post.platform}/{post.post_id[:100]}"
                )  # fmt: skip
                stats.rejected += 1
                stats.error(f"{source}: {where}: refused by the database: {exc.reason}")
                log.warning("%s: %s refused by the database: %s", source, where, exc.reason)
                return dbm.UpsertCounts(), [], []
        half = len(posts) // 2
        grouped = _by_post(rows)
        counts_a, loaded_a, rows_a = self._load(posts[:half], grouped, first_urls, stats, source)
        counts_b, loaded_b, rows_b = self._load(posts[half:], grouped, first_urls, stats, source)
        counts = dbm.UpsertCounts(
            counts_a.inserted + counts_b.inserted, counts_a.updated + counts_b.updated,
            counts_a.unchanged + counts_b.unchanged, counts_a.snapshots + counts_b.snapshots,
        )  # fmt: skip
        return counts, loaded_a + loaded_b, rows_a + rows_b

    # -- failed images from earlier runs ---------------------------------------------------------

    def retry_failed_images(self, stats: RunStats, part: Shard | None = None) -> None:
        """Retry images still marked failed (not permanent, under the attempt cap, past their backoff); with
        `part` K/N only those whose id is K-1 modulo N, so that N workers never take the same image."""
        last_id = 0
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="retry")
        try:
            while not self.stop.is_set() and (
                rows := self.db.run(
                    partial(self._failed_images, after=last_id, part=part), what="finding failed images"
                )
            ):
                last_id = rows[-1][0]
                futures = {
                    r: pool.submit(self.archive_image, r[1], r[2], r[5], r[3], r[4], replace=r[6]) for r in rows
                }
                media = list(self._results(futures, lambda r: self._unfinished(r[1], r[2], r[3], r[4])).values())
                self.db.run(partial(_record_retries, media), what="recording retried images")
                stats.images_retried += len(media)
                stats.count_images(media, "retry")
        finally:
            pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)

    def _failed_images(self, cur: Any, *, after: int, part: Shard | None = None) -> list[tuple]:
        # Backoff between runs: the base wait doubles with each attempt, up to 48 times the base. An object that
        # failed a fixity check (etl.py verify) is refetched by the next run, and overwritten.
        index, count = (part.index, part.count) if part else (1, 1)
        cur.execute(
            "SELECT m.id, m.platform, m.post_id, m.position, m.source_url, p.created_at, m.fixity IS NOT NULL"
            " FROM post_media m JOIN social_posts p USING (platform, post_id)"
            " WHERE m.status = 'failed' AND NOT m.permanent AND m.attempts < %s AND m.id > %s"
            " AND (m.fixity IS NOT NULL AND m.attempts = 0"
            " OR m.updated_at <= now() - %s * LEAST(power(2, m.attempts - 1), 48) * interval '1 minute')"
            " AND m.id %% %s = %s ORDER BY m.id LIMIT %s",
            (self.settings.image_max_attempts, after, self.settings.image_retry_backoff_minutes, count, index - 1,
             self.settings.batch_size),
        )  # fmt: skip
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
    shard: Shard | None = None  # only the units (streams) of shard K/N, and part K/N of the failed images
    chunk_index: int | None = None  # a backfill: only this chunk (0-based), for one worker of many
    retry_images: bool = True  # a run retries failed images of earlier runs first


def build_sources(settings: Settings, request: RunRequest) -> list[Source]:
    """Instantiate the requested sources after checking every one's settings (ConfigError before any work)."""
    load_source_modules(settings.source_paths)
    classes = [source_class(name) for name in request.sources]
    for cls in classes:
        cls.check_settings(settings)
    return [cls(settings, **request.source_options.get(cls.name, {})) for cls in classes]


def open_services(
    settings: Settings, *, db: Database | None = None, store: ObjectStore | None = None, check_store: bool = True
) -> tuple[Database, ObjectStore | None]:
    """The object store (checked) and the database (migrated), each failing with a ConfigError that names the
    setting (ServiceUnavailable when it cannot be reached): what every command opens before any work."""
    if check_store:
        store = store or store_from_settings(settings)
        store.check()
    db = db or Database.from_settings(settings)
    db.migrate()
    return db, store


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
        self.live = LiveCounts()  # read by the progress display while the run goes on
        self.run_id: int | None = None

    def open_services(self, *, store: bool = True) -> None:
        """Object store and database, each checked before any work (ConfigError names the setting)."""
        self.db, self.store = open_services(self.settings, db=self.db, store=self.store if store else None, check_store=store)

    def close(self) -> None:
        """Close the database connection this runner opened (an orchestrator's worker runs many tasks)."""
        if self.db is not None:
            self.db.close()

    def execute(self, request: RunRequest) -> RunStats:
        sources = build_sources(self.settings, request)
        stats = RunStats()
        if request.dry_run:
            self._dry_run(sources, request, stats)
            return stats
        self.open_services()
        assert self.db is not None
        refuse_if_elsewhere(self.db, self.store, self.settings)  # images in another store: copy-store first
        units = [(s, u) for s in sources for u in units_of(s) if request.shard is None or request.shard.owns(u.name)]
        lock, locked = self.db.lock_units([u.name for _, u in units])
        try:
            if locked and len(locked) == len(units):
                holder = self.db.run(
                    lambda cur: self.db.running_run_for(cur, locked[0]), what="finding the lock holder"
                )
                raise LockedError(f"{', '.join(locked)}: being archived by another run{holder}; nothing done")
            active = [(s, u) for s, u in units if u.name not in locked]
            stats.locked_streams = locked
            for name in locked:
                log.warning("%s is being archived by another run: skipped (that run archives it)", name)
            held = [u.name for _, u in active]
            # We hold the locks of these units: a run still marked running that held one of them is dead.
            self.db.abandon_dead_runs(held)
            names = list(dict.fromkeys(s.name for s, _ in active))
            arguments = {**request.arguments, **({"locked": locked} if locked else {})}
            self.run_id = self.db.start_run(request.mode, names, arguments, units=held)
            log.info("run %d started: %s of %s", self.run_id, request.mode, ", ".join(names) or "failed images only")
            status = "failed"
            try:
                archiver = Archiver(self.settings, self.db, self.store, stop=self.stop)
                archiver.live = self.live
                if request.mode == "run" and request.retry_images:
                    archiver.retry_failed_images(stats, part=request.shard)
                for source in sources:
                    mine = [u for s, u in active if s is source]
                    if not mine:
                        continue
                    self._check_stop()
                    if request.mode == "backfill":
                        self._backfill_source(archiver, source, mine, request, stats)
                    else:
                        self._run_source(archiver, source, mine, request, stats)
                status = stats.status
            except (Interrupted, KeyboardInterrupt):
                status = "interrupted"
                stats.interrupted = True
                stats.error("interrupted: the run was asked to stop; the rest is archived by the next run")
            except LoadError as exc:
                stats.error(str(exc))
                raise
            finally:
                stats.seconds = time.monotonic() - stats.started
                try:
                    self.db.finish_run(
                        self.run_id, status, stats.ledger(RedactingFilter(self.settings.secrets()).redact)
                    )
                except LoadError as exc:
                    if status != "failed":
                        raise
                    # The database is gone: the error that stopped the run is the one to report, not this one.
                    log.error("could not record the end of run %s either: %s", self.run_id, exc)
                if self.settings.metrics_path:
                    try:
                        write_run_metrics(self.settings.metrics_path, request.mode, status, stats)
                    except OSError as exc:  # checked at start; a full disk must still not hide the summary
                        log.error("ETL_METRICS_PATH=%s could not be written: %s", self.settings.metrics_path, exc)
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

    def _window(self, source: Source, unit: Unit, request: RunRequest) -> tuple[FetchWindow, bool]:
        if not source.incremental:
            return FetchWindow(since=request.since, until=request.until, limit=request.limit), False
        assert self.db is not None
        watermark, cursor = self.db.get_state(source.name, state_key(source, unit))
        if unit.stream and watermark is None and not cursor:
            # A stream with no state of its own adopts its source's state of before (kept per configuration).
            watermark, cursor = self.db.get_state(source.name, source.config_key())
        since = watermark - timedelta(minutes=self.settings.overlap_minutes) if watermark else None
        return FetchWindow(since=since, cursor=cursor, limit=request.limit), True

    def _archive_window(
        self,
        archiver: Archiver,
        source: Source,
        window: FetchWindow,
        stats: RunStats,
        tracker: ResumeTracker | None = None,
    ) -> tuple[bool, datetime | None]:
        """Archive what the source yields for a window; (completed, newest created_at loaded).

        `tracker` skips what a cut run loaded and applies the limit; by default only the window's limit."""
        archiver.downloader.guard.trusted = set(source.trusted_hosts)
        tracker = tracker or ResumeTracker(source, None, window.limit)
        try:
            posts = self._stoppable(tracker(source.fetch(window)))
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

    def _run_source(
        self, archiver: Archiver, source: Source, units: list[Unit], request: RunRequest, stats: RunStats
    ) -> None:
        """Each of the source's streams (units) with its own window, state and resume point; --limit per source."""
        before = stats.snapshot()
        source.db = self.db
        completed = True
        passed = 0  # posts this source yielded so far (the limit is the source's, shared by its streams)
        try:
            with source:
                for unit in units:
                    self._check_stop()
                    left = None if request.limit is None else request.limit - passed
                    if left is not None and left <= 0:
                        completed = False  # cut by the limit before this stream: its state stays as it is
                        continue
                    if unit.stream:
                        source.restrict(unit.stream)
                    done, n = self._run_unit(archiver, source, unit, replace(request, limit=left), stats)
                    completed, passed = completed and done, passed + n
                self._recheck(source, request, stats)
        finally:
            self._apply_gone(source, stats)
            self._account(source, stats, before, completed)

    def _run_unit(
        self, archiver: Archiver, source: Source, unit: Unit, request: RunRequest, stats: RunStats
    ) -> tuple[bool, int]:
        """One stream's window; (read to its end, posts yielded). The watermark moves only when complete."""
        assert self.db is not None
        key = state_key(source, unit)
        window, incremental = self._window(source, unit, request)
        resume = ResumePoint.from_json(self.db.get_resume(source.name, key)) if incremental else None
        if resume is not None:
            log.info("%s: an earlier run was cut short; filling the gap below what it loaded first", unit.name)
            window = replace(window, limit=None)  # posts skipped as loaded must not use up the source's own limit
        tracker = ResumeTracker(source, resume, request.limit)
        source.cursor = {}
        try:
            completed, _ = self._archive_window(archiver, source, window, stats, tracker)
            completed = completed and not tracker.limited
        except Interrupted:
            if incremental:
                self._save_cut(source, key, tracker, "stopped")
            raise
        if incremental and completed:
            # Only now is every post of the window loaded; the watermark never moves back (db.save_state).
            self.db.save_state(source.name, key, tracker.watermark(), source.cursor)
        elif incremental:
            self._save_cut(source, key, tracker, "cut short by --limit" if tracker.limited else "stopped early")
        return completed, tracker.passed

    def _save_cut(self, source: Source, key: str, tracker: ResumeTracker, why: str) -> None:
        """A window not read to its end: the watermark stays, the resume point records what was loaded."""
        assert self.db is not None
        self.db.save_resume(source.name, key, tracker.cut_point().to_json())
        log.info(
            "%s: run %s after %d post(s); the watermark stays, the next run goes on below them",
            source.name, why, tracker.passed,
        )  # fmt: skip

    def _backfill_source(
        self, archiver: Archiver, source: Source, units: list[Unit], request: RunRequest, stats: RunStats
    ) -> None:
        """Walk [since, until) in chunks, oldest first, each stream of the source in turn, skipping what an
        earlier backfill finished; with `chunk_index`, that one chunk only (one worker of many).

        The incremental watermark is never touched: a backfill fills the past, the cron run owns the present.
        """
        assert self.db is not None and request.since is not None
        until = request.until or datetime.now(timezone.utc)
        chunks = backfill_chunks(request.since, until, request.chunk)
        picked = list(enumerate(chunks, start=1))
        if request.chunk_index is not None:
            if not 0 <= request.chunk_index < len(chunks):
                raise UsageError(
                    f"--chunk-index {request.chunk_index}: this backfill has chunks 0 to {len(chunks) - 1}"
                )
            picked = [picked[request.chunk_index]]
        self.live.chunks_total += len(picked)
        done = {unit.name: self._finished_chunks(source, unit, request.since, until) for unit in units}
        before = stats.snapshot()
        source.db = self.db
        completed = True
        try:
            with source:
                for n, (start, end) in picked:
                    for unit in units:
                        if (start, end) in done[unit.name]:
                            log.info("backfill %s: chunk %s..%s already done", unit.name, start, end)
                            continue
                        if unit.stream:
                            source.restrict(unit.stream)
                        fetched = stats.fetched
                        window = FetchWindow(since=start, until=end, limit=request.limit)
                        tracker = ResumeTracker(source, None, request.limit)
                        chunk_completed, _ = self._archive_window(archiver, source, window, stats, tracker)
                        if not chunk_completed or tracker.limited:
                            completed = False
                            return  # quota or rate limit: the next backfill resumes from this chunk
                        self.db.finish_chunk(
                            source.name, state_key(source, unit), start, end, stats.fetched - fetched, self.run_id
                        )
                    self.live.chunks_done += 1
                    if self.progress:
                        self.progress(n, len(chunks), stats)
        finally:
            self._apply_gone(source, stats)
            self._account(source, stats, before, completed)

    def _finished_chunks(self, source: Source, unit: Unit, since: datetime, until: datetime) -> set:
        assert self.db is not None
        done = self.db.finished_chunks(source.name, state_key(source, unit), since, until)
        if unit.stream:  # chunks a backfill finished before state was kept per stream
            done |= self.db.finished_chunks(source.name, source.config_key(), since, until)
        return done

    def _recheck(self, source: Source, request: RunRequest, stats: RunStats) -> None:
        """Ask the platform about a bounded slice of the held posts (ETL_RECHECK_POSTS); in a sharded run, only
        the shard that owns the source's first unit does it."""
        if request.mode != "run" or not source.can_recheck or self.db is None or self.stop.is_set():
            return
        if request.shard is not None and not request.shard.owns(units_of(source)[0].name):
            return
        from etl.recheck import recheck_source

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

    def _dry_run(self, sources: list[Source], request: RunRequest, stats: RunStats) -> None:
        """Fetch and score only: no database, no object store, no image downloads."""
        enricher = SentimentEnricher(self.settings.sentiment_threshold, detect_language=self.settings.detect_language)
        for source in sources:
            window = FetchWindow(since=request.since, until=request.until, limit=request.limit)
            with source:
                try:
                    for post in self.live.counting(_limited(source.fetch(window), request.limit)):
                        stats.fetched += 1
                        scored = enricher.enrich(post)
                        stats.sentiment[scored.sentiment.label if scored.sentiment else "unscored"] += 1
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


__all__ = ["Archiver", "Interrupted", "RunRequest", "RunStats", "Runner", "backfill_chunks"]
