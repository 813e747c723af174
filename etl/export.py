"""`etl.py export`: the archive as Hive-partitioned Parquet (posts/ and media/), rewritten incrementally per target.

Layout under the target's root: `{dataset}/platform={platform}/dt={YYYY-MM-DD}/part-0.parquet`, one object per
partition, the date being the post's created_at in UTC. A partition is written to a temporary file, then
becomes its object in one step (a rename in a local store, a single PUT in S3): a reader sees the old
partition or the new one. `export_partitions` (sql/007) remembers, per target, each partition's row count
and a fingerprint of its rows taken in the same snapshot as the rows themselves; the next export rewrites
only the partitions whose fingerprint changed, deletes those that no longer hold any row, and writes nothing
when nothing changed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import psycopg2.extensions

from etl.config import Settings, _s3_prefix
from etl.db import Database, Ledger
from etl.db.export import (  # the datasets are declared beside the SQL that reads them
    DATASETS,
    Dataset,
    Key,
    exported_partitions,
    forget_partition,
    forgotten_before,
    partition_fingerprints,
    partition_rows,
    platform_posts,
    record_partitions,
)
from etl.errors import ConfigError, Outcome, StoreError, UsageError
from etl.store import LocalStore, ObjectStore, S3Store, store_from_settings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # part of every fingerprint: a change of the schema rewrites every partition
PART_NAME = "part-0.parquet"
CONTENT_TYPE = "application/vnd.apache.parquet"
FETCH_ROWS = 5_000  # rows per round trip of the server-side cursor
RECORD_BATCH, RECORD_SECONDS = 200, 5.0  # written partitions are recorded (committed) in batches


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    return {
        "string": pa.string(),
        "int64": pa.int64(),
        "int32": pa.int32(),
        "double": pa.float64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "list<string>": pa.list_(pa.string()),
    }[name]


def arrow_schema(dataset: Dataset) -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(c.name, _arrow_type(c.type)) for c in dataset.columns])


# -- targets ------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where an export goes: an object store and the key prefix of the datasets' root; `name` identifies it."""

    store: Any  # LocalStore or S3Store
    prefix: str
    name: str
    default: bool = False

    def key(self, dataset: str, platform: str, dt: date) -> str:
        return f"{self.prefix}{dataset}/platform={platform}/dt={dt.isoformat()}/{PART_NAME}"

    def staging(self) -> Path:
        """A file to write a partition to: inside the local store (so it becomes the object by a rename; a
        killed run's leftovers are swept by the store), else in the system's temporary directory."""
        incoming = getattr(self.store, "incoming", None)
        if incoming is not None:
            Path(incoming).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=incoming, prefix=f"{os.getpid()}-export-", suffix=".part")
        else:
            fd, name = tempfile.mkstemp(prefix="social-archiver-export-", suffix=".parquet")
        os.close(fd)
        return Path(name)


def resolve_target(settings: Settings, to: str | None) -> Target:
    """--to s3://BUCKET/PREFIX, --to DIR, or (none) the configured store under S3_PREFIX + ETL_EXPORT_PREFIX."""
    if not to:
        store: ObjectStore = store_from_settings(settings)
        prefix = settings.s3_prefix + settings.export_prefix
        if isinstance(store, LocalStore):
            name = store.root.as_uri() + "/" + prefix
        else:
            name = f"s3://{settings.s3_bucket}/{prefix}"
        return Target(store, prefix, name, default=True)
    if to.startswith("s3://"):
        bucket, _, raw_prefix = to[len("s3://") :].partition("/")
        if not bucket:
            raise UsageError(f"--to {to!r}: expected s3://BUCKET/PREFIX")
        try:
            prefix = _s3_prefix(raw_prefix)
        except ValueError as exc:
            raise UsageError(f"--to {to!r}: the prefix {exc}") from None
        store = S3Store(replace(settings, s3_bucket=bucket), named=f"--to s3://{bucket}")
        return Target(store, prefix, f"s3://{bucket}/{prefix}")
    if "://" in to:
        raise UsageError(f"--to {to!r}: expected a directory or s3://BUCKET/PREFIX")
    root = Path(to).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--to {to!r} is not a directory")
    store = LocalStore(root)
    return Target(store, "", store.root.as_uri() + "/")


# -- the export ---------------------------------------------------------------------------------------


@dataclass
class ExportStats(Outcome):
    """What one export did, per dataset and in all."""

    target: str = ""
    written: dict[str, int] = field(default_factory=lambda: {d.name: 0 for d in DATASETS})
    rows: dict[str, int] = field(default_factory=lambda: {d.name: 0 for d in DATASETS})
    unchanged: dict[str, int] = field(default_factory=lambda: {d.name: 0 for d in DATASETS})
    deleted: dict[str, int] = field(default_factory=lambda: {d.name: 0 for d in DATASETS})
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    checked_from: date | None = None  # the first day whose partitions were checked; None: every partition

    @property
    def partial(self) -> bool:
        return bool(self.errors)

    def add_error(self, message: str, *, first: bool = False) -> None:
        self._into(self.errors, message, first)

    def ledger(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        counts = {
            "target": self.target, "written": self.written, "rows": self.rows, "unchanged": self.unchanged,
            "deleted": self.deleted, "bytes": self.bytes,
            "checked_from": self.checked_from.isoformat() if self.checked_from else None,
        }  # fmt: skip
        return {"errors": [redact(e) for e in self.errors], "per_source": {"export": counts}}

    def summary(self) -> str:
        lines = [f"Export to {self.target}: {self.status} in {self.seconds:.1f}s"]
        for d in DATASETS:
            lines.append(
                f"  {d.name:<6} partitions written {self.written[d.name]} ({self.rows[d.name]} rows), "
                f"unchanged {self.unchanged[d.name]}, deleted {self.deleted[d.name]}"
            )
        lines.append(f"  bytes    {self.bytes} written")
        lines += self.problem_lines(self.errors)
        return "\n".join(lines)


class Exporter:
    """Exports the datasets to one target; the rows are read in one REPEATABLE READ snapshot."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        target: Target,
        *,
        full: bool = False,
        since: datetime | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        after_partition: Callable[[str, Key], None] | None = None,
    ):
        self.settings = settings
        self.db = db
        self.target = target
        self.full = full
        # --since filters whole partitions: a partition holds every post of its day or is not written at all.
        self.since_day = since.astimezone(timezone.utc).date() if since else None
        self.should_stop = should_stop
        self.after_partition = after_partition  # a hook for tests (a crash after N partitions)
        self.stats = ExportStats(target=target.name)
        self._published: list[tuple] = []  # written partitions whose records are not committed yet
        self._recorded_at = time.monotonic()

    def run(self) -> ExportStats:
        started = time.monotonic()
        reader = self.db.connect()
        try:
            reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
            if self.target.default:
                self._refuse_reserved_platform(reader)
            if self.since_day is not None and forgotten_before(reader, self.target.name, self.since_day):
                log.info("posts were forgotten since every partition of %s was last checked: all are checked now,"
                         " not only those from %s, so that they leave the lake (only what changed is written)",
                         self.target.name, self.since_day)  # fmt: skip
                self.since_day = None
            self.stats.checked_from = self.since_day
            for dataset in DATASETS:
                if self.stats.interrupted:
                    break
                self._export(reader, dataset)
        finally:
            reader.close()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _refuse_reserved_platform(self, reader: psycopg2.extensions.connection) -> None:
        reserved = self.settings.reserved_platform
        if platform_posts(reader, reserved):
            raise ConfigError(
                f"ETL_EXPORT_PREFIX={self.settings.export_prefix!r}: posts of a platform named {reserved!r} are archived, "
                "whose images share that prefix; choose another ETL_EXPORT_PREFIX"
            )

    # -- one dataset --------------------------------------------------------------------------------

    def _export(self, reader: psycopg2.extensions.connection, dataset: Dataset) -> None:
        current = self._fingerprints(reader, dataset)
        previous = self._recorded(dataset)
        if previous and not self.target.store.holds_any(f"{self.target.prefix}{dataset.name}/"):
            log.warning("%s%s/ is empty although %d partitions were exported there: writing every partition again",
                        self.target.name, dataset.name, len(previous))  # fmt: skip
            previous = {}
        todo = sorted(k for k, fp in current.items() if self.full or previous.get(k) != fp)
        gone = sorted(k for k in previous if k not in current and self._in_scope(k))
        self.stats.unchanged[dataset.name] += len(current) - len(todo)
        log.info("%s: %d partitions to write, %d unchanged, %d to delete", dataset.name, len(todo), len(current) - len(todo), len(gone))
        if todo:
            self._write(reader, dataset, todo, current)
        for key in gone:
            if self.should_stop():
                self.stats.interrupted = True
                return
            self._delete(dataset, key)

    def _in_scope(self, key: Key) -> bool:
        return self.since_day is None or key[1] >= self.since_day

    def _fingerprints(self, reader: psycopg2.extensions.connection, dataset: Dataset) -> dict[Key, str]:
        """(platform, dt) -> 'version:rows:sum of 64-bit hashes of each row's exported values'."""
        found = partition_fingerprints(reader, dataset, self.since_day)
        return {(platform, dt): f"{SCHEMA_VERSION}:{rows}:{total}" for platform, dt, rows, total in found}

    def _recorded(self, dataset: Dataset) -> dict[Key, str]:
        return exported_partitions(self.db, self.target.name, dataset.name)

    def _rows(self, reader: psycopg2.extensions.connection, dataset: Dataset, todo: Sequence[Key]) -> Iterator[list[tuple]]:
        """Batches of (platform, dt, *columns) for the partitions in `todo`, partition after partition."""
        with partition_rows(reader, dataset, self.since_day, None if self.full else todo, FETCH_ROWS) as cur:
            while rows := cur.fetchmany(FETCH_ROWS):
                yield rows

    def _write(self, reader: psycopg2.extensions.connection, dataset: Dataset, todo: Sequence[Key], current: dict[Key, str]) -> None:
        writer: PartitionWriter | None = None
        try:
            for rows in self._rows(reader, dataset, todo):
                start = 0
                for i in range(1, len(rows) + 1):
                    if i < len(rows) and rows[i][:2] == rows[start][:2]:
                        continue
                    key: Key = rows[start][:2]
                    if writer is not None and writer.key != key:
                        self._publish(writer, current)
                        writer = None
                        if self.should_stop():
                            self.stats.interrupted = True
                            return
                    if writer is None:
                        writer = PartitionWriter(dataset, key, self.target.staging(), self.settings.export_row_group)
                    writer.add(rows[start:i])
                    start = i
            if writer is not None:
                self._publish(writer, current)
                writer = None
        finally:
            if writer is not None:
                writer.discard()
            self._record()

    def _publish(self, writer: PartitionWriter, current: dict[Key, str]) -> None:
        """The partition's file becomes its object in one step; its record follows (in batches: one commit per
        partition cost more than writing it; a crash before the commit costs a rewrite of those, not a gap)."""
        dataset, (platform, dt) = writer.dataset.name, writer.key
        object_key = self.target.key(dataset, platform, dt)
        try:
            size = writer.close()
            self.target.store.replace_from_file(object_key, writer.path, CONTENT_TYPE)
        except (StoreError, OSError) as exc:
            message = f"{dataset} partition platform={platform}/dt={dt}: {exc}"
            log.error("%s (written again by the next export)", message)
            self.stats.errors.append(message)
            return
        finally:
            writer.discard()
        self._published.append((self.target.name, dataset, platform, dt, writer.rows, current[writer.key], object_key, size))
        self.stats.written[dataset] += 1
        self.stats.rows[dataset] += writer.rows
        self.stats.bytes += size
        log.debug("wrote %s (%d rows, %d bytes)", object_key, writer.rows, size)
        if len(self._published) >= RECORD_BATCH or time.monotonic() - self._recorded_at > RECORD_SECONDS:
            self._record()
        if self.after_partition is not None:
            self.after_partition(dataset, writer.key)

    def _record(self) -> None:
        """Commit the records of the partitions written since the last commit."""
        rows, self._published = self._published, []
        self._recorded_at = time.monotonic()
        if rows:
            record_partitions(self.db, rows)

    def _delete(self, dataset: Dataset, key: Key) -> None:
        """A partition whose rows are all gone (forgotten posts): its object goes, then its record."""
        object_key = self.target.key(dataset.name, *key)
        try:
            self.target.store.delete(object_key)
        except StoreError as exc:
            self.stats.errors.append(f"{dataset.name} partition platform={key[0]}/dt={key[1]}: {exc}")
            return
        forget_partition(self.db, self.target.name, dataset.name, key)
        self.stats.deleted[dataset.name] += 1


class PartitionWriter:
    """One partition's Parquet file (zstd), filled batch by batch; row groups of `row_group` rows."""

    def __init__(self, dataset: Dataset, key: Key, path: Path, row_group: int):
        import pyarrow.parquet as pq

        self.dataset = dataset
        self.key = key
        self.path = path
        self.row_group = row_group
        self.schema = arrow_schema(dataset)
        self.types = [f.type for f in self.schema]
        self.rows = 0
        self.pending: list[Any] = []  # Arrow tables not yet written (fewer than row_group rows in all)
        self.pending_rows = 0
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")

    def add(self, rows: Sequence[tuple]) -> None:
        import pyarrow as pa

        columns = list(zip(*rows, strict=True))[2:]  # without platform and dt: they are the partition's path
        table = pa.Table.from_arrays([pa.array(v, type=t) for v, t in zip(columns, self.types, strict=True)], schema=self.schema)
        self.pending.append(table)
        self.pending_rows += len(rows)
        self.rows += len(rows)
        if self.pending_rows >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending_rows:
            table = pa.concat_tables(self.pending).combine_chunks()
            self.writer.write_table(table, row_group_size=self.row_group)
        self.pending, self.pending_rows = [], 0

    def close(self) -> int:
        self._flush()
        self.writer.close()
        return self.path.stat().st_size

    def discard(self) -> None:
        """Remove the temporary file if it is still there (it was renamed away, or the partition failed)."""
        try:
            self.writer.close()
        except Exception:  # already closed, or broken: the file goes anyway
            pass
        self.path.unlink(missing_ok=True)


def export(
    settings: Settings, db: Database, target: Target, *, arguments: dict[str, Any] | None = None,
    stop: threading.Event | None = None, **options: Any,
) -> ExportStats:  # fmt: skip
    """Check the target, lock it (one export at a time per target), record the run in etl_runs, export.
    `stop`: set to stop it (SIGTERM; or its locks lost); `options` are the Exporter's (full, since)."""
    target.store.check()
    stop = stop or threading.Event()
    exporter = Exporter(settings, db, target, should_stop=stop.is_set, **options)
    unit = f"export {target.name}"
    with Ledger(db).locked_recording(
        "export", unit, [unit], arguments or {}, exporter.stats, busy=f"{unit} is running", stop=stop
    ):
        exporter.run()
    stats = exporter.stats
    log.info("summary: %s", " ".join(f"{d}={n}" for d, n in stats.written.items()) + f" bytes={stats.bytes} status={stats.status}")
    return stats
