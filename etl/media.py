"""Image download: URL guard, streamed body under a size cap, real-image check, checksums, retries."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image

from etl.config import Settings
from etl.errors import MediaError
from etl.http import Retriable, RetryPolicy, is_retriable_status, make_session, retry_after_seconds

log = logging.getLogger(__name__)

# Pillow format -> the content type we store (and the key's extension through store.EXTENSIONS).
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
MAX_PIXELS = 100_000_000  # refuse decompression bombs
PERMANENT_STATUSES = {404, 410}


@dataclass(frozen=True)
class Fetched:
    """A downloaded, verified image."""

    body: bytes
    content_type: str
    sha256: str
    width: int
    height: int
    final_url: str


class URLGuard:
    """Refuses URLs an archiver must not fetch: other schemes, and hosts on loopback, private, link-local,
    multicast or reserved addresses (169.254.169.254 is the cloud's credential service), unless allowed."""

    def __init__(self, *, allow_private: bool = False, trusted: Iterable[str] = (), resolve=socket.getaddrinfo):
        self.allow_private = allow_private
        self.trusted = set(trusted)  # host:port pairs the run itself serves (the mock source)
        self.resolve = resolve

    def check(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise MediaError(f"malformed URL {url[:200]!r}", permanent=True) from None
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"refused URL scheme {parts.scheme or '(none)'!r}: only http and https", permanent=True)
        host = parts.hostname
        if not host:
            raise MediaError(f"URL has no host: {url[:200]!r}", permanent=True)
        port = port or (443 if parts.scheme == "https" else 80)
        if self.allow_private or f"{host}:{port}" in self.trusted:
            return
        try:
            addresses = {info[4][0] for info in self.resolve(host, port, proto=socket.IPPROTO_TCP)}
        except (socket.gaierror, UnicodeError) as exc:
            raise MediaError(f"cannot resolve host {host!r}: {exc}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                raise MediaError(
                    f"refused host {host!r}: it resolves to the non-public address {ip}"
                    " (set ETL_ALLOW_PRIVATE_HOSTS=true for on-premises mirrors)",
                    permanent=True,
                )


def sniff_image(body: bytes) -> tuple[str, int, int]:
    """(content type, width, height) of a complete image; MediaError when the bytes are not one."""
    if body[:15].lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise MediaError("not an image: the body is HTML/XML", permanent=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as img:
                fmt = img.format
                width, height = img.size
                if fmt not in FORMATS:
                    raise MediaError(f"unsupported image format {fmt}", permanent=True)
                if width * height > MAX_PIXELS:
                    raise MediaError(f"image of {width}x{height} pixels is too large", permanent=True)
                img.load()  # a full decode: a truncated image fails here
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError("image refused as a decompression bomb", permanent=True) from None
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise MediaError(f"not a valid image: {exc}", permanent=True) from None
    return FORMATS[fmt], width, height


class Downloader:
    """Fetches images over one pooled session; thread-safe for use from the pipeline's pool."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        policy: RetryPolicy | None = None,
        guard: URLGuard | None = None,
    ):
        self.max_bytes = settings.max_image_bytes
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.max_redirects = settings.max_redirects
        self.session = session or make_session(settings.concurrency + 4)
        self.policy = policy or RetryPolicy.from_settings(settings)
        self.guard = guard or URLGuard(allow_private=settings.allow_private_hosts)

    def fetch(self, url: str) -> Fetched:
        """Download and verify one image; MediaError (with .permanent) when it cannot be had."""
        try:
            return self.policy.call(lambda: self._attempt(url), describe=f"image {url[:120]}")
        except Retriable as exc:
            raise MediaError(f"gave up after {self.policy.attempts} attempts: {exc}") from None
        except requests.Timeout as exc:
            raise MediaError(f"timed out after {self.policy.attempts} attempts: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise MediaError(f"network error after {self.policy.attempts} attempts: {type(exc).__name__}: {exc}") from None

    def _attempt(self, url: str) -> Fetched:
        current = url
        for _ in range(self.max_redirects + 1):
            self.guard.check(current)
            response = self.session.get(current, stream=True, timeout=self.timeout, allow_redirects=False)
            with response:
                if response.is_redirect:
                    location = response.headers.get("Location")
                    if not location:
                        raise MediaError(f"HTTP {response.status_code} redirect without a Location", permanent=True)
                    current = urljoin(current, location)
                    continue  # the next hop is checked again by the guard
                return self._read(current, response)
        raise MediaError(f"more than {self.max_redirects} redirects", permanent=True)

    def _read(self, url: str, response: requests.Response) -> Fetched:
        status = response.status_code
        if is_retriable_status(status):
            raise Retriable(f"HTTP {status}", retry_after=retry_after_seconds(response))
        if status != 200:
            raise MediaError(f"HTTP {status}", permanent=status in PERMANENT_STATUSES)
        declared = response.headers.get("Content-Length")
        expected = int(declared) if declared and declared.strip().isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise MediaError(f"image of {expected} bytes is over the {self.max_bytes}-byte cap", permanent=True)
        digest = hashlib.sha256()
        chunks = []
        size = 0
        # The cap counts bytes as they arrive (decoded, should a host gzip an image), so it holds without
        # a Content-Length too; a connection cut mid-body surfaces as a requests error, which is retried.
        for chunk in response.iter_content(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise MediaError(f"image is over the {self.max_bytes}-byte cap", permanent=True)
            digest.update(chunk)
            chunks.append(chunk)
        if expected is not None and size != expected and not response.headers.get("Content-Encoding"):
            raise Retriable(f"truncated body: {size} of {expected} bytes")
        body = b"".join(chunks)
        content_type, width, height = sniff_image(body)
        return Fetched(body, content_type, digest.hexdigest(), width, height, url)
