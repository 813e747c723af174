"""Shared fixtures: a real PostgreSQL for the whole session, a clean schema per test, settings, HTTP server."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from etl.config import Settings, load_settings
from etl.db import Database
from tests.support import HTTPServerFixture

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
    tmp_path/data, so the local object store is tmp_path/data/objects unless S3_BUCKET is given.
    """
    import subprocess

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 180):
        full = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(tmp_path)),
            "DATABASE_URL": db.dsn,
            "ETL_DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(ROOT),
        }
        full.update(env or {})
        return subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), *args],
            env=full, cwd=tmp_path, input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    return run


# -- the README's Reliability section, written from this run's own results ------------------------------

_RELIABILITY: dict[str, list[tuple[str, str, str]]] = {"fault": [], "badinput": []}
README = ROOT / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for kind in _RELIABILITY:
        for description in getattr(report, "_reliability", {}).get(kind, []):
            _RELIABILITY[kind].append((description, report.nodeid, report.outcome))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    report._reliability = {
        kind: [m.args[0] for m in item.iter_markers(kind) if m.args] for kind in _RELIABILITY
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a full, green run of the whole suite, rewrite the README's Reliability section from its results."""
    opts = session.config.option
    whole = not opts.keyword and not opts.markexpr and not getattr(opts, "lf", False) and session.testsfailed == 0
    whole = whole and [Path(a).resolve() for a in session.config.args] in ([ROOT / "tests"], [ROOT])
    if not whole or exitstatus != 0 or not _RELIABILITY["fault"] or not README.is_file():
        return
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return
    lines = [START, ""]
    for kind, title, verb in (
        ("fault", "Faults injected", "survived"),
        ("badinput", "Bad inputs tried", "refused per item while the rest loaded"),
    ):
        rows = _RELIABILITY[kind]
        passed = sum(1 for _, _, outcome in rows if outcome == "passed")
        groups: dict[str, list[tuple[str, str]]] = {}
        for description, nodeid, outcome in rows:
            groups.setdefault(description, []).append((nodeid.split("::")[0], outcome))
        lines.append(f"**{title}: {len(rows)} cases in {len(groups)} kinds; {verb}: {passed}.**")
        lines.append("")
        for description in sorted(groups):
            cases = groups[description]
            ok = sum(1 for _, outcome in cases if outcome == "passed")
            files = ", ".join(sorted({f"`{path}`" for path, _ in cases}))
            count = f"{ok}/{len(cases)} cases ok" if len(cases) > 1 else ("ok" if ok else "FAILED")
            lines.append(f"- {description} ({count}; {files})")
        lines.append("")
    lines.append(
        f"_Generated by the test run itself (tests/conftest.py) after {session.testscollected} tests passed"
        f" on {sys.platform} with Python {sys.version.split()[0]}; do not edit by hand._"
    )
    lines += ["", END]
    new = text[: text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END) :]
    if new != text:
        README.write_text(new, encoding="utf-8")
