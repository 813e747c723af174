"""Benchmark of the insights (issue 14) at scale: `similar`, `trends` and `report` over N posts and images.

    .venv/bin/python scripts/bench_insights.py               # 1,000,000 posts, one image each
    .venv/bin/python scripts/bench_insights.py --posts 50000 # a quick run

Rows are generated in SQL inside a fresh embedded PostgreSQL (pgserver, temporary directory): posts over 60 days
on four platforms with hashtags from a Zipf-like vocabulary, one stored image each with a random 64-bit hash;
one image in 50 is shared by several posts (same sha256) and one in 100 has a near copy (a few bits flipped).
Measured: the `similar` lookup (image_sightings) for 200 random posts, hashtag_trends, and `etl.py report`
as a real subprocess. Figures are printed; nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENERATE = """
INSERT INTO social_posts (platform, post_id, author_username, caption, sentiment, like_count, comment_count, hashtags, created_at)
SELECT (ARRAY['youtube','twitter','instagram','mastodon'])[1 + n %% 4], 'p' || n, 'user' || (n * 7919 %% 50000),
       'caption ' || n, (ARRAY['positive','neutral','negative'])[1 + (n * 31) %% 3], (n * 37) %% 5000, (n * 13) %% 300,
       ARRAY['tag' || floor(power(random(), 3) * 2000)::int, 'tag' || floor(power(random(), 3) * 2000)::int],
       now() - (random() * interval '60 days')
FROM generate_series(1::bigint, %(n)s) n;
INSERT INTO post_media (platform, post_id, position, source_url, storage_key, storage_url, sha256, bytes, content_type,
                        status, phash, phash_algorithm, phash_version)
SELECT platform, post_id, 0, 'https://img.example/' || post_id,
       platform || '/k/' || post_id || '/0.jpg', 's3://b/' || post_id,
       CASE WHEN id %% 50 = 0 THEN md5((id %% 5000)::text) ELSE md5(id::text) END, 30000, 'image/jpeg', 'stored',
       CASE WHEN id %% 50 = 0 THEN hashtextextended((id %% 5000)::text, 0)
            WHEN id %% 100 = 1 THEN hashtextextended((id - 1)::text, 0) # (1::bigint << (id %% 60)::int) # (1::bigint << 61)
            ELSE hashtextextended(id::text, 0) END,
       'dhash', 1
FROM social_posts;
ANALYZE social_posts; ANALYZE post_media;
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()
    import pgserver
    import psycopg2

    from etl.db import Database

    pgdata = tempfile.mkdtemp(prefix="bench-insights-pg-")
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        dsn = server.get_uri()
        db = Database(dsn, display="bench")
        db.migrate()
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SHOW server_version")
        print(f"PostgreSQL {cur.fetchone()[0]}; generating {args.posts:,} posts and images in SQL ...", flush=True)
        t = time.perf_counter()
        cur.execute(GENERATE, {"n": args.posts})
        print(f"  generated in {time.perf_counter() - t:.1f}s", flush=True)

        cur.execute("SELECT platform, post_id FROM social_posts ORDER BY random() LIMIT %s", (args.lookups,))
        targets = cur.fetchall()
        times, found = [], 0
        for platform, post_id in targets:
            t = time.perf_counter()
            cur.execute("SELECT * FROM image_sightings(%s, %s, 5)", (platform, post_id))
            found += len(cur.fetchall())
            times.append(time.perf_counter() - t)
        times.sort()
        print(
            f"similar (image_sightings, distance 5), {len(targets)} random posts: median {statistics.median(times) * 1000:.1f} ms,"
            f" p95 {times[int(len(times) * 0.95)] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms ({found} sightings)"
        )
        t = time.perf_counter()
        cur.execute("SELECT count(*) FROM hashtag_trends('24 hours', '28 days', NULL, 5, now())")
        print(f"trends (24h vs 28d, all platforms): {time.perf_counter() - t:.2f}s, {cur.fetchone()[0]} hashtags ranked")
        conn.close()

        env = {**os.environ, "DATABASE_URL": dsn, "ETL_DATA_DIR": pgdata + "-data", "PYTHONPATH": str(ROOT)}
        out = Path(pgdata + "-data") / "report.html"
        t = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), "report", "--out", str(out)], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t
        print(f"report (etl.py report, whole archive): {wall:.1f}s wall; {result.stdout.strip().splitlines()[-1] if result.stdout else result.stderr[-500:]}")
        return result.returncode
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
