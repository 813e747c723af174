"""Sentiment: labels from polarity and the threshold; empty captions neutral; noise ignored."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from etl.enrich import SentimentEnricher
from etl.records import Post, Sentiment


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


CAPTIONS = [
    "I love this amazing sunset",
    "terrible awful day, hate it",
    "first day at the new office",
    "meh",
    "Not good. Not good at all!!!",
    "never happy, never sad",
    "It was terribly, horribly, incredibly boring",  # "-ly" adverbs made from adjectives (textblob.en)
    "a very very nice and really wonderful trip :-)",
    "so-so :( but the coffee was OK",
    "WOW!!! Best. Concert. Ever.",
    "The hotel was not bad, the food was not great either.",
    "Éclairs à Paris, c'est magnifique",
    "Happily ever after?",
    "simply the worst, literally unbelievable",
]


def test_scores_are_those_of_textblobs_own_analyzer():
    """The analyzer is loaded without importing textblob (etl.enrich.english_sentiment): its scores must be
    exactly TextBlob's, on hand-picked captions and on the mock source's."""
    from textblob import TextBlob

    from etl.config import load_settings
    from etl.sources.mock import MockSource

    mock = MockSource(load_settings({"MOCK_POSTS": "200"}, dotenv_path=None))
    try:
        captions = CAPTIONS + [p.caption for p in mock.posts() if p.caption]
    finally:
        mock.close()
    enricher = SentimentEnricher(0.05)
    for caption in captions:
        ours = enricher.score(caption)
        theirs = TextBlob(enricher.cleaned(caption)).sentiment
        assert (ours.polarity, ours.subjectivity) == (round(theirs.polarity, 6), round(theirs.subjectivity, 6)), caption
    assert len({enricher.score(c).label for c in captions}) == 3


def test_scoring_does_not_import_textblob_or_nltk():
    """`import textblob` imports nltk (0.15 s of every run's start-up); the archiver only needs the lexicon."""
    import subprocess
    import sys

    code = (
        "import sys; from etl.enrich import SentimentEnricher; s = SentimentEnricher().score('a lovely day');"
        "assert s.label == 'positive', s; print(sorted(m for m in sys.modules if m.split('.')[0] in ('nltk', 'textblob')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_enrich_reuses_a_stored_score_only_for_the_same_caption():
    enricher = SentimentEnricher(0.05)
    post = Post("mock", "1", datetime(2024, 1, 1, tzinfo=timezone.utc), caption="What a great day")
    stored = Sentiment(-0.5, 0.5, "negative")  # not what scoring gives: shows which way it went
    assert enricher.enrich(post, ("What a great day", stored)).sentiment == stored
    assert enricher.enrich(post, ("What a dull day", stored)).sentiment.label == "positive"
    assert enricher.enrich(post, None).sentiment.label == "positive"
    nul = Post("mock", "2", datetime(2024, 1, 1, tzinfo=timezone.utc), caption="great\x00 day")
    assert enricher.enrich(nul, ("great day", stored)).sentiment == stored  # compared as stored (no NUL)
    assert enricher.enrich(nul).sentiment == enricher.score("great day")  # and scored as stored


def test_fast_scorer_gives_textblobs_scores_on_awkward_captions():
    """etl/fastscore.py tokenizes word by word and caches lookups; on captions built to trip it (negations,
    modifiers, '!', emoticons split by spaces, sarcasm marks, quotes, contractions, paragraph breaks, the
    tokenizer's own end-of-sentence marker) its unrounded scores must be exactly TextBlob's analyzer's."""
    import random

    from etl.enrich import english_sentiment, fast_sentiment

    pieces = (
        "not", "never", "no", "n't", "very", "really", "extremely", "good", "bad", "great", "terribly", "happy",
        "sad", "!", "!!", "(!)", "( ! )", ":)", ": )", ":-(", ":'(", "<3", "XD", "X D", "8-D", "\"quoted\"",
        "'s", "isn't", "don't", "I'm", "Mr.", "U.S.", "etc.", "...", "well.", "\n\n", "\n", "END-OF-SENTENCE",
        "a", "is", "the", "love", "hate", "amazing", "worst", "(", ")", "?", ",", "-", "wow", "so", "quite",
    )  # fmt: skip
    rng = random.Random(16)
    captions = [" ".join(rng.choices(pieces, k=rng.randint(1, 14))) for _ in range(3000)]
    captions += ["".join(rng.choices(pieces, k=rng.randint(1, 6))) for _ in range(1000)]  # no spaces between
    analyzer, fast = english_sentiment(), fast_sentiment()
    for caption in captions:
        assert fast(caption) == tuple(analyzer(caption)[:2]), repr(caption)


def test_captions_without_emoticon_characters_take_the_shortcut_with_textblobs_scores():
    """A caption with none of the characters an emoticon, a sarcasm mark or the end-of-sentence marker needs is
    scored from each chunk's cached word facts (numbers by their length): still exactly TextBlob's scores."""
    import random

    from etl.enrich import english_sentiment, fast_sentiment

    pieces = (
        "not", "never", "no", "n't", "very", "really", "extremely", "good", "bad", "great", "terribly", "happy",
        "sad", "!", "!!", "isn't", "don't", "Mr.", "U.S.", "etc.", "...", "well.", "a", "the", "love", "Love",
        "HATE", "amazing", "worst", "?", ",", "-", "wow", "so", "quite", "7", "42", "2024", "1234567", "8", "x",
        "d", "good!", "bad,", "'quoted'", "it's", "ok", "totally", "hardly", "1st", "x8", "3",
    )  # fmt: skip
    rng = random.Random(17)
    captions = [" ".join(rng.choices(pieces, k=rng.randint(1, 20))) for _ in range(3000)]
    captions += ["".join(rng.choices(pieces, k=rng.randint(1, 4))) for _ in range(500)]
    analyzer, fast = english_sentiment(), fast_sentiment()
    assert fast.anchors is not None and fast._numbers is not None
    shortcut = 0
    for caption in captions:
        if not fast.anchors.search(caption):
            assert fast._facts(caption) is not None, repr(caption)
            shortcut += 1
        assert fast(caption) == tuple(analyzer(caption)[:2]), repr(caption)
    assert shortcut > 3000  # the pieces hold no anchor but an 8 that can come before "-"
    assert fast._facts("so good :)") is None and fast._facts("END-OF-SENTENCE") is None


def test_an_enricher_is_freed_when_dropped_not_at_the_next_full_garbage_collection():
    """Each holds its own language model (about 75 MB): a reference cycle kept one per in-process run alive."""
    import gc
    import weakref

    enricher = SentimentEnricher()
    assert enricher.score("a lovely sunny day").label == "positive"
    gone = weakref.ref(enricher)
    gc.disable()
    try:
        del enricher
        assert gone() is None
    finally:
        gc.enable()
