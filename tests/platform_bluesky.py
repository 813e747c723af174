"""A fake Bluesky (AppView reads, PDS sessions and search) served from tests/fixtures/bluesky, for the tests."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from etl.records import Post
from etl.sources.api import parse_time
from etl.sources.bluesky import BlueskySource
from tests.support import FixtureAPI, HTTPServerFixture, Reply, fetch_over_fake

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bluesky"
ACTOR = "harbourlights.bsky.social"
HANDLE = "archiver.bsky.social"
PASSWORD = "abcd-efgh-ijkl-mnop"
FEED = "/xrpc/app.bsky.feed.getAuthorFeed"
SEARCH = "/xrpc/app.bsky.feed.searchPosts"
CREATE = "/xrpc/com.atproto.server.createSession"
REFRESH = "/xrpc/com.atproto.server.refreshSession"
FEED_URIS = [
    "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3lk2harbour01",
    "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3lk1lena0001",
    "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3lk1harbourvid",
    "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3lk0harbourfut",
]
SEARCH_URIS = [
    "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3lk2lena0002",
    FEED_URIS[0],
    "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3lk0lena0003",
]


class FakeBluesky(FixtureAPI):
    """getAuthorFeed (two pages), searchPosts (two pages, session required, `since` honoured), and sessions.

    The access token of `create_session.json` expires after `access_uses` searches; the refresh token then
    gives the one of `refresh_session.json`. Overrides (a 429, a 5xx, a malformed page) go in `overrides`."""

    def __init__(self, server: HTTPServerFixture, *, access_uses: int | None = None):
        super().__init__(server, FIXTURES, ("https://cdn.bsky.app", "https://video.bsky.app"))
        self.access_uses = access_uses
        self.valid_access: set[str] = set()
        self.valid_refresh: set[str] = set()
        self.logins = self.refreshes = 0
        for path in (FEED, SEARCH, CREATE, REFRESH):
            server.routes[path] = self.route
        serve_get_posts(server, set())  # the re-check of held posts: none deleted unless a test serves its own

    def headers(self) -> dict[str, str]:
        return {"ratelimit-limit": "3000", "ratelimit-remaining": "2999", "ratelimit-reset": str(int(time.time()) + 300),
                "ratelimit-policy": "3000;w=300"}  # fmt: skip

    def route(self, handler) -> Reply:
        parts = urlsplit(handler.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        override = self.overridden(parts.path)
        if override is not None:
            return override
        bearer = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
        if parts.path == CREATE:
            body = json.loads(handler.body or b"{}")
            if body.get("identifier") != HANDLE or body.get("password") != PASSWORD:
                return self.error("error_auth.json", 401)
            self.logins += 1
            return self.grant("create_session.json")
        if parts.path == REFRESH:
            if bearer not in self.valid_refresh:
                return self.error("error_expired.json", 400)
            self.refreshes += 1
            self.valid_refresh.discard(bearer)
            return self.grant("refresh_session.json")
        if parts.path == FEED:
            if params.get("actor") != ACTOR:
                return self.error("error_actor.json", 400)
            name = "author_feed_page2.json" if params.get("cursor") else "author_feed_page1.json"
            return self.reply(self.json(name), headers=self.headers())
        # searchPosts
        if bearer not in self.valid_access:
            return self.error("error_expired.json", 400) if bearer else self.error("error_auth.json", 401)
        if self.access_uses is not None:
            self.access_uses -= 1
            if self.access_uses <= 0:
                self.valid_access.discard(bearer)
        page = self.json("search_page2.json" if params.get("cursor") else "search_page1.json")
        if params.get("since"):  # on sortAt, as the lexicon says: the earlier of createdAt and indexedAt
            page["posts"] = [p for p in page["posts"] if sort_at(p) >= parse_time(params["since"])]
            if not page["posts"]:
                page.pop("cursor", None)
        return self.reply(page, headers=self.headers())

    def grant(self, name: str) -> Reply:
        body = self.json(name)
        self.valid_access.add(body["accessJwt"])
        self.valid_refresh.add(body["refreshJwt"])
        return self.reply(body)


def sort_at(post: dict) -> datetime:
    """The AppView's sortAt of a postView: the earlier of its record's createdAt and its indexedAt."""
    indexed = parse_time(post["indexedAt"])
    created = parse_time((post.get("record") or {}).get("createdAt")) or indexed
    return min(created, indexed)


def bluesky_env(server: HTTPServerFixture, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "ETL_DATA_DIR": str(tmp_path / "data"),
        "BLUESKY_ACTORS": ACTOR,
        "BLUESKY_QUERY": "#sunset",
        "BLUESKY_HANDLE": HANDLE,
        "BLUESKY_APP_PASSWORD": PASSWORD,
        "BLUESKY_API_BASE": server.base,
        "BLUESKY_PDS_BASE": server.base,
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        **extra,
    }


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the bluesky source yields from its fixtures (one author feed and a search), on loopback."""
    return fetch_over_fake(BlueskySource, FakeBluesky, bluesky_env, tmp_path)


GET_POSTS = "/xrpc/app.bsky.feed.getPosts"


def serve_get_posts(server: HTTPServerFixture, gone: set[str]) -> list[list[str]]:
    """app.bsky.feed.getPosts on the fake: a postView for each asked URI not in `gone` (a deleted post is left
    out of the answer, as the AppView does). Returns the list the URIs of each call are appended to."""
    calls: list[list[str]] = []

    def route(handler) -> Reply:
        uris = parse_qs(urlsplit(handler.path).query).get("uris", [])
        calls.append(uris)
        if len(uris) > 25:
            return Reply(status=400, body=b'{"error":"InvalidRequest","message":"uris must not have more than 25 elements"}',
                         content_type="application/json")  # fmt: skip
        posts = [
            {"uri": uri, "cid": "bafyreib2rxk3rh6kzwq", "author": {"did": uri[5:].split("/")[0], "handle": ACTOR},
             "record": {"$type": "app.bsky.feed.post", "text": "still here", "createdAt": "2025-02-01T10:00:00.000Z"},
             "likeCount": 1, "replyCount": 0, "indexedAt": "2025-02-01T10:00:01.000Z"}
            for uri in uris if uri not in gone
        ]  # fmt: skip
        return Reply(body=json.dumps({"posts": posts}).encode(), content_type="application/json")

    server.routes[GET_POSTS] = route
    return calls
