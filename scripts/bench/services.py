"""The services the benchmark starts and always stops: PostgreSQL, an S3 endpoint, the image and feed hosts.

All on 127.0.0.1 (PostgreSQL on a Unix socket only):
- an image host (one asyncio loop in a thread of this process): ~30 KB JPEG/PNG images, distinct bytes per URL,
  a fixed latency per request, TCP_NODELAY, keep-alive, and a request counter; the peers use the same host;
- an S3 endpoint: moto's server app in a subprocess of its own (moto_server.py), so that on a 2-core machine it
  has its own interpreter and GIL instead of sharing ours, and so the ETL and the ceiling meet the very same
  server; it counts requests by method (how a rerun proves it made no PUT);
- PostgreSQL: pgserver in a temporary directory, one fresh database per measured run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Collection
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scripts.bench.workload import ImageFactory

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
BUCKET, CEILING_BUCKET, BASELINE_BUCKET = "bench-archive", "bench-ceiling", "bench-baseline"


class ImageHost:
    """An HTTP/1.1 image server on 127.0.0.1: /img/<index>.<ext>, after `latency` seconds, keep-alive.

    One asyncio loop in one thread of this process, so the wait stands for a CDN's round trip and costs no
    CPU: a thread per connection, each sleeping then waking for the GIL, cost the machine the benchmark is
    measuring on (on 2 cores) a share that a remote CDN never takes.
    """

    def __init__(self, images: ImageFactory, latency: float):
        self.images = images
        self.latency = latency
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="image-host", daemon=True)
        self.thread.start()
        started.wait(30)
        if not hasattr(self, "port"):
            raise RuntimeError("the image host did not start")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0, backlog=512))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without TCP_NODELAY the body waits behind the headers for the client's delayed ACK: ~40 ms
            # on every request, an artefact no CDN has.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                self.requests += 1  # the loop's thread only: no lock needed
                if self.latency:
                    await asyncio.sleep(self.latency)
                match = re.fullmatch(r"/img/(\d+)\.(jpg|png)", path)
                if method == "GET" and match:
                    index = int(match.group(1))
                    status, body, ctype = "200 OK", self.images.body(index), self.images.content_type(index)
                else:
                    status, body, ctype = "404 Not Found", b"not found", "text/plain"
                close = headers.get("connection", "").lower() == "close"
                extra = "Connection: close\r\n" if close else ""
                reply = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                writer.write(reply.encode("latin-1") + body)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the client went away (or sent something that is not a request)
        finally:
            writer.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, index: int) -> str:
        return f"{self.base}/img/{index}.{self.images.ext(index)}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FeedHost:
    """/feed/<name>: a JSON document per stream (workload.stream_feeds), for the many-stream source `streamy`."""

    def __init__(self, feeds: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = feeds.get(self.path.removeprefix("/feed/"))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


class Postgres:
    """pgserver in a temporary directory (Unix socket only); a fresh database per measured run."""

    def __init__(self, pgdata: Path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="delete")
        self.pid = self.server.get_pid()
        self.databases: dict[str, str] = {}  # name -> dsn of each database created and not dropped

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.server.get_uri())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        self.databases[name] = self.server.get_uri(database=name)
        return self.databases[name]

    def drop_databases(self, keep: Collection[str] = ()) -> list[str]:
        """Drop every database created here but those whose dsn is in `keep`: once its runs are measured, a database
        left behind gets autovacuumed (its freshly loaded tables) while later scenarios are timed. The names
        dropped."""
        import psycopg2

        names = [name for name, dsn in self.databases.items() if dsn not in keep]
        if not names:
            return []
        conn = psycopg2.connect(self.server.get_uri())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for name in names:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends an autovacuum on it
                    del self.databases[name]
        finally:
            conn.close()
        return names

    def cpu_seconds(self) -> float:
        """CPU time of the postmaster, its live backends and those it has reaped (in its children times)."""
        import psutil

        total = 0.0
        try:
            main = psutil.Process(self.pid)
            t = main.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system  # backends it has reaped
            for proc in main.children():
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def close(self) -> None:
        self.server.cleanup()


class MotoServer:
    """moto_server.py in a subprocess (its own process group), on 127.0.0.1 and a free port."""

    def __init__(self, log_path: Path):
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).with_name("moto_server.py")), "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=self.log, start_new_session=True, env={**os.environ, **AWS},
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                break
        match = re.match(rb"PORT (\d+)", line)
        if not match:
            self.close()
            raise RuntimeError(f"the moto server did not start; see {log_path}")
        self.endpoint = f"http://127.0.0.1:{int(match.group(1))}"

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(self.endpoint + "/_bench/counts", timeout=10) as response:
            return json.loads(response.read())

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def close(self) -> None:
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child started with start_new_session=True, by its process group id (its own pid)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def s3_client(endpoint: str, pool: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS["AWS_REGION"],
        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        config=Config(max_pool_connections=pool, retries={"mode": "standard", "max_attempts": 3}),
    )


class Services:
    """Everything one benchmark invocation started: a temporary directory, PostgreSQL (at once), the image host
    and the S3 endpoint (on first use), and the children still running; all undone by `stack`."""

    def __init__(self, stack: ExitStack, *, latency_ms: float, concurrency: int | None, extra_env: list[str]):
        self.stack = stack
        self.latency_ms = latency_ms
        self.concurrency = concurrency
        self.extra_env = extra_env
        self.tmp = Path(tempfile.mkdtemp(prefix="etl-bench-"))
        os.chmod(self.tmp, 0o755)  # pgserver runs postgres as its own user when we are root
        stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.pg = Postgres(self.tmp / "pg")
        stack.callback(self.pg.close)
        self.children: list[subprocess.Popen] = []
        stack.callback(self._stop_children)
        self._images: ImageFactory | None = None
        self._host: ImageHost | None = None
        self._moto: MotoServer | None = None

    @property
    def images(self) -> ImageFactory:
        if self._images is None:
            self._images = ImageFactory()
        return self._images

    @property
    def host(self) -> ImageHost:
        if self._host is None:
            self._host = ImageHost(self.images, self.latency_ms / 1000)
            self.stack.callback(self._host.close)
        return self._host

    @property
    def moto(self) -> MotoServer:
        if self._moto is None:
            self._moto = MotoServer(self.tmp / "moto.log")
            self.stack.callback(self._moto.close)
            client = s3_client(self._moto.endpoint, 4)
            for bucket in (BUCKET, CEILING_BUCKET, BASELINE_BUCKET):
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warm-up", Body=self.images.body(0))  # moto loads lazily
        return self._moto

    @property
    def moto_running(self) -> MotoServer | None:
        return self._moto

    def _stop_children(self) -> None:
        for proc in self.children:
            stop_process(proc)

    def env(self, dsn: str, data_dir: Path, *, s3: bool = False, **extra: str) -> dict[str, str]:
        """The environment of one `etl.py` child: this database, this data directory, S3 or the local store."""
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(self.tmp)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": dsn,
            "ETL_DATA_DIR": str(data_dir),
            "ETL_ALLOW_PRIVATE_HOSTS": "true",
            "ETL_LOG_LEVEL": "INFO",
        }
        if self.concurrency:
            env["ETL_CONCURRENCY"] = str(self.concurrency)
        if s3:
            env.update(AWS, S3_BUCKET=BUCKET, AWS_ENDPOINT_URL=self.moto.endpoint)
        env.update(extra)
        for item in self.extra_env:
            name, _, value = item.partition("=")
            env[name.strip()] = value
        return env
