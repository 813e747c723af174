"""End to end: the real `etl.py` archives own media and #coffee from a local fake of the Instagram Graph API."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import query
from tests.platform_instagram import COFFEE_ID, USER_ID, FakeGraph, GraphReply, fixture
from tests.support import HTTPServerFixture, Reply, assert_refused_cleanly, jpeg_bytes, png_bytes

pytestmark = pytest.mark.e2e

TOKEN = "test-token"
API = "/v21.0"
CDN_RE = re.compile(r"https://scontent-(\w+)-1\.cdninstagram\.com")

# The carousel's first child is PNG bytes behind a .jpg URL: the stored extension follows the real content.
PNG = png_bytes(12, 8)
PNG_PATH = "/cdn/ams2/v/t51.29350-15/431001_n.jpg"

OWN_IDS = ["17895695668004550", "17912345678901234", "17887654321098765", "17876543210987654"]
HASHTAG_IDS = ["18028374650192837", "18039485761203948", "18047362514098273"]
EXPECTED_OBJECTS = {
    "instagram/2025/03/14/17895695668004550/0.jpg",
    "instagram/2025/03/13/17912345678901234/0.png",
    "instagram/2025/03/13/17912345678901234/1.jpg",
    "instagram/2025/03/13/17912345678901234/2.jpg",
    "instagram/2025/03/12/17887654321098765/0.jpg",
    "instagram/2025/03/10/17876543210987654/0.jpg",
    "instagram/2025/03/14/18028374650192837/0.jpg",
    "instagram/2025/03/14/18039485761203948/0.jpg",
    "instagram/2025/03/14/18039485761203948/1.jpg",
}


def well_formed(name: str) -> dict:
    """A fixture page without the items the unit tests use to exercise rejects."""
    page = fixture(name)
    page["data"] = [item for item in page["data"] if item.get("id") and item.get("timestamp")]
    return page


class FakeInstagram:
    """The Graph API paths the source uses, and the CDN serving the images the fixtures point to."""

    def __init__(self, server: HTTPServerFixture):
        self.server = server
        self.graph = FakeGraph(server.base + API)
        self.graph.rewrite = lambda text: CDN_RE.sub(server.base + r"/cdn/\1", text)
        self.graph.route(f"{USER_ID}/media", self.own_media)
        self.graph.route("ig_hashtag_search", self.hashtag_search)
        self.graph.route(
            f"{COFFEE_ID}/recent_media",
            lambda q: GraphReply(well_formed("hashtag_recent_page2" if q.get("after") else "hashtag_recent_page1")),
        )
        for path in (f"{USER_ID}/media", "ig_hashtag_search", f"{COFFEE_ID}/recent_media"):
            server.routes[f"{API}/{path}"] = self.api
        for path in self.image_paths():
            if path == PNG_PATH:
                server.routes[path] = Reply(body=PNG, content_type="image/png")
            else:
                server.routes[path] = Reply(body=jpeg_bytes(16 + len(server.routes) % 7, 12), content_type="image/jpeg")
        self.token_checked = True

    @staticmethod
    def own_media(params: dict[str, str]) -> GraphReply:
        return GraphReply(well_formed("own_media_page2" if params.get("after") else "own_media_page1"))

    @staticmethod
    def hashtag_search(params: dict[str, str]) -> GraphReply:
        return GraphReply("hashtag_search_coffee" if params.get("q") == "coffee" else "hashtag_search_empty")

    def image_paths(self) -> set[str]:
        """Every image URL path in the fixtures (not the .mp4 videos: those must never be asked for)."""
        paths = set()
        for name in ("own_media_page1", "own_media_page2", "hashtag_recent_page1", "hashtag_recent_page2"):
            text = self.graph.rewrite((Path(__file__).parent / "fixtures" / "instagram" / f"{name}.json").read_text())
            for url in re.findall(r'"(http://[^"]+)"', text):
                path = urlsplit(url).path
                if path.startswith("/cdn/") and not path.endswith(".mp4"):
                    paths.add(path)
        return paths

    def api(self, handler) -> Reply:
        parts = urlsplit(handler.path)
        if parse_qs(parts.query).get("access_token") != [TOKEN]:
            self.token_checked = False
            status, headers, body = (
                400,
                {},
                (Path(__file__).parent / "fixtures" / "instagram" / "error_190_expired_token.json").read_bytes(),
            )
        else:
            status, headers, body = self.graph.answer(parts.path, parts.query)
        content_type = headers.pop("Content-Type", "application/json")
        return Reply(status=status, body=body, content_type=content_type, headers=headers)


def instagram_env(server: HTTPServerFixture, **extra: str) -> dict[str, str]:
    return {
        "ETL_SOURCES": "instagram",
        "INSTAGRAM_ACCESS_TOKEN": TOKEN,
        "INSTAGRAM_USER_ID": USER_ID,
        "INSTAGRAM_HASHTAGS": "coffee",
        "INSTAGRAM_API_BASE": server.base + API,
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        **extra,
    }


def stored_objects(tmp_path: Path) -> set[str]:
    root = tmp_path / "data" / "objects"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def api_calls(server: HTTPServerFixture) -> list[tuple[str, dict[str, str]]]:
    calls = []
    for _, path, _ in server.requests:
        parts = urlsplit(path)
        if parts.path.startswith(API + "/"):
            calls.append((parts.path[len(API) + 1 :], {k: v[0] for k, v in parse_qs(parts.query).items()}))
    return calls


def test_instagram_run_archives_posts_and_images(run_etl, db, http_server, tmp_path):
    fake = FakeInstagram(http_server)
    result = run_etl("run", env=instagram_env(http_server, ETL_LOG_LEVEL="DEBUG"))  # debug: the most it logs
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    assert TOKEN not in output

    posts = query(
        db.dsn,
        "SELECT post_id, author_username, like_count, comment_count, permalink, hashtags, created_at"
        " FROM social_posts WHERE platform = 'instagram' ORDER BY created_at DESC, post_id",
    )
    assert sorted(p[0] for p in posts) == sorted(OWN_IDS + HASHTAG_IDS)
    by_id = {p[0]: p for p in posts}
    assert by_id["17895695668004550"][1:6] == (
        "harbour.studio", 120, 8, "https://www.instagram.com/p/C4aBcDeFgHi/", ["sunrise", "travel"],
    )  # fmt: skip
    assert by_id["17895695668004550"][6].isoformat() == "2025-03-14T09:30:00+00:00"
    assert by_id["17887654321098765"][2] is None  # hidden like count
    assert by_id["18028374650192837"][1] is None  # recent_media has no username

    media = query(
        db.dsn,
        "SELECT post_id, position, status, content_type, storage_key, source_url FROM post_media"
        " WHERE platform = 'instagram' ORDER BY post_id, position",
    )
    assert {m[2] for m in media} == {"stored"}
    assert {m[4] for m in media} == EXPECTED_OBJECTS
    carousel = [m for m in media if m[0] == "17912345678901234"]
    assert [(m[1], m[3]) for m in carousel] == [(0, "image/png"), (1, "image/jpeg"), (2, "image/jpeg")]
    assert [urlsplit(m[5]).path for m in carousel] == [
        PNG_PATH,
        "/cdn/ams2/v/t51.29350-15/431002_thumb_n.jpg",  # the carousel's video child gives its thumbnail
        "/cdn/ams2/v/t51.29350-15/431003_n.jpg",
    ]
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS
    assert (tmp_path / "data/objects/instagram/2025/03/13/17912345678901234/0.png").read_bytes() == PNG

    # The token went to the API only, as access_token; never to the CDN; no video was downloaded.
    assert fake.token_checked
    cdn = [path for _, path, _ in http_server.requests if path.startswith("/cdn/")]
    assert len(cdn) == 9 and not any(TOKEN in path or path.split("?")[0].endswith(".mp4") for path in cdn)
    assert [path for path, _ in api_calls(http_server)] == [
        f"{USER_ID}/media", f"{USER_ID}/media", "ig_hashtag_search", f"{COFFEE_ID}/recent_media", f"{COFFEE_ID}/recent_media",
    ]  # fmt: skip
    assert query(db.dsn, "SELECT user_id, hashtag, hashtag_id FROM instagram_hashtags") == [
        (USER_ID, "coffee", COFFEE_ID)
    ]


def test_instagram_rerun_uses_the_cached_hashtag_id_and_changes_nothing(run_etl, db, http_server, tmp_path):
    FakeInstagram(http_server)
    first = run_etl("run", env=instagram_env(http_server))
    assert first.returncode == 0, first.stdout + first.stderr
    http_server.requests.clear()

    result = run_etl("run", "--source", "instagram", env=instagram_env(http_server))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    paths = [path for path, _ in api_calls(http_server)]
    assert "ig_hashtag_search" not in paths  # the id came from instagram_hashtags
    assert paths[0] == f"{USER_ID}/media" and paths.count(f"{USER_ID}/media") == 1  # page 1 reached the watermark
    assert f"{COFFEE_ID}/recent_media" in paths
    assert not any(path.startswith("/cdn/") for _, path, _ in http_server.requests)  # nothing downloaded again
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'instagram'")[0][0] == 7
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE platform = 'instagram'")[0][0] == 9
    assert stored_objects(tmp_path) == EXPECTED_OBJECTS


def test_instagram_expired_token_is_a_clear_message_without_the_token(run_etl, db, http_server):
    FakeInstagram(http_server)
    wrong = "expired-token-5c1f"

    result = run_etl("run", env=instagram_env(http_server, INSTAGRAM_ACCESS_TOKEN=wrong))
    assert_refused_cleanly(result, db.dsn, wrong, "renew INSTAGRAM_ACCESS_TOKEN", "190")
