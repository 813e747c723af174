"""Image download: URL guard, streamed body under a size cap, real-image check, checksums, retries."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from etl.config import Settings
from etl.errors import MediaError
from etl.http import (
    RawResponse,
    Retriable,
    RetryPolicy,
    WaitTooLong,
    direct_get,
    header_number,
    is_retriable_status,
    make_session,
    retry_after_seconds,
    set_deadline,
)
from etl.lazy import requests, urllib3  # imported on first use: a run without HTTP never loads them

log = logging.getLogger(__name__)

# Pillow format -> the content type we store (and the key's extension through store.EXTENSIONS).
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
# Pillow formats that are one of those: a JPEG carrying a Multi-Picture index (MPF: phone cameras' depth maps,
# HDR gain maps, stereo pairs) opens as "MPO", and every viewer shows its first picture, a baseline JPEG.
_SAME_AS = {"MPO": "JPEG"}
MAX_PIXELS = 100_000_000  # refuse decompression bombs
PERMANENT_STATUSES = {404, 410}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
CHUNK_BYTES = 64 * 1024
MAX_ADDRESSES = 4  # of a host's vetted addresses, tried in turn when one cannot be reached
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_MARKUP = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<svg", b"<!--")
_SVG = re.compile(rb"<svg[\s>/]", re.IGNORECASE)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
# Bytes per pixel a full decode holds at its peak (measured with Pillow 13): WebP goes through libwebp's RGBA
# buffer, a bytes copy and the image (about 16); a GIF frame is one byte a pixel plus Pillow's working copy.
_DECODE_BYTES_PER_PIXEL = {"WEBP": 16, "GIF": 2}
DEFAULT_DECODE_MEMORY = 256 * 1024 * 1024

Resolver = Callable[..., list]


@dataclass(frozen=True)
class Fetched:
    """A downloaded, verified image."""

    body: bytes
    content_type: str
    sha256: str
    width: int
    height: int
    final_url: str


class NotAnImage(MediaError):
    """The bytes are not a complete image of a supported format."""

    def __init__(self, message: str):
        super().__init__(message, permanent=True)


def _userinfo_end(rest: str) -> int:
    """Where the user-info of a URL's text after "//" ends (the index of its "@"), or -1 when it has none.

    RFC 3986 ends the authority at the first "/", "?" or "#", and the user-info at its last "@". People paste
    passwords with those characters unescaped (`user:hunter2#pw@host/x.png`): urlsplit then takes
    `user:hunter2` for a host with a port that is no number, and the password for the fragment. So when the
    authority so ended is no valid host[:port] and an "@" follows, the "@" that ends the user-info is the last
    one before the first "/" after the first "@" (the path starts there). A valid host[:port] keeps any later
    "@" in its path, query or fragment (`https://host/@user/1.png`). Not etl.config's _userinfo: libpq ends a
    user at the first "@" and the authority at the first "/", which misses a password holding "/".
    """
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at >= 0 or "@" not in rest[end:] or _is_host_and_port(rest[:end]):
        return at
    slash = rest.find("/", rest.index("@", end))
    return rest.rfind("@", 0, slash if slash >= 0 else len(rest))


def _is_host_and_port(authority: str) -> bool:
    try:
        urlsplit(f"//{authority}").port  # noqa: B018 - read for the ValueError it raises
    except ValueError:  # a port that is no number (or out of range), an unclosed "["
        return False
    return True


def has_userinfo(url: str) -> bool:
    """Whether the URL carries `user[:password]@` (see _userinfo_end), even with a password urlsplit misreads."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and _userinfo_end(rest) >= 0


def without_userinfo(url: str) -> str:
    """The URL with any `user:password@` removed from its authority (for storing and logging), a password
    holding an unescaped "/", "?" or "#" too."""
    scheme, sep, rest = url.partition("://")
    at = _userinfo_end(rest) if sep else -1
    if at < 0:
        return url
    return f"{scheme}://{rest[at + 1 :]}"


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a global unicast address; IPv4 carried inside IPv6 (mapped, 6to4, NAT64) is judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class URLGuard:
    """Refuses URLs an archiver must not fetch: other schemes, and hosts on loopback, private, link-local,
    multicast or reserved addresses (169.254.169.254 is the cloud's credential service), unless allowed.

    `check` resolves the host once and returns the vetted addresses; the downloader connects to one of
    them, so a DNS answer that changes between the check and the connection (rebinding) cannot slip by.
    """

    def __init__(
        self, *, allow_private: bool = False, trusted: Iterable[str] = (), resolve: Resolver = socket.getaddrinfo
    ):
        self.allow_private = allow_private
        self.trusted = set(trusted)  # host:port pairs the run itself serves (the mock source)
        self.resolve = resolve

    def check(self, url: str) -> list[str]:
        """The addresses `url` may be fetched from, in the resolver's order; MediaError when it must not be."""
        if has_userinfo(url):
            # user:password@host would be sent (as Basic auth) to whoever serves the image: refused before
            # any request, and for good (the URL will not change by itself). Before urlsplit, which takes a
            # password holding "#", "?" or "/" for a malformed port and would have the message echo it.
            raise MediaError("refused URL with credentials (user-info) in it: nothing was sent", permanent=True)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise MediaError(f"malformed URL {without_userinfo(url)[:200]!r}", permanent=True) from None
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"refused URL scheme {parts.scheme or '(none)'!r}: only http and https", permanent=True)
        host = parts.hostname
        if not host:
            raise MediaError(f"URL has no host: {without_userinfo(url)[:200]!r}", permanent=True)
        port = port or (443 if parts.scheme == "https" else 80)
        addresses = self._addresses(host, port)
        if self.allow_private or f"{host}:{port}" in self.trusted:
            return addresses
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not is_public_address(ip):
                # Not permanent: the refusal is this configuration's, and a later run with
                # ETL_ALLOW_PRIVATE_HOSTS=true (or a DNS fix) may fetch it. A refusal costs no request.
                raise MediaError(
                    f"refused host {host!r}: it resolves to the non-public address {ip}"
                    " (set ETL_ALLOW_PRIVATE_HOSTS=true for on-premises mirrors)",
                    requested=False,
                )
        return addresses

    def _addresses(self, host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]  # a literal: nothing to resolve
        except ValueError:
            pass
        try:
            infos = self.resolve(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise MediaError(f"cannot resolve host {host!r}: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise MediaError(f"cannot resolve host {host!r}: no addresses")
        return addresses


class DecodeBudget:
    """Memory (bytes) that image decodes may hold at once, shared by the download threads.

    A decode reserves what it will need before it starts and waits while the others hold too much; one
    that needs more than the whole budget waits until it can run alone. So however many images are checked
    at once, their decodes stay within the budget (or within the single largest decode).
    """

    def __init__(self, total: int = DEFAULT_DECODE_MEMORY):
        self.total = total
        self._used = 0
        self._free = threading.Condition()

    @contextmanager
    def reserve(self, need: int) -> Iterator[None]:
        need = max(0, min(need, self.total))
        with self._free:
            while self._used + need > self.total:
                self._free.wait()
            self._used += need
        try:
            yield
        finally:
            with self._free:
                self._used -= need
                self._free.notify_all()

    @property
    def used(self) -> int:
        return self._used


_DEFAULT_BUDGET = DecodeBudget()
_pillow_ready = threading.Lock()
_pillow_configured = False


def _pillow() -> object:
    """PIL.Image, with Pillow's own pixel limit set to ours (once).

    Pillow warns above 89.5 Mpx (DecompressionBombWarning) and refuses above twice that. Warnings are
    per-process state: catching them from worker threads races, so the same image got different verdicts.
    With Pillow's limit at MAX_PIXELS, nothing under our cap ever warns, and our own check below decides.
    """
    global _pillow_configured
    from PIL import Image  # here, not at the top: a run without images to fetch never needs Pillow

    if not _pillow_configured:
        with _pillow_ready:
            if not _pillow_configured:
                Image.MAX_IMAGE_PIXELS = MAX_PIXELS
                _unmap_freed_decode_buffers()
                _pillow_configured = True
    return Image


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's <malloc.h>
_MMAP_THRESHOLD = 1024 * 1024


def _unmap_freed_decode_buffers() -> None:
    """Make glibc map every block of 1 MB or more on its own, so a decode's buffers leave memory when freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB); after that, decode
    buffers come from the freeing thread's malloc arena and stay resident there once freed. The decode
    budget bounds what decodes hold at once, but with 16 download threads each arena kept its own thread's
    last decode, and the run's peak RSS grew with the number of threads that had decoded (twelve 2000x2000
    WebPs, 100 MB budget: 359-484 MB, against 207 MB with this). A threshold set by mallopt is fixed, so
    freed buffers are unmapped at once. Elsewhere (musl, macOS) nothing is changed.
    """
    import ctypes  # here: only a run that checks an image needs it

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed decode buffers may stay resident")


def _reason(exc: BaseException) -> str:
    """An exception's message fit for people: no object reprs (`<_io.BytesIO object at 0x...>`), never empty."""
    text = _OBJECT_REPR.sub("the data", str(exc)).strip()
    return text or type(exc).__name__


def decode_bytes(fmt: str, mode: str, width: int, height: int, *, progressive: bool = False) -> int:
    """Memory a full decode of this image holds at its peak, in bytes (an estimate on the safe side)."""
    bands = max(1, len(mode)) if mode not in ("1", "P", "L") else 1
    if fmt == "JPEG":
        # Decoded at 1/8 scale (see sniff_image), but a progressive JPEG keeps every DCT coefficient of the
        # whole image (two bytes per sample) in memory, whatever the scale.
        scaled = -(-width // 8) * -(-height // 8) * bands
        return scaled + (width * height * bands * 2 if progressive else 0)
    return width * height * _DECODE_BYTES_PER_PIXEL.get(fmt, 4 * bands)


def sniff_image(body: bytes, budget: DecodeBudget | None = None) -> tuple[str, int, int]:
    """(content type, width, height) of a complete image; MediaError when the bytes are not one.

    Memory stays bounded whatever the image declares: the pixel count is checked from the header before
    anything is decoded; PNGs are checked by their checksums without building the image; JPEGs are decoded
    at 1/8 scale; a WebP whose decode would not fit in the budget is checked by its structure instead; every
    decode first reserves its memory from `budget`, so concurrent checks cannot add up past it.
    """
    Image = _pillow()  # noqa: N806 - the module, named as Pillow's users expect
    budget = budget or _DEFAULT_BUDGET
    head = body[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.lower().startswith(_MARKUP):
        if _SVG.search(body[:8192]):
            raise MediaError("not an image: the body is HTML/XML markup (an SVG drawing: SVG is not accepted)", permanent=True)
        raise MediaError("not an image: the body is HTML/XML", permanent=True)
    width = height = 0
    try:
        with Image.open(io.BytesIO(body)) as img:
            fmt = _SAME_AS.get(img.format, img.format)
            width, height = img.size
            if fmt not in FORMATS:
                raise MediaError(f"unsupported image format {fmt}", permanent=True)
            if width * height > MAX_PIXELS:
                raise MediaError(f"image of {width}x{height} pixels is too large", permanent=True)
            need: int | None = None  # memory of a full decode; None: checked without one
            if fmt == "PNG":
                check_png(body)  # the file's own checksums: under half the cost of decoding it
            elif fmt == "JPEG":
                check_jpeg(body)  # its segments and scan data walked to the end: a tenth of a 1/8-scale decode
            else:
                if fmt == "GIF":
                    check_gif(body)  # its blocks walked to the trailer: the decode below reads the first frame only
                progressive = bool(img.info.get("progressive") or img.info.get("progression"))
                need = decode_bytes(fmt, img.mode, width, height, progressive=progressive)
                if fmt == "WEBP" and need > budget.total:
                    check_webp(body, width, height)  # Pillow cannot decode a WebP at reduced size
                    need = None
        del img  # the header check's image: a WebP's holds libwebp's canvases (allocated, never touched)
        if need is not None:
            with budget.reserve(need):
                _decode(Image, body, fmt)  # its memory is freed when it returns, inside the reservation
    except MediaError:
        raise
    except MemoryError:
        # Resource exhaustion says nothing about the image: a later run, with memory to spare, checks it again.
        size = f"{width}x{height} " if width else ""
        raise MediaError(f"out of memory while checking the {size}image; left for the next run") from None
    except Image.UnidentifiedImageError:
        raise NotAnImage("not a valid image: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError("image refused as a decompression bomb", permanent=True) from None
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise NotAnImage(f"not a valid image: {_reason(exc)}") from None
    return FORMATS[fmt], width, height


def _decode(Image: object, body: bytes, fmt: str) -> None:  # noqa: N803 - PIL.Image, as in sniff_image
    """Decode the image in full (PNGs and JPEGs are checked by their structure instead); a truncated or corrupt
    image fails here.

    The image is opened here, not reused from the header check, so that everything the decode holds (the
    pixels, libwebp's canvases, which live as long as the image object) is freed when this returns: the
    caller's reservation must outlast the memory, or another thread's decode starts while it is still held.
    """
    img = Image.open(io.BytesIO(body), formats=[fmt])
    try:
        img.load()
    finally:
        img.close()
        del img  # even while an exception's traceback keeps this frame


def check_gif(body: bytes) -> None:
    """NotAnImage unless the GIF is whole: its blocks (extensions, image descriptors with their colour tables and
    data sub-blocks) lie inside the file and end with the trailer (0x3B), after one image at least. Pillow's
    load() decodes the first frame only: an animated GIF cut after it passed as a whole image."""
    size = len(body)
    if size < 13 or body[:6] not in (b"GIF87a", b"GIF89a"):
        raise NotAnImage("not a valid image: no GIF header")
    pos = 13 + (3 << ((body[10] & 7) + 1) if body[10] & 0x80 else 0)  # the global colour table
    images = 0
    while pos < size:
        block = body[pos]
        if block == 0x3B:
            if not images:
                raise NotAnImage("not a valid image: the GIF ends before any image")
            return
        if block == 0x21:  # an extension: its label, then data sub-blocks
            pos += 2
        elif block == 0x2C:  # an image: its descriptor, local colour table, LZW code size, then data sub-blocks
            if pos + 10 > size:
                break
            flags = body[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            images += 1
        else:
            raise NotAnImage(f"not a valid image: the GIF's blocks are damaged at byte {pos}")
        while pos < size and body[pos]:  # sub-blocks, each its length then its bytes, until a zero length
            pos += 1 + body[pos]
        pos += 1
    raise NotAnImage(f"not a valid image: GIF cut short (no trailer; {size} bytes)")


def check_webp(body: bytes, width: int, height: int) -> None:
    """NotAnImage unless the WebP container is whole and its bitstream header agrees with the declared size.

    Used where a full decode would not fit in the decode budget (Pillow has no reduced-size WebP decode): the
    RIFF length must match the body, every chunk must lie inside it, and the VP8/VP8L/VP8X header must be
    sound. A body cut short fails; damage inside the compressed pixels of such a large image is not seen.
    """
    if len(body) < 20 or body[:4] != b"RIFF" or body[8:12] != b"WEBP":
        raise NotAnImage("not a valid image: no WebP RIFF header")
    declared = int.from_bytes(body[4:8], "little") + 8
    if declared != len(body):
        raise NotAnImage(f"not a valid image: the WebP declares {declared} bytes but has {len(body)}")
    pos, kinds = 12, []
    while pos < len(body):
        if pos + 8 > len(body):
            raise NotAnImage(f"not a valid image: WebP cut short at byte {pos}")
        kind, size = body[pos : pos + 4], int.from_bytes(body[pos + 4 : pos + 8], "little")
        data = body[pos + 8 : pos + 8 + size]
        if len(data) != size:
            raise NotAnImage(f"not a valid image: the WebP's {kind!r} chunk is cut short")
        kinds.append(kind)
        if kind == b"VP8L" and (size < 5 or data[0] != 0x2F or _vp8l_size(data) != (width, height)):
            raise NotAnImage("not a valid image: the WebP's lossless header is damaged")
        if kind == b"VP8 " and (size < 10 or data[3:6] != b"\x9d\x01\x2a"):
            raise NotAnImage("not a valid image: the WebP's lossy header is damaged")
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if not {b"VP8 ", b"VP8L", b"ANMF"} & set(kinds):
        raise NotAnImage("not a valid image: the WebP holds no image data")


# In a JPEG's entropy-coded data, 0xFF is followed by 0x00 (a stuffed byte), by RST0-7 or by another 0xFF (fill);
# anything else is a marker: EOI, or in a progressive file the tables and the next scan.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length follows


def check_jpeg(body: bytes) -> None:
    """NotAnImage unless the JPEG is whole: every segment lies inside the file and the scan data runs on to an
    EOI marker (bytes after it are ignored, as decoders ignore them).

    This refuses what the 1/8-scale decode it replaces refused (measured on baseline and progressive files: a
    file cut anywhere, or missing its EOI; header damage Pillow's header parse does not see first), at a tenth
    of the CPU; like that decode it cannot see a flipped bit inside the compressed pixels (libjpeg decodes
    those without an error). Pillow has read the frame header (SOF) and the size before this runs.
    """
    size = len(body)
    if body[:2] != b"\xff\xd8":
        raise NotAnImage("not a valid image: no JPEG start marker")
    pos, scans = 2, 0
    components: set[int] = set()
    damaged: dict[tuple[int, int], bool] = {}  # Huffman tables by (class, slot): whether libjpeg would refuse it
    while True:
        while pos < size and body[pos] == 0xFF and pos + 1 < size and body[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > size:
            raise NotAnImage(f"not a valid image: JPEG cut short at byte {pos} (no EOI)")
        if body[pos] != 0xFF:  # extraneous bytes before a marker: libjpeg warns and skips them, so do we
            pos = body.find(b"\xff", pos)
            if pos < 0:
                raise NotAnImage("not a valid image: JPEG cut short (no EOI)")
            continue
        marker = body[pos + 1]
        if marker == 0x00:  # a stuffed zero among stray bytes: no marker, libjpeg skips it with them
            pos += 2
            continue
        if marker == 0xD9:
            if not scans:
                raise NotAnImage("not a valid image: the JPEG ends before any image data")
            return
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xD8 or pos + 4 > size:
            raise NotAnImage(f"not a valid image: the JPEG's segments are damaged or cut short at byte {pos}")
        end = pos + 2 + int.from_bytes(body[pos + 2 : pos + 4], "big")
        if end > size or end < pos + 4:
            raise NotAnImage(f"not a valid image: the JPEG's segment at byte {pos} is cut short")
        if marker == 0xC4:
            damaged.update(_check_huffman_tables(body[pos + 4 : end], pos))
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            components = _check_frame(body[pos + 4 : end], pos)
        elif marker == 0xDA:
            _check_scan(body[pos + 4 : end], pos, components, damaged)
        pos = end
        if marker == 0xDA:  # start of scan: compressed data up to the next marker
            scans += 1
            found = _JPEG_MARKER.search(body, pos)
            if found is None:
                raise NotAnImage("not a valid image: JPEG cut short inside its image data (no EOI)")
            pos = found.start()


def _check_frame(data: bytes, at: int) -> set[int]:
    """The frame header (SOF) as libjpeg checks it: 1-4 components (each sampled 1-4 times, with a table 0-3),
    a length that fits them; returns the component ids."""
    count = data[5] if len(data) > 5 else 0
    if not 1 <= count <= 4 or len(data) != 6 + 3 * count:
        raise NotAnImage(f"not a valid image: the JPEG's frame header at byte {at} is damaged")
    ids = set()
    for i in range(6, 6 + 3 * count, 3):
        sampling, table = data[i + 1], data[i + 2]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 0x0F <= 4) or table > 3:
            raise NotAnImage(f"not a valid image: the JPEG's frame header at byte {at} is damaged")
        ids.add(data[i])
    return ids


def _check_scan(data: bytes, at: int, components: set[int], damaged: dict[tuple[int, int], bool]) -> None:
    """A scan header (SOS): 1-4 components of the frame, Huffman slots 0-3, a length that fits them; the Huffman
    tables it decodes with are whole (libjpeg builds, and checks, only the tables a scan uses)."""
    count = data[0] if data else 0
    if not 1 <= count <= 4 or len(data) != 4 + 2 * count:
        raise NotAnImage(f"not a valid image: the JPEG's scan header at byte {at} is damaged")
    first, last = data[1 + 2 * count], data[2 + 2 * count]  # spectral selection: DC (0) and/or AC (1..63)
    for i in range(1, 1 + 2 * count, 2):
        dc, ac = data[i + 1] >> 4, data[i + 1] & 0x0F
        if data[i] not in components or dc > 3 or ac > 3:
            raise NotAnImage(f"not a valid image: the JPEG's scan header at byte {at} is damaged")
        if (first == 0 and damaged.get((0, dc))) or (last > 0 and damaged.get((1, ac))):
            raise NotAnImage(f"not a valid image: a Huffman table of the JPEG's scan at byte {at} is damaged")


def _check_huffman_tables(data: bytes, at: int) -> dict[tuple[int, int], bool]:
    """A DHT segment's tables as libjpeg reads them: class 0/1 and slot 0-3, at most 256 codes, nothing left over
    (refused here); and, by (class, slot), whether a table is one libjpeg would refuse once a scan uses it (code
    lengths that overflow the code space, a DC symbol over 15)."""
    tables = {}
    pos = 0
    while pos < len(data):
        if pos + 17 > len(data):
            raise NotAnImage(f"not a valid image: the JPEG's Huffman table at byte {at} is cut short")
        kind, counts = data[pos], data[pos + 1 : pos + 17]
        total = sum(counts)
        symbols = data[pos + 17 : pos + 17 + total]
        code, overflow = 0, False
        for length, count in enumerate(counts, 1):  # canonical codes, as libjpeg builds them: none may run out
            code += count
            overflow = overflow or (count > 0 and code >= 1 << length)
            code <<= 1
        if kind >> 4 > 1 or kind & 0x0F > 3 or total > 256 or len(symbols) != total:
            raise NotAnImage(f"not a valid image: the JPEG's Huffman table at byte {at} is damaged")
        tables[(kind >> 4, kind & 0x0F)] = overflow or (kind >> 4 == 0 and any(s > 15 for s in symbols))
        pos += 17 + total
    return tables


def _vp8l_size(data: bytes) -> tuple[int, int]:
    bits = int.from_bytes(data[1:5], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_INFLATE_STEP = 1 << 20
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey + alpha, RGBA
# Adam7's seven passes of an interlaced PNG: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png(body: bytes) -> None:
    """NotAnImage unless the PNG is whole: every chunk's CRC-32 holds, the image data (IDAT) inflates to the
    end of its zlib stream and to as many bytes as the header's rows need, and IEND closes the file.

    A truncated or altered file fails a checksum or ends early. The pixels are inflated (and thrown away) but
    not unfiltered into an image: 0.45 ms instead of Pillow's 1.03 ms for the benchmark's 200x150 PNGs. The
    pixel count has been checked against MAX_PIXELS before, from the header. Nothing past the header's rows
    is inflated: Pillow and libpng stop there too, and a 1x1 PNG's 8 MB of deflated zeros inflate to 8 GB.
    """
    if not body.startswith(_PNG_SIGNATURE):
        raise NotAnImage("not a valid image: no PNG signature")
    view = memoryview(body)
    pixels: _PngImageData | None = None
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(body):
            raise NotAnImage(f"not a valid image: PNG cut short at byte {pos} (no IEND)")
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(body):
            raise NotAnImage(f"not a valid image: PNG cut short inside its {kind!r} chunk")
        data = view[pos + 8 : end]
        if zlib.crc32(data, zlib.crc32(kind)) != int.from_bytes(view[end : end + 4], "big"):
            raise NotAnImage(f"not a valid image: the PNG's {kind!r} chunk at byte {pos} fails its CRC")
        if kind == b"IHDR" and pixels is None:
            pixels = _PngImageData(_png_image_bytes(data))
        elif kind == b"IDAT":
            if pixels is None:
                raise NotAnImage("not a valid image: the PNG's image data comes before its header")
            pixels.feed(data)
        elif kind == b"IEND":
            break
        pos = end + 4
    if pixels is None or not pixels.started:
        raise NotAnImage("not a valid image: the PNG has no image data")
    pixels.check_whole()


def _png_image_bytes(ihdr: memoryview) -> int:
    """Bytes the image data of a PNG with this header inflates to: each row's filter byte and its pixels'
    bits rounded up to a byte, for the whole image or for each of an interlaced image's seven passes."""
    if len(ihdr) != 13:
        raise NotAnImage("not a valid image: the PNG's header is damaged")
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, channels, interlace = ihdr[8], _PNG_CHANNELS.get(ihdr[9]), ihdr[12]
    if channels is None or depth not in (1, 2, 4, 8, 16) or interlace > 1:
        raise NotAnImage("not a valid image: the PNG's header is damaged")
    total = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns and rows:  # an empty pass has no rows, not even their filter bytes
            total += rows * (1 + -(-(columns * depth * channels) // 8))
    return total


class _PngImageData:
    """A PNG's image data inflated chunk by chunk, never more than one byte past what its rows need."""

    def __init__(self, need: int):
        self.need = need
        self.size = 0
        self.started = False
        self._inflater = zlib.decompressobj()

    def feed(self, data: memoryview) -> None:
        self.started = True
        try:
            pending = bytes(data)
            while pending and not self._inflater.eof and self.size <= self.need:
                out = self._inflater.decompress(pending, min(_INFLATE_STEP, self.need + 1 - self.size))
                self.size += len(out)
                pending = self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise NotAnImage(f"not a valid image: the PNG's image data does not inflate: {exc}") from None

    def check_whole(self) -> None:
        """NotAnImage unless the data held every row: data past them is not inflated and, as Pillow and libpng
        ignore it, accepted; short of them, the zlib stream must have ended and held them all."""
        if self.size > self.need:
            return
        if not self._inflater.eof:
            raise NotAnImage("not a valid image: the PNG's image data ends before its zlib stream does")
        if self.size < self.need:
            raise NotAnImage(
                f"not a valid image: the PNG's image data holds {self.size} of the {self.need} bytes its header declares"
            )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _at_address(parts: SplitResult, address: str) -> str:
    """The URL with its host replaced by `address` (port, path, query and any user info kept)."""
    host = f"[{address.replace('%', '%25')}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _host_header(parts: SplitResult) -> str:
    host = parts.hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise MediaError(f"host name {host[:100]!r} cannot be encoded (IDNA)", permanent=True) from None
    return host + (f":{parts.port}" if parts.port else "")


def _redirect_target(current: str, location: str) -> str:
    """The URL a redirect's Location leads to from `current`, as requests' redirects find it.

    Many servers send a Location's non-ASCII path as raw UTF-8 bytes, which http.client decodes as Latin-1:
    joined as it was, `/bild-ä.png` became `/bild-%C3%83%C2%A4.png` and the image a 404, failed for good. So
    the text is read as UTF-8 when it is, and its path, query and fragment percent-quoted where unsafe (the
    host is left to IDNA, as for any image URL).
    """
    try:
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass  # not UTF-8: kept as it came
    try:
        parts = urlsplit(urljoin(current, location))
    except ValueError:  # an unclosed "[" and the like
        raise MediaError(f"malformed redirect Location {without_userinfo(location)[:200]!r}", permanent=True) from None
    quote = requests.utils.requote_uri
    return urlunsplit(parts._replace(path=quote(parts.path), query=quote(parts.query), fragment=quote(parts.fragment)))


class Downloader:
    """Fetches images over one pooled session; thread-safe for use from the pipeline's pool.

    Each attempt checks every hop with the guard and connects to the address it vetted, reads the body in
    chunks under the size cap, all of it (connecting, every hop's status line and headers, the body) under a
    total time limit (the read timeout alone lets a host trickle a byte a second forever), then checks the
    bytes are a whole image. 429, 5xx, network errors, answers past the time limit and bodies cut short are
    retried by the policy; 404/410, markup, oversize and corrupt images are permanent.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        policy: RetryPolicy | None = None,
        guard: URLGuard | None = None,
        total_timeout: float | None = None,
    ):
        self.max_bytes = settings.max_image_bytes
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.max_redirects = settings.max_redirects
        self._session, self._pool_size, self._session_lock = session, settings.concurrency + 4, threading.Lock()
        if session is not None:
            self._trusting(session)
        self.policy = policy or RetryPolicy.from_settings(settings)
        self.budget = DecodeBudget(settings.decode_memory_mb * 1024 * 1024)
        self.guard = guard or URLGuard(allow_private=settings.allow_private_hosts)
        # Time for one attempt, from connecting to the body's last byte, every redirect hop included; generous
        # enough for the largest image at a slow link's pace.
        self.total_timeout = total_timeout or settings.connect_timeout + 10 * settings.read_timeout

    @property
    def session(self) -> requests.Session:
        """The session, made on first use: a run that fetches no image never imports requests (etl/lazy.py)."""
        session = self._session
        if session is None:
            with self._session_lock:
                if self._session is None:
                    self._session = self._trusting(make_session(self._pool_size))
                session = self._session
        return session

    @staticmethod
    def _trusting(session: requests.Session) -> requests.Session:
        import urllib.request  # with the session: a run that fetches no image needs neither

        if not urllib.request.getproxies():
            # No proxy in the environment: spare requests (and _proxied) a scan of it on every image.
            session.trust_env = False
        return session

    def fetch(self, url: str) -> Fetched:
        """Download and verify one image; MediaError (with .permanent) when it cannot be had."""
        attempts = self.policy.attempts
        try:
            return self.policy.call(lambda: self._attempt(url), describe=f"image {without_userinfo(url)[:120]}")
        except Retriable as exc:
            raise MediaError(f"gave up after {attempts} attempts: {exc}") from None
        except WaitTooLong as exc:
            raise MediaError(
                f"the host asked to wait {exc.wait:.0f}s, longer than ETL_RETRY_MAX_WAIT; left for the next run"
            ) from None
        except requests.Timeout as exc:
            raise MediaError(f"timed out after {attempts} attempts: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise MediaError(f"network error after {attempts} attempts: {type(exc).__name__}: {exc}") from None

    def _attempt(self, url: str) -> Fetched:
        # Every socket operation of the attempt ends by its deadline (etl.http.set_deadline): past it, the one
        # waiting raises a timeout, whether a host drips its headers or its body, or connecting is slow.
        deadline = time.monotonic() + self.total_timeout
        previous = set_deadline(deadline)
        try:
            current = url
            for _ in range(self.max_redirects + 1):
                response = self._get(current)  # the guard checks every hop
                with response:
                    if response.status_code in REDIRECT_STATUSES:
                        location = response.headers.get("Location")
                        if not location:
                            raise MediaError(f"HTTP {response.status_code} redirect without a Location", permanent=True)
                        current = _redirect_target(current, location)
                        continue
                    return self._read(current, response, deadline)
            raise MediaError(f"more than {self.max_redirects} redirects", permanent=True)
        except requests.RequestException:
            if time.monotonic() < deadline:
                raise
            raise Retriable(self._too_slow()) from None
        finally:
            set_deadline(previous)

    def _too_slow(self, detail: str = "") -> str:
        return (
            f"no complete answer within {self.total_timeout:g}s, the time limit of one attempt"
            f" (ETL_CONNECT_TIMEOUT + 10 x ETL_READ_TIMEOUT){detail}"
        )

    def _get(self, url: str) -> requests.Response | RawResponse:
        addresses = self.guard.check(url)
        parts = urlsplit(url)
        if _is_ip_literal(parts.hostname or "") or self._proxied(url):
            # A literal needs no lookup; behind a proxy the proxy resolves the name (the check is all we can do).
            return self._send(url, {})
        headers = {"Host": _host_header(parts)}
        error: requests.ConnectionError | None = None
        for address in addresses[:MAX_ADDRESSES]:
            try:
                return self._send(_at_address(parts, address), headers)
            except requests.ConnectionError as exc:  # this address cannot be reached: try the host's next one
                error = exc
        assert error is not None
        raise error

    def _send(self, url: str, headers: dict[str, str]) -> requests.Response | RawResponse:
        kwargs = {"stream": True, "timeout": self.timeout}
        if self.session.trust_env or self.session.proxies:
            # The environment (proxies, NO_PROXY, a CA bundle, netrc) applies: Session.request merges it in.
            return self.session.get(url, headers=headers, allow_redirects=False, **kwargs)
        # Nothing to merge: straight to urllib3 through the session's adapter and pools (direct_get), which
        # spares Session.request's per-call work (settings merged from the environment, cookie jars, hooks)
        # and the building of a PreparedRequest and a Response (together half the CPU of the HTTP exchange).
        # Redirects are followed by _attempt, each hop checked by the guard; image hosts need no cookies.
        response = direct_get(self.session, url, headers, self.timeout)
        if response is not None:
            return response
        # A URL requests would rewrite (IDNA, requoting; rare): its own preparation, then the adapter. No cookie
        # is sent, as before, and the guard refuses URLs with credentials in them.
        request = requests.Request("GET", url, headers={**self.session.headers, **headers}).prepare()
        adapter = self.session.get_adapter(url)
        return adapter.send(request, verify=self.session.verify, cert=self.session.cert, proxies={}, **kwargs)

    def _proxied(self, url: str) -> bool:
        if self.session.proxies:
            return True
        return self.session.trust_env and bool(requests.utils.get_environ_proxies(url, no_proxy=None))

    def _read(self, url: str, response: requests.Response | RawResponse, deadline: float) -> Fetched:
        status = response.status_code
        if is_retriable_status(status):
            raise Retriable(f"HTTP {status}", retry_after=retry_after_seconds(response))
        if status != 200:
            raise MediaError(f"HTTP {status}", permanent=status in PERMANENT_STATUSES)
        chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        declared = response.headers.get("Content-Length")
        # A chunked body ends where its chunks say; a Content-Length beside them must be ignored (RFC 9112 6.3),
        # as http.client ignores it when it reads the body. Compared with it, every such image was "truncated".
        expected = None if chunked else header_number(declared)
        if expected is not None and expected > self.max_bytes:
            raise MediaError(f"image of {expected} bytes is over the {self.max_bytes}-byte cap", permanent=True)
        body = self._body(response, deadline)
        if expected is not None and len(body) != expected and not response.headers.get("Content-Encoding"):
            raise Retriable(f"truncated body: {len(body)} of {expected} bytes")
        try:
            content_type, width, height = sniff_image(body, self.budget)
        except NotAnImage as exc:
            if expected is None and not chunked:
                # The body ended when the connection closed, so a cut-off image looks just like a corrupt one.
                raise Retriable(f"{exc} (the body had no length and may have been cut short)") from None
            raise
        return Fetched(body, content_type, hashlib.sha256(body).hexdigest(), width, height, url)

    def _body(self, response: requests.Response | RawResponse, deadline: float) -> bytes:
        """The (decoded) body, read as it arrives, under the byte cap and the attempt's total time limit."""
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                # read1 returns what one read brings, so the checks below run however slowly bytes trickle in.
                chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > self.max_bytes:
                    raise MediaError(f"image is over the {self.max_bytes}-byte cap", permanent=True)
                chunks.append(chunk)
                if time.monotonic() > deadline:  # the reads keep the deadline too, but not through every adapter
                    raise Retriable(self._too_slow(f"; {size} bytes of the body so far"))
        except urllib3.exceptions.HTTPError as exc:  # timed out, connection reset, IncompleteRead, bad gzip
            if time.monotonic() >= deadline:
                raise Retriable(self._too_slow(f"; {size} bytes of the body so far")) from None
            if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                raise Retriable(f"timed out reading the body after {size} bytes") from None
            raise Retriable(f"the body broke off after {size} bytes: {exc}") from None
