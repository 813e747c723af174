"""Absurd backfill chunk sizes are refused at once with exit 2; the message says which chunk size fits."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest

from etl.errors import UsageError
from tests.conftest import ROOT, query


def _backfill(tmp_path, dsn: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATABASE_URL": dsn, "ETL_DATA_DIR": str(tmp_path / "data")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "backfill", "--source", "mock", *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.mark.badinput("backfill --chunk-days absurd (tiny, zero, negative, NaN, infinite): exit 2 at once, nothing done")
@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        ("0.00001", "shorter than the smallest chunk, one minute (--chunk-days 0.000695 or more)"),
        ("0", "must be a positive number of days"),
        ("-1", "must be a positive number of days"),
        ("nan", "must be a positive number of days"),
        ("inf", "must be a positive number of days"),
    ],
)
def test_absurd_chunk_sizes_exit_2_quickly(tmp_path, db, chunk, message):
    result, seconds = _backfill(tmp_path, db.dsn, "--since", "2000-01-01", f"--chunk-days={chunk}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert seconds < 15
    assert query(db.dsn, "SELECT count(*) FROM etl_runs") == [(0,)]


@pytest.mark.badinput("a backfill of more than 10,000 chunks is refused with exit 2, naming a chunk size that fits")
def test_too_many_chunks_name_the_size_that_fits(tmp_path, db):
    # 2000-01-01 .. 2026-01-01 is 9,497 days: 0.001-day chunks would be 9.5 million of them.
    result, seconds = _backfill(tmp_path, db.dsn, "--since", "2000-01-01", "--until", "2026-01-01", "--chunk-days", "0.001")
    assert result.returncode == 2, result.stderr
    assert "9,497,000 chunks" in result.stderr and "10,000" in result.stderr
    assert "use --chunk-days 0.9497 or more" in result.stderr
    assert seconds < 15
    # The size it names does fit.
    from datetime import datetime, timezone

    from etl.backfill_limits import checked_chunk

    since, until = datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert (until - since) / checked_chunk(since, until, 0.9497) <= 10_000


def test_the_smallest_chunk_named_is_accepted_when_typed_back():
    # It was printed rounded down, 0.000694 days, which is under a minute and was refused again.
    from datetime import datetime, timezone

    from etl.backfill_limits import checked_chunk

    since, until = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert checked_chunk(since, until, 0.000695) >= timedelta(minutes=1)
    with pytest.raises(UsageError, match=r"one minute \(--chunk-days 0\.000695 or more\)"):
        checked_chunk(since, until, 0.000694)


@pytest.mark.parametrize("chunk_days", [1e300, 3_000_000, 400])
def test_a_chunk_longer_than_the_backfill_is_the_whole_backfill(chunk_days):
    # 1e300 days is no timedelta, and 3,000,000 days from 2026 ended past the year 9999: both were tracebacks.
    from datetime import datetime, timezone

    from etl.backfill_limits import checked_chunk

    since, until = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert checked_chunk(since, until, chunk_days) == until - since


def test_the_chunk_size_named_for_a_backfill_of_over_10000_days_is_accepted_when_typed_back():
    # (Found by a hostile review.) Printed with :g, 6 significant digits: 1.000121 became "1.00012", refused again.
    import re
    from datetime import datetime, timezone

    from etl.backfill_limits import checked_chunk

    until = datetime(2026, 1, 1, tzinfo=timezone.utc)
    since = until - timedelta(days=10001, hours=5)
    with pytest.raises(UsageError) as refused:
        checked_chunk(since, until, 0.5)
    named = re.search(r"use --chunk-days (\S+) or more", str(refused.value)).group(1)
    assert named == "1.000121"
    assert (until - since) / checked_chunk(since, until, float(named)) <= 10_000
