"""The mock source: deterministic for a seed, realistic captions, 0-4 real images from its own loopback server."""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import urlsplit

import pytest

from etl.enrich import SentimentEnricher
from etl.errors import MediaError
from etl.http import RetryPolicy
from etl.media import Downloader, URLGuard
from etl.records import extract_hashtags
from etl.run.runner import Runner, RunRequest
from etl.sources import source_class
from etl.sources.base import FetchWindow
from etl.sources.mock import MockSource
from etl.store import LocalStore

EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")


def feed(make_settings, **env: str) -> list:
    source = MockSource(make_settings(**env))
    with source:
        return list(source.fetch(FetchWindow()))


def comparable(posts) -> list[tuple]:
    """Everything but the image server's port, which changes from run to run."""
    return [
        (p.post_id, p.created_at, p.author_username, p.caption, p.like_count, p.comment_count, p.hashtags,
         tuple(urlsplit(u).path for u in p.image_urls), p.raw)
        for p in posts
    ]  # fmt: skip


def test_registered_under_its_name():
    assert source_class("mock") is MockSource


def test_deterministic_for_a_seed(make_settings):
    first = feed(make_settings, MOCK_SEED="7", MOCK_POSTS="30")
    second = feed(make_settings, MOCK_SEED="7", MOCK_POSTS="30")
    other = feed(make_settings, MOCK_SEED="8", MOCK_POSTS="30")
    assert len(first) == 30
    assert comparable(first) == comparable(second)
    assert [p.caption for p in first] != [p.caption for p in other]


def test_posts_are_newest_first_with_unique_ids(make_settings):
    posts = feed(make_settings, MOCK_POSTS="60")
    assert [p.created_at for p in posts] == sorted((p.created_at for p in posts), reverse=True)
    assert len({p.post_id for p in posts}) == 60
    assert all(p.created_at.utcoffset().total_seconds() == 0 for p in posts)
    assert all(p.platform == "mock" and p.like_count >= 0 and p.comment_count >= 0 for p in posts)


def test_zero_to_four_images_each_and_every_count_occurs(make_settings):
    posts = feed(make_settings, MOCK_POSTS="200")
    counts = Counter(len(p.image_urls) for p in posts)
    assert set(counts) == {0, 1, 2, 3, 4}


def test_captions_have_hashtags_mentions_emoji_and_mixed_sentiment(make_settings):
    posts = feed(make_settings, MOCK_POSTS="100")
    assert sum("#" in p.caption for p in posts) > 30
    assert sum("@" in p.caption for p in posts) > 10
    assert sum(bool(EMOJI.search(p.caption)) for p in posts) > 50
    assert all(p.hashtags == extract_hashtags(p.caption) for p in posts)
    labels = Counter(SentimentEnricher().score(p.caption).label for p in posts)
    assert set(labels) == {"positive", "neutral", "negative"}


def test_window_and_limit(make_settings):
    posts = feed(make_settings, MOCK_POSTS="40")
    since = posts[9].created_at
    source = MockSource(make_settings(MOCK_POSTS="40"))
    with source:
        windowed = list(source.fetch(FetchWindow(since=since)))
    assert [p.post_id for p in windowed] == [p.post_id for p in posts[:10]]


def test_its_images_are_real_and_its_server_trusted_without_private_hosts(make_settings, http_server):
    settings = make_settings(MOCK_POSTS="20")
    assert settings.allow_private_hosts is False
    source = MockSource(settings)
    with source:
        posts = [p for p in source.fetch(FetchWindow()) if p.image_urls]
        downloader = Downloader(settings, guard=URLGuard(trusted=source.trusted_hosts), policy=RetryPolicy(attempts=1))
        for url in posts[0].image_urls:
            fetched = downloader.fetch(url)
            assert fetched.content_type == ("image/png" if url.endswith(".png") else "image/jpeg")
            assert fetched.width > 0 and fetched.height > 0
        # Trust is for the mock's own server only: another loopback server is still refused.
        with pytest.raises(MediaError, match="non-public address 127.0.0.1"):
            downloader.fetch(http_server.url("/x.png"))
    assert http_server.hits == {}


def test_unknown_image_paths_are_404(make_settings):
    settings = make_settings()
    source = MockSource(settings)
    with source:
        base = source._base_url()
        downloader = Downloader(settings, guard=URLGuard(trusted=source.trusted_hosts), policy=RetryPolicy(attempts=1))
        with pytest.raises(MediaError, match="HTTP 404") as info:
            downloader.fetch(f"{base}/img/x/0.gif")
    assert info.value.permanent


def test_a_mock_run_stores_every_image_without_allowing_private_hosts(make_settings, db):
    settings = make_settings(MOCK_POSTS="12", MOCK_SEED="3")
    assert settings.allow_private_hosts is False
    expected = sum(len(p.image_urls) for p in feed(make_settings, MOCK_POSTS="12", MOCK_SEED="3"))
    stats = Runner(settings, db=db, store=LocalStore(settings.objects_dir)).execute(RunRequest(sources=["mock"]))
    assert (stats.fetched, stats.inserted, stats.images_failed) == (12, 12, 0), stats.errors
    assert stats.images_stored == expected > 0
    assert len([p for p in settings.objects_dir.rglob("*") if p.is_file()]) == expected
