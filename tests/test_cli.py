"""The command line's argument handling: a bare run, global options, usage errors."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from etl.cli import build_parser, with_default_command
from etl.db import migration_files
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ([], ["run"]),
        (["--source", "mock"], ["run", "--source", "mock"]),
        (["--log-format", "json"], ["--log-format", "json", "run"]),
        (["--log-format=json", "--limit", "3"], ["--log-format=json", "run", "--limit", "3"]),
        (["--log-level", "DEBUG", "--log-format", "json", "--dry-run"], ["--log-level", "DEBUG", "--log-format", "json", "run", "--dry-run"]),
        (["status", "--json"], ["status", "--json"]),
        (["--log-format", "json", "backfill", "--source", "mock", "--since", "2026-01-01"], ["--log-format", "json", "backfill", "--source", "mock", "--since", "2026-01-01"]),
        (["--version"], ["--version"]),
    ],
)
def test_run_is_the_default_command(given, meant):
    assert with_default_command(given) == meant
    if "--version" not in meant:
        build_parser().parse_args(meant)  # and argparse accepts the result


def test_version_and_usage_errors(tmp_path):
    version = subprocess.run([sys.executable, str(ROOT / "etl.py"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and "etl.py" in version.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "etl.py"), "run", "--limit", "x"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "--limit" in bad.stderr
    jsonl = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "", "ETL_DATA_DIR": str(tmp_path / "d")},
    )  # fmt: skip
    assert jsonl.returncode == 2 and "--input" in jsonl.stderr


def test_dry_run_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "--dry-run", "--source", "mock"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "", "ETL_DATA_DIR": str(tmp_path / "d"), "MOCK_POSTS": "7"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Dry run (nothing written)" in result.stdout and "fetched 7" in result.stdout
    assert not (tmp_path / "d").exists()  # no database started, no object stored


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["backfill", "--source", "jsonl", "--since", "2026-01-01"], "--input"),
        (["run", "--source", "jsonl", "--input", "no-such.jsonl"], "no such file"),
        (["backfill", "--source", "mock", "--since", "2026-02-01", "--until", "2026-01-01"], "--until"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), *args],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "", "ETL_DATA_DIR": str(tmp_path / "d")},
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "d").exists()  # no database was started


def test_migrate_reports_the_migrations_it_applied_then_none(pg_dsn, run_etl):
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS migrate_probe")
        cur.execute("CREATE DATABASE migrate_probe")
    try:
        fresh = {"DATABASE_URL": urlunsplit(urlsplit(pg_dsn)._replace(path="/migrate_probe"))}
        first = run_etl("migrate", env=fresh)
        assert first.returncode == 0, first.stderr
        names = [path.name for _, path in migration_files()]
        assert f"{len(names)} migration(s) applied: {', '.join(names)} (" in first.stdout
        again = run_etl("migrate", env=fresh)
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith("0 migration(s) applied (")
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS migrate_probe WITH (FORCE)")
        admin.close()
