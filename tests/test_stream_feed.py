"""Feeding a stream (README "Feeding a stream"): a consumer process writes messages slowly into
`etl.py run --source jsonl --input -`; a partial last line is reported by its line number and the rest
archived; the same messages fed again archive nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.errors import ExitCode
from tests.conftest import ROOT, query
from tests.support import Reply, png_bytes, record

# A stand-in for `kcat -C -t posts -e`: prints the file's lines one by one, slowly, then exits.
CONSUMER = "import sys, time\nfor line in open(sys.argv[1], 'rb'):\n    sys.stdout.buffer.write(line); sys.stdout.flush(); time.sleep(0.05)\n"


def pipe(messages: Path, tmp_path: Path, db) -> subprocess.CompletedProcess:
    """`python consumer.py MESSAGES | python etl.py run --source jsonl --input -`, two real processes."""
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "DATABASE_URL": db.dsn,
        "ETL_DATA_DIR": str(tmp_path / "data"), "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_BATCH_SIZE": "4",
    }  # fmt: skip
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(messages)], stdout=subprocess.PIPE)
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", "-"],
            stdin=consumer.stdout, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        assert consumer.stdout is not None
        consumer.stdout.close()
        consumer.wait(30)
    return result


def stored_objects(tmp_path: Path) -> dict[str, float]:
    root = tmp_path / "data" / "objects"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts}


@pytest.mark.badinput("a stream cut mid-message (partial last line): reported by line number, the rest archived")
def test_a_slow_stream_with_a_partial_last_line_then_a_rerun(db, tmp_path, http_server):
    for n in range(10):
        http_server.routes[f"/{n}.png"] = Reply(body=png_bytes(8 + n, 6))
    messages = [
        json.dumps(record(post_id=f"m{n}", caption=f"message {n} is lovely", image_urls=[http_server.url(f"/{n}.png")]))
        for n in range(10)
    ]
    cut = tmp_path / "cut.jsonl"  # the consumer was stopped while writing message 10
    cut.write_text("\n".join(messages[:9]) + "\n" + messages[9][: len(messages[9]) // 2], encoding="utf-8")

    first = pipe(cut, tmp_path, db)
    assert first.returncode == ExitCode.PARTIAL, first.stderr
    assert "stdin line 10: not valid JSON" in first.stdout
    assert "fetched 9, inserted 9" in first.stdout and "stored 9" in first.stdout
    assert len(stored_objects(tmp_path)) == 9

    # The consumer delivers again from its last committed offset: all ten messages, the tenth whole this time.
    whole = tmp_path / "whole.jsonl"
    whole.write_text("\n".join(messages) + "\n", encoding="utf-8")
    before = stored_objects(tmp_path)
    second = pipe(whole, tmp_path, db)
    assert second.returncode == ExitCode.OK, second.stderr
    assert "fetched 10, inserted 1, updated 0, unchanged 9" in second.stdout
    assert "stored 1, already archived 9, failed 0" in second.stdout
    after = stored_objects(tmp_path)
    assert len(after) == 10 and all(after[key] == mtime for key, mtime in before.items())  # nothing rewritten

    third = pipe(whole, tmp_path, db)
    assert third.returncode == ExitCode.OK
    assert "inserted 0, updated 0, unchanged 10" in third.stdout and "stored 0, already archived 10" in third.stdout
    assert query(db.dsn, "SELECT count(*), count(DISTINCT post_id) FROM social_posts") == [(10, 10)]
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") == [(10,)]
    assert sum(hits for path, hits in http_server.hits.items() if path.endswith(".png")) == 10  # each image fetched once


@pytest.mark.fault("SIGTERM while the producer on stdin is quiet (its pipe open): the lines read are loaded, exit 1 at once")
def test_sigterm_stops_a_stream_whose_producer_is_quiet(db, tmp_path):
    # A read blocked on the quiet pipe heard no SIGTERM: the run went on until the next line or the pipe's end
    # (beyond a container's grace period, then SIGKILL).
    lines = "".join(json.dumps(record(post_id=f"q{n}", caption="a quiet day")) + "\n" for n in range(3))
    quiet = f"import sys, time\nsys.stdout.write({lines!r}); sys.stdout.flush(); time.sleep(120)\n"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "DATABASE_URL": db.dsn,
           "ETL_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    consumer = subprocess.Popen([sys.executable, "-c", quiet], stdout=subprocess.PIPE)
    assert consumer.stdout is not None
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", "-"],
        stdin=consumer.stdout, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not query(db.dsn, "SELECT 1 FROM etl_runs WHERE status = 'running'") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the three lines are read; nothing more comes
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=20)
    finally:
        consumer.kill()
        consumer.wait(30)
        if run.poll() is None:
            run.kill()
    assert run.returncode == ExitCode.PARTIAL, err[-1500:]
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(3,)]  # what was read is loaded
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("interrupted",)]
