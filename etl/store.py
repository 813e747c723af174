"""Object storage behind one small interface: S3 (boto3) or a local directory, with keys declared as data."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from etl.config import Settings
from etl.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

# The storage contract (DESIGN.md): the date is the post's created_at in UTC, n the image's position.
KEY_FORMAT = "{prefix}{platform}/{date:%Y}/{date:%m}/{date:%d}/{post_id}/{position}.{ext}"
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}

_SAFE = re.compile(r"[A-Za-z0-9_-]")
_MAX_SEGMENT = 180  # well under S3's 1,024-byte keys and a file system's 255-byte names


def safe_segment(value: str) -> str:
    """Make a post_id safe as one key segment, injectively.

    Letters, digits, '_' and '-' stay; every other character becomes %XX per UTF-8 byte (so '/' is %2F and
    '%' itself is %25: 'a/b' and 'a_b' stay distinct, '..' becomes %2E%2E). A result longer than 180
    characters is cut and given '~' plus a SHA-256 of the whole id; '~' never appears otherwise.
    """
    if not value:
        raise ValueError("an empty key segment")  # 'a//0.png' would share a directory with other posts
    out = []
    for ch in value:
        if _SAFE.match(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    encoded = "".join(out)
    if len(encoded) > _MAX_SEGMENT:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        encoded = encoded[: _MAX_SEGMENT - 41] + "~" + digest
    return encoded


def object_key(prefix: str, platform: str, created_at: datetime, post_id: str, position: int, content_type: str) -> str:
    ext = EXTENSIONS.get(content_type)
    if ext is None:
        raise ValueError(f"no key extension for content type {content_type!r}")
    return KEY_FORMAT.format(
        prefix=prefix,
        platform=safe_segment(platform),
        date=created_at.astimezone(timezone.utc),
        post_id=safe_segment(post_id),
        position=position,
        ext=ext,
    )


class ObjectStore(Protocol):
    """Where images go. `put` writes atomically and skips an object already there with the same sha256."""

    def check(self) -> None: ...

    def put(self, key: str, body: bytes, content_type: str, sha256: str) -> bool: ...

    def url(self, key: str) -> str: ...

    def describe(self) -> str: ...


class LocalStore:
    """Files under a root directory; written to a temporary file then renamed, so never half-written.

    Temporary files live in ROOT/.incoming (never a key: keys start with a platform name) and carry the
    writer's pid, so `check` can remove those a killed run left behind without touching a live run's.
    """

    INCOMING = ".incoming"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.incoming = self.root / self.INCOMING

    def check(self) -> None:
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"ETL_DATA_DIR: cannot create the object store at {self.root}: {exc}") from None
        self.sweep()

    def sweep(self) -> int:
        """Delete temporary files of writers that no longer run (a SIGKILL mid-write); return how many."""
        removed = 0
        for tmp in self.incoming.glob("*.part"):
            pid = tmp.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d partial file(s) left by an interrupted run", removed)
        return removed

    def path(self, key: str) -> Path:
        try:
            path = (self.root / key).resolve()
        except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
            raise StoreError(f"key {key!r} is not a usable path: {exc}") from None
        if self.root not in path.parents:
            raise StoreError(f"key {key!r} leads outside the store")
        return path

    def put(self, key: str, body: bytes, content_type: str, sha256: str) -> bool:
        path = self.path(key)
        try:
            if path.is_file() and path.stat().st_size == len(body) and _file_sha256(path) == sha256:
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix=f"{os.getpid()}-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc
        return True

    def url(self, key: str) -> str:
        return self.path(key).as_uri()

    def describe(self) -> str:
        return f"local object store {self.root}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class S3Store:
    """An S3 (or S3-compatible) bucket through one shared, thread-safe boto3 client."""

    def __init__(self, settings: Settings, client: object | None = None):
        self.bucket = settings.s3_bucket
        self.client = client or make_s3_client(settings)
        self.conditional = True  # If-None-Match on PUT; off for a store that answers 501 to it

    def check(self) -> None:
        """Fail before any work, naming S3_BUCKET, when the bucket is missing or not ours to use."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(f"S3_BUCKET {self.bucket!r} does not exist") from None
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(
                    f"S3_BUCKET {self.bucket!r}: access denied (check the AWS credentials and the bucket policy)"
                ) from None
            raise ConfigError(f"S3_BUCKET {self.bucket!r} cannot be used: {code or exc}") from None
        except BotoCoreError as exc:
            raise ConfigError(f"S3_BUCKET {self.bucket!r} cannot be reached: {exc}") from None

    def put(self, key: str, body: bytes, content_type: str, sha256: str) -> bool:
        """One conditional PUT (If-None-Match: *): the normal case costs a single request, and an object an
        earlier run stored but did not record (it died before committing) is neither rewritten nor versioned
        again. Only when the key exists is it read back (HEAD) to compare checksums."""
        from botocore.exceptions import BotoCoreError, ClientError

        # No ACL: objects stay private to the bucket owner.
        args = {"Bucket": self.bucket, "Key": key, "Body": body, "ContentType": content_type, "Metadata": {"sha256": sha256}}
        try:
            if self.conditional:
                try:
                    self.client.put_object(**args, IfNoneMatch="*")
                    return True
                except ClientError as exc:
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    if code in ("NotImplemented", "501"):
                        log.info("the S3 endpoint does not support conditional writes; writing unconditionally")
                        self.conditional = False
                    elif code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                        raise
                    elif self._holds(key, body, sha256):
                        return False
            self.client.put_object(**args)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 PUT {key} failed: {exc}") from exc
        return True

    def _holds(self, key: str, body: bytes, sha256: str) -> bool:
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        return head.get("Metadata", {}).get("sha256") == sha256 and head.get("ContentLength") == len(body)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def describe(self) -> str:
        return f"s3://{self.bucket}/"


def make_s3_client(settings: Settings, pool_size: int | None = None) -> object:
    """One client for the run: standard retry mode (throttling and 5xx retried), a pool as large as the concurrency.

    The endpoint comes from boto3's own AWS_ENDPOINT_URL, credentials from the usual chain.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max(settings.http_retries, 1) + 1},
        max_pool_connections=(pool_size or settings.concurrency) + 4,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    return boto3.session.Session().client("s3", region_name=settings.aws_region or None, config=config)


def store_from_settings(settings: Settings) -> ObjectStore:
    if settings.s3_bucket:
        return S3Store(settings)
    return LocalStore(settings.objects_dir)
