"""PostgreSQL: the connection (embedded or DATABASE_URL), migrations, batched upserts, run ledger and state."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from etl.config import Settings, mask_url_password
from etl.errors import ConfigError, LoadError, LockedError, ServiceUnavailable
from etl.records import Media, Post, Sentiment, clean_json, clean_text
from etl.staging import copy_rows, stage_sql

log = logging.getLogger(__name__)
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_MIGRATION_RE = re.compile(r"^(\d+)_[\w-]+\.sql$")
_RUN_COUNTS = (
    "posts_fetched", "posts_inserted", "posts_updated", "posts_unchanged", "posts_rejected",
    "images_stored", "images_failed", "images_skipped", "quota_used",
)  # fmt: skip
FINISH_RUN_SQL = (
    "UPDATE etl_runs SET finished_at = now(), status = %s, "
    + ", ".join(f"{c} = %s" for c in _RUN_COUNTS)
    + ", sentiment = %s, per_source = %s, errors = %s, error_summary = %s WHERE id = %s"
)
_MIGRATION_LOCK = 72_616_001  # advisory lock key: one migrator at a time
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # waits between reconnects, cut short by ETL_DB_RECONNECT_SECONDS
T = TypeVar("T")


def _adapt_json(value: Any) -> psycopg2.extras.Json:
    return psycopg2.extras.Json(value, dumps=lambda v: json.dumps(v, ensure_ascii=False, default=str))


class DataRefused(LoadError):
    """The server refused what was written (a value it cannot store, a limit, a constraint): the data's fault,
    not the connection's. Loading it again will not help; the rows without it may be loaded."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"the database refused {what}: {reason}")
        self.reason = reason


# SQLSTATE classes of a lost or unusable connection: 08 connection exception, 57P01-57P03 the server
# shutting down or starting. An error without a SQLSTATE came from the client library (the socket closed).
_CONNECTION_STATES = ("57P01", "57P02", "57P03")
# What the data is to blame for: 22 data exception, 23 integrity constraint, 54 program limit exceeded
# (an index row too large), 2200x/22P0x bad JSON and the like.
_DATA_CLASSES = ("22", "23", "54")


def connection_lost(exc: psycopg2.Error) -> bool:
    code = getattr(exc, "pgcode", None)
    if not code:
        return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
    return code.startswith("08") or code in _CONNECTION_STATES


def refused_data(exc: psycopg2.Error) -> bool:
    code = getattr(exc, "pgcode", None) or ""
    return isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)) or code[:2] in _DATA_CLASSES


def server_reason(exc: psycopg2.Error) -> str:
    """The server's message and detail on one line (the client's first line when the server said nothing)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        detail = getattr(diag, "message_detail", None)
        return clean_text(f"{primary} ({detail})" if detail else primary)[:500]
    return clean_text((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:500]


@dataclass
class UpsertCounts:
    """What a batch upsert did."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    snapshots: int = 0  # engagement snapshots written (record_staged_engagement)


class Database:
    """One PostgreSQL database: a connection for the run's writes, and helpers that take a cursor."""

    def __init__(self, dsn: str, *, display: str, server: Any = None, reconnect_seconds: float = 15.0):
        self.dsn = dsn
        self.display = display  # where the data is, for people; never holds a password
        self._server = server  # keeps an embedded server alive as long as we are
        self._conn: psycopg2.extensions.connection | None = None
        self.reconnect_seconds = reconnect_seconds  # the longest wait for a lost server (ETL_DB_RECONNECT_SECONDS)
        self._gave_up = False  # the server stayed away past that: later calls try once only
        self._connect_timeout = 10

    # -- connecting ------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """Connect to DATABASE_URL, or start the embedded PostgreSQL under ETL_DATA_DIR/postgres."""
        if settings.embedded_db:
            db = cls.embedded(settings.data_dir / "postgres")
        else:
            url = settings.database_url.reveal()
            db = cls(url, display=mask_url_password(url))
            db.check()
        db.reconnect_seconds = settings.db_reconnect_seconds
        return db

    @classmethod
    def embedded(cls, pgdata: Path) -> Database:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under cron
                import pgserver  # noqa: F401 - installed? (etl.embedded uses it)

                from etl.embedded import start_server
        except ImportError:  # pragma: no cover - a broken install
            raise ConfigError("DATABASE_URL is not set and the embedded PostgreSQL (pgserver) is not installed") from None
        pgdata = Path(pgdata).resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = start_server(pgdata)  # stale handles dropped; folders above opened only as needed
        except Exception as exc:
            raise ConfigError(f"DATABASE_URL is not set and the embedded PostgreSQL at {pgdata} did not start: {exc}") from None
        db = cls(server.get_uri(), display=f"embedded PostgreSQL, data in {pgdata}", server=server)
        db.check()
        return db

    def check(self) -> None:
        """Fail early, naming DATABASE_URL (never its password), when the server cannot be reached."""
        try:
            self.connection()
        except psycopg2.OperationalError as exc:
            reason = clean_text(str(exc)).strip().splitlines()[0] if str(exc).strip() else "connection failed"
            password = psycopg2.extensions.parse_dsn(self.dsn).get("password") if "://" in self.dsn else None
            if password:
                reason = reason.replace(password, "***")
            # Refused credentials or a missing database are configuration; anything else (refused, timed out,
            # starting up, unknown host) may pass: an orchestrator retries those.
            settled = any(s in reason for s in ("authentication failed", "does not exist", "no pg_hba.conf entry"))
            error = ConfigError if settled else ServiceUnavailable
            raise error(f"DATABASE_URL: cannot connect to {self.display}: {reason}") from None

    def connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def connect(self) -> psycopg2.extensions.connection:
        """A new connection (for locks and for threads that need their own)."""
        conn = psycopg2.connect(self.dsn, connect_timeout=self._connect_timeout, application_name="social-archiver")
        conn.set_client_encoding("UTF8")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor whose work commits together at the end of the block, or not at all."""
        conn = self.connection()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException:
            if not conn.closed:
                try:
                    conn.rollback()
                except psycopg2.Error:  # the connection broke: the error that broke it is the one to raise
                    pass
            raise

    def run(self, fn: Callable[[psycopg2.extensions.cursor], T], *, what: str) -> T:
        """Run fn in one transaction; when the connection is lost (a server restart, a network cut), reconnect
        and run it again. fn must be idempotent (every write here is an upsert).

        The reconnect wait is bounded by ETL_DB_RECONNECT_SECONDS: past it, LoadError (the caller stops, and
        what fn would have written is done by the next run); after that, later calls try once without waiting.
        A row the server refuses (bad data, a value over a limit) is DataRefused at once: never a lost connection.
        """
        started = time.monotonic()
        delays = iter(RECONNECT_DELAYS)
        while True:
            try:
                with self.transaction() as cur:
                    result = fn(cur)
                self._gave_up = False
                self._connect_timeout = 10
                return result
            except psycopg2.Error as exc:
                if not connection_lost(exc):
                    if refused_data(exc):
                        raise DataRefused(what, server_reason(exc)) from exc
                    raise
                reason = server_reason(exc)
                self.close()
                remaining = started + self.reconnect_seconds - time.monotonic()
                if self._gave_up or remaining <= 0:
                    self._gave_up = True
                    raise LoadError(
                        f"lost the database connection during {what} and could not reconnect within "
                        f"{self.reconnect_seconds:g}s (ETL_DB_RECONNECT_SECONDS) ({self.display}): {reason}"
                    ) from None
                log.warning("database connection lost during %s (%s); reconnecting", what, reason)
                time.sleep(min(next(delays, RECONNECT_DELAYS[-1]), remaining))
                # A connection attempt must not outlast the budget either (libpq's minimum is 2 s).
                self._connect_timeout = max(2, min(10, math.ceil(started + self.reconnect_seconds - time.monotonic())))

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
        self._conn = None

    # -- migrations ------------------------------------------------------------------------------

    def migrate(self, sql_dir: Path = SQL_DIR) -> list[str]:
        """Apply sql/NNN_name.sql files not yet recorded in schema_migrations, in order; return their names."""
        files = sorted(
            (int(m.group(1)), path) for path in sql_dir.iterdir() if (m := _MIGRATION_RE.match(path.name))
        )
        applied: list[str] = []
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for version, path in files:
                if version in done:
                    continue
                log.info("applying migration %s", path.name)
                cur.execute(path.read_text(encoding="utf-8"))
                cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name))
                applied.append(path.name)
        return applied

    # -- locks -----------------------------------------------------------------------------------

    def lock_sources(self, names: Sequence[str]) -> psycopg2.extensions.connection:
        """Take a session advisory lock per name on a connection of its own; LockedError if one is held.

        The locks live as long as the returned connection (closing it, or the process dying, frees them).
        """
        conn, locked = self.lock_units(names)
        if locked:
            with conn.cursor() as cur:
                holder = self.running_run_for(cur, locked[0])
            conn.close()
            raise LockedError(f"source {locked[0]!r} is being archived by another run{holder}; nothing done")
        return conn

    def lock_units(self, names: Sequence[str]) -> tuple[psycopg2.extensions.connection, list[str]]:
        """Try a session advisory lock per unit (a stream, or a stream-less source); (connection, the names
        another run holds). The locks taken live as long as the connection."""
        conn = self.connect()
        conn.autocommit = True
        locked: list[str] = []
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT pg_try_advisory_lock(hashtext('social-archiver:source'), hashtext(%s))", (name,))
                if not cur.fetchone()[0]:
                    locked.append(name)
        return conn, locked

    @staticmethod
    def running_run_for(cur: psycopg2.extensions.cursor, name: str) -> str:
        cur.execute(
            "SELECT id, host, pid, started_at FROM etl_runs WHERE status = 'running' AND %s = ANY(COALESCE(units, sources))"
            " ORDER BY started_at DESC LIMIT 1",
            (name,),
        )
        row = cur.fetchone()
        if not row:
            return ""
        return f" (run {row[0]} on {row[1]}, pid {row[2]}, started {row[3]:%Y-%m-%d %H:%M:%S %Z})"

    # -- the run ledger --------------------------------------------------------------------------

    def start_run(
        self, mode: str, sources: Sequence[str], arguments: dict[str, Any], units: Sequence[str] | None = None
    ) -> int:
        """Record a run; `units` are the locks it holds (streams or stream-less sources), default its sources."""

        def insert(cur: psycopg2.extensions.cursor) -> int:
            cur.execute(
                "INSERT INTO etl_runs (mode, sources, units, arguments, host, pid) VALUES (%s, %s, %s, %s, %s, %s)"
                " RETURNING id",
                (mode, list(sources), list(sources if units is None else units), _adapt_json(clean_json(arguments)),
                 socket.gethostname(), os.getpid()),
            )  # fmt: skip
            return cur.fetchone()[0]

        return self.run(insert, what="recording the run")

    def finish_run(self, run_id: int, status: str, stats: dict[str, Any]) -> None:
        errors = [clean_text(e) for e in stats.get("errors", [])][:50]
        summary = f"{stats.get('error_count', len(errors))} error(s); first: {errors[0]}" if errors else None
        values = (
            status,
            *(int(stats.get(c, 0)) for c in _RUN_COUNTS),
            _adapt_json(stats.get("sentiment", {})),
            _adapt_json(clean_json(stats.get("per_source", {}))),
            _adapt_json(errors),
            summary,
            run_id,
        )
        self.run(lambda cur: cur.execute(FINISH_RUN_SQL, values), what="finishing the run record")

    def abandon_dead_runs(self, units: Sequence[str]) -> int:
        """Runs still marked running that hold one of these units died (a live run holds all of its units'
        locks, and we hold these now): mark them abandoned."""

        def update(cur: psycopg2.extensions.cursor) -> int:
            cur.execute(
                "UPDATE etl_runs SET status = 'abandoned', finished_at = now(),"
                " error_summary = COALESCE(error_summary, 'the process ended without finishing the run')"
                " WHERE status = 'running' AND COALESCE(units, sources) && %s::text[]",
                (list(units),),
            )
            return cur.rowcount

        return self.run(update, what="closing the records of dead runs")

    def orchestrator_totals(self, orchestrator_run_id: str) -> dict[str, Any]:
        """Totals over the runs an orchestrator's run recorded (arguments.orchestrator.run_id): its shards,
        retry parts and chunks, with how many ended in each status."""

        def read(cur: psycopg2.extensions.cursor) -> dict[str, Any]:
            cur.execute(
                "SELECT count(*), COALESCE(sum(posts_fetched), 0), COALESCE(sum(posts_inserted), 0),"
                " COALESCE(sum(posts_updated), 0), COALESCE(sum(images_stored), 0), COALESCE(sum(images_failed), 0),"
                " COALESCE(jsonb_object_agg(status, n) FILTER (WHERE status IS NOT NULL), '{}')"
                " FROM (SELECT *, count(*) OVER (PARTITION BY status) AS n FROM etl_runs"
                "       WHERE arguments -> 'orchestrator' ->> 'run_id' = %s) AS r",
                (orchestrator_run_id,),
            )
            row = cur.fetchone()
            names = ("runs", "posts_fetched", "posts_inserted", "posts_updated", "images_stored", "images_failed", "statuses")
            return dict(zip(names, [int(v) if isinstance(v, (int, float)) else v for v in row], strict=True))

        return self.run(read, what="reading the orchestrator run's totals")

    # -- backfill progress -----------------------------------------------------------------------

    def finished_chunks(
        self, source: str, config_key: str, since: datetime, until: datetime
    ) -> set[tuple[datetime, datetime]]:
        def read(cur: psycopg2.extensions.cursor) -> set[tuple[datetime, datetime]]:
            cur.execute(
                "SELECT chunk_start, chunk_end FROM etl_backfill_chunks"
                " WHERE source = %s AND config_key = %s AND chunk_start >= %s AND chunk_end <= %s",
                (source, config_key, since, until),
            )
            return {(row[0], row[1]) for row in cur.fetchall()}

        return self.run(read, what="reading backfill progress")

    def finish_chunk(
        self, source: str, config_key: str, start: datetime, end: datetime, posts: int, run_id: int | None
    ) -> None:
        self.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_backfill_chunks (source, config_key, chunk_start, chunk_end, posts, run_id)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source, config_key, chunk_start, chunk_end)"
                " DO UPDATE SET posts = EXCLUDED.posts, run_id = EXCLUDED.run_id, finished_at = now()",
                (source, config_key, start, end, posts, run_id),
            ),
            what="recording backfill progress",
        )

    # -- incremental state -----------------------------------------------------------------------

    def get_state(self, source: str, config_key: str) -> tuple[datetime | None, dict[str, Any]]:
        def read(cur: psycopg2.extensions.cursor) -> Any:
            cur.execute("SELECT watermark, cursor FROM etl_state WHERE source = %s AND config_key = %s", (source, config_key))
            return cur.fetchone()

        row = self.run(read, what="reading the watermark")
        return (row[0], dict(row[1] or {})) if row else (None, {})

    def save_state(self, source: str, config_key: str, watermark: datetime | None, cursor: dict[str, Any]) -> None:
        """Move the watermark forward (never back), replace the cursor, clear the resume point (window complete)."""
        self.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_state AS s (source, config_key, watermark, cursor) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (source, config_key) DO UPDATE SET"
                " watermark = GREATEST(s.watermark, EXCLUDED.watermark),"
                " cursor = CASE WHEN EXCLUDED.cursor = '{}'::jsonb THEN s.cursor ELSE EXCLUDED.cursor END,"
                " resume = NULL, updated_at = now()",
                (source, config_key, watermark, _adapt_json(clean_json(cursor))),
            ),
            what="saving the watermark",
        )

    def get_resume(self, source: str, config_key: str) -> dict[str, Any] | None:
        """The resume point a run cut short left (etl/resume.py), or None."""

        def read(cur: psycopg2.extensions.cursor) -> Any:
            cur.execute("SELECT resume FROM etl_state WHERE source = %s AND config_key = %s", (source, config_key))
            return cur.fetchone()

        row = self.run(read, what="reading the resume point")
        return row[0] if row else None

    def save_resume(self, source: str, config_key: str, resume: dict[str, Any]) -> None:
        """Record where a cut run stopped; the watermark and cursor stay as they were."""
        self.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_state AS s (source, config_key, resume) VALUES (%s, %s, %s)"
                " ON CONFLICT (source, config_key) DO UPDATE SET resume = EXCLUDED.resume, updated_at = now()",
                (source, config_key, _adapt_json(resume)),
            ),
            what="saving the resume point",
        )


# -- the loader: batched upserts, each taking the transaction's cursor ------------------------------

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

_POST_STAGE = "social_posts_stage"  # a temporary table, see etl/staging.py
_STAGE_POSTS_SQLS = stage_sql(_POST_STAGE, "social_posts", _POST_COLUMNS)
_STAGE_POSTS_PREPARE_SQL = _STAGE_POSTS_SQLS[0]  # create the table if need be, and empty it
_STAGE_POSTS_COPY_SQL = _STAGE_POSTS_SQLS[1]
UPSERT_POSTS_SQL = (
    f"INSERT INTO social_posts AS p ({', '.join(_POST_COLUMNS)}) SELECT {', '.join(_POST_COLUMNS)} FROM {_POST_STAGE}"
    " ON CONFLICT (platform, post_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _POST_MUTABLE)
    + ", raw = EXCLUDED.raw, image_s3_url = COALESCE(EXCLUDED.image_s3_url, p.image_s3_url), updated_at = now()"
    + f" WHERE ({', '.join('p.' + c for c in _POST_MUTABLE)}, p.image_s3_url)"
    + f" IS DISTINCT FROM ({', '.join('EXCLUDED.' + c for c in _POST_MUTABLE)},"
    + " COALESCE(EXCLUDED.image_s3_url, p.image_s3_url))"
    + " RETURNING (xmax = 0) AS inserted"
)
# Counted in the server: one row back per batch instead of one per post.
_UPSERT_POSTS_COUNTED_SQL = f"WITH up AS ({UPSERT_POSTS_SQL}) SELECT count(*) FILTER (WHERE inserted), count(*) FROM up"


def _post_row(post: Post, first_image_url: str | None, sentiment_version: str | None) -> tuple[Any, ...]:
    s = post.sentiment
    return (
        post.platform,
        clean_text(post.post_id),
        clean_text(post.author_username),
        clean_text(post.caption),
        s.label if s else None,
        s.polarity if s else None,
        s.subjectivity if s else None,
        sentiment_version if s or post.sentiment_skipped else None,
        first_image_url,
        post.like_count,
        post.comment_count,
        clean_text(post.permalink),
        [clean_text(t) for t in post.hashtags],
        json.dumps(clean_json(post.raw), ensure_ascii=False, default=str) if post.raw is not None else None,
        post.created_at,
        post.caption_truncated,
        post.language,
        post.language_source,
        post.sentiment_skipped,
    )


def upsert_posts(
    cur: psycopg2.extensions.cursor,
    posts: Sequence[Post],
    *,
    first_image_urls: dict[tuple[str, str], str] | None = None,
    sentiment_version: str | None = None,
) -> UpsertCounts:
    """Insert or update a batch in one statement; the last of duplicate (platform, post_id) wins."""
    # Keyed on the id as stored (cleaned), so two ids that clean to the same text are one row too.
    latest: dict[tuple[str, str], Post] = {}
    for post in posts:
        key = (post.platform, clean_text(post.post_id))
        latest.pop(key, None)
        latest[key] = post
    if not latest:
        return UpsertCounts()
    urls = first_image_urls or {}
    rows = [_post_row(p, urls.get(k) or urls.get((p.platform, p.post_id)), sentiment_version) for k, p in latest.items()]
    # COPY into the staging table, then one INSERT ... ON CONFLICT from it. A row the database refuses
    # raises psycopg2's error (in the COPY or the INSERT); Database.run turns it into DataRefused.
    cur.execute(_STAGE_POSTS_PREPARE_SQL)
    copy_rows(cur, _STAGE_POSTS_COPY_SQL, rows)
    cur.execute(_UPSERT_POSTS_COUNTED_SQL)
    inserted, written = cur.fetchone()
    return UpsertCounts(inserted=inserted, updated=written - inserted, unchanged=len(rows) - written)


UPSERT_MEDIA_SQL = (
    "INSERT INTO post_media AS m (platform, post_id, position, source_url, storage_key, storage_url, sha256,"
    " bytes, content_type, width, height, status, permanent, attempts, last_error, stored_at) VALUES %s"
    " ON CONFLICT (platform, post_id, position) DO UPDATE SET"
    " source_url = EXCLUDED.source_url, storage_key = EXCLUDED.storage_key, storage_url = EXCLUDED.storage_url,"
    " sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, content_type = EXCLUDED.content_type,"
    " width = EXCLUDED.width, height = EXCLUDED.height, status = EXCLUDED.status,"
    " permanent = EXCLUDED.permanent, attempts = m.attempts + 1, last_error = EXCLUDED.last_error,"
    " stored_at = EXCLUDED.stored_at, updated_at = now(),"
    " fixity = CASE WHEN EXCLUDED.status = 'stored' THEN NULL ELSE m.fixity END"  # a repaired image: not yet checked
    " WHERE m.status <> 'stored'"  # an archived image is never downgraded
)
_MEDIA_TEMPLATE = "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1, %s, CASE WHEN %s THEN now() END)"


def upsert_media(cur: psycopg2.extensions.cursor, media: Sequence[Media]) -> None:
    """Record what became of each image; skipped images (already stored) are not written."""
    rows = {}
    for m in media:
        if m.status in ("stored", "failed"):
            rows[(m.platform, clean_text(m.post_id), m.position)] = (
                m.platform, clean_text(m.post_id), m.position, clean_text(m.source_url), m.key, m.url, m.sha256,
                m.bytes, m.content_type, m.width, m.height, m.status, m.permanent,
                clean_text(m.error)[:2000] if m.error else None, m.status == "stored",
            )  # fmt: skip
    if rows:
        psycopg2.extras.execute_values(cur, UPSERT_MEDIA_SQL, list(rows.values()), template=_MEDIA_TEMPLATE, page_size=1000)


def known_media(
    cur: psycopg2.extensions.cursor, keys: Sequence[tuple[str, str]]
) -> tuple[dict[tuple[str, str, int], tuple[str, str]], dict[tuple[str, str, int], str]]:
    """For the images of these posts: those already stored -> (storage_key, storage_url), and those that
    failed permanently -> the source_url that failed. Both are keyed (platform, post_id, position)."""
    if not keys:
        return {}, {}
    cur.execute(
        "SELECT m.platform, m.post_id, m.position, m.status, m.storage_key, m.storage_url, m.source_url"
        " FROM post_media m JOIN (SELECT * FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)) k"
        " USING (platform, post_id) WHERE m.status = 'stored' OR m.permanent",
        ([k[0] for k in keys], [clean_text(k[1]) for k in keys]),
    )
    stored, hopeless = {}, {}
    for platform, post_id, position, status, key, url, source_url in cur.fetchall():
        if status == "stored":
            stored[(platform, post_id, position)] = (key, url)
        else:
            hopeless[(platform, post_id, position)] = source_url
    return stored, hopeless


def stored_sentiments(
    cur: psycopg2.extensions.cursor, keys: Sequence[tuple[str, str]], version: str
) -> dict[tuple[str, str], tuple[str, Sentiment | None, str | None, str | None, str | None]]:
    """For these posts, the caption, score and language of those already decided by enricher `version` (a
    score, or none for a language TextBlob cannot score), keyed (platform, post_id): a caption seen again
    unchanged need not be scored (nor its language detected) again."""
    if not keys:
        return {}
    cur.execute(
        "SELECT p.platform, p.post_id, p.caption, p.sentiment, p.sentiment_polarity, p.sentiment_subjectivity,"
        " p.language, p.language_source, p.sentiment_skipped"
        " FROM social_posts p JOIN (SELECT * FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)) k"
        " USING (platform, post_id) WHERE p.sentiment_version = %s AND p.caption IS NOT NULL",
        ([k[0] for k in keys], [clean_text(k[1]) for k in keys], version),
    )
    return {
        (platform, post_id): (
            caption, Sentiment(polarity, subjectivity, label) if label else None, language, source, skipped
        )
        for platform, post_id, caption, label, polarity, subjectivity, language, source, skipped in cur.fetchall()
    }


STAGED_ENGAGEMENT_SQL = (
    "INSERT INTO post_engagement (platform, post_id, like_count, comment_count)"
    f" SELECT v.platform, v.post_id, v.like_count, v.comment_count FROM {_POST_STAGE} v"
    " LEFT JOIN LATERAL (SELECT e.like_count, e.comment_count FROM post_engagement e"
    "  WHERE e.platform = v.platform AND e.post_id = v.post_id ORDER BY e.observed_at DESC LIMIT 1) prev ON true"
    " WHERE (v.like_count IS NOT NULL OR v.comment_count IS NOT NULL)"
    " AND (prev.like_count, prev.comment_count) IS DISTINCT FROM (v.like_count, v.comment_count)"
    " ON CONFLICT DO NOTHING"
)


def record_staged_engagement(cur: psycopg2.extensions.cursor) -> int:
    """Snapshot the counts of the batch upsert_posts just staged (same transaction, read from the staging table)
    where they differ from each post's latest snapshot, or it has none; unchanged counts write nothing. Returns
    how many snapshots were written."""
    cur.execute(STAGED_ENGAGEMENT_SQL)
    return cur.rowcount


def forgotten(cur: psycopg2.extensions.cursor, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (platform, post_id) have a tombstone (etl.py forget): never to be archived again."""
    if not keys:
        return set()
    cur.execute(
        "SELECT f.platform, f.post_id FROM forgotten_posts f"
        " JOIN (SELECT * FROM unnest(%s::text[], %s::text[]) AS k(platform, post_id)) k USING (platform, post_id)",
        ([k[0] for k in keys], [clean_text(k[1]) for k in keys]),
    )
    return {(row[0], row[1]) for row in cur.fetchall()}


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
