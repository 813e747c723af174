"""Switching an archive's object store: runs refuse while images live in another store, `copy-store` copies
them (verified by sha256 at both ends, resumable), then runs go on. Real etl.py subprocesses, real
PostgreSQL, moto's S3 server over real HTTP, the local store on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from moto.server import ThreadedMotoServer

from etl import copystore
from etl.db import Ledger
from etl.db.fixity import STORE_BOUNDS_SQL
from etl.errors import ExitCode
from tests.conftest import ROOT, query
from tests.support import bucket_env, media_rows, s3_client

pytestmark = pytest.mark.e2e
ACCOUNT = "123456789012"  # moto's default account


@pytest.fixture
def moto_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto's backends are shared by every server of the process: begin from nothing.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    yield endpoint
    server.stop()


def bucket_objects(client, bucket: str) -> dict[str, str]:
    """Key -> sha256 of the body, for every object in the bucket."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {key: hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() for key in keys}


def object_versions(bucket: str) -> dict[str, int]:
    """Key -> identity of the object moto holds: any rewrite makes a new one."""
    from moto.s3.models import s3_backends

    keys = s3_backends[ACCOUNT]["aws"].buckets[bucket].keys
    return {name: id(keys[name]) for name in keys}


def assert_all_in_bucket(dsn: str, client, bucket: str) -> None:
    """Every stored row points into the bucket, at an object whose bytes match the row's sha256."""
    rows = media_rows(dsn)
    objects = bucket_objects(client, bucket)
    assert {r[1] for r in rows} == set(objects)
    for _, key, url, sha, *_ in rows:
        assert url == f"s3://{bucket}/{key}"
        assert objects[key] == sha
    firsts = query(
        dsn,
        "SELECT p.image_s3_url, m.storage_url FROM social_posts p JOIN post_media m USING (platform, post_id)"
        " WHERE m.position = 0",
    )
    assert firsts and all(a == b for a, b in firsts)


@pytest.mark.fault(
    "archive switched from the local store to S3: runs refuse (exit 2) until copy-store moved every image"
)
def test_local_archive_switched_to_s3(db, run_etl, moto_endpoint, tmp_path):
    first = run_etl("run", "--source", "mock")
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    rows = media_rows(db.dsn)
    total = len(rows)
    assert total > 20 and all(r[2].startswith("file:") for r in rows)
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="archive")
    env = bucket_env(moto_endpoint, "archive")

    # The run refuses before any work: the count, where they are, what to run.
    refused = run_etl("run", "--source", "mock", env=env)
    assert refused.returncode == ExitCode.CONFIG, refused.stdout + refused.stderr
    assert f"{total} archived image(s) live in another store" in refused.stderr
    assert "the local object store" in refused.stderr and "python etl.py copy-store" in refused.stderr
    assert "S3_BUCKET='archive'" in refused.stderr and "Traceback" not in refused.stderr
    backfill = run_etl("backfill", "--source", "mock", "--since", "2026-10-01", env=env)
    assert backfill.returncode == ExitCode.CONFIG and "copy-store" in backfill.stderr
    # verify would read the empty bucket and mark every intact image failed (then copy-store would copy none);
    # forget would delete a post's images from the bucket only and leave them where they live: both refuse too.
    verify = run_etl("verify", env=env)
    assert verify.returncode == ExitCode.CONFIG and "a verify would look for them in the configured store" in verify.stderr, verify.stderr
    platform, post_id = query(db.dsn, "SELECT platform, post_id FROM post_media ORDER BY id LIMIT 1")[0]
    forget = run_etl("forget", "--post", f"{platform}:{post_id}", env=env)
    assert forget.returncode == ExitCode.CONFIG and "a forget would delete a post's images from the configured store only" in forget.stderr, forget.stderr
    assert "Traceback" not in verify.stderr + forget.stderr
    assert bucket_objects(client, "archive") == {}
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(1,)]  # nothing recorded, nothing done
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") == [(total,)]
    assert query(db.dsn, "SELECT count(*) FROM forgotten_posts") == [(0,)]

    # One local object damaged: copy-store refuses it, copies the rest, each verified.
    damaged_id, damaged_key = rows[3][0], rows[3][1]
    damaged_path = tmp_path / "data" / "objects" / damaged_key
    original = damaged_path.read_bytes()
    damaged_path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    copied = run_etl("copy-store", env=env)
    assert copied.returncode == ExitCode.PARTIAL, copied.stdout + copied.stderr
    assert f"copied {total - 1}, already there 0, failed 1" in copied.stdout
    assert "did not match their sha256" in copied.stdout and damaged_key in copied.stdout
    after = {r[0]: r for r in media_rows(db.dsn)}
    assert after[damaged_id][2].startswith("file:")  # not marked copied
    objects = bucket_objects(client, "archive")
    assert len(objects) == total - 1
    for row_id, key, url, sha, *_ in after.values():
        if row_id != damaged_id:
            assert url == f"s3://archive/{key}" and objects[key] == sha
    still = run_etl("run", "--source", "mock", env=env)
    assert still.returncode == ExitCode.CONFIG and "1 archived image(s) live in another store" in still.stderr

    # The object restored: the next copy-store copies just that one.
    damaged_path.write_bytes(original)
    healed = run_etl("copy-store", env=env)
    assert healed.returncode == ExitCode.OK, healed.stdout + healed.stderr
    assert "copied 1, already there 0, failed 0" in healed.stdout
    assert_all_in_bucket(db.dsn, client, "archive")
    versions = object_versions("archive")

    again = run_etl("copy-store", env=env)
    assert again.returncode == ExitCode.OK and "copied 0, already there 0, failed 0" in again.stdout
    assert object_versions("archive") == versions

    # Runs go on, and store nothing new: every image is archived where the user asked.
    run = run_etl("run", "--source", "mock", env=env)
    assert run.returncode == ExitCode.OK, run.stdout + run.stderr
    assert "images   stored 0, already archived" in run.stdout
    whole = run_etl(
        "backfill", "--source", "mock", "--since", "2026-01-01", "--until", "2026-11-02", "--chunk-days", "400", env=env
    )
    assert whole.returncode == ExitCode.OK, whole.stdout + whole.stderr
    assert f"images   stored 0, already archived {total}, failed 0" in whole.stdout
    assert object_versions("archive") == versions
    assert query(db.dsn, "SELECT mode, status, images_stored, images_failed FROM etl_runs WHERE mode = 'copy-store' ORDER BY id") == [
        ("copy-store", "partial", total - 1, 1), ("copy-store", "ok", 1, 0), ("copy-store", "ok", 0, 0),
    ]  # fmt: skip


@pytest.mark.fault("archive moved from bucket A to bucket B, then back to the local store: copy-store both ways")
def test_bucket_to_bucket_and_back_to_local(db, run_etl, moto_endpoint, tmp_path):
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="old-bucket")
    client.create_bucket(Bucket="new-bucket")
    first = run_etl("run", "--source", "mock", env=bucket_env(moto_endpoint, "old-bucket", S3_PREFIX="v1"))
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    total = len(media_rows(db.dsn))

    env_b = bucket_env(moto_endpoint, "new-bucket", S3_PREFIX="v2")
    refused = run_etl("run", "--source", "mock", env=env_b)
    assert refused.returncode == ExitCode.CONFIG
    assert f"{total} in bucket 'old-bucket' (s3://old-bucket/)" in refused.stderr
    moved = run_etl("copy-store", env=env_b)
    assert moved.returncode == ExitCode.OK, moved.stdout + moved.stderr
    assert f"copied {total}," in moved.stdout
    assert_all_in_bucket(db.dsn, client, "new-bucket")
    assert all(r[1].startswith("v2/mock/") for r in media_rows(db.dsn))  # the configured prefix, the contract's layout
    assert len(bucket_objects(client, "old-bucket")) == total  # the source is left as it was

    # Back to the local store (S3_BUCKET unset): the objects come down from the bucket, verified.
    local = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_REGION": "us-east-1"}  # fmt: skip
    refused = run_etl("run", "--source", "mock", env=local)
    assert refused.returncode == ExitCode.CONFIG and "S3_BUCKET is not set" in refused.stderr
    down = run_etl("copy-store", env=local)
    assert down.returncode == ExitCode.OK, down.stdout + down.stderr
    root = tmp_path / "data" / "objects"
    for _, key, url, sha, *_ in media_rows(db.dsn):
        assert not key.startswith("v2/")  # no S3_PREFIX configured now
        assert url == (root / key).resolve().as_uri()
        assert hashlib.sha256((root / key).read_bytes()).hexdigest() == sha
    run = run_etl("run", "--source", "mock", env=local)
    assert run.returncode == ExitCode.OK and "images   stored 0," in run.stdout


def test_a_source_bucket_that_is_gone_is_reported_per_image(db, run_etl, moto_endpoint):
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="gone")
    client.create_bucket(Bucket="target")
    assert run_etl("run", "--source", "mock", env=bucket_env(moto_endpoint, "gone")).returncode == ExitCode.OK
    total = len(media_rows(db.dsn))
    for key in bucket_objects(client, "gone"):
        client.delete_object(Bucket="gone", Key=key)
    client.delete_bucket(Bucket="gone")
    result = run_etl("copy-store", env=bucket_env(moto_endpoint, "target"))
    assert result.returncode == ExitCode.PARTIAL, result.stdout + result.stderr
    assert f"copied 0, already there 0, failed {total}" in result.stdout
    assert "bucket 'gone' cannot be used" in result.stdout and "Traceback" not in result.stderr
    assert all(r[2].startswith("s3://gone/") for r in media_rows(db.dsn))


def copy_store_until(db, tmp_path: Path, env: dict[str, str], moved_at_least: int, sig: int) -> tuple[int, str]:
    """Start `etl.py copy-store`; once `moved_at_least` rows point into S3, send `sig`. (returncode, stdout)."""
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)), "DATABASE_URL": db.dsn,
            "ETL_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), **env}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "etl.py"), "copy-store"], env=full, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if moved_to_s3(db.dsn) >= moved_at_least:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def moved_to_s3(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM post_media WHERE left(storage_url, 5) = 's3://'")[0][0]


@pytest.mark.fault("copy-store stopped by SIGTERM, then SIGKILLed mid-way: the next copy-store resumes and verifies")
def test_copy_store_stopped_and_killed_mid_way_resumes(db, run_etl, moto_endpoint, tmp_path):
    env_local = {"MOCK_POSTS": "80"}
    assert run_etl("run", "--source", "mock", env=env_local).returncode == ExitCode.OK
    total = len(media_rows(db.dsn))
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="archive")
    env = bucket_env(moto_endpoint, "archive", ETL_BATCH_SIZE="4", ETL_CONCURRENCY="1", **env_local)

    # SIGTERM: the page in flight is finished and recorded, then it stops (exit 1, interrupted).
    code, out = copy_store_until(db, tmp_path, env, 4, signal.SIGTERM)
    assert code == ExitCode.PARTIAL and "interrupted" in out, out
    stopped_at = moved_to_s3(db.dsn)
    assert 0 < stopped_at < total
    assert len(bucket_objects(client, "archive")) == stopped_at  # nothing written that is not recorded

    # SIGKILL: copies may be written but not recorded.
    code, _ = copy_store_until(db, tmp_path, env, stopped_at + 8, signal.SIGKILL)
    assert code == -signal.SIGKILL, "copy-store finished before it could be killed"
    moved = moved_to_s3(db.dsn)
    assert stopped_at < moved < total
    in_bucket = len(bucket_objects(client, "archive"))
    assert in_bucket >= moved

    resumed = run_etl("copy-store", env=env)
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    # What the killed copy had written but not recorded is found in place (verified), not written again.
    assert f"copied {total - in_bucket}, already there {in_bucket - moved}, failed 0" in resumed.stdout
    assert_all_in_bucket(db.dsn, client, "archive")
    statuses = query(db.dsn, "SELECT status FROM etl_runs WHERE mode = 'copy-store' ORDER BY id")
    assert statuses == [("interrupted",), ("abandoned",), ("ok",)]


@pytest.mark.badinput("copy-store with a mistyped ETL_DATA_DIR: exit 2 naming the path, no database created")
def test_copy_store_with_a_mistyped_data_dir_creates_nothing(tmp_path):
    typo = tmp_path / "dta"
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)), "PYTHONPATH": str(ROOT),
            "ETL_DATA_DIR": str(typo)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "copy-store"], env=full, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "there is no archive there" in result.stderr and not typo.exists()


def test_the_store_check_reads_an_index_not_the_table(db):
    """With every image in place, a run's check is two probes of post_media_store_idx, not a scan."""
    with db.transaction() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # the planner's choice on a tiny table is not the point
        cur.execute("EXPLAIN " + STORE_BOUNDS_SQL)
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert plan.count("post_media_store_idx") == 2 and "Seq Scan" not in plan
    with db.transaction() as cur:
        cur.execute(
            "SELECT media_store('s3://bucket/a/b.png'), media_store('file:///x/y.png'), media_store('https://x/y')"
        )
        assert cur.fetchone() == ("s3://bucket", "local", None)


def test_images_elsewhere_counts_every_other_store(db):
    stores = {"s3://target/k": 3, "file:///old/data/objects/k": 2, "s3://other/k": 1, "https://cdn.example/k": 1}
    with db.transaction() as cur:
        cur.execute("INSERT INTO social_posts (platform, post_id, created_at) VALUES ('p', '1', now())")
        position = 0
        for url, n in stores.items():
            for _ in range(n):
                cur.execute(
                    "INSERT INTO post_media (platform, post_id, position, source_url, storage_url, status)"
                    " VALUES ('p', '1', %s, 'http://src', %s, 'stored')",
                    (position, f"{url}{position}"),
                )
                position += 1
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status) VALUES ('p', '1', 99, 'x', 'failed')"
        )
    assert copystore.images_elsewhere(db, "s3://target") == {"local": 2, "s3://other": 1, None: 1}
    assert copystore.images_elsewhere(db, "local") == {"s3://target": 3, "s3://other": 1, None: 1}
    with db.transaction() as cur:
        cur.execute("DELETE FROM post_media WHERE storage_url NOT LIKE 's3://target/%%'")
    assert copystore.images_elsewhere(db, "s3://target") == {}
    assert copystore.images_elsewhere(db, "local") == {"s3://target": 3}


# -- status never creates an archive (issue 10, item 14) ------------------------------------------------


def run_status(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "status", *args], env=full, cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.badinput("status with a mistyped ETL_DATA_DIR: exit 2 naming the path, no database created")
def test_status_with_a_mistyped_data_dir_creates_nothing(tmp_path):
    typo = tmp_path / "dta"
    result = run_status(tmp_path, ETL_DATA_DIR=str(typo))
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "there is no archive there" in result.stderr and str(typo.resolve() / "postgres") in result.stderr
    assert "ETL_DATA_DIR" in result.stderr and "Traceback" not in result.stderr
    assert not typo.exists()


@pytest.mark.badinput("status against a database without an archive (DATABASE_URL): exit 2, no tables created")
def test_status_on_an_empty_database_creates_nothing(migrated, tmp_path):
    import psycopg2

    name = "status_empty_probe"
    admin = psycopg2.connect(migrated)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    try:
        dsn = urlunsplit(urlsplit(migrated)._replace(path=f"/{name}"))
        result = run_status(tmp_path, DATABASE_URL=dsn)
        assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
        assert "DATABASE_URL" in result.stderr and "there is no archive" in result.stderr
        assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.mark.badinput("status --runs with zero, a negative number or a word: an argparse error (exit 2)")
@pytest.mark.parametrize("value", ["-1", "0", "ten"])
def test_status_runs_must_be_positive(tmp_path, value):
    result = run_status(tmp_path, "--runs", value, ETL_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == ExitCode.CONFIG
    assert "--runs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_status_of_an_existing_archive_still_works(db, run_etl):
    assert run_etl("run", "--source", "mock", env={"MOCK_POSTS": "3"}).returncode == ExitCode.OK
    result = run_etl("status", "--runs", "1")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "Last runs:" in result.stdout and "mock" in result.stdout


@pytest.mark.fault("a second copy-store while one is running")
def test_a_second_copy_store_exits_75_saying_copy_store_is_running(db, run_etl):
    db.migrate()
    run_id = Ledger(db).start_run("copy-store", ["copy-store"], {})
    lock = Ledger(db).lock_sources(["copy-store"])
    try:
        second = run_etl("copy-store")
    finally:
        lock.close()
    assert second.returncode == ExitCode.LOCKED, second.stdout + second.stderr
    assert f"copy-store is running by another run (run {run_id} on " in second.stderr
    assert "source 'copy-store'" not in second.stderr


@pytest.mark.fault("copy-store into a bucket already holding a damaged copy whose metadata claims the right sha256: replaced")
def test_a_damaged_object_already_in_the_target_is_replaced(db, run_etl, moto_endpoint, tmp_path):
    assert run_etl("run", "--source", "mock").returncode == ExitCode.OK
    total = len(media_rows(db.dsn))
    key, sha, ctype, size = query(
        db.dsn, "SELECT storage_key, sha256, content_type, bytes FROM post_media WHERE status = 'stored' ORDER BY id LIMIT 1"
    )[0]
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="archive")
    # Left by an earlier copy of the archive and damaged since: the same length, its x-amz-meta-sha256 unchanged.
    # The conditional PUT meets it (412), and its metadata alone said "already there": it was never replaced,
    # the read-back failed on every copy-store, and runs refused for ever.
    client.put_object(Bucket="archive", Key=key, Body=b"\0" * size, ContentType=ctype, Metadata={"sha256": sha})
    copied = run_etl("copy-store", env=bucket_env(moto_endpoint, "archive"))
    assert copied.returncode == ExitCode.OK, copied.stdout + copied.stderr
    assert f"copied {total}, already there 0, failed 0" in copied.stdout
    assert_all_in_bucket(db.dsn, client, "archive")
