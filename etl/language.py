"""A caption's language when the platform does not give it: py3langid (its model ships with the package).

Captions are detected many at a time (issue 16). py3langid walks a caption's UTF-8 bytes through a DFA in a
Python loop, one caption at a time, then scores the features it met with a small matrix product. Here the walk
steps every caption of a batch at once (a few numpy operations per byte position), each caption's features are
counted by sorting its row of the walk, and its scores are one small matrix product (BLAS) of its feature
counts with the model's rows of those features (converted to float32 once each, as they are first met). Those float32
sums add the same terms in another order than py3langid's own product, so a probability can differ in its last
digits: a caption whose probability falls within BATCH_TOLERANCE of the confidence needed, or whose two likeliest
languages are that close, is decided again by py3langid's own classify(), so every answer is exactly the one it
gives. tests/test_language.py checks this against py3langid as shipped.
"""

from __future__ import annotations

import logging
import lzma
import os
import re
import shutil
import sys
import tempfile
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etl.cache import make_copy, read_copy
from etl.versions import version  # not importlib.metadata: start-up (etl/versions.py)

log = logging.getLogger(__name__)

# Below this probability a guess is not kept (short captions: "sunset" reads as German at 0.06).
MIN_CONFIDENCE = 0.9
MIN_LETTERS = 12  # fewer letters than this carry too little to tell a language
_NOISE = re.compile(r"https?://\S+|www\.\S+|[@#]\w+")
# Matches when the text holds at least MIN_LETTERS letters, and stops looking at the MIN_LETTERS-th.
_ENOUGH_LETTERS = re.compile(rf"(?:[\W\d_]*[^\W\d_]){{{MIN_LETTERS}}}", re.UNICODE)
BATCH_TOLERANCE = 1e-3  # far above what float32 rounding moves a probability by (about 1e-6 here)
_BATCH_BYTES = 2_000  # longer captions are walked one at a time (a batch steps once per byte of its longest)
_BATCH_CELLS = 1 << 16  # captions x bytes of the longest walked together: its arrays (about 20 bytes a cell) in cache
_BATCH_MIN = 8  # fewer are classified one by one (a batch's fixed cost is a numpy step per byte)
_SCORE_GROUP = 16  # captions scored together (their feature rows stay in the processor's cache)
_CACHE_LIMIT = 20_000  # distinct captions remembered (cleared when full: memory stays flat)


_ARRAYS = ("ptc", "pc", "classes", "nextmove", "nextmove_row", "out_feat")
_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


def _numpy() -> Any:
    """numpy, its OpenBLAS loaded with one thread unless the environment asks for more. By default OpenBLAS starts a
    thread per core as it loads, which spins for about 0.1 s: on 2 cores, 60-100 ms of CPU taken from the scoring
    workers and the database in every process that loads the model (a first load's cold workers each load it). Its
    products here are a caption's small matrices, and the captions are already spread over processes. The setting
    is read once, as the library loads: it is put back as it was right after."""
    if "numpy" in sys.modules or _BLAS_THREADS in os.environ:
        import numpy

        return numpy
    os.environ[_BLAS_THREADS] = "1"
    try:
        import numpy
    finally:
        os.environ.pop(_BLAS_THREADS, None)
    return numpy


def _unpack(model_file: Path) -> dict[str, Any]:
    """py3langid's model file (an .npz inside LZMA) read into memory: its arrays by name."""
    np = _numpy()

    with tempfile.TemporaryFile(suffix=".npz") as tmp:
        with lzma.open(model_file) as src:
            shutil.copyfileobj(src, tmp, length=1 << 20)
        tmp.seek(0)
        with np.load(tmp, allow_pickle=False) as data:
            return {name: data[name] for name in _ARRAYS}


def _model_arrays(model_file: Path) -> dict[str, Any]:
    """The model's arrays, memory-mapped from an unpacked copy kept by etl/cache.py (made on first use; made again
    for another install of py3langid): no LZMA to undo at each start (0.4 CPU-second), and only the pages a run's
    captions touch are read into memory (a few MB of the 67, where loading takes them all). In memory when it cannot
    be kept."""
    np = _numpy()

    version = LanguageDetector.version()

    def mapped(folder: Path) -> dict[str, Any]:
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}

    arrays = read_copy("py3langid", version, model_file, mapped, damaged=(ValueError,))  # (a truncated array)
    if arrays is not None:
        return arrays
    arrays = _unpack(model_file)

    def fill(building: Path) -> None:
        for name, value in arrays.items():
            np.save(building / f"{name}.npy", value, allow_pickle=False)

    make_copy("py3langid", version, model_file, fill)
    return arrays


def _distinct(np: Any, values: Any) -> Any:
    """The distinct values, sorted (np.unique's answer): np.unique imports numpy.ma on its first call, 10-13 ms
    in every forked worker before its first batch."""
    values = np.sort(values, axis=None)
    keep = np.empty(values.shape, dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


class LanguageModel:
    """py3langid's model with its arrays as numpy arrays (memory-mapped where they can be), not as the Python
    lists and array copies py3langid's loader makes (about 100 MB, more at its peak); py3langid's own identifier
    is built on the same arrays, for single captions and for the batch's close calls."""

    def __init__(self) -> None:
        np = _numpy()  # before py3langid, which imports it
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        self.np = np
        try:
            data = _model_arrays(MODEL_DIR / MODEL_FILE)
            ptc, pc, classes = data["ptc"], data["pc"], data["classes"].tolist()
            nextmove, row, out = data["nextmove"], data["nextmove_row"], data["out_feat"]
            self.identifier = LanguageIdentifier(
                ptc, pc, classes, memoryview(nextmove), memoryview(out),
                norm_probs=True, tk_row=array("I", row.astype(np.uint32).tobytes()),
            )  # fmt: skip
            # Plain arrays over the same (mapped) memory: a memmap's indexing costs more, at every byte walked.
            self.nextmove, self.out = np.asarray(nextmove), np.asarray(out)
            self.rowbase = row.astype(np.int64) << 8
            self.ptc = np.asarray(self.identifier.nb_ptc)
            # The float32 rows of the features met so far (converted from the model's float16 once each), and
            # each feature's row there (-1: none yet). Refilled from the start when full: memory stays flat.
            # As many rows as a batch has places, so that one batch always fits; memory pages as they are filled.
            places = max(_BATCH_CELLS, _BATCH_MIN * _BATCH_BYTES)
            self.rows = np.empty((places, self.ptc.shape[1]), dtype=np.float32)
            self.row_of = np.full(self.ptc.shape[0], -1, dtype=np.int32)
            self.rows_used = 0
            self.rows_lock = threading.Lock()  # a refill by one thread must not move the rows another is reading
        except (KeyError, TypeError, ValueError, AttributeError):  # another model layout: py3langid loads it
            log.debug("py3langid's model loaded by py3langid (layout not known here): no batch detection")
            self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            self.nextmove = None

    def classify(self, text: str) -> tuple[str, float]:
        """py3langid's own answer for one text."""
        language, probability = self.identifier.classify(text)
        return str(language), float(probability)

    def classify_many(self, texts: Sequence[str], min_confidence: float) -> list[str | None]:
        """The language of each text when py3langid gives it at least min_confidence, else None."""
        encoded = [self.identifier._encode(t) for t in texts]
        results: list[str | None] = [None] * len(texts)
        batchable = []
        alone = self.nextmove is None or len(texts) < _BATCH_MIN
        for n, data in enumerate(encoded):
            if alone or len(data) > _BATCH_BYTES or not data:
                results[n] = self._decided(texts[n], min_confidence)
            else:
                batchable.append(n)
        batchable.sort(key=lambda n: -len(encoded[n]))  # longest first: the walk's active rows are a prefix
        start = 0
        while start < len(batchable):
            part = batchable[start : start + max(_BATCH_MIN, _BATCH_CELLS // len(encoded[batchable[start]]))]
            start += len(part)
            for n, answer in zip(part, self._batch([encoded[n] for n in part], min_confidence), strict=True):
                results[n] = (answer or None) if answer != "?" else self._decided(texts[n], min_confidence)
        return results

    def _rows_of(self, feats: Any) -> Any:
        """Where each feature's float32 row is in self.rows, the rows not there yet converted and added."""
        np = self.np
        rows = self.row_of[feats]
        missing = rows < 0
        if missing.any():
            new = _distinct(np, feats[missing])
            if self.rows_used + len(new) > len(self.rows):  # full: refilled with this batch's features
                self.row_of[:] = -1
                self.rows_used = 0
                new = _distinct(np, feats)
            place = np.arange(self.rows_used, self.rows_used + len(new), dtype=np.int32)
            self.rows[place] = self.ptc[new]
            self.row_of[new] = place
            self.rows_used += len(new)
            rows = self.row_of[feats]
        return rows

    def _decided(self, text: str, min_confidence: float) -> str | None:
        language, probability = self.classify(text)
        return language if probability >= min_confidence else None

    def _batch(self, encoded: list[bytes], min_confidence: float) -> list[str]:
        """Each text's language, "" when under min_confidence, "?" when too close to it to tell here."""
        np = self.np
        count = len(encoded)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
        width = int(lengths[0])
        # Row k: byte k of every text (padded past a text's end, where the walk no longer goes).
        grid = np.frombuffer(b"".join([data.ljust(width, b"\0") for data in encoded]), dtype=np.uint8)
        grid = grid.reshape(count, width).T.copy()
        # The DFA walk of every text at once: at byte position k, texts longer than k (a prefix: longest first).
        active = np.searchsorted(-lengths, -np.arange(width), side="left")
        states = np.zeros((width, count), dtype=self.nextmove.dtype)  # past its end, a text stays at state 0
        previous = np.zeros(count, dtype=self.nextmove.dtype)
        for k in range(width):
            m = int(active[k])
            at = self.rowbase[previous[:m]]
            at += grid[k, :m]
            previous = states[k, :m]
            np.take(self.nextmove, at, out=previous)
        # Each text's features (-1: none at that byte, or past its end), sorted: a feature's repeats side by side.
        feats = self.out[states.T]
        feats[np.arange(width) >= lengths[:, None]] = -1
        feats.sort(axis=1)
        found = feats >= 0  # at the end of each row
        first = np.ones(feats.shape, dtype=bool)  # a feature's first place in its row
        np.not_equal(feats[:, 1:], feats[:, :-1], out=first[:, 1:])
        first &= found
        at = np.flatnonzero(first)
        ends = np.minimum(np.append(at[1:], feats.size), (at // width + 1) * width)  # the next feature, or the row's end
        # py3langid's weight of a feature met c times, log1p(c), on its first place; its repeats weigh nothing.
        weights = np.zeros(feats.shape, dtype=np.float32)
        weights.flat[at] = np.log1p((ends - at).astype(np.float32))
        np.maximum(feats, 0, out=feats)  # the places that weigh nothing gather any row
        found_count = found.sum(axis=1)
        answers = [""] * count
        if not at.size:
            return answers  # no features in any: uniform probabilities, none sure enough
        pc = self.identifier.nb_pc
        scores = np.empty((count, len(pc)), dtype=np.float32)
        with self.rows_lock:
            rows = self._rows_of(feats)
            for a in range(0, count, _SCORE_GROUP):  # a few texts at a time: their gathered rows stay in the cache
                b = min(a + _SCORE_GROUP, count)
                used = width - int(found_count[a:b].max())
                scores[a:b] = np.matmul(weights[a:b, None, used:], self.rows[rows[a:b, used:]])[:, 0, :]
        scores += pc
        scores[found_count == 0] = 0.0  # no features: uniform probabilities (as py3langid)
        scores *= (1.0 / np.sqrt(np.maximum(lengths, 1)))[:, None].astype(np.float32)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for i, j in self.identifier._alias_pairs:
            scores[:, i] += scores[:, j]
            scores[:, j] = 0.0
        best = scores.argmax(axis=1)
        confidence = scores[np.arange(len(encoded)), best]
        runner_up = np.partition(scores, -2, axis=1)[:, -2]
        classes = self.identifier.nb_classes
        for n in range(len(encoded)):
            c = float(confidence[n])
            if abs(c - min_confidence) < BATCH_TOLERANCE:
                answers[n] = "?"
            elif c >= min_confidence:  # (under 0.5, two languages could tie: then py3langid picks)
                answers[n] = "?" if c - float(runner_up[n]) < BATCH_TOLERANCE else str(classes[int(best[n])])
        return answers


_PRELOADED: list[LanguageModel] = []  # a model loaded before its detector was made (etl/prefork.py)


def preload_model() -> None:
    """Loads the model now, for the first LanguageDetector made in this process to take."""
    if not _PRELOADED:
        _PRELOADED.append(LanguageModel())


class LanguageDetector:
    """Guesses a caption's language; the model (0.5 s to load) is loaded on the first caption that needs it (or
    taken from preload_model())."""

    def __init__(self, min_confidence: float = MIN_CONFIDENCE):
        self.min_confidence = min_confidence
        self._model_: LanguageModel | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, str | None] = {}

    @staticmethod
    def version() -> str:
        try:
            return f"py3langid-{version('py3langid')}"
        except Exception:  # not installed: nothing is detected
            return "none"

    def _model(self) -> LanguageModel:
        with self._lock:
            if self._model_ is None:
                self._model_ = _PRELOADED.pop() if _PRELOADED else LanguageModel()
            return self._model_

    def warm(self) -> None:
        """Loads the model now (before worker processes fork, so that they share it)."""
        self._model()

    def loaded(self) -> bool:
        """Whether the model is loaded in this process."""
        return self._model_ is not None

    @staticmethod
    def _worth_detecting(text: str | None) -> str | None:
        """The caption without links, mentions and tags, when enough letters are left to tell a language."""
        if not text:
            return None
        cleaned = _NOISE.sub(" ", text)
        return cleaned if _ENOUGH_LETTERS.match(cleaned) else None

    def detect(self, text: str | None) -> str | None:
        """The ISO 639-1 code of the caption's language, or None when unsure (short, mixed, only tags/links)."""
        return self.detect_many([text])[0]

    def detect_many(self, texts: Sequence[str | None]) -> list[str | None]:
        """detect() of each text, the distinct ones needing detection classified together."""
        results: list[str | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for n, text in enumerate(texts):
            cleaned = self._worth_detecting(text)
            if cleaned is None:
                continue
            if cleaned in self._cache:
                results[n] = self._cache[cleaned]
            else:
                todo.setdefault(cleaned, []).append(n)
        if not todo:
            return results
        distinct = list(todo)
        if len(self._cache) + len(distinct) > _CACHE_LIMIT:
            self._cache.clear()
        for cleaned, language in zip(distinct, self._model().classify_many(distinct, self.min_confidence), strict=True):
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[cleaned] = language
            for n in todo[cleaned]:
                results[n] = language
        return results

    def detect_one(self, text: str | None) -> str | None:
        """detect() by py3langid's own classify(), caption by caption (what detect_many must equal)."""
        cleaned = self._worth_detecting(text)
        if cleaned is None:
            return None
        language, probability = self._model().classify(cleaned)
        return language if probability >= self.min_confidence else None


def english_or_unknown(language: str | None) -> bool:
    """Whether TextBlob's English lexicon may score a caption in this language (unknown: it is tried)."""
    return language is None or language.split("-", 1)[0] == "en"
