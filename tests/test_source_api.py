"""The API-source layer: verdicts over the retry policy, paginators refusing a repeated cursor, and the
streams loop (per-stream state, dedup, rejects, the newest-first stop on the stream's own order, the limit)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from etl.config import load_settings
from etl.errors import RecordError
from etl.records import Post
from etl.sources.api import APISource, CursorPaginator, Entry, LinkHeaderPaginator, RepeatedCursor, Stream, StreamError
from etl.sources.base import FetchWindow
from tests.support import Reply

T0 = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)


class ListStream(Stream):
    """A stream over a list of (order, created_at offset in hours, post id or None for a bad item)."""

    def __init__(self, key: str, items: list[tuple[int, float, str | None]], fail_after: int | None = None):
        super().__init__(key, f"list {key}")
        self.items, self.fail_after, self.read = items, fail_after, 0

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        for n, (order, hours, post_id) in enumerate(self.items):
            if self.fail_after is not None and n == self.fail_after:
                raise StreamError("HTTP 503 after 4 attempts")
            self.read += 1
            yield Entry((post_id, hours), order=order, at=T0 - timedelta(hours=order / 10), label=str(order))


class ListSource(APISource):
    name = "listsource"

    def __init__(self, streams: list[ListStream]):
        super().__init__(load_settings({}, dotenv_path=None))
        self._streams = streams

    def stream_objects(self) -> list[Stream]:
        return list(self._streams)

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        post_id, hours = item
        if post_id is None:
            raise RecordError("missing id")
        # created_at deliberately out of the stream's order (client clocks, reposts)
        return Post(platform="listsource", post_id=post_id, created_at=T0 - timedelta(hours=hours))


def run(source: ListSource, **window: Any) -> list[str]:
    return [p.post_id for p in source.fetch(FetchWindow(**window))]


def test_streams_dedup_and_state_per_stream_and_bad_items_rejected():
    a = ListStream("a", [(30, 1, "p3"), (20, 50, "p2"), (10, 2, None)])
    b = ListStream("b", [(7, 1, "p3"), (5, 3, "q1")])
    source = ListSource([a, b])
    assert run(source) == ["p3", "p2", "q1"]
    assert source.rejected == 1 and "list a item 10: missing id" in source.rejects[0]
    assert source.cursor == {"streams": {"a": {"after": 30}, "b": {"after": 7}}}


def test_rerun_stops_at_each_streams_saved_place_not_at_created_at():
    a = ListStream("a", [(40, 900, "new-but-backdated"), (30, 1, "p3"), (20, 2, "p2")])
    source = ListSource([a])
    # The saved place is 30: the item at 40 is new although its created_at is far older than everything.
    since = T0 - timedelta(hours=5)
    assert run(source, cursor={"streams": {"a": {"after": 30}}}, since=since) == ["new-but-backdated"]
    assert a.read == 2  # stopped at the saved place, the third never read
    assert source.cursor == {"streams": {"a": {"after": 40}}}


def test_a_failing_stream_keeps_its_state_and_the_others_go_on():
    a = ListStream("a", [(50, 1, "a2"), (40, 1, "a1")], fail_after=1)
    b = ListStream("b", [(9, 1, "b1")])
    source = ListSource([a, b])
    assert run(source, cursor={"streams": {"a": {"after": 10}, "b": {"after": 3}}}) == ["a2", "b1"]
    assert source.cursor == {"streams": {"a": {"after": 10}, "b": {"after": 9}}}
    assert source.rejected == 1 and "list a: HTTP 503" in source.rejects[0] and "kept" in source.rejects[0]


def test_a_stream_failing_on_its_first_run_remembers_how_far_back_it_must_read():
    since = T0 - timedelta(days=2)
    a = ListStream("a", [(50, 1, "a2"), (40, 1, "a1")], fail_after=1)
    source = ListSource([a])
    run(source, since=since)
    assert source.cursor == {"streams": {"a": {"floor": since.isoformat()}}}
    # The next run's watermark is later, but the stream reads back to its floor.
    again = ListStream("a", [(50, 1, "a2"), (40, 1, "a1")])
    source = ListSource([again])
    assert run(source, since=T0, cursor={"streams": {"a": {"floor": since.isoformat()}}}) == ["a2", "a1"]


def test_the_limit_cuts_a_stream_and_leaves_its_state():
    a = ListStream("a", [(50, 1, "a3"), (40, 1, "a2"), (30, 1, "a1")])
    b = ListStream("b", [(9, 1, "b1")])
    source = ListSource([a, b])
    assert run(source, limit=2, cursor={"streams": {"a": {"after": 5}}}) == ["a3", "a2"]
    assert source.cursor == {"streams": {"a": {"after": 5}}}


def test_a_backfill_filters_by_created_at_and_moves_no_state():
    a = ListStream("a", [(50, 1, "in"), (40, 30, "too-old"), (30, 2, "in2")])
    source = ListSource([a])
    window = {"since": T0 - timedelta(hours=10), "until": T0, "cursor": {"streams": {"a": {"after": 45}}}}
    assert run(source, **window) == ["in", "in2"]
    assert source.cursor == {"streams": {"a": {"after": 45}}}


def fake_response(http_server, body: dict, headers: dict[str, str] | None = None):
    import requests

    http_server.routes["/page"] = Reply(body=json.dumps(body).encode(), content_type="application/json", headers=headers or {})
    return requests.get(http_server.url("/page"), timeout=5)


def test_paginators_refuse_a_repeated_cursor(http_server):
    response = fake_response(http_server, {"data": {"after": "t3_x"}})
    cursor = CursorPaginator("data.after", "after")
    assert cursor.next(response, response.json()) == {"after": "t3_x"}
    with pytest.raises(RepeatedCursor):
        cursor.next(response, response.json())
    link = f'<{http_server.base}/page?max_id=5>; rel="next"'
    response = fake_response(http_server, {}, {"Link": link})
    paginator = LinkHeaderPaginator()
    assert paginator.next(response, {}) == f"{http_server.base}/page?max_id=5"
    with pytest.raises(RepeatedCursor):
        paginator.next(response, {})


def test_request_retries_5xx_then_a_clear_stream_error(http_server):
    source = ListSource([])
    source.policy = source.policy.__class__(attempts=3, max_wait=0.01, sleep=lambda s: None)
    http_server.routes["/x"] = [Reply(status=502, body=b"bad gateway", content_type="text/plain")] * 3
    with pytest.raises(StreamError, match=r"still failing after 3 attempts \(HTTP 502: bad gateway\)"):
        source.get_json(http_server.url("/x"), what="GET /x")
    assert http_server.hits["/x"] == 3
    http_server.routes["/y"] = Reply(body=b"<html>oops</html>", content_type="text/html")
    with pytest.raises(StreamError, match="not a JSON object"):
        source.get_json(http_server.url("/y"), what="GET /y")


def test_a_stream_with_nothing_new_inside_the_window_keeps_the_windows_start():
    since = T0 - timedelta(hours=1)
    a = ListStream("a", [(50, 1, "old")])  # at = T0 - 5h: before the window
    source = ListSource([a])
    assert run(source, since=since) == []
    assert source.cursor == {"streams": {"a": {"floor": since.isoformat()}}}
