"""`etl.py export`: the Parquet read back with DuckDB equals PostgreSQL, on the local store and on moto's S3;
incremental rewrites (nothing, exactly the changed partition, deletions, --since, --full); a crash leaves every
partition old or new and the next export finishes the job."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import duckdb
import psycopg2
import psycopg2.sql
import pytest
from moto import mock_aws

from etl.db import Database, upsert_media, upsert_posts
from etl.errors import ConfigError, ExitCode
from etl.export import Exporter, export, resolve_target
from etl.records import Media, Post, Sentiment
from tests.conftest import ROOT, query
from tests.support import record, write_jsonl

POST_COLUMNS = (
    "platform", "dt", "post_id", "author_username", "caption", "hashtags", "like_count", "comment_count", "permalink",
    "sentiment", "sentiment_polarity", "sentiment_subjectivity", "sentiment_version", "sentiment_skipped", "language",
    "language_source", "caption_truncated", "deleted_at_source", "image_s3_url", "created_at", "archived_at",
    "updated_at",
)  # fmt: skip
MEDIA_COLUMNS = (
    "platform", "dt", "post_id", "position", "source_url", "status", "permanent", "storage_key", "storage_url", "sha256",
    "bytes", "content_type", "width", "height", "stored_at", "post_created_at", "perceptual_hash",
    "perceptual_hash_algorithm",
)  # fmt: skip
DAY0 = datetime(2026, 11, 10, 12, 0, tzinfo=timezone.utc)
CAPTIONS = ["Loving this #sunset", "Awful queue today", "", None, "naïve café 😀 עברית 漢字", "tab\there, 'quotes' \"too\""]


def make_posts(platforms: tuple[str, ...] = ("youtube", "twitter"), days: int = 3, per_day: int = 4) -> list[Post]:
    posts = []
    for platform in platforms:
        for day in range(days):
            for n in range(per_day):
                i = len(posts)
                created = DAY0 + timedelta(days=day, hours=n * 3)
                if n == per_day - 1:  # 23:30 at UTC-5 is the next day's 04:30 in UTC: the partition is the UTC date
                    created = (DAY0 + timedelta(days=day)).replace(hour=23, minute=30, tzinfo=timezone(timedelta(hours=-5)))
                posts.append(
                    Post(
                        platform=platform, post_id=f"{platform[:2]}/{i}" if i % 5 == 0 else f"p{i}",
                        created_at=created.astimezone(timezone.utc), author_username=None if i % 7 == 0 else f"user{i % 3}",
                        caption=CAPTIONS[i % len(CAPTIONS)], like_count=None if i % 6 == 0 else i * 1000,
                        comment_count=i % 4, permalink=f"https://example.com/{i}",
                        hashtags=() if i % 3 == 0 else tuple(f"tag{j}" for j in range(i % 4)),
                        sentiment=None if i % 8 == 0 else Sentiment(round(0.1 * (i % 7) - 0.3, 6), 0.25 + i / 1000, "neutral"),
                    )
                )  # fmt: skip
    return posts


def make_media(posts: list[Post]) -> list[Media]:
    media = []
    for i, post in enumerate(posts):
        for position in range(i % 3):
            if (i + position) % 4 == 3:
                media.append(Media(post.platform, post.post_id, position, f"https://img.example/{i}/{position}",
                                   status="failed", error="HTTP 404", permanent=True))  # fmt: skip
            else:
                sha = hashlib.sha256(f"{i}-{position}".encode()).hexdigest()
                media.append(Media(post.platform, post.post_id, position, f"https://img.example/{i}/{position}", status="stored",
                                   key=f"{post.platform}/{i}/{position}.jpg", url=f"s3://b/{post.platform}/{i}/{position}.jpg",
                                   sha256=sha, bytes=1000 + i, content_type="image/jpeg", width=64 + i, height=48))  # fmt: skip
    return media


def partitions(posts: list[Post]) -> int:
    return len({(p.platform, p.created_at.astimezone(timezone.utc).date()) for p in posts})


def media_partitions(posts: list[Post], media: list[Media]) -> int:
    with_media = {(m.platform, m.post_id) for m in media}
    return partitions([p for p in posts if (p.platform, p.post_id) in with_media])


def load(db: Database, posts: list[Post], media: list[Media] = ()) -> None:
    with db.transaction() as cur:
        upsert_posts(cur, posts, sentiment_version="test-1")
        upsert_media(cur, list(media))


def norm(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(norm(v) for v in value) + "]"
    return repr(value)


def checksums(rows: list[dict], key: tuple[str, ...]) -> dict[str, object]:
    """Row count, and per column a SHA-256 of its values in key order."""
    rows = sorted(rows, key=lambda r: tuple(norm(r[k]) for k in key))
    sums: dict[str, object] = {"rows": len(rows)}
    for column in rows[0] if rows else ():
        sums[column] = hashlib.sha256("\n".join(norm(r[column]) for r in rows).encode()).hexdigest()
    return sums


def pg_rows(dsn: str, dataset: str) -> list[dict]:
    day = "(p.created_at AT TIME ZONE 'UTC')::date"
    if dataset == "posts":
        sql = f"SELECT {', '.join('p.' + c if c != 'dt' else day for c in POST_COLUMNS)} FROM social_posts p"
        columns = POST_COLUMNS
    else:
        cols = [f"m.{c}" for c in MEDIA_COLUMNS[2:-3]]
        sql = (
            f"SELECT p.platform, {day}, {', '.join(cols)}, p.created_at, m.phash, m.phash_algorithm || ':' || m.phash_version"
            " FROM post_media m JOIN social_posts p USING (platform, post_id)"
        )
        columns = MEDIA_COLUMNS
    return [dict(zip(columns, row, strict=True)) for row in query(dsn, sql)]


def lake_rows(root: Path, dataset: str) -> list[dict]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    files = str(root / dataset / "*" / "*" / "*.parquet")
    if not list(root.glob(f"{dataset}/*/*/*.parquet")):
        return []
    result = con.execute(
        f"SELECT * FROM read_parquet('{files}', hive_partitioning = true, hive_types = {{'platform': VARCHAR, 'dt': DATE}})"
    )
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def assert_lake_equals_postgres(root: Path, dsn: str) -> None:
    for dataset, key in (("posts", ("platform", "post_id")), ("media", ("platform", "post_id", "position"))):
        expected, got = pg_rows(dsn, dataset), lake_rows(root, dataset)
        assert expected, f"no {dataset} rows in PostgreSQL: the comparison would prove nothing"
        assert sorted(got[0]) == sorted(expected[0]), f"{dataset}: columns differ"
        assert checksums(got, key) == checksums(expected, key), f"{dataset}: the export differs from PostgreSQL"


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    """Path -> (inode, mtime_ns) of every partition file: a rewrite changes the inode (a new file renamed in)."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.parquet")}


@pytest.fixture
def lake(make_settings, tmp_path: Path):
    """Settings with the local store under tmp_path/data/objects, and the default export target."""
    settings = make_settings()
    return settings, resolve_target(settings, None), tmp_path / "data" / "objects" / "export"


def test_export_to_the_local_store_equals_postgres_and_a_rerun_writes_nothing(db, lake):
    settings, target, root = lake
    posts = make_posts()
    load(db, posts, make_media(posts))
    first = export(settings, db, target)
    assert first.exit_code == ExitCode.OK and not first.errors
    n = partitions(posts)
    assert n == 8  # 2 platforms x 4 UTC days (each day's 23:30 UTC-5 post falls on the next UTC day)
    assert first.written == {"posts": n, "media": n} and first.rows["posts"] == len(posts)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))[:2] == [
        "media/platform=twitter/dt=2026-11-10/part-0.parquet",
        "media/platform=twitter/dt=2026-11-11/part-0.parquet",
    ]
    assert_lake_equals_postgres(root, db.dsn)
    # Proper types: UTC timestamps, int64 counts, a list of strings, zstd.
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(next(root.glob("posts/*/*/part-0.parquet")))
    schema = meta.schema_arrow
    assert str(schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("like_count").type) == "int64"
    assert str(schema.field("hashtags").type.value_type) == "string"  # a list of strings (Parquet's LIST)
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"

    before = files_state(root)
    second = export(settings, db, target)
    assert second.written == {"posts": 0, "media": 0} and second.bytes == 0
    assert second.unchanged == {"posts": n, "media": n}
    assert files_state(root) == before
    runs = query(db.dsn, "SELECT mode, status, per_source -> 'export' -> 'written' FROM etl_runs ORDER BY id")
    assert runs == [("export", "ok", {"posts": n, "media": n}), ("export", "ok", {"posts": 0, "media": 0})]


def test_an_updated_row_appears_in_the_next_export_exactly_once(db, lake):
    settings, target, root = lake
    posts = make_posts()
    load(db, posts, make_media(posts))
    export(settings, db, target)
    before = files_state(root)
    changed = posts[5]
    load(db, [Post(**{**changed.__dict__, "like_count": 987654321, "sentiment": Sentiment(-0.75, 0.9, "negative")})])

    stats = export(settings, db, target)
    assert stats.written == {"posts": 1, "media": 0}
    after = files_state(root)
    day = changed.created_at.astimezone(timezone.utc).date().isoformat()
    rewritten = {k for k in after if after[k] != before[k]}
    assert rewritten == {f"posts/platform={changed.platform}/dt={day}/part-0.parquet"}
    rows = [r for r in lake_rows(root, "posts") if (r["platform"], r["post_id"]) == (changed.platform, changed.post_id)]
    assert len(rows) == 1
    assert (rows[0]["like_count"], rows[0]["sentiment"], rows[0]["sentiment_polarity"]) == (987654321, "negative", -0.75)
    assert_lake_equals_postgres(root, db.dsn)


def test_a_forgotten_post_leaves_the_next_export(db, lake):
    from etl.forget import find_posts, forget_posts
    from etl.store import store_from_settings

    settings, target, root = lake
    posts = make_posts()
    load(db, posts, make_media(posts))
    export(settings, db, target)
    gone = posts[4]
    assert any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts"))
    held = find_posts(db, post=(gone.platform, gone.post_id))
    forget_posts(db, store_from_settings(settings), settings, held, reason="author request")
    stats = export(settings, db, target)
    assert stats.written["posts"] == 1  # its partition, rewritten without it
    assert not any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts") + lake_rows(root, "media"))
    assert_lake_equals_postgres(root, db.dsn)


@pytest.mark.fault("a forget dies between its tombstone and its rows: the export leaves the tombstoned post out")
def test_a_tombstoned_post_is_never_exported(db, lake, monkeypatch):
    import etl.forget as forget
    from etl.store import store_from_settings

    settings, target, root = lake
    posts = make_posts()
    load(db, posts, make_media(posts))
    gone = posts[4]

    def lost(*args, **kwargs):
        raise RuntimeError("server closed the connection unexpectedly")  # after the tombstone, before the rows

    monkeypatch.setattr(forget, "delete_post_rows", lost)
    with pytest.raises(RuntimeError):
        forget.forget_posts(db, store_from_settings(settings), settings, forget.find_posts(db, post=(gone.platform, gone.post_id)), "request")
    monkeypatch.undo()
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = %s", (gone.post_id,)) == [(1,)]
    export(settings, db, target)
    assert not any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts") + lake_rows(root, "media"))


def test_an_export_since_a_day_still_takes_out_a_post_forgotten_before_it(db, lake):
    # A nightly `export --since <last week>` never looked at older partitions: a post forgotten there stayed.
    from etl.forget import find_posts, forget_posts
    from etl.store import store_from_settings

    settings, target, root = lake
    posts = make_posts(days=4)
    load(db, posts, make_media(posts))
    export(settings, db, target)
    gone = next(p for p in posts if p.created_at.date().isoformat() == "2026-11-10")
    forget_posts(db, store_from_settings(settings), settings, find_posts(db, post=(gone.platform, gone.post_id)), "request")
    since = datetime(2026, 11, 12, tzinfo=timezone.utc)
    first = export(settings, db, target, since=since)
    assert first.written["posts"] == 1 and first.unchanged["posts"] == partitions(posts) - 1  # checked all, wrote one
    assert not any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts") + lake_rows(root, "media"))
    assert_lake_equals_postgres(root, db.dsn)
    again = export(settings, db, target, since=since)  # nothing forgotten since: --since holds again
    assert again.written == {"posts": 0, "media": 0} and again.unchanged["posts"] == 6  # the partitions from the 12th


def test_a_post_forgotten_while_its_tombstone_waited_for_a_load_leaves_the_next_export_since(db, lake):
    # A tombstone waits for the loads under way (etl/db/archive.py, LOADS_LOCK). Its time was taken as its transaction
    # began, before the wait: an export that started during the wait (and exported the post) looked newer than the
    # tombstone, and no later `export --since` took the post out of its partition.
    import threading
    import time

    from etl.db.archive import LOAD_LOCK_SQL
    from etl.forget import find_posts, forget_posts
    from etl.store import store_from_settings

    settings, target, root = lake
    posts = make_posts(days=4)
    load(db, posts, make_media(posts))
    gone = next(p for p in posts if p.created_at.date().isoformat() == "2026-11-10")
    loading = psycopg2.connect(db.dsn)  # another run's load, under way
    with loading.cursor() as cur:
        cur.execute(LOAD_LOCK_SQL)

    def forget_at_source() -> None:  # as a run's ETL_DELETED_AT_SOURCE=forget does: it does not wait for runs
        other = Database(db.dsn, display="another run")
        try:
            forget_posts(other, store_from_settings(settings), settings,
                         find_posts(other, post=(gone.platform, gone.post_id)), "deleted at source")  # fmt: skip
        finally:
            other.close()

    forgetting = threading.Thread(target=forget_at_source)
    forgetting.start()
    try:
        waits = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 10
        while not query(db.dsn, waits)[0][0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert query(db.dsn, waits)[0][0], "the tombstone did not wait for the load"
        time.sleep(0.2)
        export(settings, db, target)  # the full export, while the tombstone waits: the post is still there
        assert any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts"))
    finally:
        loading.commit()  # the load commits: the tombstone goes in, the forget deletes the rows
        loading.close()
        forgetting.join(30)
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = %s", (gone.post_id,)) == [(0,)]
    export(settings, db, target, since=datetime(2026, 11, 12, tzinfo=timezone.utc))
    assert not any(r["post_id"] == gone.post_id for r in lake_rows(root, "posts") + lake_rows(root, "media"))
    assert_lake_equals_postgres(root, db.dsn)


def test_since_full_deleted_partitions_and_an_emptied_target(db, lake):
    settings, target, root = lake
    posts = make_posts(days=4)
    media = make_media(posts)
    load(db, posts, media)
    since = datetime(2026, 11, 12, tzinfo=timezone.utc)
    partial = export(settings, db, target, since=since)
    days = {p.name for p in root.glob("posts/*/*")}
    assert days == {"dt=2026-11-12", "dt=2026-11-13", "dt=2026-11-14"}  # the 11-13 23:30 UTC-5 posts are on the 14th
    assert partial.written["posts"] == 6
    rest = export(settings, db, target)
    assert partitions(posts) == 10
    assert rest.written["posts"] == 4 and rest.unchanged["posts"] == 6
    assert_lake_equals_postgres(root, db.dsn)

    full = export(settings, db, target, full=True)
    assert full.written == {"posts": 10, "media": media_partitions(posts, media)}

    # Every post of one day forgotten: its partitions are deleted, in both datasets.
    forgotten = [p for p in posts if p.platform == "twitter" and p.created_at.date().isoformat() == "2026-11-11"]
    with db.transaction() as cur:
        cur.execute("DELETE FROM social_posts WHERE platform = 'twitter' AND (created_at AT TIME ZONE 'UTC')::date = '2026-11-11'")
    gone = export(settings, db, target)
    assert gone.deleted == {"posts": 1, "media": media_partitions(forgotten, media)} == {"posts": 1, "media": 1}
    assert gone.written == {"posts": 0, "media": 0}
    assert not list(root.glob("*/platform=twitter/dt=2026-11-11/*"))
    assert_lake_equals_postgres(root, db.dsn)

    # Someone emptied the target: it is a new, empty target again, and gets everything.
    import shutil

    shutil.rmtree(root)
    kept = [p for p in posts if p not in forgotten]
    again = export(settings, db, target)
    assert again.written == {"posts": 9, "media": media_partitions(kept, media)}
    assert_lake_equals_postgres(root, db.dsn)


def test_export_to_moto_s3_equals_postgres_and_a_rerun_puts_nothing(db, make_settings, tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    posts = make_posts()
    load(db, posts, make_media(posts))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="lake")
        settings = make_settings(S3_BUCKET="lake", S3_PREFIX="social", AWS_REGION="us-east-1")
        target = resolve_target(settings, None)
        assert target.name == "s3://lake/social/export/"
        puts: list[str] = []
        target.store.client.meta.events.register("before-call.s3.PutObject", lambda params, **kw: puts.append(params["url_path"]))
        first = export(settings, db, target)
        n = partitions(posts)
        assert first.written == {"posts": n, "media": n} and len(puts) == 2 * n
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix="social/export/")["Contents"]]
        assert "social/export/posts/platform=youtube/dt=2026-11-12/part-0.parquet" in keys
        head = s3.head_object(Bucket="lake", Key=keys[0])
        assert head["ContentType"] == "application/vnd.apache.parquet"
        local = tmp_path / "download"
        for key in keys:
            path = local / key[len("social/export/") :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s3.get_object(Bucket="lake", Key=key)["Body"].read())
        assert_lake_equals_postgres(local, db.dsn)

        second = export(settings, db, target)
        assert second.written == {"posts": 0, "media": 0} and len(puts) == 2 * n

        # --to s3://BUCKET/PREFIX is a target of its own: new and empty, so it gets everything.
        other = resolve_target(settings, "s3://lake/elsewhere/")
        assert export(settings, db, other).written == {"posts": n, "media": n}

        # A --to bucket that does not exist is named as given: S3_BUCKET ("lake") is fine.
        with pytest.raises(ConfigError, match=r"^--to s3://no-such-lake does not exist$"):
            export(settings, db, resolve_target(settings, "s3://no-such-lake/x/"))


@pytest.mark.fault("an export raising after some partitions leaves each partition old or new; the next one finishes")
def test_an_exception_mid_export_leaves_partitions_old_or_new_and_the_next_export_finishes(db, lake):
    settings, target, root = lake
    posts = make_posts(days=4)
    load(db, posts, make_media(posts))
    export(settings, db, target)
    load(db, [Post(**{**p.__dict__, "like_count": (p.like_count or 0) + 7_000_000}) for p in posts])
    done: list[tuple] = []

    def crash(dataset: str, key: tuple) -> None:
        done.append((dataset, key))
        if len(done) == 3:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError):
        Exporter(settings, db, target, after_partition=crash).run()
    assert_old_or_new(root, minimum_new=3, minimum_old=1)
    finish = export(settings, db, target)
    assert finish.written["posts"] == partitions(posts) - 3
    assert_lake_equals_postgres(root, db.dsn)


def assert_old_or_new(root: Path, *, minimum_new: int, minimum_old: int) -> None:
    """Every posts partition holds only old like counts (< 7,000,000) or only new ones, each file whole."""
    new = old = 0
    for path in root.glob("posts/*/*/part-0.parquet"):
        counts = [r[0] for r in duckdb.connect().execute(f"SELECT coalesce(like_count, 0) FROM read_parquet('{path}')").fetchall()]
        states = {c >= 7_000_000 for c in counts}
        assert len(states) == 1, f"{path} mixes old and new rows"
        new, old = new + states.pop(), old + (not any(c >= 7_000_000 for c in counts))
    assert new >= minimum_new and old >= minimum_old, (new, old)


_KILLER = """
import os, signal, sys
from etl import export as ex
from etl.config import load_settings
from etl.db import Database

settings = load_settings({"ETL_DATA_DIR": sys.argv[2], "ETL_EXPORT_ROW_GROUP": "2"}, dotenv_path=None)
ex.FETCH_ROWS = 3
ex.RECORD_BATCH = 1  # each written partition recorded at once: the next export skips those
calls = 0
original = ex.PartitionWriter.add

def add(self, rows):
    global calls
    original(self, rows)
    calls += 1
    if calls == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # in the middle of a partition: its file is half-written

ex.PartitionWriter.add = add
db = Database(sys.argv[1], display="test")
ex.export(settings, db, ex.resolve_target(settings, None))
"""


@pytest.mark.fault("an export killed (SIGKILL) in the middle of a partition leaves each partition old or new")
def test_an_export_killed_mid_partition_leaves_partitions_old_or_new_and_the_next_export_finishes(db, lake, tmp_path):
    settings, target, root = lake
    posts = make_posts(days=4)
    load(db, posts, make_media(posts))
    export(settings, db, target)
    load(db, [Post(**{**p.__dict__, "like_count": (p.like_count or 0) + 7_000_000}) for p in posts])

    started = query(db.dsn, "SELECT clock_timestamp()")[0][0]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, db.dsn, str(tmp_path / "data"), "7"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = list((tmp_path / "data" / "objects" / ".incoming").glob("*.part"))
    assert leftovers, "the kill was meant to hit a partition being written"
    assert_old_or_new(root, minimum_new=1, minimum_old=1)
    done = query(db.dsn, "SELECT count(*) FROM export_partitions WHERE dataset = 'posts' AND exported_at > %s", (started,))

    finish = export(settings, db, target)
    assert 0 < finish.written["posts"] < partitions(posts)  # what the killed export finished is not written again
    assert not list((tmp_path / "data" / "objects" / ".incoming").glob("*.part"))  # swept
    assert_lake_equals_postgres(root, db.dsn)
    assert done[0][0] + finish.written["posts"] == partitions(posts)


def test_the_perceptual_hash_is_exported_once_its_column_exists(migrated, make_settings, tmp_path):
    """Another migration adds post_media's perceptual hash; the export carries it when the column exists."""
    name = "export_phash_test"
    admin = psycopg2.connect(migrated)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    dsn = psycopg2.extensions.make_dsn(migrated, dbname=name)
    db = Database(dsn, display="phash test database")
    try:
        db.migrate()
        settings = make_settings()
        target = resolve_target(settings, None)
        posts = make_posts(platforms=("mock",), days=1)
        load(db, posts, make_media(posts))
        export(settings, db, target)
        root = tmp_path / "data" / "objects" / "export"
        assert {r["perceptual_hash"] for r in lake_rows(root, "media")} == {None}
        with db.transaction() as cur:
            cur.execute(
                "UPDATE post_media SET phash = -1234567890123 - position, phash_algorithm = 'dhash', phash_version = 1"
                " WHERE status = %s", ("stored",),
            )  # fmt: skip
        stats = export(settings, db, target)
        assert stats.written == {"posts": 0, "media": 1}
        stored = [r for r in lake_rows(root, "media") if r["status"] == "stored"]
        assert stored and all(r["perceptual_hash"] == -1234567890123 - r["position"] for r in stored)
        assert {r["perceptual_hash_algorithm"] for r in stored} == {"dhash:1"}
    finally:
        db.close()


# -- bad input: the export's own name is refused as a platform -----------------------------------------


@pytest.mark.badinput("a platform named like ETL_EXPORT_PREFIX is refused, the message naming the setting")
def test_a_platform_named_like_the_export_prefix_is_refused(db, run_etl, tmp_path, make_settings):
    path = write_jsonl(
        tmp_path / "posts.jsonl",
        [record(platform="export", post_id="x", image_urls=[]), record(post_id="ok", image_urls=[])],
    )
    result = run_etl("run", "--source", "jsonl", "--input", str(path))
    assert result.returncode == ExitCode.PARTIAL, result.stdout + result.stderr
    assert "ETL_EXPORT_PREFIX" in result.stdout + result.stderr
    assert query(db.dsn, "SELECT platform, post_id FROM social_posts") == [(record()["platform"], "ok")]

    with pytest.raises(ConfigError, match="ETL_EXPORT_PREFIX"):
        make_settings(ETL_SOURCES="mock,export")
    with pytest.raises(ConfigError, match="ETL_EXPORT_PREFIX"):
        make_settings(ETL_EXPORT_PREFIX="/")
    assert make_settings(ETL_EXPORT_PREFIX="lake/parquet").reserved_platform == "lake"

    # Posts of that name archived before the prefix was changed to it: the export refuses, naming the setting.
    load(db, [Post("lake", "old", DAY0)])
    result = run_etl("export", env={"ETL_EXPORT_PREFIX": "Lake/"})
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "ETL_EXPORT_PREFIX" in result.stderr
    assert not (tmp_path / "data" / "objects" / "Lake").exists()


def test_the_export_command_end_to_end(db, run_etl, tmp_path):
    posts = make_posts(platforms=("mock",), days=2)
    load(db, posts, make_media(posts))
    first = run_etl("export", "--to", str(tmp_path / "lake"))
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    assert f"posts  partitions written {partitions(posts)} ({len(posts)} rows)" in first.stdout
    assert_lake_equals_postgres(tmp_path / "lake", db.dsn)
    second = run_etl("export", "--to", str(tmp_path / "lake"))
    assert f"posts  partitions written 0 (0 rows), unchanged {partitions(posts)}" in second.stdout
    default = run_etl("export", "--since", "2026-11-11")
    assert default.returncode == ExitCode.OK, default.stdout + default.stderr
    assert sorted(p.parent.name for p in (tmp_path / "data" / "objects" / "export").glob("posts/*/*/*.parquet")) == [
        "dt=2026-11-11", "dt=2026-11-12"
    ]  # fmt: skip
    bad = run_etl("export", "--to", "ftp://host/x")
    assert bad.returncode == ExitCode.CONFIG and "--to" in bad.stderr


def test_the_readme_documents_every_exported_column():
    from etl.export import DATASETS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Parquet export") : text.index("## Sentiment")]
    missing = [f"{d.name}.{c.name}" for d in DATASETS for c in d.columns if f"`{c.name}`" not in section]
    assert not missing, f"columns exported but not in the README's schema: {missing}"
