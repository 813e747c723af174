"""Scoring ahead (etl/ahead.py): worker processes decide the next batch; the posts come out exactly as scored here."""

from __future__ import annotations

import os
import random
from datetime import datetime, timezone

import pytest

from etl.ahead import score_ahead
from etl.enrich import SentimentEnricher
from etl.errors import SourceError
from etl.records import Post
from tests.support import outliving_a_killed_parent

WHEN = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
WORDS = "what a lovely awful great terrible day night coffee la plage est belle und der Tag war schön".split()


def batches(count: int, size: int, seed: int = 16) -> list[list[Post]]:
    rng = random.Random(seed)
    out = []
    for b in range(count):
        batch = []
        for n in range(size):
            caption = " ".join(rng.choices(WORDS, k=rng.randint(3, 16))) + f" #{n % 5} {n}"
            given = rng.choice([None, None, "fr", "en"])
            batch.append(
                Post(
                    "mock",
                    f"{b}-{n}",
                    WHEN,
                    caption=caption,
                    language=given,
                    language_source="platform" if given else None,
                )
            )
        out.append(batch)
    return out


def recorded(data: list[list[Post]], read: list[int]):
    """The batches, each one's number put in `read` as it is read."""
    for n, batch in enumerate(data):
        read.append(n)
        yield batch


def enrich_all(enricher: SentimentEnricher, stream) -> list[Post]:
    return [p for batch in stream for p in enricher.enrich_all(batch, [None] * len(batch))]


def test_decisions_made_ahead_equal_those_made_in_process():
    data = batches(5, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    enricher = SentimentEnricher()
    assert enrich_all(enricher, score_ahead(enricher, iter(data), workers=1)) == expected
    # The first batch is scored in-process (nothing is known of the stream yet), the others ahead (sent to the
    # worker; a chunk it has not begun when its batch is due is taken back and decided here, so this counts both).
    assert enricher.ahead_used == 400
    assert {p.sentiment_skipped for p in expected} >= {None, "language fr"}


def test_a_first_load_is_scored_by_workers_that_load_the_models_themselves():
    """When the first batch is mostly unscored (`unscored`), it is sent to the workers too; they are forked before
    this process loads the language model, and this process never loads it (nor takes a chunk back)."""
    data = batches(5, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    enricher = SentimentEnricher()
    asked: list[str] = []

    def unscored(batch: list[Post]) -> bool:
        asked.append(batch[0].post_id)
        return True

    assert enrich_all(enricher, score_ahead(enricher, iter(data), workers=1, unscored=unscored)) == expected
    assert asked == ["0-0"]  # the first batch only: the others are judged by what the enricher saw
    assert enricher.ahead_used == 500
    assert enricher.detector is not None and not enricher.detector.loaded() and not enricher.warmed()


def test_a_first_batch_with_stored_decisions_is_scored_in_process():
    data = batches(3, 100)
    enricher = SentimentEnricher()
    assert enrich_all(enricher, score_ahead(enricher, iter(data), workers=1, unscored=lambda batch: False)) == (
        enrich_all(SentimentEnricher(), iter(data))
    )
    assert enricher.ahead_used == 200 and enricher.warmed()  # the first batch was decided here


def test_workers_forked_early_decide_the_batches_scored_in_process_while_they_are_used():
    """A new archive's images run: each batch is handed on as soon as it is read (its downloads start at once),
    and the workers forked early decide its captions, collected when the enricher needs them."""
    from etl.ahead import EarlyScorers

    data = batches(3, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    read: list[int] = []
    enricher = SentimentEnricher()
    early = EarlyScorers(enricher, workers=1)
    early.start()
    out = []
    for batch in score_ahead(enricher, recorded(data, read), in_process=lambda b: True, early=early):
        out.append(len(read))
        out.extend(enricher.enrich_all(batch, [None] * len(batch)))
    assert out == [1, *expected[:100], 2, *expected[100:200], 3, *expected[200:]]
    assert enricher.ahead_used == 300 and not enricher.detector.loaded() and enricher.later is None


def test_workers_forked_early_take_small_batches_too():
    """Under MIN_BATCH a batch is scored here, unless workers forked early have the models and this process has not
    (a small first run of a new archive: loading them here would cost more than the round trips)."""
    from etl.ahead import EarlyScorers

    data = batches(3, 10)
    enricher = SentimentEnricher()
    early = EarlyScorers(enricher, workers=1)
    early.start()
    scored = enrich_all(enricher, score_ahead(enricher, iter(data), unscored=lambda b: True, early=early))
    assert scored == enrich_all(SentimentEnricher(), iter(data))
    assert enricher.ahead_used == 30 and not enricher.detector.loaded()


_PARENT = os.getpid()


def _decide_failing_in_workers(items):
    """etl.ahead._decide, failing in a worker process (module level: tasks are pickled by name)."""
    import etl.ahead

    if os.getpid() != _PARENT:
        raise MemoryError("a worker ran out of memory (injected)")
    return etl.ahead.__dict__["_real_decide"](items)


@pytest.mark.fault("a worker forked early fails on a batch being archived with its images: it is scored here")
def test_a_batch_whose_early_worker_fails_is_scored_here(monkeypatch, caplog):
    import etl.ahead
    from etl.ahead import EarlyScorers

    monkeypatch.setitem(etl.ahead.__dict__, "_real_decide", etl.ahead._decide)
    monkeypatch.setattr(etl.ahead, "_decide", _decide_failing_in_workers)
    data = batches(3, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    enricher = SentimentEnricher()
    early = EarlyScorers(enricher, workers=1)
    early.start()
    assert enrich_all(enricher, score_ahead(enricher, iter(data), in_process=lambda b: True, early=early)) == expected
    failed = [r.getMessage() for r in caplog.records if "scoring worker failed" in r.getMessage()]
    assert len(failed) == 1 and "ran out of memory (injected)" in failed[0]  # the batches after it are not sent
    assert enricher.ahead_used == 0


def test_a_rerun_is_not_scored_ahead():
    """Captions with a stored decision are reused, so sending them to workers would be wasted work."""
    data = batches(4, 100)
    enricher = SentimentEnricher()
    kept = {(p.platform, p.post_id): (p.caption, p.sentiment, p.language, p.language_source, p.sentiment_skipped)
            for p in enrich_all(SentimentEnricher(), iter(data))}  # fmt: skip
    for batch in score_ahead(enricher, iter(data), workers=1):
        enricher.enrich_all(batch, [kept[(p.platform, p.post_id)] for p in batch])
    assert enricher.ahead_used == 0 and not enricher.ahead


@pytest.mark.fault("the source fails while a batch is held back for scoring ahead: that batch still comes out")
def test_a_failing_stream_hands_on_what_it_gave_first():
    data = batches(4, 80)

    def stream():
        yield from data
        raise SourceError("the platform went away")

    enricher = SentimentEnricher()
    seen = []
    with pytest.raises(SourceError):
        for batch in score_ahead(enricher, stream(), workers=1):
            seen.append(enricher.enrich_all(batch, [None] * len(batch)))
    assert [len(b) for b in seen] == [80, 80, 80, 80]
    assert [p.post_id for b in seen for p in b] == [p.post_id for b in data for p in b]


def test_batches_scored_in_process_are_handed_on_as_soon_as_read():
    """An images run's batches: never sent to the workers, and each one out before the next is read."""
    data = batches(4, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    read: list[int] = []
    enricher = SentimentEnricher()
    out = []
    ahead = score_ahead(enricher, recorded(data, read), workers=1, in_process=lambda b: b[0].post_id.startswith(("0-", "1-")))
    for batch in ahead:
        out.append((len(read), batch[0].post_id))
        scored = enricher.enrich_all(batch, [None] * len(batch))
        assert scored == expected[: len(scored)]
        expected = expected[len(scored) :]
    # Batches 0 and 1 come out as they are read; batch 2 goes to the workers and waits for batch 3.
    assert out == [(1, "0-0"), (2, "1-0"), (4, "2-0"), (4, "3-0")]
    assert enricher.ahead_used == 200  # batches 2 and 3, decided ahead (by the worker, or taken back)


@pytest.mark.fault("the archiver fails while batches are scored ahead: the generator closes and its workers end")
def test_a_consumer_that_stops_early_closes_the_workers():
    import multiprocessing

    enricher = SentimentEnricher()
    ahead = score_ahead(enricher, iter(batches(6, 100)), workers=1)
    taken = []
    for _ in range(3):
        batch = next(ahead)
        taken.append(enricher.enrich_all(batch, [None] * len(batch)))
    assert enricher.ahead_used == 200 and multiprocessing.active_children()  # the second and third were sent to a worker
    ahead.close()  # what a loop that raises (a load error, a stop) does to the generator it was reading
    assert multiprocessing.active_children() == []
    assert [len(b) for b in taken] == [100, 100, 100]


def test_decisions_of_a_batch_cut_into_many_chunks_equal_those_made_in_process(monkeypatch):
    """Batches of several chunks (some decided by the worker, some taken back here) give the same decisions."""
    import etl.ahead

    monkeypatch.setattr(etl.ahead, "_CHUNK", 15)
    monkeypatch.setattr(etl.ahead, "_MIN_CHUNK", 15)
    data = batches(4, 100)
    expected = enrich_all(SentimentEnricher(), iter(data))
    enricher = SentimentEnricher()
    assert enrich_all(enricher, score_ahead(enricher, iter(data), workers=1)) == expected
    assert enricher.ahead_used == 300


def test_tasks_are_long_unless_that_would_leave_workers_idle():
    from etl.ahead import task_size

    assert task_size(2000, 2) == 1000  # one worker and this process: two tasks of the longest size
    assert task_size(2000, 8) == 250  # seven workers: eight tasks, each at the shortest size
    assert task_size(4000, 8) == 500
    assert task_size(100, 2) == 250 and task_size(0, 2) == 250 and task_size(5000, 0) == 1000


@pytest.mark.fault("the run is SIGKILLed (the OOM killer) while its scoring workers wait: they end within seconds, not never")
def test_scoring_workers_end_when_their_parent_is_killed_outright(tmp_path):
    # A parent that forks its workers (cold, as a first load does), has them score once, prints their pids, then
    # dies by SIGKILL.
    code = (
        "import os, signal\n"
        "from etl.ahead import fork_scorers\n"
        "from etl.enrich import SentimentEnricher\n"
        "pool = fork_scorers(SentimentEnricher(0.05), 2, warm=False)\n"
        "assert pool.submit(sum, [1, 2]).result() == 3\n"
        "print(*pool._processes, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert outliving_a_killed_parent(tmp_path, code, 2) == [], "scoring workers outlived their killed parent"
