"""S3 faults, over real HTTP: moto's server behind a proxy that injects throttling, 5xx, outages, bad credentials."""

from __future__ import annotations

import http.client
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from tests.conftest import query
from tests.test_faults_process import write_posts

BUCKET = "archive-test"
Injection = tuple[int, str, bytes] | str | None  # (status, code, body) | "drop" | None (forward)


class FaultProxy:
    """Forwards to moto; `plan(method, path, n)` may answer instead (n counts requests of that method)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.plan: Callable[[str, str, int], Injection] = lambda method, path, n: None
        self.counts: dict[str, int] = {}
        self.forwarded: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer.lock:
                    n = outer.counts[self.command] = outer.counts.get(self.command, 0) + 1
                injected = outer.plan(self.command, self.path, n)
                if injected == "drop":
                    self.close_connection = True
                    self.connection.close()  # the endpoint went away: no status line at all
                    return
                if injected is not None:
                    status, code, extra = injected
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected {code}</Message></Error>"
                    ).encode() + extra
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                with outer.lock:
                    outer.forwarded[self.command] = outer.forwarded.get(self.command, 0) + 1
                conn = http.client.HTTPConnection("127.0.0.1", outer.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(name, value)
                # A HEAD has no body, but its Content-Length is the object's: pass moto's on.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_one  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def moto_s3() -> Iterator[tuple[FaultProxy, object]]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]  # moto keeps the bound werkzeug server here
    # moto's backends live in the process, shared by every server it starts: begin from nothing.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(port)
    yield proxy, client
    proxy.close()
    server.stop()


def s3_env(proxy: FaultProxy, **extra: str) -> dict[str, str]:
    env = {
        "S3_BUCKET": BUCKET,
        "S3_PREFIX": "archive/",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_REGION": "us-east-1",
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_BATCH_SIZE": "10",
        "ETL_CONCURRENCY": "4",
        "ETL_RETRY_MAX_WAIT": "0.2",
        "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0",
    }
    env.update(extra)
    return env


def stored_keys(client: object) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


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
