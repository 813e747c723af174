"""A rerun decides in Python which posts it need not send (issue 16): the archive must end exactly as the upsert's
own comparison in PostgreSQL leaves it. Each case runs both ways from the same stored state: every post sent
(stored=None, the upsert's WHERE decides) and only those upsert_posts' comparison with held() finds changed."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta, timezone

import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.db import archive
from etl.enrich import SentimentEnricher
from etl.records import Post, Sentiment
from etl.run.archiver import Archiver
from etl.run.stats import RunStats
from tests.conftest import query
from tests.support import record, write_jsonl

WHEN = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
V = "enricher-1"
BASE = Post(
    "mock", "p1", WHEN, author_username="ana", caption="Lovely morning", like_count=1, comment_count=2,
    permalink="https://example.com/p1", hashtags=("sun", "walk"), raw={"k": 1}, sentiment=Sentiment(0.5, 0.6, "positive"),
    language="en", language_source="platform",
)  # fmt: skip
STORED_URL = "file:///objects/mock/2024/05/01/p1/0.png"

# Everything of a post but its id and dates, and whether this transaction wrote it (updated_at = now()).
POSTS_SQL = (
    "SELECT to_jsonb(p) - 'id' - 'archived_at' - 'updated_at', updated_at = now() FROM social_posts p"
    " ORDER BY platform, post_id"
)
# A post stored before engagement snapshots existed: no first counts on its row, no changes.
NO_SNAPSHOTS = ("UPDATE social_posts SET first_like_count = NULL, first_comment_count = NULL", "DELETE FROM post_engagement_changes")
SNAPSHOTS_SQL = (
    "SELECT platform, post_id, like_count, comment_count, observed_at = now() FROM post_engagement"
    " ORDER BY platform, post_id, observed_at"
)


def post(**changes: object) -> Post:
    return dataclasses.replace(BASE, **changes)


def both_ways(db, before, after, *, version=V, first_urls=None, setup=()):
    """Store `before` as an earlier run would, then upsert `after` both ways from that state (rolled back each
    time). Returns ((counts, posts, snapshots) every post sent, the same with the skip, whether it sent nothing)."""
    conn = db.connection()
    try:
        with conn.cursor() as cur:
            archive.upsert_posts(cur, before, sentiment_version=V, first_image_urls={("mock", "p1"): STORED_URL})
            # A day ago, the post and its history (its first counts are observed at archived_at, sql/014).
            cur.execute("UPDATE social_posts SET updated_at = now() - interval '1 day', archived_at = archived_at - interval '1 day'")
            cur.execute("UPDATE post_engagement_changes SET observed_at = observed_at - interval '1 day'")
            for sql in setup:
                cur.execute(sql)
            cur.execute("SAVEPOINT stored")
            stored = archive.held(cur, after, version).rows
            outcomes = []
            for rows in (None, stored):
                with conn.cursor() as fresh:  # its own cursor: .query says whether it sent anything
                    counts = archive.upsert_posts(
                        fresh, after, sentiment_version=version, first_image_urls=first_urls, stored=rows
                    )
                    sent = fresh.query is not None
                cur.execute(POSTS_SQL)
                posts = cur.fetchall()
                cur.execute(SNAPSHOTS_SQL)
                outcomes.append((counts, posts, cur.fetchall(), sent))
                cur.execute("ROLLBACK TO SAVEPOINT stored")
    finally:
        conn.rollback()
    (counts_a, posts_a, snaps_a, _), (counts_b, posts_b, snaps_b, sent_b) = outcomes
    return (counts_a, posts_a, snaps_a), (counts_b, posts_b, snaps_b), not sent_b


# (column the change reaches, the post as a rerun brings it, the enricher version, first image URL of the rerun)
CHANGES = [
    ("author_username", post(author_username="bea"), V, None),
    ("author_username", post(author_username=None), V, None),
    ("caption", post(caption="Lovely morning!"), V, None),
    ("caption", post(caption=None), V, None),
    ("sentiment", post(sentiment=Sentiment(0.5, 0.6, "neutral")), V, None),
    ("sentiment_polarity", post(sentiment=Sentiment(0.5000000000000001, 0.6, "positive")), V, None),
    ("sentiment_subjectivity", post(sentiment=Sentiment(0.5, 0.600001, "positive")), V, None),
    ("sentiment_version", post(), "enricher-2", None),
    ("sentiment_version", post(sentiment=None), V, None),  # no score, no reason: no version either
    ("like_count", post(like_count=2), V, None),
    ("like_count", post(like_count=None), V, None),
    ("comment_count", post(comment_count=0), V, None),
    ("comment_count", post(comment_count=None), V, None),
    ("permalink", post(permalink="https://example.com/p1?ref=x"), V, None),
    ("hashtags", post(hashtags=("walk", "sun")), V, None),
    ("hashtags", post(hashtags=()), V, None),
    ("caption_truncated", post(caption_truncated=True), V, None),
    ("language", post(language="fr"), V, None),
    ("language_source", post(language_source="detected"), V, None),
    ("sentiment_skipped", post(sentiment_skipped="language fr"), V, None),
    ("image_s3_url", post(), V, "file:///objects/mock/2024/05/01/p1/0.jpg"),
]


def test_every_column_the_upsert_compares_has_a_case():
    # A column added to the comparison without a case here would go untested: this test names it.
    assert {c for c, *_ in CHANGES} == {*archive._POST_MUTABLE, "image_s3_url"}


@pytest.mark.parametrize(("column", "rerun", "version", "url"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_of_any_compared_column_is_written(db, column, rerun, version, url):
    urls = {("mock", "p1"): url} if url else None
    sql, skip, nothing_sent = both_ways(db, [BASE], [rerun], version=version, first_urls=urls)
    (counts, posts, _) = sql
    assert (counts.updated, counts.unchanged) == (1, 0)
    [(row, written)] = posts
    assert written
    assert skip == sql  # the same row, the same snapshots, the same counts
    assert not nothing_sent
    assert column in row  # the case's column is one the table has


@pytest.mark.parametrize(
    ("what", "before", "rerun"),
    [
        ("the same post", BASE, BASE),
        ("only raw differs (raw alone is no change)", BASE, post(raw={"k": 2, "expires": "soon"})),
        ("only created_at differs (not a column a rerun updates)", BASE, post(created_at=WHEN + timedelta(hours=1))),
        ("no counts at all", post(like_count=None, comment_count=None), post(like_count=None, comment_count=None)),
        ("no score, a reason", post(sentiment=None, sentiment_skipped="language fr"), post(sentiment=None, sentiment_skipped="language fr")),
        ("float digits", post(sentiment=Sentiment(-0.123457, 1 / 3, "negative")), post(sentiment=Sentiment(-0.123457, 1 / 3, "negative"))),
        ("text the database stores cleaned", post(caption="a\x00b \ud800", author_username="\x00ana", permalink="p\x00"),
         post(caption="a\x00b \ud800", author_username="\x00ana", permalink="p\x00")),
        ("text COPY escapes", post(caption="tab\there\nnew\r\\N \\", hashtags=('q"uote', "a,b", "{x}", "NULL", "back\\slash")),
         post(caption="tab\there\nnew\r\\N \\", hashtags=('q"uote', "a,b", "{x}", "NULL", "back\\slash"))),
        ("an id the database stores cleaned", post(post_id="p\x001"), post(post_id="p\x001")),
    ],
)  # fmt: skip
def test_a_post_the_upsert_would_leave_alone_is_not_sent(db, what, before, rerun):
    sql, skip, nothing_sent = both_ways(db, [before], [rerun])
    counts, posts, snapshots = sql
    assert (counts.inserted, counts.updated, counts.unchanged, counts.snapshots) == (0, 0, 1, 0), what
    assert not any(written for _, written in posts)
    assert skip == sql, what
    assert nothing_sent, what  # not one statement: a rerun with nothing new costs no round trip


def test_a_first_image_stored_later_keeps_the_stored_url_when_the_rerun_has_none(db):
    sql, skip, nothing_sent = both_ways(db, [BASE], [BASE], first_urls={("mock", "p1"): None})
    assert sql[0].unchanged == 1 and skip == sql and nothing_sent
    [(row, _)] = sql[1]
    assert row["image_s3_url"] == STORED_URL  # COALESCE: the stored URL stays


def test_duplicates_in_a_batch_the_last_wins_both_ways(db):
    changed_then_same = [post(like_count=9), BASE]
    sql, skip, nothing_sent = both_ways(db, [BASE], changed_then_same)
    assert sql[0].unchanged == 1 and skip == sql and nothing_sent
    same_then_changed = [BASE, post(like_count=9)]
    sql, skip, nothing_sent = both_ways(db, [BASE], same_then_changed)
    assert sql[0].updated == 1 and skip == sql and not nothing_sent
    [(row, _)] = sql[1]
    assert row["like_count"] == 9


def test_only_the_changed_posts_of_a_batch_are_sent_and_each_is_counted(db):
    before = [post(post_id=f"p{n}") for n in range(6)]
    after = [post(post_id=f"p{n}", like_count=n % 3) for n in range(6)] + [post(post_id="new")]
    sql, skip, nothing_sent = both_ways(db, before, after)
    assert (sql[0].inserted, sql[0].updated, sql[0].unchanged) == (1, 4, 2)  # like_count 1 was stored: p1, p4 same
    assert skip == sql and not nothing_sent


@pytest.mark.fault("a post stored before engagement snapshots existed has none: its rerun still takes its first")
def test_a_post_without_a_snapshot_is_sent_for_one(db):
    sql, skip, nothing_sent = both_ways(db, [BASE], [BASE], setup=NO_SNAPSHOTS)
    counts, _, snapshots = sql
    assert (counts.unchanged, counts.snapshots) == (1, 1)
    assert snapshots == [("mock", "p1", 1, 2, True)]
    assert skip == sql and not nothing_sent


@pytest.mark.fault("a post whose latest snapshot is not its counts (a race of two runs) is sent: the snapshot follows")
def test_a_post_whose_latest_snapshot_differs_from_its_row_is_sent(db):
    later = "INSERT INTO post_engagement_changes (platform, post_id, like_count, comment_count, observed_at) VALUES ('mock', 'p1', 7, 2, now() - interval '1 hour')"
    sql, skip, nothing_sent = both_ways(db, [BASE], [BASE], setup=[later])
    assert (sql[0].unchanged, sql[0].snapshots) == (1, 1)
    assert skip == sql and not nothing_sent


def test_a_post_with_image_rows_to_write_is_sent(db):
    conn = db.connection()
    try:
        with conn.cursor() as cur:
            archive.upsert_posts(cur, [BASE], sentiment_version=V)
            stored = archive.held(cur, [BASE], V).rows
        with conn.cursor() as fresh:
            counts = archive.upsert_posts(fresh, [BASE], sentiment_version=V, stored=stored, with_images={("mock", "p1")})
            assert fresh.query is not None and counts.unchanged == 1
        with conn.cursor() as fresh:
            counts = archive.upsert_posts(fresh, [BASE], sentiment_version=V, stored=stored)
            assert fresh.query is None and counts.unchanged == 1
    finally:
        conn.rollback()


# Values as feeds bring them: text the database stores cleaned (NUL, lone surrogates) or COPY escapes, floats
# whose digits matter, and each field's edges (None, empty, the same value again).
_text = st.one_of(st.none(), st.text(alphabet="ab \t\n\\\"{},\x00\ud800é", max_size=6))
_fields = {
    "author_username": _text, "caption": _text, "permalink": _text, "sentiment_skipped": _text,
    "like_count": st.one_of(st.none(), st.integers(0, 3)), "comment_count": st.one_of(st.none(), st.integers(0, 3)),
    "hashtags": st.lists(st.text(alphabet="ab,\"{}\\\x00 ", max_size=3), max_size=3).map(tuple),
    "sentiment": st.one_of(st.none(), st.builds(
        Sentiment, st.sampled_from([0.5, -0.0, 1 / 3, 0.1 + 0.2]), st.sampled_from([0.0, 0.6]),
        st.sampled_from(["positive", "neutral", "negative"]),
    )),
    "caption_truncated": st.booleans(), "language": st.sampled_from([None, "en", "pt-br"]),
    "language_source": st.sampled_from([None, "platform", "detected"]),
}  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_rerun_ends_as_the_upsert_alone_would_leave_it(db, data):
    stored = post(**{name: data.draw(field, label=f"stored {name}") for name, field in _fields.items()})
    # A rerun brings back most fields as they were: here up to two are drawn again (maybe to the same value).
    again = data.draw(st.sets(st.sampled_from(sorted(_fields)), max_size=2), label="fields drawn again")
    rerun = dataclasses.replace(stored, **{name: data.draw(_fields[name], label=f"rerun {name}") for name in again})
    url = data.draw(st.sampled_from([None, STORED_URL, STORED_URL + "?v=2"]), label="first image URL")
    version = data.draw(st.sampled_from([V, "enricher-2"]), label="enricher version")
    setup = data.draw(st.sampled_from([(), NO_SNAPSHOTS]), label="snapshots")
    sql, skip, _ = both_ways(
        db, [stored], [rerun], version=version, first_urls={("mock", "p1"): url} if url else None, setup=setup
    )
    assert skip == sql


# -- through the archiver ------------------------------------------------------------------------------------


def test_a_post_in_two_batches_in_flight_ends_as_the_last_one_says(db, make_settings, monkeypatch):
    """Batch 2 is looked up before batch 1 is loaded: its row of a post batch 1 changes is stale, so that post
    goes to the database, which finds batch 1's write and takes batch 2's values back (the last wins)."""
    enricher = SentimentEnricher()
    first = enricher.enrich(Post("mock", "a", WHEN, caption="Lovely", like_count=1, comment_count=0))
    filler = [enricher.enrich(Post("mock", f"f{n}", WHEN, caption="fine", like_count=0)) for n in range(3)]
    settings = make_settings(ETL_BATCH_SIZE="2")
    Archiver(settings, db, None, enricher=enricher).archive(iter([first]), RunStats(), source="mock")
    stream = [dataclasses.replace(first, like_count=5), filler[0], first, filler[1], filler[2]]
    # Batch 1's load waits until batch 2 has been looked up: batch 2's lookup then surely predates batch 1's write.
    looked_up = threading.Event()
    load, plan = Archiver.load, Archiver.plan

    def held_back(self, batch, stats, source):
        if batch.number == 1:
            assert looked_up.wait(10)
        return load(self, batch, stats, source)

    def planning(self, posts, stats, source, **kwargs):
        planned = plan(self, posts, stats, source, **kwargs)
        if self._batches == 1:  # batch 2's lookup (batch 1 was started before it)
            looked_up.set()
        return planned

    monkeypatch.setattr(Archiver, "load", held_back)
    monkeypatch.setattr(Archiver, "plan", planning)
    stats = RunStats()
    Archiver(settings, db, None, enricher=enricher).archive(iter(stream), stats, source="mock")
    assert looked_up.is_set()
    assert query(db.dsn, "SELECT like_count FROM social_posts WHERE post_id = 'a'") == [(1,)]
    observed = query(db.dsn, "SELECT like_count FROM post_engagement WHERE post_id = 'a' ORDER BY observed_at")
    assert observed == [(1,), (5,), (1,)]
    assert (stats.inserted, stats.updated, stats.unchanged) == (3, 2, 0)


def test_a_post_looked_up_as_it_is_read_before_the_batch_before_it_is_started(db, make_settings, monkeypatch):
    """Each batch is looked up as it is read, on a thread of its own, while the batch read before it is still held
    back (scoring ahead hands batches on one behind): batch 3's lookup predates batch 2's plan, and surely its load.
    A post the two share is then stale in batch 3's lookup, so it goes to the database, which finds batch 2's write
    and takes batch 3's values back (the last wins)."""
    from etl.db import Archive

    enricher = SentimentEnricher()
    first = enricher.enrich(Post("mock", "a", WHEN, caption="Lovely", like_count=1, comment_count=0))
    filler = [enricher.enrich(Post("mock", f"f{n}", WHEN, caption="fine", like_count=0)) for n in range(8)]
    settings = make_settings(ETL_BATCH_SIZE="2", ETL_METADATA_BATCH_SIZE="4")
    Archiver(settings, db, None, enricher=enricher).archive(iter([first]), RunStats(), source="mock")
    # Batches of 2, 4, 4: the post is in batch 2 (changed) and in batch 3 (as stored).
    stream = [*filler[:2], dataclasses.replace(first, like_count=5), *filler[2:5], first, *filler[5:8]]
    third_looked_up, threads = threading.Event(), set()
    held, load = Archive.held, Archiver.load

    def looking_up(self, posts, version):
        found = held(self, posts, version)
        threads.add(threading.current_thread().name.rsplit("_", 1)[0])
        if any(p.post_id == "f5" for p in posts):  # batch 3's
            third_looked_up.set()
        return found

    def held_back(self, batch, stats, source):
        if batch.number == 2:
            assert third_looked_up.wait(10)
        return load(self, batch, stats, source)

    monkeypatch.setattr(Archive, "held", looking_up)
    monkeypatch.setattr(Archiver, "load", held_back)
    stats = RunStats()
    Archiver(settings, db, None, enricher=enricher).archive(iter(stream), stats, source="mock")
    assert threads == {"lookup"}
    assert query(db.dsn, "SELECT like_count FROM social_posts WHERE post_id = 'a'") == [(1,)]
    observed = query(db.dsn, "SELECT like_count FROM post_engagement WHERE post_id = 'a' ORDER BY observed_at")
    assert observed == [(1,), (5,), (1,)]
    assert (stats.inserted, stats.updated, stats.unchanged) == (8, 2, 0)


def test_a_rerun_of_a_file_writes_nothing(run_etl, db, tmp_path):
    lines = [record(post_id=f"p{n}", like_count=n, caption=f"What a lovely day {n} #sun\tand\\more") for n in range(30)]
    lines.append(record(post_id="quiet", like_count=None, comment_count=None))
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    args = ("run", "--source", "jsonl", "--input", str(path))
    assert run_etl(*args, env={"ETL_BATCH_SIZE": "8"}).returncode == 0
    before = query(db.dsn, "SELECT post_id, updated_at, to_jsonb(p) FROM social_posts p ORDER BY post_id")
    snapshots = query(db.dsn, "SELECT count(*) FROM post_engagement")
    rerun = run_etl(*args, env={"ETL_BATCH_SIZE": "8"})
    assert rerun.returncode == 0, rerun.stderr
    assert "inserted 0, updated 0, unchanged 31" in rerun.stdout
    assert query(db.dsn, "SELECT post_id, updated_at, to_jsonb(p) FROM social_posts p ORDER BY post_id") == before
    assert query(db.dsn, "SELECT count(*) FROM post_engagement") == snapshots == [(30,)]
    assert query(db.dsn, "SELECT posts_inserted, posts_updated FROM etl_runs ORDER BY id DESC LIMIT 1") == [(0, 0)]


def test_the_lookup_commits_nothing_and_gives_the_connection_back_as_it_was(db):
    with db.transaction() as cur:
        archive.upsert_posts(cur, [BASE], sentiment_version=V)
    conn = db.connection()
    found = archive.Archive(db).held([BASE, post(post_id="new")], V)
    assert set(found.rows) == {("mock", "p1")}
    assert conn.autocommit is False  # the next write is a transaction again
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    # Inside a transaction already (a caller's own), the lookup is one more statement of it.
    with conn.cursor() as cur:
        cur.execute("UPDATE social_posts SET like_count = 40")
    found = archive.Archive(db).held([BASE], V)
    assert found.rows[("mock", "p1")][6] == 40
    assert conn.autocommit is False
    conn.rollback()
