"""The command line's argument handling: a bare run, global options, usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from etl.cli import build_parser, with_default_command
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
