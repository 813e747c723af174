"""Shards and per-stream state: plan, run --shard K/N, locked streams, retry parts, backfill --chunk-index."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from etl.db import Ledger
from etl.errors import LockedError
from etl.run.runner import Runner, RunRequest
from etl.run.services import build_sources
from etl.shards import Shard, bucket, plan_shards
from tests.conftest import query
from tests.streamy import T0, StreamyAPI
from tests.support import Reply

NAMES = [f"s{i}" for i in range(9)]


@pytest.fixture
def streamy(http_server, monkeypatch):
    api = StreamyAPI(http_server, NAMES, per_stream=4)
    for key, value in api.env().items():
        monkeypatch.setenv(key, value)
    return api


@pytest.fixture
def settings(make_settings, db):
    return make_settings(
        DATABASE_URL=db.dsn, ETL_SOURCES="streamy,mock", MOCK_POSTS="12", ETL_ALLOW_PRIVATE_HOSTS="true",
        ETL_RETRY_MAX_WAIT="0.01", ETL_HTTP_RETRIES="1", ETL_IMAGE_RETRY_BACKOFF_MINUTES="0",
    )  # fmt: skip


def run(settings, **request) -> object:
    runner = Runner(settings)
    try:
        return runner.execute(RunRequest(sources=list(settings.sources), **request))
    finally:
        runner.close()


def archive(dsn: str, objects: Path) -> dict:
    """Everything the archive holds: rows (without ids and times) and stored objects with their sha256."""
    posts = query(dsn, "SELECT platform, post_id, caption, like_count, image_s3_url, hashtags FROM social_posts ORDER BY 1, 2")
    media = query(dsn, "SELECT platform, post_id, position, storage_key, sha256, status FROM post_media ORDER BY 1, 2, 3")
    files = {str(p.relative_to(objects)): hashlib.sha256(p.read_bytes()).hexdigest() for p in objects.rglob("*") if p.is_file()}
    return {"posts": posts, "media": media, "objects": files}


def empty(dsn: str, objects: Path) -> None:
    tables = [r[0] for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")]
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    conn.close()
    shutil.rmtree(objects, ignore_errors=True)


def test_every_stream_lands_in_exactly_one_shard_by_a_stable_hash(settings, streamy):
    sources = build_sources(settings, RunRequest(sources=["streamy", "mock"]))
    for count in (1, 2, 3, 7):
        planned = plan_shards(sources, count)
        names = [u.name for _, units in planned for u in units]
        assert sorted(names) == sorted([f"streamy:feed:{n}" for n in NAMES] + ["mock"])  # each exactly once
        for shard, units in planned:
            assert all(bucket(u.name, count) == shard.index - 1 for u in units)
    assert bucket("streamy:feed:s3", 5) == int(hashlib.sha256(b"streamy:feed:s3").hexdigest()[:16], 16) % 5
    assert str(Shard.parse(" 2 / 5 ")) == "2/5"
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(Exception, match="--shard"):
            Shard.parse(bad)


def test_the_shards_together_archive_exactly_what_one_run_does(settings, streamy, db, tmp_path):
    objects = tmp_path / "data" / "objects"
    whole = run(settings)
    assert whole.status == "ok" and whole.fetched == 9 * 4 + 12
    expected = archive(db.dsn, objects)
    assert len(expected["posts"]) == 48 and len(expected["objects"]) == len([m for m in expected["media"] if m[5] == "stored"])

    empty(db.dsn, objects)
    fetched = 0
    for k in (1, 2, 3):
        stats = run(settings, shard=Shard(k, 3))
        assert stats.status == "ok"
        fetched += stats.fetched
    assert fetched == whole.fetched  # nothing fetched twice
    assert archive(db.dsn, objects) == expected  # same rows, same objects, same keys
    # Each shard's run recorded the units it held; together every unit once.
    units = [u for (us,) in query(db.dsn, "SELECT units FROM etl_runs ORDER BY id") for u in us]
    retries = [f"failed images {k}/3" for k in (1, 2, 3)]  # each shard's part of the failed-image retries
    assert sorted(units) == sorted([f"streamy:feed:{n}" for n in NAMES] + ["mock"] + retries)
    # State is per stream: one row for each stream, and mock's own.
    keys = {k for (k,) in query(db.dsn, "SELECT config_key FROM etl_state WHERE source = 'streamy'")}
    assert keys == {f"stream:feed:{n}" for n in NAMES}

    # Changing N loses nothing and fetches no image again: every stream goes on from its own state.
    hits = dict(streamy.server.hits)
    for k in (1, 2):
        stats = run(settings, shard=Shard(k, 2))
        assert stats.status == "ok" and stats.inserted == 0 and stats.images_stored == 0
    assert {p: n for p, n in streamy.server.hits.items() if p.startswith("/img/")} == {
        p: n for p, n in hits.items() if p.startswith("/img/")
    }
    assert archive(db.dsn, objects) == expected


def test_a_stream_with_no_state_adopts_its_source_state_of_before(settings, streamy, db):
    # A database of the previous version kept one row per source configuration (config_key "" for streamy).
    with db.transaction() as cur:
        cur.execute("INSERT INTO etl_state (source, config_key, watermark) VALUES ('streamy', '', %s)", (T0,))
    stats = run(replace(settings, sources=("streamy",)))
    # Only posts from the old watermark less the overlap (60 min) on are read again: the newest of each stream
    # (created T0 - n minutes) and s0's second (T0 - 60 minutes, on the boundary), not the 26 older ones.
    assert stats.fetched == 10
    rows = dict(query(db.dsn, "SELECT config_key, watermark FROM etl_state WHERE source = 'streamy' AND config_key <> ''"))
    assert rows == {f"stream:feed:s{n}": T0 - timedelta(minutes=n) for n in range(9)}


def test_locked_streams_are_skipped_and_reported_and_all_locked_is_exit_75(settings, streamy, db):
    lock, locked = Ledger(db).lock_units(["streamy:feed:s0", "streamy:feed:s1"])
    try:
        assert locked == []
        stats = run(settings)
        assert stats.status == "ok" and sorted(stats.locked_streams) == ["streamy:feed:s0", "streamy:feed:s1"]
        ids = {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts WHERE platform = 'streamy'")}
        assert not any(i.startswith(("s0-", "s1-")) for i in ids) and len(ids) == 7 * 4
        (arguments,) = query(db.dsn, "SELECT arguments FROM etl_runs ORDER BY id DESC LIMIT 1")[0]
        assert arguments["locked"] == ["streamy:feed:s0", "streamy:feed:s1"]
        # A shard that owns only locked streams does nothing and says so (exit 75 on the command line).
        sources = build_sources(settings, RunRequest(sources=["streamy"]))
        shard = next(
            s for n in range(2, 64) for s, units in plan_shards(sources, n)
            if units and {u.name for u in units} <= {"streamy:feed:s0", "streamy:feed:s1"}
        )  # fmt: skip
        narrow = replace(settings, sources=("streamy",))
        with pytest.raises(LockedError, match="streamy:feed:s0"):
            run(narrow, shard=shard)
    finally:
        lock.close()
    # Once free, the next run archives them.
    assert run(settings).status == "ok"
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'streamy'") == [(36,)]


def test_failed_image_retries_split_into_disjoint_parts(settings, streamy, db):
    broken = [f"/img/{n}-0.png" for n in NAMES]
    good = {path: streamy.server.routes[path] for path in broken}
    for path in broken:
        streamy.server.routes[path] = Reply(status=503, body=b"down", content_type="text/plain")
    first = run(settings)
    assert first.images_failed == 9
    for path in broken:
        streamy.server.routes[path] = good[path]
        streamy.server.hits.pop(path, None)
    ids = [r[0] for r in query(db.dsn, "SELECT id FROM post_media WHERE status = 'failed' ORDER BY id")]
    narrow = replace(settings, sources=())
    for k in (1, 2, 3):
        stats = run(narrow, shard=Shard(k, 3))
        assert stats.images_retried == sum(1 for i in ids if i % 3 == k - 1)
    assert all(streamy.server.hits.get(p) == 1 for p in broken)  # each image taken by exactly one part
    assert query(db.dsn, "SELECT count(*) FROM post_media WHERE status = 'failed'") == [(0,)]


def test_backfill_chunk_index_runs_one_chunk_of_many(settings, streamy, db, run_etl):
    narrow = replace(settings, sources=("streamy",))
    since, until = T0 - timedelta(hours=4), T0 + timedelta(minutes=1)  # 4 chunks of 75 minutes... and the rest
    chunk = timedelta(hours=1)
    stats = run(narrow, mode="backfill", since=since, until=until, chunk=chunk, chunk_index=1)
    created = {r[0] for r in query(db.dsn, "SELECT created_at FROM social_posts")}
    assert created and all(since + chunk <= c < since + 2 * chunk for c in created)
    done = query(db.dsn, "SELECT DISTINCT chunk_start FROM etl_backfill_chunks")
    assert done == [(since + chunk,)]
    assert stats.fetched == len(created)
    again = run(narrow, mode="backfill", since=since, until=until, chunk=chunk, chunk_index=1)
    assert again.fetched == 0  # recorded per stream, skipped by a rerun
    result = run_etl(
        "backfill", "--source", "streamy", "--since", since.isoformat(), "--until", until.isoformat(),
        "--chunk-days", str(1 / 24), "--chunk-index", "9", env={"ETL_SOURCE_PATHS": "tests.streamy", **streamy.env()},
    )  # fmt: skip
    assert result.returncode == 2 and "--chunk-index 9" in result.stderr, result.stderr


def test_plan_command_lists_the_shards(run_etl, streamy):
    env = {"ETL_SOURCES": "mock,streamy", "ETL_SOURCE_PATHS": "tests.streamy", **streamy.env()}
    result = run_etl("plan", "--shards", "3", "--json", env=env)
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert [p["shard"] for p in planned] == ["1/3", "2/3", "3/3"]
    names = sorted(u["name"] for p in planned for u in p["units"])
    assert names == sorted(["mock"] + [f"streamy:feed:{n}" for n in NAMES])
    text = run_etl("plan", "--shards", "2", env=env)
    assert text.returncode == 0 and "shard 1/2:" in text.stdout and "streamy:feed:s4" in text.stdout
    bad = run_etl("run", "--shard", "4/3", env=env)
    assert bad.returncode == 2 and "K must be between 1 and N" in bad.stderr


def test_backfill_chunks_of_one_source_run_at_once_each_under_its_own_lock(settings, streamy, db):
    # Each chunk task (the DAG's, --chunk-index) locked every stream of the source: chunks started together found
    # them all held, and were skipped ("being archived by another run") while the DAG run reported success.
    from datetime import datetime, timezone

    from etl import orchestrate
    from etl.orchestrate import COMPLETE, LOCKED

    since, until = datetime(2026, 9, 1, tzinfo=timezone.utc), datetime(2026, 9, 3, tzinfo=timezone.utc)
    narrow = replace(settings, sources=("streamy",))
    streams = [f"streamy:feed:{n}" for n in NAMES]
    lock, _ = Ledger(db).lock_units(streams)  # another chunk, or the cron run, archiving these streams now
    try:
        outcome = orchestrate.archive_chunk("streamy", since, until, 1, 1, settings=narrow)
    finally:
        lock.close()
    assert outcome.state == COMPLETE, outcome.message
    (units,) = query(db.dsn, "SELECT units FROM etl_runs WHERE mode = 'backfill'")[0]
    assert units == [f"{s} backfill 2026-09-02T00:00:00+00:00..2026-09-03T00:00:00+00:00" for s in streams]
    # The same chunk twice at once is still one at a time.
    lock, _ = Ledger(db).lock_units(units)
    try:
        assert orchestrate.archive_chunk("streamy", since, until, 1, 1, settings=narrow).state == LOCKED
    finally:
        lock.close()


def test_a_run_of_failed_image_retries_only_is_live_and_closed_when_it_died(settings, streamy, db, monkeypatch):
    # Recorded with no unit, it held no lock: `status` called it abandoned while it worked, and once dead no run
    # ever closed its record (still "running"). Its part of the retries now has a lock of its own.
    from etl import orchestrate
    from etl.run.archiver import Archiver
    from etl.status import collect_status

    dead = Ledger(db).start_run("run", [], {}, units=["failed images 1/2"])  # a retry part SIGKILLed earlier
    seen = {}

    def retry(self, stats, part=None):
        seen["live"] = [(r["id"], r["live"]) for r in collect_status(db)["in_progress"]]

    monkeypatch.setattr(Archiver, "retry_failed_images", retry)
    outcome = orchestrate.retry_images("1/2", settings=settings)
    assert outcome.state == orchestrate.COMPLETE, outcome.message
    assert seen["live"] == [(outcome.run_id, True)]  # the dead one was closed as this one started
    assert query(db.dsn, "SELECT status FROM etl_runs WHERE id = %s", (dead,)) == [("abandoned",)]
    lock, _ = Ledger(db).lock_units(["failed images 2/2"])
    try:
        assert orchestrate.retry_images("2/2", settings=settings).state == orchestrate.LOCKED
    finally:
        lock.close()
