"""The commands that are not runs (reenrich, verify, export, copy-store) hold their lock and the archive's shared
(a forget waits for them) on a connection of its own. That connection can be lost (a restart, a terminated backend,
a network cut), and the server then frees the locks: a second copy-store, or a forget, could start under the
command. Their locks are now watched as a run's are (LockWatch): taken again when nothing could have come in
meanwhile, else the command stops as on SIGTERM and is recorded interrupted, saying why. Real PostgreSQL."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest

from etl import copystore
from etl.db import Ledger
from etl.db import ledger as ledger_module
from etl.errors import ExitCode
from etl.run.stats import RunStats
from etl.verify import MAX_PROBLEMS_KEPT, VerifyStats
from tests.conftest import query
from tests.support import ADVISORY, ARCHIVE_LOCK, bucket_env, media_rows, s3_client


def unit_lock(unit: str) -> str:
    return f"SELECT pg_advisory_lock(hashtext('social-archiver:source'), hashtext('{unit}'))"


def wait_for(condition, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


@pytest.fixture
def quick_watch(monkeypatch):
    monkeypatch.setattr(ledger_module, "LOCK_CHECK_SECONDS", 0.2)


@pytest.fixture
def other(db):
    """Another session: the second command, or the forget, that comes in while the locks are free."""
    conn = psycopg2.connect(db.dsn)
    conn.autocommit = True
    yield conn
    conn.close()


def lose_locks(other, meanwhile: str = "") -> int:
    """End the backend of the one session holding advisory locks, and in the same round trip do `meanwhile`; the
    pid ended. pg_terminate_backend without a timeout returns once the signal is sent, so a lock `meanwhile` asks
    for is queued while the backend dies and granted before the watch can take it again (waiting for the end, the
    watch could win that race, and a blocking pg_advisory_lock would then wait for the command: a hang)."""
    with other.cursor() as cur:
        cur.execute(ADVISORY)
        [pid] = {row[0] for row in cur.fetchall()}
        cur.execute(f"SELECT pg_terminate_backend(%s); {meanwhile}", (pid,))
    return pid


MEANWHILE = {  # what another session does the moment the lost connection's locks are free; what the record says
    "unit": (unit_lock("reenrich *"), "reenrich * is now held by another run"),
    "forget": (f"SELECT pg_advisory_lock({ARCHIVE_LOCK})", "a forget holds the archive now"),
    "forgotten": (
        f"SELECT pg_advisory_lock({ARCHIVE_LOCK}); INSERT INTO forgotten_posts (platform, post_id, forgotten_at)"
        f" VALUES ('mock', 'gone', clock_timestamp()); SELECT pg_advisory_unlock({ARCHIVE_LOCK})",
        "posts were forgotten while it held no lock",
    ),
}


@pytest.mark.fault("a command's lock connection is lost and another takes its lock or a forget the archive: it stops, recorded interrupted")
@pytest.mark.parametrize("meanwhile", list(MEANWHILE))
def test_a_command_whose_lock_is_taken_while_lost_stops_saying_why(db, other, quick_watch, meanwhile):
    """Before, a reenrich (or verify, export, copy-store) never noticed: it went on with a second one of its kind, or
    a forget, running under it."""
    sql, said = MEANWHILE[meanwhile]
    stats, stop = RunStats(), threading.Event()
    with Ledger(db).locked_recording("reenrich", "reenrich *", ["*"], {}, stats, busy="reenrich * is running", stop=stop):
        pid = lose_locks(other, sql)
        assert wait_for(stop.is_set), "the command was not told that its locks were lost"
    why = f"the lock connection (backend pid {pid}) was lost"
    assert stats.status == "interrupted" and stats.exit_code == ExitCode.PARTIAL
    assert any(why in e and said in e and "the next reenrich carries on from there" in e for e in stats.errors), stats.errors
    [(status, summary)] = query(db.dsn, "SELECT status, error_summary FROM etl_runs")
    assert status == "interrupted" and why in summary and said in summary, summary
    assert {row[0] for row in query(db.dsn, ADVISORY)} <= {other.get_backend_pid()}  # nothing of ours left held


@pytest.mark.fault("a command's lock connection is lost, its locks still free: taken again on a new connection, it goes on")
def test_a_command_whose_lock_connection_is_lost_takes_its_locks_again(db, other, quick_watch, caplog):
    stats, stop = RunStats(), threading.Event()
    with Ledger(db).locked_recording("verify", "verify *", ["*"], {}, stats, busy="verify * is running", stop=stop):
        before = sorted(row[1:] for row in query(db.dsn, ADVISORY))
        pid = lose_locks(other)
        assert wait_for(lambda: {row[0] for row in query(db.dsn, ADVISORY)} - {pid})
        after = query(db.dsn, ADVISORY)
    assert len(before) == 2  # its own lock, and the archive's shared
    assert sorted(row[1:] for row in after) == before and pid not in {row[0] for row in after}
    assert not stop.is_set() and stats.status == "ok", stats.errors
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("ok",)]
    assert any("held again on a new connection" in r.getMessage() for r in caplog.records)
    assert query(db.dsn, ADVISORY) == []


@pytest.mark.fault("a command whose lock connection was lost in its last seconds (before the watch's next check): not recorded ok")
def test_a_command_shorter_than_the_watch_is_checked_as_it_ends(db, other, monkeypatch):
    monkeypatch.setattr(ledger_module, "LOCK_CHECK_SECONDS", 60.0)  # the watch never checks in this test's time
    stats, stop = RunStats(), threading.Event()
    with Ledger(db).locked_recording("export", "export lake", ["export lake"], {}, stats, busy="busy", stop=stop):
        pid = lose_locks(other, unit_lock("export lake"))
    assert stats.status == "interrupted", stats.errors
    assert any(f"backend pid {pid}) was found lost as the run ended" in e and "export lake is now held" in e for e in stats.errors)
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("interrupted",)]


@pytest.mark.e2e
@pytest.mark.fault("copy-store's lock connection is lost mid-copy and a second copy-store takes its lock: it copies nothing more")
def test_a_copy_store_whose_lock_is_taken_while_lost_copies_nothing_more(db, run_etl, moto_endpoint, make_settings, other, quick_watch, monkeypatch):
    assert run_etl("run", "--source", "mock").returncode == ExitCode.OK
    total = len(media_rows(db.dsn))
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="lost-lock-archive")
    env = bucket_env(moto_endpoint, "lost-lock-archive")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):  # boto3 reads these
        monkeypatch.setenv(name, env[name])
    settings = make_settings(DATABASE_URL=db.dsn, ETL_BATCH_SIZE="5", **env)
    stop, seen = threading.Event(), {}
    record = copystore._record

    def record_then_lose(dbx, done):
        record(dbx, done)
        if "pid" not in seen:  # after the first page: the lock connection dies, a second copy-store takes the lock
            seen["pid"] = lose_locks(other, unit_lock("copy-store"))
            seen["noticed"] = wait_for(stop.is_set)

    monkeypatch.setattr(copystore, "_record", record_then_lose)
    result = copystore.copy_store(settings, {}, stop)
    assert seen["noticed"] and total > 10
    assert result.status == "interrupted" and result.exit_code == ExitCode.PARTIAL
    assert result.copied == 5 and len(client.list_objects_v2(Bucket="lost-lock-archive").get("Contents", [])) == 5
    assert any(f"backend pid {seen['pid']}) was lost" in e and "copy-store is now held by another run" in e for e in result.errors)
    [(status, summary)] = query(db.dsn, "SELECT status, error_summary FROM etl_runs WHERE mode = 'copy-store'")
    assert status == "interrupted" and "copy-store is now held by another run" in summary


def test_the_watch_is_never_inside_libpq_while_scoring_workers_are_forked(db, quick_watch, monkeypatch):
    """reenrich forks its scoring workers once it has work when etl.py could not fork them as it started
    (etl/ahead.py's fork_scorers): a fork must copy no lock a thread holds inside a C library at that moment, so every
    thread in libpq holds the fork gate (FORKING) meanwhile. The watch's check does too: a fork waits for it."""
    from etl.ahead import FORKING

    monkeypatch.setattr(ledger_module, "CHECK_SQL", "SELECT statement_timestamp() FROM pg_sleep(0.3)")
    stop = threading.Event()
    with Ledger(db).locked_recording("reenrich", "reenrich *", ["*"], {}, RunStats(), busy="busy", stop=stop):
        assert wait_for(FORKING.busy, 5), "the watch's check runs outside the fork gate"
        with FORKING.forking():  # a fork now: the check under way has ended, and none starts until it is done
            assert not FORKING.busy()
            time.sleep(0.4)
            assert not FORKING.busy()
    assert not stop.is_set()


# -- found by a hostile review of the above ---------------------------------------------------------------


@pytest.mark.fault("a lost lock stopped the command, then cron's one SIGTERM comes: taken as the first, not the second")
def test_one_sigterm_after_a_lost_lock_is_the_first_not_the_second(db, other, quick_watch, monkeypatch):
    """The watch sets the command's stop, the event the SIGTERM handler read as "a SIGTERM came already": cron's
    single SIGTERM then ended the process at once (os._exit), its etl_runs row left running, no reason, no summary."""
    from etl import cli

    exits: list[int] = []
    monkeypatch.setattr(cli, "exit_now", exits.append)  # os._exit would end pytest
    stop, stats = threading.Event(), RunStats()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli._on_sigterm(stop)  # as _dispatch does, before the command
        with Ledger(db).locked_recording("reenrich", "reenrich *", ["*"], {}, stats, busy="busy", stop=stop):
            lose_locks(other, unit_lock("reenrich *"))
            assert wait_for(stop.is_set), "setup: the watch did not notice the loss"
            os.kill(os.getpid(), signal.SIGTERM)  # the only SIGTERM the process gets
            time.sleep(0.3)
        assert exits == []
        os.kill(os.getpid(), signal.SIGTERM)  # a second one does end it at once
        time.sleep(0.3)
        assert exits == [ExitCode.PARTIAL]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("interrupted",)]


@pytest.mark.fault("a command with 60 errors of its own loses its locks: etl_runs still says why it stopped, first")
def test_why_a_command_stopped_leads_its_errors_whatever_came_before(db, other, quick_watch):
    """etl_runs keeps the first 50 errors and its error_summary names the first: the reason, appended last, was lost."""
    stats, stop = RunStats(), threading.Event()
    with Ledger(db).locked_recording("reenrich", "reenrich *", ["*"], {}, stats, busy="busy", stop=stop):
        for i in range(60):
            stats.error(f"post {i}: could not be scored")
        pid = lose_locks(other, unit_lock("reenrich *"))
        assert wait_for(stop.is_set)
    [(status, errors, summary)] = query(db.dsn, "SELECT status, errors, error_summary FROM etl_runs")
    assert status == "interrupted" and f"backend pid {pid}) was lost" in summary, summary
    assert summary.startswith("61 error(s); first: the lock connection") and len(errors) == 50, summary
    assert errors[1] == "post 0: could not be scored"


@pytest.mark.fault("a verify with 200 problems kept loses its locks: the reason is kept, first, and counted in etl_runs")
@pytest.mark.parametrize("problems", [0, MAX_PROBLEMS_KEPT])
def test_a_verify_stopped_by_a_lost_lock_says_why_and_counts_it(db, other, quick_watch, problems):
    """VerifyStats counted only failed objects (error_summary "0 error(s); first: ...") and dropped any message past
    the 200 it keeps, the reason of the stop with them."""
    stats, stop = VerifyStats(), threading.Event()
    with Ledger(db).locked_recording("verify", "verify *", ["*"], {}, stats, busy="busy", stop=stop):
        for i in range(problems):
            stats.missing += 1
            stats.problem(f"missing: mock/{i} image 0: the object is missing")
        lose_locks(other, unit_lock("verify *"))
        assert wait_for(stop.is_set)
    assert stats.status == "interrupted" and "was lost" in stats.problems[0]
    assert len(stats.problems) == min(problems + 1, MAX_PROBLEMS_KEPT)
    [(summary,)] = query(db.dsn, "SELECT error_summary FROM etl_runs")
    assert summary.startswith(f"{problems + 1} error(s); first: the lock connection"), summary


@pytest.mark.fault("the lock connection is lost as a loader waits at the fence and scoring workers are forked: no deadlock")
def test_a_fork_while_a_loader_waits_at_the_fence_does_not_stop_the_run(db, other, quick_watch):
    """A loader holds the fork gate for a whole load and waits at the fence while the locks are taken again; a fork
    waits for the loader; the retake took the gate too and waited for the fork: nothing moved until the fence gave
    up (ETL_DB_RECONNECT_SECONDS + 30 s) and the run stopped for nothing. The retake holds no gate now."""
    from etl.ahead import FORKING
    from etl.db.ledger import LockWatch
    from etl.errors import LocksLost

    db.reconnect_seconds = 0.5  # the fence then waits 30.5 s at most
    ledger = Ledger(db)
    conn, locked = ledger.lock_units(["listsrc"])
    assert locked == []
    lost: list[str] = []
    watch = LockWatch(ledger, conn, ["listsrc"], on_lost=lost.append)

    def fork() -> None:
        with FORKING.forking():  # score_ahead -> fork_scorers
            pass

    class Noticed(threading.Event):
        def clear(self) -> None:  # the watch has just noticed the loss: the scoring workers are forked now
            super().clear()
            threading.Thread(target=fork, daemon=True).start()
            assert wait_for(lambda: FORKING._forks > 0, 5)

    noticed = Noticed()
    noticed.set()
    watch._held = noticed
    inside, outcome = threading.Event(), []

    def loader() -> None:  # etl/run/archiver.py: FORKING.working() around a load, which calls fence()
        with FORKING.working():
            inside.set()
            assert wait_for(lambda: not noticed.is_set(), 15)
            try:
                watch.fence()
                outcome.append("loaded")
            except LocksLost as exc:
                outcome.append(f"LocksLost: {exc}")

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    assert inside.wait(5)
    try:
        lose_locks(other)  # nothing comes in meanwhile: the locks are free to take again
        thread.join(10)
        stuck = thread.is_alive()
        thread.join(40)
    finally:
        watch.release()
    assert not stuck, f"the loader, the fork and the watch waited for one another: {outcome}"
    assert outcome == ["loaded"] and lost == [], (outcome, lost)
