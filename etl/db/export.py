"""What `export` reads and records: the datasets as data (columns, the SQL that reads them, their Arrow types),
each partition's fingerprint and rows, and export_partitions (sql/007), what was exported where."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg2.extensions
import psycopg2.extras

from etl.db import Database
from etl.db.scans import named_cursor

RECORD_SQL = (
    "INSERT INTO export_partitions (target, dataset, platform, dt, row_count, fingerprint, object_key, bytes) VALUES %s"
    " ON CONFLICT (target, dataset, platform, dt) DO UPDATE SET row_count = EXCLUDED.row_count,"
    " fingerprint = EXCLUDED.fingerprint, object_key = EXCLUDED.object_key, bytes = EXCLUDED.bytes, exported_at = now()"
)
_DAY = "(p.created_at AT TIME ZONE 'UTC')::date"


def _micros(column: str) -> str:
    """A timestamptz as int64 microseconds since the epoch (UTC): much cheaper to move than datetime objects."""
    return f"(extract(epoch FROM {column}) * 1000000)::bigint"


@dataclass(frozen=True)
class Column:
    """One Parquet column: its name, the SQL that reads it, its Arrow type (a name, see etl.export._arrow_type)."""

    name: str
    sql: str
    type: str
    doc: str


@dataclass(frozen=True)
class Dataset:
    """A table of the export: its columns, the FROM clause (aliases p = the post), its row order."""

    name: str
    columns: tuple[Column, ...]
    source: str
    order: str


POSTS = Dataset(
    name="posts",
    columns=(
        Column("post_id", "p.post_id", "string", "the platform's id of the post"),
        Column("author_username", "p.author_username", "string", ""),
        Column("caption", "p.caption", "string", ""),
        Column("hashtags", "p.hashtags", "list<string>", "in caption order, without '#'"),
        Column("like_count", "p.like_count", "int64", ""),
        Column("comment_count", "p.comment_count", "int64", ""),
        Column("permalink", "p.permalink", "string", ""),
        Column("sentiment", "p.sentiment", "string", "positive, neutral or negative"),
        Column("sentiment_polarity", "p.sentiment_polarity", "double", "-1 .. 1"),
        Column("sentiment_subjectivity", "p.sentiment_subjectivity", "double", "0 .. 1"),
        Column("sentiment_version", "p.sentiment_version", "string", "the enricher that scored it"),
        Column("sentiment_skipped", "p.sentiment_skipped", "string", "why there is no sentiment label (e.g. language fr)"),
        Column("language", "p.language", "string", "BCP 47 tag, lower-case; null unknown"),
        Column("language_source", "p.language_source", "string", "platform or detected"),
        Column("caption_truncated", "p.caption_truncated", "bool", "the caption was cut at 100,000 characters"),
        Column("deleted_at_source", _micros("p.deleted_at_source"), "timestamp", "when the platform said it was gone, UTC"),
        Column("image_s3_url", "p.image_s3_url", "string", "URL of the first stored image"),
        Column("created_at", _micros("p.created_at"), "timestamp", "UTC"),
        Column("archived_at", _micros("p.archived_at"), "timestamp", "first archived, UTC"),
        Column("updated_at", _micros("p.updated_at"), "timestamp", "last changed, UTC"),
    ),
    source="social_posts p",
    order="p.platform, p.created_at, p.post_id",
)

MEDIA = Dataset(
    name="media",
    columns=(
        Column("post_id", "m.post_id", "string", "joins posts on (platform, dt, post_id)"),
        Column("position", "m.position", "int32", "0 = the first image"),
        Column("source_url", "m.source_url", "string", ""),
        Column("status", "m.status", "string", "stored or failed"),
        Column("permanent", "m.permanent", "bool", "a failure retrying cannot heal"),
        Column("storage_key", "m.storage_key", "string", "object key in the image store"),
        Column("storage_url", "m.storage_url", "string", ""),
        Column("sha256", "m.sha256", "string", "hex SHA-256 of the stored bytes"),
        Column("bytes", "m.bytes", "int64", ""),
        Column("content_type", "m.content_type", "string", ""),
        Column("width", "m.width", "int32", ""),
        Column("height", "m.height", "int32", ""),
        Column("stored_at", _micros("m.stored_at"), "timestamp", "UTC"),
        Column("post_created_at", _micros("p.created_at"), "timestamp", "the post's created_at, UTC"),
        Column("perceptual_hash", "m.phash", "int64", "64-bit perceptual hash (signed int64), null until computed"),
        Column("perceptual_hash_algorithm", "m.phash_algorithm || ':' || m.phash_version", "string", "the hash's algorithm and version, e.g. dhash:1"),
    ),
    source="post_media m JOIN social_posts p USING (platform, post_id)",
    order="p.platform, p.created_at, m.post_id, m.position",
)

DATASETS = (POSTS, MEDIA)
# The partitions in scope, without tombstoned posts: a forget that stopped between its tombstone and the deletion
# of the rows (they go in another transaction) must not leave the post to every export until it is run again.
_SINCE = (
    f"(%(since)s::date IS NULL OR {_DAY} >= %(since)s::date)"
    " AND NOT EXISTS (SELECT 1 FROM forgotten_posts f WHERE f.platform = p.platform AND f.post_id = p.post_id)"
)
_SELECTED = f"(p.platform, {_DAY}) IN (SELECT * FROM unnest(%(platforms)s::text[], %(days)s::date[]))"


def _fingerprints_sql(d: Dataset) -> str:
    values = ", ".join(c.sql for c in d.columns)
    return (
        f"SELECT p.platform, {_DAY}, count(*), sum(hashtextextended(ROW({values})::text, 0))"
        f" FROM {d.source} WHERE {_SINCE} GROUP BY 1, 2"
    )


def _rows_sql(d: Dataset, *, selected: bool) -> str:
    where = f"{_SINCE} AND {_SELECTED}" if selected else _SINCE
    return f"SELECT p.platform, {_DAY}, {', '.join(c.sql for c in d.columns)} FROM {d.source} WHERE {where} ORDER BY {d.order}"


# Built once from the declarations above, never from data (values are parameters).
POSTS_FINGERPRINTS_SQL = _fingerprints_sql(POSTS)
MEDIA_FINGERPRINTS_SQL = _fingerprints_sql(MEDIA)
POSTS_ALL_SQL = _rows_sql(POSTS, selected=False)
MEDIA_ALL_SQL = _rows_sql(MEDIA, selected=False)
POSTS_SELECTED_SQL = _rows_sql(POSTS, selected=True)
MEDIA_SELECTED_SQL = _rows_sql(MEDIA, selected=True)


Key = tuple[str, date]  # (platform, dt)
PLATFORM_POSTS_SQL = "SELECT count(*) FROM social_posts WHERE lower(platform) = %s"
RECORDED_SQL = "SELECT platform, dt, fingerprint FROM export_partitions WHERE target = %s AND dataset = %s"
DELETE_RECORD_SQL = "DELETE FROM export_partitions WHERE target = %s AND dataset = %s AND platform = %s AND dt = %s"


# Whether an export --since must check every partition of the target: a post was forgotten since its last export
# that checked them all (status ok, its per_source.export.checked_from null), and partitions before `since` are on
# record (one may hold it; an export --since never looks at them). The forget cannot fall inside that export:
# it waits for exports to finish (etl/db/ledger.py forget_lock).
FORGOTTEN_BEFORE_SQL = (
    "SELECT EXISTS (SELECT 1 FROM export_partitions WHERE target = %(target)s AND dt < %(since)s)"
    " AND EXISTS (SELECT 1 FROM forgotten_posts WHERE forgotten_at > COALESCE((SELECT max(started_at) FROM etl_runs"
    " WHERE mode = 'export' AND status = 'ok' AND sources = ARRAY['export ' || %(target)s]"
    " AND per_source -> 'export' ? 'checked_from' AND per_source -> 'export' ->> 'checked_from' IS NULL), '-infinity'))"
)


def forgotten_before(reader: psycopg2.extensions.connection, target: str, since: date) -> bool:
    """Whether posts were forgotten since every partition of `target` was last checked, and some before day
    `since` are on record (FORGOTTEN_BEFORE_SQL)."""
    with reader.cursor() as cur:
        cur.execute(FORGOTTEN_BEFORE_SQL, {"target": target, "since": since})
        return bool(cur.fetchone()[0])


def platform_posts(reader: psycopg2.extensions.connection, platform: str) -> int:
    """How many posts a platform (compared lower-case) has in the archive."""
    with reader.cursor() as cur:
        cur.execute(PLATFORM_POSTS_SQL, (platform,))
        return cur.fetchone()[0]


def partition_fingerprints(
    reader: psycopg2.extensions.connection, dataset: Dataset, since: date | None
) -> list[tuple[str, date, int, int]]:
    """(platform, dt, rows, sum of 64-bit hashes of each row's exported values) of each partition of the dataset
    from day `since` on (all when None)."""
    with reader.cursor() as cur:
        if dataset is POSTS:
            cur.execute(POSTS_FINGERPRINTS_SQL, {"since": since})
        else:
            cur.execute(MEDIA_FINGERPRINTS_SQL, {"since": since})
        return cur.fetchall()


@contextmanager
def partition_rows(
    reader: psycopg2.extensions.connection, dataset: Dataset, since: date | None, todo: Sequence[Key] | None, batch: int
) -> Iterator[psycopg2.extensions.cursor]:
    """A server-side cursor on `reader` over (platform, dt, *columns) of the dataset's partitions in `todo` (every
    partition from day `since` on when None), partition after partition."""
    params = {"since": since, "platforms": [k[0] for k in todo or ()], "days": [k[1] for k in todo or ()]}
    with named_cursor(reader, f"export_{dataset.name}", batch) as cur:
        if dataset is POSTS and todo is None:
            cur.execute(POSTS_ALL_SQL, params)
        elif dataset is POSTS:
            cur.execute(POSTS_SELECTED_SQL, params)
        elif todo is None:
            cur.execute(MEDIA_ALL_SQL, params)
        else:
            cur.execute(MEDIA_SELECTED_SQL, params)
        yield cur


def exported_partitions(db: Database, target: str, dataset: str) -> dict[Key, str]:
    """(platform, dt) -> the fingerprint recorded when the partition was last exported to `target`."""

    def read(cur: psycopg2.extensions.cursor) -> dict[Key, str]:
        cur.execute(RECORDED_SQL, (target, dataset))
        return {(platform, dt): fp for platform, dt, fp in cur.fetchall()}

    return db.run(read, what="reading what was exported")


def record_partitions(db: Database, rows: Sequence[tuple[Any, ...]]) -> None:
    """Record written partitions: (target, dataset, platform, dt, row_count, fingerprint, object_key, bytes)."""
    db.run(
        lambda cur: psycopg2.extras.execute_values(cur, RECORD_SQL, rows, page_size=len(rows)),
        what="recording exported partitions",
    )


def forget_partition(db: Database, target: str, dataset: str, key: Key) -> None:
    """Drop the record of a partition whose object was deleted."""
    db.run(lambda cur: cur.execute(DELETE_RECORD_SQL, (target, dataset, *key)), what="recording a deleted partition")
