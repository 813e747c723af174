"""A run cut short (--limit, SIGTERM, quota) never moves the watermark past posts it did not load."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from etl.records import Post
from etl.resume import ResumePoint, ResumeTracker, StreamMark
from tests.conftest import query
from tests.support import Reply

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


def _covers(mark: StreamMark, post: Post) -> bool:
    return mark.covers("created", post.created_at, post.post_id)


def test_posts_sharing_the_oldest_timestamp_are_not_skipped_unless_loaded():
    mark = StreamMark(T0, {"x"})
    assert _covers(mark, _post("x", 0)) and not _covers(mark, _post("y", 0))
    assert _covers(mark, _post("z", -1)) and not _covers(mark, _post("w", 1))


class _Feed:
    """One stream in its listing's own order (place_of), where a repost sits at the time it was reposted."""

    def __init__(self, places: dict[str, int]):
        self.places = places

    def stream_of(self, post: Post) -> str:
        return "feed"

    def place_of(self, post: Post) -> int:
        return self.places[post.post_id]


def test_a_repost_of_an_old_post_does_not_mark_the_posts_below_it_as_loaded():
    # The feed, newest first: a repost of a post from a year ago, then three posts of the last hours. By created_at
    # the repost is the oldest, so a mark by created_at would call the three loaded after a cut at the second post.
    feed = [_post("old", 525_600), _post("p1", 120), _post("p2", 180), _post("p3", 240)]
    source = _Feed({"old": 1000, "p1": 900, "p2": 800, "p3": 700})
    first = ResumeTracker(source, None, 2)
    assert [p.post_id for p in first(feed)] == ["old", "p1"] and first.limited
    point = ResumePoint.from_json(first.cut_point().to_json())
    assert point.streams["feed"] == StreamMark(900, {"p1"}, "order", 1000, {"old"})
    second = ResumeTracker(source, point, None)
    assert [p.post_id for p in second(feed)] == ["p2", "p3"] and second.skipped == 2


def test_marks_keep_their_kind_and_a_mark_of_another_kind_skips_nothing():
    by_order = StreamMark(T0, {"x"}, "order")  # Bluesky's order is a time (indexedAt)
    ids = StreamMark(1_868_000_000_000_000_000, {"y"}, "order")  # an X or Mastodon id
    older = ResumePoint.from_json({"newest": None, "streams": {"s": {"oldest": T0.isoformat(), "ids": ["x"]}}})
    assert older is not None and older.streams["s"] == StreamMark(T0, {"x"}, "created")  # as earlier versions saved
    point = ResumePoint(newest=T0, streams={"t": by_order, "i": ids, "s": older.streams["s"]})
    again = ResumePoint.from_json(point.to_json())
    assert again == point and isinstance(again.streams["i"].oldest, int)
    # A mark by created_at (an earlier version's) is no guide to a stream now marked by its order, nor the reverse.
    assert not older.streams["s"].covers("order", T0 + timedelta(days=1), "z")
    assert not by_order.covers("created", T0 + timedelta(days=1), "z") and by_order.covers("order", T0 + timedelta(days=1), "z")
    assert not ids.covers("order", T0, "z")  # a place of another type: read again, never a TypeError
    # The next cut point replaces such a mark with this run's (it read the stream again from the top).
    tracker = ResumeTracker(_Feed({"a": 5, "b": 4}), ResumePoint(newest=T0, streams={"feed": StreamMark(T0, {"q"})}), 1)
    assert [p.post_id for p in tracker([_post("a", 1), _post("b", 2)])] == ["a"]
    assert tracker.cut_point().streams["feed"] == StreamMark.first(5, "a", "order")


def test_streams_of_unknown_order_are_never_skipped():
    class Unordered:
        def stream_of(self, post: Post) -> None:
            return None

    feed = [_post(f"h{i}", i) for i in range(3)]
    first = ResumeTracker(Unordered(), None, 2)
    list(first(feed))
    second = ResumeTracker(Unordered(), first.cut_point(), None)
    assert [p.post_id for p in second(feed)] == ["h0", "h1", "h2"]


# -- a repost at the top of a feed, end to end (Bluesky's feed and Mastodon's statuses) ----------------------

ACTOR = "harbourlights.bsky.social"
DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
FEED = "/xrpc/app.bsky.feed.getAuthorFeed"


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _post_view(rkey: str, created: datetime, indexed: datetime, did: str = DID, handle: str = ACTOR) -> dict:
    return {
        "uri": f"at://{did}/app.bsky.feed.post/{rkey}", "cid": "bafy" + rkey,
        "author": {"did": did, "handle": handle},
        "record": {"$type": "app.bsky.feed.post", "createdAt": _iso(created), "text": f"post {rkey}"},
        "replyCount": 0, "repostCount": 0, "likeCount": 1, "indexedAt": _iso(indexed),
    }


@pytest.mark.fault("Bluesky run --limit 2 cut after a repost of a 2024 post: the next run archives the posts below it")
def test_bluesky_a_run_cut_after_a_repost_of_an_old_post_leaves_nothing_behind(run_etl, db, http_server):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = datetime(2024, 1, 1, tzinfo=timezone.utc)
    other = "did:plc:z72i7hdynmk6r22z27h6tvur"
    feed = [
        # a repost, just now, of someone's post from 2024 (feedViewPost with reason#reasonRepost)
        {"post": _post_view("3oldpost0001", old, old, other, "lena.bsky.social"),
         "reason": {"$type": "app.bsky.feed.defs#reasonRepost", "by": {"did": DID, "handle": ACTOR},
                    "indexedAt": _iso(now - timedelta(minutes=1))}},
        {"post": _post_view("3newpost000a", now - timedelta(hours=2), now - timedelta(hours=2))},
        {"post": _post_view("3newpost000b", now - timedelta(hours=3), now - timedelta(hours=3))},
        {"post": _post_view("3newpost000c", now - timedelta(hours=4), now - timedelta(hours=4))},
    ]

    def route(handler) -> Reply:
        return Reply(body=json.dumps({"feed": feed}).encode(), content_type="application/json")

    http_server.routes[FEED] = route
    http_server.routes["/xrpc/app.bsky.feed.getPosts"] = lambda h: Reply(
        body=json.dumps({"posts": [{"uri": u} for u in parse_qs(urlsplit(h.path).query).get("uris", [])]}).encode(),
        content_type="application/json")
    env = {"ETL_SOURCES": "bluesky", "BLUESKY_ACTORS": ACTOR, "BLUESKY_API_BASE": http_server.base,
           "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_RETRY_MAX_WAIT": "0.05"}

    first = run_etl("run", "--limit", "2", env=env)
    assert first.returncode == 0 and _archived(db.dsn) == 2, first.stdout + first.stderr
    second = run_etl("run", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    stored = {r[0].rsplit("/", 1)[-1] for r in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'bluesky'")}
    assert stored == {"3oldpost0001", "3newpost000a", "3newpost000b", "3newpost000c"}, second.stdout + second.stderr


def _snowflake(t: datetime, seq: int = 0) -> str:
    return str((int(t.timestamp() * 1000) << 16) + seq)


def _status(sid: str, created: datetime, uri: str, reblog: dict | None = None) -> dict:
    return {"id": sid, "uri": uri, "url": uri, "created_at": _iso(created), "content": f"<p>{sid}</p>",
            "spoiler_text": "", "account": {"acct": "ana", "url": "https://remote.example/@ana"},
            "favourites_count": 0, "replies_count": 0, "media_attachments": [], "tags": [], "reblog": reblog}


@pytest.mark.fault("Mastodon run --limit 2 cut after a boost of a 2024 status: the next run archives the rest")
def test_mastodon_a_run_cut_after_a_boost_of_an_old_status_leaves_nothing_behind(run_etl, db, http_server):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = datetime(2024, 1, 1, tzinfo=timezone.utc)
    u = "https://remote.example/users/ana/statuses/"
    original = _status(_snowflake(old), old, "https://other.example/users/tom/statuses/1")
    statuses = [
        _status(_snowflake(now - timedelta(minutes=1)), now - timedelta(minutes=1), u + "boost", reblog=original),
        _status(_snowflake(now - timedelta(hours=2)), now - timedelta(hours=2), u + "a"),
        _status(_snowflake(now - timedelta(hours=3)), now - timedelta(hours=3), u + "b"),
        _status(_snowflake(now - timedelta(hours=4)), now - timedelta(hours=4), u + "c"),
    ]

    def route(handler) -> Reply:
        params = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        if urlsplit(handler.path).path.endswith("/lookup"):
            return Reply(body=json.dumps({"id": "109302", "acct": "ana"}).encode(), content_type="application/json")
        page = [s for s in statuses if ("since_id" not in params or int(s["id"]) > int(params["since_id"]))
                and ("max_id" not in params or int(s["id"]) < int(params["max_id"]))]
        return Reply(body=json.dumps(page).encode(), content_type="application/json")

    http_server.routes["/api/v1/accounts/lookup"] = route
    http_server.routes["/api/v1/accounts/109302/statuses"] = route
    env = {"ETL_SOURCES": "mastodon", "MASTODON_INSTANCE": http_server.base, "MASTODON_ACCOUNTS": "@ana@remote.example",
           "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_RETRY_MAX_WAIT": "0.05"}
    first = run_etl("run", "--limit", "2", env=env)
    assert first.returncode == 0 and _archived(db.dsn) == 2, first.stdout + first.stderr
    second = run_etl("run", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    stored = {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'mastodon'")}
    assert stored == {original["uri"], u + "a", u + "b", u + "c"}, (stored, second.stdout + second.stderr)


@pytest.mark.fault("statuses published after a cut run are not skipped as loaded by the run that fills its gap")
def test_posts_published_after_a_cut_run_are_not_skipped_as_loaded_by_the_next(run_etl, db, http_server):
    """Run 1 (cut by --limit; SIGTERM or a quota alike) loads status a, and its mark said "every post above a is
    loaded". x and y are published afterwards. Run 2 filled the gap below a but skipped x and y too, then, its window
    read to its end, saved the stream's position at y: run 3 read from y less ETL_OVERLAP_MINUTES, and x (published
    an hour before y) was never archived. A mark now ends at the newest post the cut runs loaded (found by a hostile
    review)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    u = "https://remote.example/users/ana/statuses/"
    at = {"y": now - timedelta(minutes=1), "x": now - timedelta(hours=2), "a": now - timedelta(hours=5),
          "b": now - timedelta(hours=6)}  # fmt: skip
    statuses = [_status(_snowflake(at[n]), at[n], u + n) for n in ("a", "b")]

    def route(handler) -> Reply:
        params = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        if urlsplit(handler.path).path.endswith("/lookup"):
            return Reply(body=json.dumps({"id": "109302", "acct": "ana"}).encode(), content_type="application/json")
        page = [s for s in statuses if ("since_id" not in params or int(s["id"]) > int(params["since_id"]))
                and ("max_id" not in params or int(s["id"]) < int(params["max_id"]))]  # fmt: skip
        return Reply(body=json.dumps(page).encode(), content_type="application/json")

    http_server.routes["/api/v1/accounts/lookup"] = route
    http_server.routes["/api/v1/accounts/109302/statuses"] = route
    env = {"ETL_SOURCES": "mastodon", "MASTODON_INSTANCE": http_server.base, "MASTODON_ACCOUNTS": "@ana@remote.example",
           "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_RETRY_MAX_WAIT": "0.05"}  # fmt: skip
    stored = lambda: {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'mastodon'")}  # noqa: E731
    first = run_etl("run", "--limit", "1", env=env)
    assert first.returncode == 0 and stored() == {u + "a"}, first.stdout + first.stderr
    statuses[:0] = [_status(_snowflake(at[n]), at[n], u + n) for n in ("y", "x")]  # published since, newest first
    second = run_etl("run", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert stored() == {u + n for n in ("a", "b", "x", "y")}
    third = run_etl("run", env=env)
    assert third.returncode == 0 and stored() == {u + n for n in ("a", "b", "x", "y")}, third.stdout + third.stderr


def test_a_cut_run_that_stops_above_an_earlier_mark_keeps_that_mark():
    """Run 1 loads a0..a2 and is cut; n0..n3 are published; run 2 is cut after n0, n1, above the earlier mark: the
    places between n1 and a0 were loaded by neither, so the mark stays a0..a2 (n0, n1 are read again, unchanged),
    and run 3 loads n2, n3 and what lies below a2."""
    feed = [_post(f"a{i}", 10 * i + 5) for i in range(5)]
    first = ResumeTracker(_OneStream(), None, 3)
    assert [p.post_id for p in first(feed)] == ["a0", "a1", "a2"]
    feed[:0] = [_post(f"n{i}", -10 * (4 - i)) for i in range(4)]  # newer than a0, newest first
    second = ResumeTracker(_OneStream(), ResumePoint.from_json(first.cut_point().to_json()), 2)
    assert [p.post_id for p in second(feed)] == ["n0", "n1"]
    third = ResumeTracker(_OneStream(), ResumePoint.from_json(second.cut_point().to_json()), None)
    assert [p.post_id for p in third(feed)] == ["n0", "n1", "n2", "n3", "a3", "a4"] and third.skipped == 3


class _OneStream:
    def stream_of(self, post: Post) -> str:
        return "s"
