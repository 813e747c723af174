"""The twitter source over its recorded X API v2 fixtures, offline: for the shared source contract test."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from etl.config import load_settings
from etl.records import Post
from etl.sources.base import FetchWindow
from etl.sources.twitter import TwitterSource
from tests.support import HTTPServerFixture, Reply

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "twitter"
TOKEN = "contract-test-token"
USER_ID = "1423118004657770496"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def json_reply(name: str, status: int = 200) -> Reply:
    return Reply(status=status, body=(FIXTURES / name).read_bytes(), content_type="application/json; charset=utf-8")


def paged(first: str, second: str, token_param: str) -> Callable[[BaseHTTPRequestHandler], Reply]:
    """A route answering `first`, or `second` when the request carries the pagination token."""

    def route(handler: BaseHTTPRequestHandler) -> Reply:
        query = parse_qs(urlsplit(handler.path).query)
        return json_reply(second if token_param in query else first)

    return route


def serve_fixtures(server: HTTPServerFixture) -> None:
    """Route the recorded pages: two search pages, a username lookup and a two-page timeline."""
    server.routes["/2/tweets/search/recent"] = paged("search_page1.json", "search_page2.json", "next_token")
    server.routes["/2/users/by/username/harbourlights"] = json_reply("user_by_username.json")
    server.routes[f"/2/users/{USER_ID}/tweets"] = paged(
        "user_tweets_page1.json", "user_tweets_page2.json", "pagination_token"
    )


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the twitter source yields from its fixtures (search and one timeline), served on loopback."""
    server = HTTPServerFixture()
    try:
        serve_fixtures(server)
        settings = load_settings(
            {
                "ETL_DATA_DIR": str(tmp_path / "data"),
                "TWITTER_BEARER_TOKEN": TOKEN,
                "TWITTER_QUERY": "#sunset has:images -is:retweet",
                "TWITTER_USERNAMES": "harbourlights",
                "TWITTER_API_BASE": server.base,
                "ETL_ALLOW_PRIVATE_HOSTS": "true",
            },
            dotenv_path=None,
        )
        TwitterSource.check_settings(settings)
        with TwitterSource(settings) as source:
            return list(source.fetch(FetchWindow()))
    finally:
        server.close()


class FakeCompliance:
    """X's batch compliance jobs (tweets) on the fake: POST /2/compliance/jobs, the signed upload URL (PUT),
    GET /2/compliance/jobs/:id answering `statuses` in turn (the last one repeated), and the download URL
    serving compliance_results.jsonl. The fixtures' storage.googleapis.com URLs are pointed at the server."""

    JOB_ID = "1421185651106480129"

    def __init__(self, server: HTTPServerFixture, statuses: tuple[str, ...] = ("complete",), token: str = TOKEN):
        self.server, self.statuses, self.token = server, list(statuses), token
        self.uploads: list[bytes] = []
        self.created = 0
        self.polls = 0
        self.job_headers: list[dict[str, str]] = []
        prefix = "/twttr-tweet-compliance/" + self.JOB_ID
        server.routes["/2/compliance/jobs"] = self.create
        server.routes[f"/2/compliance/jobs/{self.JOB_ID}"] = self.job
        server.routes[f"{prefix}/submission/{self.JOB_ID}_upload"] = self.upload
        server.routes[f"{prefix}/delivery/{self.JOB_ID}_download"] = self.download

    def text(self, name: str) -> str:
        return (FIXTURES / name).read_text(encoding="utf-8").replace("https://storage.googleapis.com", self.server.base)

    def authorized(self, handler) -> bool:
        return handler.headers.get("Authorization") == f"Bearer {self.token}"

    def create(self, handler) -> Reply:
        if not self.authorized(handler):
            return json_reply("error_401.json", 401)
        assert json.loads(handler.body) == {"type": "tweets", "name": "social-archiver re-check"}
        self.created += 1
        return Reply(body=self.text("compliance_job_created.json").encode(), content_type="application/json")

    def upload(self, handler) -> Reply:
        self.job_headers.append(dict(handler.headers))
        self.uploads.append(handler.body)
        return Reply(body=b"", content_type=None)

    def job(self, handler) -> Reply:
        if not self.authorized(handler):
            return json_reply("error_401.json", 401)
        status = self.statuses[min(self.polls, len(self.statuses) - 1)]
        self.polls += 1
        return Reply(body=self.text(f"compliance_job_{status}.json").encode(), content_type="application/json")

    def download(self, handler) -> Reply:
        self.job_headers.append(dict(handler.headers))
        return Reply(body=(FIXTURES / "compliance_results.jsonl").read_bytes(), content_type="application/octet-stream")
