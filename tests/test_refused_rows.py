"""One row the database refuses is isolated and named; every other row loads. Long captions are kept, cut."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone

import pytest

from etl.enrich import SentimentEnricher
from etl.records import MAX_CAPTION_CHARS, Post
from etl.run.archiver import Archiver
from etl.run.stats import RunStats
from tests.conftest import query
from tests.support import record, write_jsonl

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)


def _lines(n: int, **special: dict) -> list[dict]:
    """n valid jsonl records; special maps a 1-based line number to the fields that line changes."""
    lines = []
    for i in range(1, n + 1):
        fields = {"post_id": f"p{i}", "created_at": f"2026-09-01T{i % 24:02d}:{i % 60:02d}:00Z"}
        lines.append(record(**{**fields, **special.get(str(i), {})}))
    return lines


@pytest.mark.badinput("a jsonl line whose raw holds -Infinity is refused by line number; the other 1,199 load")
def test_minus_infinity_in_raw_refuses_that_line_only(run_etl, db, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", _lines(1200, **{"300": {"raw": {"score": float("-inf")}}}))
    assert "-Infinity" in path.read_text().splitlines()[299]
    result = run_etl("run", "--source", "jsonl", "--input", str(path), env={"ETL_BATCH_SIZE": "500"})
    assert result.returncode == 1, result.stderr
    assert query(db.dsn, "SELECT count(*) FROM social_posts")[0][0] == 1199
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE post_id = 'p300'")[0][0] == 0
    assert "line 300" in result.stdout and "-inf" in result.stdout
    status, summary = query(db.dsn, "SELECT status, error_summary FROM etl_runs")[0]
    assert status == "partial"
    assert "line 300" in summary and "Infinity" in summary


@pytest.mark.badinput("a post_id of 1,000 four-byte characters is refused at once with its reason; the rest load")
def test_post_id_too_large_for_the_index_is_refused_fast(run_etl, db, tmp_path):
    huge = "\U0001f600" * 1000
    path = write_jsonl(tmp_path / "in.jsonl", _lines(3, **{"2": {"post_id": huge}}))
    started = time.monotonic()
    result = run_etl("run", "--source", "jsonl", "--input", str(path))
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 20
    assert "reconnecting" not in result.stderr
    assert sorted(r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts")) == ["p1", "p3"]
    assert "line 2" in result.stdout and "4,000 bytes" in result.stdout


@pytest.mark.badinput("rows the database refuses inside a batch are split out and named; the rest of the batch loads")
def test_database_refusal_isolates_the_row_not_the_batch(db, make_settings, caplog):
    settings = make_settings(ETL_BATCH_SIZE="50")
    posts = [Post("direct", f"d{i}", T0 - timedelta(minutes=i), caption="fine", like_count=i) for i in range(120)]
    # Built directly (as a platform module does), past the record validator: only the database can refuse them.
    varied = "".join(chr(0x20000 + (i * 7919) % 40000) for i in range(1000))  # 4 bytes each, incompressible
    posts[17] = Post("direct", varied, T0, caption="index row too large")
    posts[90] = Post("direct", "d90", T0, like_count=10**20, origin="feed.jsonl line 91")
    stats = RunStats()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        Archiver(settings, db, None).archive(iter(posts), stats, source="direct")
    assert time.monotonic() - started < 20
    assert query(db.dsn, "SELECT count(*) FROM social_posts")[0][0] == 118
    assert (stats.inserted, stats.rejected) == (118, 2)
    assert any("index row" in e and "refused by the database" in e for e in stats.errors), stats.errors
    assert any("feed.jsonl line 91 (post direct/d90)" in e and "out of range" in e for e in stats.errors), stats.errors
    assert "connection lost" not in caplog.text


@pytest.mark.badinput("a caption over 100,000 characters is kept, cut at the cap, flagged, and scored as stored")
def test_caption_over_the_cap_is_cut_flagged_and_scored_as_stored(run_etl, db, tmp_path):
    caption = "awful " * 20_000 + "wonderful " * 10_000  # 220,000 characters; the cut keeps only the awful part
    path = write_jsonl(tmp_path / "in.jsonl", [record(post_id="long", caption=caption), record(post_id="short")])
    result = run_etl("run", "--source", "jsonl", "--input", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = query(
        db.dsn,
        "SELECT post_id, length(caption), caption_truncated, sentiment, sentiment_polarity FROM social_posts ORDER BY 1",
    )
    stored = caption[:MAX_CAPTION_CHARS]
    expected = SentimentEnricher().score(stored)
    assert rows[0] == ("long", MAX_CAPTION_CHARS, True, expected.label, expected.polarity)
    assert expected.label == "negative"
    assert rows[1][:3] == ("short", len(record()["caption"]), False)
    assert json.loads(json.dumps(rows[0][3])) == "negative"
