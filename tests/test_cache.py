"""Copies kept between runs (etl/cache.py): TextBlob's lexicon parsed once and read back exactly; stale copies removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from etl import cache
from etl.enrich import english_sentiment, textblob_text
from etl.fastscore import FastSentiment

CAPTIONS = [
    "What a wonderful, happy day at the beach!",
    "This is terrible and I hate it",
    "It was terribly, horribly, incredibly boring",  # "-ly" adverbs made from adjectives after the lexicon is read
    "not bad at all :) really not bad",
    "dammit, the worst service ever (!)",
    "meh",
]


def _fresh_analyzer():
    """A new TextBlob analyzer as english_sentiment() builds it (that one is cached for the process), loaded."""
    analyzer = english_sentiment.__wrapped__()
    assert len(analyzer)  # the lexicon loads on first use
    return analyzer


def _contents(analyzer):
    """Everything the lexicon holds, in order and with each value's type (a list from the XML, a tuple annotated)."""
    words = [(w, [(pos, type(v), v) for pos, v in senses.items()]) for w, senses in dict.items(analyzer)]
    return words, dict(analyzer.labeler), dict(analyzer._synsets), analyzer._language


def _lexicon_copies(root):
    return sorted(p for p in (root / "social-archiver").iterdir() if p.name.startswith("textblob-lexicon-"))


def test_the_parsed_lexicon_is_kept_and_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = textblob_text()
    parsed = _fresh_analyzer()  # no copy yet: parsed from TextBlob's XML, then kept
    [copy] = _lexicon_copies(tmp_path)
    assert {p.name for p in copy.iterdir()} == {"lexicon.json", "lexicon.sha256", "source.txt"}
    assert os.fsdecode((copy / "source.txt").read_bytes()).split("\n") == [str(Path(parsed.path).resolve())]

    def no_xml(self, path=None):
        raise AssertionError("the XML lexicon was parsed again")

    monkeypatch.setattr(text.Sentiment, "load", no_xml)
    kept = _fresh_analyzer()  # from the copy alone
    assert _contents(kept) == _contents(parsed)
    assert dict.__len__(kept) > 2800  # the whole lexicon, with the "-ly" adverbs
    theirs, ours = FastSentiment(parsed, text), FastSentiment(kept, text)
    assert [ours(c) for c in CAPTIONS] == [theirs(c) for c in CAPTIONS]
    assert [kept(c) for c in CAPTIONS] == [parsed(c) for c in CAPTIONS]  # TextBlob's own analyzer over each


@pytest.mark.fault("the kept copy of the parsed lexicon is damaged: it is parsed from TextBlob's XML again, kept anew")
def test_a_damaged_lexicon_copy_is_parsed_again_and_replaced(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = _fresh_analyzer()
    [copy] = _lexicon_copies(tmp_path)
    body = (copy / "lexicon.json").read_bytes()
    at = body.index(b"0.8")
    (copy / "lexicon.json").write_bytes(body[:at] + b"0.9" + body[at + 3 :])  # same length: a flipped digit

    calls = []
    load = textblob_text().Sentiment.load
    monkeypatch.setattr(textblob_text().Sentiment, "load", lambda self, path=None: calls.append(1) or load(self, path))
    again = _fresh_analyzer()
    assert calls == [1]  # the copy was refused: the XML was parsed
    assert _contents(again) == _contents(parsed)
    assert "damaged" in caplog.text
    [remade] = _lexicon_copies(tmp_path)
    assert (remade / "lexicon.json").read_bytes() == body  # kept anew, whole
    assert _contents(_fresh_analyzer()) == _contents(parsed)
    assert calls == [1]  # the copy made anew is read: no XML parsed


@pytest.mark.fault("a file of the kept lexicon copy is lost: it is parsed from TextBlob's XML again, the copy made anew")
@pytest.mark.parametrize("lost", ["lexicon.json", "lexicon.sha256"])
def test_a_lexicon_copy_missing_a_file_is_made_anew(tmp_path, monkeypatch, lost):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = _fresh_analyzer()
    [copy] = _lexicon_copies(tmp_path)
    (copy / lost).unlink()  # an rmtree killed half-way
    calls = []
    load = textblob_text().Sentiment.load
    monkeypatch.setattr(textblob_text().Sentiment, "load", lambda self, path=None: calls.append(1) or load(self, path))
    assert _contents(_fresh_analyzer()) == _contents(parsed) and calls == [1]
    [remade] = _lexicon_copies(tmp_path)
    assert {p.name for p in remade.iterdir()} == {"lexicon.json", "lexicon.sha256", "source.txt"}
    assert _contents(_fresh_analyzer()) == _contents(parsed) and calls == [1]  # read from the copy made anew


@pytest.mark.fault("the cache folder cannot be written: the lexicon is parsed from the XML at every start, scores unchanged")
def test_an_unwritable_cache_still_scores(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    analyzer = _fresh_analyzer()
    assert analyzer("What a wonderful, happy day")[0] > 0
    assert blocked.read_text() == "not a folder"
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]  # nothing is damaged: no warning


def _source(path, body=b"model"):
    path.write_bytes(body)
    return path


def _fill(folder):
    (folder / "data.bin").write_bytes(b"unpacked")


def test_copies_of_installs_that_are_gone_are_removed_when_a_copy_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "social-archiver"
    live = _source(tmp_path / "live.bin")
    gone = _source(tmp_path / "gone.bin")
    changed = _source(tmp_path / "changed.bin")
    kept_live = cache.make_copy("fam", "1.0", live, _fill)
    kept_gone = cache.make_copy("fam", "1.0", gone, _fill)
    kept_changed = cache.make_copy("fam", "0.9", changed, _fill)
    assert kept_live and kept_gone and kept_changed and (kept_live / "data.bin").read_bytes() == b"unpacked"
    gone.unlink()  # a virtualenv made again
    _source(changed, b"model, upgraded")  # another size
    (root / "fam-1.0-5-123").mkdir()  # made before copies recorded their file
    (root / "other-1.0-5-123").mkdir()  # another family's: not this prune's business
    (root / "famous-1.0-5-123").mkdir()  # nor this one's, whose name only starts like it
    old_building, new_building = root / ".building-old", root / ".building-new"
    old_building.mkdir()
    new_building.mkdir()
    an_hour_ago = time.time() - 3700
    os.utime(old_building, (an_hour_ago, an_hour_ago))

    newer = cache.make_copy("fam", "1.1", _source(tmp_path / "newer.bin", b"model 1.1"), _fill)

    left = {p.name for p in root.iterdir()}
    assert left == {kept_live.name, newer.name, "other-1.0-5-123", "famous-1.0-5-123", ".building-new"}


def test_a_copy_serving_another_install_is_kept_while_that_one_is_there(tmp_path, monkeypatch):
    """Two installs whose file has the same size and time (uv hard-links them from its cache) share one copy: it is
    kept while either is there, whichever made it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = _source(tmp_path / "venv-a.bin")
    second = tmp_path / "venv-b.bin"
    os.link(first, second)
    copy = cache.make_copy("fam", "1.0", first, _fill)
    assert copy == cache.copy_folder("fam", "1.0", second)  # one copy for both
    cache.used(copy, second)  # the second install reads it
    cache.used(copy, second)  # (recorded once)
    assert os.fsdecode((copy / cache.SOURCE).read_bytes()).split("\n") == [str(first.resolve()), str(second.resolve())]
    first.unlink()  # the install that made it is gone; the other is still there
    cache.make_copy("fam", "1.1", _source(tmp_path / "newer.bin", b"model 1.1"), _fill)
    assert copy.is_dir() and (copy / "data.bin").read_bytes() == b"unpacked"
    second.unlink()
    cache.make_copy("fam", "1.2", _source(tmp_path / "newest.bin", b"model 1.2"), _fill)
    assert not copy.exists()


def test_a_copy_is_named_after_its_file_and_made_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = _source(tmp_path / "model.bin")
    folder = cache.copy_folder("fam", "2.0", source)
    st = source.stat()
    assert folder.name == f"fam-2.0-{st.st_size}-{st.st_mtime_ns}"

    def broken(building):
        assert building.name.startswith(".building-") and not folder.exists()  # made aside, renamed once whole
        (building / "half.bin").write_bytes(b"half")
        raise OSError("disk full")

    assert cache.make_copy("fam", "2.0", source, broken) is None
    assert not folder.exists() and [p.name for p in folder.parent.iterdir()] == []  # nothing half-made is left
    assert cache.make_copy("fam", "2.0", source, _fill) == folder
    assert cache.make_copy("fam", "2.0", source, _fill) is None  # already there (another process was first)
    assert (folder / "data.bin").read_bytes() == b"unpacked"
