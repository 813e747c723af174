"""Bluesky: author feeds and a search against a local fake of the AppView and PDS; sessions kept and refreshed."""

from __future__ import annotations

import json
import stat
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from etl.sources.base import FetchWindow, query_stream
from etl.sources.bluesky import BlueskySource, item_to_post
from tests.conftest import query
from tests.platform_bluesky import (
    CREATE,
    FEED,
    FEED_URIS,
    FIXTURES,
    PASSWORD,
    REFRESH,
    SEARCH,
    SEARCH_URIS,
    FakeBluesky,
    bluesky_env,
)  # fmt: skip
from tests.support import Reply, stored_objects, stream_states


def source_for(make_settings, server, tmp_path, **extra):
    env = bluesky_env(server, tmp_path, **extra)
    env.pop("ETL_DATA_DIR")
    return BlueskySource(make_settings(**env))


def test_item_mapping_repost_original_images_and_guarded_created_at():
    page = json.loads((FIXTURES / "author_feed_page1.json").read_text())
    repost = item_to_post(page["feed"][1])
    assert repost.post_id == FEED_URIS[1] and repost.author_username == "lena-shoots.bsky.social"
    assert repost.permalink == "https://bsky.app/profile/lena-shoots.bsky.social/post/3lk1lena0001"
    # recordWithMedia: the post's own media only, not the quoted post's image
    assert repost.image_urls == ("https://cdn.bsky.app/img/feed_fullsize/plain/did:plc:z72i7hdynmk6r22z27h6tvur/bafkreilenafog01@jpeg",)
    video = item_to_post(page["feed"][2])
    assert video.image_urls[0].endswith("/bafkreivideo01/thumbnail.jpg")
    future = item_to_post(json.loads((FIXTURES / "author_feed_page2.json").read_text())["feed"][0])
    assert future.created_at.isoformat() == "2026-03-08T12:00:00+00:00"  # createdAt 2099 -> indexedAt
    assert future.caption == "Clock on my phone is wrong again & again <3"


@pytest.mark.e2e
def test_bluesky_run_archives_feed_and_search_then_rerun_fetches_nothing_twice(run_etl, db, http_server, tmp_path):
    fake = FakeBluesky(http_server)
    env = {**bluesky_env(http_server, tmp_path), "ETL_SOURCES": "bluesky", "ETL_LOG_LEVEL": "DEBUG"}
    result = run_etl("run", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2999 of 3000 requests left" in output
    rows = query(db.dsn, "SELECT post_id, like_count, comment_count, hashtags FROM social_posts WHERE platform = 'bluesky'")
    assert sorted(r[0] for r in rows) == sorted(set(FEED_URIS + SEARCH_URIS))
    assert dict((r[0], r[1:]) for r in rows)[FEED_URIS[0]] == (41, 3, ["sunset", "photography"])
    media = query(db.dsn, "SELECT post_id, position, status FROM post_media WHERE platform = 'bluesky' ORDER BY 1, 2")
    assert {m[2] for m in media} == {"stored"} and len(media) == 6
    assert len(stored_objects(tmp_path / "data" / "objects")) == 6
    session_file = tmp_path / "data" / "bluesky-session.json"
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    secrets = [PASSWORD, "access-1", "refresh-1"]
    ledger = json.dumps(query(db.dsn, "SELECT * FROM etl_runs", ())[0], default=str)
    assert not any(s in output or s in ledger for s in secrets)
    assert stream_states(db.dsn, "bluesky") == {"streams": {
        "actor:harbourlights.bsky.social": {"after": "2026-03-10T08:12:31.204000+00:00"},
        query_stream("#sunset"): {"after": "2026-03-10T08:12:31.204000+00:00"},
    }}  # fmt: skip

    http_server.requests.clear()
    again = run_etl("run", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    calls = fake.api_calls("/xrpc/")
    # The feed stops on its first page at the saved place; the search asks since ETL_OVERLAP_MINUTES (60) before it
    # (searchPosts filters on sortAt, which a post indexed late has below the saved indexedAt); no new login.
    paths = [path for path, _, _ in calls if not path.endswith("getPosts")]  # (getPosts: the re-check)
    assert paths[0] == FEED and set(paths[1:]) == {SEARCH}
    assert calls[1][1]["since"] == "2026-03-10T07:12:31.204000Z"
    assert fake.logins == 1
    assert all(r[1].startswith("/xrpc/") for r in http_server.requests)  # no image downloaded again
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE platform = 'bluesky'")[0][0] == 6
    assert stream_states(db.dsn, "bluesky")["streams"][query_stream("#sunset")] == {"after": "2026-03-10T08:12:31.204000+00:00"}


@pytest.mark.fault("Bluesky access token expired between runs: refreshSession renews it, no new login")
def test_expired_access_token_is_refreshed_not_logged_in_again(make_settings, http_server, tmp_path):
    fake = FakeBluesky(http_server, access_uses=1)
    with source_for(make_settings, http_server, tmp_path, BLUESKY_ACTORS="") as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == [SEARCH_URIS[0], SEARCH_URIS[1], SEARCH_URIS[2]]
    assert fake.logins == 1 and fake.refreshes == 1
    saved = json.loads((tmp_path / "data" / "bluesky-session.json").read_text())
    assert saved["accessJwt"].endswith("access-2.sig")
    with source_for(make_settings, http_server, tmp_path, BLUESKY_ACTORS="") as source:
        assert len(list(source.fetch(FetchWindow()))) == 3
    assert fake.logins == 1  # the saved session was used


@pytest.mark.fault("Bluesky refresh token expired too: one new login, the run goes on")
def test_expired_refresh_token_logs_in_again(make_settings, http_server, tmp_path):
    fake = FakeBluesky(http_server)
    fake.overrides[REFRESH] = [fake.error("error_expired.json", 400)]
    (tmp_path / "data").mkdir()
    stale = {"handle": "archiver.bsky.social", "pds": http_server.base, "accessJwt": "old-a", "refreshJwt": "old-r"}
    (tmp_path / "data" / "bluesky-session.json").write_text(json.dumps(stale))
    (tmp_path / "data" / "bluesky-session.json").chmod(0o644)
    with source_for(make_settings, http_server, tmp_path, BLUESKY_ACTORS="") as source:
        assert len(list(source.fetch(FetchWindow()))) == 3
    assert fake.logins == 1
    assert stat.S_IMODE((tmp_path / "data" / "bluesky-session.json").stat().st_mode) == 0o600


@pytest.mark.fault("Bluesky login refused: the search stream ends naming BLUESKY_HANDLE, author feeds still archived")
def test_wrong_app_password_ends_the_search_only(make_settings, http_server, tmp_path):
    FakeBluesky(http_server)
    with source_for(make_settings, http_server, tmp_path, BLUESKY_APP_PASSWORD="wrong-pass-1234") as source:
        ids = [p.post_id for p in source.fetch(FetchWindow())]
    assert ids == FEED_URIS
    assert source.rejected == 1 and "BLUESKY_HANDLE" in source.rejects[0] and "wrong-pass" not in source.rejects[0]
    assert "actor:harbourlights.bsky.social" in source.cursor["streams"]
    assert "query:#sunset" not in source.cursor["streams"] or "floor" in source.cursor["streams"]["query:#sunset"]


@pytest.mark.fault("Bluesky 429 with a ratelimit-reset an hour away: that stream stops, what came before is kept")
def test_rate_limit_past_the_allowed_wait_ends_the_stream(make_settings, http_server, tmp_path):
    fake = FakeBluesky(http_server)
    reset = {"ratelimit-remaining": "0", "ratelimit-reset": str(int(time.time()) + 3600)}
    fake.overrides[FEED] = [fake.reply(json.loads(fake.text("author_feed_page1.json"))), fake.error("error_ratelimit.json", 429, reset)]
    with source_for(make_settings, http_server, tmp_path) as source:
        started = time.monotonic()
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor={"streams": {"actor:harbourlights.bsky.social": {"after": "2026-01-01T00:00:00+00:00"}}}))]
        assert time.monotonic() - started < 20
    assert ids[:3] == FEED_URIS[:3] and set(SEARCH_URIS) <= set(ids)
    assert "rate limit" in source.rejects[0] and "resets at" in source.rejects[0]
    assert source.cursor["streams"]["actor:harbourlights.bsky.social"] == {"after": "2026-01-01T00:00:00+00:00"}


@pytest.mark.badinput("Bluesky page that is not JSON: the stream ends with a message, the first page is kept")
def test_malformed_page_ends_the_stream_cleanly(make_settings, http_server, tmp_path):
    fake = FakeBluesky(http_server)
    fake.overrides[FEED] = [fake.reply(json.loads(fake.text("author_feed_page1.json"))), Reply(body=b"<html>502</html>", content_type="text/html")]
    with source_for(make_settings, http_server, tmp_path, BLUESKY_QUERY="") as source:
        ids = [p.post_id for p in source.fetch(FetchWindow())]
    assert ids == FEED_URIS[:3]
    assert "not a JSON object" in source.rejects[0]
    assert source.cursor == {"streams": {"actor:harbourlights.bsky.social": {"floor": None}}}


@pytest.mark.fault("Bluesky AppView 5xx on every attempt: that stream ends, the search still runs")
def test_server_errors_end_one_stream(make_settings, http_server, tmp_path):
    fake = FakeBluesky(http_server)
    fake.overrides[FEED] = [Reply(status=503, body=b"unavailable", content_type="text/plain")] * 10
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow())]
    assert ids == SEARCH_URIS
    assert "HTTP 503" in source.rejects[0]
    assert http_server.hits  # sanity: the fake was asked
    assert CREATE in {p for p, _ in http_server.posted}


@pytest.mark.fault("Bluesky search fails on its second page: the next run asks back to that read's floor and archives it")
def test_a_search_that_failed_mid_listing_is_read_back_to_its_floor(run_etl, db, http_server, tmp_path):
    # The unit completes (the error ends that stream only), so its watermark moves to the newest post of page 1;
    # the stream keeps the floor of the read that failed, and the next search must ask from there, not from the
    # watermark, or the server leaves out the post on page 2 for good.
    fake = FakeBluesky(http_server)
    page1 = json.loads(fake.text("search_page1.json"))
    fake.overrides[SEARCH] = [fake.reply(page1)] + [Reply(status=503, body=b"unavailable", content_type="text/plain")] * 20
    env = {**bluesky_env(http_server, tmp_path), "BLUESKY_ACTORS": "", "ETL_SOURCES": "bluesky"}
    first = run_etl("run", env=env)
    assert "HTTP 503" in first.stdout + first.stderr
    assert {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts")} < set(SEARCH_URIS)
    fake.overrides[SEARCH] = []  # the AppView answers again
    second = run_etl("run", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts")} == set(SEARCH_URIS)
    asked = [q.get("since") for p, q, _ in fake.api_calls("/xrpc/") if p == SEARCH]
    assert asked[-1] is None, asked  # the first run had no watermark: its floor is none, so the search asks it all


@pytest.mark.fault("a Bluesky post indexed late (createdAt before the last search's newest indexedAt): archived next run")
def test_a_post_indexed_late_is_found_by_the_next_search(run_etl, db, http_server, tmp_path):
    # searchPosts' `since` filters on sortAt (the lexicon: "which may not match createdAt"), the earlier of createdAt
    # and indexedAt. The search asked since the saved indexedAt: a post created just before it and indexed just
    # after the last read was below it, and never archived.
    from datetime import datetime, timedelta, timezone

    from tests.platform_bluesky import sort_at

    FakeBluesky(http_server)  # its sessions; the search is served here
    t = datetime(2026, 3, 10, 8, 0, tzinfo=timezone.utc)

    def post(rkey: str, created: datetime, indexed: datetime) -> dict:
        iso = lambda d: d.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # noqa: E731
        return {"uri": f"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/{rkey}", "cid": "bafy" + rkey,
                "author": {"did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "handle": "harbourlights.bsky.social"},
                "record": {"$type": "app.bsky.feed.post", "createdAt": iso(created), "text": f"#sunset {rkey}"},
                "indexedAt": iso(indexed), "likeCount": 0, "replyCount": 0}  # fmt: skip

    posts = [post("3seen00001", t, t)]

    def search(handler) -> Reply:
        since = parse_qs(urlsplit(handler.path).query).get("since")
        shown = [p for p in posts if since is None or sort_at(p) >= datetime.fromisoformat(since[0].replace("Z", "+00:00"))]
        shown.sort(key=sort_at, reverse=True)
        return Reply(body=json.dumps({"posts": shown}).encode(), content_type="application/json")

    http_server.routes[SEARCH] = search
    env = {**bluesky_env(http_server, tmp_path), "BLUESKY_ACTORS": "", "ETL_SOURCES": "bluesky"}
    assert run_etl("run", env=env).returncode == 0
    # Created a second before the post already read, indexed two minutes after it (a slow relay, say).
    posts.append(post("3late00002", t - timedelta(seconds=1), t + timedelta(minutes=2)))
    assert run_etl("run", env=env).returncode == 0
    held = {r[0].rsplit("/", 1)[-1] for r in query(db.dsn, "SELECT post_id FROM social_posts")}
    assert held == {"3seen00001", "3late00002"}


# getAuthorFeed is ordered by feed_item.sortAt, not by indexedAt: the AppView pages it by a TimeCidKeyset on sortAt
# (bluesky-social/atproto, packages/bsky/src/data-plane/server/routes/feeds.ts), and a post's feed item gets
# `sortAt: post.indexedAt < post.createdAt ? post.indexedAt : post.createdAt` (.../indexing/plugins/post.ts). A post
# whose author's clock ran behind sits below posts indexed before it; a read that stopped at the saved indexedAt
# lost it, and the saved place then moved past it.

SKEW_ACTOR = "harbourlights.bsky.social"
SKEW_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


def skewed_view(rkey: str, created: str, indexed: str, text: str) -> dict:
    # app.bsky.feed.defs#feedViewPost {post: postView} (lexicons/app/bsky/feed/defs.json)
    return {
        "post": {
            "uri": f"at://{SKEW_DID}/app.bsky.feed.post/{rkey}",
            "cid": f"bafyrei{rkey}",
            "author": {"did": SKEW_DID, "handle": SKEW_ACTOR, "displayName": "Harbour Lights", "labels": []},
            "record": {"$type": "app.bsky.feed.post", "createdAt": created, "langs": ["en"], "text": text},
            "replyCount": 0, "repostCount": 0, "likeCount": 1, "quoteCount": 0,
            "indexedAt": indexed, "labels": [],
        }
    }  # fmt: skip


# In real feed order: sortAt = min(createdAt, indexedAt), newest first.
SKEW_NEW = skewed_view("3lknew0000001", "2026-03-10T12:10:00.000Z", "2026-03-10T12:10:01.000Z", "new post")
SKEW_LAST = skewed_view("3lklast000001", "2026-03-10T12:00:00.000Z", "2026-03-10T12:00:01.000Z", "newest post of the last run")
# Written on a phone whose clock is 3.5 minutes slow; indexed at 12:01:30, after the last run (12:00:30).
SKEW_LATE = skewed_view("3lkskew000001", "2026-03-10T11:58:00.000Z", "2026-03-10T12:01:30.000Z", "posted just after the last run")
SKEW_OLD = skewed_view("3lkold0000001", "2026-03-10T11:50:00.000Z", "2026-03-10T11:50:01.000Z", "older post")


def test_an_author_feed_reads_back_past_its_saved_place_for_a_post_sorted_below_it_by_its_createdAt(make_settings, http_server, tmp_path):
    feed = [SKEW_NEW, SKEW_LAST, SKEW_LATE, SKEW_OLD]

    def route(handler) -> Reply:
        params = parse_qs(urlsplit(handler.path).query)
        assert params.get("actor") == [SKEW_ACTOR]
        body = {"feed": [] if params.get("cursor") else feed}
        return Reply(body=json.dumps(body).encode(), content_type="application/json")

    http_server.routes["/xrpc/app.bsky.feed.getAuthorFeed"] = route
    settings = make_settings(BLUESKY_ACTORS=SKEW_ACTOR, BLUESKY_API_BASE=http_server.base, ETL_RETRY_MAX_WAIT="0.05")
    saved = {"streams": {f"actor:{SKEW_ACTOR}": {"after": "2026-03-10T12:00:01+00:00"}}}  # LAST's indexedAt
    with BlueskySource(settings) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor=saved))]
    assert SKEW_LATE["post"]["uri"] in ids, f"the post indexed after the last run was lost: got {ids}"
