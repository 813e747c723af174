"""What a rerun with nothing new costs the database (issue 16: an images rerun in <= 5% of the first run): its
connections and statements, counted by the server itself (pg_stat_database), and that nothing is fetched or written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import query
from tests.support import Reply, png_bytes, record, write_jsonl


def _other_database(dsn: str) -> str:
    """The same server, another database (template1): reading the counts there adds none to the test database's."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = "template1"
    return psycopg2.extensions.make_dsn(**params)


def _counts(dsn: str) -> tuple[int, int]:
    """(sessions opened, transactions committed) of the test database so far, once every session on it has ended
    (a session's counts reach pg_stat_database when it ends). A statement sent on its own is a transaction."""
    name = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    conn = psycopg2.connect(_other_database(dsn))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + 30
            while True:
                cur.execute("SELECT backend_type, application_name FROM pg_stat_activity WHERE datname = %s", (name,))
                left = cur.fetchall()
                if not left:
                    break
                assert time.monotonic() < deadline, f"sessions on the test database did not end: {left}"
                time.sleep(0.05)
            cur.execute("SELECT sessions, xact_commit FROM pg_stat_database WHERE datname = %s", (name,))
            return cur.fetchone()
    finally:
        conn.close()


@pytest.fixture
def no_autovacuum(db):
    """No autovacuum worker starts meanwhile: its transactions would count in the test database's commits (one
    already at work is waited for by _counts, as any session)."""
    conn = psycopg2.connect(_other_database(db.dsn))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET autovacuum = off")
            cur.execute("SELECT pg_reload_conf()")
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET autovacuum")
            cur.execute("SELECT pg_reload_conf()")
        conn.close()


@pytest.fixture
def images_run(run_etl, db, http_server, tmp_path: Path):
    """A file of 6 posts, one image each, served by the local HTTP server; returns (run, its arguments, env)."""
    for n in range(6):
        http_server.routes[f"/img/{n}.png"] = Reply(body=png_bytes(4 + n, 4), content_type="image/png")
    lines = [record(post_id=f"p{n}", image_urls=[http_server.url(f"/img/{n}.png")]) for n in range(6)]
    args = ("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "in.jsonl", lines)))
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true"}
    first = run_etl(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert sum(http_server.hits.values()) == 6
    db.close()  # the fixture's own connection: its counts must not land in the middle of the rerun's
    return run_etl, args, env


def test_an_images_rerun_with_nothing_new_opens_two_connections_and_commits_ten_transactions(
    no_autovacuum, images_run, db, http_server, tmp_path
):
    run_etl, args, env = images_run
    objects = tmp_path / "data" / "objects"
    files = {p: p.stat().st_mtime_ns for p in objects.rglob("*") if p.is_file()}
    runs_before = query(db.dsn, "SELECT count(*) FROM etl_runs")[0][0]  # its own session, counted before the rerun
    sessions, commits = _counts(db.dsn)
    hits = sum(http_server.hits.values())

    rerun = run_etl(*args, env=env)

    assert rerun.returncode == 0, rerun.stderr
    assert "stored 0, already archived 6, failed 0" in rerun.stdout
    sessions_after, commits_after = _counts(db.dsn)
    # The run's connection and the one that holds its lock; the loader's opens only for something to write.
    assert sessions_after - sessions == 2
    # One transaction each: the migration check, the other-store check, the lock, the run's row (dead runs marked
    # abandoned by the same statement), the failed images, the batch's posts and its images, the check that the lock
    # connection still holds the locks (LockWatch.confirm: a run shorter than the watch's interval is never checked
    # otherwise), the run's end, the unlock. (Each session commits one transaction of its own as it starts, hence the sessions taken off.)
    # This counts transactions, not round trips: a BEGIN/COMMIT put back around one of these statements would
    # cost two more round trips and no more transactions, which this server-side count cannot see.
    assert commits_after - commits - (sessions_after - sessions) <= 10
    assert sum(http_server.hits.values()) == hits  # no image fetched
    assert {p: p.stat().st_mtime_ns for p in objects.rglob("*") if p.is_file()} == files  # nothing written
    assert query(db.dsn, "SELECT count(*), min(status) FROM etl_runs") == [(runs_before + 1, "ok")]


def test_an_up_to_date_archive_is_checked_without_waiting_for_the_migration_lock(migrated):
    """Every run checks the migrations first: when none is missing, that is one read, and a migrator holding the
    lock (another run upgrading, a long `etl.py migrate`) does not hold the run up."""
    from etl.db import Database

    holder = psycopg2.connect(migrated)
    holder.autocommit = True
    db = Database(migrated, display="test database")
    result: list[list[str]] = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(72616001)")  # the migration lock (etl/db/connection.py)
        checking = threading.Thread(target=lambda: result.append(db.migrate()), daemon=True)
        checking.start()
        checking.join(10)
        assert not checking.is_alive(), "the check waited for the migration lock"
        assert result == [[]]
    finally:
        holder.close()  # frees the lock: a check that waited for it ends now
        checking.join(10)
        db.close()


def test_a_missing_migration_is_still_applied_under_the_lock(migrated, tmp_path):
    """The quick check sees a migration missing: it is applied, under the lock, and recorded."""
    from etl.db import Database
    from etl.db.connection import migration_files

    version = max(v for v, _ in migration_files()) + 900  # a version no real migration takes
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    for _, path in migration_files():
        (sql_dir / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (sql_dir / f"{version}_probe.sql").write_text("CREATE TABLE rerun_cost_probe (n int);", encoding="utf-8")
    db = Database(migrated, display="test database")
    new_archive: list[bool] = []
    try:
        assert db.migrate(sql_dir, on_new=lambda: new_archive.append(True)) == [f"{version}_probe.sql"]
        assert new_archive == []  # an archive behind by a migration is not a new one
        assert db.migrate(sql_dir) == []
        assert query(migrated, "SELECT count(*) FROM rerun_cost_probe") == [(0,)]
    finally:
        with db.transaction() as cur:
            cur.execute("DROP TABLE IF EXISTS rerun_cost_probe")
            cur.execute("DELETE FROM schema_migrations WHERE version = %s", (version,))
        db.close()
