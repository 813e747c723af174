"""End to end: the real `etl.py` archives a channel's uploads from a local fake of the YouTube Data API."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import query
from tests.platform_youtube import CHANNEL_ID, FIXTURES
from tests.support import HTTPServerFixture, Reply, assert_refused_cleanly, jpeg_bytes, png_bytes

pytestmark = pytest.mark.e2e

KEY = "test-key-e2e-5f1c"
JSON = "application/json; charset=UTF-8"
# Which thumbnail each video's best size is, and what the fake image host serves there. The second is
# PNG bytes behind a .jpg URL: the stored extension must follow the real content.
THUMBNAILS = {
    "/vi/Xk2pQ9vLm4A/maxresdefault.jpg": (jpeg_bytes(32, 18), "image/jpeg"),
    "/vi/b7RtY0uE3sQ/sddefault.jpg": (png_bytes(16, 12), "image/png"),
    "/vi/pL0sA4gT6yU/default.jpg": (jpeg_bytes(12, 9), "image/jpeg"),
}
EXPECTED_OBJECTS = {
    "youtube/2026/11/18/Xk2pQ9vLm4A/0.jpg",
    "youtube/2026/11/15/b7RtY0uE3sQ/0.png",
    "youtube/2026/11/08/pL0sA4gT6yU/0.jpg",
}


def serve_youtube(server: HTTPServerFixture) -> None:
    """The fixture JSON per API path (and pageToken), thumbnails rewritten to this server, real image bytes."""

    def fixture(name: str) -> bytes:
        text = (FIXTURES / name).read_text(encoding="utf-8")
        return text.replace("https://i.ytimg.com", server.base).encode("utf-8")

    def api(handler) -> Reply:
        parts = urlsplit(handler.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if params.get("key") != KEY:
            return Reply(status=400, body=fixture("error_key_invalid.json"), content_type=JSON)
        if parts.path == "/youtube/v3/channels" and params.get("id") == CHANNEL_ID:
            return Reply(body=fixture("channels.json"), content_type=JSON)
        if parts.path == "/youtube/v3/playlistItems":
            page = (
                "playlist_items_page2.json"
                if params.get("pageToken") == "EAAaBlBUOkNBTQ"
                else "playlist_items_page1.json"
            )
            return Reply(body=fixture(page), content_type=JSON)
        if parts.path == "/youtube/v3/videos":
            return Reply(body=fixture("videos_uploads.json"), content_type=JSON)
        return Reply(status=404, body=b'{"error": {"code": 404, "message": "Not Found"}}', content_type=JSON)

    for path in ("/youtube/v3/channels", "/youtube/v3/playlistItems", "/youtube/v3/videos"):
        server.routes[path] = api
    for path, (body, content_type) in THUMBNAILS.items():
        server.routes[path] = Reply(body=body, content_type=content_type)


def youtube_env(server: HTTPServerFixture, **extra: str) -> dict[str, str]:
    return {
        "ETL_SOURCES": "youtube",
        "YOUTUBE_API_KEY": KEY,
        "YOUTUBE_CHANNEL_IDS": CHANNEL_ID,
        "YOUTUBE_API_BASE": server.base,
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        **extra,
    }


def api_calls(server: HTTPServerFixture) -> list[str]:
    return [urlsplit(path).path.rsplit("/", 1)[-1] for _, path, _ in server.requests if path.startswith("/youtube/")]


def stored_objects(tmp_path: Path) -> set[str]:
    root = tmp_path / "data" / "objects"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_youtube_run_archives_posts_and_thumbnails(run_etl, db, http_server, tmp_path):
    serve_youtube(http_server)
    result = run_etl("run", env=youtube_env(http_server))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert KEY not in output

    posts = query(
        db.dsn,
        "SELECT post_id, author_username, like_count, comment_count, permalink, created_at, raw->'listing'->>'kind'"
        " FROM social_posts WHERE platform = 'youtube' ORDER BY created_at DESC",
    )
    assert [p[0] for p in posts] == ["Xk2pQ9vLm4A", "b7RtY0uE3sQ", "pL0sA4gT6yU", "Zq9mN3bV7cX"]
    assert posts[0][1:5] == ("Harbour Light Studio", 842, 57, "https://www.youtube.com/watch?v=Xk2pQ9vLm4A")
    assert posts[3][2:4] == (None, None)
    assert {p[6] for p in posts} == {"youtube#playlistItem"}

    media = query(
        db.dsn,
        "SELECT post_id, position, status, content_type, storage_key, width, height FROM post_media"
        " WHERE platform = 'youtube' ORDER BY post_id",
    )
    assert [(m[0], m[1], m[2], m[3]) for m in media] == [
        ("Xk2pQ9vLm4A", 0, "stored", "image/jpeg"),
        ("b7RtY0uE3sQ", 0, "stored", "image/png"),
        ("pL0sA4gT6yU", 0, "stored", "image/jpeg"),
    ]
    assert {m[4] for m in media} == EXPECTED_OBJECTS
    assert (media[0][5], media[0][6]) == (32, 18)
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS
    stored = (tmp_path / "data" / "objects" / "youtube/2026/11/15/b7RtY0uE3sQ/0.png").read_bytes()
    assert stored == THUMBNAILS["/vi/b7RtY0uE3sQ/sddefault.jpg"][0]

    # The whole uploads playlist (two pages), one videos.list: 4 quota units, recorded for the daily budget.
    assert api_calls(http_server) == ["channels", "playlistItems", "playlistItems", "videos"]
    (per_source,) = query(db.dsn, "SELECT per_source FROM etl_runs ORDER BY id DESC LIMIT 1")[0]
    assert per_source["youtube"]["quota_used"] == 4


def test_youtube_rerun_is_incremental_and_changes_nothing(run_etl, db, http_server, tmp_path):
    serve_youtube(http_server)
    assert run_etl("run", env=youtube_env(http_server)).returncode == 0
    http_server.requests.clear()

    # Debug logging on purpose: the google client logs its request URLs (with key=) at DEBUG.
    result = run_etl("run", "--source", "youtube", env=youtube_env(http_server, ETL_LOG_LEVEL="DEBUG"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert KEY not in output
    # The watermark (18 Nov 15:00) minus the overlap reaches into page 1 only: page 2 is not asked for.
    assert api_calls(http_server) == ["channels", "playlistItems", "videos"]
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'youtube'")[0][0] == 4
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE platform = 'youtube'")[0][0] == 3
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS
    thumbnail_hits = sum(1 for _, path, _ in http_server.requests if path.startswith("/vi/"))
    assert thumbnail_hits == 0  # already archived: not downloaded again
    used = query(db.dsn, "SELECT (per_source->'youtube'->>'quota_used')::int FROM etl_runs ORDER BY id")
    assert [row[0] for row in used] == [4, 3]


def test_youtube_daily_budget_counts_earlier_runs(run_etl, db, http_server, tmp_path):
    serve_youtube(http_server)
    assert run_etl("run", env=youtube_env(http_server, YOUTUBE_DAILY_QUOTA="5")).returncode == 0
    http_server.requests.clear()

    # 4 units spent today already: the channels.list fits, the playlistItems.list after it would not.
    result = run_etl("run", env=youtube_env(http_server, YOUTUBE_DAILY_QUOTA="5"))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "YOUTUBE_DAILY_QUOTA=5" in output and KEY not in output
    assert api_calls(http_server) == ["channels"]
    last = query(db.dsn, "SELECT status, per_source, errors FROM etl_runs ORDER BY id DESC LIMIT 1")[0]
    assert last[1]["youtube"]["quota_used"] == 1
    assert any("YOUTUBE_DAILY_QUOTA" in e for e in last[2]), json.dumps(last[2])


def test_youtube_bad_key_fails_cleanly(run_etl, db, http_server):
    serve_youtube(http_server)
    result = run_etl("run", env=youtube_env(http_server, YOUTUBE_API_KEY="wrong-key-0000"))
    assert_refused_cleanly(result, db.dsn, "wrong-key-0000", "API key not valid", "YOUTUBE_API_KEY")


def test_youtube_without_channels_or_query_is_a_config_error(run_etl, db, http_server):
    result = run_etl("run", env={"ETL_SOURCES": "youtube", "YOUTUBE_API_KEY": KEY})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "YOUTUBE_CHANNEL_IDS" in result.stderr + result.stdout
