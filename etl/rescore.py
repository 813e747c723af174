"""reenrich's scoring side: stored rows decided by the current enricher, as the COPY text that etl/db/reenrich.py's
write_decisions() applies. It runs in the scoring workers and imports nothing of the database: a worker forked as
etl.py starts (etl/prefork.py) is ready to score without loading psycopg2 (20-25 ms before its first batch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from etl.ahead import worker_enricher
from etl.enrich import SentimentEnricher
from etl.records import Sentiment, copy_text


def decisions(enricher: SentimentEnricher, rows: Sequence[tuple]) -> list[tuple]:
    """The decision of each stored row (id, caption, label, polarity, subjectivity, language, language_source,
    skipped, version, seen) under `enricher`. A row decided by the same scorer and language detector (only the threshold
    changed) keeps its score and language and is labelled again from its polarity: nothing to detect or score."""
    keeps = [kept(enricher, row) for row in rows]
    todo = [row for row, keep in zip(rows, keeps, strict=True) if not keep]
    # The same rule as a run: the platform's language is kept, others are detected again.
    decided = iter(enricher.decide_captions([(row[1], row[5] if row[6] == "platform" else None) for row in todo]))
    return [
        (Sentiment(row[3], row[4], enricher.label(row[3])) if row[3] is not None else None, *row[5:8])
        if keep else next(decided)
        for row, keep in zip(rows, keeps, strict=True)
    ]  # fmt: skip


def kept(enricher: SentimentEnricher, row: tuple) -> bool:
    """Whether the row's stored decision holds under `enricher`: the same scorer and detector decided it, and it
    is whole (a score with its label, or no score and the reason)."""
    if not enricher.relabels(row[8]) or (row[2] is None) != (row[3] is None):
        return False
    return row[3] is not None or row[7] is not None


def decide_rows(enricher: SentimentEnricher, rows: Sequence[tuple]) -> str:
    """Decide stored rows (as decisions() takes them): the decisions as COPY text for write_decisions. Done where
    the scoring is (a worker), so that only a string travels back; what was written is counted by the write."""
    written = []
    for row, (s, lang, lang_source, why) in zip(rows, decisions(enricher, rows), strict=True):
        new = (s.label, s.polarity, s.subjectivity) if s else (None, None, None)
        # A row scored with the same result is only stamped with the version (not read again by the next
        # reenrich, its score reused by runs); its updated_at stays (the data did not change).
        same = row[2:8] == (*new, lang, lang_source, why)
        written.append((row[0], not same, *new, lang, lang_source, why, row[9]))
    return decision_lines(written)


def decide_in_worker(rows: Sequence[tuple]) -> str:
    return decide_rows(worker_enricher(), rows)


_NULL = "\\N"


def _opt(value: Any) -> str:
    return _NULL if value is None else copy_text(value)


def _num(value: float | None) -> str:
    return _NULL if value is None else repr(value)


def decision_lines(written: Iterable[Sequence[Any]]) -> str:
    """Re-enrichment decisions, each (id, changed, label, polarity, subjectivity, language, language_source,
    skipped, seen), as the text write_decisions() copies (each field's type known: no per-value dispatch)."""
    return "".join([
        f"{row_id}\t{'t' if changed else 'f'}\t{_opt(label)}\t{_num(polarity)}\t{_num(subjectivity)}\t"
        f"{_opt(language)}\t{_opt(source)}\t{_opt(skipped)}\t{seen}\n"
        for row_id, changed, label, polarity, subjectivity, language, source, skipped, seen in written
    ])  # fmt: skip
