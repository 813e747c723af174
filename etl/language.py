"""A caption's language when the platform does not give it: py3langid (its model ships with the package)."""

from __future__ import annotations

import logging
import re
import threading
from importlib.metadata import version
from typing import Any

log = logging.getLogger(__name__)

# Below this probability a guess is not kept (short captions: "sunset" reads as German at 0.06).
MIN_CONFIDENCE = 0.9
MIN_LETTERS = 12  # fewer letters than this carry too little to tell a language
_NOISE = re.compile(r"https?://\S+|www\.\S+|[@#]\w+")
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


class LanguageDetector:
    """Guesses a caption's language; the model (0.7 s to load) is loaded on the first caption that needs it."""

    def __init__(self, min_confidence: float = MIN_CONFIDENCE):
        self.min_confidence = min_confidence
        self._identifier: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def version() -> str:
        try:
            return f"py3langid-{version('py3langid')}"
        except Exception:  # not installed: nothing is detected
            return "none"

    def _model(self) -> Any:
        with self._lock:
            if self._identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            return self._identifier

    def detect(self, text: str | None) -> str | None:
        """The ISO 639-1 code of the caption's language, or None when unsure (short, mixed, only tags/links)."""
        if not text:
            return None
        cleaned = _NOISE.sub(" ", text)
        if len(_LETTER.findall(cleaned)) < MIN_LETTERS:
            return None
        language, probability = self._model().classify(cleaned)
        return str(language) if float(probability) >= self.min_confidence else None


def english_or_unknown(language: str | None) -> bool:
    """Whether TextBlob's English lexicon may score a caption in this language (unknown: it is tried)."""
    return language is None or language.split("-", 1)[0] == "en"
