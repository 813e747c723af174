"""Sentiment: labels from polarity and the threshold; empty captions neutral; noise ignored."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from etl.enrich import SentimentEnricher
from etl.records import Post


@pytest.mark.parametrize(
    ("polarity", "threshold", "label"),
    [
        (0.05, 0.05, "positive"),
        (0.0499, 0.05, "neutral"),
        (-0.05, 0.05, "negative"),
        (-0.0499, 0.05, "neutral"),
        (0.0, 0.05, "neutral"),
        (1.0, 0.05, "positive"),
        (-1.0, 0.05, "negative"),
        (0.3, 0.5, "neutral"),
        (0.0, 0.0, "neutral"),  # a zero threshold still leaves zero neutral
        (0.001, 0.0, "positive"),
        (-0.001, 0.0, "negative"),
    ],
)
def test_label_from_polarity_and_threshold(polarity, threshold, label):
    assert SentimentEnricher(threshold).label(polarity) == label


@pytest.mark.parametrize("caption", [None, "", "   \n\t", "@someone", "https://example.com/x #"])
def test_empty_or_noise_only_captions_are_neutral(caption):
    s = SentimentEnricher().score(caption)
    assert (s.label, s.polarity, s.subjectivity) == ("neutral", 0.0, 0.0)


def test_clear_captions_get_clear_labels():
    e = SentimentEnricher()
    assert e.score("Absolutely love this wonderful view").label == "positive"
    assert e.score("Terrible service, really awful and disappointing").label == "negative"
    assert e.score("Morning commute, bus 42 again").label == "neutral"


def test_hashtag_words_count_and_mentions_do_not():
    e = SentimentEnricher()
    assert e.score("#love").label == "positive"
    assert e.score("@awful_bad_terrible").label == "neutral"


def test_threshold_changes_the_label_and_the_version():
    caption = "It was fine, a nice enough day"
    polarity = SentimentEnricher().score(caption).polarity
    assert 0.05 < polarity < 0.9
    assert SentimentEnricher(0.05).score(caption).label == "positive"
    assert SentimentEnricher(0.95).score(caption).label == "neutral"
    assert SentimentEnricher(0.05).version != SentimentEnricher(0.95).version
    assert SentimentEnricher(0.05).version.startswith("textblob-")


def test_enrich_returns_a_scored_copy():
    post = Post("mock", "1", datetime(2024, 1, 1, tzinfo=timezone.utc), caption="What a great day")
    scored = SentimentEnricher().enrich(post)
    assert post.sentiment is None
    assert scored.sentiment is not None and scored.sentiment.label == "positive"
    assert scored.post_id == post.post_id and scored.caption == post.caption


def test_scores_are_those_of_textblobs_own_analyzer():
    from textblob import TextBlob

    enricher = SentimentEnricher(0.05)
    for caption in ["I love this amazing sunset", "terrible awful day, hate it", "first day at the new office", "meh"]:
        ours = enricher.score(caption)
        theirs = TextBlob(caption).sentiment
        assert (ours.polarity, ours.subjectivity) == (round(theirs.polarity, 6), round(theirs.subjectivity, 6))
