"""The archiver's batch scheduling: metadata batches loaded on the loader thread while the next is prepared, their
sizes, and the guarantees that hold across the hand-over (order, counts once committed, a LoadError's batch)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from etl.errors import LoadError
from etl.records import Post, chunked
from etl.run.archiver import Archiver
from etl.run.stats import RunStats
from tests.conftest import query

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)


def posts(n: int, *, start: int = 0, images: bool = False, caption: str = "a lovely day") -> list[Post]:
    return [
        Post("direct", f"p{i}", T0 + timedelta(minutes=i), caption=f"{caption} {i}", like_count=i,
             image_urls=("https://images.example/a.png",) if images else ())
        for i in range(start, start + n)
    ]  # fmt: skip


@pytest.fixture
def loaded_batches(monkeypatch) -> list[int]:
    """The size of every batch the archiver loads, on either thread."""
    sizes: list[int] = []
    load = Archiver.load

    def counting(self, batch, stats, source):
        sizes.append(len(batch.posts))
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", counting)
    return sizes


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
    # The loader's own connection is closed when the stream is archived: only the archiver's stays.
    assert query(
        db.dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'social-archiver' AND datname = current_database()"
    ) == [(1,)]


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
        seen.append((threading.current_thread().name, FORKING.locked()))
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archiver, "load", watching)
    Archiver(make_settings(ETL_BATCH_SIZE="10", ETL_METADATA_BATCH_SIZE="10"), db, None).archive(
        iter(posts(30)), RunStats(), source="direct"
    )
    on_loader = [locked for name, locked in seen if name.startswith("loader")]
    assert len(on_loader) == 3 and all(on_loader)
