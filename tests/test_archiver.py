"""The archiver's batch scheduling: metadata batches loaded on the loader thread while the next is prepared, their
sizes, and the guarantees that hold across the hand-over (order, counts once committed, a LoadError's batch)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from etl.errors import LoadError
from etl.records import Post, chunked
from etl.run.archiver import Archiver
from etl.run.stats import RunStats
from tests.conftest import query
from tests.support import Reply, png_bytes

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)


def posts(n: int, *, start: int = 0, images: bool = False, caption: str = "a lovely day") -> list[Post]:
    return [
        Post("direct", f"p{i}", T0 + timedelta(minutes=i), caption=f"{caption} {i}", like_count=i,
             image_urls=("https://images.example/a.png",) if images else ())
        for i in range(start, start + n)
    ]  # fmt: skip


@pytest.fixture
def loaded_batches(monkeypatch) -> list[int]:
    """The size of every batch the archiver loads, on any thread, in the stream's order (two loads may run at once)."""
    sizes: dict[int, int] = {}
    load = Archiver.load

    def counting(self, batch, stats, source):
        sizes[batch.number] = len(batch.posts)
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", counting)

    class InOrder(list):
        def sizes(self) -> list[int]:
            return [sizes[n] for n in sorted(sizes)]

        def __eq__(self, other: object) -> bool:
            return self.sizes() == other

        def __ne__(self, other: object) -> bool:
            return self.sizes() != other

        def __len__(self) -> int:
            return len(sizes)

        def __repr__(self) -> str:
            return repr(self.sizes())

    return InOrder()


@pytest.fixture
def load_events(monkeypatch) -> list[tuple[str, int]]:
    """("start" | "end", batch number) of every load, on any thread, in order; batch 1's load takes 0.5 s more:
    long enough for a later batch to be loaded meanwhile, were it not held back."""
    import threading
    import time

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    load = Archiver.load

    def slow_first(self, batch, stats, source):
        with lock:
            events.append(("start", batch.number))
        if batch.number == 1:
            time.sleep(0.5)
        try:
            return load(self, batch, stats, source)
        finally:
            with lock:
                events.append(("end", batch.number))

    monkeypatch.setattr(Archiver, "load", slow_first)
    return events


def test_chunked_takes_each_batch_size_from_the_batch_before():
    sizes = lambda before: 2 if before is None else len(before) + 1  # noqa: E731
    assert list(chunked(iter(range(10)), sizes)) == [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9]]


@pytest.mark.parametrize(
    ("env", "images", "expected"),
    [
        ({}, False, [4, 16, 10]),  # 4 x ETL_BATCH_SIZE after a batch without images
        ({"ETL_METADATA_BATCH_SIZE": "7"}, False, [4, 7, 7, 7, 5]),
        ({}, True, [4, 4, 4, 4, 4, 4, 4, 2]),  # a batch with images keeps the next at ETL_BATCH_SIZE
    ],
)
def test_batches_without_images_grow_to_the_metadata_batch_size(db, make_settings, loaded_batches, env, images, expected):
    archiver = Archiver(make_settings(ETL_BATCH_SIZE="4", **env), db, None)
    stats = RunStats()
    newest = archiver.archive(iter(posts(30, images=images)), stats, source="direct")
    assert loaded_batches == expected
    assert (stats.fetched, stats.inserted) == (30, 30)
    assert newest == T0 + timedelta(minutes=29)
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(30,)]


def test_a_post_seen_again_in_a_later_batch_ends_as_its_last_version(db, make_settings):
    """Batches loaded on the loader thread are committed in the stream's order, one at a time."""
    archiver = Archiver(make_settings(ETL_BATCH_SIZE="5", ETL_METADATA_BATCH_SIZE="5"), db, None)
    stream = posts(12) + posts(3, caption="an awful day") + posts(4, start=12) + [
        Post("direct", "p0", T0, caption="the very last word", like_count=999)
    ]
    stats = RunStats()
    archiver.archive(iter(stream), stats, source="direct")
    assert (stats.fetched, stats.inserted, stats.updated, stats.unchanged) == (20, 16, 4, 0)
    assert query(db.dsn, "SELECT caption, like_count FROM social_posts WHERE post_id = 'p0'") == [("the very last word", 999)]
    assert query(db.dsn, "SELECT post_id FROM social_posts WHERE caption LIKE 'an awful day%%' ORDER BY 1") == [("p1",), ("p2",)]
    assert sum(stats.sentiment.values()) == 20
    # The loader's own connections are closed when the stream is archived: only the archiver's stays (a closed
    # connection's server process leaves pg_stat_activity a moment after the close).
    import time

    deadline = time.monotonic() + 5
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'social-archiver' AND datname = current_database()"
    while query(db.dsn, sql) != [(1,)] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert query(db.dsn, sql) == [(1,)]


@pytest.mark.fault("the loader thread's connection is cut mid-run: the run stops naming the batch, counts only what committed")
def test_a_load_error_on_the_loader_thread_stops_the_run_after_what_was_committed(db, make_settings, loaded_batches):
    db.reconnect_seconds = 0  # the loader's connection copies it: a lost connection is a LoadError at once
    main_pid = db.connection().get_backend_pid()
    archiver = Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None)

    def stream():
        for n, post in enumerate(posts(100)):
            if n == 45:  # batches 1-3 handed over by now: cut the loader's connection, not the archiver's own
                query(db.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name ="
                      " 'social-archiver' AND datname = current_database() AND pid <> %s", (main_pid,))  # fmt: skip
            yield post

    stats = RunStats()
    with pytest.raises(LoadError) as raised:
        archiver.archive(stream(), stats, source="direct")
    assert "Not loaded: batch" in str(raised.value) and "of direct (10 posts" in str(raised.value)
    assert "the watermark did not move" in str(raised.value)
    stored = query(db.dsn, "SELECT count(*) FROM social_posts")[0][0]
    assert 10 <= stored < 100 and stored % 10 == 0  # whole batches only
    assert stats.inserted == stored  # counted once committed, and only that
    assert len(loaded_batches) < 10  # the run stopped: the batches after the failed one were never loaded


@pytest.mark.fault("the loader thread's load fails with an unexpected error: the batches already read are still loaded")
def test_a_failed_load_on_the_loader_thread_leaves_no_batch_read_behind(db, make_settings, monkeypatch):
    """The error of the load in flight surfaces when the next batch is handed over; that batch (read, looked up
    and scored) and any other started batch is loaded before the error goes on, as when a stream fails."""
    load = Archiver.load

    def failing(self, batch, stats, source):
        if batch.posts[0].post_id == "p10":
            raise RuntimeError("a bug in the second batch's load")
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", failing)
    archiver = Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None)
    stats = RunStats()
    with pytest.raises(RuntimeError, match="second batch"):
        archiver.archive(iter(posts(40)), stats, source="direct")
    stored = {row[0] for row in query(db.dsn, "SELECT post_id FROM social_posts")}
    assert {f"p{n}" for n in range(10)} <= stored  # the batch before
    assert {f"p{n}" for n in range(20, 30)} <= stored  # read while the failing load was in flight
    assert not stored & {f"p{n}" for n in range(10, 20)}
    assert stats.inserted == len(stored)


def test_the_loader_thread_loads_holding_the_fork_lock(db, make_settings, monkeypatch):
    """No scoring worker is forked while the loader thread is inside libpq (etl/ahead.py FORKING)."""
    import threading

    from etl.ahead import FORKING

    seen: list[tuple[str, bool]] = []
    load = Archiver.load

    def watching(self, batch, stats, source):
        seen.append((threading.current_thread().name, FORKING.held_here()))
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", watching)
    Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None).archive(
        iter(posts(30)), RunStats(), source="direct"
    )
    on_loader = [locked for name, locked in seen if name.startswith("loader")]
    assert len(on_loader) == 3 and all(on_loader)


def test_two_batches_sharing_no_post_load_at_once(db, make_settings, monkeypatch):
    """The second batch's load starts while the first is still in flight (each on its own connection)."""
    import threading

    second_started = threading.Event()
    load = Archiver.load
    overlapped: list[bool] = []

    def watching(self, batch, stats, source):
        if batch.number == 2:
            second_started.set()
        elif batch.number == 1:  # held in flight until the second batch's load has begun (or 10 s)
            overlapped.append(second_started.wait(10))
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", watching)
    stats = RunStats()
    Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None).archive(
        iter(posts(30)), stats, source="direct"
    )
    assert overlapped == [True]
    assert (stats.fetched, stats.inserted) == (30, 30)
    assert query(db.dsn, "SELECT count(*), count(DISTINCT post_id) FROM social_posts") == [(30, 30)]


def test_a_batch_sharing_a_post_with_a_load_in_flight_waits_for_it(db, make_settings, load_events):
    """Batch 2 repeats a post of batch 1, whose load is slow: batch 2 is loaded only once batch 1 is committed
    (a lane is free, but they share a post), so the last of the post's duplicates wins."""
    stream = [*posts(2), Post("direct", "p0", T0, caption="the last word", like_count=99), *posts(1, start=2)]
    stats = RunStats()
    Archiver(make_settings(ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2"), db, None).archive(
        iter(stream), stats, source="direct"
    )
    assert load_events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert query(db.dsn, "SELECT caption, like_count FROM social_posts WHERE post_id = 'p0'") == [("the last word", 99)]
    assert query(db.dsn, "SELECT like_count FROM post_engagement WHERE post_id = 'p0' ORDER BY observed_at") == [(0,), (99,)]
    assert (stats.fetched, stats.inserted, stats.updated) == (4, 3, 1)


def test_a_batch_looked_up_in_turn_drops_the_row_a_load_in_flight_may_change(
    db, make_settings, load_events, http_server, monkeypatch
):
    """Batch 2 has images to fetch, so it is looked up in turn (not ahead, as it is read), while batch 1's slow load,
    which changes a post they share, is in flight: the post's stored row may be stale, so batch 2 sends it, and the
    database, finding batch 1's write, takes batch 2's values back (the last wins)."""
    import dataclasses
    import threading

    from etl.db import Archive
    from etl.store import LocalStore

    http_server.routes["/a.png"] = Reply(body=png_bytes(8, 6), content_type="image/png")
    url = (f"{http_server.base}/a.png",)
    settings = make_settings(ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2", ETL_ALLOW_PRIVATE_HOSTS="true")
    kept = Post("direct", "p0", T0, caption="as it was", like_count=1, image_urls=url)
    Archiver(settings, db, LocalStore(settings.objects_dir)).archive(iter([kept]), RunStats(), source="direct")
    load_events.clear()
    looked_up: list[tuple[str, str, bool]] = []  # (first post, thread, whether batch 1's load had ended)
    held = Archive.held

    def looking_up(self, posts, version):
        looked_up.append((posts[0].post_id, threading.current_thread().name.rsplit("_", 1)[0], ("end", 1) in load_events))
        return held(self, posts, version)

    monkeypatch.setattr(Archive, "held", looking_up)
    stream = [dataclasses.replace(kept, like_count=5, image_urls=()), *posts(1, start=1), kept,
              Post("direct", "p2", T0, caption="another", like_count=2, image_urls=url)]  # fmt: skip
    stats = RunStats()
    Archiver(settings, db, LocalStore(settings.objects_dir)).archive(iter(stream), stats, source="direct")
    # Batch 1 ahead, batch 2 in turn: each before batch 1's load had ended.
    assert looked_up == [("p0", "lookup", False), ("p0", "MainThread", False)]
    assert load_events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert query(db.dsn, "SELECT like_count FROM social_posts WHERE post_id = 'p0'") == [(1,)]
    assert query(db.dsn, "SELECT like_count FROM post_engagement WHERE post_id = 'p0' ORDER BY observed_at") == [(1,), (5,), (1,)]
    assert (stats.images_stored, stats.inserted, stats.updated) == (1, 2, 2)


def test_the_fork_gate_lets_loads_share_it_and_a_fork_wait_for_them():
    import threading

    from etl.ahead import ForkGate

    gate = ForkGate()
    inside = threading.Barrier(3, timeout=5)
    leave = threading.Event()
    forked = threading.Event()

    def work():
        with gate.working():
            inside.wait()  # both threads are inside at once
            assert leave.wait(5)

    def fork():
        with gate.forking():
            assert not gate.busy()
            forked.set()

    workers = [threading.Thread(target=work, daemon=True) for _ in range(2)]
    for t in workers:
        t.start()
    inside.wait()
    assert gate.busy()
    forking = threading.Thread(target=fork, daemon=True)
    forking.start()
    assert not forked.wait(0.2)  # the fork waits while a thread is inside
    leave.set()
    for t in [*workers, forking]:
        t.join(5)
        assert not t.is_alive()
    assert forked.is_set() and not gate.busy()


def test_the_fork_gate_keeps_new_work_out_while_a_fork_waits():
    import threading

    from etl.ahead import ForkGate

    gate = ForkGate()
    order: list[str] = []
    release = threading.Event()

    def first():
        with gate.working():
            order.append("first in")
            assert release.wait(5)

    def fork():
        with gate.forking():
            order.append("fork")

    def late():
        with gate.working():
            order.append("late in")

    import time

    a = threading.Thread(target=first, daemon=True)
    a.start()
    deadline = time.monotonic() + 5
    while not order and time.monotonic() < deadline:
        time.sleep(0.01)
    f = threading.Thread(target=fork, daemon=True)
    f.start()
    while not gate._forks and time.monotonic() < deadline:  # the fork is waiting
        time.sleep(0.01)
    assert order == ["first in"] and gate._forks == 1
    b = threading.Thread(target=late, daemon=True)
    b.start()
    threading.Event().wait(0.1)
    release.set()
    for t in (a, f, b):
        t.join(5)
        assert not t.is_alive()
    assert order == ["first in", "fork", "late in"]


def test_when_two_loads_in_flight_fail_the_earlier_batch_is_named(db, make_settings, monkeypatch):
    """Batches 1 and 2 load at once and both fail (the database is gone), batch 2 first: the run's error is batch
    1's, not the later batch's, and nothing is counted that was not committed."""
    import threading

    second_failed = threading.Event()
    load = Archiver.load

    def failing(self, batch, stats, source):
        if batch.number == 1:
            assert second_failed.wait(10)  # batch 2 fails first, while batch 1 is still in flight
            raise LoadError("the first batch's load failed")
        if batch.number == 2:
            second_failed.set()
            raise LoadError("the second batch's load failed")
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", failing)
    stats = RunStats()
    with pytest.raises(LoadError, match="first batch"):
        Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None).archive(
            iter(posts(30)), stats, source="direct"
        )
    assert second_failed.is_set()
    assert stats.inserted == 0


def test_a_fork_interrupted_while_it_waits_lets_the_work_go_on():
    """Ctrl-C while a fork waits for the gate: the fork backs out, and work is let in again (it was kept out)."""
    import threading

    from etl.ahead import ForkGate

    gate = ForkGate()
    inside, leave = threading.Event(), threading.Event()

    def work():
        with gate.working():
            inside.set()
            assert leave.wait(5)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    assert inside.wait(5)

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    gate._cond.wait = interrupted  # the fork's wait for the worker is interrupted
    with pytest.raises(KeyboardInterrupt):
        with gate.forking():
            pass
    del gate._cond.wait
    entered = threading.Event()

    def late():
        with gate.working():
            entered.set()

    other = threading.Thread(target=late, daemon=True)
    other.start()
    assert entered.wait(5)  # not kept out by a fork that is gone
    leave.set()
    for t in (worker, other):
        t.join(5)
        assert not t.is_alive()
    assert not gate.busy()


@pytest.mark.parametrize("failure", [LoadError("batch 1 lost its connection"), RuntimeError("a bug in batch 1's load")])
def test_a_stream_error_does_not_hide_a_failed_load_in_flight(db, make_settings, monkeypatch, failure):
    """Batch 1's load fails on a loader thread, then the source fails: the load's error goes on (the stream's is
    its context), so the run is not taken for a source failure whose resume point would cover batch 1.
    (Found in review: the stream's error went on and batch 1's was only logged at debug level.)"""
    from etl.errors import SourceError

    load = Archiver.load

    def failing(self, batch, stats, source):
        if batch.number == 1:
            raise failure
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", failing)

    def stream():
        yield from posts(20)
        raise SourceError("the source went away")

    with pytest.raises(type(failure), match="batch 1") as raised:
        Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None).archive(
            stream(), RunStats(), source="direct"
        )
    chain, error = [], raised.value
    while error is not None:
        chain.append(type(error))
        error = error.__context__
    assert SourceError in chain


def test_a_load_waited_for_when_ctrl_c_comes_is_still_counted(db, make_settings, monkeypatch):
    """Interrupted while the main thread waits for a load, the load stays in flight: close() waits for it and
    counts what it committed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import contextmanager

    from etl.run.archiver import _Loader

    release = threading.Event()
    load = Archiver.load

    def held(self, batch, stats, source):
        assert release.wait(10)
        return load(self, batch, stats, source)

    archiver = Archiver(make_settings(), db, None)
    stats = RunStats()
    with ThreadPoolExecutor(1) as pool:
        batch = archiver._start(posts(5), pool, stats, "direct")
    monkeypatch.setattr(Archiver, "load", held)
    loader = _Loader(archiver, db)
    loader.submit(batch, "direct")

    @contextmanager
    def ctrl_c(stage):
        raise KeyboardInterrupt
        yield

    loader.clock = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        loader.collect(stats)
    assert len(loader.in_flight) == 1  # not dropped: still in flight
    loader.clock = archiver.clock
    release.set()
    loader.close(stats)
    assert stats.inserted == 5
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(5,)]


def test_a_batch_with_images_is_loaded_after_the_loads_in_flight(db, make_settings, load_events, http_server):
    """Batch 2 has images (loaded on the main thread) and repeats a post of batch 1, whose load on a loader thread
    is slow: batch 2 is loaded only once batch 1 is committed, so the post ends as batch 2 says."""
    from etl.store import LocalStore

    http_server.routes["/a.png"] = Reply(body=png_bytes(8, 6), content_type="image/png")
    url = (f"{http_server.base}/a.png",)
    stream = [
        *posts(2),
        Post("direct", "p0", T0, caption="the last word", like_count=99, image_urls=url),
        Post("direct", "p2", T0, caption="another", like_count=2, image_urls=url),
    ]
    settings = make_settings(ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2", ETL_ALLOW_PRIVATE_HOSTS="true")
    stats = RunStats()
    Archiver(settings, db, LocalStore(settings.objects_dir)).archive(iter(stream), stats, source="direct")
    assert load_events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert query(db.dsn, "SELECT caption, like_count FROM social_posts WHERE post_id = 'p0'") == [("the last word", 99)]
    assert (stats.images_stored, stats.inserted, stats.updated) == (2, 3, 1)


@pytest.mark.parametrize("second_batch_waits", [True, False])
def test_a_post_in_two_batches_is_fetched_once_and_its_object_is_what_its_row_says(
    db, make_settings, http_server, second_batch_waits
):
    # The post again in the next batch with another image at position 0: that batch was planned while the first one's
    # download was in flight, fetched it again and overwrote the object, whose row (stored, never updated) kept the
    # first image's sha256. The first version is the one kept (an image stored is never replaced), object and row.
    import hashlib

    from etl.store import LocalStore

    red, blue = png_bytes(8, 6, (200, 0, 0)), png_bytes(8, 6, (0, 0, 200))
    http_server.routes["/red.png"] = Reply(body=red, delay=0.5 if second_batch_waits else 0)
    http_server.routes["/blue.png"] = Reply(body=blue)
    stream = [
        Post("direct", "p1", T0, caption="first version", image_urls=(http_server.url("/red.png"),)),
        Post("direct", "p1", T0, caption="edited version", image_urls=(http_server.url("/blue.png"),)),
    ]
    settings = make_settings(ETL_BATCH_SIZE="1", ETL_ALLOW_PRIVATE_HOSTS="true")
    store = LocalStore(settings.objects_dir)
    store.check()
    Archiver(settings, db, store).archive(iter(stream), RunStats(), source="direct")
    [(key, sha, source_url)] = query(db.dsn, "SELECT storage_key, sha256, source_url FROM post_media")
    assert hashlib.sha256(store.path(key).read_bytes()).hexdigest() == sha == hashlib.sha256(red).hexdigest()
    assert source_url == http_server.url("/red.png") and http_server.hits.get("/blue.png", 0) == 0
    assert query(db.dsn, "SELECT caption FROM social_posts") == [("edited version",)]  # the post: its last version


@pytest.mark.fault("two runs at once fetch the same new image, the platform serving each another version: one object, its row agrees")
def test_two_runs_storing_one_image_at_once_keep_the_object_the_row_records(db, make_settings, http_server):
    # Run B looked the post up (nothing stored), then its download was slow; run A stored and recorded the red version
    # meanwhile. B's put replaced the object with blue, and B's row write changed nothing (a stored row is never
    # downgraded): the row said red, the object was blue, and `verify` called the archive damaged.
    import hashlib
    import threading

    from etl.store import LocalStore

    red, blue = png_bytes(8, 6, (200, 0, 0)), png_bytes(8, 6, (0, 0, 200))
    http_server.routes["/red.png"] = Reply(body=red)
    http_server.routes["/blue.png"] = Reply(body=blue, delay=1.0)
    settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true")

    def run(name: str) -> None:
        store = LocalStore(settings.objects_dir)
        store.check()
        post = Post("direct", "p1", T0, caption="hello", image_urls=(http_server.url(f"/{name}.png"),))
        Archiver(settings, db, store).archive(iter([post]), RunStats(), source="direct")

    slow = threading.Thread(target=run, args=("blue",))
    slow.start()
    while not http_server.hits.get("/blue.png"):
        time.sleep(0.01)
    run("red")
    slow.join()
    [(key, sha, size)] = query(db.dsn, "SELECT storage_key, sha256, bytes FROM post_media")
    body = (settings.objects_dir / key).read_bytes()
    assert hashlib.sha256(body).hexdigest() == sha == hashlib.sha256(red).hexdigest() and len(body) == size


@pytest.mark.parametrize("left", ["image", "not an image"])
def test_an_object_a_killed_run_stored_but_never_recorded_is_what_the_row_records(db, make_settings, http_server, left):
    # A run killed between its put and its commit left an object no row names; the platform serves another version
    # now. The object is kept and recorded (an image stored is never replaced), unless it is no image of its key.
    import hashlib

    from etl.store import LocalStore, object_key

    red, blue = png_bytes(8, 6, (200, 0, 0)), png_bytes(9, 7, (0, 0, 200))
    http_server.routes["/red.png"] = Reply(body=red)
    settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true")
    store = LocalStore(settings.objects_dir)
    store.check()
    key = object_key(settings.s3_prefix, "direct", T0, "p1", 0, "image/png")
    earlier = blue if left == "image" else b"<html>not found</html>"
    store.put(key, earlier, "image/png", hashlib.sha256(earlier).hexdigest())
    post = Post("direct", "p1", T0, caption="hello", image_urls=(http_server.url("/red.png"),))
    Archiver(settings, db, store).archive(iter([post]), RunStats(), source="direct")
    kept = blue if left == "image" else red
    assert store.path(key).read_bytes() == kept
    assert query(db.dsn, "SELECT status, sha256, bytes, width, height FROM post_media") == [
        ("stored", hashlib.sha256(kept).hexdigest(), len(kept), *((9, 7) if left == "image" else (8, 6)))
    ]


@pytest.mark.fault("a post read again (an overlap, a replay) has its failed image retried as the retry queue would, no more")
def test_a_post_read_again_retries_its_failed_image_within_the_attempts_and_backoff(db, make_settings, http_server):
    # The attempts and the backoff bounded only the retry queue: every run reading the post again fetched its
    # failed image again, past ETL_IMAGE_MAX_ATTEMPTS and inside the backoff (a host answering 429, every run).
    from etl.store import LocalStore

    http_server.routes["/broken.png"] = Reply(status=500, body=b"oops", content_type="text/plain")
    post = Post("direct", "p1", T0, caption="hello", image_urls=(http_server.url("/broken.png"),))

    def runs(n: int, backoff: str) -> None:
        settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true", ETL_HTTP_RETRIES="1", ETL_IMAGE_MAX_ATTEMPTS="2",
                                 ETL_IMAGE_RETRY_BACKOFF_MINUTES=backoff)  # fmt: skip
        store = LocalStore(settings.objects_dir)
        store.check()
        for _ in range(n):
            Archiver(settings, db, store).archive(iter([post]), RunStats(), source="direct")

    runs(3, "60")  # inside the backoff after the first failure: fetched once
    assert http_server.hits["/broken.png"] == 1 and query(db.dsn, "SELECT attempts FROM post_media") == [(1,)]
    runs(3, "0")  # no backoff: up to ETL_IMAGE_MAX_ATTEMPTS, then no more
    assert http_server.hits["/broken.png"] == 2 and query(db.dsn, "SELECT attempts FROM post_media") == [(2,)]
    http_server.routes["/fixed.png"] = Reply(body=png_bytes(8, 6))
    post = Post("direct", "p1", T0, caption="hello", image_urls=(http_server.url("/fixed.png"),))
    runs(1, "60")  # another URL at that position is a new chance, whatever the attempts
    assert query(db.dsn, "SELECT status, source_url FROM post_media") == [("stored", http_server.url("/fixed.png"))]


@pytest.mark.fault("SIGTERM before an image was requested: it counts no attempt, and the next run fetches it")
def test_an_image_a_stop_kept_from_being_requested_keeps_its_attempts(db, make_settings, http_server, monkeypatch):
    # Each one counted as a failed attempt: a few stopped runs (a timeout firing every time) used up
    # ETL_IMAGE_MAX_ATTEMPTS of images never once requested, and no later run retried them.
    import threading

    from etl.media import Downloader
    from etl.store import LocalStore

    http_server.routes["/first.png"] = Reply(body=png_bytes(8, 6, (1, 2, 3)))
    http_server.routes["/second.png"] = Reply(body=png_bytes(8, 6, (4, 5, 6)))
    settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true", ETL_IMAGE_MAX_ATTEMPTS="2", ETL_IMAGE_RETRY_BACKOFF_MINUTES="60",
                             ETL_CONCURRENCY="1", ETL_STOP_GRACE="1")  # fmt: skip
    store = LocalStore(settings.objects_dir)
    store.check()
    posts = [
        Post("direct", "a", T0, caption="one", image_urls=(http_server.url("/first.png"),)),
        Post("direct", "b", T0, caption="two", image_urls=(http_server.url("/second.png"),)),
    ]
    stopped = threading.Event()
    stopped.set()  # SIGTERM before any download began: the posts are loaded, their images recorded failed
    Archiver(settings, db, store, stop=stopped).archive(iter(posts), RunStats(), source="direct")
    assert http_server.hits == {}
    assert query(db.dsn, "SELECT post_id, status, attempts FROM post_media ORDER BY 1") == [("a", "failed", 0), ("b", "failed", 0)]

    stop, fetch = threading.Event(), Downloader.fetch

    def fetch_then_stop(self, url):  # the next run's SIGTERM comes as its first retry downloads
        stop.set()
        return fetch(self, url)

    monkeypatch.setattr(Downloader, "fetch", fetch_then_stop)
    Archiver(settings, db, store, stop=stop).retry_failed_images(RunStats())  # not due to a backoff: never tried
    monkeypatch.setattr(Downloader, "fetch", fetch)
    assert sum(http_server.hits.values()) == 1
    assert query(db.dsn, "SELECT post_id, attempts FROM post_media WHERE status = 'failed'") in ([("a", 0)], [("b", 0)])
    Archiver(settings, db, store).retry_failed_images(RunStats())  # a clean run: the one never requested is fetched
    assert query(db.dsn, "SELECT post_id, status FROM post_media ORDER BY 1") == [("a", "stored"), ("b", "stored")]


def test_a_first_load_is_scored_by_workers_and_each_batch_looked_up_once(db, make_settings, monkeypatch):
    """A stream's first batch, none of it stored: its lookup (made once, ahead of plan()) says so, the scoring
    workers decide every batch, and this process never loads the language model. The rerun after it finds the
    first batch stored and scores it here, reusing every stored decision."""
    from etl.db import Archive

    lookups: list[str] = []
    held = Archive.held

    def counting(self, batch, version):
        lookups.append(batch[0].post_id)
        return held(self, batch, version)

    monkeypatch.setattr(Archive, "held", counting)
    settings = make_settings(ETL_BATCH_SIZE="100", ETL_METADATA_BATCH_SIZE="100")
    first = Archiver(settings, db, None)
    stats = RunStats()
    first.archive(iter(posts(300)), stats, source="direct")
    assert lookups == ["p0", "p100", "p200"]
    assert first.enricher.ahead_used == 300 and not first.enricher.detector.loaded()
    assert stats.inserted == 300 and query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment IS NOT NULL") == [(300,)]

    lookups.clear()
    again = Archiver(settings, db, None)
    stats = RunStats()
    again.archive(iter(posts(300)), stats, source="direct")
    assert lookups == ["p0", "p100", "p200"]
    assert again.enricher.ahead_used == 0 and (stats.unchanged, stats.inserted) == (300, 0)


def test_a_run_that_creates_its_archive_forks_its_scoring_workers_before_the_schema(
    new_database, make_settings, tmp_path, monkeypatch
):
    """The database holds no archive: the run's scoring workers are forked cold before the migrations (they load
    the models while the schema is made), and the first stream uses them: no second fork, every caption decided
    ahead. The next run finds the archive: no early fork, and its rerun is scored in-process."""
    import multiprocessing

    import etl.ahead
    from etl.enrich import SentimentEnricher
    from etl.run.runner import Runner, RunRequest
    from tests.support import write_jsonl

    forks: list[tuple[bool, object]] = []
    fork_scorers = etl.ahead.fork_scorers

    def recording(enricher, workers, *, warm=True):
        forks.append((warm, query(new_database, "SELECT to_regclass('social_posts')")[0][0]))
        return fork_scorers(enricher, workers, warm=warm)

    monkeypatch.setattr(etl.ahead, "fork_scorers", recording)
    enrichers: list[SentimentEnricher] = []
    enrich_all = SentimentEnricher.enrich_all

    def watching(self, posts, stored):
        if self not in enrichers:
            enrichers.append(self)
        return enrich_all(self, posts, stored)

    monkeypatch.setattr(SentimentEnricher, "enrich_all", watching)
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"platform": "direct", "post_id": f"p{i}", "created_at": "2026-09-01T12:00:00Z", "caption": f"a lovely day {i}"}
        for i in range(300)
    ])  # fmt: skip
    settings = make_settings(DATABASE_URL=new_database, ETL_BATCH_SIZE="100", ETL_METADATA_BATCH_SIZE="100")
    request = RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}})

    first = Runner(settings)
    try:
        stats = first.execute(request)
    finally:
        first.close()
    assert forks == [(False, None)]  # once, cold, while no table existed yet
    assert (stats.exit_code, stats.inserted) == (0, 300)
    assert enrichers[0].ahead_used == 300 and not enrichers[0].detector.loaded()
    assert query(new_database, "SELECT count(*) FROM social_posts WHERE sentiment IS NOT NULL") == [(300,)]
    assert multiprocessing.active_children() == []

    again = Runner(settings)
    try:
        stats = again.execute(request)
    finally:
        again.close()
    assert forks == [(False, None)]  # the archive exists: nothing forked early, and the rerun needs no worker
    assert (stats.exit_code, stats.unchanged) == (0, 300) and enrichers[1].ahead_used == 0


@pytest.mark.parametrize("how", ["nothing to score", "the run fails before archiving"])
def test_early_scoring_workers_no_stream_takes_end_with_the_run(how, new_database, make_settings, tmp_path, monkeypatch):
    """A run that creates its archive, then either archives nothing that needs its workers (an empty input) or
    fails before archiving: no worker is left, even while the error is still held."""
    import multiprocessing

    import etl.ahead
    import etl.run.runner
    from etl.errors import ConfigError
    from etl.run.runner import Runner, RunRequest

    forks: list[bool] = []
    fork_scorers = etl.ahead.fork_scorers
    monkeypatch.setattr(etl.ahead, "fork_scorers", lambda e, w, *, warm=True: forks.append(warm) or fork_scorers(e, w, warm=warm))
    if how == "the run fails before archiving":

        def refusing(*_):
            raise ConfigError("the images are in another store (injected)")

        monkeypatch.setattr(etl.run.runner, "refuse_if_elsewhere", refusing)
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    runner = Runner(make_settings(DATABASE_URL=new_database))
    request = RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}})
    try:
        if how == "nothing to score":
            assert runner.execute(request).exit_code == 0
        else:
            with pytest.raises(ConfigError) as caught:
                runner.execute(request)
            assert caught.value is not None  # the traceback (and the run's frames) still held here
        assert forks == [False] and multiprocessing.active_children() == []
    finally:
        runner.close()


def test_an_archive_that_fails_ends_its_scoring_workers_at_once(db, make_settings, monkeypatch):
    """A load error while batches are scored ahead: the workers have ended when the error comes out, not when its
    traceback is let go (the generator that holds them is closed)."""
    import multiprocessing

    from etl.db import Archive

    load = Archive.load

    def failing(self, batch, *args, **kwargs):
        if batch[0].post_id == "p200":
            raise LoadError("the database went away (injected)")
        return load(self, batch, *args, **kwargs)

    monkeypatch.setattr(Archive, "load", failing)
    archiver = Archiver(make_settings(ETL_BATCH_SIZE="100", ETL_METADATA_BATCH_SIZE="100"), db, None)
    with pytest.raises(LoadError) as caught:
        archiver.archive(iter(posts(500)), RunStats(), source="direct")
    assert "went away" in str(caught.value) and archiver.enricher.ahead_used > 0
    assert multiprocessing.active_children() == []


def test_a_lookup_made_ahead_is_used_only_for_its_own_batch(db, make_settings):
    """A batch's lookup, sent as the batch is read, is given for that very list only (an equal list read later
    is not it), as often as asked until taken; with it, the posts it shares with batches read before it. A batch
    not worth it is not sent: it is looked up in turn, with the posts it shares with batches started."""
    from etl.run.archiver import _LookAhead

    archiver = Archiver(make_settings(), db, None)
    archiver.archive(iter(posts(5, start=100)), RunStats(), source="direct")
    new, old, again, in_turn = posts(5), posts(5, start=100), posts(3, start=99), posts(2, start=104)
    started = [frozenset({("direct", "p105")})]
    ahead = _LookAhead(db, archiver.enricher.version, started=lambda: started, worth=lambda batch: batch is not in_turn, retry=(8, 0.0))
    try:
        assert list(ahead.reading([new, old, again, in_turn])) == [new, old, again, in_turn]
        assert ahead.result(in_turn, take=False) is None
        assert ahead.unloaded(in_turn) == {("direct", "p105")}
        assert ahead.result(posts(5, start=100), take=True) is None  # equal, but not the batch read
        held, shared = ahead.result(old, take=False)
        assert set(held.rows) == {("direct", f"p{i}") for i in range(100, 105)} and shared == frozenset()
        assert ahead.result(old, take=True) == (held, shared)
        assert ahead.result(old, take=True) is None  # taken
        assert ahead.result(new, take=True)[0].rows == {}
        held, shared = ahead.result(again, take=True)
        assert set(held.rows) == {("direct", "p100"), ("direct", "p101")}
        assert shared == {("direct", "p100"), ("direct", "p101")}  # read before it, in `old`: maybe not loaded yet
    finally:
        ahead.close()
    assert ahead.db._conn is None and ahead.thread._shutdown
