"""YouTube test helpers: fixture loading, HttpMockSequence replies, and the source over its fixtures for the contract test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from googleapiclient.http import HttpMockSequence

from etl.config import load_settings
from etl.http import RetryPolicy
from etl.records import Post
from etl.sources.base import FetchWindow
from etl.sources.youtube import YouTubeSource

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "youtube"
CHANNEL_ID = "UCq3Ux7LmPdsKJn4cVpZw2oA"
UPLOADS_ID = "UUq3Ux7LmPdsKJn4cVpZw2oA"
API_KEY = "AIzaSyTest-not-a-real-key-0123456789"

# The uploads path over the fixtures: channels.list, two playlistItems.list pages, one videos.list.
UPLOADS_SEQUENCE = ("channels.json", "playlist_items_page1.json", "playlist_items_page2.json", "videos_uploads.json")


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def reply(name_or_body: str | dict[str, Any], status: int = 200, **headers: str) -> tuple[dict[str, str], str]:
    """One (headers, body) pair for HttpMockSequence: a fixture file name or a JSON-able body."""
    body = load(name_or_body) if isinstance(name_or_body, str) else name_or_body
    return {"status": str(status), "content-type": "application/json; charset=UTF-8", **headers}, json.dumps(body)


def mock_http(*replies: tuple[dict[str, str], str] | str) -> HttpMockSequence:
    return HttpMockSequence([reply(r) if isinstance(r, str) else r for r in replies])


def no_sleep_policy(attempts: int = 3, sleeps: list[float] | None = None) -> RetryPolicy:
    """The package's retry policy with the waits recorded instead of slept."""
    record = sleeps if sleeps is not None else []
    return RetryPolicy(attempts=attempts, max_wait=5.0, base=0.01, sleep=record.append)


def contract_posts(tmp_path: Path) -> list[Post]:
    """Everything the youtube source fetches over its fixtures (uploads of one channel), offline."""
    settings = load_settings(
        {"ETL_DATA_DIR": str(tmp_path / "data"), "YOUTUBE_API_KEY": API_KEY, "YOUTUBE_CHANNEL_IDS": CHANNEL_ID},
        dotenv_path=None,
    )
    YouTubeSource.check_settings(settings)
    source = YouTubeSource(settings, http=mock_http(*UPLOADS_SEQUENCE))
    source.policy = no_sleep_policy()
    with source:
        return list(source.fetch(FetchWindow()))
