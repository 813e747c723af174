"""Language detection in batches (etl/language.py) gives exactly py3langid's own per-caption answers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import etl.language as language
from etl.enrich import SentimentEnricher
from etl.language import LanguageDetector

FIXTURES = Path(__file__).parent / "fixtures"

# Captions in many languages and scripts, mixed ones, shouting, emoji, links and tags around the words.
PHRASES = [
    "What a beautiful morning by the river, coffee in hand and friends around",
    "Quelle belle journée au bord de la mer avec toute la famille",
    "Un día precioso en la playa con mis amigos, la comida estaba increíble",
    "Ein wunderschöner Tag in den Bergen, das Wetter war einfach perfekt",
    "Una giornata bellissima al lago con la mia famiglia e gli amici",
    "Um dia lindo na praia com a minha família, o mar estava calmo",
    "Een prachtige dag aan het strand met de hele familie en vrienden",
    "Сегодня был прекрасный день в парке с друзьями и семьёй",
    "今日は友達と一緒に公園で素晴らしい一日を過ごしました",
    "오늘은 친구들과 함께 공원에서 멋진 하루를 보냈습니다",
    "今天和朋友们在公园里度过了美好的一天，天气非常好",
    "Bugün arkadaşlarımla parkta harika bir gün geçirdim",
    "Dzisiaj spędziłem wspaniały dzień w parku z przyjaciółmi",
    "اليوم قضيت يوما رائعا في الحديقة مع أصدقائي",
    "Σήμερα πέρασα μια υπέροχη μέρα στο πάρκο με φίλους",
    "आज मैंने अपने दोस्तों के साथ पार्क में एक शानदार दिन बिताया",
    "Idag hade jag en fantastisk dag i parken med mina vänner",
    "THIS IS THE BEST CONCERT OF THE WHOLE YEAR, UNBELIEVABLE",
    "sunset",
    "ok ok ok",
    "lol 😂😂😂 best day ever!!!",
    "new drop 🔥 link in bio",
    "release notes v2.3.1 — bug fixes and performance improvements",
    "the café was très bien and the tapas muy buenas",
]


def _fixture_texts() -> list[str]:
    """Every string of 20 characters or more in the platforms' JSON fixtures (captions, titles, bios...)."""
    texts: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            if len(value) >= 20:
                texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted(FIXTURES.rglob("*.json")):
        walk(json.loads(path.read_text(encoding="utf-8")))
    return texts


def corpus() -> list[str | None]:
    rng = random.Random(16)
    texts: list[str | None] = [None, "", "   ", "@someone #tag https://example.com/x", *PHRASES, *_fixture_texts()]
    words = " ".join(PHRASES).split()
    # Mixtures of languages, of every length: some land near the 0.9 confidence the detector needs.
    texts += [" ".join(rng.choices(words, k=rng.randint(2, 30))) for _ in range(1500)]
    texts += [f"{rng.choice(PHRASES)} @user{n} #tag{n % 7} {n}" for n in range(300)]
    texts += [" ".join(rng.choices(words, k=900))]  # long: walked alone (more bytes than a batch takes)
    texts += texts[40:60]  # repeats: answered from the cache
    return texts


@pytest.fixture(scope="module")
def reference() -> tuple[LanguageDetector, list[str | None], list[str | None]]:
    detector = LanguageDetector()
    texts = corpus()
    return detector, texts, [detector.detect_one(t) for t in texts]


def test_batches_give_py3langids_own_answers(reference):
    detector, texts, expected = reference
    assert LanguageDetector().detect_many(texts) == expected
    assert [detector.detect(t) for t in texts[:200]] == expected[:200]  # one at a time too
    low = LanguageDetector(min_confidence=0.2)  # where two languages can come close to a tie
    assert low.detect_many(texts) == [low.detect_one(t) for t in texts]
    found = {x for x in expected if x}
    assert {"en", "fr", "es", "de", "ru", "ja"} <= found and None in expected  # the corpus is varied


def test_the_reference_is_py3langid_as_shipped(reference):
    """detect_one() runs py3langid's classify() on the lean-loaded model: the same as py3langid's own loader."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    detector, texts, expected = reference
    stock = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    for text, answer in list(zip(texts, expected, strict=True))[:400]:
        cleaned = detector._worth_detecting(text)
        if cleaned is None:
            assert answer is None
            continue
        code, probability = stock.classify(cleaned)
        assert answer == (code if probability >= detector.min_confidence else None), text


def test_close_calls_are_decided_by_py3langid_itself(reference, monkeypatch):
    """With no tolerance, the batch's own float32 sums decide everything (and still agree on this corpus); with
    a tolerance wider than any probability, everything goes back to classify(): the same answers both ways."""
    _, texts, expected = reference
    calls = []
    model = LanguageDetector()._model()
    real = model.classify
    monkeypatch.setattr(model, "classify", lambda text: calls.append(text) or real(text))

    def detect(tolerance: float) -> list[str | None]:
        monkeypatch.setattr(language, "BATCH_TOLERANCE", tolerance)
        detector = LanguageDetector()
        detector._model_ = model
        calls.clear()
        return detector.detect_many(texts)

    assert detect(0.0) == expected
    assert len(calls) <= 2  # the long text alone (and nothing else) went to classify()
    assert detect(2.0) == expected
    assert len(calls) > 1000


def test_the_float32_feature_rows_stay_bounded(reference, monkeypatch):
    """The rows converted for the batches are refilled from the start when full: the same answers, flat memory."""
    _, texts, expected = reference
    monkeypatch.setattr(language, "_BATCH_CELLS", 2048)
    monkeypatch.setattr(language, "_BATCH_BYTES", 256)  # a batch of _BATCH_MIN captions fits too
    model = LanguageDetector()._model()
    assert model.rows.shape == (2048, len(model.identifier.nb_pc))
    used = []
    real = model._rows_of
    monkeypatch.setattr(model, "_rows_of", lambda feats: (real(feats), used.append(model.rows_used))[0])
    detector = LanguageDetector()
    detector._model_ = model
    assert detector.detect_many(texts) == expected
    assert max(used) <= 2048 and any(b < a for a, b in zip(used, used[1:], strict=False))  # refilled at least once


def test_distinct_features_are_np_uniques_answer():
    """_distinct (which spares a forked worker numpy.ma's import) gives np.unique's array, dtype and order."""
    import numpy as np

    rng = np.random.default_rng(16)
    for shape in ((0,), (1,), (2,), (7,), (3, 9), (400, 130)):
        for dtype in (np.int32, np.int64):
            values = rng.integers(-1, 60, size=shape).astype(dtype)
            got, want = language._distinct(np, values), np.unique(values)
            assert got.dtype == want.dtype and got.tolist() == want.tolist()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize(("given", "threads"), [(None, 1), ("2", 2)])
def test_the_model_loads_blas_with_one_thread_unless_asked(given, threads):
    """Loading the model starts no OpenBLAS thread (they spin on the cores the workers score on), unless the
    environment asks for some; the setting is not left behind for the processes this one starts."""
    import os
    import subprocess
    import sys

    code = (
        "import os, etl.language as l; l.LanguageDetector().warm(); "
        "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}
    if given:
        env["OPENBLAS_NUM_THREADS"] = given
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)  # fmt: skip
    assert out.stdout.split() == [str(min(threads, os.cpu_count() or 1)), str(given)]  # OpenBLAS: at most a core each


def test_threads_sharing_a_model_get_its_answers(reference, monkeypatch):
    """Detectors in several threads over one model: a refill of its rows by one never moves those another reads."""
    import threading

    _, texts, expected = reference
    monkeypatch.setattr(language, "_BATCH_CELLS", 2048)
    monkeypatch.setattr(language, "_BATCH_BYTES", 256)
    model = LanguageDetector()._model()
    results: dict[int, list[str | None]] = {}

    def detect(n: int) -> None:
        detector = LanguageDetector()
        detector._model_ = model
        order = list(range(len(texts)))
        random.Random(n).shuffle(order)  # other captions side by side: other rows, other refills
        got = detector.detect_many([texts[k] for k in order])
        results[n] = [answer for _, answer in sorted(zip(order, got, strict=True))]

    threads = [threading.Thread(target=detect, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[n] == expected for n in range(4)] == [True] * 4


def test_a_platforms_language_is_not_detected_again(monkeypatch):
    enricher = SentimentEnricher()
    asked = []
    monkeypatch.setattr(enricher.detector, "detect_many", lambda texts: asked.extend(texts) or [None] * len(texts))
    decisions = enricher.decide_captions([("Une belle journée au bord de la mer", "fr"), ("a lovely sunny day", None)])
    assert asked == ["a lovely sunny day"]
    assert decisions[0][1:] == ("fr", "platform", "language fr") and decisions[0][0] is None
    assert decisions[1][0].label == "positive"


def test_the_platforms_language_replaces_the_same_language_detected(db, run_etl, tmp_path):
    # The stored decision was reused because the languages were equal, though its source was not: the row kept
    # language_source 'detected', and a reenrich after a detector change would detect the platform's word again.
    from tests.conftest import query
    from tests.support import record, write_jsonl

    caption = "Quelle journée magnifique à la plage avec des amis"
    first = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "a.jsonl", [record(post_id="p", caption=caption)])))
    assert first.returncode == 0, first.stdout + first.stderr
    assert query(db.dsn, "SELECT language, language_source FROM social_posts") == [("fr", "detected")]
    again = write_jsonl(tmp_path / "b.jsonl", [record(post_id="p", caption=caption, lang="fr")])
    second = run_etl("run", "--source", "jsonl", "--input", str(again))
    assert second.returncode == 0, second.stdout + second.stderr
    assert query(db.dsn, "SELECT language, language_source FROM social_posts") == [("fr", "platform")]  # as a first sight


def test_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(language, "_CACHE_LIMIT", 50)
    detector = LanguageDetector()
    texts = [f"What a beautiful morning by the river number {n} with friends" for n in range(120)]
    first = detector.detect_many(texts)
    assert len(detector._cache) <= 50
    assert detector.detect_many(texts) == first == ["en"] * 120


def test_the_unpacked_model_is_kept_and_mapped(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    texts = PHRASES[:8]
    first = language.LanguageModel()  # unpacks py3langid's model and keeps it
    kept = list((tmp_path / "social-archiver").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("py3langid-")
    assert {p.name for p in kept[0].iterdir()} == {f"{name}.npy" for name in language._ARRAYS} | {"source.txt"}
    again = language.LanguageModel()  # maps what was kept
    assert isinstance(again.identifier.nb_ptc, np.memmap) and not isinstance(first.identifier.nb_ptc, np.memmap)
    assert again.classify_many(texts, 0.9) == first.classify_many(texts, 0.9)
    assert again.classify_many(texts, 0.9)[:3] == ["en", "fr", "es"]


@pytest.mark.fault("a file of the unpacked language model's copy is lost: the copy is made again, whole")
def test_a_model_copy_missing_a_file_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    language.LanguageModel()
    [kept] = list((tmp_path / "social-archiver").iterdir())
    (kept / "ptc.npy").unlink()
    again = language.LanguageModel()  # loads the model from py3langid's file, and keeps it anew
    assert again.classify_many(PHRASES[:3], 0.9) == ["en", "fr", "es"]
    assert {p.name for p in kept.iterdir()} == {f"{name}.npy" for name in language._ARRAYS} | {"source.txt"}


@pytest.mark.fault("an array of the unpacked language model's copy is cut short: refused with a warning, made again")
def test_a_damaged_model_copy_is_refused_and_made_again(tmp_path, monkeypatch, caplog):
    import numpy as np

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    language.LanguageModel()
    [kept] = list((tmp_path / "social-archiver").iterdir())
    whole = (kept / "pc.npy").read_bytes()
    (kept / "pc.npy").write_bytes(whole[: len(whole) // 2])  # a disk that filled up, an edit
    again = language.LanguageModel()  # the model from py3langid's own file (in memory), kept anew
    assert "damaged" in caplog.text and not isinstance(again.identifier.nb_ptc, np.memmap)
    assert again.classify_many(PHRASES[:3], 0.9) == ["en", "fr", "es"]
    assert (kept / "pc.npy").read_bytes() == whole


@pytest.mark.fault("the cache folder for the unpacked language model cannot be written: the model is loaded in memory")
def test_an_unwritable_cache_loads_the_model_in_memory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    model = language.LanguageModel()
    assert model.classify_many(PHRASES[:3], 0.9) == ["en", "fr", "es"]
    assert blocked.read_text() == "not a folder"
