"""YouTube test helpers: fixture loading, a loopback Data API answering a sequence of replies, and the source over
its fixtures for the contract test."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from etl.config import load_settings
from etl.http import RetryPolicy
from etl.records import Post
from etl.sources.base import FetchWindow
from etl.sources.youtube import YouTubeSource
from tests.support import HTTPServerFixture, Reply

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "youtube"
CHANNEL_ID = "UCq3Ux7LmPdsKJn4cVpZw2oA"
UPLOADS_ID = "UUq3Ux7LmPdsKJn4cVpZw2oA"
API_KEY = "AIzaSyTest-not-a-real-key-0123456789"
DROP = ({"status": "drop"}, "")  # a reply that closes the connection without an answer

# The uploads path over the fixtures: channels.list, two playlistItems.list pages, one videos.list.
UPLOADS_SEQUENCE = ("channels.json", "playlist_items_page1.json", "playlist_items_page2.json", "videos_uploads.json")


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def reply(name_or_body: str | dict[str, Any], status: int = 200, **headers: str) -> tuple[dict[str, str], str]:
    """One (headers, body) pair for SequenceAPI: a fixture file name or a JSON-able body."""
    body = load(name_or_body) if isinstance(name_or_body, str) else name_or_body
    return {"status": str(status), "content-type": "application/json; charset=UTF-8", **headers}, json.dumps(body)


class SequenceAPI(HTTPServerFixture):
    """The Data API on loopback, answering each request with the next reply whatever its path (as the Google
    client's HttpMockSequence did); `request_sequence` keeps (url, method, body, headers) of every request."""

    def __init__(self, replies: list[tuple[dict[str, str], str]]):
        super().__init__()
        self.replies = list(replies)
        self.request_sequence: list[tuple[str, str, None, dict[str, str]]] = []

    def _serve(self, handler: BaseHTTPRequestHandler, head: bool = False) -> None:
        with self._lock:
            self.request_sequence.append((self.base + handler.path, handler.command, None, dict(handler.headers)))
            headers, body = self.replies.pop(0) if self.replies else ({"status": "410"}, "no reply left")
        if headers["status"] == "drop":
            handler.close_connection = True
            return
        extra = {k: v for k, v in headers.items() if k not in ("status", "content-type")}
        answer = Reply(int(headers["status"]), body.encode(), extra, headers.get("content-type"))
        self.routes[handler.path.split("?")[0]] = answer
        super()._serve(handler, head)


OPEN: list[SequenceAPI] = []  # closed by close_all (an autouse fixture of the youtube tests)


def mock_http(*replies: tuple[dict[str, str], str] | str) -> SequenceAPI:
    server = SequenceAPI([reply(r) if isinstance(r, str) else r for r in replies])
    OPEN.append(server)
    return server


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()


def no_sleep_policy(attempts: int = 3, sleeps: list[float] | None = None) -> RetryPolicy:
    """The package's retry policy with the waits recorded instead of slept."""
    record = sleeps if sleeps is not None else []
    return RetryPolicy(attempts=attempts, max_wait=5.0, base=0.01, sleep=record.append)


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the youtube source fetches over its fixtures (uploads of one channel), on loopback."""
    server = mock_http(*UPLOADS_SEQUENCE)
    try:
        settings = load_settings(
            {"ETL_DATA_DIR": str(tmp_path / "data"), "YOUTUBE_API_KEY": API_KEY, "YOUTUBE_CHANNEL_IDS": CHANNEL_ID,
             "YOUTUBE_API_BASE": server.base},
            dotenv_path=None,
        )  # fmt: skip
        YouTubeSource.check_settings(settings)
        source = YouTubeSource(settings)
        source.policy = no_sleep_policy()
        with source:
            return list(source.fetch(FetchWindow()))
    finally:
        close_all()
