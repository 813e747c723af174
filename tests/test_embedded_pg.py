"""The embedded PostgreSQL as cron meets it: killed runs leave no handle behind, root leaves folders alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh folder under the system temp dir (pytest's own are 0700 and would be opened for pgserver)."""
    folder = Path(tempfile.mkdtemp(prefix="archiver-embedded-"))
    folder.chmod(0o755)
    yield folder
    pgdata = next(folder.rglob("postgres"), None)
    if pgdata is not None and (pgdata / "postmaster.pid").exists():
        _stop(pgdata)
    shutil.rmtree(folder, ignore_errors=True)


def _stop(pgdata: Path) -> None:
    from pgserver import _commands

    user = {"user": "pgserver"} if os.geteuid() == 0 else {}
    try:
        _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, **user)
    except Exception:
        pass


def _env(data_dir: Path) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(ROOT)}
    env.update({"ETL_DATA_DIR": str(data_dir), "ETL_SOURCES": "jsonl"})
    if "XDG_RUNTIME_DIR" in os.environ:
        env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
    return env


def _etl(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), *args], env=_env(data_dir), cwd=data_dir.parent,
        input=stdin, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def _postmaster(pgdata: Path) -> int | None:
    """The pid of the data directory's running postmaster, or None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None


def _handles(pgdata: Path) -> list[int]:
    return json.loads((pgdata / ".handle_pids.json").read_text())


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.fault("a run SIGKILLed with the embedded PostgreSQL up: the next run drops its stale handle and stops the server")
def test_a_killed_runs_handle_is_dropped_and_the_server_stopped(base: Path):
    data_dir = base / "data"
    pgdata = data_dir / "postgres"
    # The run reads posts from stdin, which stays open: it waits there, mid-run, with the database up.
    victim = subprocess.Popen(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", "-"],
        env=_env(data_dir), cwd=base, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((pgdata / ".handle_pids.json").exists() and victim.pid in _handles(pgdata)):
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never registered with the embedded server"
        time.sleep(0.1)
    time.sleep(0.5)  # well into the run (migrations, the run ledger)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    victim.stdin.close()
    victim.stderr.close()
    server = _postmaster(pgdata)
    assert server is not None  # what SIGKILL leaves: the server up, the dead pid listed
    assert _handles(pgdata) == [victim.pid]

    result = _etl(data_dir, "run", "--source", "jsonl", "--input", "-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed 1 stale handle(s) of the embedded PostgreSQL (pids {victim.pid}" in result.stderr
    assert _handles(pgdata) == []
    deadline = time.monotonic() + 30
    while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the last run out did not stop the server"
        time.sleep(0.1)


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="pgserver changes permissions only as root")
@pytest.mark.fault("the embedded PostgreSQL started as root: folders above the data get search permission only where needed, with a warning")
def test_as_root_folders_above_the_data_are_opened_only_as_needed(base: Path):
    # pgserver runs PostgreSQL with the pgserver uid and our (root's) groups: the group bits decide here.
    closed = base / "closed"  # 0700: the pgserver user cannot pass
    passable = closed / "passable"  # 0710: it can already
    inner = passable / "inner"  # 0700: it cannot
    inner.mkdir(parents=True)
    closed.chmod(0o700)
    passable.chmod(0o710)
    inner.chmod(0o700)
    data_dir = inner / "data"

    result = _etl(data_dir, "migrate")
    assert result.returncode == 0, result.stderr[-3000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (closed, passable, inner)}
    # pgserver alone makes every one of them 0755 (drwxr-xr-x).
    assert modes == {"closed": 0o710, "passable": 0o710, "inner": 0o710}
    warning = [ln for ln in result.stderr.splitlines() if "added search (x) permission" in ln]
    assert len(warning) == 1, result.stderr[-3000:]
    assert str(closed) in warning[0] and str(inner) in warning[0] and f"{passable}," not in warning[0]

    again = _etl(data_dir, "migrate")  # nothing left to change: no warning
    assert again.returncode == 0, again.stderr[-3000:]
    assert "added search (x) permission" not in again.stderr


_STOPPING = """
import sys, time
from pathlib import Path
from pgserver import postgres_server
real = postgres_server.pg_ctl
def slow(args, **kw):
    if "stop" in args:
        print("stopping", flush=True)
        time.sleep(4)
    return real(args, **kw)
postgres_server.pg_ctl = slow
from etl.db.connection import Database
db = Database.embedded(Path(sys.argv[1]))
print("up", flush=True)
db.close()
"""  # ends: at exit pgserver's cleanup, the last user, stops the server (slowly, to widen the window)

_JOINING = """
import sys, time
from pathlib import Path
import psycopg2
from etl.db.connection import Database
db = Database.embedded(Path(sys.argv[1]))
time.sleep(6)
conn = psycopg2.connect(db.dsn, connect_timeout=3)
with conn.cursor() as cur:
    cur.execute("SELECT 1")
print("joined", flush=True)
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.fault("a command typed in a login shell while cron's last run stops the embedded server: it keeps a server")
def test_a_command_started_while_the_last_run_stops_the_server_keeps_its_server(base: Path, tmp_path: Path):
    # pgserver's lock lived under $XDG_RUNTIME_DIR: cron has none (/tmp/runtime-UID), a login shell has one
    # (/run/user/UID), so the two did not exclude each other and the second joined a server being stopped.
    pgdata = base / "postgres"

    def env(runtime: Path | None) -> dict[str, str]:
        found = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(ROOT),
                 "PYTHONWARNINGS": "ignore"}  # fmt: skip
        return {**found, "XDG_RUNTIME_DIR": str(runtime)} if runtime is not None else found

    stopping = subprocess.Popen([sys.executable, "-c", _STOPPING, str(pgdata)], env=env(None), stdout=subprocess.PIPE, text=True)
    assert stopping.stdout is not None
    try:
        assert stopping.stdout.readline().strip() == "up"
        assert stopping.stdout.readline().strip() == "stopping"  # the last user, stopping the server
        time.sleep(0.5)
        joining = subprocess.run([sys.executable, "-c", _JOINING, str(pgdata)], env=env(tmp_path),
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        stopping.wait(60)
        _stop(pgdata)
    assert "joined" in joining.stdout, joining.stderr[-1500:]
