"""A run cut short (--limit, SIGTERM, quota) never moves the watermark past posts it did not load."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from etl.records import Post
from etl.resume import ResumePoint, ResumeTracker, StreamMark
from tests.conftest import query

T0 = datetime(2026, 10, 1, 12, 0, tzinfo=timezone.utc)


def _archived(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM social_posts")[0][0]


@pytest.mark.fault("run --limit 5 repeated: every post of the feed is archived in the end, none skipped")
def test_repeated_limited_runs_archive_everything(run_etl, db):
    counts = []
    for _ in range(8):
        result = run_etl("run", "--source", "mock", "--limit", "5")
        assert result.returncode == 0, result.stderr
        counts.append(_archived(db.dsn))
    assert counts == [5, 10, 15, 20, 25, 30, 35, 40]
    # The window is now read to its end: the watermark moves to the newest post and the resume point goes.
    result = run_etl("run", "--source", "mock", "--limit", "5")
    assert result.returncode == 0, result.stderr
    newest = query(db.dsn, "SELECT max(created_at) FROM social_posts")[0][0]
    assert query(db.dsn, "SELECT watermark, resume FROM etl_state WHERE source = 'mock'") == [(newest, None)]


@pytest.mark.fault("run --limit 5, then a plain run: the plain run fills the gap (40 of 40)")
def test_limited_run_then_plain_run_archives_the_gap(run_etl, db):
    assert run_etl("run", "--source", "mock", "--limit", "5").returncode == 0
    assert _archived(db.dsn) == 5
    watermark, resume = query(db.dsn, "SELECT watermark, resume FROM etl_state WHERE source = 'mock'")[0]
    assert watermark is None, "a cut run must not move the watermark"
    assert resume is not None
    result = run_etl("run", "--source", "mock")
    assert result.returncode == 0, result.stderr
    assert _archived(db.dsn) == 40
    assert "fetched 35" in result.stdout, "the 5 loaded by the cut run are skipped, not fetched again"
    assert query(db.dsn, "SELECT resume FROM etl_state WHERE source = 'mock'") == [(None,)]


class _TwoStreams:
    """A source stand-in with two streams read one after the other, each newest first."""

    def stream_of(self, post: Post) -> str:
        return post.post_id[0]


def _post(post_id: str, minutes: int) -> Post:
    return Post(platform="t", post_id=post_id, created_at=T0 - timedelta(minutes=minutes))


def test_resume_point_is_kept_per_stream():
    # Stream a: a0 (newest) .. a3; stream b: b0 .. b3, newer than a's posts in part.
    feed = [_post(f"a{i}", 10 * i + 5) for i in range(4)] + [_post(f"b{i}", 10 * i) for i in range(4)]
    first = ResumeTracker(_TwoStreams(), None, 3)
    assert [p.post_id for p in first(feed)] == ["a0", "a1", "a2"] and first.limited
    point = ResumePoint.from_json(first.cut_point().to_json())
    second = ResumeTracker(_TwoStreams(), point, 3)
    # Stream b was never reached: all of it is still to come, though b0..b2 are newer than a2.
    assert [p.post_id for p in second(feed)] == ["a3", "b0", "b1"]
    third = ResumeTracker(_TwoStreams(), ResumePoint.from_json(second.cut_point().to_json()), None)
    assert [p.post_id for p in third(feed)] == ["b2", "b3"] and not third.limited
    assert third.watermark() == T0 - timedelta(minutes=0)


def test_posts_sharing_the_oldest_timestamp_are_not_skipped_unless_loaded():
    mark = StreamMark(T0, {"x"})
    assert mark.covers(_post("x", 0)) and not mark.covers(_post("y", 0))
    assert mark.covers(_post("z", -1)) and not mark.covers(_post("w", 1))


def test_streams_of_unknown_order_are_never_skipped():
    class Unordered:
        def stream_of(self, post: Post) -> None:
            return None

    feed = [_post(f"h{i}", i) for i in range(3)]
    first = ResumeTracker(Unordered(), None, 2)
    list(first(feed))
    second = ResumeTracker(Unordered(), first.cut_point(), None)
    assert [p.post_id for p in second(feed)] == ["h0", "h1", "h2"]

