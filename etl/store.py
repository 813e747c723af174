"""Object storage behind one small interface: S3 (boto3) or a local directory, with keys declared as data."""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from etl.config import Settings
from etl.errors import ConfigError, ServiceUnavailable, StoreError

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


class KeyHeld(Exception):
    """put() without `replace` found its key holding other bytes (another run stored this image first, perhaps a
    different version of it): those are left as they are. Not a StoreError: nothing failed."""

    def __init__(self, key: str):
        super().__init__(f"{key} holds other bytes")
        self.key = key


class ObjectStore(Protocol):
    """Where images go. `put` writes atomically, skips an object already there with the same sha256, and never
    replaces one with other bytes unless told to (`replace`: it failed a fixity check); it raises KeyHeld instead."""

    def check(self) -> None: ...

    def put(self, key: str, body: bytes, content_type: str, sha256: str, *, replace: bool = False) -> bool: ...

    def read(self, key: str) -> bytes: ...

    def url(self, key: str) -> str: ...

    def describe(self) -> str: ...


_FOLDERS_KEPT = 10_000
# Keys the quick path takes: two or more segments, none empty, "." or "..", no NUL byte.
_PLAIN_KEY = re.compile(r"(?!\.\.?/)[^/\x00]+(?:/(?!\.\.?(?:/|$))[^/\x00]+)+")
_TEMP_NUMBERS = itertools.count()  # names of put()'s temporary files, unique in this process (next() is atomic)


class _Unusual(Exception):
    """A key the quick path of LocalStore.put leaves to the general one."""


class LocalStore:
    """Files under a root directory; written to a temporary file then renamed, so never half-written.

    Temporary files live in ROOT/.incoming (never a key: keys start with a platform name) and carry the
    writer's pid, so `check` can remove those a killed run left behind without touching a live run's.
    """

    INCOMING = ".incoming"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.incoming = self.root / self.INCOMING
        self._folders: dict[str, str] = {}  # a key's folder -> its real directory (see _folder)
        self._written = threading.local()  # .last: (key, path) of this thread's last quick put

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

    def put(self, key: str, body: bytes, content_type: str, sha256: str, *, replace: bool = False) -> bool:
        try:
            return self._put_quickly(key, body, sha256, replace)
        except (_Unusual, OSError, ValueError):
            return self._put_carefully(key, body, sha256, replace)  # anything unusual: the general way, its own errors

    def _put_quickly(self, key: str, body: bytes, sha256: str, replace: bool) -> bool:
        """put() in a few system calls (issue 16: the general way cost half a millisecond of CPU an image): the
        key's folder comes from _folder(), the file's state from one lstat, the temporary file from a counter.
        Raises _Unusual (or OSError) for anything else: a symlink, a missing .incoming, a name already taken."""
        if not _PLAIN_KEY.fullmatch(key):  # absolute, empty, "." or ".." segments, NUL: the general way judges
            raise _Unusual
        folder_key, _, name = key.rpartition("/")
        folder, made = self._folder(folder_key)
        path = f"{folder}/{name}"
        if not made:  # a folder made just now holds nothing yet (a new post's, nearly always): no lstat to ask
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise _Unusual
                if st.st_size == len(body) and _file_sha256(Path(path)) == sha256:
                    self._written.last = (key, path)
                    return False
                if not replace:
                    raise KeyHeld(key)
        tmp = f"{self.incoming}/{os.getpid()}-q{next(_TEMP_NUMBERS)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        wrote = _write_renamed(fd, tmp, path, body, replace=replace)
        if not wrote:  # another run wrote this key since the lstat: the same bytes, or KeyHeld
            _same_or_held(Path(path), body, sha256, key)
        self._written.last = (key, path)  # for url(key), which the archiver asks next: no lstat to ask again
        return wrote

    def _folder(self, folder_key: str) -> tuple[str, bool]:
        """The real directory of a key's folder, made when missing and remembered: one mkdir per new folder
        instead of a resolve() (an lstat per path component) and two mkdir calls per image. Also whether this
        call made it."""
        known = self._folders.get(folder_key)
        if known is not None:
            return known, False
        head, _, name = folder_key.rpartition("/")
        path = f"{self._folder(head)[0] if head else self.root}/{name}"
        made = True
        try:
            os.mkdir(path)
        except FileExistsError:
            made = False
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # a symlink or a file: resolved the general way
                raise _Unusual from None
        if len(self._folders) >= _FOLDERS_KEPT:
            self._folders.clear()  # memory stays flat on a long run
        self._folders[folder_key] = path
        return path, made

    def _put_carefully(self, key: str, body: bytes, sha256: str, replace: bool) -> bool:
        path = self.path(key)
        try:
            if path.is_file():
                if _same_file(path, body, sha256):
                    return False
                if not replace:
                    raise KeyHeld(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix=f"{os.getpid()}-", suffix=".part")
            if not _write_renamed(fd, tmp, path, body, replace=replace):
                _same_or_held(path, body, sha256, key)
                return False
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc
        return True

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def url(self, key: str) -> str:
        written = getattr(self._written, "last", None)
        if written is not None and written[0] == key:
            path = written[1]  # this thread's put() just wrote it (or found it) there, a regular file
            self._written.last = None
        else:
            folder_key, _, name = key.rpartition("/")
            folder = self._folders.get(folder_key) if _PLAIN_KEY.fullmatch(key) else None
            if folder is None or os.path.islink(path := f"{folder}/{name}"):
                return self.path(key).as_uri()
        # The folder put() wrote in, already resolved: no second resolve(). The URI as Path.as_uri makes it.
        return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))

    # -- whole-object replacement (the Parquet export) -------------------------------------------

    def replace_from_file(self, key: str, src: Path, content_type: str) -> None:
        """Make the file `src` the object `key` in one rename, replacing what was there: a reader sees the
        old object or the new one, never a mix. `src` should be in .incoming (the same file system)."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {key}: {exc}") from exc

    def holds_any(self, prefix: str) -> bool:
        """Whether any object lies under `prefix` (a folder-like prefix ending in '/')."""
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        return base.is_dir() and any(p.is_file() for p in base.rglob("*"))

    def describe(self) -> str:
        return f"local object store {self.root}"


def _write_renamed(fd: int, tmp: str, path: str | Path, body: bytes, *, replace: bool) -> bool:
    """`body` written to the temporary file (fd, named tmp), which then becomes `path`; never left behind. Without
    `replace` a file already at `path` is kept (a hard link, which fails when the name is taken, where rename
    would replace it): returns False then. A file system without hard links (vfat, some FUSE and SMB mounts) gets
    the file created exclusively at `path` instead: still never another's replaced, though a reader may see it
    half-written, and a crash can leave it so (the next put finds no image there and replaces it)."""
    renamed = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        if not replace:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                return _write_exclusively(path, body)
            else:
                return True
        os.replace(tmp, path)
        renamed = True
        return True
    finally:
        if not renamed:  # linked (both names now), or failed: the temporary name goes
            Path(tmp).unlink(missing_ok=True)


def _write_exclusively(path: str | Path, body: bytes) -> bool:
    """`body` written into a file created at `path`, which must not exist (False if it does)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return True


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _same_file(path: Path, body: bytes, sha256: str) -> bool:
    return path.stat().st_size == len(body) and _file_sha256(path) == sha256


def _same_or_held(path: Path, body: bytes, sha256: str, key: str) -> None:
    """Nothing when the file at `path` holds `body`; KeyHeld when it holds other bytes."""
    if not _same_file(path, body, sha256):
        raise KeyHeld(key)


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
    """An S3 (or S3-compatible) bucket through one shared, thread-safe boto3 client, and a direct PUT path."""

    def __init__(
        self, settings: Settings, client: object | None = None, credentials: object | None = None, *, named: str = ""
    ):
        self.bucket = settings.s3_bucket
        # What the user gave the bucket as, in every error about it: S3_BUCKET, or a command's --to s3://...
        self.named = named or f"S3_BUCKET {self.bucket!r}"
        self.conditional = True  # If-None-Match on PUT; off for a store that answers 501 to it
        self.settings = settings
        # The direct path (S3_DIRECT_PUT) learns the URL layout and signing region from boto3's first PUT.
        self.direct: DirectPut | None = None
        self._credentials: object | None = None
        self._sent = threading.local()
        self._learn_lock = threading.Lock()
        self._client: object | None = None
        self._client_lock = threading.Lock()
        self._learned = False  # the direct path was set up from the bucket check (no boto3 PUT to learn it from)
        if client is not None:
            self._adopt(client, credentials)

    @property
    def client(self) -> object:
        """boto3's client, made on first use: a rerun with nothing to PUT never imports boto3 (issue 16)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    import boto3

                    session = boto3.session.Session()
                    self._adopt(make_s3_client(self.settings, session=session), session.get_credentials())
        return self._client

    def _adopt(self, client: object, credentials: object | None) -> None:
        self._credentials = credentials if self.settings.s3_direct_put and not self._learned else None
        if self._credentials is not None:
            client.meta.events.register("before-send.s3.PutObject", self._note_sent)
        self._client = client

    def check(self) -> None:
        """Fail before any work, naming S3_BUCKET (or what `named` says), when the bucket is missing or not ours to use.

        A HEAD signed here answered 200 settles it without boto3; any other outcome is boto3's to judge and word.
        That HEAD's URL and signing are then the direct path's (S3_DIRECT_PUT) from the first PUT on: a run that
        stores images imports boto3 only for what the direct path hands over to it."""
        if self._client is None:
            answered = answered_bucket(self.settings)
            if answered is not None:
                if self.settings.s3_direct_put and self.direct is None:
                    base, credentials = answered
                    self.direct = DirectPut.to(base, self.settings.aws_region, credentials, self.settings, ca_bundle=_ca_file(None))
                    self._learned = True  # nothing to learn from boto3's first PUT, if it ever sends one
                return
        client = self.client  # made outside the try below: a client that cannot be made fails as it always did
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(f"{self.named} does not exist") from None
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(
                    f"{self.named}: access denied (check the AWS credentials and the bucket policy)"
                ) from None
            raise ConfigError(f"{self.named} cannot be used: {code or exc}") from None
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"{self.named} cannot be reached: {exc}") from None

    def put(self, key: str, body: bytes, content_type: str, sha256: str, *, replace: bool = False) -> bool:
        """One conditional PUT (If-None-Match: *): the normal case costs a single request, and an object an
        earlier run stored but did not record (it died before committing) is neither rewritten nor versioned
        again. Only when the key exists is it read back (HEAD) to compare checksums.

        The direct path sends that PUT when it can; whatever it does not handle (errors, throttling, a lost
        connection) goes to boto3 for this object, with boto3's retries and error parsing."""
        direct = self.direct
        conditional = self.conditional and not replace  # replace: the stored object failed a fixity check
        try:
            status = direct.put(key, body, content_type, sha256) if direct is not None and conditional else None
        except Exception as exc:  # keys from boto3's chain (SSO, a role) are refreshed as the PUT is signed
            errors = sys.modules.get("botocore.exceptions")  # loaded already if it raised this
            if errors is not None and isinstance(exc, (errors.BotoCoreError, errors.ClientError)):
                raise StoreError(f"S3 PUT {key} failed: {exc}") from exc
            raise
        if status == 200:
            return True  # the usual case, without boto3 (nor botocore: a first run may never import either)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if status == 412:  # the key exists: the same image (done), or other bytes, kept (KeyHeld)
                return self._held(key, body, sha256)
            if status in DirectPut.HANDED_OVER:
                # A redirect to another region, a signature or clock problem, a policy on headers: boto3 knows how
                # to deal with these (or to word them), so it sends every PUT from now on.
                log.info("S3 answered HTTP %s to a directly signed PUT; boto3 sends every PUT from now on", status)
                self.direct = None
            return self._boto3_put(key, body, content_type, sha256, replace=replace)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 PUT {key} failed: {exc}") from exc

    def _boto3_put(self, key: str, body: bytes, content_type: str, sha256: str, *, replace: bool) -> bool:
        from botocore.exceptions import ClientError

        # No ACL: objects stay private to the bucket owner.
        args = {"Bucket": self.bucket, "Key": key, "Body": body, "ContentType": content_type, "Metadata": {"sha256": sha256}}
        if self.conditional and not replace:
            try:
                self.client.put_object(**args, IfNoneMatch="*")
                self._learn(key)
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("NotImplemented", "501"):
                    if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                        raise
                    return self._held(key, body, sha256)
                log.info("the S3 endpoint does not support conditional writes; writing unconditionally")
                self.conditional = False
        if not replace and self._head(key) is not None:
            # An endpoint without conditional writes: a HEAD first keeps another run's object (a race remains
            # between the two requests, which only If-None-Match closes).
            return self._held(key, body, sha256)
        self.client.put_object(**args)
        return True

    def _note_sent(self, request: object, **kwargs: object) -> None:
        """botocore's before-send hook: remember (in this thread) the URL and Authorization it signed."""
        self._sent.request = (request.url, request.headers.get("Authorization"))

    def _learn(self, key: str) -> None:
        """After boto3 stored `key`, build the direct path from the request it sent (once per run)."""
        if self._credentials is None or self.direct is not None:
            return
        url, authorization = getattr(self._sent, "request", (None, None))
        with self._learn_lock:
            if self._credentials is None or self.direct is not None:
                return
            self.direct = DirectPut.learned(url, authorization, key, self._credentials, self.settings)
            self._credentials = None  # learned or not, once is enough
            self.client.meta.events.unregister("before-send.s3.PutObject", self._note_sent)

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _held(self, key: str, body: bytes, sha256: str) -> bool:
        """False when the object at `key` holds `body` (by its recorded checksum); KeyHeld when it holds others."""
        head = self._head(key) or {}  # gone since (a forget): other bytes no longer, but not ours to write either
        if head.get("Metadata", {}).get("sha256") == sha256 and head.get("ContentLength") == len(body):
            return False
        raise KeyHeld(key)

    def read(self, key: str) -> bytes:
        """The bytes of one object (one at a time: memory stays at one image per worker)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as body:
                return body.read()
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 GET {key} failed: {exc}") from exc

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- whole-object replacement (the Parquet export) -------------------------------------------

    def replace_from_file(self, key: str, src: Path, content_type: str) -> None:
        """One plain PUT of the file (S3 replaces an object atomically: readers see the old one or the new)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            with open(src, "rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StoreError(f"S3 PUT {key} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 DELETE {key} failed: {exc}") from exc

    def holds_any(self, prefix: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 LIST {prefix} failed: {exc}") from exc

    def describe(self) -> str:
        return f"s3://{self.bucket}/"


class SigV4:
    """Requests to one S3 base URL signed here by AWS Signature Version 4, as botocore's S3 signer signs them."""

    def __init__(self, base: str, region: str, credentials: object):
        self.base = base  # scheme://host[/bucket] without the trailing slash: "/" and the encoded key follow
        self.region = region
        self.credentials = credentials
        parts = urllib.parse.urlsplit(base)
        # The Host header as botocore signs it (and as it is sent): the name, and the port unless the scheme's own.
        self.host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else str(parts.hostname)
        if parts.port is not None and parts.port != (443 if parts.scheme == "https" else 80):
            self.host += f":{parts.port}"
        self.path = parts.path  # "/bucket" (path style) or "" (virtual-hosted)
        self._keys: dict[tuple[str, str], bytes] = {}  # (secret, day) -> signing key: four HMACs spared a PUT

    def signed(self, path: str, headers: dict[str, str], sha256: str, method: str = "PUT") -> dict[str, str]:
        """`headers` (lower-case names) with host, the date and the payload's hash added, signed for a `method` (PUT
        or HEAD) of `path` by AWS Signature Version 4 as botocore's S3 signer signs it (the path as sent, every
        header signed).

        The payload's hash is the image's own SHA-256, so S3 refuses a body that is not the one hashed
        (XAmzContentSHA256Mismatch): the integrity check a Content-MD5 made, with no second hash of the body.
        (A bucket that insists on Content-MD5, one with an Object Lock retention period, answers 400: the run then
        sends its PUTs through boto3, correct and slower.) botocore's signer took 0.1 ms a PUT (its request object,
        header maps, four HMACs for the key); this one keeps the day's signing key."""
        credentials = self.credentials.get_frozen_credentials()  # refreshed by botocore when they expire
        now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers = {**headers, "host": self.host, "x-amz-content-sha256": sha256, "x-amz-date": now}
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        names = sorted(headers)
        signed_names = ";".join(names)
        canonical = "\n".join((
            method, path, "", *(f"{name}:{' '.join(headers[name].split())}" for name in names), "", signed_names, sha256,
        ))  # fmt: skip
        scope = f"{now[:8]}/{self.region}/s3/aws4_request"
        text = f"AWS4-HMAC-SHA256\n{now}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(credentials.secret_key, now[:8]), text.encode(), "sha256").hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, SignedHeaders={signed_names}, Signature={signature}"
        )
        return headers

    def _signing_key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = f"AWS4{secret}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), "sha256").digest()
            if len(self._keys) > 4:
                self._keys.clear()  # yesterday's keys, or a rotated secret's
            self._keys[(secret, day)] = key
        return key


class DirectPut(SigV4):
    """Conditional PUTs signed here (SigV4, as botocore's S3 signer signs them) and sent over one urllib3 pool.

    put_object spends about 1.1 ms of CPU per call on its machinery (parameter validation, event hooks,
    endpoint rules, checksums, response parsing); this path costs about 0.5 ms for the same PUT, a new TCP
    connection included (0.75 ms with botocore's signer and a Content-MD5). What boto3 decides stays boto3's:
    the URL (virtual-hosted or path style, AWS_ENDPOINT_URL, the region's endpoint) and the signing region are
    read from a PUT boto3 itself sent and S3 accepted, and the credentials come from the same chain, refreshed
    as boto3 refreshes them. S3 checks the body's integrity (its signed SHA-256).
    `put` returns the HTTP status, or None when no answer came: the caller deals with 200 and 412 and hands
    everything else to boto3.
    """

    HANDED_OVER = frozenset({301, 307, 400, 403})  # after these, boto3 sends every PUT for the rest of the run

    def __init__(
        self, base: str, region: str, credentials: object, *, pool_size: int, timeout: tuple[float, float], ca_bundle: str = ""
    ):
        import urllib3

        super().__init__(base, region, credentials)
        kwargs: dict[str, object] = {}
        if base.startswith("https:"):
            if not ca_bundle:
                from botocore.httpsession import get_cert_path

                ca_bundle = get_cert_path(True)
            # The certificates boto3 trusts: AWS_CA_BUNDLE (or ca_bundle in the AWS config), else its default.
            kwargs.update(cert_reqs="CERT_REQUIRED", ca_certs=ca_bundle)
        self.pool = urllib3.connection_from_url(
            base, maxsize=pool_size, retries=False, timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]), **kwargs
        )  # the signed headers are the request's own: a pool's default headers would never be sent

    @classmethod
    def learned(
        cls, url: str | None, authorization: bytes | str | None, key: str, credentials: object, settings: Settings
    ) -> DirectPut | None:
        """The direct path for the PUT boto3 sent to `url` for `key`, or None where boto3 must do it all
        (anything but SigV4 in a header, a URL we cannot take apart, a proxy in the environment)."""
        from urllib.parse import quote, urlsplit, urlunsplit

        import botocore.session
        import requests

        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scope = (authorization or "").partition("Credential=")[2].partition(",")[0].split("/")
        if not (authorization or "").startswith("AWS4-HMAC-SHA256 ") or len(scope) != 5 or scope[3] != "s3":
            log.debug("no direct S3 PUTs: boto3 did not sign with SigV4 for s3")
            return None
        parts = urlsplit(url or "")
        suffix = "/" + quote(key, safe="/~")
        if parts.query or not parts.path.endswith(suffix):
            log.debug("no direct S3 PUTs: cannot find the key in %s", url)
            return None
        base = urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(suffix)], "", ""))
        if requests.utils.get_environ_proxies(base, no_proxy=None):
            log.debug("no direct S3 PUTs: a proxy applies to %s", base)
            return None
        ca_bundle = botocore.session.get_session().get_config_variable("ca_bundle") or ""
        return cls.to(base, scope[2], credentials, settings, ca_bundle=ca_bundle)

    @classmethod
    def to(cls, base: str, region: str, credentials: object, settings: Settings, *, ca_bundle: str) -> DirectPut:
        """The direct path to bucket URL `base`, signed for `region`, its pool and timeouts from the settings."""
        log.debug("direct S3 PUTs to %s, signed for %s", base, region)
        return cls(
            base, region, credentials, pool_size=settings.concurrency + 4,
            timeout=(settings.connect_timeout, settings.read_timeout), ca_bundle=ca_bundle,
        )  # fmt: skip

    def put(self, key: str, body: bytes, content_type: str, sha256: str) -> int | None:
        import urllib3

        # The key is encoded as botocore encodes it ('/' and '~' kept), and signed as it is sent.
        path = self.path + "/" + urllib.parse.quote(key, safe="/~")
        headers = self.signed(path, {"content-type": content_type, "if-none-match": "*", "x-amz-meta-sha256": sha256}, sha256)
        try:
            response = self.pool.urlopen(
                "PUT", path, body=body, headers=headers, retries=False, redirect=False, assert_same_host=False
            )
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out: boto3 tries it again
            log.debug("direct S3 PUT %s: %s", key, exc)
            return None
        return response.status


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")  # botocore's check of a region name
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules; botocore refuses others before sending
# The AWS_ variables a plain set-up has: none of them changes where boto3 sends a HEAD of the bucket, or how.
_PLAIN_AWS = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
})  # fmt: skip


class _EnvCredentials:
    """Keys from the environment, as botocore's first provider reads them (they never expire)."""

    def __init__(self, access_key: str, secret_key: str, token: str | None):
        self.access_key, self.secret_key, self.token = access_key, secret_key, token

    def get_frozen_credentials(self) -> _EnvCredentials:
        return self

    def __repr__(self) -> str:
        return "_EnvCredentials(...)"  # the secret stays out of any traceback or log


def plain_bucket_url(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[str, object] | None:
    """The URL boto3 would send a HEAD of the bucket to, and the keys it would sign with, when both can be known
    without boto3: keys plainly in the environment (botocore's first provider), AWS_REGION, AWS_ENDPOINT_URL
    (then boto3 addresses the bucket path-style), no other AWS_ variable, no proxy, and no config file that
    says more than a region. None otherwise: profiles, SSO, instance roles and every other set-up are boto3's."""
    env = os.environ if environ is None else environ
    # Any other AWS_ variable, even empty (boto3 refuses an empty AWS_PROFILE), and an empty or malformed plain one.
    if any(name.startswith("AWS_") and (name not in _PLAIN_AWS or not _plain_value(name, env[name])) for name in env):
        return None
    if any(name.lower().endswith("_proxy") and name.lower() != "no_proxy" and env[name] for name in env):
        return None
    if environ is None and sys.platform in ("darwin", "win32"):  # boto3 also takes the system's proxy settings
        from urllib.request import getproxies

        if any(scheme != "no" for scheme in getproxies()):
            return None
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    endpoint = env.get("AWS_ENDPOINT_URL")
    if not (access and secret and endpoint and _BUCKET_NAME.fullmatch(settings.s3_bucket)):
        return None
    if not _REGION.fullmatch(settings.aws_region) or not endpoint.isprintable() or " " in endpoint:
        return None  # botocore refuses such a region, or such an endpoint (urlsplit would drop a newline)
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or not _config_says_no_more(env):
        return None
    return f"{parts.scheme}://{parts.netloc}/{settings.s3_bucket}", _EnvCredentials(
        access, secret, env.get("AWS_SESSION_TOKEN") or None
    )


def _plain_value(name: str, value: str) -> bool:
    """Whether a variable of _PLAIN_AWS holds a value boto3 takes as it is (an empty session token means none)."""
    if name == "AWS_SESSION_TOKEN":
        return True
    if name == "AWS_MAX_ATTEMPTS":
        return value.isdigit()
    if name == "AWS_RETRY_MODE":
        return value in ("legacy", "standard", "adaptive")
    return bool(value)


def _config_says_no_more(env: Mapping[str, str]) -> bool:
    """Whether the AWS config file and the shared credentials file (botocore merges both into its profiles) are
    absent or give the default profile nothing but a region, an output and, in the credentials file, keys."""
    keys = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
    return _default_profile_within(env.get("AWS_CONFIG_FILE") or "~/.aws/config", {"region", "output"}) and (
        _default_profile_within(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", {"region", "output", *keys})
    )


def _default_profile_within(name: str, allowed: set[str]) -> bool:
    import configparser

    path = Path(name).expanduser()
    if not path.exists():
        return True
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return False  # boto3 reads it and words what is wrong
    return all(set(parser[name]) <= allowed for name in ("default", "profile default") if parser.has_section(name))


def answered_bucket(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[str, object] | None:
    """When a HEAD of S3_BUCKET, signed here, got 200 (the bucket is there and these keys may use it): the bucket's
    URL and the keys it was signed with.

    None for anything else, and when the set-up is not plain (plain_bucket_url): boto3 then asks again and words
    the answer (missing bucket, denied, a redirect, an unreachable endpoint) as it always has."""
    plain = plain_bucket_url(settings, environ)
    if plain is None:
        return None
    import http.client

    base, credentials = plain
    signer = SigV4(base, settings.aws_region, credentials)
    parts = urllib.parse.urlsplit(base)
    if parts.scheme == "https":
        context = _boto3_tls_context(environ)
        if context is None:
            return None
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=settings.connect_timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=settings.connect_timeout)
    try:
        conn.connect()
        conn.sock.settimeout(settings.read_timeout)
        conn.request("HEAD", signer.path, headers=signer.signed(signer.path, {}, EMPTY_SHA256, "HEAD"))
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        log.debug("HEAD of the bucket signed here: %s; boto3 asks again", type(exc).__name__)
        return None
    finally:
        conn.close()
    if status != 200:
        log.debug("HEAD of the bucket signed here: HTTP %s; boto3 asks again", status)
        return None
    return plain


def _ca_file(environ: Mapping[str, str] | None) -> str:
    """The certificates boto3 trusts: AWS_CA_BUNDLE, else certifi's (botocore's default); "" if neither."""
    cafile = (os.environ if environ is None else environ).get("AWS_CA_BUNDLE")
    if not cafile:
        try:
            import certifi
        except ImportError:
            return ""
        cafile = certifi.where()
    return cafile


def _boto3_tls_context(environ: Mapping[str, str] | None) -> object | None:
    """An SSL context over _ca_file(); None when there is none or it cannot be read."""
    import ssl

    cafile = _ca_file(environ)
    if not cafile:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError):
        return None  # boto3 says what is wrong with the bundle


def make_s3_client(settings: Settings, pool_size: int | None = None, session: object | None = None) -> object:
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
    return (session or boto3.session.Session()).client("s3", region_name=settings.aws_region or None, config=config)


def store_from_settings(settings: Settings) -> ObjectStore:
    if settings.s3_bucket:
        return S3Store(settings)
    return LocalStore(settings.objects_dir)
