"""Reading back, listing and deleting stored objects (fixity checks and deletions), for both kinds of store."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from etl.errors import StoreError
from etl.records import PLATFORM_PATTERN
from etl.store import EXTENSIONS, LocalStore, ObjectStore, S3Store, safe_segment

CHUNK = 1 << 20  # objects are hashed a megabyte at a time: memory stays flat whatever their size
# A key of the storage contract, after the prefix: platform/YYYY/MM/DD/post_id/n.ext
_KEY_RE = re.compile(
    rf"^(?P<platform>{PLATFORM_PATTERN})"
    + r"/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/[A-Za-z0-9_%~-]+/\d+\.(?:"
    + "|".join(EXTENSIONS.values())
    + r")$"
)


@dataclass(frozen=True)
class ReadBack:
    """What an object holds now: missing, or its size and sha256 (sha256 None when the size already differed)."""

    missing: bool
    size: int | None = None
    sha256: str | None = None


def is_archive_key(prefix: str, key: str) -> bool:
    """Whether `key` has the shape of an image key of this archive (not an export or anything else)."""
    return key.startswith(prefix) and _KEY_RE.match(key[len(prefix) :]) is not None


def key_date(prefix: str, key: str) -> datetime | None:
    m = _KEY_RE.match(key[len(prefix) :]) if key.startswith(prefix) else None
    if not m:
        return None
    try:
        return datetime(int(m["y"]), int(m["m"]), int(m["d"]), tzinfo=timezone.utc)
    except ValueError:
        return None


def post_prefix(prefix: str, platform: str, created_at: datetime, post_id: str) -> str:
    """The folder every image of one post is stored under (KEY_FORMAT up to the post_id)."""
    date = created_at.astimezone(timezone.utc)
    return f"{prefix}{safe_segment(platform)}/{date:%Y}/{date:%m}/{date:%d}/{safe_segment(post_id)}/"


def read_back(store: ObjectStore, key: str, expected_size: int | None) -> ReadBack:
    """Stream the object and hash it; a size that differs from `expected_size` is known without reading."""
    digest = hashlib.sha256()
    size = 0
    if isinstance(store, LocalStore):
        path = store.path(key)
        try:
            actual = path.stat().st_size
            if expected_size is not None and actual != expected_size:
                return ReadBack(False, actual)
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return ReadBack(True)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        return ReadBack(False, size, digest.hexdigest())
    if isinstance(store, S3Store):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = store.client.get_object(Bucket=store.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound"):
                return ReadBack(True)
            raise StoreError(f"S3 GET {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 GET {key} failed: {exc}") from exc
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if expected_size is not None and length is not None and length != expected_size:
                return ReadBack(False, int(length))
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except (BotoCoreError, OSError) as exc:
            raise StoreError(f"S3 GET {key} failed while reading: {exc}") from exc
        finally:
            body.close()
        return ReadBack(False, size, digest.hexdigest())
    raise StoreError(f"cannot read back from {store.describe()}")


def iter_keys(store: ObjectStore, prefix: str) -> Iterator[str]:
    """Every key under `prefix`, streamed (S3: a page of 1,000 at a time; local: a directory walk)."""
    if isinstance(store, LocalStore):
        base = store.root / prefix if prefix else store.root
        top = base if prefix.endswith("/") or not prefix else base.parent
        for folder, dirs, files in os.walk(top):
            if Path(folder) == store.root:
                dirs[:] = [d for d in dirs if d != LocalStore.INCOMING]
            dirs.sort()
            for name in sorted(files):
                key = Path(folder, name).relative_to(store.root).as_posix()
                if key.startswith(prefix):
                    yield key
        return
    if isinstance(store, S3Store):
        yield from (item["Key"] for item in _s3_listing(store, prefix, "Contents"))
        return
    raise StoreError(f"cannot list {store.describe()}")


def _s3_listing(store: S3Store, prefix: str, part: str, **more: str) -> Iterator[dict]:
    """The items of one part ("Contents", or "CommonPrefixes" with a Delimiter) of each page listing `prefix`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix, **more):
            yield from page.get(part) or []
    except (ClientError, BotoCoreError) as exc:
        raise StoreError(f"S3 listing of {prefix or '/'} failed: {exc}") from exc


def keys_of_post_any_day(store: ObjectStore, prefix: str, platform: str, post_id: str) -> Iterator[str]:
    """Every key of one post whose date is not known (a post the archive does not hold: a killed run stored its
    images and never recorded it): its folder is looked for under every day the store holds for its platform.
    Local: one directory walk of the year/month/day folders. S3: the year, month and day prefixes listed with a
    delimiter, then one listing of the post's folder per day (a few hundred requests per archived year)."""
    base = f"{prefix}{safe_segment(platform)}/"
    folder = safe_segment(post_id) + "/"
    days = [base]
    for _ in range(3):  # years, months, days
        days = [sub for parent in days for sub in _subfolders(store, parent)]
    for day in days:
        yield from iter_keys(store, day + folder)


def _subfolders(store: ObjectStore, parent: str) -> Iterator[str]:
    """The folder-like prefixes right under `parent` ('2026/' under 'mock/'), sorted."""
    if isinstance(store, LocalStore):
        try:
            names = sorted(e.name for e in os.scandir(store.path(parent.rstrip("/"))) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot list {parent}: {exc}") from exc
        yield from (f"{parent}{name}/" for name in names)
        return
    if isinstance(store, S3Store):
        yield from (item["Prefix"] for item in _s3_listing(store, parent, "CommonPrefixes", Delimiter="/"))
        return
    raise StoreError(f"cannot list {store.describe()}")


def delete_object(store: ObjectStore, key: str) -> bool:
    """Delete one object; True if it was there (local store: and remove the folders it leaves empty)."""
    if isinstance(store, LocalStore):
        path = store.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc}") from exc
        parent = path.parent
        while parent != store.root and store.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True
    if isinstance(store, S3Store):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            store.client.delete_object(Bucket=store.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 DELETE {key} failed: {exc}") from exc
        return True
    raise StoreError(f"cannot delete from {store.describe()}")
