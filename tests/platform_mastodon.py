"""A fake Mastodon instance served from tests/fixtures/mastodon (Link-header paging, since_id), for the tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from etl.records import Post
from etl.sources.mastodon import MastodonSource
from tests.support import FixtureAPI, HTTPServerFixture, Reply, fetch_over_fake

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mastodon"
TAG = "/api/v1/timelines/tag/sunset"
LOOKUP = "/api/v1/accounts/lookup"
STATUSES = "/api/v1/accounts/109302/statuses"
TAG_URIS = [
    "https://mastodon.example/users/ana/statuses/113920000000000003",
    "https://photo.social/users/tom/statuses/113919000000000002",
    "https://photo.social/users/tom/statuses/113910000000000001",  # reached through ana's reblog
]
ACCOUNT_URIS = ["https://mastodon.example/users/ana/statuses/113920500000000004", TAG_URIS[0]]


class FakeMastodon(FixtureAPI):
    """The tag timeline in two pages plus an empty third (each linked by `Link: rel="next"`, as Mastodon
    does, without since_id), an account lookup and its statuses; since_id honoured on the first request."""

    def __init__(self, server: HTTPServerFixture, *, token: str | None = None, link_headers: bool = True):
        super().__init__(server, FIXTURES, ("https://mastodon.example/system",))
        self.token, self.link_headers = token, link_headers
        for path in (TAG, LOOKUP, STATUSES):
            server.routes[path] = self.route

    def headers(self, next_max_id: str | None, path: str) -> dict[str, str]:
        reset = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        headers = {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "299", "X-RateLimit-Reset": reset}
        if next_max_id and self.link_headers:
            headers["Link"] = (
                f'<{self.server.base}{path}?max_id={next_max_id}>; rel="next", '
                f'<{self.server.base}{path}?min_id=113920000000000003>; rel="prev"'
            )
        return headers

    def route(self, handler) -> Reply:
        parts = urlsplit(handler.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        override = self.overridden(parts.path)
        if override is not None:
            return override
        if self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self.error("error_public_timeline.json", 401)
        if parts.path == LOOKUP:
            return self.reply(self.json("lookup.json")) if params.get("acct") in ("ana", "ana@mastodon.example") else self.error("error_404.json", 404)
        if parts.path == STATUSES:
            statuses = self.json("account_statuses.json")
            if "max_id" in params:
                statuses = [s for s in statuses if int(s["id"]) < int(params["max_id"])]
        else:
            max_id = params.get("max_id")
            if max_id is None or int(max_id) > 113920000000000003:
                statuses = self.json("tag_page1.json")
            elif int(max_id) > 113911000000000009:
                statuses = self.json("tag_page2.json")
            else:
                statuses = []
        if "since_id" in params:
            statuses = [s for s in statuses if int(s["id"]) > int(params["since_id"])]
        last = statuses[-1]["id"] if statuses else None
        return self.reply(statuses, headers=self.headers(last, parts.path))


def mastodon_env(server: HTTPServerFixture, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "ETL_DATA_DIR": str(tmp_path / "data"),
        "MASTODON_INSTANCE": server.base,
        "MASTODON_HASHTAGS": "sunset",
        "MASTODON_ACCOUNTS": "@ana@mastodon.example",
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_RETRY_MAX_WAIT": "0.05",
        **extra,
    }


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the mastodon source yields from its fixtures (a hashtag and an account), on loopback."""
    return fetch_over_fake(MastodonSource, FakeMastodon, mastodon_env, tmp_path)
