"""A fake Reddit (token endpoint and OAuth API) served from tests/fixtures/reddit, for the tests."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from etl.records import Post
from etl.sources.reddit import RedditSource
from tests.support import FixtureAPI, HTTPServerFixture, Reply, fetch_over_fake

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reddit"
CLIENT_ID = "p-jcoLKBynTLew"
SECRET = "gko_LXELoV07ZBNUXrvWZfzE3aI"
AGENT = "linux:org.example.archiver:1.0 (by /u/archiver_test)"
TOKEN_PATH = "/api/v1/access_token"
NEW = "/r/analog/new"
IDS = ["1j8g4k2", "1j8f0aa", "1j8dzz9", "1j8c111"]


class FakeReddit(FixtureAPI):
    """The token endpoint (Basic auth, client_credentials) and r/analog/new in two pages; raw_json required."""

    def __init__(self, server: HTTPServerFixture):
        super().__init__(server, FIXTURES, ("https://preview.redd.it", "https://i.redd.it", "https://external-preview.redd.it"))
        self.tokens_issued = 0
        for path in (TOKEN_PATH, NEW):
            server.routes[path] = self.route
        serve_info(server)  # the re-check of held posts: none deleted unless a test serves its own

    def route(self, handler) -> Reply:
        parts = urlsplit(handler.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        override = self.overridden(parts.path)
        if override is not None:
            return override
        if parts.path == TOKEN_PATH:
            basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
            form = parse_qs(handler.body.decode())
            if handler.headers.get("Authorization") != f"Basic {basic}" or form.get("grant_type") != ["client_credentials"]:
                return self.error("error_401.json", 401)
            self.tokens_issued += 1
            return self.reply(self.json("token.json"))
        token = self.json("token.json")["access_token"]
        if handler.headers.get("Authorization") != f"Bearer {token}":
            return self.error("error_401.json", 401)
        if handler.headers.get("User-Agent") != AGENT or params.get("raw_json") != "1":
            return self.error("error_403.json", 403)
        page = self.json("new_page2.json" if params.get("after") == "t3_1j8dzz9" else "new_page1.json")
        headers = {"X-Ratelimit-Used": "1", "X-Ratelimit-Remaining": "99.0", "X-Ratelimit-Reset": str(600 - int(time.time()) % 600)}
        return self.reply(page, headers=headers)


def reddit_env(server: HTTPServerFixture, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "ETL_DATA_DIR": str(tmp_path / "data"),
        "REDDIT_CLIENT_ID": CLIENT_ID,
        "REDDIT_CLIENT_SECRET": SECRET,
        "REDDIT_USER_AGENT": AGENT,
        "REDDIT_SUBREDDITS": "analog",
        "REDDIT_API_BASE": server.base,
        "REDDIT_AUTH_BASE": server.base,
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        **extra,
    }


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the reddit source yields from its fixtures (one subreddit, two pages), on loopback."""
    return fetch_over_fake(RedditSource, FakeReddit, reddit_env, tmp_path)


INFO = "/api/info"


def serve_info(server: HTTPServerFixture, deleted: set[str] = frozenset(), removed: dict[str, str] | None = None) -> list[list[str]]:
    """/api/info on the fake: a t3 thing for each asked fullname; ids in `deleted` have author "[deleted]", those in
    `removed` their removed_by_category. Returns the list the ids of each call are appended to."""
    removed = removed or {}
    calls: list[list[str]] = []
    token = json.loads((FIXTURES / "token.json").read_text())["access_token"]

    def route(handler) -> Reply:
        if handler.headers.get("Authorization") != f"Bearer {token}":
            return Reply(status=401, body=(FIXTURES / "error_401.json").read_bytes(), content_type="application/json")
        names = parse_qs(urlsplit(handler.path).query).get("id", [""])[0].split(",")
        ids = [n.removeprefix("t3_") for n in names if n]
        calls.append(ids)
        children = [
            {"kind": "t3", "data": {"id": i, "name": f"t3_{i}", "author": "[deleted]" if i in deleted else "ana",
                                    "removed_by_category": removed.get(i), "title": "a photo", "created_utc": 1709294400}}
            for i in ids
        ]  # fmt: skip
        body = {"kind": "Listing", "data": {"after": None, "before": None, "dist": len(children), "children": children}}
        return Reply(body=json.dumps(body).encode(), content_type="application/json")

    server.routes[INFO] = route
    return calls
