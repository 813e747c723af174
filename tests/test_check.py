"""`etl.py check`: the database, the object store (a test object written, read, deleted), each source with
one cheap authenticated call against a local fake API, the output paths and misspelled settings; exit 0 or 2."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from etl.errors import ExitCode
from tests.conftest import query
from tests.support import Reply, free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
JSON = "application/json; charset=UTF-8"
KEY, TOKEN, IG_TOKEN, IG_USER = "yt-key-1234", "tw-token-5678", "ig-token-9012", "17841400000000001"


def rows(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(area, item) -> (result, detail) from the check table."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[0] in ("settings", "paths", "database", "store", "source"):
            found[(parts[0], parts[1])] = (parts[2], parts[3] if len(parts) > 3 else "")
    return found


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")


@pytest.fixture
def platforms(http_server):
    """Fake YouTube, X and Graph APIs that accept only the right credentials."""

    def youtube(handler) -> Reply:
        params = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        if params.get("key") != KEY:
            return Reply(status=400, body=(FIXTURES / "youtube" / "error_key_invalid.json").read_bytes(), content_type=JSON)
        return Reply(body=(FIXTURES / "youtube" / "channels.json").read_bytes(), content_type=JSON)

    def twitter(handler) -> Reply:
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Reply(status=401, body=b'{"title": "Unauthorized", "status": 401, "detail": "Unauthorized"}', content_type=JSON)
        return Reply(body=b'{"data": {"id": "12", "name": "X", "username": "X"}}', content_type=JSON)

    def instagram(handler) -> Reply:
        params = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        if params.get("access_token") != IG_TOKEN:
            return Reply(status=400, body=(FIXTURES / "instagram" / "error_190_expired_token.json").read_bytes(), content_type=JSON)
        return Reply(body=json.dumps({"id": IG_USER, "username": "shop"}).encode(), content_type=JSON)

    http_server.routes["/youtube/v3/channels"] = youtube
    http_server.routes["/2/users/by/username/X"] = twitter
    http_server.routes[f"/v21.0/{IG_USER}"] = instagram
    return http_server


def good_env(server, moto_endpoint: str, tmp_path: Path) -> dict[str, str]:
    return {
        "ETL_SOURCES": "youtube,twitter,instagram,mock",
        "YOUTUBE_API_KEY": KEY, "YOUTUBE_QUERY": "sunsets", "YOUTUBE_API_BASE": server.base,
        "TWITTER_BEARER_TOKEN": TOKEN, "TWITTER_QUERY": "#sunset", "TWITTER_API_BASE": server.base,
        "INSTAGRAM_ACCESS_TOKEN": IG_TOKEN, "INSTAGRAM_USER_ID": IG_USER, "INSTAGRAM_API_BASE": server.base + "/v21.0",
        "S3_BUCKET": "checked", "AWS_ENDPOINT_URL": moto_endpoint, "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "ETL_METRICS_PATH": str(tmp_path / "metrics" / "archiver.prom"), "ETL_LOG_FILE": str(tmp_path / "etl.log"),
        "ETL_RETRY_MAX_WAIT": "0.05",
    }  # fmt: skip


def test_all_well_exits_0_and_leaves_nothing_behind(run_etl, db, platforms, moto_endpoint, tmp_path):
    s3(moto_endpoint).create_bucket(Bucket="checked")
    result = run_etl("check", env=good_env(platforms, moto_endpoint, tmp_path))
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table[("database", "DATABASE_URL")][0] == "ok"
    assert table[("database", "migrations")][0] == "ok"
    assert table[("store", "test-object")] == ("ok", "written, read back and deleted")
    assert table[("store", "credentials")][0] == "ok"
    assert "1 quota unit" in table[("source", "youtube")][1]
    assert "1 user lookup" in table[("source", "twitter")][1]
    assert "hourly rate limit" in table[("source", "instagram")][1]
    assert table[("source", "mock")] == ("ok", "no credentials needed")
    assert table[("source", "jsonl")][0] == "-"  # not configured
    assert table[("paths", "ETL_METRICS_PATH")][0] == "ok" and table[("paths", "ETL_LOG_FILE")][0] == "ok"
    assert "All checks passed." in result.stdout
    assert "Contents" not in s3(moto_endpoint).list_objects_v2(Bucket="checked")  # the test object is gone
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(0,)]  # a check is not a run
    for secret in (KEY, TOKEN, IG_TOKEN):
        assert secret not in result.stdout + result.stderr


@pytest.mark.badinput("check: every broken part of the configuration is a FAIL row with what to do, exit 2")
def test_each_failure_is_named_with_what_to_do(run_etl, platforms, moto_endpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = good_env(platforms, moto_endpoint, tmp_path)
    env.update({
        "YOUTUBE_API_KEY": "wrong-key", "TWITTER_BEARER_TOKEN": "wrong-token", "INSTAGRAM_ACCESS_TOKEN": "wrong-ig",
        "S3_BUCKET": "missing-bucket", "ETL_METRICS_PATH": str(blocker / "m.prom"), "S3_BUKET": "typo",
    })  # fmt: skip
    result = run_etl("check", env=env)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    table = rows(result.stdout)
    for area, item in [("source", "youtube"), ("source", "twitter"), ("source", "instagram"), ("store", "S3_BUCKET"),
                       ("paths", "ETL_METRICS_PATH"), ("settings", "S3_BUKET")]:  # fmt: skip
        assert table[(area, item)][0] == "FAIL", (area, item, result.stdout)
    assert "does not exist" in table[("store", "S3_BUCKET")][1]
    assert "rename S3_BUKET to S3_BUCKET" in result.stdout
    assert "--create-bucket" in result.stdout
    assert "6 problem(s)." in result.stdout
    assert table[("database", "DATABASE_URL")][0] == "ok"  # the rest is still checked
    for secret in ("wrong-key", "wrong-token", "wrong-ig"):
        assert secret not in result.stdout + result.stderr


def test_create_bucket(run_etl, platforms, moto_endpoint, tmp_path):
    env = {**good_env(platforms, moto_endpoint, tmp_path), "S3_BUCKET": "created-by-check"}  # moto's state outlives a server
    result = run_etl("check", "--create-bucket", env=env)
    assert result.returncode == ExitCode.OK, result.stdout
    assert rows(result.stdout)[("store", "S3_BUCKET")] == ("ok", "'created-by-check' created in us-east-1")
    s3(moto_endpoint).head_bucket(Bucket="created-by-check")  # it exists now


@pytest.mark.badinput("check: unreachable database, no S3 credentials, DATABASE_URL without ETL_SOURCES")
def test_unreachable_database_and_missing_credentials(tmp_path, python):
    import os
    import subprocess

    from tests.conftest import ROOT

    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "ETL_DATA_DIR": str(tmp_path / "d"),
        "DATABASE_URL": f"postgresql://u:pw-secret@127.0.0.1:{free_port()}/x", "S3_BUCKET": "b",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    result = subprocess.run([python, str(ROOT / "etl.py"), "check"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table[("database", "DATABASE_URL")][0] == "FAIL"
    assert table[("store", "credentials")][0] == "FAIL"
    assert "AWS_ACCESS_KEY_ID" in result.stdout and "local S3-compatible store needs them too" in result.stdout
    assert table[("settings", "ETL_SOURCES")][0] == "FAIL"
    assert "pw-secret" not in result.stdout + result.stderr
    assert not (tmp_path / "d").exists()  # a check creates no archive


def test_embedded_set_up_not_created_yet_is_fine_and_not_created(tmp_path, python):
    import os
    import subprocess

    from tests.conftest import ROOT

    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "ETL_DATA_DIR": str(tmp_path / "d")}
    result = subprocess.run([python, str(ROOT / "etl.py"), "check"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "the first run creates it" in rows(result.stdout)[("database", "embedded")][1]
    assert not (tmp_path / "d").exists()
