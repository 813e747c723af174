"""Shared fixtures: a real PostgreSQL for the whole session, a clean schema per test, settings, HTTP server."""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from etl.config import Settings, load_settings
from etl.db import Database
from tests.support import BUCKET, FaultProxy, HTTPServerFixture

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("post_media", "social_posts", "etl_runs", "etl_state")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """TEST_DATABASE_URL if set, else an embedded PostgreSQL started once for the session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    # Not under pytest's tmp dir: run as root, pgserver starts postgres as its own user, which cannot
    # enter pytest's 0700 folders. mkdtemp under the system temp dir is reachable.
    server = pgserver.get_server(tempfile.mkdtemp(prefix="archiver-test-pg-"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def migrated(pg_dsn: str) -> str:
    db = Database(pg_dsn, display="test database")
    db.migrate()
    db.close()
    return pg_dsn


@pytest.fixture
def db(migrated: str) -> Iterator[Database]:
    """A migrated database with every table emptied before the test."""
    database = Database(migrated, display="test database")
    with database.transaction() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")
        tables = [row[0] for row in cur.fetchall()]
        cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    yield database
    database.close()


@pytest.fixture
def new_database(pg_dsn):
    """A database holding no archive yet (dropped afterwards)."""
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS new_archive_probe")
        cur.execute("CREATE DATABASE new_archive_probe")
    try:
        yield urlunsplit(urlsplit(pg_dsn)._replace(path="/new_archive_probe"))
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS new_archive_probe WITH (FORCE)")
        admin.close()


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings from a dict of environment variables (nothing read from the real environment or .env)."""

    def build(**env: str) -> Settings:
        base = {"ETL_DATA_DIR": str(tmp_path / "data")}
        base.update(env)
        return load_settings(base, dotenv_path=None)

    return build


@pytest.fixture
def http_server() -> Iterator[HTTPServerFixture]:
    server = HTTPServerFixture()
    yield server
    server.close()


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (boto3 reaches it through AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_s3() -> Iterator[tuple[FaultProxy, object]]:
    """moto's S3 server behind a FaultProxy that can answer instead of it, with BUCKET created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]  # moto keeps the bound werkzeug server here
    # moto's backends live in the process, shared by every server it starts: begin from nothing.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(port)
    yield proxy, client
    proxy.close()
    server.stop()


def query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    conn.close()
    return rows


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def run_etl(db: Database, tmp_path: Path):
    """Run the real `python etl.py ARGS` in a subprocess against the test database; returns CompletedProcess.

    The database is the `db` fixture's (emptied for the test). The working directory is a temporary folder (so no .env of the developer's is read); ETL_DATA_DIR is
    tmp_path/data, so the local object store is tmp_path/data/objects unless S3_BUCKET is given. `wrapper`: a script
    (and its arguments) that runs etl.py, given as its first argument.
    """
    import subprocess

    def run(
        *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 180,
        wrapper: tuple[str, ...] = (),
    ):  # fmt: skip
        full = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(tmp_path)),
            "DATABASE_URL": db.dsn,
            "ETL_DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(ROOT),
        }
        full.update(env or {})
        return subprocess.run(
            [sys.executable, *wrapper, str(ROOT / "etl.py"), *args],
            env=full, cwd=tmp_path, input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    return run


# -- reliability markers, carried into the junit XML report ------------------------------------------------
# `make test` writes .test-report.xml; scripts/reliability_readme.py turns it into the README's Reliability section.

RELIABILITY_KINDS = ("fault", "badinput")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Record each fault/badinput marker's description as a test property (junit XML <property>)."""
    for kind in RELIABILITY_KINDS:
        for marker in item.iter_markers(kind):
            if marker.args and (kind, marker.args[0]) not in item.user_properties:
                item.user_properties.append((kind, marker.args[0]))
