"""The youtube source over the official API's JSON shapes, served by HttpMockSequence: no network, no sleeping."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from etl.db.platform import QuotaLedger
from etl.errors import ConfigError, SourceError
from etl.sources import source_class
from etl.sources.base import FetchWindow
from etl.sources.youtube import YouTubeSource, best_thumbnail, quota_day_start
from tests.platform_youtube import (
    API_KEY,
    CHANNEL_ID,
    UPLOADS_ID,
    UPLOADS_SEQUENCE,
    contract_posts,
    load,
    mock_http,
    no_sleep_policy,
    reply,
)

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def settings(make_settings):
    def build(**env: str):
        values = {"YOUTUBE_API_KEY": API_KEY, "YOUTUBE_CHANNEL_IDS": CHANNEL_ID}
        values.update(env)
        return make_settings(**{k: v for k, v in values.items() if v is not None})

    return build


def make_source(settings, http, sleeps=None, attempts=3, db=None, **env):
    source = YouTubeSource(settings(**env), http=http, state=QuotaLedger(db) if db is not None else None)
    source.policy = no_sleep_policy(attempts=attempts, sleeps=sleeps)
    return source


def playlist_page(entries, token=None):
    """A playlistItems.list page (the fixture's first item as template) for (video id, published) pairs."""
    template = load("playlist_items_page1.json")["items"][0]
    items = []
    for vid, published in entries:
        item = copy.deepcopy(template)
        stamp = published.strftime("%Y-%m-%dT%H:%M:%SZ")
        item["contentDetails"] = {"videoId": vid, "videoPublishedAt": stamp}
        item["snippet"]["resourceId"]["videoId"] = vid
        item["snippet"]["publishedAt"] = stamp
        items.append(item)
    body = {"kind": "youtube#playlistItemListResponse", "etag": "e", "items": items, "pageInfo": {}}
    return reply({**body, "nextPageToken": token} if token else body)


def videos_reply(entries):
    """A videos.list answer for (video id, published) pairs."""
    template = load("videos_uploads.json")["items"][0]
    items = []
    for vid, published in entries:
        item = copy.deepcopy(template)
        item["id"] = vid
        item["snippet"]["publishedAt"] = published.strftime("%Y-%m-%dT%H:%M:%SZ")
        items.append(item)
    return reply({"kind": "youtube#videoListResponse", "etag": "e", "items": items, "pageInfo": {}})


def calls(http) -> list[tuple[str, dict[str, str]]]:
    """(path, query parameters) of every request the mock answered."""
    out = []
    for uri, method, _body, _headers in http.request_sequence:
        assert method == "GET"
        parts = urlsplit(uri)
        out.append((parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}))
    return out


def fetch_all(source, window=None):
    with source:
        return list(source.fetch(window or FetchWindow()))


# -- settings ---------------------------------------------------------------------------------------


def test_registered_under_its_name():
    assert source_class("youtube") is YouTubeSource


def test_missing_api_key_names_the_setting(settings):
    with pytest.raises(ConfigError, match="YOUTUBE_API_KEY"):
        YouTubeSource.check_settings(settings(YOUTUBE_API_KEY=None))


def test_neither_channels_nor_query_names_both_settings(settings):
    with pytest.raises(ConfigError) as info:
        YouTubeSource.check_settings(settings(YOUTUBE_CHANNEL_IDS=None))
    assert "YOUTUBE_CHANNEL_IDS" in str(info.value) and "YOUTUBE_QUERY" in str(info.value)


@pytest.mark.parametrize("env", [{}, {"YOUTUBE_CHANNEL_IDS": None, "YOUTUBE_QUERY": "harbour"}, {"YOUTUBE_QUERY": "x"}])
def test_either_mode_is_enough(settings, env):
    YouTubeSource.check_settings(settings(**env))  # no error


def test_config_key_follows_channels_and_query_not_their_order(settings):
    key = YouTubeSource(settings(YOUTUBE_CHANNEL_IDS="UCaaa,UCbbb")).config_key()
    assert key == YouTubeSource(settings(YOUTUBE_CHANNEL_IDS="UCbbb, UCaaa")).config_key()
    assert key != YouTubeSource(settings(YOUTUBE_CHANNEL_IDS="UCaaa")).config_key()
    assert key != YouTubeSource(settings(YOUTUBE_CHANNEL_IDS="UCaaa,UCbbb", YOUTUBE_QUERY="harbour")).config_key()
    assert API_KEY not in key and len(key) < 40


# -- the uploads path -------------------------------------------------------------------------------


def test_uploads_path_follows_pages_and_maps_every_field(settings):
    http = mock_http(*UPLOADS_SEQUENCE)
    source = make_source(settings, http)
    posts = fetch_all(source)

    # The private video on page 1 is absent from videos.list and skipped; the other four, newest first.
    assert [p.post_id for p in posts] == ["Xk2pQ9vLm4A", "b7RtY0uE3sQ", "pL0sA4gT6yU", "Zq9mN3bV7cX"]
    requests = calls(http)
    assert [path for path, _ in requests] == [
        "/youtube/v3/channels",
        "/youtube/v3/playlistItems",
        "/youtube/v3/playlistItems",
        "/youtube/v3/videos",
    ]
    channels, page1, page2, videos = (params for _, params in requests)
    assert channels["id"] == CHANNEL_ID and channels["part"] == "contentDetails"
    assert page1["playlistId"] == UPLOADS_ID and page1["maxResults"] == "50" and "pageToken" not in page1
    assert page2["pageToken"] == "EAAaBlBUOkNBTQ"
    assert videos["id"] == "Xk2pQ9vLm4A,b7RtY0uE3sQ,Hn5cW8zJ1fD,pL0sA4gT6yU,Zq9mN3bV7cX"
    assert set(videos["part"].split(",")) == {"snippet", "statistics"}
    assert all(params["key"] == API_KEY for _, params in requests)
    assert source.quota_used == 4  # 1 channels + 2 playlistItems pages + 1 videos
    assert source.rejects == []

    first = posts[0]
    assert first.platform == "youtube"
    assert first.author_username == "Harbour Light Studio"
    assert first.caption == (
        "Sunset over the harbour #timelapse\n\n"
        "Shot on a calm evening from the north pier. Love how the light turned out!\n\n#sunset #Harbour #4k"
    )
    assert first.created_at == utc(2026, 11, 18, 15, 0) and first.created_at.tzinfo is not None
    assert first.created_at.utcoffset().total_seconds() == 0
    assert first.permalink == "https://www.youtube.com/watch?v=Xk2pQ9vLm4A"
    assert first.like_count == 842 and first.comment_count == 57
    assert first.hashtags == ("timelapse", "sunset", "harbour", "4k")
    # Provenance: the videos.list item, with the playlist item that listed it.
    assert first.raw["kind"] == "youtube#video" and first.raw["id"] == "Xk2pQ9vLm4A"
    assert first.raw["statistics"]["viewCount"] == "15321"
    assert first.raw["listing"]["kind"] == "youtube#playlistItem"
    assert first.raw["listing"]["contentDetails"]["videoId"] == "Xk2pQ9vLm4A"
    json.dumps(first.raw)  # JSON all the way down


def test_best_thumbnail_available_or_none(settings):
    posts = {p.post_id: p for p in fetch_all(make_source(settings, mock_http(*UPLOADS_SEQUENCE)))}
    assert posts["Xk2pQ9vLm4A"].image_urls == ("https://i.ytimg.com/vi/Xk2pQ9vLm4A/maxresdefault.jpg",)
    assert posts["b7RtY0uE3sQ"].image_urls == ("https://i.ytimg.com/vi/b7RtY0uE3sQ/sddefault.jpg",)
    assert posts["pL0sA4gT6yU"].image_urls == ("https://i.ytimg.com/vi/pL0sA4gT6yU/default.jpg",)
    assert posts["Zq9mN3bV7cX"].image_urls == ()


def test_hidden_counts_and_empty_description(settings):
    posts = {p.post_id: p for p in fetch_all(make_source(settings, mock_http(*UPLOADS_SEQUENCE)))}
    quiet = posts["Zq9mN3bV7cX"]
    assert quiet.like_count is None and quiet.comment_count is None  # likes hidden, comments off
    assert quiet.caption == "Behind the scenes"  # no trailing blank lines when there is no description
    assert quiet.hashtags == ()


def test_best_thumbnail_order():
    assert best_thumbnail({"high": {"url": "h"}, "medium": {"url": "m"}, "default": {"url": "d"}}) == "h"
    assert best_thumbnail({"medium": {"url": "m"}, "maxres": {"url": "x"}}) == "x"
    assert best_thumbnail({"standard": {"url": " "}, "default": {"url": "d"}}) == "d"
    assert best_thumbnail({}) is None and best_thumbnail(None) is None


def test_stops_at_the_watermark_without_paging_further(settings):
    # Page 1: 18th, 15th, then the private video (12th) older than `since`: page 2 is never asked for.
    http = mock_http("channels.json", "playlist_items_page1.json", "videos_uploads.json")
    source = make_source(settings, http)
    posts = fetch_all(source, FetchWindow(since=utc(2026, 11, 14)))
    assert [p.post_id for p in posts] == ["Xk2pQ9vLm4A", "b7RtY0uE3sQ"]
    assert [path for path, _ in calls(http)] == [
        "/youtube/v3/channels",
        "/youtube/v3/playlistItems",
        "/youtube/v3/videos",
    ]
    assert calls(http)[2][1]["id"] == "Xk2pQ9vLm4A,b7RtY0uE3sQ"
    assert source.quota_used == 3


def test_backfill_until_skips_newer_and_keeps_paging(settings):
    http = mock_http(*UPLOADS_SEQUENCE)
    posts = fetch_all(make_source(settings, http), FetchWindow(since=utc(2026, 11, 1), until=utc(2026, 11, 10)))
    assert [p.post_id for p in posts] == ["pL0sA4gT6yU"]  # 30 Oct is before since, 12th+ after until
    assert len(calls(http)) == 4 and calls(http)[-1][1]["id"] == "pL0sA4gT6yU"


def test_limit_asks_only_for_what_it_needs(settings):
    http = mock_http("channels.json", "playlist_items_page1.json", "videos_uploads.json")
    source = make_source(settings, http)
    posts = fetch_all(source, FetchWindow(limit=2))
    assert [p.post_id for p in posts] == ["Xk2pQ9vLm4A", "b7RtY0uE3sQ"]
    assert calls(http)[-1][1]["id"] == "Xk2pQ9vLm4A,b7RtY0uE3sQ"
    assert source.quota_used == 3


def test_unknown_channel_is_reported_and_the_others_still_load(settings):
    two = load("channels.json")  # channels.list silently leaves unknown ids out of its answer
    http = mock_http(reply(two), "playlist_items_page1.json", "playlist_items_page2.json", "videos_uploads.json")
    source = make_source(settings, http, YOUTUBE_CHANNEL_IDS=f"UCnope0000000000000000xx,{CHANNEL_ID}")
    posts = fetch_all(source)
    assert len(posts) == 4
    assert calls(http)[0][1]["id"] == f"UCnope0000000000000000xx,{CHANNEL_ID}"  # one call for both
    assert len(source.rejects) == 1 and "UCnope0000000000000000xx" in source.rejects[0]


def test_channel_without_uploads_playlist_is_skipped(settings):
    # An empty channel's uploads playlist answers 404 playlistNotFound; the next channel still loads.
    channels = load("channels.json")
    other = copy.deepcopy(channels["items"][0])
    other["id"] = "UCb8Tz2KpW5nQe7RjY4xL1vM"
    other["contentDetails"]["relatedPlaylists"]["uploads"] = "UUb8Tz2KpW5nQe7RjY4xL1vM"
    channels["items"].insert(0, other)
    http = mock_http(
        reply(channels),
        reply("error_playlist_not_found.json", 404),
        "playlist_items_page1.json",
        "playlist_items_page2.json",
        "videos_uploads.json",
    )
    source = make_source(settings, http, YOUTUBE_CHANNEL_IDS=f"UCb8Tz2KpW5nQe7RjY4xL1vM,{CHANNEL_ID}")
    assert len(fetch_all(source)) == 4
    assert calls(http)[1][1]["playlistId"] == "UUb8Tz2KpW5nQe7RjY4xL1vM"


@pytest.mark.fault("a YouTube page token that repeats ends that stream as failed (not complete), as on every platform")
def test_repeated_page_token_fails_the_stream_instead_of_looping(settings):
    page1 = load("playlist_items_page1.json")
    page2 = {**load("playlist_items_page2.json"), "nextPageToken": page1["nextPageToken"]}  # the same token again
    http = mock_http("channels.json", reply(page1), reply(page2))
    source = make_source(settings, http)
    with pytest.raises(SourceError, match="same pageToken twice"):
        fetch_all(source)
    # Not counted as read to its end (the runner keeps the stream's watermark), and the token not followed.
    assert [path for path, _ in calls(http)] == ["/youtube/v3/channels"] + ["/youtube/v3/playlistItems"] * 2


def test_each_channel_stream_reads_its_own_channel(settings):
    # The runner restricts one source instance to one stream after another: the second channel is resolved
    # and listed then, not the first one's playlist again.
    other = copy.deepcopy(load("channels.json"))
    other["items"][0]["id"] = "UCb8Tz2KpW5nQe7RjY4xL1vM"
    other["items"][0]["contentDetails"]["relatedPlaylists"]["uploads"] = "UUb8Tz2KpW5nQe7RjY4xL1vM"
    http = mock_http(*UPLOADS_SEQUENCE, reply(other), *UPLOADS_SEQUENCE[1:])
    source = make_source(settings, http, YOUTUBE_CHANNEL_IDS=f"{CHANNEL_ID},UCb8Tz2KpW5nQe7RjY4xL1vM")
    with source:
        source.restrict(f"channel:{CHANNEL_ID}")
        first = list(source.fetch(FetchWindow()))
        source.restrict("channel:UCb8Tz2KpW5nQe7RjY4xL1vM")
        second = list(source.fetch(FetchWindow()))
    assert len(first) == len(second) == 4
    requests = calls(http)
    assert [params.get("id") for path, params in requests if path.endswith("channels")] == [
        CHANNEL_ID, "UCb8Tz2KpW5nQe7RjY4xL1vM"
    ]  # fmt: skip
    playlists = [params["playlistId"] for path, params in requests if path.endswith("playlistItems")]
    assert playlists == [UPLOADS_ID] * 2 + ["UUb8Tz2KpW5nQe7RjY4xL1vM"] * 2


def test_handle_is_resolved_with_for_handle(settings):
    http = mock_http(*UPLOADS_SEQUENCE)
    posts = fetch_all(make_source(settings, http, YOUTUBE_CHANNEL_IDS="@harbourlight"))
    assert len(posts) == 4
    assert calls(http)[0][1]["forHandle"] == "@harbourlight" and "id" not in calls(http)[0][1]


def test_api_base_override_is_used(settings):
    http = mock_http(*UPLOADS_SEQUENCE)
    fetch_all(make_source(settings, http, YOUTUBE_API_BASE="http://127.0.0.1:9/yt-proxy"))
    uri = http.request_sequence[0][0]
    assert uri.startswith("http://127.0.0.1:9/yt-proxy/youtube/v3/channels?")


# -- the search path --------------------------------------------------------------------------------


def test_search_path_with_published_after_and_date_order(settings):
    http = mock_http("search_page1.json", "search_page2.json", "videos_search.json")
    source = make_source(settings, http, YOUTUBE_CHANNEL_IDS=None, YOUTUBE_QUERY="harbour timelapse")
    posts = fetch_all(source, FetchWindow(since=utc(2026, 11, 1, 6, 30)))

    assert [p.post_id for p in posts] == ["Rt4eW1qA8zN", "Xk2pQ9vLm4A", "Mc6vB2nH5jK"]
    requests = calls(http)
    assert [path for path, _ in requests] == ["/youtube/v3/search", "/youtube/v3/search", "/youtube/v3/videos"]
    first = requests[0][1]
    assert first["q"] == "harbour timelapse" and first["type"] == "video" and first["order"] == "date"
    assert first["part"] == "snippet" and first["maxResults"] == "50"
    assert first["publishedAfter"] == "2026-11-01T06:30:00Z" and "publishedBefore" not in first
    assert requests[1][1]["pageToken"] == "CAIQAA"
    assert source.quota_used == 201  # two search pages at 100 each, one videos.list

    drone = posts[0]
    assert drone.author_username == "Coastal Drone Club"
    assert drone.image_urls == ("https://i.ytimg.com/vi/Rt4eW1qA8zN/maxresdefault.jpg",)
    assert drone.like_count == 410 and drone.hashtags == ("drone", "timelapse")
    assert drone.raw["listing"]["kind"] == "youtube#searchResult"
    # The search result only offered up to "high"; the videos.list item did not either for this one.
    assert posts[2].image_urls == ("https://i.ytimg.com/vi/Mc6vB2nH5jK/hqdefault.jpg",)


def test_search_backfill_sends_published_before(settings):
    http = mock_http("search_page1.json", "search_page2.json", "videos_search.json")
    source = make_source(settings, http, YOUTUBE_CHANNEL_IDS=None, YOUTUBE_QUERY="harbour")
    posts = fetch_all(source, FetchWindow(since=utc(2026, 11, 1), until=utc(2026, 11, 16)))
    assert calls(http)[0][1]["publishedBefore"] == "2026-11-16T00:00:00Z"
    assert [p.post_id for p in posts] == ["Mc6vB2nH5jK"]


def test_both_modes_archive_each_video_once(settings):
    # Each stream (the channel, the query) asks videos.list for its own candidates: in a run each is a unit
    # of its own anyway, so they never shared a batch there.
    http = mock_http(*UPLOADS_SEQUENCE, "search_page1.json", "search_page2.json", "videos_search.json")
    source = make_source(settings, http, YOUTUBE_QUERY="harbour")
    posts = fetch_all(source)
    ids = [p.post_id for p in posts]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    assert [params["id"].split(",").count("Xk2pQ9vLm4A") for path, params in calls(http) if path.endswith("videos")] == [1, 1]
    assert next(p for p in posts if p.post_id == "Xk2pQ9vLm4A").raw["listing"]["kind"] == "youtube#playlistItem"
    assert source.quota_used == 1 + 2 + 1 + 200 + 1


# -- quota ------------------------------------------------------------------------------------------


def test_budget_stops_before_the_call_that_would_exceed_it(settings):
    http = mock_http("channels.json", "playlist_items_page1.json", "playlist_items_page2.json")
    source = make_source(settings, http, YOUTUBE_DAILY_QUOTA="3")
    with pytest.raises(SourceError) as info:
        fetch_all(source)
    message = str(info.value)
    assert "YOUTUBE_DAILY_QUOTA=3" in message and "videos.list" in message
    assert source.quota_used == 3 and len(http.request_sequence) == 3


def test_budget_stop_keeps_what_was_yielded(settings):
    # 50 videos on page 1 (one videos.list batch), 5 more on page 2: the budget of 4 stops before the 2nd batch.
    first = [(f"vid{n:08d}", utc(2026, 11, 18 - n // 10, 10)) for n in range(50)]
    second = [(f"vid{n:08d}", utc(2026, 11, 10, 10)) for n in range(50, 55)]
    http = mock_http("channels.json", playlist_page(first, "NEXT"), videos_reply(first), playlist_page(second))
    source = make_source(settings, http, YOUTUBE_DAILY_QUOTA="4")
    got = []
    with pytest.raises(SourceError, match="daily budget"):
        for post in source.fetch(FetchWindow()):
            got.append(post)
    assert [p.post_id for p in got] == [vid for vid, _ in first]
    assert source.quota_used == 4


def test_backfill_chunks_start_near_their_end_instead_of_the_top(settings):
    # Four pages of three uploads, a day apart, newest first: 30 Oct ... 19 Oct.
    days = [[(f"day{d:02d}vid{k}", utc(2026, 10, d, 12 - k)) for k in range(3)] for d in range(30, 18, -1)]
    pages = [sum(days[i : i + 3], []) for i in range(0, 12, 3)]  # 3 days (9 items) per page
    tokens = [None, "T1", "T2", "T3"]

    def page(n):
        return playlist_page(pages[n], tokens[n + 1] if n + 1 < len(pages) else None)

    all_items = sum(pages, [])
    http = mock_http(
        # chunk 1, [19 Oct, 22 Oct): from the top down to the end of the playlist
        "channels.json", page(0), page(1), page(2), page(3), videos_reply(all_items),
        # chunk 2, [22 Oct, 25 Oct): starts one page before the first page reaching back past 25 Oct
        page(1), page(2), page(3), videos_reply(all_items),
    )  # fmt: skip
    source = make_source(settings, http)
    with source:
        chunk1 = list(source.fetch(FetchWindow(since=utc(2026, 10, 19), until=utc(2026, 10, 22))))
        chunk2 = list(source.fetch(FetchWindow(since=utc(2026, 10, 22), until=utc(2026, 10, 25))))
    assert [p.created_at.day for p in chunk1] == [21] * 3 + [20] * 3 + [19] * 3
    assert [p.created_at.day for p in chunk2] == [24] * 3 + [23] * 3 + [22] * 3
    requests = calls(http)
    assert [params.get("pageToken") for path, params in requests[6:] if path.endswith("playlistItems")] == [
        "T1",
        "T2",
        "T3",
    ]
    assert [path for path, _ in requests].count("/youtube/v3/channels") == 1  # resolved once per run
    assert source.quota_used == 10


def test_earlier_runs_today_count_against_the_budget(settings, db):
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO etl_runs (mode, sources, started_at, status, per_source) VALUES"
            " ('run', '{youtube}', now(), 'ok', %s),"
            " ('run', '{youtube,mock}', now(), 'partial', %s),"
            " ('run', '{mock}', now(), 'ok', %s),"
            " ('run', '{youtube}', now() - interval '3 days', 'ok', %s)",
            (
                json.dumps({"youtube": {"quota_used": 9900, "fetched": 12}}),
                json.dumps({"youtube": {"quota_used": 95}, "mock": {"fetched": 3}}),
                json.dumps({"mock": {"quota_used": 5000}}),
                json.dumps({"youtube": {"quota_used": 7000}}),
            ),
        )
    http = mock_http()  # nothing may be called: search.list costs 100, only 5 units are left
    source = make_source(settings, http, db=db, YOUTUBE_CHANNEL_IDS=None, YOUTUBE_QUERY="harbour")
    with pytest.raises(SourceError) as info:
        fetch_all(source)
    assert source.quota_used_earlier == 9995
    assert "9995 used by earlier runs today" in str(info.value) and "search.list" in str(info.value)
    assert http.request_sequence == []


def test_without_earlier_runs_the_whole_budget_is_available(settings, db):
    source = make_source(settings, mock_http(*UPLOADS_SEQUENCE), db=db, YOUTUBE_DAILY_QUOTA="4")
    assert len(fetch_all(source)) == 4
    assert source.quota_used_earlier == 0 and source.quota_used == 4


def test_quota_day_starts_at_midnight_pacific():
    assert quota_day_start(utc(2026, 11, 21, 12, 0)) == utc(2026, 11, 21, 8, 0)  # PST, UTC-8
    assert quota_day_start(utc(2026, 7, 1, 3, 0)) == utc(2026, 6, 30, 7, 0)  # PDT, still the 30th in California


def test_quota_exceeded_ends_the_source_with_a_clear_message(settings):
    http = mock_http("channels.json", reply("error_quota_exceeded.json", 403))
    source = make_source(settings, http)
    with pytest.raises(SourceError) as info:
        fetch_all(source)
    message = str(info.value)
    assert "quotaExceeded" in message and "midnight Pacific" in message
    assert "exceeded your quota" in message and "<a" not in message  # Google's HTML link is stripped
    assert API_KEY not in message and "Traceback" not in message
    assert len(http.request_sequence) == 2  # not retried


# -- errors and retries -----------------------------------------------------------------------------


def test_server_error_is_retried_then_succeeds(settings):
    sleeps: list[float] = []
    http = mock_http(
        "channels.json",
        reply("error_backend.json", 500),
        "playlist_items_page1.json",
        "playlist_items_page2.json",
        "videos_uploads.json",
    )
    source = make_source(settings, http, sleeps=sleeps)
    posts = fetch_all(source)
    assert len(posts) == 4
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 5.0
    assert calls(http)[1] == calls(http)[2]  # the same request again
    assert source.quota_used == 5  # the failed attempt is charged too


def test_rate_limit_403_is_retried(settings):
    sleeps: list[float] = []
    http = mock_http(reply("error_rate_limit.json", 403), *UPLOADS_SEQUENCE)
    assert len(fetch_all(make_source(settings, http, sleeps=sleeps))) == 4
    assert len(sleeps) == 1


def test_retries_give_up_with_a_source_error(settings):
    sleeps: list[float] = []
    http = mock_http(reply("error_backend.json", 503), reply("error_backend.json", 503))
    source = make_source(settings, http, sleeps=sleeps, attempts=2)
    with pytest.raises(SourceError) as info:
        fetch_all(source)
    assert "HTTP 503" in str(info.value) and "gave up after 2 attempts" in str(info.value)
    assert len(sleeps) == 1 and API_KEY not in str(info.value)


def test_connection_error_is_retried(settings):
    class FlakyHttp:
        """Refuses the first connection, then answers from a mock sequence."""

        def __init__(self):
            self.inner = mock_http(*UPLOADS_SEQUENCE)
            self.refused = 0

        def request(self, uri, *args, **kwargs):
            if self.refused == 0:
                self.refused += 1
                raise ConnectionRefusedError(111, f"Connection refused for {uri}")
            return self.inner.request(uri, *args, **kwargs)

    sleeps: list[float] = []
    http = FlakyHttp()
    assert len(fetch_all(make_source(settings, http, sleeps=sleeps))) == 4
    assert http.refused == 1 and len(sleeps) == 1


def test_connection_error_message_has_no_key(settings):
    class DeadHttp:
        def request(self, uri, *args, **kwargs):
            raise ConnectionRefusedError(111, f"Connection refused for {uri}")

    with pytest.raises(SourceError) as info:
        fetch_all(make_source(settings, DeadHttp(), attempts=2))
    assert "cannot reach the API" in str(info.value)
    assert API_KEY not in str(info.value) and "key=***" in str(info.value)


@pytest.mark.parametrize(
    ("fixture", "status", "expected"),
    [
        ("error_key_invalid.json", 400, ["HTTP 400", "API key not valid", "YOUTUBE_API_KEY"]),
        ("error_forbidden.json", 403, ["HTTP 403 forbidden", "does not have permission"]),
        ("error_channel_not_found.json", 404, ["HTTP 404 channelNotFound", "parameter cannot be found"]),
    ],
)
def test_other_errors_become_a_source_error_with_the_api_message(settings, fixture, status, expected, caplog):
    http = mock_http(reply(fixture, status))
    source = make_source(settings, http)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(SourceError) as info:
            fetch_all(source)
    message = str(info.value)
    for part in expected:
        assert part in message
    assert "<code>" not in message
    assert API_KEY not in message and API_KEY not in caplog.text
    assert (
        info.value.__cause__ is None and info.value.__suppress_context__
    )  # no chained HttpError (its URL has the key)
    assert len(http.request_sequence) == 1  # not retried


def test_google_client_log_lines_are_scrubbed(settings, caplog):
    with caplog.at_level(logging.DEBUG, logger="googleapiclient"):
        fetch_all(make_source(settings, mock_http(*UPLOADS_SEQUENCE)))
    assert "URL being requested" in caplog.text  # the client did log its URLs...
    assert "key=***" in caplog.text and API_KEY not in caplog.text  # ...without the key


def test_not_json_answer_is_a_source_error(settings):
    http = mock_http(({"status": "200", "content-type": "text/html"}, "<html>captive portal</html>"))
    with pytest.raises(SourceError, match="not a JSON object"):
        fetch_all(make_source(settings, http))


# -- the shared contract helper ---------------------------------------------------------------------


def test_contract_posts_over_the_fixtures(tmp_path):
    posts = contract_posts(tmp_path)
    assert [p.post_id for p in posts] == ["Xk2pQ9vLm4A", "b7RtY0uE3sQ", "pL0sA4gT6yU", "Zq9mN3bV7cX"]
    assert all(p.platform == "youtube" and p.created_at.tzinfo is not None for p in posts)
