"""S3 faults, over real HTTP: moto's server behind a proxy that injects throttling, 5xx, outages, bad credentials."""

from __future__ import annotations

import pytest

from tests.conftest import query
from tests.support import BUCKET, s3_env, stored_keys, write_posts


@pytest.mark.fault("S3 throttling (503 SlowDown) and 500s on PUT: retried, every object stored")
def test_s3_throttling_and_5xx_are_retried(moto_s3, run_etl, db, tmp_path, http_server):
    proxy, client = moto_s3
    # Every third PUT is refused, alternately with SlowDown and InternalError.
    proxy.plan = lambda method, path, n: (
        (503, "SlowDown", b"") if method == "PUT" and n % 6 == 1 else
        (500, "InternalError", b"") if method == "PUT" and n % 6 == 4 else None
    )  # fmt: skip
    posts = write_posts(tmp_path / "in.jsonl", http_server, 20)
    result = run_etl("run", "--source", "jsonl", "--input", str(posts), env=s3_env(proxy))
    assert result.returncode == 0, result.stderr
    assert proxy.counts["PUT"] > proxy.forwarded["PUT"] == 20  # refused PUTs were sent again
    keys = stored_keys(client)
    assert len(keys) == 20 and all(k.startswith("archive/fixture/2026/10/") for k in keys)
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") == [(20,)]


@pytest.mark.fault("S3 endpoint goes away mid-run: images fail, posts still load, a later run stores them")
def test_s3_outage_mid_run_is_healed_by_the_next_run(moto_s3, run_etl, db, tmp_path, http_server):
    proxy, client = moto_s3
    proxy.plan = lambda method, path, n: "drop" if method == "PUT" and n > 8 else None
    posts = write_posts(tmp_path / "in.jsonl", http_server, 20)
    env = s3_env(proxy, ETL_HTTP_RETRIES="1")
    first = run_etl("run", "--source", "jsonl", "--input", str(posts), env=env)
    assert first.returncode == 1, first.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(20,)]
    stored, failed = query(
        db.dsn, "SELECT count(*) FILTER (WHERE status = 'stored'), count(*) FILTER (WHERE status = 'failed') FROM post_media"
    )[0]
    assert stored == len(stored_keys(client)) and failed == 20 - stored and failed > 0

    proxy.plan = lambda method, path, n: None  # the endpoint is back
    second = run_etl("run", "--source", "jsonl", "--input", str(posts), env=env)
    assert second.returncode == 0, second.stderr
    assert len(stored_keys(client)) == 20
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") == [(20,)]


@pytest.mark.fault("S3 bucket missing: exit 2 naming S3_BUCKET before any work")
def test_missing_bucket_exits_2_before_any_work(moto_s3, run_etl, db, tmp_path, http_server):
    proxy, _ = moto_s3
    posts = write_posts(tmp_path / "in.jsonl", http_server, 3)
    result = run_etl("run", "--source", "jsonl", "--input", str(posts), env=s3_env(proxy, S3_BUCKET="no-such-bucket"))
    assert result.returncode == 2
    assert "S3_BUCKET 'no-such-bucket' does not exist" in result.stderr
    assert http_server.hits == {}  # no image was fetched
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(0,)]


@pytest.mark.fault("S3 credentials refused: exit 2 with a clear message, secret key never shown")
def test_bad_credentials_exit_2(moto_s3, run_etl, db):
    proxy, _ = moto_s3
    proxy.plan = lambda method, path, n: (403, "InvalidAccessKeyId", b"")
    result = run_etl("run", "--source", "mock", env=s3_env(proxy))
    assert result.returncode == 2
    assert "access denied" in result.stderr and "S3_BUCKET" in result.stderr
    assert "testing-secret-key" not in result.stderr + result.stdout
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(0,)]


def test_objects_are_private(moto_s3, run_etl, tmp_path, http_server):
    proxy, client = moto_s3
    posts = write_posts(tmp_path / "in.jsonl", http_server, 2)
    assert run_etl("run", "--source", "jsonl", "--input", str(posts), env=s3_env(proxy)).returncode == 0
    for key in stored_keys(client):
        grants = client.get_object_acl(Bucket=BUCKET, Key=key)["Grants"]
        assert [g["Permission"] for g in grants] == ["FULL_CONTROL"]
        assert all(g["Grantee"].get("Type") == "CanonicalUser" for g in grants)
        head = client.head_object(Bucket=BUCKET, Key=key)
        assert head["ContentType"] == "image/png" and len(head["Metadata"]["sha256"]) == 64
