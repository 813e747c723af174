"""reenrich's pipeline (etl/reenrich.py): the workers decide batches ahead while a writer thread writes them."""

from __future__ import annotations

import psycopg2
import pytest

from etl import reenrich as module
from etl.enrich import SentimentEnricher
from etl.run.runner import Runner, RunRequest
from etl.run.stats import RunStats
from tests.conftest import query
from tests.support import record, write_jsonl


def _posts(db, count: int) -> None:
    rows = [(f"p{i}", f"what a lovely day number {i}" if i % 3 else f"a terrible night {i}") for i in range(count)]
    with db.transaction() as cur:
        cur.executemany("INSERT INTO social_posts (platform, post_id, caption, created_at) VALUES ('x', %s, %s, now())", rows)


@pytest.mark.fault("a reenrich batch cannot be written (the database refuses it): the error stops the run, the batches "
                   "written before it stay, the rest is left for the next reenrich")  # fmt: skip
def test_a_failed_write_stops_the_reenrich_with_its_error(db, monkeypatch):
    _posts(db, 1000)
    real = module.write_decisions
    calls = []

    def refuse_the_third(cur, parts, version, ids):
        calls.append(len(parts))
        if len(calls) == 3:
            raise psycopg2.errors.DiskFull("could not extend file")
        return real(cur, parts, version, ids)

    monkeypatch.setattr(module, "write_decisions", refuse_the_third)
    enricher = SentimentEnricher(0.1)
    stats = RunStats()
    with pytest.raises(psycopg2.errors.DiskFull):
        module.reenrich(db, enricher, stats, batch_size=100, workers=2)
    assert len(calls) == 3  # nothing written after the failure
    assert stats.fetched == 200
    assert sum(stats.sentiment.values()) == 200  # the labels of what was written only
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment_version = %s", (enricher.version,)) == [(200,)]
    again = RunStats()
    monkeypatch.setattr(module, "write_decisions", real)
    module.reenrich(db, enricher, again, batch_size=100, workers=2)
    assert again.fetched == 800 and not again.interrupted
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment IS NULL") == [(0,)]


def test_batches_are_written_in_order_while_later_ones_are_decided(db, monkeypatch):
    """The writer gets every batch once, in id order, and the run's counts add up (the queue drops none)."""
    _posts(db, 1234)
    written = []
    real = module.write_decisions

    def record(cur, parts, version, ids):
        written.append([int(line.split("\t", 1)[0]) for part in parts for line in part.splitlines()])
        assert list(ids) == written[-1]  # the posts the UPDATE reads between (their first and last id)
        return real(cur, parts, version, ids)

    monkeypatch.setattr(module, "write_decisions", record)
    stats = RunStats()
    module.reenrich(db, SentimentEnricher(0.1), stats, batch_size=100, workers=2)
    ids = [i for batch in written for i in batch]
    assert [len(batch) for batch in written] == [100] * 12 + [34]
    assert ids == sorted(ids) and len(set(ids)) == 1234
    assert stats.fetched == 1234 and stats.sentiment["positive"] + stats.sentiment["negative"] == 1234


@pytest.mark.fault("reading the rows fails while a write fails too: the read's error goes on, the write's is logged")
def test_the_readers_error_is_the_one_that_goes_on(db, monkeypatch, caplog):
    import threading
    from contextlib import contextmanager

    _posts(db, 600)
    read_failed = threading.Event()

    def refuse(cur, parts, version, ids):  # the first write fails once the read has failed
        assert read_failed.wait(10)
        raise psycopg2.errors.DiskFull("could not extend file")

    real_unscored = module.unscored_posts

    class Failing:
        def __init__(self, scan):
            self.scan, self.reads = scan, 0

        def fetchmany(self, n):
            self.reads += 1
            if self.reads == 4:
                read_failed.set()
                raise psycopg2.OperationalError("the server closed the connection")
            return self.scan.fetchmany(n)

    @contextmanager
    def failing_scan(*args, **kwargs):
        with real_unscored(*args, **kwargs) as scan:
            yield Failing(scan)

    monkeypatch.setattr(module, "write_decisions", refuse)
    monkeypatch.setattr(module, "unscored_posts", failing_scan)
    with pytest.raises(psycopg2.OperationalError):
        module.reenrich(db, SentimentEnricher(0.1), RunStats(), batch_size=100, workers=2)
    assert "writing the re-enriched rows failed too" in caplog.text


def test_the_writer_writes_holding_the_fork_lock(db, monkeypatch):
    """Batches only relabelled come first, so the workers are forked while the writer already writes: never while
    it is inside libpq (etl/ahead.py FORKING), as for the archiver's loader thread."""
    import threading

    from etl.ahead import FORKING

    _posts(db, 400)
    enricher = SentimentEnricher(0.1)
    module.reenrich(db, enricher, RunStats(), batch_size=100, workers=2)  # decided once: later runs relabel
    with db.transaction() as cur:  # rows past the first 200 (in id order) need scoring again, the others only a label
        cur.execute("UPDATE social_posts SET sentiment_version = 'older-scorer' WHERE id > (SELECT min(id) + 199 FROM social_posts)")
    real = module.write_decisions
    seen: list[tuple[str, bool]] = []

    def watching(cur, parts, version, ids):
        seen.append((threading.current_thread().name, FORKING.held_here()))
        return real(cur, parts, version, ids)

    monkeypatch.setattr(module, "write_decisions", watching)
    module.reenrich(db, SentimentEnricher(0.2), RunStats(), batch_size=100, workers=2)
    assert len(seen) == 4 and all(name == "reenrich-writer" and locked for name, locked in seen)


def _pages(db) -> dict[int, int]:
    """Each post's page (the block of its row version's ctid)."""
    return dict(query(db.dsn, "SELECT id, (ctid::text::point)[0]::int FROM social_posts"))


def test_a_rescore_rewrites_each_post_on_its_own_page(db):
    """sql/013's fillfactor: a page as a load leaves it has room for a new version of each of its rows, so a re-score
    (which rewrites every row in the transaction of its batch) updates them in place, touching no index."""
    enricher = SentimentEnricher(0.1)
    older = enricher.version.replace("textblob", "an-older")  # another scorer, its version as long
    rows = [(f"p{i}", f"what a lovely day number {i}" if i % 3 else f"a terrible night {i}", older) for i in range(1500)]
    with db.transaction() as cur:  # as a run stores them: scored (each row as long once scored again)
        cur.executemany("INSERT INTO social_posts (platform, post_id, caption, created_at, sentiment, sentiment_polarity,"
                        " sentiment_subjectivity, language, language_source, sentiment_version) VALUES ('x', %s, %s,"
                        " now(), 'negative', 0.0, 0.0, 'en', 'detected', %s)", rows)  # fmt: skip
    before = _pages(db)
    indexes = query(db.dsn, "SELECT pg_indexes_size('social_posts')")
    assert len(set(before.values())) > 10  # many pages: a batch rewrites whole ones
    stats = RunStats()
    module.reenrich(db, enricher, stats, batch_size=500, workers=1)
    assert stats.fetched == 1500 and stats.updated == 1500  # every row rewritten with a new decision
    assert _pages(db) == before  # at fillfactor 100 (pages full), rows move to other pages
    assert query(db.dsn, "SELECT pg_indexes_size('social_posts')") == indexes


def test_a_batch_update_reads_only_its_own_posts(db):
    """The batch's UPDATE reads social_posts between its first and last id: the planner knows nothing of the
    temporary table of decisions, and without the range it hashed the whole table for each batch."""
    from etl.db.reenrich import _APPLY_DECISIONS, _PREPARE_DECISIONS

    _posts(db, 5000)
    with db.transaction() as cur:
        cur.execute("ANALYZE social_posts")
    with db.transaction() as cur:
        cur.execute(_PREPARE_DECISIONS)
        cur.execute("INSERT INTO reenrich_decisions (id, changed) SELECT id, false FROM social_posts ORDER BY id LIMIT 500")
        cur.execute("SELECT min(id), max(id) FROM reenrich_decisions")
        first, last = cur.fetchone()
        cur.execute("EXPLAIN " + _APPLY_DECISIONS, {"version": "v", "first": first, "last": last})
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "Seq Scan on social_posts" not in plan, plan


HAPPY = "What a wonderful, lovely, beautiful day at the beach with my best friends"
ANGRY = "This is the worst, most horrible and disgusting service I have ever had, awful"


def _run(settings, path):
    runner = Runner(settings)
    try:
        return runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}}))
    finally:
        runner.close()


def test_a_caption_a_run_changed_while_reenrich_scored_it_keeps_the_runs_score(db, make_settings, tmp_path, monkeypatch):
    settings = make_settings(DATABASE_URL=db.dsn, ETL_RECHECK_POSTS="0")
    assert _run(settings, write_jsonl(tmp_path / "a.jsonl", [record(post_id="p1", caption=HAPPY)])).exit_code == 0
    with db.transaction() as cur:  # scored by an older enricher: reenrich reads this row
        cur.execute("UPDATE social_posts SET sentiment_version = 'textblob-old', sentiment = 'neutral', sentiment_polarity = 0")
    write = module._write

    def write_after_a_run(*args):
        # The cron run lands between reenrich's read and its write: the author edited the caption.
        assert _run(settings, write_jsonl(tmp_path / "b.jsonl", [record(post_id="p1", caption=ANGRY)])).exit_code == 0
        assert query(db.dsn, "SELECT caption, sentiment FROM social_posts") == [(ANGRY, "negative")]
        return write(*args)

    monkeypatch.setattr(module, "_write", write_after_a_run)
    module.reenrich(db, SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language), RunStats(), workers=1)
    # The happy caption's decision is not written over the angry caption's score (stamped current, it would stay).
    assert query(db.dsn, "SELECT caption, sentiment FROM social_posts") == [(ANGRY, "negative")]


@pytest.mark.fault("a run with another threshold edits a caption while reenrich scores it: the old caption's score is not written")
def test_a_caption_a_run_with_another_version_changed_while_reenrich_scored_it_keeps_the_runs_score(
    db, make_settings, tmp_path, monkeypatch
):
    # The guard looked only at the version stamp: a run configured otherwise (the cron host's .env with another
    # SENTIMENT_THRESHOLD) stamps another version, so the happy caption's decision went over the angry caption.
    settings = make_settings(DATABASE_URL=db.dsn, ETL_RECHECK_POSTS="0")
    other = make_settings(DATABASE_URL=db.dsn, ETL_RECHECK_POSTS="0", SENTIMENT_THRESHOLD="0.2")
    assert _run(other, write_jsonl(tmp_path / "a.jsonl", [record(post_id="p1", caption=HAPPY)])).exit_code == 0
    write = module._write

    def write_after_a_run(*args):
        assert _run(other, write_jsonl(tmp_path / "b.jsonl", [record(post_id="p1", caption=ANGRY)])).exit_code == 0
        return write(*args)

    monkeypatch.setattr(module, "_write", write_after_a_run)
    enricher = SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language)
    module.reenrich(db, enricher, RunStats(), workers=1)
    [(caption, sentiment, version)] = query(db.dsn, "SELECT caption, sentiment, sentiment_version FROM social_posts")
    assert (caption, sentiment) == (ANGRY, "negative") and version != enricher.version  # read again next time
    monkeypatch.undo()
    module.reenrich(db, enricher, RunStats(), workers=1)
    assert query(db.dsn, "SELECT caption, sentiment, sentiment_version FROM social_posts") == [
        (ANGRY, "negative", enricher.version)
    ]


def test_a_decision_the_write_skips_is_not_counted_changed(db, make_settings, tmp_path, monkeypatch):
    # (Found by a hostile review.) The md5 guard (a caption a run with another SENTIMENT_THRESHOLD changed meanwhile) drops the decision in SQL,
    # but _write counts it from the decider's tally: the summary says "changed 1 ... positive 1" for a row that
    # reenrich did not touch and that now holds the run's negative score (and it is read, and counted, again next time).
    settings = make_settings(DATABASE_URL=db.dsn, ETL_RECHECK_POSTS="0")
    other = make_settings(DATABASE_URL=db.dsn, ETL_RECHECK_POSTS="0", SENTIMENT_THRESHOLD="0.2")
    assert _run(settings, write_jsonl(tmp_path / "a.jsonl", [record(post_id="p1", caption=HAPPY)])).exit_code == 0
    with db.transaction() as cur:  # scored by an older enricher: reenrich reads this row, and its decision changes it
        cur.execute("UPDATE social_posts SET sentiment_version = 'textblob-old', sentiment = 'neutral', sentiment_polarity = 0")
    write = module._write

    def write_after_a_run(*args):
        assert _run(other, write_jsonl(tmp_path / "b.jsonl", [record(post_id="p1", caption=ANGRY)])).exit_code == 0
        return write(*args)

    monkeypatch.setattr(module, "_write", write_after_a_run)
    stats = RunStats()
    module.reenrich(db, SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language), stats, workers=1)
    assert query(db.dsn, "SELECT caption, sentiment FROM social_posts") == [(ANGRY, "negative")]  # not written: right
    assert (stats.updated, stats.sentiment["positive"]) == (0, 0), (stats.updated, dict(stats.sentiment))
