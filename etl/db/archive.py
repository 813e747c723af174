"""The archive's writes and lookups: batched upserts of posts and images (COPY into a staging table, then one
INSERT ... ON CONFLICT), what is stored already, tombstones, engagement snapshots, the failed-image queue."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple

import psycopg2.extensions
import psycopg2.extras

from etl.db.connection import Database
from etl.records import Media, Post, Sentiment, clean_json, clean_text, copy_text

# -- COPY into a per-connection temporary staging table: rows in PostgreSQL's text COPY format, one round trip --


def _array_item(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Sequence[str]) -> str:
    """The values as one text[] literal ('{"a","b"}') for a %s::text[] parameter. psycopg2 sends a list as
    ARRAY['a', 'b', ...], each element quoted by the client and parsed by the server as a constant of its own: 7.3 ms
    for a batch's 2,000 keys, against 1.9 ms for the same keys as one literal, which the server reads as one value."""
    joined = '","'.join(values)
    if '"' in joined or "\\" in joined:
        return "{" + ",".join([_array_item(v) for v in values]) + "}"
    return '{"' + joined + '"}' if values else "{}"


def copy_value(value: Any) -> str:
    """One value in COPY's text format. Lists become text[] literals, dicts JSON, None \\N."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return copy_text(value)
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return copy_text("{" + ",".join("NULL" if v is None else _array_item(str(v)) for v in value) + "}")
    if isinstance(value, dict):
        return copy_text(json.dumps(value, ensure_ascii=False, default=str))
    return copy_text(str(value))


def stage_sql(table: str, like: str, columns: Sequence[str]) -> tuple[str, str]:
    """The two statements that stage rows for a temporary table `table` typed as `like`'s `columns`, built once at
    import into module constants: (create it if need be and empty it, COPY into it).

    The table lives as long as the connection and is emptied at each commit (and by a rollback, which
    takes back the COPY), so it holds exactly this transaction's rows; it is created on first use and
    again after a reconnect."""
    cols = ", ".join(columns)
    prepare = (
        f"CREATE TEMP TABLE IF NOT EXISTS {table} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {like} WITH NO DATA;"
        f" DELETE FROM {table}"
    )
    return prepare, f"COPY {table} ({cols}) FROM STDIN"


def copy_rows(cur: psycopg2.extensions.cursor, copy: str, rows: Iterable[Sequence[Any]]) -> None:
    """Send `rows` by one COPY (`copy`, the second statement of stage_sql(), run after the first)."""
    buf = io.StringIO()
    buf.writelines("\t".join([copy_value(v) for v in row]) + "\n" for row in rows)
    buf.seek(0)
    cur.copy_expert(copy, buf)


@dataclass
class UpsertCounts:
    """What a batch upsert did."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    snapshots: int = 0  # engagement snapshots taken (rows of the view post_engagement: first counts and changes)
    forgotten: frozenset[tuple[str, str]] = frozenset()  # posts tombstoned since their lookup: not written


# Loads and tombstones are ordered by a lock of their own, taken for a transaction. Each transaction that writes a
# batch's posts or retried images holds it shared; a tombstone is recorded holding it exclusive (etl/db/deletions.py):
# it waits for the loads under way, which a forget then deletes with the rest, and every later load sees it and
# drops the post (_UPSERT_POSTS_COUNTED_SQL, LIVE_POSTS_SQL). Without it, a load whose post was looked up before
# a tombstone and written after the forget had deleted its rows brought the post back: a run whose lock connection
# was lost (the archive's lock gone, a forget came in before the watch noticed), or a run's own deletions at source
# beside another run loading the same post.
# A transaction holding it that stalls (its process stopped, its network cut) would hold up every load and tombstone
# of the archive: the server ends such a session once it has waited LOADS_IDLE_LIMIT for its client in the middle
# of the transaction (a load's client is busy for milliseconds between statements), and its work is undone; a load's
# Database.run then reconnects and writes the batch again.
LOADS_LOCK = "hashtext('social-archiver:loads'), 0"
LOADS_IDLE_LIMIT = "60s"
_IDLE_LIMITED = f"set_config('idle_in_transaction_session_timeout', '{LOADS_IDLE_LIMIT}', true)"
LOAD_LOCK_SQL = f"SELECT {_IDLE_LIMITED}, pg_advisory_xact_lock_shared({LOADS_LOCK})"
TOMBSTONE_LOCK_SQL = f"SELECT {_IDLE_LIMITED}, pg_advisory_xact_lock({LOADS_LOCK})"


# -- the loader: batched upserts, each taking the transaction's cursor ------------------------------

# A batch's (platform, post_id) keys as a table `k` to join on: its parameters are _key_arrays(keys).
_KEYS_JOIN = " JOIN (SELECT * FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)) k USING (platform, post_id)"


# Stored images, and failed ones not to fetch now: for good (permanent), out of attempts, or inside their backoff (as
# the retry queue, FAILED_IMAGES_SQL, would have them): a post read again must not retry them more often than that.
# Also those `verify` found damaged (failed, fixity set) and not waiting: a post read again fetches them as a repair,
# overwriting the damaged object (otherwise its bytes, read back as another run's, would be recorded as the image).
KNOWN_MEDIA_SQL = (
    "SELECT platform, post_id, position, status, storage_key, storage_url, source_url, fixity IS NOT NULL AND NOT waits"
    " FROM (SELECT m.platform, m.post_id, m.position, m.status, m.storage_key, m.storage_url, m.source_url, m.fixity,"
    " m.permanent OR m.attempts >= %s"
    " OR m.attempts > 0 AND m.updated_at > now() - %s * LEAST(power(2, m.attempts - 1), 48) * interval '1 minute' AS waits"
    " FROM post_media m" + _KEYS_JOIN + ") m WHERE status = 'stored' OR waits OR fixity IS NOT NULL"
)
NO_RETRY_LIMITS = (2_147_483_647, 0.0)  # (max attempts, backoff minutes): every failed image may be fetched again


def _key_arrays(keys: Collection[tuple[str, str]]) -> tuple[str, str]:
    """(platforms, post_ids) of keys as stored (ids cleaned), as text[] literals: _KEYS_JOIN's and HELD_SQL's."""
    return text_array([k[0] for k in keys]), text_array([k[1] for k in keys])


_POST_COLUMNS = (
    "platform", "post_id", "author_username", "caption", "sentiment", "sentiment_polarity",
    "sentiment_subjectivity", "sentiment_version", "image_s3_url", "like_count", "comment_count",
    "permalink", "hashtags", "raw", "created_at", "caption_truncated", "language", "language_source",
    "sentiment_skipped",
)  # fmt: skip
# What a rerun may change. raw is refreshed with them but alone does not count as a change
# (APIs put expiring URLs and request ids in it).
_POST_MUTABLE = (
    "author_username", "caption", "sentiment", "sentiment_polarity", "sentiment_subjectivity",
    "sentiment_version", "like_count", "comment_count", "permalink", "hashtags", "caption_truncated", "language",
    "language_source", "sentiment_skipped",
)  # fmt: skip

_POST_STAGE = "social_posts_stage"  # a temporary table, see stage_sql()
# Each statement a module constant of its own (tests/test_security.py checks every cursor call takes one).
_STAGE_POSTS_SQLS = stage_sql(_POST_STAGE, "social_posts", _POST_COLUMNS)
# The loads' lock (LOAD_LOCK_SQL), then create the table if need be, and empty it: one round trip.
_STAGE_POSTS_PREPARE_SQL = LOAD_LOCK_SQL + "; " + _STAGE_POSTS_SQLS[0]
_STAGE_POSTS_COPY_SQL = _STAGE_POSTS_SQLS[1]
# A post's first counts go on its row as it is inserted (sql/014): the start of its engagement history.
UPSERT_POSTS_SQL = (
    f"INSERT INTO social_posts AS p ({', '.join(_POST_COLUMNS)}, first_like_count, first_comment_count)"
    f" SELECT {', '.join(_POST_COLUMNS)}, like_count, comment_count FROM {_POST_STAGE} v"
    " WHERE NOT EXISTS (SELECT FROM gone g WHERE g.platform = v.platform AND g.post_id = v.post_id)"
    " ON CONFLICT (platform, post_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _POST_MUTABLE)
    + ", raw = EXCLUDED.raw, image_s3_url = COALESCE(EXCLUDED.image_s3_url, p.image_s3_url), updated_at = now()"
    + f" WHERE ({', '.join('p.' + c for c in _POST_MUTABLE)}, p.image_s3_url)"
    + f" IS DISTINCT FROM ({', '.join('EXCLUDED.' + c for c in _POST_MUTABLE)},"
    + " COALESCE(EXCLUDED.image_s3_url, p.image_s3_url))"
    + " RETURNING p.platform, p.post_id, (xmax = 0) AS inserted,"
    + " (xmax = 0 AND (p.like_count IS NOT NULL OR p.comment_count IS NOT NULL)) AS first_counts"
)
# The staged counts of posts stored before this statement, where they differ from the latest of the post's history
# (its latest change, else its first counts): a row of post_engagement_changes each. A post's first counts taken by
# this transaction stand for its moment (as the history's key (platform, post_id, observed_at) did before sql/014).
# A post another run inserted meanwhile (not seen here, not inserted by this statement) is snapshotted, as before.
STAGED_ENGAGEMENT_SQL = (
    "INSERT INTO post_engagement_changes (platform, post_id, like_count, comment_count)"
    f" SELECT v.platform, v.post_id, v.like_count, v.comment_count FROM {_POST_STAGE} v"
    " LEFT JOIN LATERAL (SELECT s.archived_at, s.first_like_count, s.first_comment_count FROM social_posts s"
    "  WHERE s.platform = v.platform AND s.post_id = v.post_id LIMIT 1) s ON true"  # the index, however large
    " LEFT JOIN LATERAL (SELECT e.like_count, e.comment_count FROM post_engagement_changes e"
    "  WHERE e.platform = v.platform AND e.post_id = v.post_id ORDER BY e.observed_at DESC LIMIT 1) c ON true"
    " WHERE (v.like_count IS NOT NULL OR v.comment_count IS NOT NULL)"
    " AND NOT EXISTS (SELECT FROM gone g WHERE g.platform = v.platform AND g.post_id = v.post_id)"
    " AND NOT EXISTS (SELECT FROM up WHERE up.inserted AND up.platform = v.platform AND up.post_id = v.post_id)"
    " AND CASE WHEN c.like_count IS NOT NULL OR c.comment_count IS NOT NULL"
    "  THEN (c.like_count, c.comment_count) IS DISTINCT FROM (v.like_count, v.comment_count)"
    "  WHEN s.archived_at = now() AND (s.first_like_count IS NOT NULL OR s.first_comment_count IS NOT NULL) THEN false"
    "  ELSE (s.first_like_count, s.first_comment_count) IS DISTINCT FROM (v.like_count, v.comment_count) END"
    " ON CONFLICT DO NOTHING RETURNING 1"
)
# The staged posts with a tombstone (`gone`: forgotten since their lookup), which neither part writes; then the
# upsert and the snapshots, in one statement counted in the server: one row back per batch, with the tombstoned
# keys. (Every part sees the tables as they were before the statement; a change's foreign key is checked at its end.)
_UPSERT_POSTS_COUNTED_SQL = (
    f"WITH gone AS (SELECT v.platform, v.post_id FROM {_POST_STAGE} v"
    "  JOIN forgotten_posts f ON f.platform = v.platform AND f.post_id = v.post_id),"
    f" up AS ({UPSERT_POSTS_SQL}), snap AS ({STAGED_ENGAGEMENT_SQL})"
    " SELECT (SELECT count(*) FILTER (WHERE inserted) FROM up), (SELECT count(*) FROM up),"
    " (SELECT count(*) FILTER (WHERE first_counts) FROM up) + (SELECT count(*) FROM snap),"
    " (SELECT array_agg(ARRAY[g.platform, g.post_id]) FROM gone g)"
)


def _opt_text(value: Any) -> str:
    return "\\N" if value is None else copy_text(clean_text(value))


# What a value may not hold to go into a line as it is: what COPY escapes, and what clean_text() changes.
_NEEDS_WORK = re.compile(r"[\\\t\n\r\x00\ud800-\udfff]").search


def _post_line(post: Post, first_image_url: str | None, sentiment_version: str | None) -> str:
    """The post's row of the staging table (_POST_COLUMNS) as a line of COPY text, built straight from its
    fields (their types are known: no per-value dispatch as copy_value() does).

    Most rows hold no character to escape or clean: their text values are checked together, by one search, and
    go in as they are; any other row (or one with raw JSON) is built value by value (_escaped_line)."""
    s = post.sentiment
    tags = post.hashtags
    author, caption, permalink = post.author_username, post.caption, post.permalink
    language, source, skipped = post.language, post.language_source, post.sentiment_skipped
    version = sentiment_version if s or skipped else None
    try:
        tagged = "".join(tags)
        together = (
            f"{post.platform}{post.post_id}{author or ''}{caption or ''}{permalink or ''}{language or ''}"
            f"{source or ''}{skipped or ''}{version or ''}{first_image_url or ''}{tagged}"
        )
        if post.raw is not None or '"' in tagged or _NEEDS_WORK(together):
            return _escaped_line(post, first_image_url, sentiment_version)
        return "\t".join((
            post.platform,
            post.post_id,
            "\\N" if author is None else author,
            "\\N" if caption is None else caption,
            s.label if s else "\\N",
            repr(s.polarity) if s else "\\N",
            repr(s.subjectivity) if s else "\\N",
            "\\N" if version is None else version,
            "\\N" if first_image_url is None else first_image_url,
            "\\N" if post.like_count is None else str(post.like_count),
            "\\N" if post.comment_count is None else str(post.comment_count),
            "\\N" if permalink is None else permalink,
            '{"' + '","'.join(tags) + '"}' if tags else "{}",  # text_array()'s plain case (checked above), inline
            "\\N",
            post.created_at.isoformat(),
            "t" if post.caption_truncated else "f",
            "\\N" if language is None else language,
            "\\N" if source is None else source,
            "\\N" if skipped is None else skipped,
        )) + "\n"  # fmt: skip
    except TypeError:  # a value that is not text (a platform module's int post_id): each value on its own
        return _escaped_line(post, first_image_url, sentiment_version)


def _escaped_line(post: Post, first_image_url: str | None, sentiment_version: str | None) -> str:
    """_post_line() of a row with a value to escape or clean: each value on its own."""
    s = post.sentiment
    tags = post.hashtags
    raw = post.raw
    return "\t".join((
        copy_text(post.platform),
        copy_text(clean_text(post.post_id)),
        _opt_text(post.author_username),
        _opt_text(post.caption),
        s.label if s else "\\N",
        repr(s.polarity) if s else "\\N",
        repr(s.subjectivity) if s else "\\N",
        _opt_text(sentiment_version) if s or post.sentiment_skipped else "\\N",
        _opt_text(first_image_url),
        "\\N" if post.like_count is None else str(post.like_count),
        "\\N" if post.comment_count is None else str(post.comment_count),
        _opt_text(post.permalink),
        copy_text(text_array([clean_text(t) for t in tags])),
        "\\N" if raw is None else copy_text(json.dumps(clean_json(raw), ensure_ascii=False, default=str)),
        post.created_at.isoformat(),
        "t" if post.caption_truncated else "f",
        _opt_text(post.language),
        _opt_text(post.language_source),
        _opt_text(post.sentiment_skipped),
    )) + "\n"  # fmt: skip


def _unchanged(post: Post, first_image_url: str | None, sentiment_version: str | None, stored: HeldRow) -> bool:
    """Whether UPSERT_POSTS_SQL would leave the post's `stored` row (from held()) as it is and snapshot no counts:
    the values _post_line() stages, as PostgreSQL stores them (text cleaned, floats exact through repr), equal the
    row's, image_s3_url COALESCEd; and the counts are both None, or equal the post's latest snapshot."""
    # `stored` is in _POST_MUTABLE's order (tests/test_rerun_skip.py changes each column in turn).
    if post.like_count != stored[6] or post.comment_count != stored[7]:
        return False  # the change a rerun most often brings (numbers: no cleaning makes them equal)
    s = post.sentiment
    tags = post.hashtags
    staged = (
        post.author_username, post.caption, s.label if s else None, s.polarity if s else None,
        s.subjectivity if s else None, sentiment_version if s or post.sentiment_skipped else None,
        post.like_count, post.comment_count, post.permalink, tags if type(tags) is list else list(tags),
        post.caption_truncated, post.language, post.language_source, post.sentiment_skipped,
        stored[-2] if first_image_url is None else first_image_url,
        stored[-1] if post.like_count is None and post.comment_count is None else True,
    )  # fmt: skip
    if staged == stored:
        # Each value equals the stored (clean) one, so it also does once cleaned: clean_text() leaves clean text.
        return True
    staged = (
        clean_text(post.author_username), clean_text(post.caption), *staged[2:5], clean_text(staged[5]),
        *staged[6:8], clean_text(post.permalink), [clean_text(t) for t in tags], bool(post.caption_truncated),
        clean_text(post.language), clean_text(post.language_source), clean_text(post.sentiment_skipped),
        stored[-2] if first_image_url is None else clean_text(first_image_url), staged[-1],
    )  # fmt: skip
    return staged == stored


def upsert_posts(
    cur: psycopg2.extensions.cursor,
    posts: Sequence[Post],
    *,
    first_image_urls: dict[tuple[str, str], str] | None = None,
    sentiment_version: str | None = None,
    stored: Mapping[tuple[str, str], HeldRow] | None = None,
    with_images: Container[tuple[str, str]] = (),
) -> UpsertCounts:
    """Insert or update a batch in one statement, which also snapshots the counts that changed (post_engagement);
    the last of duplicate (platform, post_id) wins.

    `stored`: rows of these posts as held() found them. A post whose row the statement would leave as it is
    (_unchanged) is not sent at all, and counted unchanged, unless its key (as stored) is in `with_images`.
    A rerun with nothing new then costs no round trip."""
    return send_posts(cur, *post_lines(posts, first_urls=first_image_urls, version=sentiment_version, stored=stored,
                                       with_images=with_images))  # fmt: skip


def post_lines(
    posts: Sequence[Post], *, first_urls: dict[tuple[str, str], str] | None, version: str | None,
    stored: Mapping[tuple[str, str], HeldRow] | None, with_images: Container[tuple[str, str]],
) -> tuple[int, list[str]]:  # fmt: skip
    """upsert_posts' first half, without the database: (posts after duplicates, the COPY lines of those to send)."""
    # Keyed on the id as stored (cleaned), so two ids that clean to the same text are one row too.
    latest: dict[tuple[str, str], Post] = {}
    for post in posts:
        key = (post.platform, clean_text(post.post_id))
        latest.pop(key, None)
        latest[key] = post
    urls = first_urls or {}
    stored = stored or {}
    lines = []
    for k, p in latest.items():
        url = (urls.get(k) or urls.get((p.platform, p.post_id))) if urls else None
        held_row = stored.get(k)
        if held_row is None or k in with_images or not _unchanged(p, url, version, held_row):
            lines.append(_post_line(p, url, version))
    return len(latest), lines


def send_posts(cur: psycopg2.extensions.cursor, count: int, lines: list[str]) -> UpsertCounts:
    """upsert_posts' second half: `lines` of `count` posts (post_lines) written; no round trip when none."""
    if not lines:
        return UpsertCounts(unchanged=count)
    # COPY into the staging table, then one INSERT ... ON CONFLICT from it. A row the database refuses
    # raises psycopg2's error (in the COPY or the INSERT); Database.run turns it into DataRefused.
    cur.execute(_STAGE_POSTS_PREPARE_SQL)
    cur.copy_expert(_STAGE_POSTS_COPY_SQL, io.StringIO("".join(lines)))
    cur.execute(_UPSERT_POSTS_COUNTED_SQL)
    inserted, written, snapshots, gone = cur.fetchone()
    forgotten = frozenset((k[0], k[1]) for k in gone) if gone else frozenset()
    return UpsertCounts(inserted, written - inserted, count - written - len(forgotten), snapshots, forgotten)


# A failed retry keeps what the row knew of an object stored before (one `verify` found damaged and marked failed):
# the damaged object stays where it is, and its key and checksum stay known (to verify and forget). A row stored
# again is neither fixity-checked nor fingerprinted yet: its hash was of the bytes replaced, damaged perhaps.
_KEPT_UNLESS_STORED = ("storage_key", "storage_url", "sha256", "bytes", "content_type", "width", "height")
_CLEARED_WHEN_STORED = ("fixity", "phash", "phash_algorithm", "phash_version")
UPSERT_MEDIA_SQL = (
    "INSERT INTO post_media AS m (platform, post_id, position, source_url, storage_key, storage_url, sha256,"
    " bytes, content_type, width, height, status, permanent, attempts, last_error, stored_at) VALUES %s"
    " ON CONFLICT (platform, post_id, position) DO UPDATE SET source_url = EXCLUDED.source_url, "
    + "".join(f"{c} = CASE WHEN EXCLUDED.status = 'stored' THEN EXCLUDED.{c} ELSE m.{c} END, " for c in _KEPT_UNLESS_STORED)
    + "".join(f"{c} = CASE WHEN EXCLUDED.status = 'stored' THEN NULL ELSE m.{c} END, " for c in _CLEARED_WHEN_STORED)
    + "status = EXCLUDED.status, permanent = EXCLUDED.permanent, attempts = m.attempts + EXCLUDED.attempts,"
    " last_error = EXCLUDED.last_error, stored_at = EXCLUDED.stored_at,"
    # An image a stop kept from being requested (attempts 0: Media.tried) counts no attempt and starts no backoff.
    " updated_at = CASE WHEN EXCLUDED.attempts = 0 THEN m.updated_at ELSE now() END"
    " WHERE m.status <> 'stored'"  # an archived image is never downgraded
)
_MEDIA_TEMPLATE = "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() END)"
# Each image row's foreign key is checked by a query on social_posts (platform = $1 AND post_id = $2). On a table
# never analysed (a first load into a new database: autovacuum has not come by) every index looks alike to the
# planner, and it took the narrower social_posts_created_at_idx, probing on platform alone and filtering post_id: each
# check read every post of its platform, so a batch's checks grew with the table (197 ms for 500 image rows at 6,000
# posts; 2.4 ms once analysed). Such a table is analysed once, first; from then on autovacuum keeps the statistics.
_POSTS_NEVER_ANALYSED_SQL = "SELECT reltuples < 0 FROM pg_class WHERE oid = 'social_posts'::regclass"
_ANALYSE_POSTS_SQL = "ANALYZE social_posts"


def upsert_media(cur: psycopg2.extensions.cursor, media: Sequence[Media]) -> None:
    """Record what became of each image; skipped images (already stored) are not written."""
    rows = {}
    for m in media:
        if m.status in ("stored", "failed"):
            rows[(m.platform, clean_text(m.post_id), m.position)] = (
                m.platform, clean_text(m.post_id), m.position, clean_text(m.source_url), m.key, m.url, m.sha256,
                m.bytes, m.content_type, m.width, m.height, m.status, m.permanent, 1 if m.tried else 0,
                clean_text(m.error)[:2000] if m.error else None, m.status == "stored",
            )  # fmt: skip
    if rows:
        cur.execute(_POSTS_NEVER_ANALYSED_SQL)
        if cur.fetchone()[0]:
            cur.execute(_ANALYSE_POSTS_SQL)
        psycopg2.extras.execute_values(cur, UPSERT_MEDIA_SQL, list(rows.values()), template=_MEDIA_TEMPLATE, page_size=1000)


def known_media(
    cur: psycopg2.extensions.cursor, keys: Sequence[tuple[str, str]], retry: tuple[int, float] = NO_RETRY_LIMITS
) -> tuple[dict[tuple[str, str, int], tuple[str, str]], dict[tuple[str, str, int], str], dict[tuple[str, str, int], str]]:
    """For the images of these posts: those already stored -> (storage_key, storage_url); those that failed and
    are not to be fetched now (for good, or by `retry`: (ETL_IMAGE_MAX_ATTEMPTS, ETL_IMAGE_RETRY_BACKOFF_MINUTES))
    -> the source_url that failed; and those `verify` found damaged, due now: repairs -> the damaged object's key.
    All keyed (platform, post_id, position)."""
    if not keys:
        return {}, {}, {}
    cur.execute(KNOWN_MEDIA_SQL, (*retry, *_key_arrays([(platform, clean_text(post_id)) for platform, post_id in keys])))
    stored, hopeless, repairs = {}, {}, {}
    for platform, post_id, position, status, key, url, source_url, repair in cur.fetchall():
        if status == "stored":
            stored[(platform, post_id, position)] = (key, url)
        elif repair:
            repairs[(platform, post_id, position)] = key
        else:
            hopeless[(platform, post_id, position)] = source_url
    return stored, hopeless, repairs


def set_first_image_urls(cur: psycopg2.extensions.cursor, media: Sequence[Media]) -> None:
    """Point social_posts.image_s3_url at first images stored after the post was loaded (retries)."""
    rows = [(m.platform, m.post_id, m.url) for m in media if m.position == 0 and m.url]
    if rows:
        psycopg2.extras.execute_values(
            cur,
            "UPDATE social_posts p SET image_s3_url = v.url, updated_at = now() FROM (VALUES %s) AS v(platform, post_id, url)"
            " WHERE p.platform = v.platform AND p.post_id = v.post_id AND p.image_s3_url IS DISTINCT FROM v.url",
            rows,
        )


# -- the failed-image queue: images later runs retry until stored ------------------------------------

FAILED_IMAGES_SQL = (
    "SELECT m.id, m.platform, m.post_id, m.position, m.source_url, p.created_at, m.fixity IS NOT NULL, m.storage_key"
    " FROM post_media m JOIN social_posts p USING (platform, post_id)"
    " WHERE m.status = 'failed' AND NOT m.permanent AND m.attempts < %s AND m.id > %s"
    " AND NOT EXISTS (SELECT 1 FROM forgotten_posts f WHERE f.platform = m.platform AND f.post_id = m.post_id)"
    " AND (m.attempts = 0"  # never tried: a stop came first, or verify marked it for repair
    " OR m.updated_at <= now() - %s * LEAST(power(2, m.attempts - 1), 48) * interval '1 minute')"
    " AND m.id %% %s = %s ORDER BY m.id LIMIT %s"
)


def failed_images(
    cur: psycopg2.extensions.cursor, *, after: int, max_attempts: int, backoff_minutes: float, part: tuple[int, int],
    limit: int,
) -> list[tuple]:  # fmt: skip
    """Images to retry, after id `after`: (id, platform, post_id, position, source_url, created_at, replace,
    storage_key: the object a repair replaces, or None).

    Not permanent, under `max_attempts`, past their backoff: the base wait doubles with each attempt, up to 48
    times the base. Not those of a tombstoned post (a forget that stopped before deleting its rows): no run may
    archive it again. An object that failed a fixity check (etl.py verify) is refetched at once, and overwritten
    (`replace`). `part` (K, N): only ids that are K-1 modulo N, so that N workers never take the same image."""
    index, count = part
    cur.execute(FAILED_IMAGES_SQL, (max_attempts, after, backoff_minutes, count, index - 1, limit))
    return cur.fetchall()


# The posts of retried images that are still there, each held (FOR KEY SHARE) until the rows are written: a post
# forgotten meanwhile (deleted at source, by another run) is not, and its image rows would break the foreign key.
# A tombstoned post is gone too, though a forget that stopped early left its row: no run may store its image again.
LIVE_POSTS_SQL = (
    LOAD_LOCK_SQL + "; SELECT p.platform, p.post_id FROM social_posts p" + _KEYS_JOIN
    + " WHERE NOT EXISTS (SELECT 1 FROM forgotten_posts f WHERE f.platform = p.platform AND f.post_id = p.post_id)"
    " FOR KEY SHARE OF p"
)


def record_retries(cur: psycopg2.extensions.cursor, media: Sequence[Media]) -> list[Media]:
    """What became of retried images; a first image stored now becomes its post's image_s3_url. Returns the images
    of posts gone meanwhile (not recorded: their objects are the caller's to delete)."""
    cur.execute(LIVE_POSTS_SQL, _key_arrays({(m.platform, clean_text(m.post_id)) for m in media}))
    live = set(cur.fetchall())
    kept = [m for m in media if (m.platform, clean_text(m.post_id)) in live]
    upsert_media(cur, kept)
    set_first_image_urls(cur, [m for m in kept if m.status == "stored" and m.position == 0])
    return [m for m in media if (m.platform, clean_text(m.post_id)) not in live]


KEYS_IN_USE_SQL = "SELECT storage_key FROM post_media WHERE storage_key = ANY(%s)"


def keys_in_use(cur: psycopg2.extensions.cursor, keys: Sequence[str]) -> set[str]:
    """Which of these object keys a post_media row names (an object no row names is no image of the archive)."""
    cur.execute(KEYS_IN_USE_SQL, (list(keys),))
    return {row[0] for row in cur.fetchall()}


# A stored post's row as the upsert compares it (held() -> upsert_posts' `stored`): _POST_MUTABLE's values, then
# image_s3_url, then whether the post's latest engagement snapshot holds its counts (rows stored before snapshots
# existed have none, and then the upsert writes one).
HeldRow = tuple


class Held(NamedTuple):
    """What the archive holds already of a batch's posts."""

    stored: dict[tuple[str, str, int], tuple[str, str]]  # images stored: (storage_key, storage_url)
    hopeless: dict[tuple[str, str, int], str]  # images failed for good: the source_url that failed
    scores: dict[tuple[str, str], tuple]  # captions decided by this enricher: (caption, score, language, source, skipped)
    forgotten: set[tuple[str, str]]  # posts with a tombstone
    rows: dict[tuple[str, str], HeldRow] = {}  # stored posts (upsert_posts' `stored`); read-only
    busy: frozenset[tuple[str, str, int]] = frozenset()  # images an earlier batch of the run is fetching (Archiver)
    repairs: dict[tuple[str, str, int], str] = {}  # images verify found damaged (fetched with replace): their key


# Where each of _POST_MUTABLE's values sits in a row of HELD_SQL (after tomb, platform, post_id, current).
_AT = {c: 4 + n for n, c in enumerate(_POST_MUTABLE)}
# Each post of the batch that is stored (probed by the unique index, however large the table: the LIMIT keeps the
# planner from a scan): what the upsert compares, whether enricher %(version)s made its decision, and whether its
# latest engagement snapshot holds its counts; then the tombstones among them.
HELD_SQL = (
    "WITH k AS (SELECT * FROM unnest(%(platforms)s::text[], %(post_ids)s::text[]) AS k(platform, post_id))"
    f" SELECT false, k.platform, k.post_id, p.current, {', '.join('p.' + c for c in _POST_MUTABLE)},"
    " p.image_s3_url, p.snapshot_current FROM k"
    f" CROSS JOIN LATERAL (SELECT {', '.join(_POST_MUTABLE)}, image_s3_url,"
    "  p.sentiment_version = %(version)s AND p.caption IS NOT NULL AS current,"
    "  COALESCE((SELECT (e.like_count, e.comment_count) IS NOT DISTINCT FROM (p.like_count, p.comment_count)"
    "   FROM post_engagement_changes e WHERE e.platform = p.platform AND e.post_id = p.post_id"
    "   ORDER BY e.observed_at DESC LIMIT 1),"
    "   (p.first_like_count IS NOT NULL OR p.first_comment_count IS NOT NULL)"
    "   AND (p.first_like_count, p.first_comment_count) IS NOT DISTINCT FROM (p.like_count, p.comment_count))"
    "  AS snapshot_current"
    "  FROM social_posts p WHERE p.platform = k.platform AND p.post_id = k.post_id LIMIT 1) p"
    f" UNION ALL SELECT true, f.platform, f.post_id{', NULL' * (len(_POST_MUTABLE) + 3)}"
    " FROM k JOIN forgotten_posts f USING (platform, post_id)"
)


def held(
    cur: psycopg2.extensions.cursor, posts: Sequence[Post], version: str, retry: tuple[int, float] = NO_RETRY_LIMITS
) -> Held:
    """What the archive holds of these posts: one query when none of them is stored (a first load), a second for
    the images of those that are. Scores are those decided by enricher `version` (a score, or none for a
    language TextBlob cannot score): a caption seen again unchanged need not be scored (nor its language
    detected) again. Rows: what upsert_posts() needs to see that a post would leave its row as it is."""
    keys = {(p.platform, clean_text(p.post_id)) for p in posts}
    if not keys:
        return Held({}, {}, {}, set(), {})
    platforms, post_ids = _key_arrays(keys)
    cur.execute(HELD_SQL, {"platforms": platforms, "post_ids": post_ids, "version": version})
    scores: dict[tuple[str, str], tuple] = {}
    rows: dict[tuple[str, str], HeldRow] = {}
    tombstones = set()
    caption, label, language, source, skipped = (_AT[c] for c in ("caption", "sentiment", "language", "language_source", "sentiment_skipped"))
    polarity, subjectivity = _AT["sentiment_polarity"], _AT["sentiment_subjectivity"]
    for r in cur.fetchall():
        if r[0]:
            tombstones.add((r[1], r[2]))
            continue
        rows[(r[1], r[2])] = r[4:]
        if r[3]:
            sentiment = Sentiment(r[polarity], r[subjectivity], r[label]) if r[label] else None
            scores[(r[1], r[2])] = (r[caption], sentiment, r[language], r[source], r[skipped])
    # Image rows exist only for stored posts (a foreign key): the others need no look.
    with_images = [k for p in posts if p.image_urls and (k := (p.platform, clean_text(p.post_id))) in rows]
    stored, hopeless, repairs = known_media(cur, list(dict.fromkeys(with_images)), retry) if with_images else ({}, {}, {})
    return Held(stored, hopeless, scores, tombstones, rows, repairs=repairs)


class Archive:
    """The archive's tables as the archiver uses them: one transaction per call, reconnecting (Database.run)."""

    def __init__(self, db: Database, *, retry: tuple[int, float] = NO_RETRY_LIMITS):
        self.db = db
        self.retry = retry  # (ETL_IMAGE_MAX_ATTEMPTS, ETL_IMAGE_RETRY_BACKOFF_MINUTES): failed images not due are held

    def held(self, posts: Sequence[Post], version: str) -> Held:
        """Stored and hopeless images, stored scores by enricher `version`, and tombstones of these posts."""
        look = partial(held, posts=posts, version=version, retry=self.retry)
        return self.db.alone(look, what="looking up stored images and scores")

    def stored_images(self, posts: Sequence[Post]) -> dict[tuple[str, str, int], tuple[str, str]]:
        """The images of these posts stored now: (storage_key, storage_url) by (platform, post_id, position)."""
        keys = list(dict.fromkeys((p.platform, clean_text(p.post_id)) for p in posts))
        return self.db.alone(lambda cur: known_media(cur, keys)[0], what="looking up stored images")

    def load(
        self, posts: Sequence[Post], media: Sequence[Media], first_urls: dict[tuple[str, str], str], version: str,
        *, what: str, stored: Mapping[tuple[str, str], HeldRow] | None = None,
    ) -> UpsertCounts:  # fmt: skip
        """Posts with their image rows and engagement snapshots, in one transaction (DataRefused: a row refused).
        `stored`: the posts' rows as held() found them; those the upsert would leave as they are are not sent.
        A post tombstoned since its lookup is not written, nor are its image rows (counts.forgotten)."""

        with_images = {(m.platform, clean_text(m.post_id)) for m in media}
        count, lines = post_lines(posts, first_urls=first_urls, version=version, stored=stored, with_images=with_images)
        if not lines and not media:
            return UpsertCounts(unchanged=count)  # nothing to write: no connection taken, no round trip

        def load(cur: psycopg2.extensions.cursor) -> UpsertCounts:
            counts = send_posts(cur, count, lines)  # (every post with an image row is sent: with_images)
            gone = counts.forgotten
            upsert_media(cur, [m for m in media if (m.platform, clean_text(m.post_id)) not in gone] if gone else media)
            return counts

        return self.db.run(load, what=what)

    def failed_images(
        self, *, after: int, max_attempts: int, backoff_minutes: float, part: tuple[int, int], limit: int
    ) -> list[tuple]:
        return self.db.alone(  # one read: no transaction around it
            partial(failed_images, after=after, max_attempts=max_attempts, backoff_minutes=backoff_minutes,
                    part=part, limit=limit),
            what="finding failed images",
        )  # fmt: skip

    def record_retries(self, media: Sequence[Media]) -> list[Media]:
        return self.db.run(partial(record_retries, media=media), what="recording retried images")

    def keys_in_use(self, keys: Sequence[str]) -> set[str]:
        """Which of these object keys an image row names."""
        return self.db.alone(partial(keys_in_use, keys=keys), what="looking up object keys")
