"""End to end: the real `etl.py` archives a recent search and a user timeline from a local fake of the X API v2."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from etl.sources.base import query_stream
from tests.conftest import query
from tests.platform_twitter import FIXTURES, USER_ID, FakeCompliance
from tests.support import HTTPServerFixture, Reply, assert_refused_cleanly, jpeg_bytes, png_bytes

QUERY = "#sunset has:images -is:retweet"

pytestmark = pytest.mark.e2e

TOKEN = "test-token"
JSON = "application/json; charset=utf-8"
SEARCH = "/2/tweets/search/recent"
LOOKUP = "/2/users/by/username/harbourlights"
TIMELINE = f"/2/users/{USER_ID}/tweets"

# What the fake image host serves per media path. The first is PNG bytes behind a .jpg URL: the stored
# extension must follow the real content. The fifth photo of the five-photo post must never be asked for.
PNG, JPEG = png_bytes(12, 8), jpeg_bytes(20, 14)
IMAGES = {
    "/media/GlzQ8aWXAAAbC1x.jpg": (PNG, "image/png"),
    "/ext_tw_video_thumb/2031415301562040320/pu/img/Qk3x9LmZ2bYtW0aP.jpg": (JPEG, "image/jpeg"),
    "/tweet_video_thumb/GlzE1fVWQAAmS7d.jpg": (JPEG, "image/jpeg"),
    **{f"/media/GlyA{n}cove0{n}.jpg": (jpeg_bytes(10 + n, 10), "image/jpeg") for n in range(1, 6)},
    "/media/GlzPier01aa.jpg": (JPEG, "image/jpeg"),
    "/media/GlzPier02bb.png": (PNG, "image/png"),
    "/media/GlvLight01c.jpg": (JPEG, "image/jpeg"),
}
EXPECTED_OBJECTS = {
    "twitter/2026/03/10/2031441254151097417/0.png",
    "twitter/2026/03/10/2031415450792887183/0.jpg",
    "twitter/2026/03/10/2031389634851768473/0.jpg",
    *(f"twitter/2026/03/10/2031342297936822349/{n}.jpg" for n in range(4)),
    "twitter/2026/03/10/2031439945528246360/0.jpg",
    "twitter/2026/03/10/2031439945528246360/1.png",
    "twitter/2026/03/08/2030552854426550284/0.jpg",
}
SEARCH_IDS = ["2031441254151097417", "2031415450792887183", "2031389634851768473", "2031342297936822349"]
TIMELINE_IDS = ["2031439945528246360", "2031101351949242372", "2030552854426550284"]


class FakeX:
    """The X API v2 paths the source uses, served from the fixtures; bearer checked, since_id honoured."""

    def __init__(self, server: HTTPServerFixture, *, malformed: bool = False):
        self.server = server
        self.malformed = malformed  # keep the fixture's tweet without created_at
        self.search_page2: Reply | None = None  # replaces the second search page (a 429, say)
        for path in (SEARCH, LOOKUP, TIMELINE):
            server.routes[path] = self.api
        for path, (body, content_type) in IMAGES.items():
            server.routes[path] = Reply(body=body, content_type=content_type)
        self.compliance = FakeCompliance(server, token=TOKEN)  # the re-check of held posts (tests/test_recheck.py)

    def page(self, name: str, params: dict[str, str]) -> dict:
        text = (FIXTURES / name).read_text(encoding="utf-8").replace("https://pbs.twimg.com", self.server.base)
        page = json.loads(text)
        tweets = page.get("data", [])
        if not isinstance(tweets, list):  # the user lookup
            return page
        if not self.malformed:
            tweets = [t for t in tweets if t.get("created_at")]
        if "since_id" in params:
            tweets = [t for t in tweets if int(t["id"]) > int(params["since_id"])]
            if not tweets:
                return {"meta": {"result_count": 0}}
        page["data"] = tweets
        return page

    def api(self, handler) -> Reply:
        parts = urlsplit(handler.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        headers = {
            "x-rate-limit-limit": "450",
            "x-rate-limit-remaining": "449",
            "x-rate-limit-reset": str(int(time.time()) + 900),
        }
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Reply(status=401, body=(FIXTURES / "error_401.json").read_bytes(), content_type=JSON)
        if parts.path == SEARCH and "next_token" in params and self.search_page2 is not None:
            return self.search_page2
        if parts.path == SEARCH:
            name = "search_page2.json" if "next_token" in params else "search_page1.json"
        elif parts.path == TIMELINE:
            name = "user_tweets_page2.json" if "pagination_token" in params else "user_tweets_page1.json"
        else:
            name = "user_by_username.json"
        body = json.dumps(self.page(name, params)).encode()
        return Reply(body=body, content_type=JSON, headers=headers)


def twitter_env(server: HTTPServerFixture, **extra: str) -> dict[str, str]:
    return {
        "ETL_SOURCES": "twitter",
        "TWITTER_BEARER_TOKEN": TOKEN,
        "TWITTER_QUERY": QUERY,
        "TWITTER_USERNAMES": "harbourlights",
        "TWITTER_API_BASE": server.base,
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        "ETL_RECHECK_POSTS": "0",  # these tests count the fetch's calls; the re-check is tests/test_recheck.py's
        **extra,
    }


def requested(server: HTTPServerFixture, prefix: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(path, query parameters, headers) of every request under `prefix`, in order."""
    calls = []
    for _, path, headers in server.requests:
        parts = urlsplit(path)
        if parts.path.startswith(prefix):
            calls.append((parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}, headers))
    return calls


def stored_objects(tmp_path: Path) -> set[str]:
    root = tmp_path / "data" / "objects"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_twitter_run_archives_posts_and_images(run_etl, db, http_server, tmp_path):
    FakeX(http_server)
    # Debug logging on purpose: the source logs every rate-limit header set at debug.
    result = run_etl("run", env=twitter_env(http_server, ETL_LOG_LEVEL="DEBUG"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert TOKEN not in output
    assert "449 of 450 requests left" in output

    posts = query(
        db.dsn,
        "SELECT post_id, author_username, like_count, comment_count, permalink, hashtags, raw->'author'->>'id'"
        " FROM social_posts WHERE platform = 'twitter' ORDER BY post_id DESC",
    )
    assert sorted(p[0] for p in posts) == sorted(SEARCH_IDS + TIMELINE_IDS)
    first = posts[0]
    assert first[0] == "2031441254151097417"
    assert first[1:6] == (
        "lena_shoots",
        128,
        7,
        "https://x.com/lena_shoots/status/2031441254151097417",
        ["sunset", "photography"],
    )
    assert first[6] == "1278934165420335104"

    media = query(
        db.dsn,
        "SELECT post_id, position, status, content_type, storage_key FROM post_media"
        " WHERE platform = 'twitter' ORDER BY post_id, position",
    )
    assert {m[2] for m in media} == {"stored"}
    assert {m[4] for m in media} == EXPECTED_OBJECTS
    assert [(m[1], m[3]) for m in media if m[0] == "2031342297936822349"] == [(n, "image/jpeg") for n in range(4)]
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS
    stored = (tmp_path / "data" / "objects" / "twitter/2026/03/10/2031441254151097417/0.png").read_bytes()
    assert stored == PNG

    # One lookup, two pages each; the bearer token went to the API and never to the image host.
    api = requested(http_server, "/2/")
    assert [path for path, _, _ in api] == [SEARCH, SEARCH, LOOKUP, TIMELINE, TIMELINE]
    assert all(headers.get("Authorization") == f"Bearer {TOKEN}" for _, _, headers in api)
    images = [c for c in http_server.requests if not c[1].startswith("/2/")]
    assert len(images) == 10 and not any("Authorization" in headers for _, _, headers in images)
    assert http_server.hits.get("/media/GlyA5cove05.jpg") is None  # the fifth photo is over the cap

    # State is kept per stream: the search and the timeline each have their own row and since_id.
    assert stream_cursors(db.dsn) == {
        "search": {"since_id": {"search": SEARCH_IDS[0]}},
        "user:harbourlights": {"since_id": {"user:harbourlights": TIMELINE_IDS[0]}},
    }


def test_twitter_rerun_sends_since_id_and_changes_nothing(run_etl, db, http_server, tmp_path):
    FakeX(http_server)
    assert run_etl("run", env=twitter_env(http_server)).returncode == 0
    http_server.requests.clear()

    result = run_etl("run", "--source", "twitter", env=twitter_env(http_server))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    # The timeline goes on from its since_id. The search's since_id (March 2026) is older than the 7 days
    # recent search reaches, which X would answer with a 400, so the search reads its whole window again.
    api = requested(http_server, "/2/")
    assert [(path, params.get("since_id")) for path, params, _ in api] == [
        (SEARCH, None),
        (SEARCH, None),
        (LOOKUP, None),
        (TIMELINE, TIMELINE_IDS[0]),
    ]
    assert "start_time" not in api[3][1]  # X refuses since_id with start_time
    # Without a since_id the search starts at the watermark less the overlap, clamped to 7 days ago.
    seven_days_ago = datetime.now(timezone.utc) - timedelta(days=7)
    start = datetime.fromisoformat(api[0][1]["start_time"].replace("Z", "+00:00"))
    assert seven_days_ago <= start <= seven_days_ago + timedelta(minutes=10)
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'twitter'")[0][0] == 7
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE platform = 'twitter'")[0][0] == 10
    assert len(http_server.requests) == len(api)  # no image downloaded again
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS
    # State is kept per stream: the search and the timeline each have their own row and since_id.
    assert stream_cursors(db.dsn) == {
        "search": {"since_id": {"search": SEARCH_IDS[0]}},
        "user:harbourlights": {"since_id": {"user:harbourlights": TIMELINE_IDS[0]}},
    }


def test_twitter_rate_limit_past_max_wait_keeps_what_was_fetched(run_etl, db, http_server, tmp_path):
    fake = FakeX(http_server)
    reset = int(time.time()) + 3600
    fake.search_page2 = Reply(
        status=429,
        body=(FIXTURES / "error_429.json").read_bytes(),
        content_type=JSON,
        headers={"x-rate-limit-limit": "450", "x-rate-limit-remaining": "0", "x-rate-limit-reset": str(reset)},
    )

    started = time.monotonic()
    result = run_etl("run", env=twitter_env(http_server, TWITTER_MAX_WAIT="120"))
    output = result.stdout + result.stderr

    assert result.returncode == 1, output
    assert time.monotonic() - started < 60  # it did not sit out the hour
    assert "TWITTER_MAX_WAIT=120s" in output and "Traceback" not in output
    assert TOKEN not in output
    ids = [row[0] for row in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'twitter'")]
    # The search's first page is kept; the rate limit of the search does not hold back the user timeline.
    assert sorted(ids) == sorted(set(SEARCH_IDS[:2]) | set(TIMELINE_IDS))
    # The search stream: no cursor and no watermark saved; the resume point records the posts kept.
    search_key = "stream:" + query_stream(QUERY)
    assert query(
        db.dsn, "SELECT watermark, cursor, resume IS NOT NULL FROM etl_state WHERE source = 'twitter' AND config_key = %s",
        (search_key,),
    ) == [(None, {}, True)]  # fmt: skip
    assert stream_cursors(db.dsn) == {
        "search": {}, "user:harbourlights": {"since_id": {"user:harbourlights": TIMELINE_IDS[0]}}
    }  # fmt: skip


def test_twitter_bad_token_is_a_clear_message_without_the_token(run_etl, db, http_server):
    FakeX(http_server)
    wrong = "wrong-token-0d9e"

    result = run_etl("run", env=twitter_env(http_server, TWITTER_BEARER_TOKEN=wrong))
    assert_refused_cleanly(result, db.dsn, wrong, "401", "TWITTER_BEARER_TOKEN")


def test_twitter_malformed_tweet_is_reported_and_the_rest_archived(run_etl, db, http_server):
    FakeX(http_server, malformed=True)

    result = run_etl("run", env=twitter_env(http_server, TWITTER_USERNAMES=""))
    output = result.stdout + result.stderr

    assert result.returncode == 1, output  # the run finished, one item failed
    assert "2031301533496246277" in output and "missing created_at" in output
    ids = [row[0] for row in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'twitter'")]
    assert sorted(ids) == sorted(SEARCH_IDS)


def stream_cursors(dsn: str) -> dict[str, dict]:
    """The cursor of each twitter stream's state row, by the stream's cursor key (search or user:NAME)."""
    rows = query(dsn, "SELECT config_key, cursor FROM etl_state WHERE source = 'twitter'")
    assert all(key.startswith("stream:") for key, _ in rows), rows  # one row per stream, none per configuration
    return {("search" if key.startswith("stream:query:") else key.removeprefix("stream:")): c for key, c in rows}
