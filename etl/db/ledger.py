"""The run ledger: one etl_runs row per run, advisory locks per unit (stream or source), backfill chunks done."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extensions

from etl.config import url_password
from etl.db.connection import RECONNECT_DELAYS, Database, adapt_json, connection_lost, server_reason
from etl.errors import LoadError, LockedError, LocksLost, Outcome
from etl.records import clean_json, clean_text

log = logging.getLogger(__name__)

# The archive's lock (two int4 keys): every run, backfill, copy-store and export holds it shared while it works
# (lock_units), `forget` exclusive (forget_lock); so a forget never falls between a run's lookup and its load.
ARCHIVE_LOCK = "hashtext('social-archiver:archive'), 0"
# Every unit's lock tried in one round trip, in the order given; the names whose lock another session holds. With
# them, the archive's lock shared (waiting while a `forget` holds it).
LOCK_UNITS_SQL = (
    "SELECT pg_advisory_lock_shared(" + ARCHIVE_LOCK + ");"
    " SELECT name FROM unnest(%s::text[]) WITH ORDINALITY AS u(name, n)"
    " WHERE NOT pg_try_advisory_lock(hashtext('social-archiver:source'), hashtext(name)) ORDER BY n"
)
FORGET_LOCK_SQL = "SELECT pg_try_advisory_lock(" + ARCHIVE_LOCK + ")"
# A lock connection lies idle for the whole run: TCP keepalives and a send timeout make a network cut an error on
# the next check (LockWatch) within seconds, where the kernel's retransmissions would take some 15 minutes. libpq
# ignores them on a Unix socket (the embedded PostgreSQL), where a cut cannot happen.
LOCK_CONNECTION = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                   "tcp_user_timeout": 15_000}  # fmt: skip
LOCK_CHECK_SECONDS = 3.0  # how often a run's lock connection is asked whether it is still there (LockWatch)
# A run's locks again, on a new connection, after the one holding them was lost; none waited for: whether the
# archive's lock is free for us (a forget holds it otherwise), the names another session took meanwhile, and whether
# a post was forgotten since a moment the locks were held (a forget that came and went while we held nothing: a post
# this run looked up before its tombstone would be loaded back). That moment: when the lost connection last answered,
# else when this process's run was recorded (it held its locks then), else any time (stopping is the safe side).
# A forget holds the archive exclusive from before its tombstone to its end, so no tombstone of one that ran before
# the run took its locks is that recent.
RETAKE_SQL = (
    "SELECT pg_try_advisory_lock_shared(" + ARCHIVE_LOCK + "),"
    " ARRAY(SELECT name FROM unnest(%s::text[]) WITH ORDINALITY AS u(name, n)"
    "       WHERE NOT pg_try_advisory_lock(hashtext('social-archiver:source'), hashtext(name)) ORDER BY n),"
    " EXISTS (SELECT 1 FROM forgotten_posts WHERE forgotten_at >= COALESCE(%s::timestamptz,"
    "   (SELECT max(started_at) FROM etl_runs WHERE status = 'running' AND host = %s AND pid = %s), '-infinity')),"
    " pg_backend_pid(),"
    # Whether another run held a unit in the gap and let it go again (the locks free now prove nothing): this run's
    # row no longer running (a run that took a unit marked it abandoned), or another run of one of its units
    # recorded since the lost connection last answered.
    " EXISTS (SELECT 1 FROM etl_runs r WHERE r.id = %s AND r.status <> 'running'"
    "   OR r.id IS DISTINCT FROM %s AND COALESCE(r.units, r.sources) && %s::text[] AND r.started_at >= %s::timestamptz)"
)
# The lost session itself, when the server has not noticed (a network cut: its keepalives give up after hours) and
# it still holds the run's locks: ended, so that they can be taken again. Known by its pid, and by having started
# before this run was recorded (it took the run's locks first): never another session that got its pid since.
_LOST_SESSION = (
    " FROM pg_stat_activity WHERE pid = %s AND application_name = 'social-archiver'"
    " AND backend_start <= (SELECT started_at FROM etl_runs WHERE id = %s)"
)
END_LOST_SESSION_SQL = "SELECT pg_terminate_backend(pid)" + _LOST_SESSION
LOST_SESSION_LIVES_SQL = "SELECT EXISTS (SELECT 1" + _LOST_SESSION + ")"
CHECK_SQL = "SELECT statement_timestamp()"

RUNNING_RUNS_SQL = (
    "SELECT string_agg(format('run %s (%s, on %s, pid %s, started %s)', id, mode, host, pid,"
    " to_char(started_at, 'YYYY-MM-DD HH24:MI:SS')), '; ' ORDER BY id) FROM etl_runs WHERE status = 'running'"
)
_RUN_COUNTS = (
    "posts_fetched", "posts_inserted", "posts_updated", "posts_unchanged", "posts_rejected",
    "images_stored", "images_failed", "images_skipped", "quota_used",
)  # fmt: skip
FINISH_RUN_SQL = (
    "UPDATE etl_runs SET finished_at = now(), status = %s, "
    + ", ".join(f"{c} = %s" for c in _RUN_COUNTS)
    + ", sentiment = %s, per_source = %s, errors = %s, error_summary = %s WHERE id = %s"
)

START_RUN_SQL = (
    "INSERT INTO etl_runs (mode, sources, units, arguments, host, pid) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"
)
ABANDON_SQL = (
    "UPDATE etl_runs SET status = 'abandoned', finished_at = now(),"
    " error_summary = COALESCE(error_summary, 'the process ended without finishing the run')"
    " WHERE status = 'running' AND COALESCE(units, sources) && %s::text[]"
)
# The dead runs' rows and the new run's in one statement, so one snapshot: the UPDATE cannot see (nor abandon)
# the row the INSERT adds.
START_RUN_ABANDONING_SQL = f"WITH dead AS ({ABANDON_SQL}) {START_RUN_SQL}"


def release_locks(conn: psycopg2.extensions.connection) -> None:
    """Free the advisory locks held on a lock connection (lock_units, lock_sources), then close it. Closing alone
    frees them only once the server has ended that session, a moment after the client left: a run started at once
    (the next task of a worker, a test) could still find them held."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
    except psycopg2.Error:
        pass  # the connection is gone, and its locks with it
    finally:
        conn.close()


class Ledger:
    """What runs did and which units they hold: etl_runs, the advisory locks, etl_backfill_chunks."""

    def __init__(self, db: Database):
        self.db = db

    # -- locks -----------------------------------------------------------------------------------

    def lock_sources(
        self, names: Sequence[str], *, busy: str = "source {name!r} is being archived"
    ) -> psycopg2.extensions.connection:
        """Take a session advisory lock per name on a connection of its own; LockedError if one is held, its
        message `busy` (the held name filled in) followed by the run that holds it.

        The locks live as long as the returned connection: release_locks() frees them (the process dying does too).
        """
        conn, locked = self.lock_units(names)
        if locked:
            with conn.cursor() as cur:
                holder = self.running_run_for(cur, locked[0])
            release_locks(conn)
            raise LockedError(f"{busy.format(name=locked[0])} by another run{holder}; nothing done")
        return conn

    def lock_units(self, names: Sequence[str]) -> tuple[psycopg2.extensions.connection, list[str]]:
        """Try a session advisory lock per unit (a stream, or a stream-less source); (connection, the names
        another run holds). The locks taken live as long as the connection."""
        conn = self.db.connect(**LOCK_CONNECTION)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(LOCK_UNITS_SQL, (list(names),))  # (see forget_lock for the archive's lock)
            locked = [row[0] for row in cur.fetchall()]
        return conn, locked

    def forget_lock(self, wait: float, waiting: Callable[[str], None]) -> psycopg2.extensions.connection:
        """The archive's lock, exclusive, on a connection of its own (release_locks frees it): taken once no run,
        backfill, copy-store or export holds it shared, tried every second for `wait` seconds (`waiting` told once,
        with the runs in progress); LockedError after that. A run that looked a post up before its tombstone would
        otherwise load it again, and store its images, after the forget."""
        conn = self.db.connect()
        conn.autocommit = True
        deadline, told = time.monotonic() + wait, False
        try:
            with conn.cursor() as cur:
                while True:
                    cur.execute(FORGET_LOCK_SQL)
                    if cur.fetchone()[0]:
                        return conn
                    if time.monotonic() >= deadline or not told:
                        cur.execute(RUNNING_RUNS_SQL)
                        runs = cur.fetchone()[0] or "a run that has not recorded itself yet"
                        if time.monotonic() >= deadline:
                            raise LockedError(f"the archive is in use by {runs}; waited {wait:.0f} s; nothing done")
                        waiting(runs)
                        told = True
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except BaseException:
            release_locks(conn)
            raise

    @staticmethod
    def running_run_for(cur: psycopg2.extensions.cursor, name: str, *, others: bool = False) -> str:
        """`holder()` on a cursor; `others`: not a run of this process."""
        cur.execute(
            "SELECT id, host, pid, started_at FROM etl_runs WHERE status = 'running' AND %s = ANY(COALESCE(units, sources))"
            " AND NOT (%s AND host = %s AND pid = %s) ORDER BY started_at DESC LIMIT 1",
            (name, others, socket.gethostname(), os.getpid()),
        )
        row = cur.fetchone()
        if not row:
            return ""
        return f" (run {row[0]} on {row[1]}, pid {row[2]}, started {row[3]:%Y-%m-%d %H:%M:%S %Z})"

    def holder(self, name: str) -> str:
        """` (run 12 on host, pid 345, started ...)` for the running run that holds `name`, or ""."""
        return self.db.run(lambda cur: self.running_run_for(cur, name), what="finding the lock holder")

    # -- the run ledger --------------------------------------------------------------------------

    def start_run(
        self, mode: str, sources: Sequence[str], arguments: dict[str, Any], units: Sequence[str] | None = None,
        *, abandon: Sequence[str] = (),
    ) -> int:  # fmt: skip
        """Record a run; `units` are the locks it holds (streams or stream-less sources), default its sources.
        `abandon`: units whose locks the caller holds; runs still marked running on one of them died and are
        marked abandoned by the same statement (abandon_dead_runs), in one round trip."""
        values = (list(sources), list(sources if units is None else units), adapt_json(clean_json(arguments)),
                  socket.gethostname(), os.getpid())  # fmt: skip

        def insert(cur: psycopg2.extensions.cursor) -> int:
            if abandon:
                cur.execute(START_RUN_ABANDONING_SQL, (list(abandon), mode, *values))
            else:
                cur.execute(START_RUN_SQL, (mode, *values))
            return cur.fetchone()[0]

        return self.db.alone(insert, what="recording the run")

    def finish_run(self, run_id: int, status: str, stats: dict[str, Any]) -> None:
        errors = [clean_text(e) for e in stats.get("errors", [])][:50]
        summary = f"{stats.get('error_count', len(errors))} error(s); first: {errors[0]}" if errors else None
        values = (
            status,
            *(int(stats.get(c, 0)) for c in _RUN_COUNTS),
            adapt_json(stats.get("sentiment", {})),
            adapt_json(clean_json(stats.get("per_source", {}))),
            adapt_json(errors),
            summary,
            run_id,
        )
        self.db.alone(lambda cur: cur.execute(FINISH_RUN_SQL, values), what="finishing the run record")

    @contextmanager
    def recording(
        self,
        mode: str,
        sources: Sequence[str],
        arguments: dict[str, Any],
        outcome: Outcome,
        *,
        units: Sequence[str] | None = None,
        redact: Callable[[str], str] = str,
        abandon: Sequence[str] = (),
    ) -> Iterator[int]:
        """The run's etl_runs row around the block (which gets its id): started before it (`abandon`: see
        start_run), finished after it with `outcome`'s status and counts, status `failed` when the block raised.
        When recording the end fails too (the database is gone), the error that stopped the run is the one that
        goes on."""
        run_id = self.start_run(mode, sources, arguments, units, abandon=abandon)
        status = "failed"
        try:
            yield run_id
            status = outcome.status
        finally:
            try:
                self.finish_run(run_id, status, outcome.ledger(redact))
            except LoadError as exc:
                if status != "failed":
                    raise
                log.error("could not record the end of run %s either: %s", run_id, exc)

    @contextmanager
    def locked_recording(
        self, mode: str, unit: str, sources: Sequence[str], arguments: dict[str, Any], outcome: Outcome, *,
        busy: str, stop: threading.Event, redact: Callable[[str], str] = str,
    ) -> Iterator[int]:  # fmt: skip
        """recording() of a command that is not a run (reenrich, verify, export, copy-store) under a lock of its own
        `unit`, held for the block: `status` tells it live by that lock, a run never takes it for one of its own
        (and so never marks it abandoned), a second one at once is refused (LockedError, `busy`), and the record
        of one that died holding it is closed as abandoned.

        Its locks (`unit`, and the archive's shared: a forget waits) are watched as a run's are (LockWatch): a lost
        lock connection is replaced when nothing could have come in meanwhile; otherwise `stop` is set, as SIGTERM
        sets it (the command stops at its next item), and it is recorded interrupted with the reason."""
        lock = self.lock_sources([unit], busy=busy)
        run_id: int | None = None
        watch = LockWatch(self, lock, [unit], on_lost=lambda why: stop.set(), run_id=lambda: run_id,
                          then=f"the next {mode} carries on from there")  # fmt: skip
        try:
            with self.recording(mode, sources, arguments, outcome, units=[unit], redact=redact, abandon=[unit]) as run_id:
                yield run_id
                with suppress(LocksLost):
                    watch.confirm()  # held to the end (a command shorter than the watch's interval is checked here)
                if watch.lost:
                    outcome.locks_lost(watch.lost)
        finally:
            watch.release()

    def abandon_dead_runs(self, units: Sequence[str]) -> int:
        """Runs still marked running that hold one of these units died (a live run holds all of its units'
        locks, and we hold these now): mark them abandoned. (start_run(abandon=) does it with the run's row.)"""

        def update(cur: psycopg2.extensions.cursor) -> int:
            cur.execute(ABANDON_SQL, (list(units),))
            return cur.rowcount

        return self.db.alone(update, what="closing the records of dead runs")

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

        return self.db.run(read, what="reading the orchestrator run's totals")

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

        return self.db.run(read, what="reading backfill progress")

    def finish_chunk(
        self, source: str, config_key: str, start: datetime, end: datetime, posts: int, run_id: int | None
    ) -> None:
        self.db.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_backfill_chunks (source, config_key, chunk_start, chunk_end, posts, run_id)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source, config_key, chunk_start, chunk_end)"
                " DO UPDATE SET posts = EXCLUDED.posts, run_id = EXCLUDED.run_id, finished_at = now()",
                (source, config_key, start, end, posts, run_id),
            ),
            what="recording backfill progress",
        )


class LockWatch:
    """A run's advisory locks (lock_units: its units, and the archive's lock shared), watched while it works.

    The server frees every lock of a session that ends: PostgreSQL restarted, the backend terminated, the network
    cut. A thread asks the lock connection every LOCK_CHECK_SECONDS whether it is still there (a check at each batch
    would wait behind a batch's downloads, a slow page or a quiet source, and a run of failed-image retries has other
    batches; the thread hears of a loss within seconds whatever the run is doing). Lost, the locks are taken again on
    a new connection when every one is still free and no post was forgotten meanwhile, and the run goes on (a
    warning names the lost connection); otherwise `lost` says why, `on_lost` is called (the run's stop, as a SIGTERM
    sets it) and fence() refuses every write after. While the locks are being taken again, fence() waits.
    """

    def __init__(
        self, ledger: Ledger, conn: psycopg2.extensions.connection, names: Sequence[str], *,
        on_lost: Callable[[str], None], run_id: Callable[[], int | None] = lambda: None,
        then: str = "nothing more loaded; the next run archives the rest",
    ) -> None:  # fmt: skip
        self.ledger, self.conn, self.names, self.on_lost, self.run_id = ledger, conn, list(names), on_lost, run_id
        self.then = then  # what the stop means, said after "stopped, "
        self.every = LOCK_CHECK_SECONDS
        self.lost: str | None = None  # why the run may not go on (its locks are gone); None while it holds them
        self._held = threading.Event()  # clear while the locks are being taken again
        self._held.set()
        self._done = threading.Event()  # the run is releasing its locks: the watch ends
        self._swap = threading.Lock()  # a new connection replaces the lost one, or release() closes it: not both
        self._since: datetime | None = None  # when the connection last answered (the server's clock)
        self._pid = conn.get_backend_pid()  # (libpq knows it: no round trip)
        self._thread = threading.Thread(target=self._watch, name="lock-watch", daemon=True)
        self._thread.start()

    def fence(self) -> None:
        """Before each write of the run (a batch's load, a watermark, a finished chunk): LocksLost once the locks are
        gone; while they are being taken again, waits for the outcome (bounded by the reconnect wait)."""
        if not self._held.is_set():
            wait = self.ledger.db.reconnect_seconds + 30  # (and a connection's own timeouts)
            if not self._held.wait(wait):
                self._give_up(f"the lock connection (backend pid {self._pid}) was lost, and taking its locks again "
                              f"did not end within {wait:.0f} s")  # fmt: skip
        if self.lost:
            raise LocksLost(self.lost)

    def confirm(self) -> None:
        """As the run ends, before it is recorded finished: LocksLost if its locks were lost, noticed by the watch or
        by one check now (a run shorter than the watch's interval is never checked otherwise). The watch ends."""
        with self._swap:
            self._done.set()
        self._thread.join(timeout=30)
        if not self.lost:
            try:
                with self.conn.cursor() as cur:
                    cur.execute(CHECK_SQL)
            except psycopg2.Error as exc:  # taken again if nothing could have come in meanwhile, as the watch does
                self._done.clear()
                try:
                    self._take_again(f"the lock connection (backend pid {self._pid}) was found lost as the run ended: "
                                     f"{self._reason(exc)}")  # fmt: skip
                finally:
                    self._done.set()
        if self.lost:
            raise LocksLost(self.lost)

    def release(self) -> None:
        """End the watch, then free the locks and close their connection (release_locks)."""
        with self._swap:
            self._done.set()
        self._thread.join(timeout=30)  # a check or a retake under way: both end soon once _done is set
        release_locks(self.conn)

    # -- the watch thread ------------------------------------------------------------------------

    def _watch(self) -> None:
        from etl.ahead import FORKING  # no scoring worker is forked while this thread is inside libpq (etl/ahead.py)

        while not self._done.wait(self.every):
            try:
                with FORKING.working(), self.conn.cursor() as cur:
                    cur.execute(CHECK_SQL)
                    self._since = cur.fetchone()[0]
            except psycopg2.Error as exc:
                if self._done.is_set():
                    return  # closed by release() meanwhile
                if not self.conn.closed and not connection_lost(exc):
                    log.warning("checking the lock connection: %s", self._reason(exc))  # (a cancel): still held
                    continue
                self._held.clear()
                try:  # (outside the fork gate: a loader waits at the fence holding it, and a fork waits for that loader)
                    self._take_again(f"the lock connection (backend pid {self._pid}) was lost: {self._reason(exc)}")
                except Exception as bug:  # noqa: BLE001 - the run must hear of it, not hang
                    self._give_up(f"the lock connection (backend pid {self._pid}) was lost, and taking its locks "
                                  f"again failed: {type(bug).__name__}: {self._reason(bug)}")  # fmt: skip
                finally:
                    self._held.set()
                if self.lost:
                    return

    def _take_again(self, lost: str) -> None:
        db = self.ledger.db
        log.warning("%s; taking its %d unit lock(s) and the archive's again on a new connection", lost, len(self.names))
        deadline, delays = time.monotonic() + db.reconnect_seconds, iter(RECONNECT_DELAYS)
        while True:  # the server may be restarting: waited for as the run's own connection waits for it
            try:
                conn = db.connect(**LOCK_CONNECTION)
                break
            except psycopg2.Error as exc:
                delay = next(delays, RECONNECT_DELAYS[-1])
                if self._done.is_set():
                    return  # the run is over
                if time.monotonic() + delay > deadline:
                    return self._give_up(f"{lost}, and no new connection was made within ETL_DB_RECONNECT_SECONDS "
                                         f"({db.reconnect_seconds:g} s): {self._reason(exc)}")  # fmt: skip
                self._done.wait(delay)
        why = None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                run_id = self.run_id()
                self._end_lost_session(cur, run_id)
                cur.execute(RETAKE_SQL, (
                    self.names, self._since, socket.gethostname(), os.getpid(),
                    run_id, run_id, self.names, self._since,
                ))  # fmt: skip
                archive_free, taken, forgotten, pid, others = cur.fetchone()
                if others:
                    why = "another run archived one of its units while it held no lock"
                elif taken:
                    holder = self.ledger.running_run_for(cur, taken[0], others=True)
                    why = f"{taken[0]} is now held by another run{holder}"
                elif not archive_free:
                    why = "a forget holds the archive now"
                elif forgotten:
                    why = "posts were forgotten while it held no lock (a post this run looked up could come back)"
        except psycopg2.Error as exc:
            why = f"its locks could not be taken again: {self._reason(exc)}"
        with self._swap:
            keep = why is None and not self._done.is_set()
            if keep:
                conn, self.conn, self._pid = self.conn, conn, pid
        release_locks(conn)  # the lost connection; or the new one, with whatever it took
        if keep:
            log.warning(
                "%s; its %d unit lock(s) and the archive's are held again on a new connection (backend pid %s): "
                "the run goes on", lost, len(self.names), pid,
            )  # fmt: skip
        elif why is not None:
            self._give_up(f"{lost}, and {why}")

    def _end_lost_session(self, cur: psycopg2.extensions.cursor, run_id: int | None) -> None:
        """The lost session, if the server still keeps it (its side never heard of a network cut), ended: it holds
        the locks to take again. Waited for a few seconds (its locks go as it exits)."""
        if run_id is None:
            return  # not recorded yet: the session cannot be told from another that got its pid
        cur.execute(END_LOST_SESSION_SQL, (self._pid, run_id))
        if not cur.fetchall():
            return
        log.warning("the lost lock session (backend pid %s) was still open on the server: ended", self._pid)
        for _ in range(50):
            cur.execute(LOST_SESSION_LIVES_SQL, (self._pid, run_id))
            if not cur.fetchone()[0]:
                return
            time.sleep(0.1)

    def _give_up(self, why: str) -> None:
        if self.lost:
            return
        self.lost = f"{why}: stopped, {self.then}"
        log.error("%s", self.lost)
        self.on_lost(self.lost)

    def _reason(self, exc: BaseException) -> str:
        """The error's first line, any password of DATABASE_URL masked (it never reaches a log line or the ledger)."""
        reason = server_reason(exc) if isinstance(exc, psycopg2.Error) else str(exc).splitlines()[0] if str(exc) else ""
        for password in url_password(self.ledger.db.dsn):
            reason = reason.replace(password, "***")
        return reason or type(exc).__name__
