"""Scale-out benchmark: 1, 2 and 4 shards of one run as parallel worker processes on the same services.

    .venv/bin/python scripts/bench_scaleout.py                       # 24 streams x 40 posts, 1 image each
    .venv/bin/python scripts/bench_scaleout.py --streams 12 --posts 20 --worker-concurrency 4

Services, started here: an embedded PostgreSQL (pgserver, temporary directory), the local object store (a
temporary ETL_DATA_DIR), and one loopback HTTP host that serves the feeds of a many-stream source (`streamy`,
tests/streamy.py, loaded through ETL_SOURCE_PATHS) and its images after a fixed latency (scripts/bench.py's
ImageHost). Each worker is `etl.py run --shard K/N` with ETL_CONCURRENCY capped (--worker-concurrency), which
stands in for one machine's bandwidth. Every N starts from an empty archive. Figures are printed; nothing
asserts (tests/test_shards.py and tests/test_dags.py prove the shards' archive is exact).

This is a simulation on one machine: the workers share its cores, its PostgreSQL and its loopback, so the
speed-up stops where those do, not where a fleet of machines would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench import ImageFactory, ImageHost, machine  # noqa: E402


class FeedHost:
    """/feed/<name>: the stream's posts, newest first, each with one image of the ImageHost."""

    def __init__(self, streams: int, posts: int, images: ImageHost):
        now = datetime.now(timezone.utc).replace(microsecond=0)
        self.feeds: dict[str, bytes] = {}
        index = 0
        for s in range(streams):
            records = []
            for k in range(posts):
                records.append({
                    "platform": "streamy", "post_id": f"f{s}-{k}", "author_username": f"author{s}",
                    "caption": f"post {k} of feed {s}", "created_at": (now - timedelta(minutes=k * streams + s)).isoformat(),
                    "image_urls": [images.url(index)],
                })  # fmt: skip
                index += 1
            self.feeds[f"f{s}"] = json.dumps(records).encode()
        feeds = self.feeds

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


def empty(dsn: str) -> None:
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")
        tables = [r[0] for r in cur.fetchall()]
        if tables:
            cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    conn.close()


def count(dsn: str, sql: str) -> int:
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        value = cur.fetchone()[0]
    conn.close()
    return int(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=24)
    parser.add_argument("--posts", type=int, default=40, help="posts per stream (one image each)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--worker-concurrency", type=int, default=8, help="ETL_CONCURRENCY of each worker")
    parser.add_argument("--shards", default="1,2,4")
    args = parser.parse_args()
    import pgserver

    from etl.db import Database

    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    server = pgserver.get_server(tempfile.mkdtemp(prefix="bench-scaleout-pg-"), cleanup_mode="delete")
    images = ImageHost(ImageFactory(), args.latency_ms / 1000)
    feeds = FeedHost(args.streams, args.posts, images)
    try:
        dsn = server.get_uri()
        Database(dsn, display="bench").migrate()
        total = args.streams * args.posts
        env = {
            **os.environ, "DATABASE_URL": dsn, "ETL_SOURCES": "streamy", "ETL_SOURCE_PATHS": "tests.streamy",
            "STREAMY_BASE": feeds.base, "STREAMY_STREAMS": ",".join(f"f{s}" for s in range(args.streams)),
            "ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_CONCURRENCY": str(args.worker_concurrency),
            "ETL_PROGRESS_SECONDS": "0", "PYTHONPATH": str(ROOT),
        }  # fmt: skip
        print(f"Scale-out: {args.streams} streams x {args.posts} posts, 1 image each ({total:,} images), image latency "
              f"{args.latency_ms:g} ms, ETL_CONCURRENCY={args.worker_concurrency} per worker, local store; {machine()}")  # fmt: skip
        print("A simulation on one machine: the workers share its 2 cores, one PostgreSQL and the loopback.\n")
        print(f"{'shards':>6}  {'wall s':>7}  {'images/s':>9}  {'speed-up':>8}  {'posts':>6}  {'images':>6}")
        first = None
        for n in [int(x) for x in args.shards.split(",")]:
            empty(dsn)
            data = work / f"data{n}"
            shutil.rmtree(data, ignore_errors=True)
            started = time.monotonic()
            workers = [
                subprocess.Popen(
                    [sys.executable, str(ROOT / "etl.py"), "run", "--shard", f"{k}/{n}"],
                    env={**env, "ETL_DATA_DIR": str(data)}, cwd=work,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                for k in range(1, n + 1)
            ]
            codes = [w.wait(timeout=1800) for w in workers]
            wall = time.monotonic() - started
            posts = count(dsn, "SELECT count(*) FROM social_posts")
            stored = count(dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'")
            if any(codes) or posts != total or stored != total:
                tail = "".join((w.stderr.read() if w.stderr else "")[-800:] for w in workers)
                print(f"{n:>6}  incomplete: exit codes {codes}, {posts} posts, {stored} images\n{tail}")
                continue
            rate = stored / wall
            first = first or rate
            print(f"{n:>6}  {wall:>7.2f}  {rate:>9.1f}  {rate / first:>7.2f}x  {posts:>6}  {stored:>6}")
    finally:
        feeds.close()
        images.close()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
