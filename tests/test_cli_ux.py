"""The command line as a person meets it: help, unknown commands, global options anywhere, progress on a
terminal (a pseudo-terminal) and under cron, titled summaries with one problem count, errors said once."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.cli import build_parser, commands_of
from etl.errors import ExitCode
from etl.sources import REGISTRY
from tests.conftest import ROOT, query
from tests.support import Reply, record, run_in_pty, write_jsonl

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:INFO|WARNING|ERROR)")


def etl(*args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "ETL_DATA_DIR": str(cwd / "data"), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), *args], capture_output=True, text=True, cwd=cwd, env=full, input=input, timeout=120
    )


def pty_env(db, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "DATABASE_URL": db.dsn,
        "ETL_DATA_DIR": str(tmp_path / "data"), "TERM": "xterm", **extra,
    }  # fmt: skip


# -- help -----------------------------------------------------------------------------------------


def test_every_command_documents_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "backfill", "reenrich", "status", "migrate", "check"} <= set(sub.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
        assert "exit codes:" in command.epilog and "examples:" in command.epilog, name


@pytest.mark.parametrize("command", ["run", "backfill", "reenrich", "status", "migrate", "check"])
def test_help_of_a_command_lists_sources_exit_codes_and_examples(tmp_path, command):
    result = etl(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for needle in ("exit codes:", "75", "examples:", f"python etl.py {command}"):
        assert needle in result.stdout, (needle, result.stdout)
    if command in ("run", "backfill"):
        assert all(name in result.stdout for name, cls in REGISTRY.items() if cls.__module__.startswith("etl.sources."))
        assert "--since" in result.stdout if command == "backfill" else "--dry-run" in result.stdout


def test_an_unknown_command_is_named_and_the_commands_listed(tmp_path):
    result = etl("frobnicate", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert "'frobnicate' is not a command" in result.stderr
    for name in commands_of(build_parser()):
        assert name in result.stderr
    assert "unrecognized arguments" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--log-format", "json", "run", "--dry-run", "--source", "mock"],
        ["run", "--log-format", "json", "--dry-run", "--source", "mock"],
        ["run", "--dry-run", "--source", "mock", "--log-format=json"],
        ["--log-level", "INFO", "run", "--log-format", "json", "--dry-run", "--source", "mock"],
    ],
)
def test_global_options_before_or_after_the_command(tmp_path, args):
    result = etl(*args, cwd=tmp_path, env={"MOCK_POSTS": "3"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)  # every log line is JSON


# -- settings that do the wrong thing quietly (issue 10, items 11, 12, 19) ------------------------------


@pytest.mark.badinput("ETL_SOURCES set but empty: exit 2 naming it, nothing run")
def test_empty_etl_sources_is_an_error(tmp_path):
    result = etl("run", "--dry-run", cwd=tmp_path, env={"ETL_SOURCES": " "})
    assert result.returncode == ExitCode.CONFIG
    assert "ETL_SOURCES" in result.stderr and "empty" in result.stderr
    assert "fetched" not in result.stdout


@pytest.mark.badinput("DATABASE_URL set, ETL_SOURCES unset: a bare run is refused, no mock posts written")
def test_no_mock_default_against_a_real_database(run_etl, db):
    result = run_etl()
    assert result.returncode == ExitCode.CONFIG
    assert "ETL_SOURCES" in result.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(0,)]
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(0,)]


def test_misspelled_settings_are_warned_about(tmp_path):
    result = etl("run", "--dry-run", "--source", "mock", cwd=tmp_path, env={"S3_BUKET": "b", "ETL_CONCURENCY": "4", "ETL_SOURCE": "mock", "MOCK_POSTS": "2"})
    assert result.returncode == 0, result.stderr
    assert "S3_BUKET is not a setting of ours (ignored); did you mean S3_BUCKET?" in result.stderr
    assert "did you mean ETL_CONCURRENCY?" in result.stderr and "did you mean ETL_SOURCES?" in result.stderr


@pytest.mark.badinput("a .env line that cannot be parsed: warned with the file name and line number")
def test_a_bad_dotenv_line_names_the_file_and_line(tmp_path):
    (tmp_path / ".env").write_text("MOCK_POSTS=2\nthis is not a setting\nETL_LOG_LEVEL=INFO\n")
    result = etl("run", "--dry-run", "--source", "mock", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ".env, line 2: cannot parse this line" in result.stderr
    assert "fetched 2" in result.stdout  # the good lines still apply


@pytest.mark.badinput("a .env not saved as UTF-8 (Latin-1): exit 2 naming the file and line, no traceback")
def test_a_dotenv_not_in_utf8_names_the_file_and_line(tmp_path):
    (tmp_path / ".env").write_bytes("MOCK_POSTS=2\nS3_PREFIX=caf\xe9/\n".encode("latin-1"))
    result = etl("run", "--dry-run", "--source", "mock", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG and "Traceback" not in result.stderr, result.stderr
    assert ".env, line 2: not UTF-8 (byte 0xe9)" in result.stderr


@pytest.mark.badinput("unwritable ETL_METRICS_PATH or ETL_LOG_FILE: exit 2 naming it before any work, no traceback")
@pytest.mark.parametrize("name", ["ETL_METRICS_PATH", "ETL_LOG_FILE"])
@pytest.mark.parametrize("command", ["run", "verify"])
def test_unwritable_output_paths_are_refused_at_start(run_etl, db, tmp_path, name, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ("run", "--source", "mock") if command == "run" else ("verify",)
    result = run_etl(*args, env={name: str(blocker / "out.txt"), "MOCK_POSTS": "2"})
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert name in result.stderr and "Traceback" not in result.stderr
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(0,)]  # refused before the run started


@pytest.mark.badinput("a DATABASE_URL libpq cannot read (?sslmod=require): exit 2 naming DATABASE_URL, no traceback")
@pytest.mark.parametrize("command", [("run", "--source", "mock"), ("status",), ("migrate",)])
def test_a_database_url_libpq_cannot_read_names_the_setting(run_etl, db, command):
    bad = db.dsn + ("&" if "?" in db.dsn else "?") + "sslmod=require"
    result = run_etl(*command, env={"DATABASE_URL": bad})
    assert result.returncode == ExitCode.CONFIG and "Traceback" not in result.stderr, result.stderr
    assert "DATABASE_URL: PostgreSQL's client cannot read" in result.stderr and "sslmod" in result.stderr


@pytest.mark.badinput("numbers too large to use (ETL_OVERLAP_MINUTES 2e9, status --runs 1e20): exit 2 naming them")
def test_numbers_too_large_are_refused_by_name(run_etl, db):
    overlap = run_etl("run", "--source", "mock", env={"MOCK_POSTS": "2", "ETL_OVERLAP_MINUTES": "2000000000"})
    assert overlap.returncode == ExitCode.CONFIG and "ETL_OVERLAP_MINUTES" in overlap.stderr, overlap.stderr
    runs = run_etl("status", "--runs", "99999999999999999999")
    assert runs.returncode == ExitCode.CONFIG and "from 1 to 1,000,000" in runs.stderr, runs.stderr
    assert "Traceback" not in overlap.stderr + runs.stderr


# -- summaries -----------------------------------------------------------------------------------


def test_one_problem_count_everywhere_and_where_the_list_is(run_etl, db, tmp_path):
    lines = [record(post_id="good")] + ["{not json"] * 236
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    result = run_etl("run", "--source", "jsonl", "--input", str(path), env={"ETL_LOG_FILE": str(tmp_path / "etl.log")})
    assert result.returncode == ExitCode.PARTIAL
    assert "Run of jsonl: partial" in result.stdout
    assert "problems 236 (the first 10 below; every one is logged in " + str(tmp_path / "etl.log") in result.stdout
    assert "etl_runs.errors of run 1" in result.stdout
    (summary,) = query(db.dsn, "SELECT error_summary FROM etl_runs")
    assert summary[0].startswith("236 error(s)")
    assert (tmp_path / "etl.log").read_text().count("not valid JSON") == 236


def test_a_backfill_summary_is_titled_as_one(run_etl):
    result = run_etl("backfill", "--source", "mock", "--since", "2026-01-01", "--until", "2026-01-03", env={"MOCK_POSTS": "3"})
    assert result.returncode == 0, result.stderr
    assert "Backfill of mock, 2026-01-01 00:00 to 2026-01-03 00:00: ok" in result.stdout
    assert "Archive run" not in result.stdout


# -- a terminal ----------------------------------------------------------------------------------


def test_progress_on_a_terminal_never_shares_a_line_with_a_log_line(db, tmp_path):
    # Lines trickle in over ~3 s; every fourth is bad, so WARNING lines are logged while the bar is shown.
    feed = [
        (b"{broken\n" if n % 4 == 3 else (json.dumps(record(post_id=f"p{n}")) + "\n").encode()) for n in range(24)
    ]
    code, output = run_in_pty(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", "-"],
        env=pty_env(db, tmp_path), cwd=tmp_path, feed=feed, delay=0.12,
    )  # fmt: skip
    assert code == ExitCode.PARTIAL, output
    assert re.search(r"Run of jsonl: \d+ posts fetched \[[^]]+\], images \d+ stored, \d+ in flight, \d+ failed", output), output  # the live display was drawn
    assert "in flight" in output
    starts = [m.start() for m in LOG_LINE.finditer(output)]
    assert len(starts) >= 6
    for start in starts:
        assert start == 0 or output[start - 1] in "\n\r", repr(output[max(0, start - 80) : start + 40])
    assert "Run of jsonl: partial" in output and "fetched 18, inserted 18" in output, output[-1500:]


def test_an_error_is_said_once_on_a_terminal(db, tmp_path):
    code, output = run_in_pty(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", str(tmp_path / "missing.jsonl")],
        env=pty_env(db, tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert code == ExitCode.CONFIG
    assert output.count("missing.jsonl") == 1, output
    assert "error:" in output


def test_without_a_terminal_progress_is_a_log_line_every_few_seconds(db, tmp_path):
    feed = "".join(json.dumps(record(post_id=f"p{n}")) + "\n" for n in range(5))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", "-"],
        env=pty_env(db, tmp_path, ETL_PROGRESS_SECONDS="0.3"), cwd=tmp_path, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    for line in feed.splitlines(keepends=True):
        proc.stdin.write(line)
        proc.stdin.flush()
        time.sleep(0.3)
    out, err = proc.communicate(timeout=120)  # closes stdin: the end of the stream
    assert proc.returncode == 0, err
    progress = [line for line in err.splitlines() if "progress: Run of jsonl:" in line]
    assert len(progress) >= 3, err
    assert re.search(r"\d+ posts fetched \([\d,]+/s\), images 0 stored, 0 in flight, 0 failed, \d+s elapsed", progress[-1])
    assert "\r" not in err  # no bar under cron


def test_a_backfill_on_a_terminal_keeps_log_lines_whole(run_etl, db, tmp_path):
    # The second backfill logs "chunk … already done" for each chunk while its progress is on screen
    # (the old bar and those lines ran into each other on one line).
    args = ["backfill", "--source", "mock", "--since", "2026-01-01", "--until", "2026-01-08"]
    assert run_etl(*args, env={"MOCK_POSTS": "5"}).returncode == 0
    code, output = run_in_pty([sys.executable, str(ROOT / "etl.py"), *args], env=pty_env(db, tmp_path, MOCK_POSTS="5"), cwd=tmp_path)
    assert code == 0, output
    done = [m.start() for m in re.finditer(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO +etl.run.runner: backfill mock: chunk", output)]
    assert len(done) == 7, output
    for start in done:
        assert output[start - 1] in "\n\r", repr(output[max(0, start - 80) : start + 40])
    assert "Backfill of mock, 2026-01-01 00:00 to 2026-01-08 00:00: ok" in output


def test_status_words_attempts_as_tries_and_shows_unchanged(run_etl, tmp_path, http_server):
    http_server.routes["/gone.png"] = Reply(status=404, body=b"gone", content_type="text/plain")
    path = write_jsonl(tmp_path / "in.jsonl", [record(post_id="a", image_urls=[http_server.url("/gone.png")]), record(post_id="b")])
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true"}
    assert run_etl("run", "--source", "jsonl", "--input", str(path), env=env).returncode == ExitCode.PARTIAL
    assert run_etl("run", "--source", "jsonl", "--input", str(path), env=env).returncode == ExitCode.OK  # 404: not fetched again
    status = run_etl("status")
    assert status.returncode == 0, status.stderr
    runs = status.stdout.split("Last runs:")[1].split("Archive per platform:")[0].splitlines()
    header = runs[1].split()
    assert "unchanged" in header
    second = runs[3].split()  # newest first
    assert second[0] == "2" and second[header.index("unchanged")] == "2"  # "started (UTC)" and its date: two words each
    failed = status.stdout.split("Failed images by reason:")[1]
    assert "attempts" in failed and "tried once" in failed and "retried" not in failed


def test_make_run_says_what_it_installs(tmp_path):
    result = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "installing the runtime dependencies of requirements.txt" in result.stdout
    assert "creating the virtual environment" in result.stdout
