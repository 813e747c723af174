"""The API-source layer: verdicts over the retry policy, paginators refusing a repeated cursor, and the
streams loop (per-stream state, dedup, rejects, the newest-first stop on the stream's own order, the limit)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from etl.config import load_settings
from etl.db.platform import HashtagSearches, QuotaLedger
from etl.errors import ConfigError, RecordError
from etl.records import Post
from etl.run.runner import RunRequest
from etl.run.services import build_sources
from etl.sources import api
from etl.sources.api import (
    APISource,
    CursorPaginator,
    Entry,
    LinkHeaderPaginator,
    MaxIdPaginator,
    RepeatedCursor,
    Stream,
    StreamError,
)
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


# -- the shared pieces a platform module stands on -------------------------------------------------------------


def test_newest_first_keeps_an_item_out_of_place_on_the_last_page_read():
    hours = {"n1": 1, "n2": 2, "late": 1.5, "old": 9, "undated": None, "next": 0.5}
    pages = [["n1", "n2"], ["old", "late", "undated"], ["next"]]
    since = T0 - timedelta(hours=3)

    def time_of(name: str) -> datetime | None:
        return None if hours[name] is None else T0 - timedelta(hours=hours[name])

    got = list(api.newest_first(iter(pages), time_of, since))
    assert got == [(1, "n1"), (1, "n2"), (2, "late"), (2, "undated")]  # page 3 never asked for
    # In no known order (a hashtag): a page ends the listing only when every dated item on it is past.
    got = list(api.newest_first(iter(pages), time_of, since, whole_page=True))
    assert got == [(1, "n1"), (1, "n2"), (2, "late"), (2, "undated"), (3, "next")]
    assert list(api.newest_first(iter([["old"], ["n1"]]), time_of, since, whole_page=True)) == []


def test_dig_and_listed_name_the_request_of_a_malformed_page():
    source = ListSource([])
    assert api.dig({"data": {"after": "x"}}, "data.after") == "x"
    assert api.dig({"data": []}, "data.after") is None and api.dig([1], "") == [1]
    assert source.listed({"data": {"children": [1, 2]}}, "data.children", "r/x/new") == [1, 2]
    with pytest.raises(StreamError, match=r"API r/x/new answered .* not a Listing"):
        source.listed({"data": {}}, "data.children", "r/x/new", "a Listing")
    with pytest.raises(StreamError, match=r"getAuthorFeed answered .* 'feed' list"):
        source.listed({"cursor": "c"}, "feed", "getAuthorFeed")


def test_config_hash_is_the_key_state_was_saved_under_before():
    # An archive made before streams keeps its per-configuration watermark under exactly this key.
    spec = {"query": "cats", "usernames": ["a", "b"]}
    expected = hashlib.sha256(b'{"query": "cats", "usernames": ["a", "b"]}').hexdigest()
    assert api.config_hash(spec) == expected[:12] and api.config_hash(spec, 16) == expected[:16]
    assert api.config_hash(dict(reversed(spec.items()))) == expected[:12]  # the order of the keys does not count


def test_scrub_removes_secret_values_and_url_parameters_only():
    text = "GET https://x/v3/videos?part=id&key=AIzaSECRET&apikey=public#f token tok-123 and access_token=EAAB ok"
    clean = api.scrub(text, ("key", "access_token"), ("tok-123", ""))
    assert "AIzaSECRET" not in clean and "tok-123" not in clean and "EAAB" not in clean
    assert "key=***&apikey=public#f" in clean and "access_token=*** ok" in clean


def test_scrub_logs_rewrites_a_librarys_log_lines(caplog):
    api.scrub_logs(["tests.some_client_library"], ("key",))
    with caplog.at_level(logging.DEBUG, logger="tests.some_client_library"):
        logging.getLogger("tests.some_client_library").debug("URL being requested: GET %s", "https://h/x?key=SECRET1")
    assert "SECRET1" not in caplog.text and "key=***" in caplog.text


def test_settings_checks_name_the_setting():
    config = load_settings({"MASTODON_HASHTAGS": "ok,not ok"}, dotenv_path=None).source("mastodon")
    with pytest.raises(ConfigError, match=r"needs MASTODON_ACCOUNTS \(accounts\) or MASTODON_INSTANCE \(a server\)"):
        api.need_one_of("mastodon", config, accounts="accounts", instance="a server")
    api.need_one_of("mastodon", config, hashtags="tags", instance="a server")  # one is set: fine
    with pytest.raises(ConfigError, match=r"MASTODON_HASHTAGS has 'not ok', which is not a tag"):
        api.each_matches(config, "hashtags", re.compile(r"^\w+$"), "not a tag")


def test_utc_text_page_size_and_batches():
    moment = datetime(2026, 3, 10, 13, 4, 5, 250_000, tzinfo=timezone(timedelta(hours=1)))
    assert api.utc_text(moment) == "2026-03-10T12:04:05Z"
    assert api.utc_text(moment, round_up=True) == "2026-03-10T12:04:06Z"
    assert api.utc_text(moment.replace(microsecond=0), round_up=True) == "2026-03-10T12:04:05Z"
    assert [api.page_size(n, 100, 10) for n in (None, 3, 50, 500)] == [100, 10, 50, 100]
    assert list(api.batches(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]


class HookedSource(ListSource):
    """A platform's hooks: its reset header, a refusal in its words, a login that expires, a header on every call."""

    def __init__(self) -> None:
        super().__init__([])
        self.auth_headers = {"User-Agent": "archiver-test/1"}
        self.logins: list[bool] = []

    def reset_at(self, response: Any) -> float | None:
        reset = response.headers.get("x-reset")
        return float(reset) if reset else None

    def refused(self, response: Any, text: str) -> api.Verdict:
        code = "expired" if response.status_code == 401 else ""
        return api.fatal(f"HTTP {response.status_code} {text} (check LIST_TOKEN)", code=code)

    def credentials(self, renew: bool) -> dict[str, str]:
        self.logins.append(renew)
        return {"Authorization": f"Bearer token{len(self.logins)}"}


def test_classify_asks_the_platforms_hooks(http_server):
    source = HookedSource()
    until = time.time() + 60
    limited = fake_response(http_server, {"error": "slow down"}, {"x-reset": str(until)})
    limited.status_code = 429
    assert source.classify(limited) == api.rate_limited(until)
    limited.headers.pop("x-reset")
    assert source.classify(limited).kind == "retry"  # no reset said: retried like a 5xx
    limited.status_code = 403
    assert source.classify(limited) == api.fatal("HTTP 403 slow down (check LIST_TOKEN)")
    assert ListSource([]).classify(limited) == api.fatal("HTTP 403: slow down")  # the default words


def test_authed_get_renews_an_expired_login_once_and_sends_the_sources_headers(http_server):
    source = HookedSource()
    http_server.routes["/feed"] = [
        Reply(status=401, body=b'{"error": "ExpiredToken"}', content_type="application/json"),
        Reply(body=b'{"feed": []}', content_type="application/json"),
        Reply(status=401, body=b'{"error": "ExpiredToken"}', content_type="application/json"),
    ]
    assert source.authed_get(http_server.url("/feed"), what="feed")[1] == {"feed": []}
    assert source.logins == [False, True]
    sent = [headers for _, path, headers in http_server.requests if path == "/feed"]
    assert [h["Authorization"] for h in sent] == ["Bearer token1", "Bearer token2"]
    assert all(h["User-Agent"] == "archiver-test/1" for h in sent)
    with pytest.raises(StreamError, match="ExpiredToken"):  # refused again after the renewal: no third try
        source.authed_get(http_server.url("/feed"), what="feed")
    assert source.logins == [False, True, False, True] and http_server.hits["/feed"] == 4


def test_link_paging_falls_back_to_max_id_and_ends_on_an_empty_page(http_server):
    response = fake_response(http_server, {})
    paginator = LinkHeaderPaginator(fallback=MaxIdPaginator(lambda page: [s["id"] for s in page]))
    assert paginator.next(response, [{"id": "109"}, {"id": "107"}]) == {"max_id": "107"}  # no Link header
    with pytest.raises(RepeatedCursor):
        paginator.next(response, [{"id": "107"}])
    assert paginator.next(response, []) is None
    linked = fake_response(http_server, {}, {"Link": f'<{http_server.base}/page?max_id=5>; rel="next"'})
    assert paginator.next(linked, [{"id": "6"}]) == f"{http_server.base}/page?max_id=5"


class Unordered(ListSource):
    keeps_positions = False
    stream_error_ends_fetch = True


def test_a_source_without_positions_saves_none_and_one_ending_on_errors_raises():
    a = ListStream("a", [(50, 1, "a2"), (40, 1, "a1")])
    source = Unordered([a])
    assert run(source, cursor={"streams": {"a": {"after": 45}}}) == ["a2", "a1"]  # the saved place is not used
    assert source.cursor == {}
    failing = Unordered([ListStream("a", [(50, 1, "a2"), (40, 1, "a1")], fail_after=1), ListStream("b", [(9, 1, "b")])])
    with pytest.raises(StreamError, match="HTTP 503"):
        run(failing)
    assert failing.rejected == 0


def test_sources_get_their_platform_state_when_they_are_built(db):
    env = {"YOUTUBE_API_KEY": "k", "YOUTUBE_QUERY": "q", "INSTAGRAM_ACCESS_TOKEN": "t", "INSTAGRAM_USER_ID": "17841"}
    settings = load_settings(env, dotenv_path=None)
    youtube, instagram = build_sources(settings, RunRequest(sources=["youtube", "instagram"]), db=db)
    assert isinstance(youtube.state, QuotaLedger) and youtube.state.db is db
    assert isinstance(instagram.state, HashtagSearches) and instagram.budget.searches is instagram.state
    assert not hasattr(youtube, "db")
    dry = build_sources(settings, RunRequest(sources=["youtube", "instagram"]))  # a dry run: no database
    assert [s.state for s in dry] == [None, None]


@pytest.mark.badinput("a media object whose type is a list or an object: no crash, the other types' field is read")
def test_url_by_type_takes_an_unhashable_type_for_another_type():
    url_by_type = api.url_by_type
    fields = {"image": "url", "video": "preview_url"}
    assert url_by_type({"type": "image", "url": " https://x/a.png "}, fields) == "https://x/a.png"
    for odd in (["image"], {"kind": "image"}):
        assert url_by_type({"type": odd, "url": "https://x/a.png", "preview_url": "https://x/p.png"}, fields) is None
        assert url_by_type({"type": odd, "preview_url": "https://x/p.png"}, fields, default="preview_url") == (
            "https://x/p.png"
        )
