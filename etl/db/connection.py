"""The connection to PostgreSQL (embedded or DATABASE_URL): transactions, reconnects, SQLSTATE classes, migrations."""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from etl.config import Settings, mask_url_password, url_password
from etl.errors import ConfigError, LoadError, ServiceUnavailable
from etl.records import clean_text

log = logging.getLogger(__name__)
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_MIGRATION_RE = re.compile(r"^(\d+)_[\w-]+\.sql$")
_MIGRATION_LOCK = 72_616_001  # advisory lock key: one migrator at a time
_UNDEFINED_TABLE = "42P01"
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # waits between reconnects, cut short by ETL_DB_RECONNECT_SECONDS
T = TypeVar("T")


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    """The migrations (version, path) in `sql_dir`, files named NNN_name.sql, in version order."""
    return sorted((int(m.group(1)), path) for path in sql_dir.iterdir() if (m := _MIGRATION_RE.match(path.name)))


def adapt_json(value: Any) -> psycopg2.extras.Json:
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


def each_statement_alone(fn: Callable[[psycopg2.extensions.cursor], T]) -> Callable[[psycopg2.extensions.cursor], T]:
    """fn with each of its statements committed by itself (autocommit): a read, or a single statement, then costs
    one round trip, without BEGIN and COMMIT. Under READ COMMITTED a statement sees what it would see inside a
    transaction (each takes its own snapshot there too). The connection is given back as it was."""

    def run(cur: psycopg2.extensions.cursor) -> T:
        conn = cur.connection
        if conn.autocommit or conn.status != psycopg2.extensions.STATUS_READY:
            return fn(cur)
        conn.autocommit = True
        try:
            return fn(cur)
        finally:
            if not conn.closed:
                conn.autocommit = False

    return run


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
        def said(exc: psycopg2.Error, otherwise: str) -> str:
            reason = clean_text(str(exc)).strip().splitlines()[0] if str(exc).strip() else otherwise
            for password in url_password(self.dsn):
                reason = reason.replace(password, "***")
            return reason

        try:
            self.connection()
        except psycopg2.ProgrammingError as exc:  # libpq refused the string itself (a mistyped parameter, say)
            raise ConfigError(f"DATABASE_URL: PostgreSQL's client cannot read {self.display}: {said(exc, 'invalid')}") from None
        except psycopg2.OperationalError as exc:
            reason = said(exc, "connection failed")
            # Refused credentials or a missing database are configuration; anything else (refused, timed out,
            # starting up, unknown host) may pass: an orchestrator retries those.
            settled = any(s in reason for s in ("authentication failed", "does not exist", "no pg_hba.conf entry"))
            error = ConfigError if settled else ServiceUnavailable
            raise error(f"DATABASE_URL: cannot connect to {self.display}: {reason}") from None

    def connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def connect(self, **options: Any) -> psycopg2.extensions.connection:
        """A new connection (for locks and for threads that need their own); `options`: more libpq parameters."""
        conn = psycopg2.connect(
            self.dsn, connect_timeout=self._connect_timeout, application_name="social-archiver", **options
        )
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

        The reconnect wait is bounded by ETL_DB_RECONNECT_SECONDS, counted from the first loss (not from the start
        of the transaction: one the server ended after a long stall, LOADS_IDLE_LIMIT, is still run again): past it,
        LoadError (the caller stops, and what fn would have written is done by the next run); after that, later
        calls try once without waiting. A row the server refuses (bad data, a value over a limit) is DataRefused at
        once: never a lost connection.
        """
        started: float | None = None  # when the connection was first found lost
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
                if started is None:
                    started = time.monotonic()
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

    def alone(self, fn: Callable[[psycopg2.extensions.cursor], T], *, what: str) -> T:
        """run(), each statement of fn committed by itself: for a read or a single statement (one round trip
        where a transaction takes three)."""
        return self.run(each_statement_alone(fn), what=what)

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
        self._conn = None

    # -- migrations ------------------------------------------------------------------------------

    def migrate(self, sql_dir: Path = SQL_DIR, *, on_new: Callable[[], None] | None = None) -> list[str]:
        """Apply sql/NNN_name.sql files not yet recorded in schema_migrations, in order; return their names.
        `on_new` is called first when the database holds no archive yet (no schema_migrations).

        An archive already up to date (every run but the first after an upgrade) costs one read, without the
        lock; otherwise the migrations are applied under the advisory lock, schema_migrations read again there."""
        files = migration_files(sql_dir)
        done = self._applied()
        if done is not None and all(version in done for version, _ in files):
            return []
        if done is None and on_new is not None:
            on_new()
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

    def _applied(self) -> set[int] | None:
        """The migrations recorded as applied (committed), None in a database without an archive: one statement on
        its own, no lock. A migrator at work holds its rows uncommitted, so they are not seen here: the caller then
        waits for its lock."""

        def read(cur: psycopg2.extensions.cursor) -> set[int] | None:
            try:
                cur.execute("SELECT version FROM schema_migrations")
            except psycopg2.ProgrammingError as exc:
                if exc.pgcode == _UNDEFINED_TABLE:  # a new database: nothing applied yet
                    return None
                raise
            return {row[0] for row in cur.fetchall()}

        return self.alone(read, what="reading the applied migrations")
