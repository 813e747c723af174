"""The commands that are not runs (reenrich, verify, export, copy-store) hold their lock and the archive's shared
(a forget waits for them) on a connection of its own. That connection can be lost (a restart, a terminated backend,
a network cut), and the server then frees the locks: a second copy-store, or a forget, could start under the
command. Their locks are now watched as a run's are (LockWatch): taken again when nothing could have come in
meanwhile, else the command stops as on SIGTERM and is recorded interrupted, saying why. Real PostgreSQL."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from etl import copystore
from etl.db import Ledger
from etl.db import ledger as ledger_module
from etl.errors import ExitCode
from etl.run.stats import RunStats
from tests.conftest import query
from tests.test_copy_store import media, s3_client, s3_env

ADVISORY = (
    "SELECT pid, classid, objid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND pid <> pg_backend_pid()"
)
ARCHIVE_LOCK = "hashtext('social-archiver:archive'), 0"


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
    """End the backend of the one session holding advisory locks, and in the same round trip (queued before the
    dying backend lets them go) do `meanwhile`; the pid ended."""
    with other.cursor() as cur:
        cur.execute(ADVISORY)
        [pid] = {row[0] for row in cur.fetchall()}
        cur.execute(f"SELECT pg_terminate_backend(%s, 5000); {meanwhile}", (pid,))
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
    total = len(media(db.dsn))
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="lost-lock-archive")
    env = s3_env(moto_endpoint, "lost-lock-archive")
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
