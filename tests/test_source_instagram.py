"""The instagram source against a fake Graph API serving the JSON fixtures (no network, no real API)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
import requests
import responses

from etl.db.platform import HashtagSearches
from etl.errors import ConfigError, SourceError
from etl.http import RetryPolicy
from etl.sources import source_class
from etl.sources.base import FetchWindow
from etl.sources.instagram import (
    HASHTAG_MEDIA_FIELDS,
    OWN_MEDIA_FIELDS,
    InstagramSource,
    graph_timestamp,
    image_urls,
)
from tests.platform_instagram import (
    COFFEE_ID,
    TOKEN,
    USER_ID,
    FakeGraph,
    GraphReply,
    contract_posts,
    fixture,
    standard_routes,
)

MEDIA = f"{USER_ID}/media"
RECENT = f"{COFFEE_ID}/recent_media"
PAGE1_AFTER = fixture("own_media_page1")["paging"]["cursors"]["after"]


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def graph(rsps) -> FakeGraph:
    return FakeGraph().install(rsps)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def build(make_settings, sleeps):
    """An InstagramSource over the fake API; its retry policy records its waits instead of sleeping."""

    def make(db=None, **env: str) -> InstagramSource:
        values = {"INSTAGRAM_ACCESS_TOKEN": TOKEN, "INSTAGRAM_USER_ID": USER_ID, **env}
        settings = make_settings(**values)
        InstagramSource.check_settings(settings)
        source = InstagramSource(settings, state=HashtagSearches(db) if db is not None else None)
        source.policy = RetryPolicy(attempts=3, max_wait=5.0, base=0.01, sleep=sleeps.append)
        return source

    return make


def fetch_all(source: InstagramSource, window: FetchWindow | None = None) -> tuple[list, SourceError | None]:
    """Every post yielded, and the SourceError that ended the fetch (if one did)."""
    posts = []
    try:
        for post in source.fetch(window or FetchWindow()):
            posts.append(post)
    except SourceError as exc:
        return posts, exc
    return posts, None


def by_id(posts) -> dict:
    return {post.post_id: post for post in posts}


# -- own media --------------------------------------------------------------------------------------


def test_registered_under_its_name():
    assert source_class("instagram") is InstagramSource


def test_own_media_two_pages(build, graph):
    standard_routes(graph)
    source = build()
    posts, error = fetch_all(source)

    assert error is None
    assert [p.post_id for p in posts] == [
        "17895695668004550", "17912345678901234", "17887654321098765", "17876543210987654",
    ]  # fmt: skip
    calls = graph.calls_to(MEDIA)
    assert len(calls) == 2
    assert "after" not in calls[0]
    assert calls[1]["after"] == PAGE1_AFTER
    assert all(c["access_token"] == TOKEN and c["fields"] == OWN_MEDIA_FIELDS for c in calls)
    assert "username" in OWN_MEDIA_FIELDS.split(",") and "children{media_url" in OWN_MEDIA_FIELDS

    first = posts[0]
    item = fixture("own_media_page1")["data"][0]
    assert first.platform == "instagram"
    assert first.author_username == "harbour.studio"
    assert first.caption == item["caption"]
    assert first.created_at == datetime(2025, 3, 14, 9, 30, tzinfo=timezone.utc)
    assert first.like_count == 120 and first.comment_count == 8
    assert first.permalink == "https://www.instagram.com/p/C4aBcDeFgHi/"
    assert first.image_urls == (item["media_url"],)
    assert first.hashtags == ("sunrise", "travel")
    assert first.raw == item


def test_bad_items_are_rejected_and_skipped(build, graph):
    standard_routes(graph)
    source = build()
    posts, error = fetch_all(source)

    assert error is None
    assert "17865432109876543" not in by_id(posts)
    assert len(source.rejects) == 2
    assert source.rejects[0] == "instagram: own media page 2, media 17865432109876543: missing timestamp"
    assert source.rejects[1] == "instagram: own media page 2: missing id"


def test_carousel_gives_every_child_in_order(build, graph):
    standard_routes(graph)
    carousel = by_id(fetch_all(build())[0])["17912345678901234"]
    children = fixture("own_media_page1")["data"][1]["children"]["data"]

    assert carousel.image_urls == (children[0]["media_url"], children[1]["thumbnail_url"], children[2]["media_url"])
    assert not any(url.split("?")[0].endswith(".mp4") for url in carousel.image_urls)
    assert carousel.like_count == 342 and carousel.comment_count == 21


def test_video_uses_its_thumbnail(build, graph):
    standard_routes(graph)
    video = by_id(fetch_all(build())[0])["17887654321098765"]
    item = fixture("own_media_page1")["data"][2]

    assert video.image_urls == (item["thumbnail_url"],)
    assert video.like_count is None  # hidden like counts are omitted by the API
    assert video.permalink.startswith("https://www.instagram.com/reel/")


def test_stops_at_the_watermark(build, graph):
    standard_routes(graph)
    since = datetime(2025, 3, 13, 0, 0, tzinfo=timezone.utc)
    posts, error = fetch_all(build(), FetchWindow(since=since))

    assert error is None
    assert [p.post_id for p in posts] == ["17895695668004550", "17912345678901234"]
    assert len(graph.calls_to(MEDIA)) == 1  # page 1 reached the watermark: page 2 is never asked for


def test_until_and_limit(build, graph):
    standard_routes(graph)
    until = datetime(2025, 3, 14, 0, 0, tzinfo=timezone.utc)
    posts, error = fetch_all(build(), FetchWindow(until=until, limit=2))

    assert error is None
    assert [p.post_id for p in posts] == ["17912345678901234", "17887654321098765"]
    assert graph.calls_to(MEDIA)[0]["limit"] == "2"
    assert len(graph.calls_to(MEDIA)) == 1


def test_a_repeating_cursor_is_refused(build, graph):
    graph.route(MEDIA, "own_media_page1")  # every page says the same `after`, and there is always a next
    posts, error = fetch_all(build())

    assert [p.post_id for p in posts] == ["17895695668004550", "17912345678901234", "17887654321098765"]
    assert error is not None and "repeated" in str(error)
    assert len(graph.calls_to(MEDIA)) == 2


def test_instagram_timestamps_parse():
    assert graph_timestamp("2017-08-31T18:10:00+0000") == "2017-08-31T18:10:00+00:00"
    assert datetime.fromisoformat(graph_timestamp("2025-03-14T09:30:00-0230")).utcoffset().total_seconds() == -9000
    assert image_urls({"media_type": "VIDEO", "media_url": "https://x/v.mp4"}) == []


# -- hashtags ---------------------------------------------------------------------------------------


def test_hashtag_search_and_recent_media(build, graph):
    standard_routes(graph)
    source = build(INSTAGRAM_HASHTAGS="#Coffee", INSTAGRAM_OWN_MEDIA="false")
    posts, error = fetch_all(source)

    assert error is None
    assert graph.calls_to(MEDIA) == []
    assert graph.calls_to("ig_hashtag_search") == [{"user_id": USER_ID, "q": "coffee", "access_token": TOKEN}]
    recent = graph.calls_to(RECENT)
    # The documented quirk: recent_media's `after` is the same on every page and still gives the next one.
    assert len(recent) == 2 and recent[1]["after"] == fixture("hashtag_recent_page1")["paging"]["cursors"]["after"]
    assert recent[0]["user_id"] == USER_ID and recent[0]["fields"] == HASHTAG_MEDIA_FIELDS
    assert "username" not in recent[0]["fields"]

    assert [p.post_id for p in posts] == ["18028374650192837", "18039485761203948", "18047362514098273"]
    assert all(p.author_username is None for p in posts)
    children = fixture("hashtag_recent_page1")["data"][1]["children"]["data"]
    assert posts[1].image_urls == (children[0]["media_url"], children[1]["media_url"])
    assert posts[2].image_urls == ()  # a VIDEO without thumbnail_url: its media_url is the video itself
    assert posts[0].hashtags == ("coffee", "morning")


def test_hashtag_media_out_of_order_are_filtered_not_cut(build, graph):
    standard_routes(graph)
    since = datetime(2025, 3, 14, 9, 0, tzinfo=timezone.utc)  # page 1: the older item comes first
    posts, error = fetch_all(build(INSTAGRAM_HASHTAGS="coffee", INSTAGRAM_OWN_MEDIA="false"), FetchWindow(since=since))

    assert error is None
    assert [p.post_id for p in posts] == ["18039485761203948"]
    assert len(graph.calls_to(RECENT)) == 2  # page 1 was not all past the watermark
    posts, _ = fetch_all(
        build(INSTAGRAM_HASHTAGS="coffee", INSTAGRAM_OWN_MEDIA="false"),
        FetchWindow(since=datetime(2025, 3, 15, tzinfo=timezone.utc)),
    )
    assert posts == [] and len(graph.calls_to(RECENT)) == 3  # all of page 1 was older: no page 2


def test_hashtag_id_is_cached_in_the_database(build, graph, db):
    standard_routes(graph)
    first, error = fetch_all(build(db=db, INSTAGRAM_HASHTAGS="coffee", INSTAGRAM_OWN_MEDIA="false"))
    assert error is None and len(first) == 3
    assert len(graph.calls_to("ig_hashtag_search")) == 1
    with db.transaction() as cur:
        cur.execute("SELECT user_id, hashtag, hashtag_id FROM instagram_hashtags")
        assert cur.fetchall() == [(USER_ID, "coffee", COFFEE_ID)]

    again = build(db=db, INSTAGRAM_HASHTAGS="coffee", INSTAGRAM_OWN_MEDIA="false")  # a new run, the same database
    second, error = fetch_all(again)
    assert error is None and [p.post_id for p in second] == [p.post_id for p in first]
    assert len(graph.calls_to("ig_hashtag_search")) == 1  # the second run asked the cache, not the API
    assert len(graph.calls_to(RECENT)) == 4


def test_hashtags_are_skipped_for_a_window_older_than_a_day(build, graph):
    standard_routes(graph)
    source = build(INSTAGRAM_HASHTAGS="coffee")
    source.now = lambda: datetime(2025, 3, 20, tzinfo=timezone.utc)
    window = FetchWindow(
        since=datetime(2025, 3, 12, tzinfo=timezone.utc), until=datetime(2025, 3, 13, tzinfo=timezone.utc)
    )
    posts, error = fetch_all(source, window)

    assert error is None
    assert [p.post_id for p in posts] == ["17887654321098765"]  # own media of that day
    assert graph.calls_to("ig_hashtag_search") == [] and graph.calls_to(RECENT) == []

    source.now = lambda: datetime(2025, 3, 13, 12, tzinfo=timezone.utc)  # the same window, still within reach
    fetch_all(source, window)
    assert len(graph.calls_to("ig_hashtag_search")) == 1


def _fill_window(db, count: int, *, days_ago: float = 1) -> None:
    with db.transaction() as cur:
        for n in range(count):
            tag = "coffee" if n == 0 else f"tag{n:02d}"
            hashtag_id = COFFEE_ID if n == 0 else f"1784{n:013d}"
            cur.execute(
                "INSERT INTO instagram_hashtags (user_id, hashtag, hashtag_id, first_searched_at)"
                " VALUES (%s, %s, %s, now() - %s * interval '1 day')",
                (USER_ID, tag, hashtag_id, days_ago),
            )


def test_the_31st_new_hashtag_is_refused_and_the_cached_ones_still_run(build, graph, db):
    standard_routes(graph)
    _fill_window(db, 30)  # coffee and 29 others were queried in the last 7 days
    source = build(db=db, INSTAGRAM_HASHTAGS="latteart,coffee", INSTAGRAM_OWN_MEDIA="false")
    posts, error = fetch_all(source)

    assert error is None
    assert len(posts) == 3  # #coffee, cached and inside its window, still ran
    assert graph.calls_to("ig_hashtag_search") == []
    assert len(source.rejects) == 1
    assert "#latteart" in source.rejects[0] and "30" in source.rejects[0] and "7 days" in source.rejects[0]


def test_hashtags_outside_the_window_free_their_place(build, graph, db):
    standard_routes(graph)
    _fill_window(db, 29)
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO instagram_hashtags (user_id, hashtag, hashtag_id, first_searched_at)"
            " VALUES (%s, 'oldtag', '17840000000000999', now() - interval '8 days')",
            (USER_ID,),
        )
    source = build(db=db, INSTAGRAM_HASHTAGS="coffee,espresso,oldtag", INSTAGRAM_OWN_MEDIA="false")
    posts, error = fetch_all(source)

    assert error is None
    # espresso takes the 30th place (searched: not found); oldtag's window is over, so it would be a 31st.
    assert [c["q"] for c in graph.calls_to("ig_hashtag_search")] == ["espresso"]
    assert any("#espresso" in r and "no such hashtag" in r for r in source.rejects)
    assert any("#oldtag" in r and "refused" in r for r in source.rejects)
    assert len(posts) == 3


def test_a_cached_hashtag_past_its_window_starts_a_new_one_without_a_search(build, graph, db):
    standard_routes(graph)
    _fill_window(db, 1, days_ago=8)  # coffee: id cached, first queried 8 days ago
    posts, error = fetch_all(build(db=db, INSTAGRAM_HASHTAGS="coffee", INSTAGRAM_OWN_MEDIA="false"))

    assert error is None and len(posts) == 3
    assert graph.calls_to("ig_hashtag_search") == []  # hashtag ids are static: the cached one is used
    with db.transaction() as cur:
        cur.execute(
            "SELECT first_searched_at > now() - interval '1 minute' FROM instagram_hashtags WHERE hashtag = 'coffee'"
        )
        assert cur.fetchone() == (True,)  # it counts against the limit again, from now


def test_without_a_database_the_limit_is_counted_within_the_run(build, graph):
    standard_routes(graph)
    tags = ",".join(["coffee"] + [f"tag{n:02d}" for n in range(1, 31)])  # 31 hashtags
    source = build(INSTAGRAM_HASHTAGS=tags, INSTAGRAM_OWN_MEDIA="false")
    posts, error = fetch_all(source)

    assert error is None
    assert len(graph.calls_to("ig_hashtag_search")) == 30
    refused = [r for r in source.rejects if "refused" in r]
    assert len(refused) == 1 and "#tag30" in refused[0]
    assert len(posts) == 3


def test_a_hashtag_with_emoji_is_rejected_before_any_call(build, graph):
    standard_routes(graph)
    source = build(INSTAGRAM_HASHTAGS="coffee,café☕", INSTAGRAM_OWN_MEDIA="false")
    posts, error = fetch_all(source)

    assert error is None and len(posts) == 3
    assert [c["q"] for c in graph.calls_to("ig_hashtag_search")] == ["coffee"]
    assert len(source.rejects) == 1 and "café☕" in source.rejects[0]


# -- errors -----------------------------------------------------------------------------------------


def test_expired_token_stops_the_source_and_says_what_to_do(build, graph):
    graph.route(MEDIA, GraphReply("error_190_expired_token", status=400))
    posts, error = fetch_all(build())

    assert posts == [] and error is not None
    message = str(error)
    assert "renew INSTAGRAM_ACCESS_TOKEN" in message
    assert "code 190/463" in message and "Session has expired" in message
    assert "fbtrace_id AWqE3fQh1Zc9Jk2LmN0pQrS" in message
    assert TOKEN not in message
    assert len(graph.calls_to(MEDIA)) == 1  # a refused token is not retried


def test_rate_limit_code_4_backs_off_then_stops_keeping_earlier_posts(build, graph, sleeps):
    limited = GraphReply("error_4_rate_limit", status=403)
    graph.route(MEDIA, lambda q: limited if q.get("after") else GraphReply("own_media_page1"))
    posts, error = fetch_all(build())

    assert [p.post_id for p in posts] == ["17895695668004550", "17912345678901234", "17887654321098765"]
    assert error is not None
    assert "rate limited" in str(error) and "code 4" in str(error) and "after 3 attempts" in str(error)
    assert len(graph.calls_to(MEDIA)) == 1 + 3
    assert len(sleeps) == 2  # the retry policy waited between the three attempts
    assert TOKEN not in str(error)


def test_rate_limit_with_a_long_regain_time_stops_at_once(build, graph, sleeps):
    usage = '{"17841405309211844": [{"type": "instagram", "call_count": 100, "total_cputime": 12, "total_time": 20, "estimated_time_to_regain_access": 7}]}'
    graph.route(MEDIA, GraphReply("error_4_rate_limit", status=403, headers={"X-Business-Use-Case-Usage": usage}))
    posts, error = fetch_all(build())

    assert posts == [] and error is not None
    assert "420s" in str(error)
    assert len(graph.calls_to(MEDIA)) == 1 and sleeps == []


def test_server_errors_are_retried(build, graph, sleeps):
    graph.route(
        MEDIA,
        [
            GraphReply({"error": {"message": "An unexpected error has occurred.", "code": 2}}, status=500),
            "own_media_page2",
        ],
    )
    posts, error = fetch_all(build())

    assert error is None and [p.post_id for p in posts] == ["17876543210987654"]
    assert len(sleeps) == 1


def test_other_errors_are_reported_with_their_message_and_the_rest_still_runs(build, graph):
    standard_routes(graph)
    graph.route(RECENT, GraphReply("error_100_unsupported_get", status=400))
    posts, error = fetch_all(build(INSTAGRAM_HASHTAGS="coffee"))

    assert len(posts) == 4  # the own media were all fetched
    assert error is not None
    message = str(error)
    assert "#coffee" in message and "code 100/33" in message and "Unsupported get request" in message
    assert "fbtrace_id AZx9Yw8Vu7Ts6Rq5Po4NmLk" in message
    assert len(graph.calls_to(RECENT)) == 1  # not a transient error: not retried


def test_the_token_is_absent_from_every_message(build, graph, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    graph.route(MEDIA, GraphReply("error_190_expired_token", status=400))
    seen.append(str(fetch_all(build())[1]))

    graph.route(MEDIA, GraphReply("error_4_rate_limit", status=403))
    seen.append(str(fetch_all(build())[1]))

    malformed = {
        "message": f"Malformed access token {TOKEN}",
        "type": "OAuthException",
        "code": 190,
        "fbtrace_id": "Ay",
    }
    graph.route(MEDIA, GraphReply({"error": malformed}, status=400))
    seen.append(str(fetch_all(build())[1]))

    standard_routes(graph)
    graph.route(RECENT, GraphReply({"error": {"message": f"bad request for access_token={TOKEN}", "code": 100,
                                              "fbtrace_id": "Ax"}}, status=400))  # fmt: skip
    source = build(INSTAGRAM_HASHTAGS="coffee,nothere")
    seen.append(str(fetch_all(source)[1]))
    seen.extend(source.rejects)

    # A network failure: requests puts the whole URL, token included, in its message.
    graph.route(MEDIA, requests.ConnectionError(f"Max retries exceeded with url: /v21.0/{MEDIA}?access_token={TOKEN}"))
    seen.append(str(fetch_all(build())[1]))

    assert all(message and message != "None" for message in seen)
    assert any("renew INSTAGRAM_ACCESS_TOKEN" in m for m in seen) and any("cannot reach" in m for m in seen)
    assert any("retrying" in r.getMessage() for r in caplog.records)
    for text in seen + [r.getMessage() for r in caplog.records]:
        assert TOKEN not in text, text


# -- settings ---------------------------------------------------------------------------------------


def test_check_settings_names_the_missing_setting(make_settings):
    with pytest.raises(ConfigError, match="INSTAGRAM_ACCESS_TOKEN"):
        InstagramSource.check_settings(make_settings(INSTAGRAM_USER_ID=USER_ID))
    with pytest.raises(ConfigError, match="INSTAGRAM_USER_ID"):
        InstagramSource.check_settings(make_settings(INSTAGRAM_ACCESS_TOKEN=TOKEN))
    with pytest.raises(ConfigError, match="numeric"):
        InstagramSource.check_settings(make_settings(INSTAGRAM_ACCESS_TOKEN=TOKEN, INSTAGRAM_USER_ID="@harbour.studio"))
    with pytest.raises(ConfigError, match="INSTAGRAM_HASHTAGS"):
        InstagramSource.check_settings(
            make_settings(INSTAGRAM_ACCESS_TOKEN=TOKEN, INSTAGRAM_USER_ID=USER_ID, INSTAGRAM_OWN_MEDIA="false")
        )
    InstagramSource.check_settings(make_settings(INSTAGRAM_ACCESS_TOKEN=TOKEN, INSTAGRAM_USER_ID=USER_ID))


def test_config_key_names_the_account_and_hashtags(build):
    key = build(INSTAGRAM_HASHTAGS="coffee,tea").config_key()
    assert len(key) == 12 and TOKEN not in key
    assert build(INSTAGRAM_HASHTAGS="#Tea, coffee").config_key() == key  # same hashtags, however written
    assert build(INSTAGRAM_HASHTAGS="coffee").config_key() != key
    assert build(INSTAGRAM_HASHTAGS="coffee,tea", INSTAGRAM_USER_ID="17841400000000001").config_key() != key
    assert build(INSTAGRAM_HASHTAGS="coffee,tea", INSTAGRAM_ACCESS_TOKEN="another-token").config_key() == key


def test_contract_posts_fetches_the_fixtures(tmp_path):
    posts = contract_posts(tmp_path)
    assert len(posts) == 7  # 4 own media + 3 from #coffee
    assert all(p.platform == "instagram" and p.created_at.tzinfo is not None for p in posts)
    assert len({p.post_id for p in posts}) == len(posts)


@pytest.mark.parametrize("shift", ["spring forward", "fall back"])
def test_the_hashtag_window_is_seven_times_24_hours_whatever_the_sessions_time_zone(db, monkeypatch, shift):
    # "now() - 7 * interval '1 day'" counts calendar days of the session's zone: across a DST change 167 or 169 hours,
    # so a hashtag was freed an hour early (a 31st search Meta refuses) or held an hour late.
    from datetime import datetime, timedelta, timezone

    from etl.db import Database

    day = (datetime.now(timezone.utc) - timedelta(days=3)).timetuple().tm_yday  # a change of offset 3 days ago
    if not 2 <= day <= 362:
        pytest.skip("the made-up zone's rule needs a change inside the year")
    rule = f"AAA0BBB,J{day},J365" if shift == "spring forward" else f"AAA0BBB,J1,J{day}"
    monkeypatch.setenv("PGTZ", rule)  # libpq sends it as the session's TimeZone
    searches = HashtagSearches(Database(db.dsn, display="test"))
    inside, outside = "167.5", "168.5"
    with db.transaction() as cur:
        for tag, hours in (("inside", inside), ("outside", outside)):
            cur.execute(
                "INSERT INTO instagram_hashtags (user_id, hashtag, hashtag_id, first_searched_at)"
                " VALUES (%s, %s, '1784', now() - %s * interval '1 hour')",
                (USER_ID, tag, hours),
            )
    assert searches.known(USER_ID, "inside", 7) == ("1784", True)
    assert searches.known(USER_ID, "outside", 7) == ("1784", False)
    assert searches.in_window(USER_ID, 7) == {"inside"}
