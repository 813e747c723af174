"""The twitter source against recorded X API v2 pages served by `responses` (no network)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from etl.errors import ConfigError, SourceError
from etl.sources import source_class
from etl.sources.base import FetchWindow
from etl.sources.twitter import TwitterSource, snowflake_time
from tests.platform_twitter import USER_ID, contract_posts, fixture

API = "https://api.x.com"
SEARCH = f"{API}/2/tweets/search/recent"
LOOKUP = f"{API}/2/users/by/username/harbourlights"
TIMELINE = f"{API}/2/users/{USER_ID}/tweets"
EXPANSIONS = (
    "attachments.media_keys,author_id,referenced_tweets.id,referenced_tweets.id.author_id,"
    "referenced_tweets.id.attachments.media_keys"
)
TOKEN = "AAAAAAAAAAAAAAAAAAAAAsecret%2Btoken%3Dvalue"
NOW = datetime(2026, 3, 11, 6, 0, tzinfo=timezone.utc)  # a few hours after the fixtures' newest post

PAGE1_IDS = ["2031441254151097417", "2031415450792887183"]
PAGE2_IDS = ["2031389634851768473", "2031342297936822349"]  # the third tweet on page 2 has no created_at
TIMELINE_IDS = ["2031439945528246360", "2031101351949242372", "2030552854426550284"]


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def build(make_settings, sleeps):
    """A TwitterSource on the default API base, its clock fixed at NOW and its retry sleeps recorded."""

    def make(**env: str) -> TwitterSource:
        env.setdefault("TWITTER_BEARER_TOKEN", TOKEN)
        settings = make_settings(**env)
        TwitterSource.check_settings(settings)
        source = TwitterSource(settings, now=lambda: NOW)
        source.policy = dataclasses.replace(source.policy, sleep=sleeps.append)
        return source

    return make


def params_of(call) -> dict[str, str]:
    """The query parameters of a recorded call (or of a request, in a callback)."""
    request = getattr(call, "request", call)
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


def serve(rsps, url: str, *bodies, status: int = 200, headers: dict[str, str] | None = None) -> None:
    for body in bodies:
        rsps.add(
            responses.GET, url, json=fixture(body) if isinstance(body, str) else body, status=status, headers=headers
        )


def by_id(posts):
    return {p.post_id: p for p in posts}


# -- search -------------------------------------------------------------------------------------------


def test_search_follows_next_token_over_two_pages(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    source = build(TWITTER_QUERY="#sunset has:images -is:retweet")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == PAGE1_IDS + PAGE2_IDS
    assert len(rsps.calls) == 2
    first, second = (params_of(c) for c in rsps.calls)
    assert first["query"] == "#sunset has:images -is:retweet"
    assert first["expansions"] == EXPANSIONS
    assert first["media.fields"] == "url,preview_image_url,type"
    assert first["tweet.fields"] == "created_at,public_metrics,entities,lang,note_tweet"
    assert first["user.fields"] == "username"
    assert first["max_results"] == "100"
    assert "next_token" not in first and "since_id" not in first and "start_time" not in first
    assert second["next_token"] == "b26v89c19zqg8o3fpzbkk8x5wfd5gyn9yw7h4ivlfr3nx"
    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_post_fields_come_from_the_tweet_and_its_includes(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    post = by_id(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))["2031441254151097417"]

    assert post.platform == "twitter"
    assert post.author_username == "lena_shoots"
    assert post.caption.startswith("Golden hour over the harbour tonight 🌅")
    assert post.created_at == datetime(2026, 3, 10, 18, 45, 12, tzinfo=timezone.utc)
    assert (post.like_count, post.comment_count) == (128, 7)
    assert post.permalink == "https://x.com/lena_shoots/status/2031441254151097417"
    assert post.hashtags == ("sunset", "photography")
    # Provenance: the tweet as X sent it, with its author and media attached.
    assert post.raw["id"] == post.post_id
    assert post.raw["author"]["username"] == "lena_shoots"
    assert [m["media_key"] for m in post.raw["media"]] == ["3_2031441249821024256"]


def test_hashtags_fall_back_to_the_text_without_entities(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    gif_post = by_id(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))["2031389634851768473"]
    assert gif_post.hashtags == ("sunset", "mood")


def test_photos_use_url_and_videos_and_gifs_their_preview(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    posts = by_id(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))

    assert posts["2031441254151097417"].image_urls == ("https://pbs.twimg.com/media/GlzQ8aWXAAAbC1x.jpg",)
    assert posts["2031415450792887183"].image_urls == (
        "https://pbs.twimg.com/ext_tw_video_thumb/2031415301562040320/pu/img/Qk3x9LmZ2bYtW0aP.jpg",
    )
    assert posts["2031389634851768473"].image_urls == ("https://pbs.twimg.com/tweet_video_thumb/GlzE1fVWQAAmS7d.jpg",)


def test_more_than_four_media_are_capped_in_attachment_order(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    post = by_id(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))["2031342297936822349"]

    # includes.media lists them shuffled; attachments.media_keys gives the order.
    assert post.image_urls == tuple(f"https://pbs.twimg.com/media/GlyA{n}cove0{n}.jpg" for n in (1, 2, 3, 4))


def test_a_malformed_tweet_is_rejected_and_the_rest_load(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    source = build(TWITTER_QUERY="#sunset")

    posts = list(source.fetch(FetchWindow()))

    assert "2031301533496246277" not in by_id(posts)
    assert len(posts) == 4
    assert len(source.rejects) == 1
    assert "2031301533496246277" in source.rejects[0] and "missing created_at" in source.rejects[0]


def test_a_tweet_without_an_id_is_rejected(build, rsps):
    page = fixture("search_page1.json")
    del page["data"][0]["id"]
    del page["meta"]["next_token"]
    serve(rsps, SEARCH, page)
    source = build(TWITTER_QUERY="#sunset")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == ["2031415450792887183"]
    assert source.rejects and "missing id" in source.rejects[0]


def test_an_empty_search_yields_nothing_and_keeps_the_cursor(build, rsps):
    serve(rsps, SEARCH, "search_empty.json")
    source = build(TWITTER_QUERY="#sunset")
    cursor = {"since_id": {"search": "2031301533496246277"}}

    assert list(source.fetch(FetchWindow(cursor=cursor))) == []
    assert source.cursor == cursor


# -- user timelines -----------------------------------------------------------------------------------


def test_username_is_resolved_once_then_its_timeline_paged(build, rsps):
    serve(rsps, LOOKUP, "user_by_username.json")
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json")
    source = build(TWITTER_USERNAMES="@harbourlights")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == TIMELINE_IDS
    urls = [c.request.url.split("?")[0] for c in rsps.calls]
    assert urls == [LOOKUP, TIMELINE, TIMELINE]
    first, second = params_of(rsps.calls[1]), params_of(rsps.calls[2])
    assert first["expansions"] == EXPANSIONS and first["max_results"] == "100"
    assert "pagination_token" not in first
    assert second["pagination_token"] == "7140dibdnow9c7btw3w29grvxfcgvpb9n9coehpk7xz5i"
    assert "next_token" not in second
    assert {p.author_username for p in posts} == {"harbourlights"}
    assert posts[0].image_urls == (
        "https://pbs.twimg.com/media/GlzPier01aa.jpg",
        "https://pbs.twimg.com/media/GlzPier02bb.png",
    )
    assert posts[1].image_urls == ()  # a text-only post still loads

    # A second fetch by the same source does not look the user up again.
    serve(rsps, TIMELINE, "search_empty.json")
    list(source.fetch(FetchWindow()))
    assert [c.request.url.split("?")[0] for c in rsps.calls].count(LOOKUP) == 1


def test_an_unknown_username_is_rejected_and_the_others_still_load(build, rsps):
    serve(rsps, f"{API}/2/users/by/username/nosuchuser_42", "user_not_found.json")
    serve(rsps, LOOKUP, "user_by_username.json")
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json")
    source = build(TWITTER_USERNAMES="nosuchuser_42,harbourlights")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == TIMELINE_IDS
    assert len(source.rejects) == 1 and "Could not find user with username: [nosuchuser_42]" in source.rejects[0]


def test_a_post_found_by_search_and_timeline_is_yielded_once(build, rsps):
    page = fixture("search_page1.json")
    page["data"].append(copy.deepcopy(fixture("user_tweets_page1.json")["data"][0]))
    page["includes"]["users"].append(fixture("user_by_username.json")["data"])
    del page["meta"]["next_token"]
    serve(rsps, SEARCH, page)
    serve(rsps, LOOKUP, "user_by_username.json")
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json")

    posts = list(build(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="harbourlights").fetch(FetchWindow()))

    ids = [p.post_id for p in posts]
    assert len(ids) == len(set(ids)) == 5
    assert ids.count("2031439945528246360") == 1


@pytest.mark.badinput("a suspended account's timeline (200 with only an errors list) is rejected, the rest loads")
def test_a_suspended_timeline_is_rejected_and_keeps_its_since_id(build, rsps):
    serve(rsps, LOOKUP, "user_by_username.json")
    suspended = {"errors": [{"title": "Forbidden", "detail": "User has been suspended: [harbourlights]."}]}
    serve(rsps, TIMELINE, suspended)
    page = fixture("search_page1.json")
    del page["meta"]["next_token"]
    serve(rsps, SEARCH, page)
    source = build(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="harbourlights")
    cursor = {"since_id": {"user:harbourlights": "2029512243409846593"}}

    posts = list(source.fetch(FetchWindow(cursor=cursor)))  # no SourceError: the stream is reported, not failed

    assert [p.post_id for p in posts] == PAGE1_IDS
    assert source.rejects == ["twitter: @harbourlights timeline: User has been suspended: [harbourlights]."]
    assert source.cursor == {"since_id": {"user:harbourlights": "2029512243409846593", "search": PAGE1_IDS[0]}}


# -- retweets, quotes and replies ---------------------------------------------------------------------
#
# Shapes as X sends them (docs.x.com/x-api/fundamentals/expansions; the Post object's `referenced_tweets` in
# docs.x.com/x-api/fundamentals/data-dictionary): a retweet's own `text` is "RT @author: " plus the original cut
# to the old 140-character budget and ended with "…", and it carries `referenced_tweets: [{"type": "retweeted",
# "id"}]`. The original comes in includes.tweets only with the referenced_tweets.id expansion, its author in
# includes.users with referenced_tweets.id.author_id, its media in includes.media with
# referenced_tweets.id.attachments.media_keys; `timeline_with_references` below honours each of them as X does.

RETWEET_ID = "2031439945528246999"
ORIGINAL_ID = "2031300000000000001"
ORIGINAL_AUTHOR = {"id": "99887766", "name": "Lena", "username": "lena_shoots"}
ORIGINAL_TEXT = (
    "Spent the whole night on the breakwater waiting for the fog to lift over the lighthouse, and at 4:50 it "
    "finally did: the beam swept across the water and lit every droplet. Worth every cold minute. #nightphotography"
)
RT_TEXT = "RT @lena_shoots: " + ORIGINAL_TEXT[:123] + "…"


def retweet_of(original_id: str, retweet_id: str = RETWEET_ID, text: str = RT_TEXT) -> dict:
    """A retweet in a timeline or search page: its own id, the timeline owner as author, X's cut-short text."""
    return {
        "id": retweet_id,
        "edit_history_tweet_ids": [retweet_id],
        "text": text,
        "created_at": "2026-03-10T18:40:00.000Z",
        "author_id": USER_ID,
        "referenced_tweets": [{"type": "retweeted", "id": original_id}],
        # A retweet's retweet_count is the original's; it has no likes or replies of its own.
        "public_metrics": {"retweet_count": 12, "reply_count": 0, "like_count": 0, "quote_count": 0},
        "entities": {"mentions": [{"start": 3, "end": 15, "username": "lena_shoots", "id": "99887766"}]},
    }


ORIGINAL = {
    "id": ORIGINAL_ID,
    "edit_history_tweet_ids": [ORIGINAL_ID],
    "text": ORIGINAL_TEXT,
    "created_at": "2026-03-10T05:02:11.000Z",
    "author_id": "99887766",
    "attachments": {"media_keys": ["3_2031299999999999999"]},
    "public_metrics": {"retweet_count": 12, "reply_count": 4, "like_count": 230, "quote_count": 1},
    "entities": {"hashtags": [{"start": 196, "end": 213, "tag": "nightphotography"}]},
    "lang": "en",
}
ORIGINAL_MEDIA = {
    "media_key": "3_2031299999999999999",
    "type": "photo",
    "url": "https://pbs.twimg.com/media/GlzLena01.jpg",
}


def timeline_with_references(tweets: list[dict], referenced: list[dict], media: list[dict], authors: list[dict],
                             errors: list[dict] | None = None):  # fmt: skip
    """A `responses` callback for one page: includes.tweets/users/media of the referenced posts only for the
    expansions the request names, as X answers."""

    def reply(request):
        expansions = params_of(request)["expansions"].split(",")
        includes: dict = {"users": [fixture("user_by_username.json")["data"]]}
        if "referenced_tweets.id" in expansions:
            includes["tweets"] = referenced
        if "referenced_tweets.id.author_id" in expansions:
            includes["users"] += authors
        if "referenced_tweets.id.attachments.media_keys" in expansions:
            includes["media"] = media
        ids = [t["id"] for t in tweets]
        body = {"data": tweets, "includes": includes,
                "meta": {"result_count": len(tweets), "newest_id": max(ids), "oldest_id": min(ids)}}  # fmt: skip
        if errors:
            body["errors"] = errors
        return 200, {"content-type": "application/json"}, json.dumps(body)

    return reply


def test_a_retweet_is_archived_as_the_original_post_not_its_cut_short_rt_text(build, rsps):
    serve(rsps, LOOKUP, "user_by_username.json")
    page = timeline_with_references([retweet_of(ORIGINAL_ID)], [ORIGINAL], [ORIGINAL_MEDIA], [ORIGINAL_AUTHOR])
    rsps.add_callback(responses.GET, TIMELINE, callback=page)
    source = build(TWITTER_USERNAMES="harbourlights")

    posts = list(source.fetch(FetchWindow()))

    [post] = posts
    assert post.caption == ORIGINAL_TEXT  # whole, not "RT @lena_shoots: … …"
    assert post.post_id == ORIGINAL_ID
    assert post.author_username == "lena_shoots"  # the original's author, not the timeline's owner
    assert post.created_at == datetime(2026, 3, 10, 5, 2, 11, tzinfo=timezone.utc)
    assert (post.like_count, post.comment_count) == (230, 4)
    assert post.image_urls == ("https://pbs.twimg.com/media/GlzLena01.jpg",)
    assert post.hashtags == ("nightphotography",)
    assert post.permalink == f"https://x.com/lena_shoots/status/{ORIGINAL_ID}"
    assert post.raw["retweet"]["id"] == RETWEET_ID  # provenance: the listing's item that brought it in
    expansions = params_of(rsps.calls[1])["expansions"].split(",")
    assert {
        "referenced_tweets.id",
        "referenced_tweets.id.author_id",
        "referenced_tweets.id.attachments.media_keys",
    } <= set(expansions)
    # The timeline resumes from the retweet's own id: its place in the listing, not the original's.
    assert source.cursor == {"since_id": {"user:harbourlights": RETWEET_ID}}
    assert source.quota_used == 3  # the user lookup, the retweet and the original X returned with it


@pytest.mark.badinput("a retweet whose original X did not send (deleted, protected) is rejected, not cut short")
def test_a_retweet_whose_original_x_did_not_send_is_rejected_and_the_rest_load(build, rsps):
    serve(rsps, LOOKUP, "user_by_username.json")
    own = copy.deepcopy(fixture("user_tweets_page1.json")["data"][1])  # a post of the timeline's owner
    gone = "2031200000000000002"
    # X's partial error beside the data for a referenced post it cannot return (here: deleted), in the shape X
    # answers (title/detail/resource_type/parameter/resource_id/value/type, the same as client libraries record).
    error = {"value": gone, "detail": f"Could not find tweet with referenced_tweets.id: [{gone}].",
             "title": "Not Found Error", "resource_type": "tweet", "parameter": "referenced_tweets.id",
             "resource_id": gone, "type": "https://api.twitter.com/2/problems/resource-not-found"}  # fmt: skip
    page = timeline_with_references([retweet_of(gone), own], [], [], [], errors=[error])
    rsps.add_callback(responses.GET, TIMELINE, callback=page)
    source = build(TWITTER_USERNAMES="harbourlights")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == [own["id"]]
    assert RT_TEXT not in [p.caption for p in posts]
    [reject] = source.rejects
    assert RETWEET_ID in reject and gone in reject and "Could not find tweet with referenced_tweets.id" in reject
    assert source.cursor == {"since_id": {"user:harbourlights": RETWEET_ID}}  # read past, like any rejected item


def test_quotes_and_replies_keep_their_own_text_and_id(build, rsps):
    serve(rsps, LOOKUP, "user_by_username.json")
    quote = {**retweet_of(ORIGINAL_ID, "2031439945528246998", "The best lighthouse shot this winter 👇 https://t.co/q1"),
             "referenced_tweets": [{"type": "quoted", "id": ORIGINAL_ID}]}  # fmt: skip
    reply = {**retweet_of(ORIGINAL_ID, "2031439945528246997", "@lena_shoots Worth it, what a frame"),
             "referenced_tweets": [{"type": "replied_to", "id": ORIGINAL_ID}]}  # fmt: skip
    page = timeline_with_references([quote, reply], [ORIGINAL], [ORIGINAL_MEDIA], [ORIGINAL_AUTHOR])
    rsps.add_callback(responses.GET, TIMELINE, callback=page)

    posts = list(build(TWITTER_USERNAMES="harbourlights").fetch(FetchWindow()))

    assert [(p.post_id, p.author_username, p.caption) for p in posts] == [
        (quote["id"], "harbourlights", quote["text"]),
        (reply["id"], "harbourlights", reply["text"]),
    ]
    assert all(p.image_urls == () for p in posts)  # the quoted post's photo is not theirs


def test_search_yields_an_original_once_however_many_retweets_of_it_match(build, rsps):
    second = retweet_of(ORIGINAL_ID, "2031439945528246990")
    page = timeline_with_references([retweet_of(ORIGINAL_ID), second, ORIGINAL], [ORIGINAL], [ORIGINAL_MEDIA],
                                    [ORIGINAL_AUTHOR])  # fmt: skip
    rsps.add_callback(responses.GET, SEARCH, callback=page)
    source = build(TWITTER_QUERY="lighthouse")

    posts = list(source.fetch(FetchWindow()))

    assert [(p.post_id, p.caption) for p in posts] == [(ORIGINAL_ID, ORIGINAL_TEXT)]
    assert source.cursor == {"since_id": {"search": RETWEET_ID}}  # the newest id the search listed


def test_a_retweet_of_a_long_post_takes_the_original_whole_from_its_note_tweet():
    from etl.sources.twitter import tweet_to_post

    whole = "A long walk along the pier &amp; the harbour. " * 8 + "#longread"
    original = {**ORIGINAL, "text": whole[:270] + "… https://t.co/abc", "note_tweet": {"text": whole}}
    post = tweet_to_post(retweet_of(ORIGINAL_ID), {}, {"99887766": ORIGINAL_AUTHOR}, username="harbourlights",
                         tweets_by_id={ORIGINAL_ID: original})  # fmt: skip
    assert post.caption == whole.replace("&amp;", "&") and len(post.caption) > 280
    assert (post.post_id, post.author_username) == (ORIGINAL_ID, "lena_shoots")


# -- incremental runs, backfills, limits --------------------------------------------------------------


def test_since_id_from_the_cursor_is_sent_and_the_new_cursor_set(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    serve(rsps, LOOKUP, "user_by_username.json")
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json")
    source = build(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="harbourlights")
    old = {"search": "2031101351949242372", "user:harbourlights": "2029512243409846593"}
    window = FetchWindow(since=datetime(2026, 3, 10, 23, 0, tzinfo=timezone.utc), cursor={"since_id": old})

    posts = list(source.fetch(window))

    searches = [params_of(c) for c in rsps.calls if c.request.url.startswith(SEARCH)]
    timelines = [params_of(c) for c in rsps.calls if c.request.url.startswith(TIMELINE)]
    assert [p["since_id"] for p in searches] == [old["search"]] * 2
    assert [p["since_id"] for p in timelines] == [old["user:harbourlights"]] * 2
    # X refuses since_id with start_time/end_time; the cursor, not window.since, bounds the read.
    assert not any("start_time" in p or "end_time" in p for p in searches + timelines)
    assert len(posts) == 7
    assert source.cursor == {"since_id": {"search": PAGE1_IDS[0], "user:harbourlights": TIMELINE_IDS[0]}}


def test_the_cursor_never_moves_back(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    source = build(TWITTER_QUERY="#sunset")
    ahead = "2031441254151097999"  # newer than anything in the pages (X returned older ones: clock skew, edits)

    list(source.fetch(FetchWindow(cursor={"since_id": {"search": ahead, "user:gone": "42"}})))

    assert source.cursor == {"since_id": {"search": ahead, "user:gone": "42"}}


def test_a_search_since_id_older_than_seven_days_is_dropped(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    stale = "1399516038558646273"  # minted 2021-06-01
    assert snowflake_time(stale) == datetime(2021, 6, 1, tzinfo=timezone.utc)
    source = build(TWITTER_QUERY="#sunset")

    posts = list(source.fetch(FetchWindow(cursor={"since_id": {"search": stale}})))

    assert "since_id" not in params_of(rsps.calls[0])  # X would answer 400 "must be a tweet id created after"
    assert len(posts) == 4
    assert source.cursor == {"since_id": {"search": PAGE1_IDS[0]}}


def test_a_backfill_uses_start_and_end_time_and_leaves_the_cursor(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    serve(rsps, LOOKUP, "user_by_username.json")
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json")
    source = build(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="harbourlights")
    window = FetchWindow(
        since=datetime(2026, 3, 9, 0, 0, tzinfo=timezone.utc), until=datetime(2026, 3, 10, 16, 0, tzinfo=timezone.utc)
    )

    posts = list(source.fetch(window))

    reads = [c for c in rsps.calls if not c.request.url.startswith(LOOKUP)]
    assert len(reads) == 4
    for call in reads:
        assert params_of(call)["start_time"] == "2026-03-09T00:00:00Z"
        assert params_of(call)["end_time"] == "2026-03-10T16:00:00Z"
        assert "since_id" not in params_of(call)
    # The served pages ignore the window, so the source's own check keeps only posts inside it.
    assert sorted(p.post_id for p in posts) == sorted(["2031389634851768473", "2031342297936822349", TIMELINE_IDS[1]])
    assert source.cursor == {}


def test_a_backfill_older_than_seven_days_starts_the_search_at_its_reach(build, rsps):
    serve(rsps, SEARCH, "search_empty.json")
    source = build(TWITTER_QUERY="#sunset")

    list(source.fetch(FetchWindow(since=datetime(2026, 1, 1, tzinfo=timezone.utc))))

    sent = params_of(rsps.calls[0])
    assert "2026-03-04T06:00:00Z" < sent["start_time"] < "2026-03-04T07:00:00Z"  # NOW - 7 days (+ slack)
    assert "end_time" not in sent


def test_the_limit_stops_early_and_keeps_the_cursor(build, rsps):
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")
    source = build(TWITTER_QUERY="#sunset")
    cursor = {"since_id": {"search": "2031101351949242372"}}

    posts = list(source.fetch(FetchWindow(cursor=cursor, limit=3)))

    assert [p.post_id for p in posts] == PAGE1_IDS + PAGE2_IDS[:1]
    assert params_of(rsps.calls[0])["max_results"] == "10"  # recent search's smallest page
    assert source.cursor == cursor  # the posts between the old since_id and these were not all read


# -- rate limits and errors ---------------------------------------------------------------------------


def serve_429(rsps, *, seconds_to_reset: int) -> None:
    """The next search call is rate limited until `seconds_to_reset` from now (x-rate-limit-reset, epoch)."""
    reset = int(time.time()) + seconds_to_reset
    headers = {"x-rate-limit-remaining": "0", "x-rate-limit-reset": str(reset)}
    serve(rsps, SEARCH, "error_429.json", status=429, headers=headers)


def test_429_within_max_wait_waits_for_the_reset_then_goes_on(build, rsps, sleeps):
    serve(rsps, SEARCH, "search_page1.json")
    serve_429(rsps, seconds_to_reset=30)
    serve(rsps, SEARCH, "search_page2.json")
    source = build(TWITTER_QUERY="#sunset", TWITTER_MAX_WAIT="60")

    posts = list(source.fetch(FetchWindow()))

    assert [p.post_id for p in posts] == PAGE1_IDS + PAGE2_IDS
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 31
    assert params_of(rsps.calls[2])["next_token"] == params_of(rsps.calls[1])["next_token"]  # the same page again


def test_429_beyond_max_wait_stops_the_source_and_keeps_earlier_posts(build, rsps, sleeps):
    serve(rsps, SEARCH, "search_page1.json")
    serve_429(rsps, seconds_to_reset=3600)
    source = build(TWITTER_QUERY="#sunset", TWITTER_MAX_WAIT="900")
    cursor = {"since_id": {"search": "2031101351949242372"}}
    posts = []

    with pytest.raises(SourceError) as caught:
        for post in source.fetch(FetchWindow(cursor=cursor)):
            posts.append(post)

    assert [p.post_id for p in posts] == PAGE1_IDS
    assert sleeps == []
    message = str(caught.value)
    assert "rate limit" in message and "TWITTER_MAX_WAIT=900s" in message
    assert source.cursor == cursor


def test_a_usage_cap_429_is_not_waited_for(build, rsps, sleeps):
    reset = int(time.time()) + 20
    serve(rsps, SEARCH, "error_429_usage_capped.json", status=429, headers={"x-rate-limit-reset": str(reset)})
    source = build(TWITTER_QUERY="#sunset")

    with pytest.raises(SourceError, match="usage cap reached.*Monthly product cap"):
        list(source.fetch(FetchWindow()))
    assert sleeps == [] and len(rsps.calls) == 1


def test_5xx_is_retried_with_backoff(build, rsps, sleeps):
    serve(rsps, SEARCH, {"title": "Service Unavailable", "detail": "Service Unavailable"}, status=503)
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json")

    posts = list(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))

    assert len(posts) == 4 and len(sleeps) == 1


def test_401_names_the_token_setting_and_never_shows_the_token(build, rsps, caplog):
    serve(rsps, SEARCH, "error_401.json", status=401)
    source = build(TWITTER_QUERY="#sunset")

    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as caught:
        list(source.fetch(FetchWindow()))

    message = str(caught.value)
    assert "401" in message and "TWITTER_BEARER_TOKEN" in message
    assert TOKEN not in message and TOKEN not in caplog.text


def test_403_client_not_enrolled_explains_the_access_level(build, rsps):
    serve(rsps, SEARCH, "error_403_client_not_enrolled.json", status=403)

    with pytest.raises(SourceError) as caught:
        list(build(TWITTER_QUERY="#sunset").fetch(FetchWindow()))

    message = str(caught.value)
    assert "client-not-enrolled" in message and "Free tier cannot read" in message
    assert "attached to a Project" in message  # X's own detail is passed on


def test_other_4xx_carry_the_api_title_and_detail(build, rsps):
    serve(rsps, SEARCH, "error_400_invalid_query.json", status=400)

    with pytest.raises(SourceError) as caught:
        list(build(TWITTER_QUERY="#sunset ((has:images").fetch(FetchWindow()))

    message = str(caught.value)
    assert "HTTP 400" in message and "Invalid Request" in message and "Unmatched parenthesis" in message


def test_a_repeated_next_token_is_refused(build, rsps):
    # Without the guard the third request would end the search quietly (and a real API could loop forever).
    serve(rsps, SEARCH, "search_page1.json", "search_page1.json", "search_empty.json")
    posts = []

    with pytest.raises(SourceError, match="same next_token twice"):
        for post in build(TWITTER_QUERY="#sunset").fetch(FetchWindow()):
            posts.append(post)
    assert len(rsps.calls) == 2
    assert [p.post_id for p in posts] == PAGE1_IDS  # the second copy of the page is nothing new


def test_the_token_never_reaches_a_log_line(build, rsps, caplog):
    headers = {"x-rate-limit-limit": "450", "x-rate-limit-remaining": "449", "x-rate-limit-reset": "1773212400"}
    serve(rsps, SEARCH, "search_page1.json", "search_page2.json", headers=headers)
    serve(rsps, LOOKUP, "user_by_username.json", headers=headers)
    serve(rsps, TIMELINE, "user_tweets_page1.json", "user_tweets_page2.json", headers=headers)
    source = build(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="harbourlights")

    with caplog.at_level(logging.DEBUG):
        list(source.fetch(FetchWindow()))

    assert "449 of 450 requests left" in caplog.text  # the rate-limit headers are logged at debug
    assert TOKEN not in caplog.text and TOKEN not in repr(source.settings)


# -- settings, registry, contract ---------------------------------------------------------------------


def test_check_settings_names_the_missing_setting(make_settings):
    with pytest.raises(ConfigError, match="TWITTER_BEARER_TOKEN"):
        TwitterSource.check_settings(make_settings(TWITTER_QUERY="#sunset"))
    with pytest.raises(ConfigError, match="TWITTER_QUERY.*TWITTER_USERNAMES"):
        TwitterSource.check_settings(make_settings(TWITTER_BEARER_TOKEN=TOKEN))
    with pytest.raises(ConfigError, match="TWITTER_USERNAMES"):
        TwitterSource.check_settings(make_settings(TWITTER_BEARER_TOKEN=TOKEN, TWITTER_USERNAMES="ok_name,not a name"))
    TwitterSource.check_settings(make_settings(TWITTER_BEARER_TOKEN=TOKEN, TWITTER_USERNAMES="@harbourlights"))


def test_config_key_follows_the_query_and_usernames(make_settings):
    def key(**env: str) -> str:
        return TwitterSource(make_settings(TWITTER_BEARER_TOKEN=TOKEN, **env)).config_key()

    base = key(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="a,b")
    assert base == key(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="@B, a")
    assert base != key(TWITTER_QUERY="#sunrise", TWITTER_USERNAMES="a,b")
    assert base != key(TWITTER_QUERY="#sunset", TWITTER_USERNAMES="a")
    assert len(base) == 12


def test_the_source_is_registered():
    assert source_class("twitter") is TwitterSource


def test_contract_posts_are_served_over_loopback(tmp_path):
    posts = contract_posts(tmp_path)
    assert [p.post_id for p in posts] == PAGE1_IDS + PAGE2_IDS + TIMELINE_IDS


@pytest.mark.badinput("a tweet with an absurd count or date is refused by the shared record validator")
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"public_metrics": {"like_count": -3, "reply_count": 0}}, "like_count -3 is out of range"),
        ({"created_at": "1999-12-31T23:59:59.000Z"}, "before 2000"),
    ],
)
def test_tweets_go_through_the_shared_validator(change, message):
    from etl.errors import RecordError
    from etl.sources.twitter import tweet_to_post

    good = {"id": "1767000000000000000", "text": "hello", "created_at": "2026-03-10T12:00:00.000Z"}
    assert tweet_to_post(good, {}, {}).post_id == "1767000000000000000"  # the tweet is fine without the change
    with pytest.raises(RecordError, match=message):
        tweet_to_post({**good, **change}, {}, {})


def test_text_is_stored_as_the_author_wrote_it():
    from etl.sources.twitter import tweet_to_post

    tweet = {"id": "2031441254151097417", "created_at": "2026-03-10T08:00:00.000Z",
             "text": "Fish &amp; chips &lt;3 &gt;_&lt; and a literal &amp;lt; #sunset"}  # fmt: skip
    post = tweet_to_post(tweet, {}, {})
    assert post.caption == "Fish & chips <3 >_< and a literal &lt; #sunset"


def test_a_long_post_is_taken_whole_from_note_tweet():
    from etl.sources.twitter import tweet_to_post

    whole = "A long walk along the pier &amp; the harbour. " * 8 + "#sunset #longread"
    tweet = {
        "id": "2031441254151097418", "created_at": "2026-03-10T08:00:00.000Z",
        "text": whole[:270] + "… https://t.co/abc", "entities": {"hashtags": []},
        "note_tweet": {"text": whole, "entities": {"hashtags": [
            {"start": len(whole) - 17, "end": len(whole) - 10, "tag": "sunset"},
            {"start": len(whole) - 9, "end": len(whole), "tag": "longread"}]}},
    }  # fmt: skip
    post = tweet_to_post(tweet, {}, {})
    assert post.caption == whole.replace("&amp;", "&") and len(post.caption) > 280
    assert post.hashtags == ("sunset", "longread")
