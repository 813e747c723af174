"""copy-store: archived images that live in another object store than the configured one, copied into it.

Where an image lives is read from its storage_url (sql/005_media_store.sql): `s3://BUCKET/...` is that bucket,
a `file:` URL is the local object store, always ETL_DATA_DIR/objects. A run refuses to start while images
live elsewhere (it would record them as archived where they are not); `copy-store` copies each object,
streamed through a spool file, checks the source bytes against the sha256 recorded in post_media, reads the
copy back and checks it again, and only then points the row (and social_posts.image_s3_url) at the copy.
The source is left as it was. Rows are committed page by page, so an interrupted copy resumes where it
stopped; an object copied but not yet recorded is found in place, verified, and recorded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from etl.config import Settings
from etl.db import Database, Ledger
from etl.db.fixity import images_elsewhere, images_to_copy, record_copies
from etl.errors import ConfigError, ETLError, Outcome
from etl.logs import RedactingFilter
from etl.store import LocalStore, ObjectStore, S3Store, make_s3_client, object_key

log = logging.getLogger(__name__)
LOCAL = "local"  # media_store() of a file: URL
CHUNK = 1 << 16
SPOOL_IN_MEMORY = 1 << 20  # larger objects are spooled to a temporary file: memory stays flat
MAX_WORKERS = 16  # copies at once (each holds one spool and two connections)
LOCK_NAME = "copy-store"  # its advisory lock and its etl_runs.sources


def store_name(store: ObjectStore | None) -> str | None:
    """The configured store as media_store() names it, or None for a store it cannot name."""
    if isinstance(store, LocalStore):
        return LOCAL
    if isinstance(store, S3Store):
        return f"s3://{store.bucket}"
    return None


def describe(name: str | None, settings: Settings) -> str:
    if name == LOCAL:
        return f"the local object store {settings.objects_dir.resolve()} (ETL_DATA_DIR/objects)"
    if name:
        return f"bucket {name[5:]!r} ({name}/)"
    return "no store copy-store knows (an unrecognised storage_url)"


def _where(counts: dict[str | None, int], settings: Settings) -> str:
    return "; ".join(f"{n} in {describe(name, settings)}" for name, n in counts.items())


def refuse_if_elsewhere(
    db: Database, store: ObjectStore | None, settings: Settings, *, why: str = "a run would not archive them there"
) -> None:
    """ConfigError (exit 2) when archived images live in another store than the configured one (`why`: what the
    command would do wrong with them: a run, a verify, a forget)."""
    target = store_name(store)
    if target is None:
        return
    counts = images_elsewhere(db, target)
    if not counts:
        return
    setting = f"S3_BUCKET={settings.s3_bucket!r}" if target != LOCAL else "S3_BUCKET is not set"
    raise ConfigError(
        f"{setting}, so images go to {describe(target, settings)}, but {sum(counts.values())} archived image(s) "
        f"live in another store ({_where(counts, settings)}); {why}. "
        f"Run `python etl.py copy-store` to copy them (each verified by sha256; resumable), then run again."
    )


# -- both ends of a copy ------------------------------------------------------------------------------


class CopyError(ETLError):
    """One object could not be copied; `corrupt` when the source does not match its recorded sha256."""

    def __init__(self, message: str, *, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


class Side:
    """One object store as copy-store reads and writes it; `name` is its storage_url store name."""

    name: str

    def open(self, key: str) -> IO[bytes]:
        raise NotImplementedError

    def digest(self, key: str) -> tuple[str, int]:
        """(sha256 hex, size) of the object, read a chunk at a time."""
        return _digest(self.open(key))


class LocalSide(Side):
    """Objects as files under the local store's root; written to a temporary file and renamed."""

    def __init__(self, root: Path):
        self.store = LocalStore(root)
        self.name = LOCAL

    def check(self) -> None:
        if not self.store.root.is_dir():
            raise CopyError(f"the local object store {self.store.root} (ETL_DATA_DIR/objects) does not exist")

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.store.path(key).open("rb")
        except FileNotFoundError:
            raise CopyError(f"missing from {self.store.root}") from None
        except (OSError, ETLError) as exc:
            raise CopyError(f"cannot be read from {self.store.root}: {exc}") from None

    def holds(self, key: str, sha256: str, size: int) -> bool:
        path = self.store.path(key)
        return path.is_file() and path.stat().st_size == size and _digest(path.open("rb"))[0] == sha256

    def write(self, key: str, body: IO[bytes], size: int, content_type: str, sha256: str) -> bool:
        """Write the object unless an identical one is there; False when it was."""
        path = self.store.path(key)
        if self.holds(key, sha256, size):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.store.incoming, prefix=f"{os.getpid()}-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in iter(lambda: body.read(CHUNK), b""):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def url(self, key: str) -> str:
        return self.store.url(key)


class S3Side(Side):
    """Objects in one bucket, through a client shared by every bucket of the copy (one endpoint, one chain)."""

    def __init__(self, client: Any, bucket: str):
        self.client = client
        self.bucket = bucket
        self.name = f"s3://{bucket}"

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise CopyError(f"bucket {self.bucket!r} cannot be used: {exc}") from None

    def open(self, key: str) -> IO[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise CopyError(f"missing from bucket {self.bucket!r}") from None
            raise CopyError(f"cannot be read from bucket {self.bucket!r}: {exc}") from None
        except BotoCoreError as exc:
            raise CopyError(f"cannot be read from bucket {self.bucket!r}: {exc}") from None

    def write(self, key: str, body: IO[bytes], size: int, content_type: str, sha256: str) -> bool:
        """A conditional PUT (If-None-Match: *); on 412 the object there is compared, and replaced if it differs:
        its metadata first, then its bytes (a damaged object keeps the x-amz-meta-sha256 it was written with)."""
        from botocore.exceptions import ClientError

        args = {
            "Bucket": self.bucket, "Key": key, "Body": body, "ContentLength": size, "ContentType": content_type,
            "Metadata": {"sha256": sha256},
        }  # fmt: skip
        try:
            self.client.put_object(**args, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                if head.get("Metadata", {}).get("sha256") == sha256 and head.get("ContentLength") == size:
                    if self.digest(key) == (sha256, size):
                        return False
            elif code not in ("NotImplemented", "501"):
                raise
        body.seek(0)
        self.client.put_object(**args)
        return True

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _digest(body: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with closing(body):
        for chunk in iter(lambda: body.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# -- the copy -----------------------------------------------------------------------------------------


@dataclass
class _Row:
    id: int
    platform: str
    post_id: str
    position: int
    key: str
    url: str
    sha256: str | None
    bytes: int | None
    content_type: str
    created_at: datetime
    store: str | None

    def label(self) -> str:
        return f"{self.platform}/{self.post_id} image {self.position} ({self.store or self.url[:80]}: {self.key})"


@dataclass
class CopyResult(Outcome):
    """What a copy-store did; `format()` is the command's summary."""

    target: str
    copied: int = 0
    present: int = 0  # already in the target (an interrupted copy), verified and recorded
    failed: int = 0
    corrupt: int = 0
    remaining: dict[str | None, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    where: str = ""

    @property
    def partial(self) -> bool:
        return bool(self.failed or self.remaining)

    def add_error(self, message: str, *, first: bool = False) -> None:
        self._into(self.errors, message, first)

    def ledger(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        return {
            "images_stored": self.copied, "images_skipped": self.present, "images_failed": self.failed,
            "errors": [redact(e) for e in self.errors[:50]], "error_count": len(self.errors),
            "per_source": {"copy-store": {"target": self.target, "corrupt": self.corrupt,
                                          "remaining": sum(self.remaining.values())}},
        }  # fmt: skip

    def format(self, settings: Settings) -> str:
        lines = [
            "",
            f"Copy into {describe(self.target, settings)}: {self.status} in {self.seconds:.1f}s",
            f"  images   copied {self.copied}, already there {self.present}, failed {self.failed}"
            + (f" (of which {self.corrupt} did not match their sha256)" if self.corrupt else ""),
        ]
        if self.remaining:
            lines.append(f"  still in other stores: {_where(self.remaining, settings)}")
        else:
            lines.append("  every archived image is in the configured store: runs go on")
        lines += self.problem_lines(self.errors)
        if self.corrupt:
            lines.append(
                "  An object that does not match its sha256 is damaged where it is: restore it from a backup and run"
                " copy-store again (the copy never overwrites the source, and its row still points there)."
            )
        return "\n".join(lines)


class StoreCopier:
    """Copies every stored image outside the configured store into it, concurrently, page by page."""

    def __init__(self, settings: Settings, db: Database, stop: threading.Event | None = None):
        self.settings = settings
        self.db = db
        self.stop = stop or threading.Event()
        self._client: Any = None
        self._sides: dict[str | None, Side | CopyError] = {}
        self._sides_lock = threading.Lock()

    def s3_client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client(self.settings, pool_size=MAX_WORKERS * 2)
        return self._client

    def open_target(self) -> Side:
        """The configured store, checked (ConfigError naming the setting when it cannot be used)."""
        if self.settings.s3_bucket:
            S3Store(self.settings, client=self.s3_client()).check()
            return S3Side(self.s3_client(), self.settings.s3_bucket)
        store = LocalStore(self.settings.objects_dir)
        store.check()
        return LocalSide(store.root)

    def side(self, name: str | None) -> Side:
        """The store a source object lives in, opened and checked once; CopyError when it cannot be."""
        with self._sides_lock:
            if name not in self._sides:
                try:
                    if name == LOCAL:
                        opened: Side = LocalSide(self.settings.objects_dir)
                    elif name and name.startswith("s3://"):
                        opened = S3Side(self.s3_client(), name[5:])
                    else:
                        raise CopyError("its storage_url names no store copy-store can read")
                    opened.check()
                    self._sides[name] = opened
                except CopyError as exc:
                    self._sides[name] = exc
            found = self._sides[name]
        if isinstance(found, CopyError):
            raise CopyError(str(found))
        return found

    def execute(self, arguments: dict[str, Any]) -> CopyResult:
        target = self.open_target()
        result = CopyResult(target.name)
        started = time.monotonic()
        redact = RedactingFilter(self.settings.secrets()).redact
        try:
            with Ledger(self.db).locked_recording(
                LOCK_NAME, LOCK_NAME, [LOCK_NAME], arguments, result, busy="copy-store is running", stop=self.stop, redact=redact
            ):
                self._copy_all(target, result)
                result.remaining = images_elsewhere(self.db, target.name)
        finally:
            result.seconds = time.monotonic() - started
        log.info(
            "summary: copy-store into %s: copied=%d present=%d failed=%d corrupt=%d remaining=%d %.1fs",
            target.name, result.copied, result.present, result.failed, result.corrupt,
            sum(result.remaining.values()), result.seconds,
        )  # fmt: skip
        return result

    def _pages(self, target: str) -> Iterator[list[_Row]]:
        last = 0
        while not self.stop.is_set():
            page = [_Row(*row) for row in images_to_copy(self.db, target, last, self.settings.batch_size)]
            if not page:
                return
            last = page[-1].id
            yield page

    def _copy_all(self, target: Side, result: CopyResult) -> None:
        workers = min(self.settings.concurrency, MAX_WORKERS)
        with ThreadPoolExecutor(workers, thread_name_prefix="copy") as pool:
            for page in self._pages(target.name):
                outcomes = list(pool.map(lambda row: self._copy_one(row, target), page))
                done = [
                    (row, key, url)
                    for row, (kind, key, url) in zip(page, outcomes, strict=True)
                    if kind in ("copied", "present")
                ]
                if done:
                    _record(self.db, done)
                for row, (kind, message, _) in zip(page, outcomes, strict=True):
                    if kind == "copied":
                        result.copied += 1
                    elif kind == "present":
                        result.present += 1
                    elif kind in ("failed", "corrupt"):
                        result.failed += 1
                        result.corrupt += kind == "corrupt"
                        result.errors.append(f"{row.label()}: {message}")
                        log.warning("not copied: %s: %s", row.label(), message)
                    else:
                        result.interrupted = True
        if self.stop.is_set():
            result.interrupted = True

    def _copy_one(self, row: _Row, target: Side) -> tuple[str, str, str]:
        """(copied | present, new key, new url), (failed | corrupt, reason, ''), or (stopped, '', '')."""
        if self.stop.is_set():
            return "stopped", "", ""
        try:
            key = _target_key(self.settings, row)
            source = self.side(row.store)
            written = _copy_verified(source, target, row, key)
        except CopyError as exc:
            return ("corrupt" if exc.corrupt else "failed"), str(exc), ""
        except Exception as exc:  # one object never stops the copy
            log.debug("copying %s failed", row.label(), exc_info=True)
            return "failed", f"{type(exc).__name__}: {exc}", ""
        return ("copied" if written else "present"), key, target.url(key)


def _target_key(settings: Settings, row: _Row) -> str:
    """The key the storage contract gives this image in the configured store (its S3_PREFIX included)."""
    try:
        return object_key(settings.s3_prefix, row.platform, row.created_at, row.post_id, row.position, row.content_type)
    except ValueError:  # a content type without a key extension: keep the key it has
        return row.key


def _copy_verified(source: Side, target: Side, row: _Row, key: str) -> bool:
    """Copy one object, checking the source against the recorded sha256 and then the copy; True if written."""
    if not row.sha256:
        raise CopyError("no sha256 is recorded for it, so a copy could not be verified")
    limit = row.bytes if row.bytes is not None else None
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        digest, size = hashlib.sha256(), 0
        with closing(source.open(row.key)) as body:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
                if limit is not None and size > limit:
                    break  # longer than recorded: damaged, whatever follows
                spool.write(chunk)
        if digest.hexdigest() != row.sha256 or (limit is not None and size != limit):
            raise CopyError(
                f"the source object does not match its recorded sha256 ({_short(row.sha256)}, {row.bytes} bytes;"
                f" found {_short(digest.hexdigest())}, {size}{'+' if limit is not None and size > limit else ''} bytes):"
                " not copied",
                corrupt=True,
            )
        spool.seek(0)
        written = target.write(key, spool, size, row.content_type, row.sha256)
    copied_sha, copied_size = target.digest(key)
    if copied_sha != row.sha256 or copied_size != size:
        raise CopyError(
            f"the copy at {key} reads back as {_short(copied_sha)}, {copied_size} bytes, not {_short(row.sha256)}:"
            " not recorded"
        )
    return written


def _short(sha: str | None) -> str:
    return f"sha256 {sha[:12]}…" if sha else "no sha256"


def _record(db: Database, done: list[tuple[_Row, str, str]]) -> None:
    """Point the rows (and posts, for first images) at their verified copies."""
    record_copies(
        db,
        [(row.id, row.url, key, url) for row, key, url in done],
        [(row.platform, row.post_id, row.url, url) for row, _, url in done if row.position == 0],
    )


def copy_store(settings: Settings, arguments: dict[str, Any], stop: threading.Event | None = None) -> CopyResult:
    """The copy-store command: the archive's database (never created here), the configured store, the copy."""
    from etl.status import open_archive

    copier_db = open_archive(settings)
    try:
        copier = StoreCopier(settings, copier_db, stop)
        return copier.execute(arguments)
    finally:
        copier_db.close()
