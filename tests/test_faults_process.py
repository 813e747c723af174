"""Faults around the process and the database: restarts, unreachable server, SIGTERM, SIGKILL, overlapping runs."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import ROOT, query
from tests.support import process_env, start_etl, write_posts

pytestmark = pytest.mark.slow


def base_env(tmp_path: Path, dsn: str, **extra: str) -> dict[str, str]:
    return process_env(tmp_path, dsn, **{"ETL_BATCH_SIZE": "10", "ETL_CONCURRENCY": "4", "ETL_RETRY_MAX_WAIT": "0.2", **extra})


def import_to_completion(tmp_path: Path, env: dict[str, str], posts: Path) -> None:
    """One more, undisturbed import of the same file; it must finish with exit 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", str(posts)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def wait_for_rows(dsn: str, table: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if query(dsn, f"SELECT count(*) FROM {table}")[0][0] >= at_least:  # table names are literals here
                return
        except psycopg2.Error:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{table} never reached {at_least} rows")


def assert_archive_exact(dsn: str, objects: Path, n: int) -> None:
    """n posts, n stored images, every object recorded with its checksum, nothing half-written or orphaned."""
    assert query(dsn, "SELECT count(*), count(DISTINCT post_id) FROM social_posts") == [(n, n)]
    rows = query(dsn, "SELECT storage_key, sha256, status FROM post_media")
    assert len(rows) == n and {r[2] for r in rows} == {"stored"}
    files = {str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file()}
    assert files == {r[0] for r in rows}, "objects on disk must be exactly the recorded ones"
    for key, sha, _ in rows:
        assert hashlib.sha256((objects / key).read_bytes()).hexdigest() == sha


@pytest.mark.fault("PostgreSQL connection cut mid-run (backend terminated): reconnect and go on")
def test_lost_database_connection_mid_run_reconnects(db, tmp_path, http_server):
    posts = write_posts(tmp_path / "in.jsonl", http_server, 60, delay=0.05)
    proc = start_etl(tmp_path, base_env(tmp_path, db.dsn), "run", "--source", "jsonl", "--input", str(posts))
    wait_for_rows(db.dsn, "social_posts", 10)
    killed = query(
        db.dsn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'social-archiver'",
    )[0][0]
    out, err = proc.communicate(timeout=120)
    assert killed >= 1
    assert proc.returncode == 0, err
    assert "reconnecting" in err
    assert_archive_exact(db.dsn, tmp_path / "data" / "objects", 60)


@pytest.mark.fault("PostgreSQL server restarted mid-run: reconnect and go on, nothing lost")
def test_database_server_restart_mid_run(tmp_path, http_server):
    import pgserver
    from pgserver import _commands

    pgdata = Path(tempfile.mkdtemp(prefix="archiver-restart-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    user = {"user": "pgserver"} if os.geteuid() == 0 else {}
    try:
        dsn = server.get_uri()
        posts = write_posts(tmp_path / "in.jsonl", http_server, 60, delay=0.05)
        proc = start_etl(tmp_path, base_env(tmp_path, dsn), "run", "--source", "jsonl", "--input", str(posts))
        wait_for_rows(dsn, "social_posts", 10)
        _commands.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, timeout=60, **user)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert_archive_exact(dsn, tmp_path / "data" / "objects", 60)
        assert query(dsn, "SELECT status FROM etl_runs") == [("ok",)]
    finally:
        # pgserver knows the first postmaster's pid only: the restarted one is stopped here, by its data dir.
        subprocess.run(
            [str(_commands.POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "immediate", "stop"],
            capture_output=True, timeout=60, **user,
        )  # fmt: skip
        server.cleanup()


@pytest.mark.fault("PostgreSQL unreachable at start: exit 2 naming DATABASE_URL, password never shown")
def test_unreachable_database_exits_2_without_the_password(run_etl):
    result = run_etl("run", "--source", "mock", env={"DATABASE_URL": "postgresql://archiver:hunter2-secret@127.0.0.1:9/archive"})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "archiver:***@127.0.0.1:9" in result.stderr


@pytest.mark.fault("SIGTERM mid-run: in-flight batch loaded, run recorded interrupted, exit non-zero")
def test_sigterm_finishes_in_flight_work_and_records_interrupted(db, tmp_path, http_server):
    posts = write_posts(tmp_path / "in.jsonl", http_server, 80, delay=0.1)
    env = base_env(tmp_path, db.dsn)
    proc = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts))
    wait_for_rows(db.dsn, "social_posts", 10)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("interrupted",)]
    loaded = query(db.dsn, "SELECT count(*) FROM social_posts")[0][0]
    assert 10 <= loaded < 80
    # Every loaded post has its image row: stored, or failed (not started, or past the grace, after the SIGTERM)
    # and retried; nothing in between.
    rows = query(db.dsn, "SELECT status, permanent, coalesce(last_error, '') FROM post_media")
    assert len(rows) == loaded
    assert all(s == "stored" or (s == "failed" and not p and "SIGTERM" in e) for s, p, e in rows), rows
    import_to_completion(tmp_path, env, posts)
    assert_archive_exact(db.dsn, tmp_path / "data" / "objects", 80)


@pytest.mark.fault("SIGKILL at a random moment, twice: the next run completes the archive exactly")
def test_sigkill_at_random_moments_then_rerun_completes(db, tmp_path, http_server):
    posts = write_posts(tmp_path / "in.jsonl", http_server, 80, delay=0.03)
    env = base_env(tmp_path, db.dsn)
    rng = random.Random(20261121)
    for _ in range(2):
        proc = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts))
        time.sleep(rng.uniform(0.8, 2.5))
        proc.kill()
        proc.communicate(timeout=30)
    import_to_completion(tmp_path, env, posts)
    assert_archive_exact(db.dsn, tmp_path / "data" / "objects", 80)
    statuses = [r[0] for r in query(db.dsn, "SELECT status FROM etl_runs ORDER BY id")]
    assert statuses[-1] == "ok" and set(statuses[:-1]) <= {"abandoned", "ok"}


@pytest.mark.fault("two runs of the same source at once: one archives, the other exits 75; no duplicates")
def test_two_runs_at_once_on_the_same_source(db, tmp_path, http_server):
    # The first run takes some 6 s (60 images at 0.4 s, 4 at a time): long enough for the second to start
    # inside it even on a loaded machine.
    posts = write_posts(tmp_path / "in.jsonl", http_server, 60, delay=0.4)
    env = base_env(tmp_path, db.dsn)
    first = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts))
    wait_for_rows(db.dsn, "etl_runs", 1)
    second = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts))
    out2, err2 = second.communicate(timeout=60)
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 75, err2
    assert "another run" in err2
    assert_archive_exact(db.dsn, tmp_path / "data" / "objects", 60)


@pytest.mark.fault("two runs of different sources at once: both finish, no deadlock")
def test_two_runs_of_different_sources_at_once(db, tmp_path, http_server):
    posts = write_posts(tmp_path / "in.jsonl", http_server, 30, delay=0.02)
    env = base_env(tmp_path, db.dsn, MOCK_POSTS="30")
    procs = [
        start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts)),
        start_etl(tmp_path, env, "run", "--source", "mock"),
    ]
    results = []
    for proc in procs:
        threading.Event().wait(0)  # both already started
        results.append(proc.communicate(timeout=120))
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert query(db.dsn, "SELECT platform, count(*) FROM social_posts GROUP BY 1 ORDER BY 1") == [("fixture", 30), ("mock", 30)]
