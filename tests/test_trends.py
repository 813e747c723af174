"""`etl.py trends` on a real PostgreSQL with a planted burst."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta, timezone

import psycopg2.extras

from tests.conftest import query


def _plant(db, now: datetime) -> dict[str, list[int]]:
    """Posts over the last 29 days: per tag, a count per 24-hour window (index 0 = the last 24 hours)."""
    rng = random.Random(14)
    plan = {
        "steady": [rng.randint(16, 24) for _ in range(29)],
        "weekly": [30 if d % 7 == 0 else 3 for d in range(29)],  # a weekly rhythm, today is one of its peaks
        "burst": [40] + [rng.randint(0, 2) for _ in range(28)],
        "newbie": [7] + [0] * 28,  # never seen before the window
        "fading": [5] + [15] * 28,
        "rare": [1] + [0] * 28,  # under the minimum count
    }
    rows, n = [], 0
    for tag, counts in plan.items():
        for day, count in enumerate(counts):
            for _ in range(count):
                n += 1
                at = now - timedelta(days=day) - timedelta(seconds=rng.randint(60, 86_000))
                platform = "alpha" if n % 3 else "beta"
                rows.append((platform, f"p{n}", f"#{tag}", [tag, "common"] if n % 5 == 0 else [tag], at))
    with db.transaction() as cur:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO social_posts (platform, post_id, caption, hashtags, created_at) VALUES %s", rows
        )
    return plan


def _expected_z(counts: list[int]) -> float:
    x, base = counts[0], counts[1:]
    mu = sum(base) / len(base)
    sd = math.sqrt(sum(c * c for c in base) / len(base) - mu * mu)
    return (x - mu) / max(sd, math.sqrt(mu), 1)


def test_planted_burst_ranks_first_steady_tags_do_not_rise_new_tag_is_handled(db, run_etl):
    plan = _plant(db, datetime.now(timezone.utc))
    result = run_etl("trends", "--json")
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)["hashtags"]
    names = [r["hashtag"] for r in ranked]
    assert names[0] == "burst"
    by = {r["hashtag"]: r for r in ranked}
    assert abs(by["burst"]["z_score"] - _expected_z(plan["burst"])) < 1e-9
    assert by["burst"]["growth"] == (40 + 1) / (sum(plan["burst"][1:]) / 28 + 1)
    assert abs(by["steady"]["z_score"]) < 2  # steady: within noise
    assert by["fading"]["z_score"] < 0
    # never seen before: mean 0, finite z (= its count), growth = count + 1, ranked below the burst
    assert by["newbie"]["baseline_mean"] == 0 and by["newbie"]["z_score"] == 7 and by["newbie"]["growth"] == 8
    assert "rare" not in names  # under ETL_TRENDS_MIN_COUNT (5)
    assert "rare" in [r["hashtag"] for r in json.loads(run_etl("trends", "--json", env={"ETL_TRENDS_MIN_COUNT": "1"}).stdout)["hashtags"]]

    text = run_etl("trends").stdout
    assert text.splitlines()[3].startswith("#burst")


def test_platform_filter_and_window_are_applied(db, run_etl):
    now = datetime.now(timezone.utc)
    _plant(db, now)
    beta = json.loads(run_etl("trends", "--json", "--platform", "beta").stdout)["hashtags"]
    beta_burst = query(
        db.dsn,
        "SELECT count(*) FROM social_posts WHERE platform = 'beta' AND 'burst' = ANY(hashtags) AND created_at >= %s",
        (now - timedelta(hours=24),),
    )[0][0]
    assert {r["hashtag"]: r["window_posts"] for r in beta}["burst"] == beta_burst
    weekly = json.loads(run_etl("trends", "--json", "--window", "7d", "--baseline", "28d").stdout)["hashtags"]
    # over 7-day windows the weekly rhythm is flat: no rise
    assert abs({r["hashtag"]: r for r in weekly}["weekly"]["z_score"]) < 1.5


def test_trends_refuses_bad_durations_by_name(db, run_etl):
    bad = run_etl("trends", "--window", "soon")
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
    inverted = run_etl("trends", "--window", "28d", "--baseline", "1d")
    assert inverted.returncode == 2 and "--baseline" in inverted.stderr


def test_a_post_at_a_windows_start_counts_in_that_window(db):
    # Windows are [as_of - (k+1)w, as_of - kw). The window number was floor((as_of - created_at) / w): a post at
    # exactly as_of - w counted in the baseline, and one at the baseline's very start in a 29th window the mean
    # counted too. A feed of dates only (midnight UTC) and a report --until midnight hit it every day.
    as_of = datetime(2026, 12, 1, tzinfo=timezone.utc)
    day = timedelta(hours=24)
    at = [as_of - day] * 6  # the last window's first instant: 6 posts in it
    at += [as_of - 29 * day] * 3  # the baseline's first instant: in its oldest window
    at += [as_of - 29 * day - timedelta(microseconds=1)] * 50  # before the baseline: not counted at all
    at += [as_of - 2 * day - timedelta(hours=1)]  # well inside window 1
    rows = [("jsonl", f"e{i}", "#edge", ["edge"], t) for i, t in enumerate(at)]
    with db.transaction() as cur:
        psycopg2.extras.execute_values(cur, "INSERT INTO social_posts (platform, post_id, caption, hashtags, created_at) VALUES %s", rows)
    [(x, mu)] = query(db.dsn, "SELECT window_posts, baseline_mean FROM hashtag_trends('24 hours', '28 days', NULL, 1, %s)", (as_of,))
    assert (x, mu) == (6, (3 + 1) / 28)

    from etl.report import Scope, collect

    november = Scope(since=datetime(2026, 11, 1, tzinfo=timezone.utc), until=as_of)
    rising = collect(db, november, max_distance=5, min_count=5)["rising"]
    assert [(r["hashtag"], r["window_posts"]) for r in rising] == [("edge", 6)]  # the report ranks as of --until


def test_the_baseline_starts_n_windows_back_in_a_zone_with_daylight_saving(db):
    # The baseline's start was as_of - 29 * '1 day' in calendar days of the session's zone: across the end of
    # summer time (Berlin, 2026-10-25) an hour before the 29 x 24 h the windows are cut into, so the posts of that
    # hour fell into a 30th window that the baseline's mean counted. A client whose zone is not UTC (psql, a
    # dashboard, a server whose initdb took the OS's zone) got another answer than the archiver.
    import psycopg2

    from etl.db.insights import rising_hashtags

    as_of = datetime(2026, 11, 10, tzinfo=timezone.utc)
    day = timedelta(hours=24)
    at = [as_of - timedelta(hours=2)] * 5  # the last window
    at += [as_of - 29 * day - timedelta(minutes=30)] * 28  # before the 28-day baseline: not counted
    rows = [("jsonl", f"d{i}", "#dst", ["dst"], t) for i, t in enumerate(at)]
    with db.transaction() as cur:
        psycopg2.extras.execute_values(cur, "INSERT INTO social_posts (platform, post_id, caption, hashtags, created_at) VALUES %s", rows)
    berlin = psycopg2.connect(db.dsn, options="-c TimeZone=Europe/Berlin")
    try:
        with berlin.cursor() as cur:
            got = rising_hashtags(cur, day, timedelta(days=28), None, 1, as_of, 10)  # the report's call
    finally:
        berlin.close()
    assert [(r["hashtag"], r["window_posts"], r["baseline_mean"]) for r in got] == [("dst", 5, 0)], got
