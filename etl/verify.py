"""Fixity: `etl.py verify` reads stored objects back and compares them with their recorded sha256 and size.

Rows are streamed from a server-side cursor, least recently verified first, and checked a batch at a time by
ETL_CONCURRENCY threads, each object hashed a megabyte at a time (flat memory). Every checked row records
`verified_at` and `fixity`, so a verify that is interrupted is continued by the next one with the same scope,
and a sample (`--sample 0.1`) rotates through the archive instead of drawing the same objects again. A missing
or changed object is marked failed in post_media and refetched (and overwritten) by the next run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from etl.config import Settings
from etl.db import Database
from etl.db.fixity import (
    images_to_verify,
    last_finished_verify,
    record_fixity,
    recorded_keys,
    stored_images_in_scope,
)
from etl.errors import Outcome, StoreError
from etl.metrics import STATUSES, Textfile
from etl.store import ObjectStore
from etl.store_ops import is_archive_key, iter_keys, key_date, read_back

log = logging.getLogger(__name__)
BATCH = 256
MAX_PROBLEMS_KEPT = 200


@dataclass
class VerifyStats(Outcome):
    """Counts of one verify run: what the summary, etl_runs and the metrics file report."""

    checked: int = 0
    ok: int = 0
    missing: int = 0
    changed: int = 0
    unreadable: int = 0  # a read that failed for another reason (network, permissions): not marked, retried
    unexpected: int = 0  # objects under our keys that no row knows
    changed_meanwhile: int = 0  # rows forgotten or stored again by a run while verify read them: not judged
    bytes_read: int = 0
    resumed_from: datetime | None = None
    listed: bool = False  # whether the store was listed for unexpected objects
    interrupted: bool = False
    problems: list[str] = field(default_factory=list)
    other_errors: int = 0  # problems that are no object's (add_error)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def problem(self, message: str) -> None:
        """An object's problem (it is counted in `failed`)."""
        self._into(self.problems, message, False, MAX_PROBLEMS_KEPT)

    def add_error(self, message: str, *, first: bool = False) -> None:
        """A problem that is no object's (its locks lost): counted on its own."""
        self.other_errors += 1
        self._into(self.problems, message, first, MAX_PROBLEMS_KEPT)

    @property
    def failed(self) -> int:
        return self.missing + self.changed + self.unreadable + self.unexpected

    @property
    def partial(self) -> bool:
        return self.failed > 0

    def counts(self) -> dict[str, Any]:
        return {
            "checked": self.checked, "ok": self.ok, "missing": self.missing, "changed": self.changed,
            "unreadable": self.unreadable, "unexpected": self.unexpected, "changed_meanwhile": self.changed_meanwhile,
            "bytes_read": self.bytes_read,
            "listed": self.listed, "resumed_from": self.resumed_from.isoformat() if self.resumed_from else None,
        }  # fmt: skip

    def ledger(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        return {
            "images_stored": self.ok,
            "images_failed": self.missing + self.changed + self.unreadable,
            "images_skipped": self.unexpected,
            "per_source": {"verify": self.counts()},
            "errors": [redact(p) for p in self.problems],
            "error_count": self.failed + self.other_errors,
        }


@dataclass(frozen=True)
class Scope:
    """What a verify covers."""

    platform: str | None = None
    since: datetime | None = None
    sample: float | None = None  # a fraction of the rows in scope, least recently verified first

    def arguments(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "since": self.since.isoformat() if self.since else None,
            "sample": self.sample,
        }


class Verifier:
    """One verify run over a database and a store."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, *, should_stop: Callable[[], bool] = lambda: False):
        self.settings = settings
        self.db = db
        self.store = store
        self.should_stop = should_stop

    def resume_point(self, scope: Scope) -> datetime | None:
        """When the last verify of this scope did not finish: when it started (what it checked is skipped)."""

        row = last_finished_verify(self.db, scope.arguments())
        return row[1] if row and row[0] in ("interrupted", "failed", "abandoned") else None

    def run(self, scope: Scope, stats: VerifyStats | None = None) -> VerifyStats:
        """Check the objects in scope, counted into `stats` (a new VerifyStats by default), which it returns."""
        stats = VerifyStats() if stats is None else stats
        stats.resumed_from = self.resume_point(scope)
        if stats.resumed_from:
            log.info("continuing the verify interrupted at %s", stats.resumed_from)
        self._check_rows(scope, stats)
        if not stats.interrupted and (scope.sample is None or scope.sample >= 1):
            self._find_unexpected(scope, stats)
        stats.seconds = time.monotonic() - stats.started
        return stats

    # -- recorded objects ------------------------------------------------------------------------

    def _check_rows(self, scope: Scope, stats: VerifyStats) -> None:
        params = {**scope.arguments(), "since": scope.since, "resume": stats.resumed_from}
        limit = None
        if scope.sample is not None and scope.sample < 1:
            limit = math.ceil(scope.sample * stored_images_in_scope(self.db, params))
        reader = self.db.connect()
        try:
            with images_to_verify(reader, params, limit, BATCH) as scan, ThreadPoolExecutor(
                self.settings.concurrency, thread_name_prefix="verify"
            ) as pool:
                while rows := scan.fetchmany(BATCH):
                    results = list(pool.map(self._check, rows))
                    self._record(rows, results, stats)
                    log.info("verified %d objects so far: %d missing, %d changed", stats.checked, stats.missing, stats.changed)
                    if self.should_stop():
                        stats.interrupted = True
                        break
        finally:
            reader.close()

    def _check(self, row: tuple) -> tuple[str, str | None, int]:
        """(fixity, problem, bytes read) of one row: ok, missing, changed, or unreadable."""
        _, key, sha256, size, *_ = row
        try:
            found = read_back(self.store, key, size)
        except StoreError as exc:
            return "unreadable", str(exc), 0
        except Exception as exc:  # one object must never stop the check
            log.exception("unexpected error reading %s back", key)
            return "unreadable", f"{type(exc).__name__}: {exc}", 0
        if found.missing:
            return "missing", "the object is missing", 0
        if size is not None and found.size != size:
            return "changed", f"{found.size} bytes instead of {size}", 0
        if found.sha256 != sha256:
            return "changed", f"sha256 {found.sha256} instead of {sha256}", found.size or 0
        return "ok", None, found.size or 0

    def _record(self, rows: list[tuple], results: list[tuple[str, str | None, int]], stats: VerifyStats) -> None:
        ok, bad = [], []
        for row, (fixity, problem, read) in zip(rows, results, strict=True):
            stats.checked += 1
            stats.bytes_read += read
            row_id, key, sha256 = row[:3]
            if fixity == "ok":
                ok.append((row_id, key, sha256))
            elif fixity != "unreadable":
                bad.append((row_id, key, sha256, fixity, f"fixity check: {problem}"[:2000]))
        judged = record_fixity(self.db, ok, bad)  # the bad ones failed, to be refetched by the next run
        for row, (fixity, problem, _) in zip(rows, results, strict=True):
            row_id, key, _, _, platform, post_id, position = row
            if fixity != "unreadable" and row_id not in judged:
                # Forgotten (ETL_DELETED_AT_SOURCE=forget in a run), or stored again by a run's repair, since the
                # scan read the row: not a damage of the archive.
                stats.changed_meanwhile += 1
                log.info("%s/%s image %d (%s) changed while verify read it: not judged", platform, post_id, position, key)
                continue
            if fixity == "ok":
                stats.ok += 1
                continue
            setattr(stats, fixity, getattr(stats, fixity) + 1)
            stats.problem(f"{fixity}: {platform}/{post_id} image {position} ({key}): {problem}")
            log.warning("fixity %s: %s/%s image %d at %s: %s", fixity, platform, post_id, position, key, problem)

    # -- objects no row knows --------------------------------------------------------------------

    def _find_unexpected(self, scope: Scope, stats: VerifyStats) -> None:
        prefix = self.settings.s3_prefix
        listing = prefix + (f"{scope.platform}/" if scope.platform else "")
        since_day = scope.since.replace(hour=0, minute=0, second=0, microsecond=0) if scope.since else None
        pending: list[str] = []
        try:
            for key in iter_keys(self.store, listing):
                if not is_archive_key(prefix, key):
                    continue  # exports and anything else beside the images are not ours to judge
                if since_day is not None and (key_date(prefix, key) or since_day) < since_day:
                    continue
                pending.append(key)
                if len(pending) >= 1000:
                    self._unknown(pending, stats)
                    pending = []
            if pending:
                self._unknown(pending, stats)
            stats.listed = True
        except StoreError as exc:
            stats.unreadable += 1
            stats.problem(f"listing the store for unexpected objects failed: {exc}")

    def _unknown(self, keys: list[str], stats: VerifyStats) -> None:
        held = recorded_keys(self.db, keys)
        for key in keys:
            if key not in held:
                stats.unexpected += 1
                stats.problem(f"unexpected: {key} (no post_media row knows it)")
                log.warning("unexpected object %s: no post_media row knows it", key)


def write_verify_metrics(path: str, stats: VerifyStats) -> Path:
    """Beside ETL_METRICS_PATH (X.prom -> X_verify.prom), so a verify never overwrites the last run's metrics;
    node_exporter's textfile collector reads every *.prom file of the folder."""
    base = Path(path)
    target = base.with_name(f"{base.stem}_verify{base.suffix or '.prom'}")
    out = Textfile()
    out.gauge("verify_last_timestamp_seconds", "When the last fixity check finished (unix time).", [({}, time.time())])
    out.gauge("verify_last_duration_seconds", "How long the last fixity check took.", [({}, stats.seconds)])
    out.gauge(
        "verify_last_status", "1 for the last fixity check's status, 0 for the others.",
        [({"status": s}, 1.0 if s == stats.status else 0.0) for s in STATUSES], ["status"],
    )  # fmt: skip
    out.gauge(
        "verify_last_objects", "Objects of the last fixity check per result.",
        [({"result": r}, float(getattr(stats, r))) for r in ("ok", "missing", "changed", "unreadable", "unexpected")],
        ["result"],
    )  # fmt: skip
    out.gauge("verify_last_bytes_read", "Bytes read back by the last fixity check.", [({}, float(stats.bytes_read))])
    out.write(target)
    return target
