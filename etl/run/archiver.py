"""The archiver: a stream of posts in named stages, batch by batch: plan -> enrich -> images -> load.

A dry run is this same archiver with no database and no store: nothing is known, no image is fetched, the
load writes nothing (`NothingWritten`), so the two can never drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from etl.ahead import FORKING, EarlyScorers, score_ahead
from etl.config import Settings
from etl.db import Archive, Database, DataRefused, Held, HeldRow, UpsertCounts
from etl.enrich import SentimentEnricher
from etl.errors import LoadError, MediaError, StoreError
from etl.media import Downloader, Fetched, sniff_image, without_userinfo
from etl.progress import LiveCounts
from etl.records import Media, Post, cap_caption, chunked, clean_text
from etl.run.stats import RunStats, StageClock
from etl.shards import Shard
from etl.store import EXTENSIONS, KeyHeld, ObjectStore, object_key

log = logging.getLogger(__name__)


class NothingWritten:
    """The archive of a dry run: it holds nothing, and loading writes nothing."""

    def held(self, posts: Sequence[Post], version: str) -> Held:
        return Held({}, {}, {}, set())

    def load(
        self, posts: Sequence[Post], media: Sequence[Media], first_urls: dict, version: str, *, what: str,
        stored: dict | None = None,
    ) -> UpsertCounts:
        return UpsertCounts()

    def failed_images(self, **_: Any) -> list[tuple]:
        return []

    def record_retries(self, media: Sequence[Media]) -> list[Media]:
        return []

    def keys_in_use(self, keys: Sequence[str]) -> set[str]:
        return set(keys)


@dataclass
class _Batch:
    posts: list[Post]
    futures: dict[tuple[str, str, int], Future]  # images being archived
    known: dict[tuple[str, str, int], tuple[str, str]]  # images already stored: key, url
    urls: dict[tuple[str, str, int], str] = field(default_factory=dict)  # of the images being archived
    number: int = 0  # the batch's place in the run of its source, for messages
    rows: dict[tuple[str, str], HeldRow] = field(default_factory=dict)  # stored rows (Held.rows), for the load
    keys: frozenset[tuple[str, str]] = frozenset()  # of its posts, as stored: a later lookup may predate its load
    repairs: dict[tuple[str, str, int], str] = field(default_factory=dict)  # images repaired: the damaged key

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
        f"{exc}. Not loaded: {batch.describe(source)} and any batch after it not yet loaded; the watermark did not "
        "move, so the next run fetches them again"
    )


def _by_post(media: Iterable[Media]) -> dict[tuple[str, str], list[Media]]:
    grouped: dict[tuple[str, str], list[Media]] = {}
    for m in media:
        grouped.setdefault((m.platform, m.post_id), []).append(m)
    return grouped


def _merge(into: RunStats, part: RunStats) -> None:
    """Add what a batch loaded on the loader thread counted (its own RunStats) to the run's."""
    for f in fields(RunStats):
        value = getattr(part, f.name)
        if type(value) is int and f.name != "error_count":
            setattr(into, f.name, getattr(into, f.name) + value)
    into.sentiment.update(part.sentiment)
    for message in part.errors:
        into.error(message)
    into.error_count += part.error_count - len(part.errors)


_LANES = 2  # loads at a time, each on a thread and a connection of its own


class _Loader:
    """Loads batches without images in flight on threads of their own, each over a connection of its own, while
    the main thread reads, looks up and scores the next batch (issue 16: loading mostly waits for PostgreSQL).

    Up to _LANES loads at a time, of batches that share no post: a batch with a post of a load in flight waits
    for it (and for those before it), so the last of a post's duplicates still wins, as in one thread. Loads are
    collected in the stream's order: each counts into a RunStats of its own, added to the run's by the main
    thread once it is committed; the first error goes on from there."""

    def __init__(self, archiver: Archiver, db: Database):
        self.lanes: list[tuple[Database, Archiver, ThreadPoolExecutor]] = []
        for n in range(_LANES):
            # The archiver's own load(), run against this lane's connection (the archiver's stays the main thread's).
            lane_db = Database(db.dsn, display=db.display, reconnect_seconds=db.reconnect_seconds)
            lane = copy.copy(archiver)
            lane.archive_db = Archive(lane_db)
            self.lanes.append((lane_db, lane, ThreadPoolExecutor(1, thread_name_prefix=f"loader-{n}")))
        self.clock = archiver.clock
        self.in_flight: list[tuple[Future, RunStats, _Batch, int]] = []  # in the stream's order

    def keys(self) -> list[frozenset[tuple[str, str]]]:
        """The posts of each load in flight (counted until collected; its posts then merely go to the database)."""
        return [batch.keys for _, _, batch, _ in self.in_flight]

    def make_room(self, batch: _Batch, stats: RunStats) -> datetime | None:
        """Collect loads in flight, oldest first, until `batch` may start: a lane is free and no load in flight
        has one of its posts. The newest created_at of the loads collected; the first error goes on."""
        newest = None
        while self.in_flight and (
            len(self.in_flight) == len(self.lanes) or any(not keys.isdisjoint(batch.keys) for keys in self.keys())
        ):
            newest = _later(newest, self._collect_oldest(stats))
        return newest

    def submit(self, batch: _Batch, source: str) -> None:
        busy = {lane for *_, lane in self.in_flight}
        lane = next(n for n in range(len(self.lanes)) if n not in busy)
        part = RunStats()
        _, archiver, thread = self.lanes[lane]
        self.in_flight.append((thread.submit(_load, archiver, batch, part, source), part, batch, lane))

    def _collect_oldest(self, stats: RunStats, *, settle_after_error: bool = True) -> datetime | None:
        """Wait for the oldest load in flight: its counts join `stats`; its error goes on, once the loads after it
        are settled (theirs are of later batches: the oldest failure is the one to report). Interrupted while
        waiting (Ctrl-C), the load stays in flight, for close() to wait for and count."""
        future, part, _, _ = self.in_flight[0]
        try:
            with self.clock("wait_load"):
                future.result()
        except BaseException:
            if not future.done():
                raise
        del self.in_flight[0]
        try:
            newest = future.result()  # done: its value, or its own error
        except BaseException:
            if settle_after_error:
                self.settle(stats)
            raise
        _merge(stats, part)
        return newest

    def collect(self, stats: RunStats) -> datetime | None:
        """Wait for every load in flight, in the stream's order: their counts join `stats`, the first error goes on.
        Their newest post."""
        newest = None
        while self.in_flight:
            newest = _later(newest, self._collect_oldest(stats))
        return newest

    def settle(self, stats: RunStats) -> datetime | None:
        """After an error: every load in flight is let finish (what it committed is counted), their errors dropped
        (the one already going on is the run's)."""
        newest = None
        while self.in_flight:
            try:
                newest = _later(newest, self._collect_oldest(stats, settle_after_error=False))
            except Exception as exc:
                log.warning("a later load in flight failed too: %s", exc)
        return newest

    def close(self, stats: RunStats) -> None:
        """settle(), then the threads and the connections go."""
        try:
            self.settle(stats)
        finally:
            for lane_db, _, thread in self.lanes:
                thread.shutdown(wait=True)
                lane_db.close()


class _LookAhead:
    """A batch without images to fetch is looked up as soon as it is read, on a thread and a connection of its own:
    the database answers while the main thread reads and parses the next batch, and plan() takes the answer
    (issue 16: the main thread waited on every lookup, about 40% of a rerun's time). A batch whose images download is
    looked up in turn by plan(), on the archiver's connection: its downloads set its pace, and a run of such batches
    never opens this connection.

    A lookup sent ahead may predate the load of any batch read before it, started or not: the posts it shares with
    those (read and not known to be loaded when it was sent) go with it, and plan() drops their rows, as it does
    for a lookup made in turn with the batches started. One thread, so the lookups are made in the stream's order."""

    def __init__(
        self, db: Database, version: str, *, started: Callable[[], list[frozenset[tuple[str, str]]]],
        worth: Callable[[list[Post]], bool], retry: tuple[int, float],
    ):  # fmt: skip
        self.db = Database(db.dsn, display=db.display, reconnect_seconds=db.reconnect_seconds)  # opened on first use
        self.archive = Archive(self.db, retry=retry)
        self.version = version
        self.started = started  # the posts of each batch started and not known to be loaded
        self.worth = worth  # whether a batch is looked up ahead
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="lookup")
        # By id(batch), until plan() takes it: the batch (kept alive, so the id is its own), its lookup, its posts'
        # keys, and those of them that a batch read before it may still load.
        self.sent: dict[int, tuple[list[Post], Future, frozenset[tuple[str, str]], frozenset[tuple[str, str]]]] = {}

    def reading(self, batches: Iterable[list[Post]]) -> Iterator[list[Post]]:
        """The batches, unchanged; the lookup of each one worth it sent as it is read."""
        for batch in batches:
            if self.worth(batch):
                keys = _keys(batch)
                shared = self._shared(keys, self.started() + [sent[2] for sent in self.sent.values()])
                self.sent[id(batch)] = (batch, self.thread.submit(self._held, batch), keys, shared)
            yield batch

    def _held(self, batch: list[Post]) -> Held:
        with FORKING.working():  # no scoring worker is forked while this thread is inside libpq (etl/ahead.py)
            return self.archive.held(batch, self.version)

    def result(self, posts: list[Post], *, take: bool) -> tuple[Held, frozenset[tuple[str, str]]] | None:
        """The lookup of batch `posts` and the posts it shares with batches read before it (None: not sent);
        `take`: forgotten here afterwards. Its error (LoadError: the database is gone) goes on, every time asked."""
        sent = self.sent.pop(id(posts), None) if take else self.sent.get(id(posts))
        if sent is None:
            return None
        return sent[1].result(), sent[3]

    def unloaded(self, posts: list[Post]) -> frozenset[tuple[str, str]]:
        """For a lookup made in turn, now: the posts it shares with batches started and not known to be loaded
        (the batches read before it have all been started)."""
        return self._shared(_keys(posts), self.started())

    @staticmethod
    def _shared(keys: frozenset[tuple[str, str]], others: list[frozenset[tuple[str, str]]]) -> frozenset[tuple[str, str]]:
        return frozenset().union(*(keys & o for o in others))  # each & walks the smaller set, in C

    def close(self) -> None:
        """Lookups not begun are dropped, the one under way is waited for; then the thread and connection go."""
        for sent in self.sent.values():
            sent[1].cancel()
        self.sent.clear()
        self.thread.shutdown(wait=True)
        self.db.close()


def _keys(posts: Iterable[Post]) -> frozenset[tuple[str, str]]:
    """The posts' keys as stored."""
    return frozenset((p.platform, clean_text(p.post_id)) for p in posts)


def _load(archiver: Archiver, batch: _Batch, stats: RunStats, source: str) -> datetime | None:
    with FORKING.working():  # no scoring worker is forked while this thread is inside libpq (etl/ahead.py)
        return archiver.load(batch, stats, source)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


class Archiver:
    """Takes a stream of posts to the archive: scores, archives images, loads rows, in bounded memory.

    With `db` None nothing is looked up or written; with `store` None no image is fetched (a dry run: both).
    """

    def __init__(
        self,
        settings: Settings,
        db: Database | None,
        store: ObjectStore | None,
        *,
        downloader: Downloader | None = None,
        enricher: SentimentEnricher | None = None,
        stop: threading.Event | None = None,
        scorers: EarlyScorers | None = None,
    ):
        self.settings = settings
        # Failed images a lookup holds back as the retry queue would (etl/db/archive.py KNOWN_MEDIA_SQL).
        self._retry_limits = (settings.image_max_attempts, settings.image_retry_backoff_minutes)
        self.archive_db: Archive | NothingWritten = Archive(db, retry=self._retry_limits) if db is not None else NothingWritten()
        self.store = store
        self.downloader = downloader or Downloader(settings)
        self.enricher = enricher or SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language)
        self.clock = StageClock()  # shared with the image workers; RunStats.stages points here
        self.stop = stop or threading.Event()  # SIGTERM: no new downloads, a short grace for those in flight
        self._grace_ends: float | None = None
        self._batches = 0
        self._ahead: _LookAhead | None = None  # each batch looked up as it is read (while archive() runs)
        # The images being fetched by batches not loaded yet (a key leaves once its batch is committed): a post in two
        # batches is fetched once, or the later download would overwrite the object the earlier batch recorded.
        self._fetching: dict[tuple[str, str, int], Future] = {}
        # Downloads left behind by a stop (not done within ETL_STOP_GRACE; recorded failed): they store nothing (no
        # row would name it, and a forget of the post meanwhile could not have seen it).
        self._left_behind: set[tuple[str, str, int]] = set()
        self._scorers = scorers  # scoring workers forked early (a new archive), for the first stream that scores
        self.live = LiveCounts()  # what is under way, for the progress display
        self.fence: Callable[[], None] = lambda: None  # before each write: raises when the run may not write now
        self._db = db

    # -- the stream ------------------------------------------------------------------------------

    def archive(
        self, posts: Iterable[Post], stats: RunStats, *, source: str, trusted: Iterable[str] = ()
    ) -> datetime | None:
        """Archive every post; returns the newest created_at loaded (the next watermark). `trusted`: host:port
        pairs the source itself serves (the mock's image server), fetched although they are private.

        A batch whose images download is loaded once the next batch has started (so their downloads overlap); a
        batch without is handed to the loader thread at once, and loaded while the next is read and scored. When
        the stream fails (a SourceError, a bug in a source), every post it yielded is still loaded before the
        error goes on; when loading itself fails (LoadError: the database is gone), nothing more can be done and
        the error goes on once the load in flight has ended.
        """
        self.downloader.guard.trusted = set(trusted)
        newest: datetime | None = None
        stats.stages = self.clock
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="images")
        loader = _Loader(self, self._db) if self._db is not None else None
        # Batches started (planned, their downloads begun, scored) and neither loaded nor handed to the loader, in
        # the stream's order. Whatever goes wrong, the handler below loads them before the error goes on.
        waiting: list[_Batch] = []

        def started() -> list[frozenset[tuple[str, str]]]:  # not known to be loaded: waiting, or with the loader
            return [b.keys for b in waiting] + (loader.keys() if loader is not None else [])

        try:
            if self._db is not None:
                self._ahead = _LookAhead(
                    self._db, self.enricher.version, started=started, worth=lambda batch: not self._fetches_images(batch),
                    retry=self._retry_limits,
                )  # fmt: skip
            try:
                # Timed a batch at a time (the clock per post cost more than a tenth of a metadata run's parsing).
                fetching = self.live.counting(self._allowed(posts, stats))
                batches = self.clock.timed(chunked(fetching, self._batch_size), "fetch")
                if self._ahead is not None:
                    batches = self._ahead.reading(batches)
                ahead = score_ahead(
                    self.enricher, batches, in_process=self._fetches_images, unscored=self._unscored, early=self._scorers
                )
                # Closed at once when the loop fails: its workers end now, not when the traceback is let go.
                with closing(ahead):
                    for posts_batch in ahead:
                        waiting.append(self._start(posts_batch, pool, stats, source))
                        # A batch whose images download waits for the next batch to start (their downloads
                        # overlap); one without goes to the loader thread at once.
                        keep = 1 if waiting[-1].futures or loader is None else 0
                        while len(waiting) > keep:
                            newest = _later(newest, self._load_next(waiting, loader, stats, source))
                while waiting:
                    newest = _later(newest, self._load_next(waiting, loader, stats, source))
                if loader is not None:
                    newest = _later(newest, loader.collect(stats))
            except KeyboardInterrupt:
                raise
            except LoadError:
                if loader is not None:
                    loader.collect(stats)  # the loads in flight are of earlier batches: their first failure goes first
                raise
            except BaseException:
                if loader is not None:  # a load's own failure goes first (the stream's error is its context)
                    newest = _later(newest, loader.collect(stats))
                for batch in waiting:
                    self.load(batch, stats, source)
                raise
        finally:
            if self._ahead is not None:
                self._ahead.close()
                self._ahead = None
            if loader is not None:
                loader.close(stats)
            # After a stop, a download stalled past the grace is left behind (its image is recorded failed).
            pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
        return newest

    def _load_next(
        self, waiting: list[_Batch], loader: _Loader | None, stats: RunStats, source: str
    ) -> datetime | None:
        """Load the first of `waiting`: on a loader thread when none of its images is downloading (the main thread
        goes on at once), once a lane is free and no load in flight shares a post with it; else here, once every
        load in flight has ended. An error of a load in flight goes on with the batch still waiting. The newest
        created_at of the loads that finished."""
        if loader is None or waiting[0].futures:
            newest = loader.collect(stats) if loader is not None else None
            return _later(newest, self.load(waiting.pop(0), stats, source))
        newest = loader.make_room(waiting[0], stats)  # its error goes on with the batch still waiting
        loader.submit(waiting.pop(0), source)
        return newest

    def _batch_size(self, previous: list[Post] | None) -> int:
        """ETL_BATCH_SIZE; after a batch without images, ETL_METADATA_BATCH_SIZE (4 x ETL_BATCH_SIZE unless set):
        what such a batch costs is per row, and each batch costs its round trips and its hand-overs besides."""
        if previous is None or any(p.image_urls for p in previous):
            return self.settings.batch_size
        return self.settings.metadata_batch_size or 4 * self.settings.batch_size

    def _fetches_images(self, posts: list[Post]) -> bool:
        """A batch whose images keep the cores busy (one image per two posts or more): scored in-process."""
        return self.store is not None and sum(len(p.image_urls) for p in posts) * 2 >= len(posts)

    def _unscored(self, posts: list[Post]) -> bool:
        """Whether most of these posts have no decision stored by this enricher (a first load): asked of a stream's
        first batch without images, so that the scoring workers start before it is scored (etl/ahead.py). Asks
        the lookup made as the batch was read, which plan() then takes."""
        try:
            with self.clock("lookup"):
                held, _ = self._look_up(posts, take=False)
        except LoadError:
            return False  # plan() tells it: the lookup keeps its error
        return len(held.scores) * 2 < len(_keys(posts))

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
        """The first three stages of a batch; its images download while the batch before it is loaded.

        The downloads start before the captions are scored (they need only the post's key and URLs): scoring,
        and the first batch's loading of the language model, runs while the image hosts answer."""
        posts, held = self.plan(posts, stats, source)
        futures, urls = self.images(posts, held, pool)
        scored = self.enrich(posts, held)
        stats.fetched += len(scored)
        self._batches += 1
        repairs = {k: held.repairs[k] for k in futures if k in held.repairs} if held.repairs else {}
        return _Batch(scored, futures, held.stored, urls, self._batches, held.rows, _keys(scored), repairs)

    # -- the stages ------------------------------------------------------------------------------

    def plan(self, posts: list[Post], stats: RunStats, source: str) -> tuple[list[Post], Held]:
        """What the archive holds of these posts already; posts forgotten on request are dropped here.

        The stored rows tell the load which posts it need not send (upsert_posts' `stored`). A post that a batch
        read before this one shares with it (that batch not known to be loaded when this lookup was sent) has its
        row dropped: that load may write it after this lookup, so it goes to the database, which compares with
        what is stored by then (the last in the stream wins)."""
        with self.clock("lookup"):
            try:
                held, unloaded = self._look_up(posts, take=True)
            except LoadError as exc:
                raise _not_loaded(exc, _Batch(posts, {}, {}, number=self._batches + 1), source) from None
            if unloaded and held.rows:
                held = held._replace(rows={k: r for k, r in held.rows.items() if k not in unloaded})
            if unloaded and self.store is not None:
                held = self._shared_images(posts, held, unloaded)
        if held.forgotten:  # forgotten on request: never archived again (etl/forget.py)
            kept = [p for p in posts if (p.platform, p.post_id) not in held.forgotten]
            stats.forgotten_skipped += len(posts) - len(kept)
            posts = kept
        return posts, held

    def _shared_images(self, posts: list[Post], held: Held, unloaded: frozenset[tuple[str, str]]) -> Held:
        """Of the posts a batch read before this one may still load: the images it is fetching (`busy`: not fetched
        again), and those stored since this batch's lookup (a key leaves `_fetching` only once its batch committed,
        so, taken before this look, the two miss none)."""
        busy = frozenset(self._fetching)
        shared = [p for p in posts if p.image_urls and (p.platform, clean_text(p.post_id)) in unloaded]
        if not shared:
            return held
        return held._replace(stored={**held.stored, **self.archive_db.stored_images(shared)}, busy=busy)

    def _look_up(self, posts: list[Post], *, take: bool) -> tuple[Held, frozenset[tuple[str, str]]]:
        """The lookup sent as the batch was read, or one made now; with the posts it shares with batches read before
        it that may load after it began."""
        ahead = self._ahead
        made = ahead.result(posts, take=take) if ahead is not None else None
        if made is not None:
            return made
        unloaded = ahead.unloaded(posts) if ahead is not None else frozenset()  # outside archive(): none in flight
        return self.archive_db.held(posts, self.enricher.version), unloaded

    def enrich(self, posts: list[Post], held: Held) -> list[Post]:
        """Sentiment and language. A caption already scored by this enricher (a rerun, an overlap window) keeps
        its score. A caption over the cap is cut first (and flagged), so the score is the stored caption's."""
        with self.clock("enrich"):
            return self.enricher.enrich_all(
                [cap_caption(p) for p in posts], [held.scores.get((p.platform, p.post_id)) for p in posts]
            )

    def images(
        self, posts: list[Post], held: Held, pool: ThreadPoolExecutor
    ) -> tuple[dict[tuple[str, str, int], Future], dict[tuple[str, str, int], str]]:
        """Start the downloads of images not stored yet (none without a store); (futures, their URLs)."""
        futures: dict[tuple[str, str, int], Future] = {}
        urls: dict[tuple[str, str, int], str] = {}
        if self.store is None:
            return futures, urls
        stored, hopeless, busy = held.stored, held.hopeless, held.busy
        for post in posts:
            for position, url in enumerate(post.image_urls):
                key = (post.platform, post.post_id, position)
                if key in stored or key in futures or key in busy:
                    continue  # archived already (a rerun: every image), twice in the batch, or an earlier batch's
                if key in hopeless and hopeless[key] == without_userinfo(url):
                    continue  # failed for good at this URL (404, not an image...): not fetched again
                futures[key] = pool.submit(
                    self.archive_image, post.platform, post.post_id, post.created_at, position, url,
                    replace=key in held.repairs,
                )  # fmt: skip
                urls[key] = url
        self._fetching.update(futures)
        return futures, urls

    def load(self, batch: _Batch, stats: RunStats, source: str) -> datetime | None:
        """Wait for the batch's images, then load posts and image rows in one transaction; returns the newest
        created_at loaded. Counted only once committed."""
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
                self.fence()  # the run's locks lost (Runner.fence): not loaded
                counts, loaded, media = self._load(batch.posts, _by_post(media), first_urls, stats, source, batch.rows)
            except DataRefused:
                raise
            except LoadError as exc:
                raise _not_loaded(exc, batch, source) from None
            finally:
                for key in batch.futures:  # committed (or never to be): a later batch's lookup sees what it stored
                    self._fetching.pop(key, None)
        log.debug(
            "loaded %d posts (%d new, %d updated, %d unchanged) and %d image rows",
            len(loaded), counts.inserted, counts.updated, counts.unchanged, len(media),
        )  # fmt: skip
        if batch.repairs:  # a repair stored under another key than the damaged object's: that one goes
            self._drop_replaced_objects(
                [(batch.repairs[k], m) for m in media if (k := (m.platform, m.post_id, m.position)) in batch.repairs]
            )
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
        stored: dict[tuple[str, str], HeldRow],
    ) -> tuple[UpsertCounts, list[Post], list[Media]]:
        """Load posts with their image rows in one transaction. When the database refuses a row (DataRefused),
        halve the batch until the row is alone: it is reported with its line or post id and the database's
        reason, and every other row loads. Posts whose `stored` row would not change are not sent (counted
        unchanged, and loaded). Returns (counts, posts loaded, image rows loaded)."""
        rows = [m for p in posts for m in media.pop((p.platform, p.post_id), [])]
        what = f"{len(posts)} post(s) of {source}"
        try:
            counts = self.archive_db.load(posts, rows, first_urls, self.enricher.version, what=what, stored=stored)
            if counts.forgotten:  # tombstoned since the lookup (a forget, another run's deletions at source)
                gone = counts.forgotten
                stats.forgotten_skipped += len(gone)
                self._drop_objects_of_gone_posts([m for m in rows if (m.platform, clean_text(m.post_id)) in gone])
                posts = [p for p in posts if (p.platform, clean_text(p.post_id)) not in gone]
                rows = [m for m in rows if (m.platform, clean_text(m.post_id)) not in gone]
            return counts, posts, rows
        except DataRefused as exc:
            if len(posts) == 1:
                post = posts[0]
                where = f"{post.origin} (post {post.platform}/{post.post_id[:100]})" if post.origin else (
                    f"post {post.platform}/{post.post_id[:100]}"
                )  # fmt: skip
                stats.rejected += 1
                stats.error(f"{source}: {where}: refused by the database: {exc.reason}")
                log.warning("%s: %s refused by the database: %s", source, where, exc.reason)
                return UpsertCounts(), [], []
        half = len(posts) // 2
        grouped = _by_post(rows)
        counts_a, loaded_a, rows_a = self._load(posts[:half], grouped, first_urls, stats, source, stored)
        counts_b, loaded_b, rows_b = self._load(posts[half:], grouped, first_urls, stats, source, stored)
        counts = UpsertCounts(
            counts_a.inserted + counts_b.inserted, counts_a.updated + counts_b.updated,
            counts_a.unchanged + counts_b.unchanged, counts_a.snapshots + counts_b.snapshots,
        )  # fmt: skip
        return counts, loaded_a + loaded_b, rows_a + rows_b

    # -- one image -------------------------------------------------------------------------------

    def archive_image(
        self, platform: str, post_id: str, created_at: datetime, position: int, url: str, *, replace: bool = False
    ) -> Media:
        """Download, verify and store one image; never raises (a failure is a Media with status failed).
        `replace`: the stored object failed a fixity check (etl.py verify), so it is overwritten unconditionally."""
        media = Media(platform, post_id, position, without_userinfo(url))  # never stored or logged with credentials
        if self.stop.is_set():
            media.status, media.error, media.tried = (
                "failed",
                "not downloaded: the run was stopped (SIGTERM); retried by the next run",
                False,
            )
            return media
        self.live.image_started()
        try:
            with self.clock("download"):
                fetched = self.downloader.fetch(url)
            if (platform, post_id, position) in self._left_behind:
                raise MediaError("not stored: the stop had left this download behind (recorded failed)")
            key = object_key(self.settings.s3_prefix, platform, created_at, post_id, position, fetched.content_type)
            assert self.store is not None
            with self.clock("store"):
                try:
                    self.store.put(key, fetched.body, fetched.content_type, fetched.sha256, replace=replace)
                except KeyHeld:
                    fetched = self._held_image(key, fetched)
        except MediaError as exc:
            media.status, media.error, media.permanent, media.tried = "failed", str(exc), exc.permanent, exc.requested
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

    def _held_image(self, key: str, fetched: Fetched) -> Fetched:
        """The image under `key` when another run stored other bytes there first (a run at the same time, or one
        killed before it recorded them; the platform served another version of the image). Those bytes stay, and
        are what this image's row records: the row and the object agree, whichever run records it (a post's
        first image version is kept, as within one run). Bytes that are not an image of the key's type are replaced."""
        assert self.store is not None
        body = self.store.read(key)
        try:
            content_type, width, height = sniff_image(body, self.downloader.budget)
        except MediaError as exc:
            content_type, width, height, why = "", 0, 0, str(exc)
        else:
            why = f"it is {content_type}"
        if key.endswith("." + EXTENSIONS.get(content_type, "?")):
            log.info(
                "%s: another run stored this image first (%d bytes; this download had %d): that one is kept",
                key, len(body), len(fetched.body),
            )  # fmt: skip
            return Fetched(body, content_type, hashlib.sha256(body).hexdigest(), width, height, fetched.final_url)
        log.warning("%s held bytes that are no image of its key (%s): replaced", key, why)
        self.store.put(key, fetched.body, fetched.content_type, fetched.sha256, replace=True)
        return fetched

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
                never_started = future.cancel()
                results[key] = unfinished(key)
                results[key].tried = not never_started  # one cancelled before it began was never requested
        return results

    def _delete_object(self, key: str, what: str) -> bool:
        """Delete one object of the store; a failure is logged (`what` says which object it was), not raised."""
        from etl.store_ops import delete_object

        assert self.store is not None
        try:
            delete_object(self.store, key)
        except StoreError as exc:
            log.warning("could not delete %s, %s: %s", key, what, exc)
            return False
        return True

    def _unfinished(self, platform: str, post_id: str, position: int, url: str) -> Media:
        self._left_behind.add((platform, post_id, position))
        url = without_userinfo(url)  # as archive_image stores and logs it: never with credentials
        media = Media(platform, post_id, position, url)
        media.status = "failed"
        media.error = (
            f"the run was stopped (SIGTERM) before this download finished (ETL_STOP_GRACE="
            f"{self.settings.stop_grace:g}s); retried by the next run"
        )
        log.warning("image not finished before the stop: %s/%s #%d %s", platform, post_id, position, url[:200])
        return media

    # -- failed images from earlier runs ---------------------------------------------------------

    def retry_failed_images(self, stats: RunStats, part: Shard | None = None) -> None:
        """Retry images still marked failed (not permanent, under the attempt cap, past their backoff); with
        `part` K/N only those whose id is K-1 modulo N, so that N workers never take the same image."""
        last_id = 0
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="retry")
        try:
            while not self.stop.is_set() and (rows := self._failed_images(last_id, part)):
                last_id = rows[-1][0]
                futures = {
                    r: pool.submit(self.archive_image, r[1], r[2], r[5], r[3], r[4], replace=r[6]) for r in rows
                }
                results = self._results(futures, lambda r: self._unfinished(r[1], r[2], r[3], r[4]))
                media = list(results.values())
                self.fence()
                gone = self.archive_db.record_retries(media)
                self._drop_objects_of_gone_posts(gone)
                self._drop_replaced_objects([(r[7], m) for r, m in results.items() if not any(m is g for g in gone)])
                media = [m for m in media if not any(m is g for g in gone)]
                stats.images_retried += len(media)
                stats.count_images(media, "retry")
        finally:
            pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)

    def _drop_objects_of_gone_posts(self, gone: list[Media]) -> None:
        """Images of posts forgotten since their lookup (fetched for a batch, or retried): not recorded, and what was
        stored of them is deleted (no row would name it, and the forget that removed the post may not have seen it)."""
        if not gone:
            return
        for m in gone:
            if m.status == "stored" and m.key and self.store is not None:
                self._delete_object(m.key, "the image of a post forgotten meanwhile")
        log.info("%d image(s) of post(s) forgotten meanwhile: not recorded, their objects deleted", len(gone))

    def _drop_replaced_objects(self, retried: list[tuple[str | None, Media]]) -> None:
        """Repairs stored under another key than the damaged object's (the platform now serves another type: .png
        where the key said .jpg), now recorded: the old object is deleted, unless a row still names it. Left there,
        no row would know it and every later full verify would report it as unexpected. A failure to delete is
        logged: the repair stands, and verify names the object."""
        old = {key for key, m in retried if key and m.status == "stored" and m.key and m.key != key}
        if not old or self.store is None:
            return
        for key in sorted(old - self.archive_db.keys_in_use(sorted(old))):
            if self._delete_object(key, "the damaged object a repair replaced under another key"):
                log.info("deleted %s: its repair was stored under another key", key)

    def _failed_images(self, after: int, part: Shard | None) -> list[tuple]:
        return self.archive_db.failed_images(
            after=after, max_attempts=self.settings.image_max_attempts,
            backoff_minutes=self.settings.image_retry_backoff_minutes,
            part=(part.index, part.count) if part else (1, 1), limit=self.settings.batch_size,
        )  # fmt: skip
