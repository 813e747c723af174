"""Operations: locks, watermarks, backfill resume, re-enrichment, failed-image healing, logs, metrics, status."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from etl import sources as registry
from etl.db import Ledger, StreamState
from etl.db.ledger import release_locks
from etl.errors import SourceError
from etl.records import Post
from etl.run.runner import Runner, RunRequest, backfill_chunks
from etl.run.stats import RunStats, StageClock
from etl.sources.base import FetchWindow, Source
from etl.status import collect_status, format_status
from etl.store import LocalStore
from tests.conftest import query
from tests.support import ADVISORY, ARCHIVE_LOCK, Reply, die_in_worker, png_bytes

T0 = datetime(2026, 10, 1, tzinfo=timezone.utc)


class ListSource(Source):
    """A source over an in-memory list of posts; can fail at a chosen chunk start, and records its windows."""

    name = "listsrc"
    posts: list[Post] = []
    fail_when_since: datetime | None = None
    windows: list[FetchWindow] = []

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        type(self).windows.append(window)
        if self.fail_when_since is not None and window.since == self.fail_when_since:
            raise SourceError("quota exhausted (injected)")
        for post in sorted(self.posts, key=lambda p: p.created_at, reverse=True):
            if window.admits(post.created_at):
                yield post
        self.cursor = {"seen": len(self.posts)}


@pytest.fixture
def listsrc() -> Iterator[type[ListSource]]:
    registry.REGISTRY["listsrc"] = ListSource
    ListSource.posts, ListSource.fail_when_since, ListSource.windows = [], None, []
    yield ListSource
    registry.REGISTRY.pop("listsrc", None)


def make_post(i: int, when: datetime, images: tuple[str, ...] = (), caption: str = "a day") -> Post:
    return Post(platform="listsrc", post_id=f"p{i}", created_at=when, caption=caption, like_count=i, image_urls=images)


def runner(make_settings, db, tmp_path: Path, **env: str) -> Runner:
    settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true", ETL_RETRY_MAX_WAIT="0.01", ETL_HTTP_RETRIES="2", **env)
    return Runner(settings, db=db, store=LocalStore(tmp_path / "objects"))


def test_backfill_chunks_cover_the_range_without_gaps():
    chunks = backfill_chunks(T0, T0 + timedelta(days=2, hours=12), timedelta(days=1))
    assert chunks == [
        (T0, T0 + timedelta(days=1)),
        (T0 + timedelta(days=1), T0 + timedelta(days=2)),
        (T0 + timedelta(days=2), T0 + timedelta(days=2, hours=12)),
    ]


def test_backfill_resumes_after_an_interruption_and_leaves_the_watermark(listsrc, make_settings, db, tmp_path):
    listsrc.posts = [make_post(i, T0 + timedelta(hours=12 + 24 * i)) for i in range(5)]
    listsrc.fail_when_since = T0 + timedelta(days=3)
    request = RunRequest(mode="backfill", sources=["listsrc"], since=T0, until=T0 + timedelta(days=5))

    first = runner(make_settings, db, tmp_path).execute(request)
    assert first.exit_code == 1 and first.source_failures == 1
    assert query(db.dsn, "SELECT post_id FROM social_posts ORDER BY post_id") == [("p0",), ("p1",), ("p2",)]
    done = query(db.dsn, "SELECT chunk_start FROM etl_backfill_chunks ORDER BY 1")
    assert [row[0] for row in done] == [T0, T0 + timedelta(days=1), T0 + timedelta(days=2)]

    listsrc.fail_when_since, listsrc.windows = None, []
    second = runner(make_settings, db, tmp_path).execute(request)
    assert second.exit_code == 0
    # Only the two chunks left were fetched again.
    assert [w.since for w in listsrc.windows] == [T0 + timedelta(days=3), T0 + timedelta(days=4)]
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(5,)]
    assert query(db.dsn, "SELECT count(*) FROM etl_state") == [(0,)]  # a backfill never moves the watermark


def test_watermark_never_moves_backwards_and_runs_resume_with_overlap(listsrc, make_settings, db, tmp_path):
    listsrc.posts = [make_post(1, T0 + timedelta(days=3))]
    assert runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"])).exit_code == 0
    StreamState(db).save_state("listsrc", "", T0, {"seen": 0})  # an older watermark, as a late writer would try
    assert query(db.dsn, "SELECT watermark FROM etl_state") == [(T0 + timedelta(days=3),)]

    listsrc.windows = []
    runner(make_settings, db, tmp_path, ETL_OVERLAP_MINUTES="90").execute(RunRequest(sources=["listsrc"]))
    assert listsrc.windows[0].since == T0 + timedelta(days=3) - timedelta(minutes=90)
    assert listsrc.windows[0].cursor == {"seen": 0}


def test_a_failed_source_does_not_advance_its_watermark(listsrc, make_settings, db, tmp_path):
    listsrc.posts = [make_post(1, T0)]
    runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    listsrc.posts = [make_post(2, T0 + timedelta(days=5))]
    listsrc.fail_when_since = T0 - timedelta(minutes=60)  # the next incremental window
    stats = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    assert stats.exit_code == 1
    assert query(db.dsn, "SELECT watermark FROM etl_state") == [(T0,)]


def test_reenrich_rewrites_only_rows_whose_result_changed(db):
    from etl.enrich import SentimentEnricher
    from etl.reenrich import reenrich
    from etl.run.stats import RunStats

    captions = ["I love this, wonderful!", "first day at the new office", "The bus is here", "a long day", "Terrible"]
    old = SentimentEnricher(0.05)
    rows = []
    for i, caption in enumerate(captions):
        s, language, source, _ = old.decide_caption(caption)
        rows.append((f"r{i}", caption, s.label, s.polarity, s.subjectivity, old.version, language, source))
    with db.transaction() as cur:
        cur.executemany(
            "INSERT INTO social_posts (platform, post_id, caption, sentiment, sentiment_polarity, sentiment_subjectivity,"
            " sentiment_version, language, language_source, created_at) VALUES ('x', %s, %s, %s, %s, %s, %s, %s, %s, now())",
            rows,
        )
    before = dict(query(db.dsn, "SELECT post_id, updated_at FROM social_posts"))
    new = SentimentEnricher(0.3)  # 0.19 and -0.05 become neutral; the others keep their labels
    expected_changed = {f"r{i}" for i, c in enumerate(captions) if new.score(c).label != old.score(c).label}
    assert expected_changed == {"r1", "r3"}

    stats = RunStats()
    reenrich(db, new, stats, batch_size=2)
    after = dict(query(db.dsn, "SELECT post_id, updated_at FROM social_posts"))
    rewritten = {pid for pid in after if after[pid] != before[pid]}
    assert rewritten == expected_changed
    assert stats.fetched == 5 and stats.updated == len(expected_changed)
    # Every row scored is stamped with the version, changed or not.
    versions = dict(query(db.dsn, "SELECT post_id, sentiment_version FROM social_posts"))
    assert set(versions.values()) == {new.version}
    # A second pass with the same enricher reads nothing.
    again = RunStats()
    reenrich(db, new, again)
    assert (again.fetched, again.updated) == (0, 0)


def test_reenrich_after_a_threshold_change_relabels_stored_scores_and_rescores_after_a_model_change(db):
    """Only the threshold changed: each stored score and language holds, so the label is its polarity's under the
    new threshold and nothing is detected or scored again. Another scorer or detector: every caption re-decided."""
    from etl.enrich import SentimentEnricher
    from etl.reenrich import reenrich
    from etl.run.stats import RunStats

    old, new = SentimentEnricher(0.05), SentimentEnricher(0.3)
    other_model = old.version.replace("textblob-", "textblob-0.0.1+older-")
    # Stored polarities that are not what scoring gives today: only a re-score could change them.
    rows = [
        ("kept", "a terrible awful day", "positive", 0.2, 0.5, old.version, "en", "detected", None),
        ("strong", "a terrible awful day", "positive", 0.8, 0.5, old.version, "en", "detected", None),
        ("french", "Quelle belle journée au bord de la mer avec mes amis", None, None, None, old.version, "fr",
         "detected", "language fr"),
        ("rescored", "a terrible awful day", "positive", 0.2, 0.5, other_model, "en", "detected", None),
    ]  # fmt: skip
    with db.transaction() as cur:
        cur.executemany(
            "INSERT INTO social_posts (platform, post_id, caption, sentiment, sentiment_polarity, sentiment_subjectivity,"
            " sentiment_version, language, language_source, sentiment_skipped, created_at)"
            " VALUES ('x', %s, %s, %s, %s, %s, %s, %s, %s, %s, now())",
            rows,
        )
    stats = RunStats()
    reenrich(db, new, stats, workers=1)
    real, language, source, _ = new.decide_caption("a terrible awful day")
    assert real.label == "negative" and real.polarity != 0.2
    assert query(db.dsn, "SELECT post_id, sentiment, sentiment_polarity, language, sentiment_skipped, sentiment_version"
                 " FROM social_posts ORDER BY post_id") == [
        ("french", None, None, "fr", "language fr", new.version),
        ("kept", "neutral", 0.2, "en", None, new.version),
        ("rescored", "negative", real.polarity, language, None, new.version),
        ("strong", "positive", 0.8, "en", None, new.version),
    ]  # fmt: skip
    assert (stats.fetched, stats.updated) == (4, 2)

    # Every row only relabelled: no worker forked and no language model loaded, even with workers to spare.
    with db.transaction() as cur:
        cur.execute("UPDATE social_posts SET sentiment_version = %s", (old.version,))
    fresh = SentimentEnricher(0.9)
    again = RunStats()
    reenrich(db, fresh, again, workers=2)
    assert fresh.detector is not None and fresh.detector._model_ is None
    assert query(db.dsn, "SELECT post_id, sentiment FROM social_posts ORDER BY post_id") == [
        ("french", None), ("kept", "neutral"), ("rescored", "negative"), ("strong", "neutral"),
    ]  # fmt: skip
    assert (again.fetched, again.updated) == (4, 1)  # "strong": 0.8 is neutral under 0.9


def test_reenrich_in_worker_processes_writes_what_one_process_writes(db):
    """Scoring spread over worker processes (every core) must give the very rows scoring in-process gives,
    batch boundaries, worker chunks and an interruption included."""
    import os

    from etl.enrich import SentimentEnricher
    from etl.reenrich import reenrich
    from etl.run.stats import RunStats

    words = ["love", "terrible", "not bad", "great", "the bus", "very good!", "quite sad", "Der Hund ist sehr schön"]
    rows = [(f"w{i}", f"{words[i % len(words)]} {words[(i * 7) % len(words)]} number {i}") for i in range(2500)]
    with db.transaction() as cur:
        cur.executemany(
            "INSERT INTO social_posts (platform, post_id, caption, created_at) VALUES ('x', %s, %s, now())", rows
        )
    columns = "post_id, sentiment, sentiment_polarity, sentiment_subjectivity, language, language_source, sentiment_skipped"
    enricher = SentimentEnricher(0.1)
    stats = RunStats()
    reenrich(db, enricher, stats, batch_size=700, workers=1)
    in_process = query(db.dsn, f"SELECT {columns} FROM social_posts ORDER BY post_id")
    with db.transaction() as cur:
        cur.execute("UPDATE social_posts SET sentiment = NULL, sentiment_polarity = NULL, sentiment_subjectivity = NULL,"
                    " language = NULL, language_source = NULL, sentiment_skipped = NULL, sentiment_version = NULL")

    parent = os.getpid()
    stops = iter([False, True])  # stopped after the second batch: two batches written, the rest left
    stopped = RunStats()
    reenrich(db, enricher, stopped, batch_size=700, workers=2, should_stop=lambda: next(stops))
    assert stopped.interrupted and stopped.fetched == 1400
    workers = RunStats()
    reenrich(db, enricher, workers, batch_size=700, workers=2)
    assert os.getpid() == parent and workers.fetched == 1100
    assert query(db.dsn, f"SELECT {columns} FROM social_posts ORDER BY post_id") == in_process
    assert stats.sentiment == stopped.sentiment + workers.sentiment


def test_failed_images_are_healed_by_a_later_run_and_permanent_ones_left(listsrc, make_settings, db, tmp_path, http_server):
    http_server.routes["/flaky.png"] = Reply(status=503, body=b"down", content_type="text/plain")
    http_server.routes["/gone.png"] = Reply(status=404, body=b"gone", content_type="text/plain")
    listsrc.posts = [make_post(1, T0, images=(http_server.url("/flaky.png"), http_server.url("/gone.png")))]
    env = {"ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0"}

    first = runner(make_settings, db, tmp_path, **env).execute(RunRequest(sources=["listsrc"]))
    assert first.exit_code == 1 and first.images_failed == 2
    assert query(db.dsn, "SELECT post_id, image_s3_url FROM social_posts") == [("p1", None)]
    assert query(db.dsn, "SELECT position, status, permanent, attempts FROM post_media ORDER BY position") == [
        (0, "failed", False, 1),
        (1, "failed", True, 1),
    ]

    http_server.routes["/flaky.png"] = Reply(body=png_bytes())
    gone_hits = http_server.hits.get("/gone.png", 0)
    listsrc.posts = []  # the post is not fetched again: the retry comes from post_media alone
    second = runner(make_settings, db, tmp_path, **env).execute(RunRequest(sources=["listsrc"]))
    assert second.images_retried == 1 and second.images_stored == 1
    assert query(db.dsn, "SELECT position, status, attempts FROM post_media ORDER BY position") == [
        (0, "stored", 2),
        (1, "failed", 1),
    ]
    assert http_server.hits.get("/gone.png", 0) == gone_hits  # permanent failures are not retried
    (url,) = query(db.dsn, "SELECT image_s3_url FROM social_posts")[0]
    assert url and url.endswith("/0.png")


def test_retry_backoff_waits_between_runs(listsrc, make_settings, db, tmp_path, http_server):
    http_server.routes["/flaky.png"] = Reply(status=503, body=b"down", content_type="text/plain")
    listsrc.posts = [make_post(1, T0, images=(http_server.url("/flaky.png"),))]
    runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    hits = http_server.hits["/flaky.png"]
    listsrc.posts = []
    stats = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))  # 30 min backoff
    assert stats.images_retried == 0 and http_server.hits["/flaky.png"] == hits


def test_an_overlapping_run_exits_75_naming_the_holder(db, run_etl):
    db.migrate()
    run_id = Ledger(db).start_run("run", ["mock"], {})
    lock = Ledger(db).lock_sources(["mock"])
    try:
        result = run_etl("run", "--source", "mock")
    finally:
        lock.close()
    assert result.returncode == 75, result.stderr
    assert "being archived by another run" in result.stderr and f"run {run_id}" in result.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(0,)]


def test_a_recorded_run_keeps_its_outcome_and_a_failed_block_is_recorded_failed_with_its_counts(db):
    db.migrate()
    ledger = Ledger(db)
    done = RunStats(fetched=3, inserted=2, images_failed=1)
    done.error("x/1 image 0: token=abc123 refused")
    with ledger.recording("run", ["mock"], {"limit": 3}, done, redact=lambda m: m.replace("abc123", "***")) as ok_id:
        pass
    cut = RunStats(fetched=1, interrupted=True)
    with ledger.recording("backfill", ["mock"], {}, cut) as cut_id:
        pass
    broken = RunStats(fetched=5)
    with pytest.raises(RuntimeError, match="boom"):
        with ledger.recording("run", ["jsonl"], {}, broken, units=["stream:a"]) as failed_id:
            raise RuntimeError("boom")
    rows = query(
        db.dsn,
        "SELECT id, status, posts_fetched, posts_inserted, images_failed, errors, units, finished_at IS NOT NULL"
        " FROM etl_runs WHERE id = ANY(%s) ORDER BY id",
        ([ok_id, cut_id, failed_id],),
    )
    assert rows == [
        (ok_id, "partial", 3, 2, 1, ["x/1 image 0: token=*** refused"], ["mock"], True),
        (cut_id, "interrupted", 1, 0, 0, [], ["mock"], True),
        (failed_id, "failed", 5, 0, 0, [], ["stream:a"], True),
    ]


def test_json_logs_parse_and_carry_no_secrets(run_etl, tmp_path):
    secrets = {
        "YOUTUBE_API_KEY": "AIzaSy-very-secret-key-123",
        "TWITTER_BEARER_TOKEN": "AAAA-bearer-secret-456",
        "INSTAGRAM_ACCESS_TOKEN": "IGQV-token-secret-789",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-abcdef",
    }
    metrics = tmp_path / "metrics" / "archiver.prom"
    result = run_etl(
        "--log-format", "json", "--log-level", "DEBUG", "run", "--source", "mock",
        env={**secrets, "MOCK_POSTS": "5", "ETL_METRICS_PATH": str(metrics)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert entries and all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["message"].startswith("summary: posts fetched=5") for e in entries)
    for secret in secrets.values():
        assert secret not in result.stdout and secret not in result.stderr


def test_metrics_file_is_well_formed(run_etl, tmp_path):
    metrics = tmp_path / "archiver.prom"
    result = run_etl("run", "--source", "mock", env={"MOCK_POSTS": "6", "ETL_METRICS_PATH": str(metrics)})
    assert result.returncode == 0, result.stderr
    text = metrics.read_text()
    sample = re.compile(r'^social_archiver_[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
            assert line.split("{")[0].split(" ")[0] in declared
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            samples[(name, frozenset(re.findall(r'([a-z_]+)="([^"]*)"', labels)))] = float(value)
    assert samples[("social_archiver_last_run_status", frozenset({("mode", "run"), ("status", "ok")}))] == 1
    assert samples[("social_archiver_last_run_status", frozenset({("mode", "run"), ("status", "failed")}))] == 0
    assert samples[("social_archiver_last_run_posts", frozenset({("source", "mock"), ("result", "fetched")}))] == 6


def test_status_reports_runs_live_and_abandoned(db, listsrc, make_settings, tmp_path):
    listsrc.posts = [make_post(1, T0)]
    runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    dead = Ledger(db).start_run("run", ["ghost"], {})
    live = Ledger(db).start_run("run", ["listsrc"], {})
    lock = Ledger(db).lock_sources(["listsrc"])
    try:
        report = collect_status(db)
    finally:
        lock.close()
    states = {r["id"]: r["live"] for r in report["in_progress"]}
    assert states == {dead: False, live: True}
    assert report["platforms"]["listsrc"]["posts"] == 1
    assert report["watermarks"][0]["source"] == "listsrc"
    text = format_status(report)
    assert "IN PROGRESS" in text and "abandoned" in text
    # The next run of that source finds the dead run and marks it abandoned.
    runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    assert query(db.dsn, "SELECT status FROM etl_runs WHERE id = %s", (live,)) == [("abandoned",)]


@pytest.mark.parametrize("command", [("reenrich",), ("reenrich", "--platform", "mock"), ("verify",), ("verify", "--platform", "mock")])
def test_a_live_reenrich_or_verify_is_live_to_status_and_to_a_run_of_its_platform(run_etl, db, make_settings, monkeypatch, command):
    # Both record an etl_runs row; they held no lock, so `status` called them abandoned while they worked, and a
    # run of the platform they were given marked them abandoned in the ledger. Now each holds a lock of its own.
    from etl import cli, reenrich, verify

    assert run_etl("run", "--source", "mock", env={"MOCK_POSTS": "3"}).returncode == 0
    seen: dict[str, object] = {}

    def meanwhile(*args, **kwargs):
        report = run_etl("status", "--json")
        seen["live"] = [(r["id"], r["live"]) for r in json.loads(report.stdout)["in_progress"]]
        seen["run"] = run_etl("run", "--source", "mock", env={"MOCK_POSTS": "3"}).returncode
        seen["status"] = query(db.dsn, "SELECT status FROM etl_runs WHERE mode = %s", (command[0],))
        seen["second"] = run_etl(*command)

    if command[0] == "reenrich":
        monkeypatch.setattr(reenrich, "reenrich", meanwhile)
    else:
        monkeypatch.setattr(verify.Verifier, "run", meanwhile)
    # In this process: its logging set-up and SIGTERM handler would outlast the test (and change what later tests see).
    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "_on_sigterm", lambda stop: None)
    env = {"DATABASE_URL": db.dsn, "ETL_DATA_DIR": str(make_settings().data_dir), "PATH": os.environ.get("PATH", "")}
    assert cli.main(list(command), env=env) == 0
    [(run_id, live)] = seen["live"]
    assert live is True and seen["run"] == 0 and seen["status"] == [("running",)]
    second = seen["second"]
    assert second.returncode == 75 and f"{command[0]} {command[2] if len(command) > 2 else '*'} is running" in second.stderr
    assert query(db.dsn, "SELECT status FROM etl_runs WHERE id = %s", (run_id,)) == [("ok",)]


def test_status_reads_the_locks_of_its_own_database_only(db, run_etl, new_database):
    import psycopg2

    dead = Ledger(db).start_run("run", ["mock"], {})  # a run of this archive that died (SIGKILL)
    other = psycopg2.connect(new_database)  # another archive on the same server, running its mock source now
    other.autocommit = True
    with other.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(hashtext('social-archiver:source'), hashtext('mock'))")
    try:
        report = collect_status(db)
    finally:
        other.close()
    assert [(r["id"], r["live"]) for r in report["in_progress"]] == [(dead, False)]


def test_status_command_json(run_etl, tmp_path):
    assert run_etl("run", "--source", "mock", env={"MOCK_POSTS": "3"}).returncode == 0
    lines = tmp_path / "text.jsonl"  # a platform without images: its image fields are 0, not missing
    lines.write_text(json.dumps({"platform": "feed", "post_id": "t1", "created_at": "2026-11-01T10:00:00Z"}) + "\n")
    assert run_etl("run", "--source", "jsonl", "--input", str(lines)).returncode == 0
    result = run_etl("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"][0]["fetched"] == 1 and report["runs"][1]["fetched"] == 3 and report["runs"][1]["status"] == "ok"
    assert report["platforms"]["mock"]["posts"] == 3
    assert sorted(report["platforms"]["feed"]) == sorted(report["platforms"]["mock"])
    assert report["platforms"]["feed"]["images_stored"] == 0 and report["platforms"]["feed"]["bytes_stored"] == 0


class BreakingSource(ListSource):
    """Yields its posts, then fails in the middle of a batch."""

    name = "breaking"
    error: Exception = SourceError("rate limit reached (injected)")

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        yield from self.posts
        raise self.error


@pytest.mark.parametrize("error", [SourceError("quota exceeded (injected)"), KeyError("a bug in the source")])
def test_posts_fetched_before_a_source_fails_are_still_loaded(error, make_settings, db, tmp_path):
    registry.REGISTRY["breaking"] = BreakingSource
    try:
        BreakingSource.posts = [make_post(i, T0 + timedelta(minutes=i)) for i in range(7)]  # less than one batch
        BreakingSource.error = error
        stats = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="5").execute(RunRequest(sources=["breaking"]))
    finally:
        registry.REGISTRY.pop("breaking", None)
    assert stats.exit_code == 1 and stats.source_failures == 1
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(7,)]
    # An unfinished source keeps its watermark; a resume point says what was loaded.
    assert query(db.dsn, "SELECT watermark, resume IS NOT NULL FROM etl_state") == [(None, True)]
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("partial",)]


def test_a_permanent_failure_is_not_fetched_again_when_its_post_comes_back(listsrc, make_settings, db, tmp_path, http_server):
    http_server.routes["/gone.png"] = Reply(status=410, body=b"gone", content_type="text/plain")
    listsrc.posts = [make_post(1, T0, images=(http_server.url("/gone.png"),))]
    runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    hits = http_server.hits["/gone.png"]
    StreamState(db).save_state("listsrc", "", T0 - timedelta(days=1), {})  # the post falls inside the next window again
    with db.transaction() as cur:
        cur.execute("UPDATE etl_state SET watermark = %s", (T0 - timedelta(days=1),))
    stats = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    assert stats.fetched == 1 and http_server.hits["/gone.png"] == hits
    assert query(db.dsn, "SELECT attempts, permanent FROM post_media") == [(1, True)]


def test_the_summary_names_the_time_of_each_stage(listsrc, make_settings, db, tmp_path, http_server):
    http_server.routes["/a.png"] = Reply(body=png_bytes())
    listsrc.posts = [make_post(1, T0, images=(http_server.url("/a.png"),)), make_post(2, T0)]
    stats = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"]))
    assert {"fetch", "enrich", "lookup", "wait_images", "load", "download", "store"} <= set(stats.stages.seconds)
    assert all(seconds >= 0 for seconds in stats.stages.seconds.values())
    assert re.search(r"\| stages fetch=\d+\.\d\ds .*\| worker-seconds \(summed over image workers\) download=\d+\.\d\ds", stats.summary_line())


def test_a_dry_run_goes_through_the_same_archiver_stages_and_writes_nothing(listsrc, make_settings, db, tmp_path, http_server):
    http_server.routes["/a.png"] = Reply(body=png_bytes())
    listsrc.posts = [
        make_post(1, T0, images=(http_server.url("/a.png"),)),
        make_post(2, T0 + timedelta(hours=1), caption="What a wonderful, happy day"),
        make_post(3, T0 + timedelta(hours=2), caption="A terrible, awful mess"),
    ]
    dry = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"], dry_run=True, limit=3))
    for table in ("social_posts", "post_media", "etl_runs", "etl_state", "post_engagement"):
        assert query(db.dsn, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert not (tmp_path / "objects").exists() and http_server.hits.get("/a.png", 0) == 0
    real = runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"], limit=3))
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(3,)]

    def main_stages(stats):
        return set(stats.stages.seconds) - set(StageClock.WORKER_STAGES)

    assert main_stages(dry) == main_stages(real) == {"fetch", "lookup", "enrich", "wait_images", "load"}
    assert (dry.fetched, dry.rejected, dry.sentiment) == (real.fetched, real.rejected, real.sentiment)
    assert dry.fetched == 3 and dry.per_source["listsrc"]["fetched"] == 3
    assert (dry.inserted, dry.images_stored, real.inserted, real.images_stored) == (0, 0, 3, 1)
    assert "stages fetch=" in dry.summary_line()


def test_a_flood_of_bad_lines_is_counted_whole_and_kept_bounded(make_settings, db, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 450 + json.dumps({"platform": "x", "post_id": "ok", "created_at": "2026-01-01"}) + "\n")
    request = RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}})
    stats = runner(make_settings, db, tmp_path).execute(request)
    assert stats.rejected == 450 and stats.error_count == 450 and len(stats.errors) == 200
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(1,)]
    (summary,) = query(db.dsn, "SELECT error_summary FROM etl_runs")[0]
    assert summary.startswith("450 error(s); first: jsonl: ") and "line 1" in summary


def test_a_secret_in_a_source_error_never_reaches_the_ledger(make_settings, db, tmp_path):
    token = "AAAA-leaky-bearer-31337"

    class LeakySource(ListSource):
        name = "leaky"

        def fetch(self, window: FetchWindow) -> Iterator[Post]:
            raise SourceError(f"GET https://api.example/2/tweets?token={token} failed")
            yield  # a generator

    registry.REGISTRY["leaky"] = LeakySource
    try:
        stats = runner(make_settings, db, tmp_path, TWITTER_BEARER_TOKEN=token).execute(RunRequest(sources=["leaky"]))
    finally:
        registry.REGISTRY.pop("leaky", None)
    assert stats.source_failures == 1
    ledger = json.dumps(query(db.dsn, "SELECT errors, error_summary FROM etl_runs"))
    assert token not in ledger and "token=***" in ledger


def test_a_caption_seen_again_unchanged_keeps_its_score_without_scoring(listsrc, make_settings, db, tmp_path, monkeypatch):
    """Reruns and overlap windows bring back posts already scored: their captions are not scored again, unless
    the caption or the enricher (model, threshold) changed."""
    from etl import enrich

    scored: list[str] = []
    original = enrich._score_text  # what an enricher's cache calls on a miss (bound at its creation)

    def counting(threshold: float, text: str):
        scored.append(text)
        return original(threshold, text)

    monkeypatch.setattr(enrich, "_score_text", counting)
    listsrc.posts = [make_post(i, T0 + timedelta(hours=i), caption=f"a lovely sunny day, walk number {i}") for i in range(5)]

    def run(**env: str) -> list[str]:
        scored.clear()
        request = RunRequest(sources=["listsrc"])
        assert runner(make_settings, db, tmp_path, ETL_OVERLAP_MINUTES="100000", **env).execute(request).exit_code == 0
        return sorted(scored)

    assert len(run()) == 5
    assert run() == []  # nothing changed: nothing scored, every row unchanged
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment = 'positive'") == [(5,)]

    listsrc.posts[2] = make_post(2, T0 + timedelta(hours=2), caption="a terrible, awful day")
    assert run() == ["a terrible, awful day"]
    assert query(db.dsn, "SELECT sentiment FROM social_posts WHERE post_id = 'p2'") == [("negative",)]

    assert len(run(SENTIMENT_THRESHOLD="0.5")) == 5  # another enricher version: every caption scored again
    assert query(db.dsn, "SELECT DISTINCT sentiment_version LIKE %s FROM social_posts", ('%:t=0.5',)) == [(True,)]


class _WatchedLock:
    """A lock connection whose close() notes which advisory locks its session still held at that moment."""

    def __init__(self, conn, dsn: str):
        self.conn, self.dsn, self.held_at_close = conn, dsn, None

    def cursor(self, *args, **kwargs):
        return self.conn.cursor(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)

    def close(self) -> None:
        pid = self.conn.get_backend_pid()
        self.held_at_close = query(self.dsn, f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid}")[0][0]
        self.conn.close()


@pytest.mark.fault("a run ends and the next one starts at once: its locks must already be free")
def test_a_run_frees_its_locks_before_it_closes_their_connection(listsrc, make_settings, db, tmp_path, monkeypatch):
    """Closing a lock connection frees its advisory locks only once the server has ended that session, a moment
    later: a run started right after (a worker's next task, the next cron run) could find its streams "being
    archived by another run". The runner unlocks first, so nothing is held when the connection closes."""
    watched: list[_WatchedLock] = []
    take = Ledger.lock_units

    def lock_units(self, names):
        conn, locked = take(self, names)
        watched.append(_WatchedLock(conn, db.dsn))
        return watched[-1], locked

    monkeypatch.setattr(Ledger, "lock_units", lock_units)
    listsrc.posts = [make_post(1, T0)]
    assert runner(make_settings, db, tmp_path).execute(RunRequest(sources=["listsrc"])).exit_code == 0
    assert [w.held_at_close for w in watched] == [0]
    lock, held = take(Ledger(db), ["listsrc"])
    release_locks(lock)
    assert held == []  # and the next run takes it at once


def lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile) -> None:
    """listsrc yields p0..p3, waits until the first batch (p0, p1) is loaded, then `meanwhile(pid of the run's lock
    connection)` (which ends that connection's backend), then p4..p9."""
    from etl.db import ledger

    monkeypatch.setattr(ledger, "LOCK_CHECK_SECONDS", 0.2, raising=False)
    posts = [make_post(i, T0 - timedelta(minutes=i)) for i in range(10)]

    def fetch(self, window):
        yield from posts[:4]
        deadline = time.monotonic() + 10
        while query(db.dsn, "SELECT count(*) FROM social_posts")[0][0] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # batches of two, loaded by the loader threads
        [(pid,)] = {(row[0],) for row in query(db.dsn, ADVISORY)}  # the run's lock connection alone holds any
        meanwhile(pid)
        yield from posts[4:]

    monkeypatch.setattr(listsrc, "fetch", fetch)


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.fault("a run's lock connection is lost mid-run (backend terminated), its locks still free: taken again, the run goes on")
def test_a_run_whose_lock_connection_is_lost_takes_its_locks_again(listsrc, make_settings, db, tmp_path, monkeypatch, caplog):
    """The server frees a session's advisory locks when it ends (a restart, pg_terminate_backend, a network cut); the
    run went on as if it held them, so a second run could take its units and a forget could run under it. Now it
    notices within seconds, takes every lock again on a new connection when all are still free, and goes on."""
    seen: dict[str, object] = {}

    def meanwhile(pid: int) -> None:
        seen["before"] = sorted(row[1:] for row in query(db.dsn, ADVISORY))
        query(db.dsn, "SELECT pg_terminate_backend(%s, 5000)", (pid,))
        wait_for(lambda: len([row for row in query(db.dsn, ADVISORY) if row[0] != pid]) == 3)
        seen["after"] = query(db.dsn, ADVISORY)
        seen["alive"] = query(db.dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = 'social-archiver'")
        seen["pid"] = pid

    lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile)
    stats = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2").execute(
        RunRequest(sources=["listsrc"])
    )
    # Held again, all three (the archive's lock shared, listsrc, the failed-image retries), by one new live backend.
    assert len(seen["before"]) == 3, seen
    pids = {row[0] for row in seen["after"]}
    assert len(pids) == 1 and seen["pid"] not in pids and pids <= {row[0] for row in seen["alive"]}, seen
    assert sorted(row[1:] for row in seen["after"]) == seen["before"]
    assert stats.status == "ok" and stats.exit_code == 0 and stats.inserted == 10, stats.errors
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("ok",)]
    warned = [r.getMessage() for r in caplog.records if "lock connection" in r.getMessage()]
    assert any(f"backend pid {seen['pid']}) was lost" in m and "held again on a new connection" in m for m in warned), warned
    assert query(db.dsn, ADVISORY) == []  # and freed at the end


MEANWHILE = {  # what another session does the moment the server frees the lost connection's locks
    "unit": (
        "SELECT pg_advisory_lock(hashtext('social-archiver:source'), hashtext('listsrc'))",
        "listsrc is now held by another run",
    ),
    "forget": (f"SELECT pg_advisory_lock({ARCHIVE_LOCK})", "a forget holds the archive now"),
    "forgotten": (  # a forget that came and went while the run held nothing
        f"SELECT pg_advisory_lock({ARCHIVE_LOCK}); INSERT INTO forgotten_posts (platform, post_id, forgotten_at)"
        f" VALUES ('listsrc', 'p9', clock_timestamp()); SELECT pg_advisory_unlock({ARCHIVE_LOCK})",
        "posts were forgotten while it held no lock",
    ),
}


@pytest.mark.fault("a run's lock connection is lost mid-run and another run takes its unit or a forget the archive: it stops as on SIGTERM, loads nothing more")
@pytest.mark.parametrize("taken", list(MEANWHILE))
def test_a_run_whose_lock_connection_is_lost_and_its_locks_taken_stops(listsrc, make_settings, db, tmp_path, monkeypatch, taken):
    """Another run took the unit while this run held no lock (two runs must never archive one stream at once), or a
    forget took the archive, or came and went (a post this run looked up before its tombstone would come back). The
    run stops as a SIGTERM stops it (recorded interrupted, exit 1, saying why) and loads nothing after the loss: no
    post, no watermark. (Before, it went on as if it held its locks.)"""
    import psycopg2

    other = psycopg2.connect(db.dsn)  # the other run, or the forget
    other.autocommit = True
    other_pid = other.get_backend_pid()
    seen: dict[str, object] = {}
    run = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2")
    meanwhile_sql, said = MEANWHILE[taken]

    def meanwhile(pid: int) -> None:
        seen["loaded"] = query(db.dsn, "SELECT post_id FROM social_posts ORDER BY 1")
        with other.cursor() as cur:  # one round trip: queued for the lock before the dying backend lets it go
            cur.execute("SELECT pg_terminate_backend(%s); " + meanwhile_sql, (pid,))
        seen["noticed"] = wait_for(run.stop.is_set)
        seen["pid"] = pid

    lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile)
    try:
        stats = run.execute(RunRequest(sources=["listsrc"]))
        held = query(db.dsn, ADVISORY)
    finally:
        other.close()
    assert seen["noticed"], "the run did not notice that its lock connection was lost"
    assert stats.status == "interrupted" and stats.exit_code == 1
    why = f"the lock connection (backend pid {seen['pid']}) was lost"
    assert any(why in e and said in e for e in stats.errors), stats.errors
    (status, summary) = query(db.dsn, "SELECT status, error_summary FROM etl_runs")[0]
    assert status == "interrupted" and why in summary and said in summary, summary
    # Nothing loaded after the loss: what was loaded before it (p0 and p1 at least), no state for the stream.
    assert seen["loaded"][:2] == [("p0",), ("p1",)]
    assert query(db.dsn, "SELECT post_id FROM social_posts ORDER BY 1") == seen["loaded"]
    assert query(db.dsn, "SELECT count(*) FROM etl_state WHERE source = 'listsrc'") == [(0,)]
    assert {row[0] for row in held} <= {other_pid}  # the run holds nothing now (what it took again, it let go)


# -- a lost lock connection: found by a hostile review of LockWatch -------------------------------------


def _slow_retake(monkeypatch, seconds: float) -> None:
    """The watch takes its locks again only `seconds` after it noticed the loss (what the gap looks like when the
    check interval, a reconnect or a busy server delays it): what another session does meanwhile is done by then."""
    from etl.db.ledger import LockWatch

    take_again = LockWatch._take_again

    def slow(self, lost):
        time.sleep(seconds)
        return take_again(self, lost)

    monkeypatch.setattr(LockWatch, "_take_again", slow)


@pytest.mark.fault("the lock connection is lost and another run archives the unit in the gap, then lets it go: the run stops")
def test_a_run_whose_unit_another_run_archived_in_the_gap_does_not_go_on(listsrc, make_settings, db, tmp_path, monkeypatch):
    """The lock connection is lost; in the gap another run takes listsrc, records itself (marking this run
    abandoned, as START_RUN_ABANDONING_SQL does), archives, finishes and lets the lock go. RETAKE_SQL only asks whether
    the locks are free *now*: they are, so the run takes them again and goes on as if it had held them throughout
    (two runs archived one stream at once), and its final 'ok' overwrites the 'abandoned' the other run wrote."""
    import psycopg2

    other = psycopg2.connect(db.dsn)
    other.autocommit = True
    run = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2")
    seen: dict[str, object] = {}
    unit = "hashtext('social-archiver:source'), hashtext('listsrc')"

    def meanwhile(pid: int) -> None:
        with other.cursor() as cur:  # one round trip: queued for the lock before the dying backend lets it go
            cur.execute(
                "SELECT pg_terminate_backend(%s);"
                f" SELECT pg_advisory_lock({unit});"
                " UPDATE etl_runs SET status = 'abandoned', finished_at = now()"
                "  WHERE status = 'running' AND COALESCE(units, sources) && ARRAY['listsrc'];"
                " INSERT INTO etl_runs (mode, sources, units, host, pid, status, finished_at)"
                "  VALUES ('run', ARRAY['listsrc'], ARRAY['listsrc'], 'other-host', 1, 'ok', now());"
                f" SELECT pg_advisory_unlock({unit})",
                (pid,),
            )
        seen["statuses"] = query(db.dsn, "SELECT host, status FROM etl_runs ORDER BY id")

    _slow_retake(monkeypatch, 0.5)
    lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile)
    try:
        stats = run.execute(RunRequest(sources=["listsrc"]))
    finally:
        other.close()
    assert [s for _, s in seen["statuses"]] == ["abandoned", "ok"], seen  # the other run ran in the gap
    assert stats.status == "interrupted", (stats.status, query(db.dsn, "SELECT host, status FROM etl_runs ORDER BY id"))


@pytest.mark.fault("a network cut: the server keeps the lost lock session; it is ended and the locks taken again")
def test_a_network_cut_ends_the_lost_session_and_takes_the_locks_again(listsrc, make_settings, db, tmp_path, monkeypatch):
    """A network cut as the client sees it: keepalives/tcp_user_timeout make the watch's check fail ("server closed
    the connection unexpectedly", no SQLSTATE) within seconds, but the server never hears of it and keeps the session,
    and its advisory locks, until its own TCP keepalive gives up (tcp_keepalives_idle: the OS's 2 hours by default).
    RETAKE_SQL then finds every unit "taken" by the run's own old backend (whose pid it knows): the run stops saying
    listsrc "is now held by another run", and the zombie session still holds the locks after the run, locking
    the next runs out."""
    import psycopg2

    from etl.db import ledger as ledger_module

    cut = {"now": False}
    real: list = []

    class CutConnection:  # the client's side of a cut connection; the server's side lives on
        def __init__(self, conn):
            self.conn = conn

        def cursor(self, *args, **kwargs):
            if cut["now"]:
                raise psycopg2.OperationalError("server closed the connection unexpectedly")
            return self.conn.cursor(*args, **kwargs)

        @property
        def closed(self):
            return 2 if cut["now"] else self.conn.closed

        def close(self):
            if not cut["now"]:
                self.conn.close()  # (after the cut the FIN is lost: the server keeps the session)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    take = ledger_module.Ledger.lock_units

    def lock_units(self, names):
        conn, locked = take(self, names)
        real.append(conn)
        return CutConnection(conn), locked

    monkeypatch.setattr(ledger_module.Ledger, "lock_units", lock_units)
    run = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2")

    def meanwhile(pid: int) -> None:
        cut["now"] = True
        wait_for(run.stop.is_set, 3)  # the watch (every 0.2 s) notices, and takes the locks again or stops the run

    lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile)
    try:
        stats = run.execute(RunRequest(sources=["listsrc"]))
        held_after = query(db.dsn, ADVISORY)
    finally:
        for conn in real:
            conn.close()
    assert not any("held by another run" in e for e in stats.errors), (stats.status, stats.errors)
    assert stats.status == "ok", (stats.status, stats.errors)
    assert held_after == [], "the lost session still holds the run's locks after it ended: the next runs are locked out"


@pytest.mark.fault("deletions at source wait while the locks are taken again, and are not applied when that fails")
def test_deletions_at_source_are_not_applied_while_the_locks_are_being_taken_again(listsrc, make_settings, db, tmp_path, monkeypatch):
    """Writes wait while the locks are being taken again (README, LockWatch.fence), but _apply_gone only looks at
    `watch.lost`: with a retake under way (its new connection slow to come: a restarting or full server) the
    platform's deletions are applied by a run that holds no lock, and then the retake fails (listsrc is held by
    another run) and the run stops. The write should have waited at the fence and been refused."""
    import psycopg2

    from etl.db import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "LOCK_CHECK_SECONDS", 0.2, raising=False)
    _slow_retake(monkeypatch, 1.0)
    other = psycopg2.connect(db.dsn)  # the other run, which takes listsrc in the gap
    other.autocommit = True
    listsrc.posts = [make_post(i, T0 - timedelta(minutes=i)) for i in range(4)]
    fetch = ListSource.fetch

    def fetch_reporting_gone(self, window):
        yield from fetch(self, window)
        self.report_gone("p0", "deleted by its author")

    monkeypatch.setattr(listsrc, "fetch", fetch_reporting_gone)
    run = runner(make_settings, db, tmp_path, ETL_DELETED_AT_SOURCE="mark")
    apply_gone = Runner._apply_gone
    seen: dict[str, object] = {}

    def lose_then_apply(self, source, stats):
        [(pid,)] = {(row[0],) for row in query(db.dsn, ADVISORY)}
        with other.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(%s); SELECT pg_advisory_lock(hashtext('social-archiver:source'), hashtext('listsrc'))",
                (pid,),
            )
        seen["retaking"] = wait_for(lambda: self.watch is not None and not self.watch._held.is_set(), 5)
        apply_gone(self, source, stats)
        seen["stopped"] = wait_for(run.stop.is_set, 5)

    monkeypatch.setattr(Runner, "_apply_gone", lose_then_apply)
    try:
        run.execute(RunRequest(sources=["listsrc"]))
        marked = query(db.dsn, "SELECT post_id FROM social_posts WHERE deleted_at_source IS NOT NULL")
    finally:
        other.close()
    assert seen == {"retaking": True, "stopped": True}, seen  # the retake was under way, then failed
    assert marked == [], "p0 marked deleted at source by a run holding no lock, while its locks were being taken again"


@pytest.mark.fault("the lock connection is lost and a forget runs before the watch looks: the post it forgot does not come back")
def test_a_post_forgotten_in_the_gap_before_the_watch_looks_is_not_loaded_back(listsrc, make_settings, db, tmp_path, monkeypatch):
    """The watch asks the lock connection every 3 s. In between, a lost connection frees the archive's lock, and
    `etl.py forget` may come in: it forgot p3 after the run had looked it up, and the run's load then wrote p3 back
    (the watch, noticing later, stopped the run, too late). The load now drops a post tombstoned since its lookup."""
    import psycopg2

    from etl.db import Database
    from etl.db import ledger as ledger_module
    from etl.forget import find_posts, forget_posts
    from etl.run.archiver import Archiver

    monkeypatch.setattr(ledger_module, "LOCK_CHECK_SECONDS", 60.0)  # the watch does not look before the run ends
    listsrc.posts = [make_post(i, T0 - timedelta(minutes=i)) for i in range(6)]
    run = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2")
    plan, forgot = Archiver.plan, []

    def plan_then_lose_the_locks_and_forget(self, batch, stats, source):
        planned = plan(self, batch, stats, source)  # the lookup of this batch: no tombstone
        if not forgot and any(p.post_id == "p3" for p in batch):
            [(pid,)] = {(row[0],) for row in query(db.dsn, ADVISORY)}  # the run's lock connection
            query(db.dsn, "SELECT pg_terminate_backend(%s, 5000)", (pid,))
            other, forget_db = psycopg2.connect(db.dsn), Database(db.dsn, display="forget")
            try:  # `etl.py forget --post listsrc:p3`: the archive's lock is free now
                other.autocommit = True
                with other.cursor() as cur:
                    cur.execute(f"SELECT pg_try_advisory_lock({ARCHIVE_LOCK})")
                    assert cur.fetchone()[0], "the forget could not take the archive"
                forgot.append(forget_posts(forget_db, None, self.settings, find_posts(forget_db, post=("listsrc", "p3")), None))
            finally:
                other.close()
                forget_db.close()
        return planned

    monkeypatch.setattr(Archiver, "plan", plan_then_lose_the_locks_and_forget)
    stats = run.execute(RunRequest(sources=["listsrc"]))
    assert forgot, "the batch of p3 was never planned"
    assert query(db.dsn, "SELECT post_id FROM forgotten_posts") == [("p3",)]
    assert ("listsrc", "p3") not in {tuple(r) for r in query(db.dsn, "SELECT platform, post_id FROM social_posts")}
    assert stats.status == "interrupted" and any("posts were forgotten while it held no lock" in e for e in stats.errors), stats.errors


@pytest.mark.fault("the locks are lost in the run's last seconds, before the watch looked: the run is recorded interrupted")
def test_a_run_whose_locks_are_lost_in_its_last_seconds_is_not_recorded_ok(listsrc, make_settings, db, tmp_path, monkeypatch):
    """The watch first checks LOCK_CHECK_SECONDS (3 s) after the locks are taken and release() never checks: a loss
    in a run's last 3 s (any loss in a run shorter than that: most cron reruns) is never noticed, and a loss noticed
    after the run's last fence is never raised. Here the lock connection dies and another session takes listsrc while
    the run still has 6 posts and the watermark to write: it writes them all beside the other holder and records
    'ok', exit 0, no error."""
    import psycopg2

    from etl.db import ledger as ledger_module

    other = psycopg2.connect(db.dsn)  # another run, holding listsrc from the moment the lost session let it go
    other.autocommit = True

    def meanwhile(pid: int) -> None:
        with other.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(%s); SELECT pg_advisory_lock(hashtext('social-archiver:source'), hashtext('listsrc'))",
                (pid,),
            )

    lose_the_lock_connection_mid_run(listsrc, db, monkeypatch, meanwhile)
    monkeypatch.setattr(ledger_module, "LOCK_CHECK_SECONDS", 3.0)  # as in production
    try:
        stats = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="2").execute(
            RunRequest(sources=["listsrc"])
        )
    finally:
        other.close()
    assert stats.inserted == 10 and query(db.dsn, "SELECT count(*) FROM etl_state WHERE source = 'listsrc'") == [(1,)]
    assert (stats.status, stats.exit_code) != ("ok", 0), "the run wrote 6 posts and its watermark without its locks, and says ok"


@pytest.mark.fault("a reenrich worker process dies (killed, out of memory): its batch is scored in the main process")
def test_reenrich_scores_in_process_when_a_worker_dies(db, monkeypatch):
    from etl import reenrich as module
    from etl.enrich import SentimentEnricher
    from etl.run.stats import RunStats

    rows = [(f"d{i}", f"what a lovely day number {i}" if i % 2 else f"a terrible night {i}") for i in range(1200)]
    with db.transaction() as cur:
        cur.executemany("INSERT INTO social_posts (platform, post_id, caption, created_at) VALUES ('x', %s, %s, now())", rows)
    monkeypatch.setattr(module, "decide_in_worker", die_in_worker)  # every worker dies on its first task
    stats = RunStats()
    module.reenrich(db, SentimentEnricher(0.1), stats, batch_size=500, workers=2)
    assert stats.fetched == 1200 and not stats.interrupted
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment IS NULL OR sentiment_version IS NULL") == [(0,)]
    assert stats.sentiment["positive"] == 600 and stats.sentiment["negative"] == 600


@pytest.mark.parametrize("stage", ["load", "enrich"])
def test_a_bug_in_archiving_a_batch_leaves_no_resume_point_over_it(listsrc, make_settings, db, tmp_path, monkeypatch, stage):
    """A bug while archiving one batch (loading it, or scoring it: not the source's failure) ends that source
    without a resume point: such a point would say that the batch was loaded, and the next run would skip its
    posts for good. The next run, the bug gone, archives every post. (Found in review; before, the run took it for
    the source's failure and saved the point.)"""
    from etl.run.archiver import Archiver

    listsrc.posts = [make_post(i, T0 + timedelta(minutes=i)) for i in range(30)]
    real = getattr(Archiver, stage)
    calls = {"n": 0, "failing": True}

    def buggy(self, *args, **kwargs):
        calls["n"] += 1
        if calls["failing"] and calls["n"] == 2:
            raise ZeroDivisionError(f"a bug in {stage} of the second batch")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Archiver, stage, buggy)
    env = {"ETL_BATCH_SIZE": "5", "ETL_METADATA_BATCH_SIZE": "5"}
    stats = runner(make_settings, db, tmp_path, **env).execute(RunRequest(sources=["listsrc"]))
    assert stats.exit_code == 1 and stats.source_failures == 1
    assert any("archiving its posts failed unexpectedly: ZeroDivisionError" in e for e in stats.errors)
    assert query(db.dsn, "SELECT watermark, resume FROM etl_state") in ([], [(None, None)])
    assert query(db.dsn, "SELECT status FROM etl_runs") == [("partial",)]
    calls["failing"] = False
    stats = runner(make_settings, db, tmp_path, **env).execute(RunRequest(sources=["listsrc"]))
    assert stats.exit_code == 0
    assert query(db.dsn, "SELECT count(*) FROM social_posts") == [(30,)]


_PARENT = os.getpid()


def _decide_failing_in_workers(items):
    """etl.ahead._decide, failing in a worker process (module level: tasks are pickled by name)."""
    import etl.ahead

    if os.getpid() != _PARENT:
        raise MemoryError("a worker ran out of memory (injected)")
    return etl.ahead.__dict__["_real_decide"](items)


def test_a_scoring_worker_that_fails_leaves_its_batch_to_the_main_process(listsrc, make_settings, db, tmp_path, monkeypatch, caplog):
    """A worker's own failure (an error raised in the worker process) costs nothing: its batch, and those after
    it, are scored in the main process, none of the failed task's decisions used, and every post is archived."""
    import etl.ahead

    monkeypatch.setitem(etl.ahead.__dict__, "_real_decide", etl.ahead._decide)
    monkeypatch.setattr(etl.ahead, "_decide", _decide_failing_in_workers)
    listsrc.posts = [make_post(i, T0 + timedelta(minutes=i), caption=f"a lovely sunny day number {i}") for i in range(800)]
    stats = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="100", ETL_METADATA_BATCH_SIZE="100").execute(
        RunRequest(sources=["listsrc"])
    )
    assert stats.exit_code == 0 and stats.inserted == 800
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE sentiment = 'positive'") == [(800,)]
    failed = [r.getMessage() for r in caplog.records if "scoring worker failed" in r.getMessage()]
    # Batches 1-7 would go to the workers: batch 2 may be sent before batch 1's failure is seen, later ones no longer
    # are (batch 2's task is taken back here when no worker has begun it).
    assert 1 <= len(failed) <= 2 and all("ran out of memory (injected)" in m for m in failed)


def _decide_short_in_workers(items):
    """etl.ahead._decide, one decision short in a worker process."""
    import etl.ahead

    decided = etl.ahead.__dict__["_real_decide"](items)
    return decided[:-1] if os.getpid() != _PARENT else decided


def test_a_worker_that_answers_one_decision_short_has_none_of_them_used(
    listsrc, make_settings, db, tmp_path, monkeypatch, caplog
):
    """The decisions of a failed task are used whole or not at all: none is paired with another caption. (Found in
    review: the pairs made before the mismatch was seen were kept, so the captions after a short task got
    their neighbours' sentiments.)"""
    import etl.ahead

    monkeypatch.setitem(etl.ahead.__dict__, "_real_decide", etl.ahead._decide)
    monkeypatch.setattr(etl.ahead, "_decide", _decide_short_in_workers)
    captions = ("a lovely sunny day number {}", "an awful terrible day number {}")
    listsrc.posts = [make_post(i, T0 + timedelta(minutes=i), caption=captions[i % 2].format(i)) for i in range(2100)]
    # Batches of 1,000 after the first: two tasks each, the second one's decisions after the short first one's.
    stats = runner(make_settings, db, tmp_path, ETL_BATCH_SIZE="100", ETL_METADATA_BATCH_SIZE="1000").execute(
        RunRequest(sources=["listsrc"])
    )
    assert stats.exit_code == 0 and stats.inserted == 2100
    wrong = query(
        db.dsn,
        "SELECT count(*) FROM social_posts WHERE sentiment <> CASE WHEN caption LIKE 'a lovely%%' THEN 'positive' ELSE 'negative' END",
    )
    assert wrong == [(0,)]
    assert any("scoring worker failed (zip()" in r.getMessage() for r in caplog.records)  # a short answer was met
