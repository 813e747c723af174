"""Throughput benchmark of the archiver (issue 6): one command, it starts every service it needs.

    .venv/bin/python scripts/bench.py                   # 2,000 posts x 1 image, 50 ms image latency, S3 (moto)
    .venv/bin/python scripts/bench.py --metadata-only   # posts without images, target >= 5,000 posts/s
    .venv/bin/python scripts/bench.py --memory          # peak RSS of 100,000 vs 10,000 posts (metadata-only)
    .venv/bin/python scripts/bench.py --quick           # a smoke run of the images path (well under a minute)
    .venv/bin/python scripts/bench.py --export [--rows N]  # etl.py export of 1,000,000 posts (scripts/bench_export.py)

Services, all on 127.0.0.1 (PostgreSQL on a Unix socket only) and all stopped at the end, also on Ctrl-C:
- an image host (threads in this process): ~30 KB JPEG/PNG images, distinct bytes per URL, a fixed latency
  per request (--latency-ms), and a request counter;
- an S3 endpoint: moto's server app in a subprocess of its own (scripts/bench_moto.py), so that on a 2-core
  machine it has its own interpreter and GIL instead of sharing ours, and so the ETL and the ceiling meet the
  very same server; it counts requests by method (how the rerun proves it made no PUT);
- PostgreSQL: pgserver in a temporary directory, one fresh database per measured run.

What is measured, on the same services: the real `etl.py run --source jsonl --input FILE` as a subprocess
(wall time, peak RSS from wait4, CPU); the S3 endpoint's own ceiling (16 threads of bare boto3 put_object of
the same images), measured before ours and again after it, once the endpoint is warmed up (--warm-up), the
ratio being taken against the mean of the two; a serial baseline doing what a naive archiver does, per post (download, upload, TextBlob,
new connection, insert, commit) into a database of its own; a rerun with nothing new. With py-spy installed
(requirements-dev), a profiled run of the same workload gives the time per stage and the top functions (see
scripts/profile_summary.py). Figures are printed, each target marked met or missed; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_summary  # noqa: E402  (scripts/profile_summary.py, beside this file)

PYTHON = sys.executable
BUCKET, CEILING_BUCKET, BASELINE_BUCKET = "bench-archive", "bench-ceiling", "bench-baseline"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}

# Targets of issue 6.
TARGET_CEILING_SHARE = 0.80
TARGET_BASELINE_FACTOR = 15.0
TARGET_RERUN_SHARE = 0.10
TARGET_METADATA_RATE = 5000.0
TARGET_MEMORY_RATIO = 1.25
TARGET_MEMORY_MB = 300.0


# -- images ---------------------------------------------------------------------------------------


class ImageFactory:
    """~30 KB real images, distinct bytes for every index: a pool of base images, each given a unique comment
    (a JPEG COM segment, a PNG tEXt chunk) so checksums differ while every body is still a full, valid image."""

    def __init__(self, jpegs: int = 24, pngs: int = 8, seed: int = 6):
        from PIL import Image, ImageFilter

        rng = random.Random(seed)
        self.jpegs: list[bytes] = []
        self.pngs: list[bytes] = []
        for n in range(jpegs + pngs):
            png = n >= jpegs
            w, h = (200, 150) if png else (480, 360)
            gradient = Image.linear_gradient("L").resize((w, h)).rotate(rng.choice((0, 90, 180, 270)), expand=False)
            bands = []
            for _ in range(3):
                noise = Image.effect_noise((w, h), 40 if png else 64).filter(ImageFilter.GaussianBlur(1))
                bands.append(Image.blend(gradient, noise, rng.uniform(0.4, 0.6)))
            image = Image.merge("RGB", bands)
            buf = io.BytesIO()
            if png:
                image.save(buf, format="PNG")
            else:
                image.save(buf, format="JPEG", quality=80)
            (self.pngs if png else self.jpegs).append(buf.getvalue())

    @staticmethod
    def is_png(index: int) -> bool:
        return index % 4 == 3  # one image in four is a PNG

    def ext(self, index: int) -> str:
        return "png" if self.is_png(index) else "jpg"

    def content_type(self, index: int) -> str:
        return "image/png" if self.is_png(index) else "image/jpeg"

    def body(self, index: int) -> bytes:
        tag = f"bench image {index}".encode()
        if self.is_png(index):
            base = self.pngs[index % len(self.pngs)]
            chunk = b"tEXt" + b"Comment\x00" + tag
            text = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
            return base[:33] + text + base[33:]  # after the signature (8) and IHDR (25)
        base = self.jpegs[index % len(self.jpegs)]
        return base[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + base[2:]  # COM right after SOI

    @property
    def mean_kb(self) -> float:
        sizes = [len(b) for b in self.jpegs] * 3 + [len(b) for b in self.pngs]
        return sum(sizes) / len(sizes) / 1024


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


# -- synthetic posts ------------------------------------------------------------------------------

_WORDS = (
    "the a this that my our your new old first last morning evening night day week city street beach park "
    "coffee dinner lunch trip road view light rain sun snow sky river mountain friends family team crew "
    "launch release update project photo shot walk ride game match show concert album track book film "
    "with from at in on for about after before during again still just finally today tomorrow yesterday"
).split()
_MOODS = (
    "love amazing great beautiful happy awesome wonderful excellent best fun perfect good nice cool lovely "
    "bad terrible awful sad worst boring disappointing horrible angry broken tired ugly poor wrong late"
).split()
_TAGS = ("travel", "food", "photography", "nature", "music", "tech", "sports", "art", "fashion", "fitness")
PLATFORMS = ("instagram", "twitter", "youtube")


def write_posts(path: Path, count: int, images_per_post: int, host: ImageHost | None, *, seed: int = 6) -> None:
    """`count` normalized posts as JSON lines; captions differ per post so the sentiment cache cannot help."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            words = rng.choices(_WORDS, k=rng.randint(6, 24))
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_MOODS))
            if rng.random() < 0.2:
                words.append(f"@user{rng.randrange(1000)}")
            if rng.random() < 0.1:
                words.append(f"https://example.com/p/{n}")
            words.extend("#" + t for t in rng.sample(_TAGS, rng.randint(0, 3)))
            platform = PLATFORMS[n % len(PLATFORMS)]
            post = {
                "platform": platform,
                "post_id": f"bench-{n:07d}",
                "author_username": f"author{rng.randrange(5000)}",
                "caption": f"{' '.join(words)} {n}",
                "created_at": (now - timedelta(minutes=count - n)).isoformat().replace("+00:00", "Z"),
                "like_count": rng.randrange(100_000),
                "comment_count": rng.randrange(5_000),
                "permalink": f"https://{platform}.example/p/bench-{n:07d}",
                "image_urls": [host.url(n * images_per_post + k) for k in range(images_per_post)] if host else [],
            }
            out.write(json.dumps(post) + "\n")


def read_posts(path: Path, limit: int) -> list[dict[str, Any]]:
    posts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(posts) >= limit:
                break
            posts.append(json.loads(line))
    return posts


# -- services -------------------------------------------------------------------------------------


class Postgres:
    """pgserver in a temporary directory (Unix socket only); a fresh database per measured run."""

    def __init__(self, pgdata: Path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="delete")
        self.pid = self.server.get_pid()

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.server.get_uri())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.server.get_uri(database=name)

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
    """scripts/bench_moto.py in a subprocess (its own process group), on 127.0.0.1 and a free port."""

    def __init__(self, log_path: Path):
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).with_name("bench_moto.py")), "--host", "127.0.0.1", "--port", "0"],
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


# -- running etl.py -------------------------------------------------------------------------------

SUMMARY_RE = re.compile(r"summary: (.*)$", re.MULTILINE)


@dataclass
class EtlRun:
    """One `etl.py` subprocess: what it cost and what it said."""

    label: str
    returncode: int
    wall: float
    peak_rss_mb: float
    cpu: float  # user + system seconds of the ETL process
    cpu_sys: float = 0.0  # of which in the kernel
    summary: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # per-stage seconds, if the pipeline logs them
    log_path: Path | None = None
    profile: profile_summary.Profile | None = None


def parse_summary(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """`posts fetched=2000 inserted=... | images stored=... | sentiment ... | 12.3s` -> {"posts.fetched": 2000,
    ..., "seconds": 12.3}, plus any `name=1.23s` stage timings the pipeline may add."""
    matches = SUMMARY_RE.findall(text)
    if not matches:
        return {}, {}
    counts: dict[str, float] = {}
    stages: dict[str, float] = {}
    for section in matches[-1].split("|"):
        words = section.split()
        if not words:
            continue
        if len(words) == 1 and (m := re.fullmatch(r"([\d.]+)s", words[0])):
            counts["seconds"] = float(m.group(1))
            continue
        group = words[0] if "=" not in words[0] else ""
        for word in words:
            if m := re.fullmatch(r"([\w.-]+)=([\d.]+)(s?)", word):
                if m.group(3):
                    stages[f"{group}.{m.group(1)}" if group else m.group(1)] = float(m.group(2))
                else:
                    counts[f"{group}.{m.group(1)}" if group else m.group(1)] = float(m.group(2))
    return counts, stages


class Bench:
    """The services of one benchmark invocation and the runs made against them."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="etl-bench-"))
        stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.images: ImageFactory | None = None
        self.host: ImageHost | None = None
        self.moto: MotoServer | None = None
        self.pg = Postgres(self.tmp / "pg")
        stack.callback(self.pg.close)
        self.children: list[subprocess.Popen] = []
        stack.callback(self._stop_children)
        self.failed: list[str] = []  # runs of etl.py that did not exit 0

    def start_image_services(self, stack: ExitStack) -> None:
        self.images = ImageFactory()
        self.host = ImageHost(self.images, self.args.latency_ms / 1000)
        stack.callback(self.host.close)
        if self.args.store == "s3":
            self.moto = MotoServer(self.tmp / "moto.log")
            stack.callback(self.moto.close)
            client = s3_client(self.moto.endpoint, 4)
            for bucket in (BUCKET, CEILING_BUCKET, BASELINE_BUCKET):
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warm-up", Body=self.images.body(0))  # moto loads lazily

    def _stop_children(self) -> None:
        for proc in self.children:
            stop_process(proc)

    def env(self, dsn: str, data_dir: Path, **extra: str) -> dict[str, str]:
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
        if self.args.concurrency:
            env["ETL_CONCURRENCY"] = str(self.args.concurrency)
        if self.moto is not None:
            env.update(AWS, S3_BUCKET=BUCKET, AWS_ENDPOINT_URL=self.moto.endpoint)
        env.update(extra)
        for item in self.args.set:
            name, _, value = item.partition("=")
            env[name.strip()] = value
        return env

    def run_etl(
        self, label: str, input_path: Path | None, env: dict[str, str], *, profile: str | None = None, argv: tuple = ()
    ) -> EtlRun:
        """Run `etl.py run --source jsonl --input FILE` (or `etl.py ARGV`); `profile` = "wall" or "gil" runs it
        under py-spy."""
        log_path = self.tmp / f"{label}.log"
        command = [PYTHON, str(ROOT / "etl.py"), *(argv or ("run", "--source", "jsonl", "--input", str(input_path)))]
        raw_path = self.tmp / f"{label}.pyspy.txt"
        if profile:
            command = profile_summary.py_spy_command(raw_path, command, mode=profile)
        with log_path.open("wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp, start_new_session=True
            )
            self.children.append(proc)
            try:
                # wait4 gives this child's own peak RSS and CPU, exactly (no polling).
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                stop_process(proc)
                raise
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        counts, stages = parse_summary(text)
        run = EtlRun(
            label=label,
            returncode=proc.returncode,
            wall=wall,
            peak_rss_mb=usage.ru_maxrss / 1024,
            cpu=usage.ru_utime + usage.ru_stime,
            cpu_sys=usage.ru_stime,
            summary=counts,
            stages=stages,
            log_path=log_path,
        )
        if proc.returncode != 0:
            self.failed.append(f"{label} (exit {proc.returncode})")
            tail = "\n".join(text.splitlines()[-15:])
            print(f"  ! {label}: etl.py exited {proc.returncode}; last lines of {log_path}:\n{tail}", file=sys.stderr)
        if profile and raw_path.is_file():
            run.profile = profile_summary.load(raw_path, mode=profile, wall=wall)
            if self.args.profile_dir:
                shutil.copy(raw_path, self.args.profile_dir / raw_path.name)
        return run

    # -- the comparisons ----------------------------------------------------------------------------

    def warm_up(self, count: int, threads: int) -> None:
        """Bring the S3 endpoint to its steady state before anything is measured.

        moto's server stores an object faster while it holds few: on this machine 370 PUT/s for its first
        2,000 objects, then 326-338 PUT/s from the 4,000th on. Measured cold, the ceiling (run first) would
        meet an emptier, faster endpoint than ours (run second)."""
        if self.moto is None or count <= 0:
            return
        started = time.perf_counter()
        self.ceiling(count, threads, prefix="warm-up")
        seconds = time.perf_counter() - started
        print(f"bench: S3 endpoint warmed up with {count:,} PUTs ({count / seconds:,.0f}/s)", flush=True)

    def ceiling(self, image_count: int, threads: int, prefix: str = "ceiling") -> float:
        """Seconds for `threads` threads to store `image_count` images bare: boto3 put_object, or files."""
        assert self.images is not None
        images = self.images
        if self.moto is not None:
            client = s3_client(self.moto.endpoint, threads + 4)

            def put(i: int) -> None:
                client.put_object(
                    Bucket=CEILING_BUCKET, Key=f"{prefix}/{i}.{images.ext(i)}", Body=images.body(i),
                    ContentType=images.content_type(i),
                )  # fmt: skip
        else:
            root = self.tmp / prefix

            def put(i: int) -> None:
                path = root / str(i % 97) / f"{i}.{images.ext(i)}"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".part")
                tmp.write_bytes(images.body(i))
                os.replace(tmp, path)

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, range(image_count)))
        return time.perf_counter() - started

    def baseline(self, posts: list[dict[str, Any]]) -> float:
        """Seconds for a naive archiver to take `posts` serially: per post download, upload, TextBlob,
        a new connection, insert, commit (into a database of its own)."""
        import psycopg2
        import requests
        import textblob

        dsn = self.pg.create_database("bench_baseline")
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE baseline_posts (id BIGSERIAL PRIMARY KEY, platform TEXT, post_id TEXT, author TEXT,"
                " caption TEXT, sentiment TEXT, polarity DOUBLE PRECISION, image_url TEXT, like_count BIGINT,"
                " created_at TIMESTAMPTZ, archived_at TIMESTAMPTZ DEFAULT now(), UNIQUE (platform, post_id))"
            )
        conn.close()
        client = s3_client(self.moto.endpoint, 4) if self.moto is not None else None
        root = self.tmp / "baseline-objects"
        textblob.TextBlob("warm up the lexicon").sentiment  # noqa: B018  (loading it is not per post)
        started = time.perf_counter()
        for post in posts:
            urls = []
            for n, url in enumerate(post["image_urls"]):
                body = requests.get(url, timeout=30).content
                key = f"{post['platform']}/{post['post_id']}/{n}.{url.rsplit('.', 1)[-1]}"
                if client is not None:
                    client.put_object(Bucket=BASELINE_BUCKET, Key=key, Body=body)
                    urls.append(f"s3://{BASELINE_BUCKET}/{key}")
                else:
                    path = root / key
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(body)
                    urls.append(path.as_uri())
            polarity = textblob.TextBlob(post["caption"]).sentiment.polarity
            label = "positive" if polarity > 0.05 else "negative" if polarity < -0.05 else "neutral"
            conn = psycopg2.connect(dsn)
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO baseline_posts (platform, post_id, author, caption, sentiment, polarity, image_url,"
                    " like_count, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (platform, post_id) DO NOTHING",
                    (post["platform"], post["post_id"], post["author_username"], post["caption"], label, polarity,
                     urls[0] if urls else None, post["like_count"], post["created_at"]),
                )  # fmt: skip
            conn.commit()
            conn.close()
        return time.perf_counter() - started

    def etl_startup(self) -> float:
        """Wall seconds of `etl.py --version`: the interpreter plus every import, before any work."""
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, str(ROOT / "etl.py"), "--version"], env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
            cwd=self.tmp, capture_output=True, check=False,
        )  # fmt: skip
        return time.perf_counter() - started


def verify(dsn: str) -> tuple[int, int]:
    """(rows in social_posts, images stored in post_media) of a run's database."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM social_posts")
            posts = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM post_media WHERE status = 'stored'")
            media = cur.fetchone()[0]
    except psycopg2.Error:  # a run that failed before migrating
        return 0, 0
    finally:
        conn.close()
    return posts, media


def newest_mtime(root: Path) -> float:
    newest = 0.0
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file():
                newest = max(newest, path.stat().st_mtime)
    return newest


@contextmanager
def cpu_meter(bench: Bench) -> Iterator[dict[str, float]]:
    """CPU seconds spent meanwhile by the S3 endpoint, PostgreSQL, this process (image host, clients) and the
    whole machine ("busy", in core-seconds), so that load from other processes can be told apart."""
    import psutil

    out: dict[str, float] = {}
    machine0 = psutil.cpu_times()
    moto0 = bench.moto.cpu_seconds() if bench.moto else 0.0
    pg0 = bench.pg.cpu_seconds()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    yield out
    out["wall"] = time.perf_counter() - started
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    out["s3"] = (bench.moto.cpu_seconds() - moto0) if bench.moto else 0.0
    out["postgres"] = max(bench.pg.cpu_seconds() - pg0, 0.0)
    out["bench"] = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    machine1 = psutil.cpu_times()
    idle = (machine1.idle - machine0.idle) + (machine1.iowait - machine0.iowait)
    out["busy"] = max(sum(machine1) - sum(machine0) - idle, 0.0)


def others(cpu: dict[str, float], etl: float = 0.0) -> float:
    """Core-seconds used meanwhile by processes that are not part of the benchmark."""
    return max(cpu["busy"] - cpu["s3"] - cpu["postgres"] - cpu["bench"] - etl, 0.0)


def load_note(cpu: dict[str, float], etl: float = 0.0) -> str:
    foreign = others(cpu, etl)
    share = foreign / (cpu["wall"] or 1)
    note = f"machine {cpu['busy'] / (cpu['wall'] or 1) / (os.cpu_count() or 1) * 100:.0f}% busy"
    if share > 0.1:
        note += f"; OTHER PROCESSES used {share:.1f} cores meanwhile: figures disturbed"
    return note


# -- report ---------------------------------------------------------------------------------------


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


class Table:
    def __init__(self, title: str):
        self.title = title
        self.lines: list[str] = []

    def rule(self) -> None:
        self.lines.append("-" * 104)

    def row(self, *cells: str, widths: tuple[int, ...] = (38, 11, 11, 9, 10, 25)) -> None:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1], strict=False)]
        if len(cells) > 1:
            parts.append("  " + cells[-1])
        self.lines.append(" ".join(parts).rstrip())

    def text(self, line: str = "") -> None:
        self.lines.append(line)

    def target(self, name: str, measured: str, goal: str, ok: bool | None) -> None:
        self.lines.append(f"{name.ljust(44)} {measured.rjust(16)} {goal.rjust(14)}   {mark(ok)}")

    def print(self) -> None:
        print()
        print(self.title)
        print("=" * 104)
        print("\n".join(self.lines))
        sys.stdout.flush()


def default_concurrency() -> str:
    try:
        sys.path.insert(0, str(ROOT))
        from etl.config import Settings

        return f"{Settings().concurrency} (its default)"
    except Exception:  # only a label: never stop the benchmark for it
        return "its default"


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, code {code_version()}{BUSY_NOTE}"


BUSY_NOTE = ""


def check_quiet() -> None:
    """Warn when other processes keep the machine busy: every figure here depends on free cores."""
    global BUSY_NOTE
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    if busy > 20:
        BUSY_NOTE = f"\nWARNING: the machine was {busy:.0f}% busy before the benchmark started (other processes)"
        print(BUSY_NOTE.strip(), file=sys.stderr)


def code_version() -> str:
    """The commit measured, and whether the working tree had changes to etl/ on top of it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "etl", "sql"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except OSError:
        return "unknown"
    return (commit.strip() or "unknown") + (" + uncommitted changes" if dirty.strip() else "")


def stage_lines(table: Table, run: EtlRun) -> None:
    """Per-stage seconds: the pipeline's own, else a py-spy profile of the same workload, else a hint."""
    if run.stages:
        table.text("per stage (the pipeline's own timers):")
        for name, seconds in run.stages.items():
            table.text(f"  {name:<40} {seconds:8.2f} s")
        return
    profile = run.profile
    if profile is None:
        hint = (
            "run without --quick/--no-profile" if profile_summary.available() else "install py-spy (requirements-dev)"
        )
        table.text(f"per stage: not logged by the pipeline; {hint} for a profiled run")
        return
    table.text(
        f"per stage: not logged by the pipeline; from a py-spy profile of a separate run of the same workload "
        f"({profile.wall:.1f} s wall, {profile.samples:,} samples)"
    )
    table.text("  main thread (the critical path), share of its wall time:")
    for name, share in profile.main_stages():
        table.text(f"    {name:<46} {share * 100:5.1f} %  ~{share * profile.wall:6.2f} s")
    workers = profile.worker_stages()
    if workers:
        table.text(f"  image workers ({profile.worker_threads} threads), share of their summed time:")
        for name, share in workers:
            table.text(f"    {name:<46} {share * 100:5.1f} %")


# -- the sections ---------------------------------------------------------------------------------


def profile_reports(table: Table, profiled: dict[str, EtlRun], top: int) -> None:
    """The py-spy report of each profiled run (mode: wall or gil), after the table's figures."""
    for mode, run in profiled.items():
        if run.profile is not None:
            table.text("")
            table.lines.extend(run.profile.report(mode, top=top))


def images_section(bench: Bench, stack: ExitStack) -> Table:
    args = bench.args
    bench.start_image_services(stack)
    assert bench.images is not None and bench.host is not None
    n, k = args.posts, args.images_per_post
    posts_path = bench.tmp / "posts.jsonl"
    write_posts(posts_path, n, k, bench.host)
    image_count = n * k
    concurrency = args.concurrency or default_concurrency()
    store = "S3 (moto server, own process)" if bench.moto else "local store"
    table = Table(
        f"Images path: {n:,} posts x {k} image(s) (~{bench.images.mean_kb:.0f} KB, JPEG/PNG), image latency "
        f"{args.latency_ms:g} ms, {store}, ETL_CONCURRENCY={concurrency}; {machine()}"
    )

    # The S3 endpoint's own ceiling, on the same images: measured before ours and again after it, in its
    # steady state (warmed up), so a drift of the endpoint during the benchmark cancels out.
    bench.warm_up(args.warm_up, args.ceiling_threads)
    with cpu_meter(bench) as ceiling_cpu:
        ceiling_s = bench.ceiling(image_count, args.ceiling_threads, prefix="ceiling-before")

    # Ours, first run.
    dsn = bench.pg.create_database("bench_run")
    data_dir = bench.tmp / "data"
    env = bench.env(dsn, data_dir)
    host0, moto0 = bench.host.requests, bench.moto.counts() if bench.moto else {}
    with cpu_meter(bench) as first_cpu:
        first = bench.run_etl("first-run", posts_path, env)
    host1, moto1 = bench.host.requests, bench.moto.counts() if bench.moto else {}
    posts_loaded, media_stored = verify(dsn)

    # Rerun, nothing new.
    mtime0 = newest_mtime(data_dir / "objects")
    with cpu_meter(bench):
        rerun = bench.run_etl("rerun", posts_path, env)
    host2, moto2 = bench.host.requests, bench.moto.counts() if bench.moto else {}
    rerun_image_requests = host2 - host1
    rerun_puts = (
        (moto2.get("PUT", 0) - moto1.get("PUT", 0)) if bench.moto else int(newest_mtime(data_dir / "objects") > mtime0)
    )

    # The ceiling again: the rerun stored nothing, so the endpoint holds what it held right after ours.
    ceiling_after_s = bench.ceiling(image_count, args.ceiling_threads, prefix="ceiling-after")
    ceiling_rates = (image_count / ceiling_s, image_count / ceiling_after_s)
    ceiling_rate = sum(ceiling_rates) / 2

    # The naive serial archiver, on a slice of the same posts.
    slice_n = min(args.baseline_posts, n)
    with cpu_meter(bench) as baseline_cpu:
        baseline_s = bench.baseline(read_posts(posts_path, slice_n))
    baseline_rate = slice_n / baseline_s

    startup = bench.etl_startup()

    # A profiled run of the same workload (fresh database and key prefix), for the per-stage split.
    profiled: dict[str, EtlRun] = {}
    if args.profile and profile_summary.available():
        for mode in ("wall", "gil"):
            pdsn = bench.pg.create_database(f"bench_profile_{mode}")
            penv = bench.env(pdsn, bench.tmp / f"data-{mode}", S3_PREFIX=f"profile-{mode}/")
            profiled[mode] = bench.run_etl(f"profile-{mode}", posts_path, penv, profile=mode)
        first.profile = profiled["wall"].profile
        # And a rerun of the wall-profiled one: where a run with nothing new spends its time.
        rerun.profile = bench.run_etl("profile-rerun", posts_path, penv, profile="wall").profile

    ours_posts, ours_images = n / first.wall, image_count / first.wall
    table.row("", "posts/s", "images/s", "wall s", "peak RSS", "notes")
    table.rule()
    table.row(
        "ours: etl.py run (first run)", fmt_rate(ours_posts), fmt_rate(ours_images), f"{first.wall:.2f}",
        f"{first.peak_rss_mb:.0f} MB",
        f"exit {first.returncode}; loaded {posts_loaded:,} posts, {media_stored:,} images",
    )  # fmt: skip
    pipeline_s = first.summary.get("seconds")
    if pipeline_s:
        table.row(
            "  same, pipeline's own seconds", fmt_rate(n / pipeline_s), fmt_rate(image_count / pipeline_s),
            f"{pipeline_s:.2f}", "", f"excludes start-up ({startup:.2f} s: interpreter + imports)",
        )  # fmt: skip
    what, how = (
        ("S3 ceiling", f"{args.ceiling_threads} threads of bare put_object, {image_count:,} PUTs") if bench.moto else
        ("store ceiling", f"{args.ceiling_threads} threads writing {image_count:,} files")
    )  # fmt: skip
    for when, rate in zip(("before ours", "after ours"), ceiling_rates, strict=True):
        table.row(f"{what}, {when}", fmt_rate(rate / k), fmt_rate(rate), f"{image_count / rate:.2f}", "", how)
    table.row(
        "  ceiling: mean of the two", fmt_rate(ceiling_rate / k), fmt_rate(ceiling_rate), "", "",
        f"after {args.warm_up:,} warm-up PUTs" if bench.moto and args.warm_up > 0 else "",
    )  # fmt: skip
    table.row(
        f"serial baseline ({slice_n} posts)", fmt_rate(baseline_rate), fmt_rate(baseline_rate * k), f"{baseline_s:.2f}", "",
        "download, put, TextBlob, connect, insert, commit",
    )  # fmt: skip
    table.row(
        "rerun, nothing new", fmt_rate(n / rerun.wall), "-", f"{rerun.wall:.2f}", f"{rerun.peak_rss_mb:.0f} MB",
        f"exit {rerun.returncode}; {rerun_image_requests} image requests, {rerun_puts} PUTs",
    )  # fmt: skip
    table.rule()
    table.text(
        f"CPU seconds, first run: etl {first.cpu:.1f} ({first.cpu / first.wall * 100:.0f}% of one core, "
        f"{first.cpu_sys:.1f} of it in the kernel), "
        + (f"S3 endpoint {first_cpu['s3']:.1f} ({first_cpu['s3'] / first.wall * 100:.0f}%), " if bench.moto else "")
        + f"postgres {first_cpu['postgres']:.1f}, image host {first_cpu['bench']:.1f}; {load_note(first_cpu, first.cpu)}"
    )
    if bench.moto:
        table.text(
            f"CPU seconds, ceiling before ours: S3 endpoint {ceiling_cpu['s3']:.1f} ({ceiling_cpu['s3'] / ceiling_s * 100:.0f}% of one core), "
            f"boto3 client threads {ceiling_cpu['bench']:.1f} ({ceiling_cpu['bench'] / ceiling_s * 100:.0f}%); "
            f"{load_note(ceiling_cpu)}"
        )
    table.text(f"CPU during the serial baseline: {load_note(baseline_cpu)}")
    if bench.moto:
        table.text(
            f"requests seen by the S3 endpoint, first run: {moto1.get('total', 0) - moto0.get('total', 0):,} ("
            + ", ".join(
                f"{m} {moto1[m] - moto0.get(m, 0):,}"
                for m in sorted(moto1)
                if m != "total" and moto1[m] > moto0.get(m, 0)
            )
            + f"); image host: {host1 - host0:,}"
        )
    counted = first.summary
    table.text(
        "first run's summary: " + ", ".join(f"{key}={int(value)}" for key, value in counted.items() if key != "seconds")
    )
    table.rule()
    table.text(f"{'target':<44} {'measured':>16} {'goal':>14}   status")
    if args.quick:
        table.text("(--quick: a smoke run; at this size start-up dominates and the targets say little)")
    # A speed figure of a run that did not archive everything is no verdict: n/a.
    complete = first.returncode == 0 and posts_loaded == n and media_stored == image_count
    valid = None if not complete else True
    share = ours_images / ceiling_rate
    table.target(
        "ours / S3 ceiling (images/s)" if bench.moto else "ours / local-store ceiling (images/s)",
        f"{share * 100:.0f}% ({ours_images / max(ceiling_rates) * 100:.0f}-{ours_images / min(ceiling_rates) * 100:.0f}%)",
        f">= {TARGET_CEILING_SHARE * 100:.0f}%" if bench.moto else "(S3 only)",
        share >= TARGET_CEILING_SHARE if bench.moto and valid else None,
    )
    factor = ours_posts / baseline_rate
    table.target(
        "ours / serial baseline (posts/s)",
        f"{factor:.1f}x",
        f">= {TARGET_BASELINE_FACTOR:.0f}x",
        factor >= TARGET_BASELINE_FACTOR if valid else None,
    )
    rerun_share = rerun.wall / first.wall
    table.target(
        "rerun / first run (wall time)",
        f"{rerun_share * 100:.0f}%",
        f"<= {TARGET_RERUN_SHARE * 100:.0f}%",
        rerun_share <= TARGET_RERUN_SHARE if valid and rerun.returncode == 0 else None,
    )
    table.target(
        "rerun: image requests / object PUTs", f"{rerun_image_requests} / {rerun_puts}", "0 / 0",
        rerun_image_requests == 0 and rerun_puts == 0 if valid and rerun.returncode == 0 else None,
    )  # fmt: skip
    table.target(
        "first run complete (exit 0, every row/image)", f"{posts_loaded}/{media_stored}", f"{n}/{image_count}", complete
    )
    table.rule()
    stage_lines(table, first)
    if rerun.profile is not None:
        table.text("")
        table.text(f"rerun, nothing new: main thread, share of its wall time ({rerun.profile.wall:.1f} s, profiled)")
        for name, share in rerun.profile.main_stages():
            if share >= 0.005:
                table.text(f"    {name:<46} {share * 100:5.1f} %  ~{share * rerun.profile.wall:6.2f} s")
    profile_reports(table, profiled, args.top)
    return table


def metadata_section(bench: Bench) -> Table:
    args = bench.args
    n = args.posts if args.posts_given else args.metadata_posts
    posts_path = bench.tmp / "metadata.jsonl"
    write_posts(posts_path, n, 0, None)
    table = Table(f"Metadata-only path: {n:,} posts without images, into PostgreSQL; {machine()}")
    dsn = bench.pg.create_database("bench_metadata")
    env = bench.env(dsn, bench.tmp / "data-metadata")
    with cpu_meter(bench) as cpu:
        first = bench.run_etl("metadata-first", posts_path, env)
    rerun = bench.run_etl("metadata-rerun", posts_path, env)
    # A re-enrichment of every stored post: another threshold is another enricher version, so all are re-scored.
    reenrich = bench.run_etl("metadata-reenrich", None, {**env, "SENTIMENT_THRESHOLD": "0.0625"}, argv=("reenrich",))
    reenrich_text = reenrich.log_path.read_text(encoding="utf-8", errors="replace") if reenrich.log_path else ""
    scored = re.search(r"re-enriched (\d+) posts, (\d+) changed", reenrich_text)
    posts_loaded, _ = verify(dsn)
    startup = bench.etl_startup()
    profiled: dict[str, EtlRun] = {}
    if args.profile and profile_summary.available():
        for mode in ("wall", "gil"):
            pdsn = bench.pg.create_database(f"bench_metadata_profile_{mode}")
            profiled[mode] = bench.run_etl(
                f"metadata-profile-{mode}", posts_path, bench.env(pdsn, bench.tmp / "data-p"), profile=mode
            )
        first.profile = profiled["wall"].profile

    table.row("", "posts/s", "", "wall s", "peak RSS", "notes")
    table.rule()
    table.row("ours: first run (inserts)", fmt_rate(n / first.wall), "", f"{first.wall:.2f}", f"{first.peak_rss_mb:.0f} MB",
              f"exit {first.returncode}; {posts_loaded:,} rows")  # fmt: skip
    if first.summary.get("seconds"):
        s = first.summary["seconds"]
        table.row(
            "  same, pipeline's own seconds", fmt_rate(n / s), "", f"{s:.2f}", "", f"start-up {startup:.2f} s excluded"
        )
    table.row("ours: rerun (all unchanged)", fmt_rate(n / rerun.wall), "", f"{rerun.wall:.2f}", f"{rerun.peak_rss_mb:.0f} MB",
              f"exit {rerun.returncode}")  # fmt: skip
    rescored = int(scored.group(1)) if scored else 0
    table.row("reenrich (every post re-scored)", fmt_rate(rescored / reenrich.wall) if rescored else "-", "",
              f"{reenrich.wall:.2f}", f"{reenrich.peak_rss_mb:.0f} MB",
              f"exit {reenrich.returncode}; {rescored:,} scored, {int(scored.group(2)) if scored else 0:,} changed")  # fmt: skip
    table.rule()
    table.text(
        f"CPU seconds, first run: etl {first.cpu:.1f} ({first.cpu / first.wall * 100:.0f}% of one core), "
        f"postgres {cpu['postgres']:.1f}; {load_note(cpu, first.cpu)}"
    )
    table.rule()
    table.text(f"{'target':<44} {'measured':>16} {'goal':>14}   status")
    rate = n / first.wall
    table.target(
        "metadata-only, end to end (first run)",
        f"{rate:,.0f}/s",
        f">= {TARGET_METADATA_RATE:,.0f}/s",
        rate >= TARGET_METADATA_RATE if first.returncode == 0 and posts_loaded == n else None,
    )
    table.target(
        "complete (exit 0, every row)", f"{posts_loaded:,}", f"{n:,}", first.returncode == 0 and posts_loaded == n
    )
    table.rule()
    stage_lines(table, first)
    profile_reports(table, profiled, args.top)
    return table


def memory_section(bench: Bench) -> Table:
    args = bench.args
    small, large = args.memory_posts
    table = Table(
        f"Memory flatness: peak RSS of the ETL process, metadata-only, {small:,} vs {large:,} posts; {machine()}"
    )
    runs = []
    for n in (small, large):
        path = bench.tmp / f"memory-{n}.jsonl"
        write_posts(path, n, 0, None)
        dsn = bench.pg.create_database(f"bench_memory_{n}")
        run = bench.run_etl(f"memory-{n}", path, bench.env(dsn, bench.tmp / f"data-mem-{n}"))
        loaded, _ = verify(dsn)
        runs.append((n, run, loaded))
        path.unlink()
    table.row("", "posts/s", "", "wall s", "peak RSS", "notes")
    table.rule()
    for n, run, loaded in runs:
        table.row(f"{n:,} posts", fmt_rate(n / run.wall), "", f"{run.wall:.2f}", f"{run.peak_rss_mb:.0f} MB",
                  f"exit {run.returncode}; {loaded:,} rows")  # fmt: skip
    table.rule()
    ratio = runs[1][1].peak_rss_mb / runs[0][1].peak_rss_mb
    valid = None if any(run.returncode != 0 or loaded != n for n, run, loaded in runs) else True
    table.text(f"{'target':<44} {'measured':>16} {'goal':>14}   status")
    table.target(
        f"peak RSS {large:,} / {small:,} posts",
        f"{ratio:.2f}x",
        f"<= {TARGET_MEMORY_RATIO}x",
        ratio <= TARGET_MEMORY_RATIO if valid else None,
    )
    table.target(f"peak RSS at {large:,} posts", f"{runs[1][1].peak_rss_mb:.0f} MB", f"< {TARGET_MEMORY_MB:.0f} MB",
                 runs[1][1].peak_rss_mb < TARGET_MEMORY_MB if valid else None)  # fmt: skip
    return table


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, help="posts in the run (default 2,000; metadata-only 20,000)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="image host latency per request (default 50)")
    parser.add_argument("--images-per-post", type=int, default=1, help="images per post (default 1)")
    parser.add_argument("--store", choices=("s3", "local"), default="s3", help="object store of the ETL (default s3)")
    parser.add_argument("--concurrency", type=int, help="ETL_CONCURRENCY for the ETL (default: its own)")
    parser.add_argument("--ceiling-threads", type=int, default=16, help="threads of the S3 ceiling (default 16)")
    parser.add_argument(
        "--warm-up", type=int, help="PUTs that bring the S3 endpoint to its steady state first (default 4,000)"
    )
    parser.add_argument("--baseline-posts", type=int, default=100, help="posts of the serial baseline (default 100)")
    parser.add_argument("--metadata-only", action="store_true", help="posts without images (target >= 5,000 posts/s)")
    parser.add_argument("--memory", action="store_true", help="peak RSS, 100,000 vs 10,000 posts, metadata-only")
    parser.add_argument("--memory-posts", type=int, nargs=2, default=(10_000, 100_000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--all", action="store_true", help="the images path, metadata-only and memory, in one go")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small N, no profile")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy profiled runs")
    parser.add_argument("--profile-dir", type=Path, help="keep the raw py-spy profiles (collapsed stacks) here")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile (default 15)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="extra environment for etl.py")
    args = parser.parse_args(argv)
    args.posts_given = args.posts is not None
    if args.warm_up is None:
        args.warm_up = 200 if args.quick else 4_000
    if args.quick:
        args.posts = args.posts or 150
        args.baseline_posts = min(args.baseline_posts, 20)
        args.metadata_posts = args.posts if args.posts_given else 2_000
        args.memory_posts = (1_000, 5_000) if tuple(args.memory_posts) == (10_000, 100_000) else args.memory_posts
        args.profile = False
    else:
        args.posts = args.posts or 2_000
        args.metadata_posts = 20_000
    if args.posts < 1 or args.images_per_post < 0 or args.latency_ms < 0:
        parser.error("--posts must be positive, --images-per-post and --latency-ms not negative")
    if args.images_per_post == 0:
        args.metadata_only = True
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--export" in argv:  # the Parquet export at scale: a scenario of its own (scripts/bench_export.py)
        import bench_export

        return bench_export.main([a for a in argv if a != "--export"])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    sections = []
    if args.all or not (args.metadata_only or args.memory):
        sections.append("images")
    if args.all or args.metadata_only:
        sections.append("metadata")
    if args.all or args.memory:
        sections.append("memory")
    if args.profile and not profile_summary.available():
        print("note: py-spy is not installed; no per-stage profile (pip install py-spy)", file=sys.stderr)
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            check_quiet()
            bench = Bench(args, stack)
            for name in sections:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                if name == "images":
                    images_section(bench, stack).print()
                elif name == "metadata":
                    metadata_section(bench).print()
                else:
                    memory_section(bench).print()
    except KeyboardInterrupt:
        print("\nbench: interrupted; services stopped", file=sys.stderr)
        return 130
    print(f"\nbench: done in {time.perf_counter() - started:.0f} s; every service stopped", file=sys.stderr)
    if bench.failed:
        # Not a speed verdict: the figures above are of runs that did not archive everything.
        print(f"bench: etl.py failed in: {', '.join(bench.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
