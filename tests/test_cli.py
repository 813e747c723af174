"""The command line's argument handling: a bare run, global options, usage errors."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from etl.cli import COMMANDS, build_parser, commands_of, with_default_command
from etl.cli_args import quick_run_args
from etl.db import migration_files
from etl.errors import UsageError
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


def test_migrate_reports_the_migrations_it_applied_then_none(new_database, run_etl):
    fresh = {"DATABASE_URL": new_database}
    first = run_etl("migrate", env=fresh)
    assert first.returncode == 0, first.stderr
    names = [path.name for _, path in migration_files()]
    assert f"{len(names)} migration(s) applied: {', '.join(names)} (" in first.stdout
    again = run_etl("migrate", env=fresh)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 migration(s) applied (")


# -- a plain run's arguments, read without argparse (etl/cli_args.py, issue 16) ----------------------

QUICK = [
    ["run"],
    ["run", "--source", "jsonl", "--input", "posts.jsonl"],
    ["run", "--source", "jsonl", "--input", "-"],
    ["--log-format", "json", "run", "--dry-run", "--source", "mock", "--source=youtube"],
    ["--log-level=DEBUG", "run", "--limit", "5", "--shard", "2/4", "--log-format", "text", "--log-level", "ERROR"],
    ["run", "--limit=-3", "--input=--odd", "--source", "run"],
]
ARGPARSE_ONLY = [
    ["run", "--help"], ["run", "-h"], ["--help"], ["--version"], ["status"], ["backfill", "--source", "mock", "--since", "2026-01-01"],
    ["run", "--sou", "mock"], ["run", "--limit", "x"], ["run", "--limit", "-3"], ["run", "--shard", "5/4"], ["run", "--dry-run=1"],
    ["run", "--source"], ["run", "--source", "--dry-run"], ["run", "--source="], ["run", "--", "x"], ["run", "stray"],
    ["--log-format", "xml", "run"], ["run", "--input", "-5"], ["run", "run"],
]  # fmt: skip


def _argparse_answer(args):
    try:
        return list(vars(build_parser().parse_args(args)).items())
    except SystemExit:
        return "an error or help"


@pytest.mark.parametrize("args", QUICK)
def test_a_plain_run_is_read_without_argparse_as_argparse_reads_it(args):
    quick = quick_run_args(args)
    assert quick is not None, args
    assert list(vars(quick).items()) == _argparse_answer(args)  # the same attributes, values and order


@pytest.mark.badinput("a run option abbreviated, misspelled, without its value or with a bad one")
@pytest.mark.parametrize("args", ARGPARSE_ONLY)
def test_anything_but_a_certain_run_is_left_to_argparse(args):
    assert quick_run_args(args) is None


def test_the_quick_reading_agrees_with_argparse_on_many_command_lines(capsys):
    """Random command lines from run words, tricky ones among them: each read quickly is read as argparse reads it."""
    words = [
        "run", "--source", "jsonl", "--source=mock", "--limit", "5", "--limit=-3", "x", "--dry-run", "--dry-run=1", "--input",
        "-", "--input=p.jsonl", "--shard", "2/4", "--shard=9/4", " 1 / 2 ", "--log-format", "json", "--log-format=text",
        "--log-level", "DEBUG", "--log-level=info", "--sou", "-h", "--", "", "--source=", "-5", "--limit= 7", "backfill", "--lim",
    ]  # fmt: skip
    rng = random.Random(16)
    read = 0
    for _ in range(3000):
        try:
            args = with_default_command([rng.choice(words) for _ in range(rng.randint(0, 7))])
        except UsageError:
            continue  # not a command where one goes: main() answers before any parsing
        quick = quick_run_args(args)
        if quick is not None:
            read += 1
            assert list(vars(quick).items()) == _argparse_answer(args), args
    assert read > 300  # the quick path was taken often enough to mean something
    capsys.readouterr()


def test_the_command_list_is_the_parsers_own():
    """with_default_command and the one-command parser use COMMANDS: it must be what the full parser knows, in order."""
    assert commands_of(build_parser()) == COMMANDS
