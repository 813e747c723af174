"""SIGTERM during a stalled image download: a bounded grace, every fetched post loaded, exit 1; a second
SIGTERM stops at once. A database that stays away: a bounded wait, then the batch not loaded is named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, query
from tests.support import Reply, png_bytes, process_env, start_etl

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, dsn: str, **extra: str) -> dict[str, str]:
    return process_env(tmp_path, dsn, **{
        "ETL_READ_TIMEOUT": "120",  # the stalled download stays stalled while the test watches
        "ETL_STOP_GRACE": "1",
        "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0",
        **extra,
    })  # fmt: skip


def _two_posts(tmp_path: Path, http_server) -> Path:
    http_server.routes["/good.png"] = Reply(body=png_bytes(5, 5))
    # The first request stalls for a minute; later ones (the next run's retry) are answered at once.
    http_server.routes["/stall.png"] = [Reply(body=png_bytes(6, 6), delay=60), Reply(body=png_bytes(6, 6))]
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for post_id, image in (("good", "/good.png"), ("stalled", "/stall.png")):
            f.write(json.dumps({
                "platform": "fixture", "post_id": post_id, "created_at": "2026-10-01T12:00:00Z",
                "caption": f"the {post_id} one", "image_urls": [http_server.url(image)],
            }) + "\n")  # fmt: skip
    return path


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.fault("SIGTERM during a stalled image download: exit 1 within the grace, both posts loaded, the stalled image retried next run")
def test_sigterm_during_a_stalled_download(db, tmp_path, http_server):
    posts = _two_posts(tmp_path, http_server)
    env = _env(tmp_path, db.dsn)
    proc = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(posts))
    _wait_for(lambda: http_server.hits.get("/stall.png") and http_server.hits.get("/good.png"))
    time.sleep(0.5)  # the good image is stored meanwhile
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - signalled
    assert proc.returncode == 1, err
    assert took < 8, f"took {took:.1f}s after SIGTERM"
    assert query(db.dsn, "SELECT post_id FROM social_posts ORDER BY 1") == [("good",), ("stalled",)]
    media = dict((r[0], r[1:]) for r in query(db.dsn, "SELECT post_id, status, permanent, last_error FROM post_media"))
    assert media["good"][0] == "stored"
    assert media["stalled"][:2] == ("failed", False) and "SIGTERM" in media["stalled"][2]
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("interrupted",)]
    assert (tmp_path / "data" / "objects").exists()

    rerun = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", str(posts)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert query(db.dsn, "SELECT post_id, status FROM post_media ORDER BY 1") == [("good", "stored"), ("stalled", "stored")]
    assert http_server.hits["/stall.png"] == 2 and http_server.hits["/good.png"] == 1


@pytest.mark.fault("a second SIGTERM stops the run at once, even while the grace runs")
def test_second_sigterm_stops_at_once(db, tmp_path, http_server):
    posts = _two_posts(tmp_path, http_server)
    proc = start_etl(tmp_path, _env(tmp_path, db.dsn, ETL_STOP_GRACE="60"), "run", "--source", "jsonl", "--input", str(posts))
    _wait_for(lambda: http_server.hits.get("/stall.png"))
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None, "the first SIGTERM gives the download its 60 s grace"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert time.monotonic() - signalled < 3


@pytest.mark.fault("the database goes away mid-run for good: the wait is bounded, the batch not loaded is named, the next run loads it")
def test_database_gone_for_good_bounds_the_wait_and_names_the_batch(db, tmp_path, http_server):
    from tests.support import DatabaseProxy

    proxy = DatabaseProxy(db.dsn)
    try:
        path = tmp_path / "in.jsonl"
        with path.open("w") as f:
            for i in range(60):
                http_server.routes[f"/img/{i}.png"] = Reply(body=png_bytes(4 + i % 5, 4), delay=0.05)
                f.write(json.dumps({
                    "platform": "fixture", "post_id": f"p{i}", "created_at": f"2026-10-{1 + i % 28:02d}T12:00:00Z",
                    "image_urls": [http_server.url(f"/img/{i}.png")],
                }) + "\n")  # fmt: skip
        env = _env(tmp_path, proxy.dsn, ETL_BATCH_SIZE="10", ETL_CONCURRENCY="2", ETL_DB_RECONNECT_SECONDS="3")
        proc = start_etl(tmp_path, env, "run", "--source", "jsonl", "--input", str(path))
        _wait_for(lambda: query(db.dsn, "SELECT count(*) FROM social_posts")[0][0] >= 10)
        proxy.cut()
        cut_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - cut_at
        assert proc.returncode == 1, err
        assert took < 12, f"took {took:.1f}s with ETL_DB_RECONNECT_SECONDS=3"
        assert "within 3s (ETL_DB_RECONNECT_SECONDS)" in err
        assert "Not loaded: batch" in err and "of jsonl (10 posts, fixture/p" in err
        assert "the next run fetches them again" in err
        loaded = query(db.dsn, "SELECT count(*) FROM social_posts")[0][0]
        assert 10 <= loaded < 60
        proxy.restore()
        rerun = subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), "run", "--source", "jsonl", "--input", str(path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
        assert query(db.dsn, "SELECT count(*) FROM social_posts")[0][0] == 60
    finally:
        proxy.close()
