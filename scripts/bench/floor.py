"""The least a Python rerun with nothing new can do (issue 16), timed beside ours: `python floor.py POSTS.jsonl
[--import MODULE,MODULE...]`.

The interpreter, psycopg2, one connection (DATABASE_URL), the schema's version read, every post of the file read,
and the posts and their images looked up in two queries, as a rerun must before it can tell that nothing is new.
Nothing else: no settings, lock, ledger, stream state, validation, log or summary. What ours spends beyond this is
what our own code costs; this much any Python client of the same archive spends. Prints what it found.

`--import` loads these modules first (the benchmark passes the standard-library and third-party modules a rerun
of ours loaded, none of our own): the floor of a client built from the same parts, before any code of ours runs.
"""

from __future__ import annotations

import json
import os
import sys


def _literal(values: list[str]) -> str:
    """A text[] literal of plain values (the benchmark's ids)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def main(path: str, imports: list[str]) -> int:
    if "ssl" not in imports:  # as etl/db does: a Unix socket needs no TLS (a rerun that loaded it, for S3, did not)
        sys.modules["ssl"] = None  # type: ignore[assignment]
    import importlib

    import psycopg2

    for name in imports:
        importlib.import_module(name)

    platforms, post_ids = [], []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                post = json.loads(line)
                platforms.append(str(post["platform"]))
                post_ids.append(str(post["post_id"]))
    keys = (_literal(platforms), _literal(post_ids))
    conn = psycopg2.connect(os.environ["DATABASE_URL"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM schema_migrations")
            cur.execute(
                "SELECT p.platform, p.post_id, p.caption, p.sentiment_version, p.like_count, p.comment_count,"
                " p.permalink, p.hashtags, p.image_s3_url FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)"
                " JOIN social_posts p USING (platform, post_id)",
                keys,
            )
            posts = cur.fetchall()
            cur.execute(
                "SELECT m.platform, m.post_id, m.position, m.status, m.storage_key, m.source_url"
                " FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id) JOIN post_media m USING (platform, post_id)",
                keys,
            )
            images = cur.fetchall()
    finally:
        conn.close()
    loaded = f", {len(imports)} modules loaded first" if imports else ""
    print(f"{len(post_ids)} posts read, {len(posts)} held, {len(images)} images held{loaded}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    modules = args[args.index("--import") + 1].split(",") if "--import" in args else []
    sys.exit(main(args[0], [m for m in modules if m]))
