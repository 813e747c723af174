"""The loader on the real PostgreSQL: upsert counts, last-wins duplicates, kept archive dates, cleaned text, media rows."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from etl import db as dbm
from etl.enrich import SentimentEnricher
from etl.records import Media, Post

WHEN = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
ENRICHER = SentimentEnricher()


def post(post_id: str = "1", **changes: object) -> Post:
    base = Post("mock", post_id, WHEN, author_username="ana", caption="Lovely morning", like_count=1, comment_count=0)
    return ENRICHER.enrich(dataclasses.replace(base, **changes))


def upsert(db, posts, **kwargs) -> dbm.UpsertCounts:
    with db.transaction() as cur:
        return dbm.upsert_posts(cur, posts, sentiment_version=ENRICHER.version, **kwargs)


def rows(db, sql: str, params: tuple = ()) -> list[tuple]:
    with db.transaction() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def test_insert_update_unchanged_counts(db):
    counts = upsert(db, [post("1"), post("2"), post("3")])
    assert (counts.inserted, counts.updated, counts.unchanged) == (3, 0, 0)
    counts = upsert(db, [post("1"), post("2", like_count=50), post("3", caption="Awful rainy morning"), post("4")])
    assert (counts.inserted, counts.updated, counts.unchanged) == (1, 2, 1)
    assert rows(db, "SELECT post_id, like_count, sentiment FROM social_posts ORDER BY post_id") == [
        ("1", 1, "positive"),
        ("2", 50, "positive"),
        ("3", 1, "negative"),
        ("4", 1, "positive"),
    ]


def test_rerun_keeps_archived_at_and_updates_counts(db):
    upsert(db, [post("1")])
    [(archived, updated)] = rows(db, "SELECT archived_at, updated_at FROM social_posts")
    counts = upsert(db, [post("1", like_count=99, comment_count=7)])
    assert counts.updated == 1
    [(archived_again, updated_again, likes, comments)] = rows(
        db, "SELECT archived_at, updated_at, like_count, comment_count FROM social_posts"
    )
    assert archived_again == archived
    assert updated_again > updated
    assert (likes, comments) == (99, 7)


def test_unchanged_rerun_writes_nothing(db):
    upsert(db, [post("1")])
    [(updated,)] = rows(db, "SELECT updated_at FROM social_posts")
    assert upsert(db, [post("1")]).unchanged == 1
    assert rows(db, "SELECT updated_at FROM social_posts") == [(updated,)]


def test_duplicates_in_one_batch_collapse_last_wins(db):
    counts = upsert(db, [post("1", like_count=1), post("2"), post("1", like_count=2), post("1", like_count=3)])
    assert (counts.inserted, counts.updated, counts.unchanged) == (2, 0, 0)
    assert rows(db, "SELECT post_id, like_count FROM social_posts ORDER BY post_id") == [("1", 3), ("2", 1)]


def test_same_post_id_on_two_platforms_is_two_rows(db):
    upsert(db, [post("1"), dataclasses.replace(post("1"), platform="twitter")])
    assert rows(db, "SELECT platform FROM social_posts ORDER BY platform") == [("mock",), ("twitter",)]


@pytest.mark.badinput("NUL bytes and lone surrogates reaching the loader are cleaned, not refused by PostgreSQL")
def test_nul_bytes_and_lone_surrogates_are_cleaned(db):
    dirty = post(
        "1",
        caption="nul\x00here \ud83d alone",
        author_username="a\x00na",
        permalink="https://e.com/\udfff",
        hashtags=("ok", "t\x00ag"),
        raw={"k\x00": "v\ud800", "list": ["\x00", 1.5]},
    )
    assert upsert(db, [dirty]).inserted == 1
    [(caption, author, permalink, hashtags, raw)] = rows(
        db, "SELECT caption, author_username, permalink, hashtags, raw FROM social_posts"
    )
    assert caption == "nulhere \ufffd alone"
    assert author == "ana"
    assert permalink == "https://e.com/\ufffd"
    assert hashtags == ["ok", "tag"]
    assert raw == {"k": "v\ufffd", "list": ["", 1.5]}


def test_every_kind_of_unicode_is_stored_exactly(db):
    caption = "emoji 😀👩‍👩‍👧🏳️‍🌈 RTL שלום مرحبا combining é ñ CJK 漢字かなカナ 한국어 zero-width \u200b\u200d"
    upsert(db, [post("ü-1", caption=caption, author_username="léa_photo", hashtags=("日本", "café"))])
    assert rows(db, "SELECT post_id, caption, author_username, hashtags FROM social_posts") == [
        ("ü-1", caption, "léa_photo", ["日本", "café"])
    ]


def test_first_image_url_is_set_and_kept(db):
    upsert(db, [post("1")], first_image_urls={("mock", "1"): "s3://b/mock/1/0.png"})
    upsert(db, [post("1", like_count=5)])  # a rerun that stored no image keeps the URL
    assert rows(db, "SELECT image_s3_url, like_count FROM social_posts") == [("s3://b/mock/1/0.png", 5)]


def test_raw_alone_does_not_count_as_a_change(db):
    upsert(db, [post("1", raw={"etag": "a"})])
    assert upsert(db, [post("1", raw={"etag": "b"})]).unchanged == 1


def test_a_large_batch_is_one_statement(db):
    counts = upsert(db, [post(str(n), like_count=n) for n in range(1500)])
    assert counts.inserted == 1500
    assert rows(db, "SELECT count(*), sum(like_count) FROM social_posts") == [(1500, sum(range(1500)))]


def test_ids_equal_after_cleaning_collapse_in_one_batch(db):
    """A source that builds Posts itself can hand the loader ids that differ only by a NUL byte."""
    counts = upsert(db, [post("a\x00"), post("a", like_count=9)])
    assert counts.inserted == 1
    assert rows(db, "SELECT post_id, like_count FROM social_posts") == [("a", 9)]


# -- post_media -----------------------------------------------------------------------------------------


def stored(post_id: str = "1", position: int = 0, key: str = "mock/2024/05/01/1/0.png") -> Media:
    return Media(
        "mock", post_id, position, f"https://cdn.example.com/{post_id}/{position}.png", status="stored",
        key=key, url=f"file:///objects/{key}", sha256="ab" * 32, bytes=1234, content_type="image/png",
        width=8, height=6,
    )  # fmt: skip


def failed(post_id: str = "1", position: int = 0, error: str = "HTTP 503", permanent: bool = False) -> Media:
    return Media(
        "mock", post_id, position, f"https://cdn.example.com/{post_id}/{position}.png", status="failed",
        error=error, permanent=permanent,
    )  # fmt: skip


def media_rows(db) -> list[tuple]:
    return rows(
        db,
        "SELECT post_id, position, status, attempts, last_error, permanent, storage_key, sha256, stored_at IS NOT NULL"
        " FROM post_media ORDER BY post_id, position",
    )


def write_media(db, media: list[Media]) -> None:
    with db.transaction() as cur:
        dbm.upsert_media(cur, media)


def test_failed_image_is_marked_failed_with_error_and_attempts(db):
    upsert(db, [post("1")])
    write_media(db, [failed(error="timed out after 4 attempts: ReadTimeout")])
    assert media_rows(db) == [
        ("1", 0, "failed", 1, "timed out after 4 attempts: ReadTimeout", False, None, None, False)
    ]
    write_media(db, [failed(error="HTTP 404", permanent=True)])
    assert media_rows(db) == [("1", 0, "failed", 2, "HTTP 404", True, None, None, False)]


def test_failed_then_stored(db):
    upsert(db, [post("1")])
    write_media(db, [failed()])
    write_media(db, [stored()])
    assert media_rows(db) == [("1", 0, "stored", 2, None, False, "mock/2024/05/01/1/0.png", "ab" * 32, True)]


def test_stored_image_is_never_downgraded(db):
    upsert(db, [post("1")])
    write_media(db, [stored()])
    write_media(db, [failed(error="HTTP 500")])
    write_media(db, [stored(key="mock/elsewhere/0.png")])
    assert media_rows(db) == [("1", 0, "stored", 1, None, False, "mock/2024/05/01/1/0.png", "ab" * 32, True)]


def test_skipped_and_pending_media_are_not_written(db):
    upsert(db, [post("1")])
    write_media(db, [Media("mock", "1", 0, "https://e.com/0.png", status="skipped"), Media("mock", "1", 1, "u")])
    assert media_rows(db) == []


def test_known_media_lists_stored_and_permanently_failed_images_of_the_asked_posts(db):
    upsert(db, [post("1"), post("2")])
    gone = Media("mock", "1", 2, "https://e.com/gone.png", status="failed", error="HTTP 404", permanent=True)
    write_media(db, [stored("1", 0), failed("1", 1), gone, stored("2", 0, key="k2")])
    with db.transaction() as cur:
        known, hopeless, _ = dbm.known_media(cur, [("mock", "1"), ("mock", "9")])
        assert dbm.known_media(cur, []) == ({}, {}, {})
    assert known == {("mock", "1", 0): ("mock/2024/05/01/1/0.png", "file:///objects/mock/2024/05/01/1/0.png")}
    assert hopeless == {("mock", "1", 2): "https://e.com/gone.png"}


@pytest.mark.badinput("text that COPY's format escapes (tabs, newlines, backslashes, \\N, quotes, braces) is stored as sent")
def test_staged_copy_keeps_awkward_text_exactly(db):
    awkward = 'tab\there\nnew line\r\\N back\\slash "quoted" {braced,comma} NULL \\t'
    tags = ("a,b", 'q"uote', "back\\slash", "{x}", "NULL", "sp ace", "tab\tin")
    raw = {"text": awkward, "nested": [awkward, None, 1.5], "k\\ey": "v"}
    counts = upsert(db, [post("id\twith\\tab", caption=awkward, author_username=awkward, hashtags=tags, raw=raw)])
    assert (counts.inserted, counts.updated, counts.unchanged) == (1, 0, 0)
    assert rows(db, "SELECT post_id, caption, author_username, hashtags, raw FROM social_posts") == [
        ("id\twith\\tab", awkward, awkward, list(tags), raw)
    ]
    # Sent again unchanged: compared with what was stored, nothing differs.
    counts = upsert(db, [post("id\twith\\tab", caption=awkward, author_username=awkward, hashtags=tags, raw=raw)])
    assert (counts.inserted, counts.updated, counts.unchanged) == (0, 0, 1)


def test_a_plain_row_goes_into_copy_as_it_is_and_any_other_value_by_value():
    """_post_line() builds most rows without escaping (one check of all their text): the same line, character for
    character, as the value-by-value build, whatever a field holds (COPY's specials, NUL, surrogates, quotes)."""
    import random

    from etl.db.archive import _escaped_line, _post_line

    rng = random.Random(16)
    pieces = ("plain", "é中😀", "\\", "\t", "\n", "\r", "\x00", "\ud800", '"', ",", "{", "\\N", " ", "#")

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))

    plain = escaped = 0
    for n in range(3000):
        scored = post(
            text() or "x", caption=rng.choice([None, text()]), author_username=rng.choice([None, text()]),
            permalink=rng.choice([None, text()]), hashtags=tuple(text() for _ in range(rng.randint(0, 2))),
            raw=rng.choice([None, None, {"k": text()}]), like_count=rng.choice([None, n]),
        )  # fmt: skip
        if n % 3 == 0:
            scored = dataclasses.replace(scored, sentiment=None, sentiment_skipped=rng.choice([None, "language fr"]))
        url = rng.choice([None, "s3://b/" + text()])
        line = _post_line(scored, url, ENRICHER.version)
        assert line == _escaped_line(scored, url, ENRICHER.version), scored
        plain += "\\" not in line.replace("\\N", "")
        escaped += "\\" in line.replace("\\N", "")
    assert plain > 300 and escaped > 300  # both builds were taken
    # A post_id that is not text (a platform module's int) is built value by value too.
    assert _post_line(dataclasses.replace(post(), post_id=7), None, None).startswith("mock\t7\t")


def test_engagement_snapshots_follow_the_staged_batch(db):

    def load(posts):  # the upsert writes the snapshots in the same statement
        with db.transaction() as cur:
            counts = dbm.upsert_posts(cur, posts, sentiment_version=ENRICHER.version)
            return counts, counts.snapshots

    # Duplicates in a batch: the last wins, one snapshot. A post without counts takes none.
    _, snaps = load([post("1", like_count=3), post("1", like_count=5), post("2", like_count=None, comment_count=None)])
    assert snaps == 1
    _, snaps = load([post("1", like_count=5), post("2", like_count=None, comment_count=None)])  # unchanged
    assert snaps == 0
    counts, snaps = load([post("1", like_count=6), post("3", like_count=1)])
    assert (counts.inserted, counts.updated, snaps) == (1, 1, 2)
    assert rows(db, "SELECT post_id, like_count FROM post_engagement ORDER BY post_id, like_count") == [
        ("1", 5), ("1", 6), ("3", 1)
    ]  # fmt: skip


def test_a_posts_first_counts_go_on_its_row_and_only_later_changes_into_the_history_table(db):
    """sql/014: a first sight writes no history row (the first load's work); the view post_engagement is the
    whole history, each row at most once a moment, as the former table's key (platform, post_id, observed_at) kept it."""
    counts = upsert(db, [post("1", like_count=3, comment_count=None), post("2", like_count=None, comment_count=None)])
    assert (counts.inserted, counts.snapshots) == (2, 1)
    assert rows(db, "SELECT count(*) FROM post_engagement_changes") == [(0,)]
    assert rows(db, "SELECT post_id, first_like_count, first_comment_count FROM social_posts ORDER BY post_id") == [
        ("1", 3, None), ("2", None, None)
    ]  # fmt: skip
    history = "SELECT post_id, like_count, comment_count, observed_at = (SELECT archived_at FROM social_posts s WHERE s.post_id = e.post_id) FROM post_engagement e ORDER BY post_id, observed_at"
    assert rows(db, history) == [("1", 3, None, True)]
    # Later counts: a row of the history table each, the first counts staying on the row.
    assert upsert(db, [post("1", like_count=4, comment_count=None), post("2", like_count=0)]).snapshots == 2
    assert rows(db, history) == [("1", 3, None, True), ("1", 4, None, False), ("2", 0, 0, False)]
    assert rows(db, "SELECT post_id, first_like_count FROM social_posts ORDER BY post_id") == [("1", 3), ("2", None)]
    # The same post twice in one transaction: its first counts stand for that moment (no second row at it).
    with db.transaction() as cur:
        first = dbm.upsert_posts(cur, [post("9", like_count=1)], sentiment_version=ENRICHER.version)
        again = dbm.upsert_posts(cur, [post("9", like_count=2)], sentiment_version=ENRICHER.version)
    assert (first.inserted, first.snapshots, again.updated, again.snapshots) == (1, 1, 1, 0)
    assert rows(db, "SELECT like_count FROM post_engagement WHERE post_id = '9'") == [(1,)]


def test_a_post_another_run_inserted_meanwhile_still_gets_its_snapshot(db):
    """Two runs insert the same new post at once: the second waits for the first, then updates the row. The post was
    not there when its statement began, so it finds no counts to compare with and records its own, as a history
    row: both runs' counts are kept (as before sql/014, when each wrote a snapshot)."""
    import threading

    import psycopg2

    first = psycopg2.connect(db.dsn)
    second = psycopg2.connect(db.dsn)
    try:
        with first.cursor() as cur:
            dbm.upsert_posts(cur, [post("r", like_count=1)], sentiment_version=ENRICHER.version)  # not committed
        result: list[dbm.UpsertCounts] = []

        def other_run() -> None:
            with second.cursor() as cur:
                result.append(dbm.upsert_posts(cur, [post("r", like_count=2)], sentiment_version=ENRICHER.version))
            second.commit()

        waiting = threading.Thread(target=other_run, daemon=True)
        waiting.start()
        pid = second.get_backend_pid()
        for _ in range(500):  # until the second waits for the first's row
            if rows(db, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)) == [("Lock",)]:
                break
            waiting.join(0.02)
        else:
            pytest.fail("the second run never waited for the first")
        first.commit()
        waiting.join(10)
        assert not waiting.is_alive() and (result[0].updated, result[0].snapshots) == (1, 1)
    finally:
        first.close()
        second.close()
    assert rows(db, "SELECT like_count FROM post_engagement WHERE post_id = 'r' ORDER BY observed_at") == [(1,), (2,)]


def test_held_gives_stored_decisions_images_and_tombstones_of_a_batch(db):
    upsert(db, [post("1"), post("2", caption=None), post("3")])
    write_media(db, [stored("1", 0)])
    with db.transaction() as cur:
        cur.execute("INSERT INTO forgotten_posts (platform, post_id) VALUES ('mock', 'gone')")
        cur.execute("UPDATE social_posts SET sentiment_version = 'older' WHERE post_id = '3'")
    batch = [
        post("1", image_urls=("https://cdn.example.com/1/0.png",)), post("2"), post("3"), post("new"), post("gone"),
    ]  # fmt: skip
    with db.transaction() as cur:
        held = dbm.held(cur, batch, ENRICHER.version)
        assert dbm.held(cur, [], ENRICHER.version) == ({}, {}, {}, set(), {}, frozenset(), {})
    first = post("1")
    # Only post 1 keeps its decision: 2 has no caption stored, 3 was decided by another enricher.
    assert held.scores == {
        ("mock", "1"): (first.caption, first.sentiment, first.language, first.language_source, first.sentiment_skipped)
    }
    assert held.stored == {("mock", "1", 0): ("mock/2024/05/01/1/0.png", "file:///objects/mock/2024/05/01/1/0.png")}
    assert held.hopeless == {}
    assert held.forgotten == {("mock", "gone")}
    assert set(held.rows) == {("mock", "1"), ("mock", "2"), ("mock", "3")}  # what the upsert compares, of each


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        ["mock", "p1"],
        ['say "hi"', "back\\slash", "\\", '"', "a,b", "{x}", "NULL", "  spaced  ", "café ✓", "tab\there"],
    ],
)
def test_text_array_reads_back_as_the_same_values(db, values):
    # held() sends its keys as one text[] literal (text_array), not as psycopg2's ARRAY[...] of constants: each
    # value must arrive exactly as it was, whatever quotes, backslashes, commas or braces it holds.
    with db.transaction() as cur:
        cur.execute("SELECT %s::text[]", (dbm.archive.text_array(values),))
        assert cur.fetchone()[0] == values


def test_held_finds_posts_and_images_whose_ids_hold_quotes_and_backslashes(db):
    odd = ['q"uote', "back\\slash", "comma,brace}"]
    upsert(db, [post(i) for i in odd])
    write_media(db, [stored(i, 0, key=f"mock/odd/{n}/0.png") for n, i in enumerate(odd)])  # known_media()'s keys
    batch = [post(i, image_urls=(f"https://cdn.example.com/{n}/0.png",)) for n, i in enumerate([*odd, "new"])]
    with db.transaction() as cur:
        held = dbm.held(cur, batch, ENRICHER.version)
    assert set(held.rows) == {("mock", i) for i in odd}
    assert set(held.stored) == {("mock", i, 0) for i in odd}


def test_held_probes_the_key_index_however_the_planner_guesses(db):
    # A join the planner may answer with a scan of the whole table, once per batch, slows every batch as the
    # archive grows: the lookup must stay an index probe per key (issue 16's growth target).
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO social_posts (platform, post_id, created_at) SELECT 'mock', 'p' || n, now()"
            " FROM generate_series(1, 5000) n"
        )
        cur.execute("ANALYZE social_posts")
        cur.execute(
            "EXPLAIN " + dbm.archive.HELD_SQL,
            {
                "platforms": dbm.archive.text_array(["mock"] * 500),
                "post_ids": dbm.archive.text_array([f"p{n}" for n in range(500)]),
                "version": ENRICHER.version,
            },
        )
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "social_posts_platform_post_id_key" in plan
    assert "Seq Scan on social_posts" not in plan



def _posts_fetched_by_index(cur) -> int:
    cur.execute("SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'social_posts'")
    return cur.fetchone()[0]


def test_image_rows_find_their_posts_by_the_unique_index_on_a_table_never_analysed(db):
    # A first load into a new database: social_posts has no statistics yet (TRUNCATE leaves it so, as in a new
    # database). The key check of each image row must read its own post, not every post of the platform (the
    # planner took the (platform, created_at) index: 300 rows read 45,150 posts, and it grew with the table).
    posts = [post(f"p{n:04d}") for n in range(300)]
    with db.transaction() as cur:
        cur.execute("SELECT reltuples < 0 FROM pg_class WHERE relname = 'social_posts'")
        assert cur.fetchone()[0], "the test needs a table never analysed"
        dbm.upsert_posts(cur, posts, sentiment_version=ENRICHER.version)
        before = _posts_fetched_by_index(cur)
        dbm.upsert_media(cur, [stored(p.post_id, key=f"mock/2024/05/01/{p.post_id}/0.png") for p in posts])
        fetched = _posts_fetched_by_index(cur) - before
    assert len(media_rows(db)) == 300
    assert fetched <= 300 + 5, f"the key checks of 300 image rows read {fetched} posts"
    with db.transaction() as cur:  # analysed once: the next batches need no second ANALYZE
        cur.execute("SELECT reltuples FROM pg_class WHERE relname = 'social_posts'")
        assert cur.fetchone()[0] == 300
