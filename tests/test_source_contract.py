"""One contract for every registered source: what it yields over its fixtures is a well-formed normalized post."""

from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from etl.config import load_settings
from etl.records import PLATFORM_RE, Post
from etl.sources import REGISTRY, FetchWindow, source_class
from tests import (
    platform_bluesky,
    platform_instagram,
    platform_mastodon,
    platform_reddit,
    platform_twitter,
    platform_youtube,
)


def mock_posts(tmp_path: Path) -> list[Post]:
    source = source_class("mock")(load_settings({"MOCK_POSTS": "25"}, dotenv_path=None))
    with source:
        return list(source.fetch(FetchWindow()))


def jsonl_posts(tmp_path: Path) -> list[Post]:
    path = tmp_path / "in.jsonl"
    lines = [
        {"platform": "jsonl", "post_id": 1, "created_at": "2026-01-02T03:04:05+02:00", "image_url": "https://e.com/a.jpg"},
        {"platform": "jsonl", "post_id": "b/2", "created_at": "2026-01-02 03:04:05", "caption": "#Tag me"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    source = source_class("jsonl")(load_settings({}, dotenv_path=None), input=str(path))
    return list(source.fetch(FetchWindow()))


FETCHERS = {
    "mock": mock_posts,
    "jsonl": jsonl_posts,
    "youtube": platform_youtube.contract_posts,
    "twitter": platform_twitter.contract_posts,
    "instagram": platform_instagram.contract_posts,
    "bluesky": platform_bluesky.contract_posts,
    "mastodon": platform_mastodon.contract_posts,
    "reddit": platform_reddit.contract_posts,
}


def test_every_registered_source_is_under_contract():
    # The package's own sources (a test may register one of its own from tests/, as ETL_SOURCE_PATHS would).
    assert {name for name, cls in REGISTRY.items() if cls.__module__.startswith("etl.sources.")} == set(FETCHERS)


@pytest.mark.parametrize("name", sorted(FETCHERS))
def test_source_yields_well_formed_posts(name, tmp_path):
    posts = FETCHERS[name](tmp_path)
    assert posts, f"{name} yielded nothing over its fixtures"
    seen = set()
    for post in posts:
        assert isinstance(post, Post)
        assert PLATFORM_RE.match(post.platform)
        assert isinstance(post.post_id, str) and post.post_id.strip() == post.post_id and post.post_id
        assert (post.platform, post.post_id) not in seen, f"duplicate {post.post_id}"
        seen.add((post.platform, post.post_id))
        assert post.created_at.tzinfo is not None and post.created_at.utcoffset() == timezone.utc.utcoffset(None)
        for url in post.image_urls:
            parts = urlsplit(url)
            assert parts.scheme in ("http", "https") and parts.netloc, url
        assert len(post.image_urls) == len(set(post.image_urls))
        for count in (post.like_count, post.comment_count):
            assert count is None or (isinstance(count, int) and count >= 0)
        assert all(isinstance(t, str) and t and not t.startswith("#") for t in post.hashtags)
        for text in (post.caption, post.author_username, post.permalink):
            assert text is None or (isinstance(text, str) and "\x00" not in text)
        json.dumps(post.raw)  # provenance must be storable as JSONB
    if name != "jsonl":
        assert all(p.platform == name for p in posts)
