"""Caption sentiment with TextBlob's pattern analyzer (bundled lexicon: no corpus download)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from types import ModuleType
from typing import Any

from etl.cache import make_copy, read_copy
from etl.language import LanguageDetector, english_or_unknown, preload_model
from etl.records import Post, Sentiment, clean_text, with_fields
from etl.versions import version  # not importlib.metadata: start-up (etl/versions.py)

log = logging.getLogger(__name__)

# URLs and @mentions carry no sentiment and confuse the lexicon; '#' is dropped so #love counts as love.
_NOISE = re.compile(r"https?://\S+|www\.\S+|@\w+")


def _load_textblob_module(name: str) -> ModuleType:
    """A module of the installed textblob package, loaded from its file without running textblob/__init__.py."""
    spec = importlib.util.find_spec("textblob")  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("textblob is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"etl._textblob{name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def textblob_text() -> ModuleType:
    """textblob/_text.py, loaded once (its tokenizer, emoticons and Sentiment class)."""
    return _load_textblob_module("_text")


@lru_cache(maxsize=1)
def english_sentiment() -> Callable[[str], Any]:
    """TextBlob's English pattern analyzer (textblob.en.sentiment), built without importing `textblob`.

    `import textblob` imports nltk for parts of TextBlob we do not use: 0.15 s, half of the archiver's
    start-up, paid by every run (a rerun with nothing new too). The analyzer lives in textblob/_text.py,
    which needs only the standard library; it is loaded from the installed package and set up as
    textblob/en/__init__.py sets it up: the English lexicon, WordNet synsets, and the adjectives also
    entered as "-ly" adverbs. tests/test_enrich.py checks its scores against TextBlob's own.
    """
    text = textblob_text()

    class English(text.Sentiment):
        def load(self, path: str | None = None) -> None:
            if path or not _lexicon_from_copy(self):
                text.Sentiment.load(self, path)
                if not path:
                    _keep_lexicon(self)
            if not path:  # as textblob.en.Sentiment: "terrible" also gives the adverb "terribly"
                for word, tags in list(dict.items(self)):
                    if "JJ" in tags:
                        if word.endswith("y"):
                            word = word[:-1] + "i"
                        if word.endswith("le"):
                            word = word[:-2]
                        polarity, subjectivity, intensity = tags["JJ"]
                        self.annotate(word + "ly", "RB", polarity, subjectivity, intensity)

    lexicon = Path(text.__file__).with_name("en") / "en-sentiment.xml"
    return English(path=str(lexicon), synset="wordnet_id", language="en")


_LEXICON = "lexicon.json"
_LEXICON_SHA256 = "lexicon.sha256"


def _lexicon_copy(analyzer: Any) -> tuple[str, str, Path]:
    """What names the analyzer's lexicon copy (etl/cache.py): its family, TextBlob's version, the XML file."""
    return "textblob-lexicon", version("textblob"), Path(analyzer.path)


def _lexicon_from_copy(analyzer: Any) -> bool:
    """Fill `analyzer` (TextBlob's Sentiment, not loaded) from the copy _keep_lexicon() made of its parsed XML
    lexicon: 10 ms where parsing the XML and averaging its senses take 30, at the start of every process that
    scores. False when there is no such copy, or it cannot be read; a damaged one (its checksum, kept beside it,
    differs) or one missing a file is removed (etl/cache.py read_copy), so that the lexicon parsed again is kept
    anew."""
    kept = read_copy(*_lexicon_copy(analyzer), _read_lexicon, damaged=(ValueError, KeyError, TypeError, AttributeError))
    if kept is None:
        return False
    analyzer._language, words, labels, synsets = kept
    dict.update(analyzer, words)
    dict.update(analyzer.labeler, labels)
    dict.update(analyzer._synsets, synsets)
    return True


def _read_lexicon(folder: Path) -> tuple[Any, dict, dict, dict]:
    """The language, words, labels and synsets kept in `folder`, checked against the checksum kept beside them."""
    body = (folder / _LEXICON).read_bytes()
    if hashlib.sha256(body).hexdigest().encode("ascii") != (folder / _LEXICON_SHA256).read_bytes().strip():
        raise ValueError("its checksum differs")
    kept = json.loads(body)
    words = {word: {pos: scores for pos, scores in senses} for word, senses in kept["words"].items()}
    return kept["language"], words, kept["labels"], kept["synsets"]


def _keep_lexicon(analyzer: Any) -> None:
    """Keep what TextBlob's Sentiment.load() parsed from its XML lexicon (its words, labels and synsets, before
    anything is annotated) for _lexicon_from_copy(): JSON keeps each float exactly (repr) and each list a list."""
    if not dict.__len__(analyzer):
        return  # nothing was parsed (no lexicon file): nothing to keep
    try:
        words = {word: [[pos, scores] for pos, scores in senses.items()] for word, senses in dict.items(analyzer)}
        kept = {"language": analyzer._language, "words": words, "labels": analyzer.labeler, "synsets": analyzer._synsets}
        body = json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:  # what JSON cannot hold (not TextBlob's XML as we know it): not kept
        log.debug("the parsed lexicon is not kept: %s", exc)
        return

    def fill(folder: Path) -> None:
        (folder / _LEXICON).write_bytes(body)
        (folder / _LEXICON_SHA256).write_text(hashlib.sha256(body).hexdigest(), encoding="ascii")

    make_copy(*_lexicon_copy(analyzer), fill)


@lru_cache(maxsize=1)
def fast_sentiment() -> Callable[[str], tuple[float, float]]:
    """english_sentiment()'s scores with less work per caption (etl/fastscore.py)."""
    from etl.fastscore import FastSentiment

    return FastSentiment(english_sentiment(), textblob_text())


def preload() -> None:
    """Loads the lexicon and the language model before the enricher that uses them is made (etl/prefork.py)."""
    fast_sentiment()
    preload_model()


class SentimentEnricher:
    """Scores captions: polarity >= threshold is positive, <= -threshold negative, else neutral."""

    def __init__(self, threshold: float = 0.05, *, detect_language: bool = True):
        self.threshold = threshold
        self.detector = LanguageDetector() if detect_language else None
        # Recorded on every row it decided (scored or not), so a later model, language rule or threshold
        # change can find what to re-score.
        detector = self.detector.version() if self.detector else "none"
        self.version = f"textblob-{version('textblob')}:pattern:en-only:{detector}:t={threshold:g}"
        self._decider = self.version.rsplit(":t=", 1)[0]  # what decides the score and the language
        # The cache holds the threshold, not self: a cache of a bound method is a reference cycle, which kept
        # every enricher (and its 75 MB language model) until a full garbage collection; a process that ran
        # one Runner after another (the test suite: 1 GB) grew by one model a run.
        self._score = lru_cache(maxsize=4096)(partial(_score_text, threshold))
        # Decisions made ahead by worker processes (etl/ahead.py), by (caption as stored, platform language).
        self.ahead: dict[tuple[str | None, str | None], tuple] = {}
        self.ahead_used = 0
        # Decisions of the batch being enriched that workers are making: called once, when they are needed, it
        # puts them in self.ahead (or nothing, when the workers failed: they are then made here).
        self.later: Callable[[], object] | None = None
        self._new_share = 0.0  # of the last batch: captions decided, not reused from the stored row (none yet)

    def label(self, polarity: float) -> str:
        return _label(polarity, self.threshold)

    def warm(self) -> None:
        """Loads the lexicon and the language model now (a scoring worker as it starts; its parent before it forks
        warm workers, which then share them)."""
        self.score("warm")
        if self.detector is not None:
            self.detector.warm()

    def warmed(self) -> bool:
        """Whether the lexicon and the language model are loaded in this process."""
        return fast_sentiment.cache_info().currsize > 0 and (self.detector is None or self.detector.loaded())

    def relabels(self, stored_version: str | None) -> bool:
        """Whether a row decided by enricher `stored_version` keeps its score and language under this one: the same
        scorer and language detector, only the threshold told apart (its label is then its polarity's)."""
        return stored_version is not None and stored_version.rsplit(":t=", 1)[0] == self._decider

    @staticmethod
    def cleaned(text: str) -> str:
        """The caption as scored: URLs and @mentions removed, '#' dropped."""
        return _cleaned(text)

    def score(self, text: str | None) -> Sentiment:
        if not text or text.isspace():  # (what strip() would empty, without copying the caption)
            return Sentiment(0.0, 0.0, "neutral")
        return self._score(text)

    def decide_caption(
        self, caption: str | None, platform_language: str | None = None
    ) -> tuple[Sentiment | None, str | None, str | None, str | None]:
        """(score, language, language source, why not scored) of a caption as stored. The language is the
        platform's when it gave one, else detected, else unknown; TextBlob's lexicon is English, so a caption
        known to be in another language gets no label (not "neutral"). Unknown languages are scored."""
        return self.decide_captions([(caption, platform_language)])[0]

    def decide_captions(
        self, items: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[Sentiment | None, str | None, str | None, str | None]]:
        """decide_caption() of each (caption, platform language); the captions without a platform language
        have their language detected together (etl/language.py: one batch, the same answers)."""
        if self.later is not None:
            later, self.later = self.later, None
            later()
        if self.ahead:
            done = [self.ahead.get(item) for item in items]
            missing = [item for item, decision in zip(items, done, strict=True) if decision is None]
            self.ahead_used += len(items) - len(missing)
            if missing:
                rest = iter(self._decide_captions(missing))
                done = [decision if decision is not None else next(rest) for decision in done]
            return done  # type: ignore[return-value]  # every slot filled
        return self._decide_captions(items)

    def _decide_captions(
        self, items: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[Sentiment | None, str | None, str | None, str | None]]:
        unknown = [n for n, (_, given) in enumerate(items) if not given]
        detected: list[str | None] = [None] * len(items)
        if self.detector is not None and unknown:
            for n, language in zip(unknown, self.detector.detect_many([items[n][0] for n in unknown]), strict=True):
                detected[n] = language
        decisions = []
        for (caption, given), guess in zip(items, detected, strict=True):
            if given:
                language, source = given, "platform"
            else:
                language, source = (guess, "detected") if guess else (None, None)
            if not english_or_unknown(language):
                decisions.append((None, language, source, f"language {language.split('-', 1)[0]}"))
            else:
                decisions.append((self.score(caption), language, source, None))
        return decisions

    @staticmethod
    def item(post: Post) -> tuple[str | None, str | None]:
        """What decides a post's caption: (the caption as stored, the platform's language or None)."""
        return clean_text(post.caption), _platform_language(post)

    def mostly_new(self) -> bool:
        """Whether most captions of the last batch had to be decided (no stored decision to reuse)."""
        return self._new_share >= 0.5

    def enrich(self, post: Post, stored: tuple[Any, ...] | None = None) -> Post:
        """The post with its caption's language and score. The caption is scored as it is stored (clean_text), so
        a run and a reenrich of the stored row agree; `stored` is (caption, score[, language, language_source,
        sentiment_skipped]) of the post's row when this enricher version decided it, reused when the caption is
        the same (and the platform does not now give another language)."""
        return self.enrich_all([post], [stored])[0]

    def enrich_all(self, posts: Sequence[Post], stored: Sequence[tuple[Any, ...] | None]) -> list[Post]:
        """enrich() of each post with its stored decision (or None); the new captions are decided together."""
        out: list[Post | None] = []
        todo: list[tuple[int, Post, str | None]] = []
        for post, kept in zip(posts, stored, strict=True):
            caption = clean_text(post.caption)
            reused = _reused(post, caption, kept) if kept is not None else None
            if reused is None:
                todo.append((len(out), post, caption))
            out.append(reused)
        if posts:
            self._new_share = len(todo) / len(posts)
        if todo:
            items = [(caption, _platform_language(p)) for _, p, caption in todo]
            for (n, post, _), decision in zip(todo, self.decide_captions(items), strict=True):
                sentiment, language, source, skipped = decision
                out[n] = with_fields(
                    post, sentiment=sentiment, language=language, language_source=source, sentiment_skipped=skipped
                )
        return out  # type: ignore[return-value]  # every slot filled above


def _platform_language(post: Post) -> str | None:
    """The language the platform gave the post (kept as it is), or None (detected from the caption)."""
    return post.language if post.language_source == "platform" else None


def _reused(post: Post, caption: str | None, stored: tuple[Any, ...]) -> Post | None:
    """The post with its stored decision, when it still holds (the same caption, no new platform language). A
    language the platform now gives is new even when it equals the one detected: the decision is made again, so
    the row says the platform's word (language_source 'platform') as a first sight of the post would, and a later
    reenrich after a detector change keeps it rather than detecting it again."""
    if not caption or stored[0] != caption:
        return None
    language, source, skipped = (tuple(stored[2:5]) + (None, None, None))[:3]
    if post.language_source == "platform" and (post.language, source) != (language, "platform"):
        return None
    if len(stored) < 3:  # a score alone: the caller did not keep the language
        return with_fields(post, sentiment=stored[1])
    return with_fields(post, sentiment=stored[1], language=language, language_source=source, sentiment_skipped=skipped)


def _cleaned(text: str) -> str:
    return _NOISE.sub(" ", text).replace("#", " ").strip()


def _label(polarity: float, threshold: float) -> str:
    if polarity >= threshold and polarity > 0:
        return "positive"
    if polarity <= -threshold and polarity < 0:
        return "negative"
    return "neutral"


def _score_text(threshold: float, text: str) -> Sentiment:
    cleaned = _cleaned(text)
    if not cleaned:
        return Sentiment(0.0, 0.0, "neutral")
    # TextBlob(text).sentiment is PatternAnalyzer, which calls this same lexicon function but first builds
    # a namedtuple class on every call (a fifth of a metadata-only run); calling it directly gives
    # identical scores at about 3.5 times the speed.
    # FastSentiment: the same lexicon and rules, each distinct word looked up once (etl/fastscore.py).
    raw_polarity, raw_subjectivity = fast_sentiment()(cleaned)
    # Labelled from the stored (rounded) polarity, so a row never disagrees with its own label.
    polarity, subjectivity = round(float(raw_polarity), 6), round(float(raw_subjectivity), 6)
    return Sentiment(polarity, subjectivity, _label(polarity, threshold))
