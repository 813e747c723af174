"""The Airflow DAGs, run by real Airflow (dag.test(), SQLite metadata) against real PostgreSQL, moto's S3 server
and a local image host: shards equal one run, partial runs warn, lost databases are retried, backfills resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import ROOT, query
from tests.streamy import T0, StreamyAPI
from tests.support import DatabaseProxy, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAMES = [f"s{i}" for i in range(6)]
BUCKET = "dag-archive"


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> dict[str, str]:
    """An AIRFLOW_HOME with a migrated SQLite metadata database, made once for the session."""
    home = tmp_path_factory.mktemp("airflow")
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(home), "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    airflow = Path(sys.executable).parent / "airflow"
    done = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env


@pytest.fixture
def world(db, http_server, moto_endpoint, tmp_path, airflow_home):
    """The services a worker sees: the test database, moto's S3 bucket, the streamy API and its images."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    s3.create_bucket(Bucket=BUCKET)
    api = StreamyAPI(http_server, NAMES, per_stream=3)
    env = {
        **airflow_home, "DATABASE_URL": db.dsn, "ETL_DATA_DIR": str(tmp_path / "data"), "S3_BUCKET": BUCKET,
        "AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "ETL_SOURCES": "streamy,mock", "ETL_SOURCE_PATHS": "tests.streamy",
        "MOCK_POSTS": "8", "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_HTTP_RETRIES": "1", "ETL_RETRY_MAX_WAIT": "0.01",
        **api.env(),
    }  # fmt: skip
    return {"env": env, "api": api, "s3": s3, "db": db, "tmp": tmp_path}


def dag_run(world: dict, dag_id: str, conf: dict | None = None, **extra: str) -> tuple[dict, str]:
    env = {**world["env"], **extra}
    args = [sys.executable, str(ROOT / "tests" / "dag_run.py"), dag_id, json.dumps(conf or {})]
    done = subprocess.run(args, env=env, cwd=world["tmp"], capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("DAGRUN ")]
    assert done.returncode == 0 and lines, output[-4000:]
    return json.loads(lines[-1].removeprefix("DAGRUN ")), output


def states(run: dict, task_id: str) -> list[str]:
    return [t["state"] for t in sorted(run["tasks"], key=lambda t: t["map_index"]) if t["task_id"] == task_id]


def archive(world: dict) -> dict:
    dsn = world["db"].dsn
    posts = query(dsn, "SELECT platform, post_id, caption, like_count, image_s3_url FROM social_posts ORDER BY 1, 2")
    media = query(dsn, "SELECT platform, post_id, position, storage_key, sha256, status FROM post_media ORDER BY 1, 2, 3")
    listed = world["s3"].list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {"posts": posts, "media": media, "objects": {o["Key"]: o["ETag"] for o in listed}}


def empty(world: dict) -> None:
    import psycopg2

    dsn = world["db"].dsn
    tables = [r[0] for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    conn.close()
    for obj in world["s3"].list_objects_v2(Bucket=BUCKET).get("Contents", []):
        world["s3"].delete_object(Bucket=BUCKET, Key=obj["Key"])


def test_the_dag_files_import_cleanly(world):
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "dag_run.py"), "check"], env=world["env"],
                          cwd=world["tmp"], capture_output=True, text=True, timeout=300)  # fmt: skip
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("DAGBAG "))
    bag = json.loads(line.removeprefix("DAGBAG "))
    assert bag["import_errors"] == {}
    assert set(bag["dags"]) == {"social_archiver", "social_archiver_backfill"}
    main = bag["dags"]["social_archiver"]
    cron_lines = (ROOT / "crontab.example").read_text().splitlines()
    cron_minute = next(ln for ln in cron_lines if "cron_run.sh" in ln and not ln.startswith("#")).split()[:2]
    assert main["schedule"] == " ".join(cron_minute + ["*", "*", "*"])  # the same minute as crontab.example
    assert main["catchup"] is False and main["max_active_runs"] == 1 and main["params"]["shards"] == 1
    assert {"prepare", "plan", "archive", "retry_part", "summary"} <= set(main["tasks"])
    assert set(bag["dags"]["social_archiver_backfill"]["tasks"]) == {"plan_chunks", "archive_chunk"}


def test_three_shards_archive_what_one_run_does_and_a_second_run_adds_nothing(world, run_etl):
    one = run_etl("run", env={k: v for k, v in world["env"].items() if not k.startswith("AIRFLOW")})
    assert one.returncode == 0, one.stderr[-3000:]
    expected = archive(world)
    assert len(expected["posts"]) == 6 * 3 + 8 and expected["objects"]
    empty(world)

    run, output = dag_run(world, "social_archiver", {"shards": 3})
    assert run["state"] == "success", output[-4000:]
    assert states(run, "archive") == ["success"] * 3 and states(run, "retry_part") == ["success"] * 3
    assert archive(world) == expected  # same rows, objects and keys as one etl.py run, nothing twice
    recorded = query(world["db"].dsn, "SELECT arguments -> 'orchestrator' FROM etl_runs WHERE arguments ? 'shard' ORDER BY id")
    assert sorted(r[0]["map_index"] for r in recorded) == [0, 1, 2]
    assert {r[0]["run_id"] for r in recorded} == {run["run_id"]}
    assert "DAG run totals" in output

    images_before = {p: n for p, n in world["api"].server.hits.items() if p.startswith("/img/")}
    again, output = dag_run(world, "social_archiver", {"shards": 3})
    assert again["state"] == "success", output[-4000:]
    totals = query(world["db"].dsn,
                   "SELECT sum(posts_inserted), sum(images_stored) FROM etl_runs"
                   " WHERE arguments -> 'orchestrator' ->> 'run_id' = %s", (again["run_id"],))  # fmt: skip
    assert totals == [(0, 0)]
    assert {p: n for p, n in world["api"].server.hits.items() if p.startswith("/img/")} == images_before
    assert archive(world) == expected


def test_a_stream_answering_500_warns_and_the_next_run_archives_it(world):
    world["api"].serve("s1", [], status=500)
    run, output = dag_run(world, "social_archiver", {"shards": 2})
    assert run["state"] == "success", output[-4000:]
    assert states(run, "archive") == ["success", "success"]
    assert "partial run" in output and "streamy feed s1: HTTP 500" in output
    ids = {r[0] for r in query(world["db"].dsn, "SELECT post_id FROM social_posts WHERE platform = 'streamy'")}
    assert ids == {f"{n}-{k}" for n in NAMES if n != "s1" for k in range(3)}

    StreamyAPI(world["api"].server, NAMES, per_stream=3)  # the feed is back
    again, output = dag_run(world, "social_archiver", {"shards": 2})
    assert again["state"] == "success", output[-4000:]
    ids = {r[0] for r in query(world["db"].dsn, "SELECT post_id FROM social_posts WHERE platform = 'streamy'")}
    assert ids == {f"{n}-{k}" for n in NAMES for k in range(3)}


@pytest.mark.fault("the database goes away during an Airflow shard task: the task fails, Airflow's retry completes it")
def test_a_database_lost_mid_task_fails_it_and_airflow_retries_it(world):
    proxy = DatabaseProxy(world["db"].dsn)
    feed = world["api"].server.routes["/feed/s2"]
    cut = threading.Event()

    def s2(handler):
        if not cut.is_set():  # the first read of this stream: the database goes away for a second
            cut.set()
            proxy.cut()
            threading.Timer(1.0, proxy.restore).start()
        return feed

    world["api"].server.routes["/feed/s2"] = s2
    run, output = dag_run(world, "social_archiver", {"shards": 2}, DATABASE_URL=proxy.dsn, ETL_DB_RECONNECT_SECONDS="0.3")
    assert run["state"] == "success", output[-4000:]
    tries = {t["map_index"]: t["try_number"] for t in run["tasks"] if t["task_id"] == "archive"}
    # The shard of stream s2, which lost its database, ran twice. The other ran once, or twice when it started
    # inside the same one-second outage (its connections go through the same proxy).
    from etl.shards import Shard

    (lost,) = [k - 1 for k in (1, 2) if Shard(k, 2).owns("streamy:feed:s2")]  # map_index = shard number - 1
    assert len(tries) == 2 and tries[lost] == 2 and set(tries.values()) <= {1, 2}
    assert cut.is_set() and "Not loaded" in output
    ids = {r[0] for r in query(world["db"].dsn, "SELECT post_id FROM social_posts WHERE platform = 'streamy'")}
    assert ids == {f"{n}-{k}" for n in NAMES for k in range(3)}


def test_a_bad_setting_fails_prepare_and_no_shard_runs(world):
    run, output = dag_run(world, "social_archiver", {"shards": 2}, ETL_SOURCES="streamy,nosuchplatform")
    assert run["state"] == "failed"
    prepare = next(t for t in run["tasks"] if t["task_id"] == "prepare")
    assert prepare["state"] == "failed" and prepare["try_number"] == 1  # a configuration error is not retried
    assert "nosuchplatform" in output
    assert all(t["state"] in ("upstream_failed", "None", "skipped") for t in run["tasks"] if t["task_id"] == "plan")
    assert query(world["db"].dsn, "SELECT count(*) FROM etl_runs") == [(0,)]


def test_the_backfill_dag_resumes_at_the_chunk_that_failed(world):
    hits = {"n": 0}
    feed = world["api"].server.routes["/feed/s0"]

    def s0(handler):  # the second chunk's read of s0 fails once
        hits["n"] += 1
        return Reply(status=503, body=b"down", content_type="text/plain") if hits["n"] == 2 else feed

    world["api"].server.routes["/feed/s0"] = s0
    since, until = T0 - timedelta(hours=3), T0 + timedelta(hours=1)
    conf = {"source": "streamy", "since": since.isoformat(), "until": until.isoformat(), "chunk_days": 1 / 24}
    run, output = dag_run(world, "social_archiver_backfill", conf)
    assert run["state"] == "success", output[-4000:]
    assert len(states(run, "archive_chunk")) == 4 and "partial run" in output
    finished = query(world["db"].dsn, "SELECT count(DISTINCT chunk_start) FROM etl_backfill_chunks WHERE config_key = 'stream:feed:s0'")
    assert finished == [(3,)]

    again, output = dag_run(world, "social_archiver_backfill", conf)
    assert again["state"] == "success", output[-4000:]
    assert len(states(again, "archive_chunk")) == 1  # only the unfinished chunk is planned again
    ids = {r[0] for r in query(world["db"].dsn, "SELECT post_id FROM social_posts WHERE platform = 'streamy'")}
    assert ids == {f"{n}-{k}" for n in NAMES for k in range(3)}


def test_a_shard_whose_every_stream_is_locked_is_skipped(world, monkeypatch):
    from etl.config import load_settings
    from etl.db import Ledger
    from etl.run.runner import RunRequest
    from etl.run.services import build_sources
    from etl.shards import plan_shards

    for key, value in world["api"].env().items():  # the streams the workers see, to plan the same shards here
        monkeypatch.setenv(key, value)
    settings = load_settings({k: v for k, v in world["env"].items() if not k.startswith("AIRFLOW")}, dotenv_path=None)
    (first, units), _ = plan_shards(build_sources(settings, RunRequest(sources=list(settings.sources))), 2)
    lock, locked = Ledger(world["db"]).lock_units([u.name for u in units])  # another run holds all of shard 1/2
    try:
        assert locked == [] and units
        run, output = dag_run(world, "social_archiver", {"shards": 2})
    finally:
        lock.close()
    assert run["state"] == "success", output[-4000:]
    assert states(run, "archive") == ["skipped", "success"]
    assert states(run, "summary") == ["success"]
    held = {r[0] for r in query(world["db"].dsn, "SELECT post_id FROM social_posts")}
    assert held and not any(p.startswith(tuple(f"{u.stream.removeprefix('feed:')}-" for u in units if u.stream)) for p in held)
