"""Instagram test support: a fake Graph API router over the JSON fixtures, and the posts the shared contract test checks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import responses

from etl.config import load_settings
from etl.records import Post
from etl.sources.base import FetchWindow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "instagram"
API_BASE = "https://graph.facebook.com/v21.0"
TOKEN = "test-token-SECRET"
USER_ID = "17841405309211844"
COFFEE_ID = "17843857450040591"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


@dataclass
class GraphReply:
    """One canned Graph API answer: a JSON body (or a fixture name), a status and headers."""

    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def json_body(self) -> Any:
        return fixture(self.body) if isinstance(self.body, str) else self.body


Route = GraphReply | str | dict | list | BaseException | Callable[[Mapping[str, str]], GraphReply]


class FakeGraph:
    """A fake Graph API: replies per path (in order, the last one repeating), every request recorded.

    A route is a GraphReply, a fixture name, a JSON body, a list of those (one per hit), an exception (the
    request fails with it), or a callable taking the query parameters. Paths are relative to the API base ("17841405309211844/media", "ig_hashtag_search").
    """

    def __init__(self, base: str = API_BASE):
        self.base = base.rstrip("/")
        self.prefix = urlsplit(self.base).path.rstrip("/")
        self.routes: dict[str, Route] = {}
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.max_hits = 100  # a paginator that loops fails the test instead of hanging it
        self.rewrite: Callable[[str], str] | None = None  # applied to every JSON body (point CDN URLs elsewhere)

    def route(self, path: str, reply: Route) -> FakeGraph:
        self.routes[path.strip("/")] = reply
        return self

    def calls_to(self, path: str) -> list[dict[str, str]]:
        return [params for called, params in self.calls if called == path.strip("/")]

    def answer(self, url_path: str, query: str) -> tuple[int, dict[str, str], bytes]:
        path = url_path[len(self.prefix) :] if url_path.startswith(self.prefix) else url_path
        path = path.strip("/")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        hits = len(self.calls_to(path))
        if hits >= self.max_hits:
            raise AssertionError(f"{hits} requests to /{path}: runaway pagination")
        self.calls.append((path, params))
        route = self.routes.get(path)
        if route is None:
            reply = GraphReply(
                {"error": {"message": f"Unknown path components: /{path}", "type": "OAuthException", "code": 2500,
                           "fbtrace_id": "AfakeTraceId000"}},
                status=400,
            )  # fmt: skip
        elif isinstance(route, BaseException):
            raise route  # `responses` hands it to the caller as the request's failure
        elif callable(route):
            reply = route(params)
        elif isinstance(route, list):
            reply = route[min(hits, len(route) - 1)]
        else:
            reply = route
        if not isinstance(reply, GraphReply):
            reply = GraphReply(reply)
        headers = {"Content-Type": "application/json; charset=UTF-8", **reply.headers}
        text = json.dumps(reply.json_body(), ensure_ascii=False)
        return reply.status, headers, (self.rewrite(text) if self.rewrite else text).encode()

    def install(self, rsps: responses.RequestsMock) -> FakeGraph:
        """Serve this fake through `responses` for every URL under the base."""

        def callback(request: Any) -> tuple[int, dict[str, str], bytes]:
            parts = urlsplit(request.url)
            return self.answer(parts.path, parts.query)

        rsps.add_callback(responses.GET, re.compile(re.escape(self.base) + r"/.*"), callback=callback)
        return self


def standard_routes(graph: FakeGraph) -> FakeGraph:
    """Own media in two pages, #coffee found and its recent media in two pages (the same `after` on both)."""
    graph.route(f"{USER_ID}/media", lambda q: GraphReply("own_media_page2" if q.get("after") else "own_media_page1"))
    graph.route(
        "ig_hashtag_search",
        lambda q: GraphReply("hashtag_search_coffee" if q.get("q") == "coffee" else "hashtag_search_empty"),
    )
    graph.route(
        f"{COFFEE_ID}/recent_media",
        lambda q: GraphReply("hashtag_recent_page2" if q.get("after") else "hashtag_recent_page1"),
    )
    return graph


def contract_posts(tmp_path: Path) -> list[Post]:
    """What the instagram source fetches from the fixtures, offline and without a database."""
    from etl.sources.instagram import InstagramSource

    settings = load_settings(
        {
            "ETL_DATA_DIR": str(tmp_path / "data"),
            "INSTAGRAM_ACCESS_TOKEN": TOKEN,
            "INSTAGRAM_USER_ID": USER_ID,
            "INSTAGRAM_HASHTAGS": "coffee",
        },
        dotenv_path=None,
    )
    InstagramSource.check_settings(settings)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        standard_routes(FakeGraph()).install(rsps)
        with InstagramSource(settings, state=None) as source:
            return list(source.fetch(FetchWindow()))
