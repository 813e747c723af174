"""Scoring workers forked as `etl.py reenrich` starts (etl/prefork.py): the same decisions, none left behind."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

from etl import prefork
from etl.ahead import PARENT_CHECK_SECONDS
from etl.prefork import wanted
from tests.conftest import query
from tests.support import die_in_worker, outliving_a_killed_parent, still_alive

DECIDED = (
    "SELECT post_id, sentiment, sentiment_polarity, sentiment_subjectivity, language, language_source,"
    " sentiment_skipped, sentiment_version FROM social_posts ORDER BY post_id"
)
CAPTIONS = (
    "what a lovely sunny day at the beach with friends {n}",
    "a terrible awful night, the worst concert ever {n}",
    "Der Zug war heute wieder sehr spät und voll {n}",
    "nous avons mangé une excellente soupe ce soir {n}",
    "meh {n}",
    "the new cafe is somewhat interesting and a bit slow {n}",  # polarity 0.11: neutral at 0.3, positive at 0.05
    "",
)


@pytest.fixture(autouse=True)
def _none_left():
    """Workers a failed test started here are killed, and the next test starts its own."""
    yield
    prefork.release()


def _archive(db, count: int) -> None:
    rows = [(f"p{n:05d}", CAPTIONS[n % len(CAPTIONS)].format(n=n) or None) for n in range(count)]
    with db.transaction() as cur:
        cur.executemany(
            "INSERT INTO social_posts (platform, post_id, caption, created_at) VALUES ('x', %s, %s, now())", rows
        )


def _unscore(db) -> None:
    with db.transaction() as cur:
        cur.execute("UPDATE social_posts SET sentiment = NULL, sentiment_polarity = NULL, sentiment_subjectivity = NULL,"
                    " language = NULL, language_source = NULL, sentiment_skipped = NULL, sentiment_version = NULL")  # fmt: skip


def _marked(mark: str) -> list[int]:
    """Processes (not zombies) whose environment holds the mark."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("args", "forks"),
    [
        (["reenrich"], True),
        (["--log-level", "DEBUG", "reenrich", "--platform", "x"], True),
        (["--log-level=INFO", "reenrich"], True),
        (["reenrich", "--help"], False),
        (["run", "--source", "mock"], False),
        (["status"], False),
        ([], False),
        (["--log-level", "reenrich"], False),  # "reenrich" is the option's value here, not the command
    ],
)
def test_only_a_reenrich_forks_its_workers_at_start(args, forks):
    assert wanted(args) is (forks and (os.cpu_count() or 1) > 1)


def test_etl_py_reenrich_decides_as_in_process_scoring_and_leaves_no_worker(run_etl, db):
    from etl.enrich import SentimentEnricher
    from etl.reenrich import reenrich
    from etl.run.stats import RunStats

    _archive(db, 2400)
    mark = f"TEST_PREFORK_MARK={uuid.uuid4()}"
    name, value = mark.split("=")
    done = run_etl("reenrich", env={name: value, "ETL_LOG_LEVEL": "INFO", "SENTIMENT_THRESHOLD": "0.3"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 2400," in done.stdout
    preforked = "scoring with the" in done.stderr and "workers forked as etl.py started" in done.stderr
    assert preforked is ((os.cpu_count() or 1) > 1), done.stderr[-3000:]
    assert _marked(mark) == [], "a scoring worker outlived etl.py"
    by_workers = query(db.dsn, DECIDED)
    assert all(row[7] for row in by_workers) and {row[1] for row in by_workers} >= {"positive", "negative"}
    assert {row[1] for row in by_workers if row[2] == 0.112121} == {"neutral"}  # at 0.3 (positive at 0.05)
    assert {row[4] for row in by_workers} >= {"de", "fr"}  # the language model was used

    _unscore(db)
    reenrich(db, SentimentEnricher(0.3), RunStats(), workers=1)  # scored in this process alone
    assert query(db.dsn, DECIDED) == by_workers


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["reenrich"], {}, 0),
        (["reenrich", "--since", "not a date"], {}, 2),
        (["reenrich"], {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none?connect_timeout=2"}, 2),
    ],
    ids=["nothing to score", "usage error", "database unreachable"],
)
def test_a_reenrich_with_nothing_to_score_or_an_error_leaves_no_worker_and_no_traceback(run_etl, db, args, env, code):
    mark = f"TEST_PREFORK_MARK={uuid.uuid4()}"
    name, value = mark.split("=")
    done = run_etl(*args, env={name: value, **env})
    assert done.returncode == code, done.stderr[-3000:]
    assert "workers forked as etl.py started" not in done.stderr
    # The workers nothing took are killed as the process leaves, quietly: no "Exception ignored in atexit".
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert _marked(mark) == []


def _burn(seconds: float) -> int:
    """A task that takes `seconds` of CPU; the pid of the worker that ran it."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()


def test_every_worker_is_reaped_so_that_its_cpu_counts_in_the_main_process():
    import resource

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    before = children_cpu()
    workers = _started_workers()
    pool = prefork.take(0.05, True, 2)
    assert pool is not None
    ran = {future.result() for future in [pool.submit(_burn, 0.5), pool.submit(_burn, 0.5)]}
    assert ran == set(workers)  # one task each
    pool.shutdown()
    assert still_alive(workers, 1) == []
    # The first worker reaps the second before it leaves (the bench's CPU and peak RSS of the workers read these).
    assert children_cpu() - before >= 0.9


def _warn(what: str) -> str:
    import logging

    logging.getLogger("etl.language").warning("a worker's warning about %s", what)
    return what


def test_a_workers_log_records_are_logged_by_the_main_process(caplog):
    # Forked before etl.py reads its settings (level, JSON, the log file, redaction): the main process logs them.
    workers = _started_workers()
    pool = prefork.take(0.05, True, 2)
    assert pool is not None
    assert pool.submit(_warn, "its model").result() == "its model"
    pool.shutdown()
    assert "a worker's warning about its model (scoring worker)" in caplog.text
    assert [r.name for r in caplog.records if "scoring worker" in r.getMessage()] == ["etl.language"]
    assert still_alive(workers, 1) == []


def test_a_task_that_cannot_be_sent_fails_alone():
    workers = _started_workers()
    pool = prefork.take(0.05, True, 2)
    assert pool is not None
    unsendable = pool.submit(_burn, lambda: 1)  # a lambda does not pickle
    assert isinstance(unsendable.exception(timeout=60), Exception)
    assert pool.submit(_burn, 0.01).result(timeout=60) in workers  # the pool goes on
    pool.shutdown()
    assert still_alive(workers, 1) == []


def _started_workers() -> list[int]:
    """prefork.start(2) in this process; the pids of its workers once the first has forked the second."""
    prefork.start(2)
    assert prefork._started is not None
    first = prefork._started.pid
    deadline = time.monotonic() + 60  # the first worker loads the models, then forks the second
    while not psutil.Process(first).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [first, *(child.pid for child in psutil.Process(first).children())]
    assert len(workers) == 2
    return workers


def test_workers_nothing_took_are_killed_at_once():
    workers = _started_workers()
    prefork.release()
    # At once: not when they notice that their parent is gone (each checks once a second).
    assert still_alive(workers, PARENT_CHECK_SECONDS / 2) == []


@pytest.mark.fault("a scoring worker forked as etl.py reenrich started dies: its batch is scored in the main process")
def test_a_preforked_worker_that_dies_leaves_its_batches_to_the_main_process(db, monkeypatch, caplog):
    from etl import reenrich as module
    from etl.enrich import SentimentEnricher
    from etl.run.stats import RunStats

    _archive(db, 1800)
    monkeypatch.setattr(module, "decide_in_worker", die_in_worker)  # every worker dies on its first task
    workers = _started_workers()
    stats = RunStats()
    module.reenrich(db, SentimentEnricher(), stats, batch_size=500, workers=2)
    assert stats.fetched == 1800 and not stats.interrupted
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment_version IS NULL") == [(0,)]
    assert "scoring worker failed" in caplog.text and "ended unexpectedly" in caplog.text
    assert prefork._started is None
    assert still_alive(workers, 10) == []


def test_preforked_workers_end_when_etl_py_is_killed_outright(tmp_path):
    # A process that forks its workers as etl.py does for a reenrich, prints their pids once both are there,
    # then dies by SIGKILL.
    code = (
        "import os, signal, time, psutil\n"
        "from etl import prefork\n"
        "prefork.start(2)\n"
        "first = prefork._started.pid\n"
        "while not psutil.Process(first).children(): time.sleep(0.05)\n"
        "print(first, *(c.pid for c in psutil.Process(first).children()), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert outliving_a_killed_parent(tmp_path, code, 2) == [], "preforked scoring workers outlived their killed parent"
