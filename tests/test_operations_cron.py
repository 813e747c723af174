"""The cron wrapper's overlap lock (real flock(1) processes) and what the repository keeps out of git."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) from util-linux is not installed")

WRAPPER = ROOT / "scripts" / "cron_run.sh"


def _fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for the venv's python: logs its arguments, then runs `body` (sh)."""
    fake = tmp_path / "fake-python"
    fake.write_text(f'#!/bin/sh\necho "args: $*"\n{body}\n')
    fake.chmod(0o755)
    return fake


def _env(tmp_path: Path, fake: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ETL_PYTHON": str(fake),
        "ETL_CRON_LOG": str(tmp_path / "logs" / "etl.log"),
        "ETL_CRON_LOCK": str(tmp_path / "archiver.lock"),
    }


def _wait_for(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


@pytest.mark.fault("a second cron run while one holds the flock: exits 75 (not 1) with a log line, runs nothing")
def test_the_flock_loser_exits_75_and_says_so(tmp_path: Path):
    release, child = tmp_path / "release", tmp_path / "child.pid"
    # The run leaves a child behind, as a killed run leaves the embedded PostgreSQL: it must not hold the lock.
    fake = _fake_python(
        tmp_path, f'sleep 60 >/dev/null 2>&1 &\necho $! > "{child}"\nwhile [ ! -e "{release}" ]; do sleep 0.05; done'
    )
    env, log = _env(tmp_path, fake), tmp_path / "logs" / "etl.log"
    first = subprocess.Popen([str(WRAPPER), "run"], env=env)
    try:
        _wait_for(log, "args: etl.py run")
        second = subprocess.run([str(WRAPPER), "run"], env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 75
        assert second.stdout == "" and second.stderr == ""
        text = log.read_text()
        assert f"another run holds {tmp_path / 'archiver.lock'} (flock -n): nothing done" in text
        assert text.count("args: etl.py run") == 1  # the loser started nothing
    finally:
        release.touch()
        assert first.wait(30) == 0
    try:
        third = subprocess.run([str(WRAPPER), "run"], env=env, capture_output=True, text=True, timeout=30)
        assert third.returncode == 0  # the lock went with the first run, though its child still runs
        assert log.read_text().count("args: etl.py run") == 2
    finally:
        for pid in child.read_text().split():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_cron_logs_are_kept_out_of_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "logs/" in ignored
    crontab = [ln for ln in (ROOT / "crontab.example").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.endswith("scripts/cron_run.sh run") for ln in crontab)
