"""`etl.py report`: its numbers against independent SQL on known data, and the file in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import ROOT, query
from tests.support import CHROMIUM, Reply, chromium, encode, photo_like, record, write_jsonl

ARTIFACTS = ROOT / "tests" / "artifacts"


class Tables(HTMLParser):
    """data-table -> {data-key: {data-col: text}}, and data-metric -> text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, str]]] = {}
        self.metrics: dict[str, str] = {}
        self.charts: list[str] = []
        self._table = self._row = self._col = self._metric = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-table" in a:
            self._table = a["data-table"]
            self.tables.setdefault(self._table, {})
        if tag == "tr" and "data-key" in a and self._table:
            self._row = a["data-key"]
            self.tables[self._table][self._row] = {}
        if tag == "td" and "data-col" in a and self._row is not None:
            self._col = a["data-col"]
            self.tables[self._table][self._row][self._col] = ""
        if "data-metric" in a:
            self._metric = a["data-metric"]
            self.metrics[self._metric] = ""
        if "data-chart" in a:
            self.charts.append(a["data-chart"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        if tag == "tr":
            self._row = None
        if tag == "table":
            self._table = None
        if tag == "b":
            self._metric = None

    def handle_data(self, data):
        if self._col is not None:
            self.tables[self._table][self._row][self._col] += data
        if self._metric is not None:
            self.metrics[self._metric] += data


def _num(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


@pytest.fixture
def archive(db, run_etl, http_server, tmp_path):
    """Known posts: two platforms, four days, one image shared by three posts, a near copy, a 404."""
    a = encode(photo_like(1), quality=85)
    http_server.routes["/a.jpg"] = Reply(body=a, content_type="image/jpeg")
    http_server.routes["/a2.jpg"] = Reply(body=encode(photo_like(1).resize((300, 225)), quality=55), content_type="image/jpeg")
    http_server.routes["/b.png"] = Reply(body=encode(photo_like(2, (320, 240)), "PNG"), content_type="image/png")
    http_server.routes["/gone.jpg"] = Reply(status=404, body=b"no")
    posts = []
    captions = ["What a lovely happy day #sun #beach", "Terrible awful delay #travel", "Meeting at noon #work #sun"]
    for n in range(24):
        urls = [http_server.url("/a.jpg")] if n in (1, 7, 13) else [http_server.url("/b.png")] if n == 2 else []
        urls += [http_server.url("/a2.jpg")] if n == 5 else []
        urls += [http_server.url("/gone.jpg")] if n == 9 else []
        posts.append(
            record(
                platform="alpha" if n % 3 else "beta", post_id=f"p{n}", author_username=f"user{n % 5}",
                caption=captions[n % 3], created_at=f"2024-03-0{1 + n % 4}T{n % 20:02d}:00:00Z",
                like_count=n * 7 % 50, comment_count=n % 6, image_urls=urls, hashtags=None,
            )
        )  # fmt: skip
    path = write_jsonl(tmp_path / "posts.jsonl", posts)
    env = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_HTTP_RETRIES": "1"}
    assert run_etl("run", "--source", "jsonl", "--input", str(path), env=env).returncode == 1  # the 404
    assert run_etl("fingerprint").returncode == 0
    return tmp_path


def test_report_numbers_equal_independent_sql(db, run_etl, archive):
    out = archive / "report.html"
    result = run_etl("report", "--since", "2024-03-02", "--until", "2024-03-04", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    page = Tables()
    page.feed(out.read_text(encoding="utf-8"))
    scope = "created_at >= '2024-03-02' AND created_at < '2024-03-04'"
    (posts, authors, likes), = query(db.dsn, f"SELECT count(*), count(DISTINCT (platform, author_username)), sum(like_count) FROM social_posts WHERE {scope}")
    assert (_num(page.metrics["posts"]), _num(page.metrics["authors"]), _num(page.metrics["likes"])) == (posts, authors, likes)
    (stored, failed), = query(
        db.dsn,
        "SELECT count(*) FILTER (WHERE m.status = 'stored'), count(*) FILTER (WHERE m.status = 'failed') FROM post_media m"
        f" WHERE (m.platform, m.post_id) IN (SELECT platform, post_id FROM social_posts WHERE {scope})",
    )
    assert (_num(page.metrics["images_stored"]), _num(page.metrics["images_failed"])) == (stored, failed)

    voice = query(db.dsn, f"SELECT platform, count(*), sum(like_count + comment_count) FROM social_posts WHERE {scope} GROUP BY 1")
    total = sum(v[1] for v in voice)
    for platform, count, engagement in voice:
        row = page.tables["share_of_voice"][platform]
        assert _num(row["posts"]) == count and _num(row["engagement"]) == engagement
        assert row["post_share"] == f"{100 * count / total:.1f}%"

    tags = query(
        db.dsn,
        f"SELECT tag, count(*) FROM social_posts, unnest(hashtags) tag WHERE {scope} GROUP BY tag ORDER BY 2 DESC, 1",
    )
    assert {k: _num(v["posts"]) for k, v in page.tables["top_hashtags"].items()} == {t: c for t, c in tags}

    top = query(db.dsn, f"SELECT platform || ':' || post_id, like_count + comment_count FROM social_posts WHERE {scope} ORDER BY 2 DESC, created_at DESC LIMIT 10")
    assert [(k, _num(v["engagement"])) for k, v in page.tables["top_posts"].items()] == [(k, e) for k, e in top]

    # the image posted three times (two of them in scope here: p1 on 03-02, p13 on 03-02; p7 on 03-04 is out)
    groups = query(
        db.dsn,
        "SELECT m.sha256, count(*) FROM post_media m JOIN social_posts p USING (platform, post_id)"
        f" WHERE m.status = 'stored' AND p.{scope} GROUP BY 1 HAVING count(*) > 1",
    )
    assert {k[:16]: _num(v["posts"]) for k, v in page.tables["image_spread"].items()} == {s[:16]: c for s, c in groups}
    failed_rows = page.tables.get("failed_images", {})
    assert sum(_num(v["images"]) for v in failed_rows.values()) == failed
    assert all("<img" not in v for v in failed_rows)
    assert len(page.tables["runs"]) == query(db.dsn, "SELECT count(*) FROM etl_runs")[0][0]
    assert page.charts == ["posts_per_day", "sentiment_share", "share_of_voice", "top_hashtags", "rising_hashtags"]


def test_report_lists_the_fastest_growing_posts_from_the_snapshots(db, run_etl, archive, http_server):
    # A later run sees new counts for three posts (and the same counts for the rest): snapshots record the growth.
    grown = {"p3": (21 + 40, 3 + 2), "p4": (28 + 5, 4), "p6": (42, 0 + 9)}
    rows = []
    for post_id, (likes, comments) in grown.items():
        n = int(post_id[1:])
        rows.append(record(platform="alpha" if n % 3 else "beta", post_id=post_id, author_username=f"user{n % 5}",
                           caption="again", created_at=f"2024-03-0{1 + n % 4}T{n % 20:02d}:00:00Z",
                           like_count=likes, comment_count=comments, image_urls=[], hashtags=None))  # fmt: skip
    path = write_jsonl(archive / "later.jsonl", rows)
    assert run_etl("run", "--source", "jsonl", "--input", str(path)).returncode == 0
    out = archive / "report.html"
    assert run_etl("report", "--out", str(out)).returncode == 0
    page = Tables()
    page.feed(out.read_text(encoding="utf-8"))
    expected = query(
        db.dsn,
        "SELECT e.platform || ':' || e.post_id, max(e.like_count) - min(e.like_count), max(e.comment_count) - min(e.comment_count)"
        " FROM post_engagement e GROUP BY e.platform, e.post_id HAVING count(*) > 1 ORDER BY 1",
    )  # fmt: skip
    got = sorted((k, _num(v["likes_gained"]), _num(v["comments_gained"])) for k, v in page.tables["growing_posts"].items())
    assert got == [(k, float(a), float(b)) for k, a, b in expected]
    assert [k for k, *_ in got] == ["alpha:p4", "beta:p3", "beta:p6"]
    first = next(iter(page.tables["growing_posts"]))
    assert first == "beta:p3"  # the most grown first (+42)


def test_the_fastest_growing_posts_are_those_of_the_reports_period(db):
    # Every table covers the posts created in [--since, --until); this one took every post of the platform, so a
    # report of November 2026 listed a 2025 post that grew.
    from etl.report import Scope, collect

    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, caption, created_at, like_count, comment_count,"
            " first_like_count, first_comment_count, archived_at) VALUES"
            " ('jsonl', 'old', 'from 2025', '2025-06-01T12:00Z', 10, 0, 10, 0, now() - interval '10 days'),"
            " ('jsonl', 'nov', 'from november', '2026-11-15T12:00Z', 5, 0, 5, 0, now() - interval '10 days'),"
            " ('jsonl', 'nov2', 'also november', '2026-11-16T12:00Z', 5, 0, 5, 0, now() - interval '10 days')"
        )
        cur.execute(
            "INSERT INTO post_engagement_changes (platform, post_id, observed_at, like_count, comment_count) VALUES"
            " ('jsonl', 'old', now() - interval '1 day', 5000, 0), ('jsonl', 'nov', now() - interval '1 day', 50, 0),"
            " ('jsonl', 'nov2', now() - interval '1 day', 500, 0)"
        )
    november = Scope(since=datetime(2026, 11, 1, tzinfo=timezone.utc), until=datetime(2026, 12, 1, tzinfo=timezone.utc))
    data = collect(db, november, max_distance=5, min_count=5)
    assert data["totals"]["posts"] == 2
    assert [(r["post_id"], r["likes_gained"]) for r in data["growing"]] == [("nov2", 495), ("nov", 45)]
    everything = collect(db, Scope(), max_distance=5, min_count=5)
    assert [r["post_id"] for r in everything["growing"]] == ["old", "nov2", "nov"]


def test_more_posts_with_a_near_duplicate_leaves_out_the_groups_own_posts(db):
    # Posts a and b hold the same bytes; a also holds a near copy (a crop in its carousel). No other post holds
    # one: "more posts, near duplicates" is 0 (it was 1, post a counted again).
    h = 0x0123456789ABCDEF
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, author_username, created_at) VALUES"
            " ('jsonl', 'a', 'ann', '2026-11-10T10:00Z'), ('jsonl', 'b', 'bob', '2026-11-11T10:00Z'),"
            " ('jsonl', 'c', 'cat', '2026-11-12T10:00Z')"
        )
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, storage_key, sha256, bytes, phash)"
            " VALUES ('jsonl', 'a', 0, 'u0', 'stored', 'k/a0', repeat('a', 64), 10, %(h)s),"
            "        ('jsonl', 'b', 0, 'u1', 'stored', 'k/b0', repeat('a', 64), 10, %(h)s),"
            "        ('jsonl', 'a', 1, 'u2', 'stored', 'k/a1', repeat('b', 64), 9, %(h1)s)",
            {"h": h, "h1": h ^ 1},
        )
    spread = "SELECT sha256, posts, near_posts FROM report_image_spread(NULL, NULL, NULL, 10, 5)"
    assert query(db.dsn, spread) == [("a" * 64, 2, 0)]
    with db.transaction() as cur:  # a post outside the group with a near copy: that one counts
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, storage_key, sha256, bytes, phash)"
            " VALUES ('jsonl', 'c', 0, 'u3', 'stored', 'k/c0', repeat('c', 64), 9, %s)",
            (h ^ 3,),
        )
    assert query(db.dsn, spread) == [("a" * 64, 2, 1)]


def test_posts_without_an_author_add_no_account_to_the_totals_or_an_image_group(db):
    # count(DISTINCT (platform, author_username)) counts a row value, and one with a NULL field is not NULL: the
    # posts whose author the platform did not give made one more author in the totals (and one more account of
    # an image group) than the share of voice of the same report.
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, author_username, created_at) VALUES"
            " ('jsonl', 'a1', 'ana', '2024-03-01T12:00Z'), ('jsonl', 'a2', 'ana', '2024-03-01T12:00Z'),"
            " ('jsonl', 'n1', NULL, '2024-03-01T12:00Z'), ('jsonl', 'n2', NULL, '2024-03-01T12:00Z')"
        )
        cur.execute(
            "INSERT INTO post_media (platform, post_id, position, source_url, status, storage_key, sha256, bytes)"
            " SELECT 'jsonl', post_id, 0, 'u', 'stored', 'k/' || post_id, repeat('a', 64), 10 FROM social_posts"
        )
    [(authors,)] = query(db.dsn, "SELECT authors FROM report_totals(NULL, NULL, NULL)")
    [(voice,)] = query(db.dsn, "SELECT authors FROM report_share_of_voice(NULL, NULL, NULL)")
    [(accounts,)] = query(db.dsn, "SELECT accounts FROM report_image_spread(NULL, NULL, NULL, 10, 5)")
    assert (authors, voice, accounts) == (1, 1, 1), f"totals {authors}, share of voice {voice}, image group {accounts}"


def test_report_near_duplicates_of_top_groups_and_thumbnails(db, run_etl, archive):
    out = archive / "all.html"
    assert run_etl("report", "--out", str(out)).returncode == 0
    text = out.read_text(encoding="utf-8")
    page = Tables()
    page.feed(text)
    (group,) = page.tables["image_spread"].values()
    assert _num(group["posts"]) == 3 and _num(group["near_posts"]) == 1  # p1, p7, p13 and the resized copy in p5
    assert group["platforms"] == "1"  # all three on alpha (n % 3 == 1)
    assert text.count('src="data:image/jpeg;base64,') >= 4  # thumbnails of top posts with images and of the group
    assert not re.search(r'(src|href)="(?!data:|#)', text) and "@import" not in text and "url(http" not in text


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium) when run as root")
    return CHROMIUM


def test_report_renders_in_chromium_every_chart_visible_nothing_fetched(db, run_etl, archive, browser):
    out = archive / "report.html"
    assert run_etl("report", "--out", str(out)).returncode == 0
    shot = ARTIFACTS / "report.png"
    dom, requests = chromium(out, screenshot=shot)
    assert requests == []
    probe = json.loads(re.search(r'<pre id="layout-probe">(.*?)</pre>', dom, re.S).group(1))
    charts = {c["chart"]: c for c in probe["charts"]}
    assert set(charts) == {"posts_per_day", "sentiment_share", "share_of_voice", "top_hashtags", "rising_hashtags"}
    for chart in charts.values():
        assert chart["shown"] and chart["width"] > 300 and chart["height"] > 80 and chart["shapes"] > 10, chart
    assert probe["images"] and all(i["complete"] and i["w"] > 0 for i in probe["images"])  # thumbnails decoded
    shutil.copy(out, ARTIFACTS / "report.html")
    assert shot.stat().st_size > 20_000


def test_the_network_check_catches_a_page_that_fetches(tmp_path, browser):
    page = tmp_path / "leaky.html"
    page.write_text(
        '<html><head><link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Inter"></head>'
        '<body><img src="http://cdn.example.com/x.png"></body></html>'
    )
    _, requests = chromium(page, probe=False)
    assert any("cdn.example.com" in r for r in requests) and any("fonts.googleapis.com" in r for r in requests)


@pytest.mark.badinput("report: --until before --since")
def test_report_refuses_an_empty_period(db, run_etl):
    bad = run_etl("report", "--since", "2024-03-05", "--until", "2024-03-01")
    assert bad.returncode == 2 and "--until must be after --since" in bad.stderr
