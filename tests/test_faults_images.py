"""Image hosts misbehaving: slow, refusing, resetting, failing then healing, rate limiting, lying, redirecting.

Every test runs the real Downloader against a real local HTTP server; the retry policy records its sleeps
instead of sleeping, so the suite stays fast while the waits it would take are still checked.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from etl.errors import MediaError
from etl.http import RetryPolicy
from etl.media import Downloader, URLGuard
from tests.support import FakeResolver, RawServer, Reply, free_port, jpeg_bytes, png_bytes, reset, respond

PNG = png_bytes(40, 30)
JPEG = jpeg_bytes(32, 24)


@dataclass
class Harness:
    """A Downloader whose policy records the waits it asks for."""

    downloader: Downloader
    sleeps: list[float] = field(default_factory=list)

    def fetch(self, url: str):
        return self.downloader.fetch(url)


@pytest.fixture(autouse=True)
def no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def harness(make_settings):
    def build(attempts: int = 3, max_wait: float = 5.0, guard: URLGuard | None = None, **env: str) -> Harness:
        settings = make_settings(
            **{"ETL_CONNECT_TIMEOUT": "0.5", "ETL_READ_TIMEOUT": "0.5", "ETL_ALLOW_PRIVATE_HOSTS": "true", **env}
        )
        sleeps: list[float] = []
        policy = RetryPolicy(attempts=attempts, max_wait=max_wait, base=0.01, sleep=sleeps.append)
        return Harness(Downloader(settings, policy=policy, guard=guard), sleeps)

    return build


@pytest.fixture
def raw_server():
    servers: list[RawServer] = []

    def build(*scripts) -> RawServer:
        servers.append(RawServer(*scripts))
        return servers[-1]

    yield build
    for server in servers:
        server.close()


# -- slow hosts ----------------------------------------------------------------------------------------


@pytest.mark.fault("image host slower than the read timeout on every attempt")
def test_slow_host_times_out_and_is_not_permanent(harness, http_server):
    http_server.routes["/slow.png"] = Reply(body=PNG, delay=1.0)
    h = harness(attempts=2)
    started = time.monotonic()
    with pytest.raises(MediaError, match="timed out after 2 attempts") as info:
        h.fetch(http_server.url("/slow.png"))
    assert not info.value.permanent
    assert http_server.hits["/slow.png"] == 2
    assert time.monotonic() - started < 3


@pytest.mark.fault("image host slow once, then fast")
def test_slow_once_then_fine(harness, http_server):
    http_server.routes["/a.png"] = [Reply(body=PNG, delay=1.0), Reply(body=PNG)]
    fetched = harness().fetch(http_server.url("/a.png"))
    assert fetched.body == PNG
    assert http_server.hits["/a.png"] == 2


@pytest.mark.fault("image host trickles the body a byte at a time, inside the read timeout, past the total limit")
def test_trickling_body_hits_the_total_time_limit(harness, raw_server):
    server = raw_server(respond(PNG, trickle=0.05))
    h = harness(attempts=1)
    h.downloader.total_timeout = 0.6
    started = time.monotonic()
    with pytest.raises(MediaError, match="no complete answer within 0.6s"):
        h.fetch(server.url())
    assert time.monotonic() - started < 2


def drip(head: bytes, every: float, body: bytes = b"") -> Callable:
    """A script that sends `head` (the status line and headers) one byte every `every` seconds, then `body`."""

    def script(sock: socket.socket) -> None:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(every)
        sock.sendall(body)
        sock.close()

    return script


def png_head(status: str = "200 OK", **headers: str) -> bytes:
    fields = [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines = [f"HTTP/1.1 {status}", "Content-Type: image/png", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def fetch_within(h: Harness, url: str, seconds: float) -> tuple[BaseException | object, float]:
    """What fetch returned or raised, and how long it took; fails the test when it is still busy after `seconds`
    (the fetch goes on in a daemon thread until the host stops dripping: the test itself ends)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(h.fetch(url))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the download was still busy after {seconds}s: the limit does not bound it"
    return outcome[0], time.monotonic() - started


def live_connections(downloader: Downloader) -> list:
    """Connections waiting in the session's pools with a socket still open (ready to be reused)."""
    pools = downloader.session.get_adapter("http://x").poolmanager.pools
    return [conn for key in pools.keys() for conn in pools[key].pool.queue if conn and conn.sock]


@pytest.mark.fault(
    "image host drips its status line and headers a byte at a time, inside the read timeout, past the total limit"
)
@pytest.mark.parametrize("path", ["direct", "session", "adapter"])
def test_dripping_headers_hit_the_total_time_limit(harness, raw_server, monkeypatch, path):
    """The total limit bounds the whole attempt, headers too: a host that sends its head a byte every 0.2 s
    (under the 0.5 s read timeout, about 20 s for the whole head) fails each attempt at the 1 s limit.

    Each of the downloader's three ways to send: straight to urllib3 (direct_get, the usual one), requests'
    Session.get (taken when the environment applies: trust_env), and the adapter's own send (a URL requests
    would rewrite, here one with a percent escape)."""
    import etl.media

    server = raw_server(drip(png_head(Content_Length=str(len(PNG)), X_Padding="x" * 40), 0.2, PNG))
    h = harness(attempts=2)
    h.downloader.total_timeout = 1.0
    taken: list[str] = []
    direct_get = etl.media.direct_get

    def recorded(*args: object) -> object:
        taken.append("direct")  # sent here, unless the URL is one requests would rewrite
        response = direct_get(*args)
        if response is None:
            taken[-1] = "adapter"
        return response

    monkeypatch.setattr(etl.media, "direct_get", recorded)
    h.downloader.session.trust_env = path == "session"  # no proxy in the environment (the autouse fixture) all the same
    if path == "session":
        get = h.downloader.session.get
        monkeypatch.setattr(h.downloader.session, "get", lambda *a, **k: taken.append("session") or get(*a, **k))
    error, elapsed = fetch_within(h, server.url("/img%2D1.png" if path == "adapter" else "/img.png"), 8)
    assert isinstance(error, MediaError), error
    assert "gave up after 2 attempts: no complete answer within 1s" in str(error)
    assert not error.permanent  # retried by the policy now, and by a later run
    assert len(h.sleeps) == 1 and server.connections == 2
    assert elapsed < 4  # two attempts of about 1 s, not two of 20 s
    assert taken == [path, path]
    assert live_connections(h.downloader) == []  # the cut keep-alive connections were closed, not pooled for reuse


@pytest.mark.fault("image host answers a redirect and its target each within the limit, the two together past it")
def test_the_total_time_limit_covers_every_hop_of_an_attempt(harness, raw_server):
    target_head = png_head(Content_Length=str(len(PNG)), Connection="close")
    target = raw_server(drip(target_head, 0.9 / len(target_head), PNG))
    hop_head = png_head("302 Found", Location=target.url(), Content_Length="0", Connection="close")
    hop = raw_server(drip(hop_head, 0.9 / len(hop_head)))
    h = harness(attempts=1)
    h.downloader.total_timeout = 1.5  # each head takes about 0.9 s: the redirect comes in time, its target not
    error, elapsed = fetch_within(h, hop.url(), 8)
    assert isinstance(error, MediaError), error
    assert "no complete answer within 1.5s" in str(error)
    assert hop.connections == 1 and target.connections == 1
    assert elapsed < 2.5


# -- connection faults ---------------------------------------------------------------------------------


@pytest.mark.fault("image host refuses connections")
def test_connection_refused(harness):
    h = harness(attempts=3)
    with pytest.raises(MediaError, match="network error after 3 attempts: ConnectionError") as info:
        h.fetch(f"http://127.0.0.1:{free_port()}/a.png")
    assert not info.value.permanent
    assert len(h.sleeps) == 2  # retried, with backoff between attempts


@pytest.mark.fault("image host resets the connection, then answers")
def test_connection_reset_then_success(harness, raw_server):
    server = raw_server(reset, reset, respond(PNG))
    fetched = harness(attempts=3).fetch(server.url())
    assert fetched.body == PNG
    assert server.connections == 3


@pytest.mark.fault("image host resets the connection on every attempt")
def test_connection_reset_every_time(harness, raw_server):
    server = raw_server(reset)
    with pytest.raises(MediaError, match="after 2 attempts") as info:
        harness(attempts=2).fetch(server.url())
    assert not info.value.permanent
    assert server.connections == 2


@pytest.mark.fault("image host closes the connection without answering")
def test_connection_closed_without_response(harness, raw_server):
    server = raw_server(lambda sock: sock.close(), respond(JPEG))
    assert harness().fetch(server.url()).content_type == "image/jpeg"


# -- server errors and rate limits ----------------------------------------------------------------------


@pytest.mark.fault("image host answers 503 and 502, then heals")
def test_5xx_then_success(harness, http_server):
    http_server.routes["/a.png"] = [
        Reply(503, b"busy", content_type="text/plain"),
        Reply(502, b"bad gateway", content_type="text/plain"),
        Reply(body=PNG),
    ]
    h = harness(attempts=4)
    assert h.fetch(http_server.url("/a.png")).body == PNG
    assert http_server.hits["/a.png"] == 3
    assert len(h.sleeps) == 2


@pytest.mark.fault("image host answers 500 on every attempt")
def test_5xx_forever_is_a_transient_failure(harness, http_server):
    http_server.routes["/a.png"] = Reply(500, b"oops", content_type="text/plain")
    with pytest.raises(MediaError, match="gave up after 3 attempts: HTTP 500") as info:
        harness(attempts=3).fetch(http_server.url("/a.png"))
    assert not info.value.permanent  # retried by later runs
    assert http_server.hits["/a.png"] == 3


@pytest.mark.fault("image host rate limits with 429 and Retry-After")
def test_429_retry_after_is_honoured(harness, http_server):
    http_server.routes["/a.png"] = [Reply(429, b"", headers={"Retry-After": "2"}), Reply(body=PNG)]
    h = harness(max_wait=5)
    assert h.fetch(http_server.url("/a.png")).body == PNG
    assert h.sleeps == [2.0]


@pytest.mark.fault("image host rate limits with 429 and a Retry-After HTTP date")
def test_429_retry_after_as_a_date(harness, http_server):
    from email.utils import formatdate

    http_server.routes["/a.png"] = [
        Reply(429, b"", headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)}),
        Reply(body=PNG),
    ]
    h = harness(max_wait=10)
    h.fetch(http_server.url("/a.png"))
    assert len(h.sleeps) == 1 and 1.0 <= h.sleeps[0] <= 3.0


@pytest.mark.parametrize("header", ["Retry-After", "x-rate-limit-reset"])
@pytest.mark.fault("image host rate limits with 429 and a Retry-After of digits that are not ASCII ('²'): no wait asked")
def test_429_with_a_retry_after_of_odd_digits_is_retried(harness, http_server, header):
    http_server.routes["/a.png"] = [Reply(429, b"", headers={header: "\u00b2"}), Reply(body=PNG)]  # str.isdigit('²')
    h = harness(max_wait=5)
    assert h.fetch(http_server.url("/a.png")).body == PNG  # was a ValueError out of float('²')
    assert http_server.hits["/a.png"] == 2 and len(h.sleeps) == 1 and h.sleeps[0] <= 5


@pytest.mark.fault("image host rate limits with 429 and no Retry-After")
def test_429_without_retry_after_backs_off(harness, http_server):
    http_server.routes["/a.png"] = [Reply(429, b""), Reply(429, b""), Reply(body=PNG)]
    h = harness(attempts=4, max_wait=1.0)
    assert h.fetch(http_server.url("/a.png")).body == PNG
    assert len(h.sleeps) == 2 and all(0 <= s <= 1.0 for s in h.sleeps)


@pytest.mark.fault("image host asks for a wait longer than the policy allows")
def test_429_asking_too_long_a_wait_fails_this_run_only(harness, http_server):
    http_server.routes["/a.png"] = Reply(429, b"", headers={"Retry-After": "3600"})
    h = harness(max_wait=5)
    with pytest.raises(MediaError, match="asked to wait 3600s") as info:
        h.fetch(http_server.url("/a.png"))
    assert not info.value.permanent
    assert h.sleeps == []
    assert http_server.hits["/a.png"] == 1


@pytest.mark.parametrize("status", [404, 410])
@pytest.mark.fault("image gone (404/410): marked permanent, never retried")
def test_gone_is_permanent_and_not_retried(harness, http_server, status):
    http_server.routes["/a.png"] = Reply(status, b"gone", content_type="text/plain")
    with pytest.raises(MediaError, match=f"HTTP {status}") as info:
        harness().fetch(http_server.url("/a.png"))
    assert info.value.permanent
    assert http_server.hits["/a.png"] == 1


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.fault("image refused with another 4xx: not retried now, retried by a later run")
def test_other_4xx_fail_at_once_but_are_not_permanent(harness, http_server, status):
    http_server.routes["/a.png"] = Reply(status, b"no", content_type="text/plain")
    with pytest.raises(MediaError, match=f"HTTP {status}") as info:
        harness().fetch(http_server.url("/a.png"))
    assert not info.value.permanent
    assert http_server.hits["/a.png"] == 1


# -- bodies ---------------------------------------------------------------------------------------------


@pytest.mark.fault("image body stops before its Content-Length")
def test_truncated_body_is_retried(harness, http_server):
    http_server.routes["/a.png"] = [Reply(body=PNG, send_bytes=len(PNG) // 2), Reply(body=PNG)]
    assert harness().fetch(http_server.url("/a.png")).body == PNG
    assert http_server.hits["/a.png"] == 2


@pytest.mark.fault("image body stops before its Content-Length on every attempt")
def test_always_truncated_is_a_transient_failure(harness, http_server):
    http_server.routes["/a.png"] = Reply(body=PNG, send_bytes=20)
    with pytest.raises(MediaError, match="gave up after 2 attempts") as info:
        harness(attempts=2).fetch(http_server.url("/a.png"))
    assert not info.value.permanent


@pytest.mark.fault("image body without a length cut short by a closed connection")
def test_cut_short_without_length_is_retried(harness, http_server):
    http_server.routes["/a.png"] = [Reply(body=PNG, send_length=False, send_bytes=len(PNG) - 30), Reply(body=PNG)]
    assert harness().fetch(http_server.url("/a.png")).body == PNG
    assert http_server.hits["/a.png"] == 2


@pytest.mark.fault("image with a Content-Length of digits that are not ASCII ('²'): read as one without a length")
def test_a_content_length_of_odd_digits_is_no_length(harness, http_server):
    http_server.routes["/a.png"] = Reply(body=PNG, headers={"Content-Length": "\u00b2"}, send_length=False)
    assert harness(attempts=1).fetch(http_server.url("/a.png")).body == PNG  # was a ValueError out of int('²')


@pytest.mark.fault("image served with chunked transfer encoding")
def test_chunked_body(harness, raw_server):
    server = raw_server(respond(JPEG, content_type="image/jpeg", chunked=True))
    fetched = harness().fetch(server.url("/a.jpg"))
    assert fetched.body == JPEG and fetched.content_type == "image/jpeg"


def chunked_with_a_length(body: bytes, declared: int):
    """A script that answers 200 with `body` chunked and a Content-Length of `declared` beside the chunks."""

    def script(sock) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
        sock.sendall(f"{head}Content-Length: {declared}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        sock.close()

    return script


@pytest.mark.parametrize("declared", [10, len(PNG) + 500, 10**9])
@pytest.mark.fault("image served chunked with a Content-Length beside the chunks (ignored, RFC 9112 6.3)")
def test_a_chunked_body_is_read_whole_whatever_its_content_length_says(harness, raw_server, declared):
    server = raw_server(chunked_with_a_length(PNG, declared))
    fetched = harness(attempts=1).fetch(server.url())  # was "truncated body: 1009 of 10 bytes", or over the cap
    assert fetched.body == PNG


@pytest.mark.fault("image far larger than the cap, announced by Content-Length")
def test_oversize_with_content_length_is_refused_before_reading(harness, http_server):
    big = png_bytes(600, 600) + b"\0" * 200_000
    http_server.routes["/big.png"] = Reply(body=big)
    with pytest.raises(MediaError, match=f"image of {len(big)} bytes is over the 50000-byte cap") as info:
        harness(ETL_MAX_IMAGE_BYTES="50000").fetch(http_server.url("/big.png"))
    assert info.value.permanent
    assert http_server.hits["/big.png"] == 1


@pytest.mark.fault("image far larger than the cap, without a Content-Length")
def test_oversize_without_content_length_is_cut_at_the_cap(harness, http_server):
    http_server.routes["/big.png"] = Reply(body=b"\x89PNG" + b"\0" * 3_000_000, send_length=False)
    with pytest.raises(MediaError, match="over the 50000-byte cap") as info:
        harness(ETL_MAX_IMAGE_BYTES="50000").fetch(http_server.url("/big.png"))
    assert info.value.permanent
    assert http_server.hits["/big.png"] == 1


@pytest.mark.fault("image host sends an HTML page labelled image/jpeg")
def test_html_with_an_image_content_type_is_refused(harness, http_server):
    http_server.routes["/a.jpg"] = Reply(
        body=b"<!DOCTYPE html><html><body>Login</body></html>", content_type="image/jpeg"
    )
    with pytest.raises(MediaError, match="HTML") as info:
        harness().fetch(http_server.url("/a.jpg"))
    assert info.value.permanent
    assert http_server.hits["/a.jpg"] == 1


@pytest.mark.fault("image host sends text that is not an image, labelled image/png")
def test_garbage_with_an_image_content_type_is_refused(harness, http_server):
    http_server.routes["/a.png"] = Reply(body=b'{"error": "expired"}')
    with pytest.raises(MediaError, match="not a valid image") as info:
        harness().fetch(http_server.url("/a.png"))
    assert info.value.permanent


@pytest.mark.fault("image host's Content-Type lies: PNG bytes labelled image/jpeg")
def test_lying_content_type_the_bytes_decide(harness, http_server):
    http_server.routes["/a.jpg"] = Reply(body=PNG, content_type="image/jpeg")
    http_server.routes["/b.png"] = Reply(body=JPEG, content_type="application/octet-stream")
    h = harness()
    png = h.fetch(http_server.url("/a.jpg"))
    jpeg = h.fetch(http_server.url("/b.png"))
    assert (png.content_type, png.width, png.height) == ("image/png", 40, 30)
    assert (jpeg.content_type, jpeg.width, jpeg.height) == ("image/jpeg", 32, 24)


@pytest.mark.fault("image body gzip-encoded by the host")
def test_gzip_encoded_body_is_decoded_and_checksummed(harness, http_server):
    import gzip
    import hashlib

    http_server.routes["/a.png"] = Reply(body=gzip.compress(PNG), headers={"Content-Encoding": "gzip"})
    fetched = harness().fetch(http_server.url("/a.png"))
    assert fetched.body == PNG
    assert fetched.sha256 == hashlib.sha256(PNG).hexdigest()


def informational_first(*statuses: bytes):
    """A script that answers each informational status line in turn (with a header), then 200 with the PNG."""

    def script(sock) -> None:
        for status in statuses:
            sock.sendall(b"HTTP/1.1 " + status + b"\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n")
        sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(PNG)}\r\n\r\n".encode() + PNG)
        sock.close()

    return script


@pytest.mark.parametrize("statuses", [[b"103 Early Hints"], [b"100 Continue", b"102 Processing", b"103 Early Hints"]])
@pytest.mark.fault("image host sends 103 Early Hints (or other 1xx) before its 200: the final answer is read")
def test_an_image_after_informational_answers_is_fetched(harness, raw_server, statuses):
    server = raw_server(informational_first(*statuses))
    assert harness(attempts=1).fetch(server.url()).body == PNG  # was "HTTP 103": http.client skips only 100
    assert server.connections == 1


@pytest.mark.fault("image host sends informational answers without end: the ninth is taken for the answer")
def test_endless_informational_answers_are_bounded(harness, raw_server):
    server = raw_server(informational_first(*[b"103 Early Hints"] * 50))
    with pytest.raises(MediaError, match="HTTP 103"):
        harness(attempts=1).fetch(server.url())


# -- redirects -------------------------------------------------------------------------------------------


def redirect(to: str, status: int = 302) -> Reply:
    return Reply(status, b"", headers={"Location": to}, content_type=None)


@pytest.mark.fault("image behind a chain of redirects within the limit")
def test_redirects_are_followed(harness, http_server):
    http_server.routes["/a"] = redirect("/b", 301)
    http_server.routes["/b"] = redirect(http_server.url("/c"), 307)
    http_server.routes["/c"] = redirect("final.png", 308)
    http_server.routes["/final.png"] = Reply(body=PNG)
    fetched = harness(ETL_MAX_REDIRECTS="3").fetch(http_server.url("/a"))
    assert fetched.body == PNG
    assert fetched.final_url == http_server.url("/final.png")


@pytest.mark.parametrize(
    ("location", "reached"),
    [("/bild-ä.png", "/bild-%C3%A4.png"), ("/bild ä.png?größe=2", "/bild%20%C3%A4.png?gr%C3%B6%C3%9Fe=2"),
     ("/bild-%C3%A4.png", "/bild-%C3%A4.png")],
)  # fmt: skip
@pytest.mark.fault("image host redirects to a Location of raw UTF-8 bytes: followed as requests follows it")
def test_a_redirect_to_a_raw_utf8_location_reaches_the_image(harness, http_server, location, reached):
    import requests

    http_server.routes[reached] = Reply(body=PNG)
    raw = location.encode("utf-8").decode("latin-1")  # the bytes on the wire are UTF-8; http.client reads Latin-1
    http_server.routes["/r"] = redirect(raw)
    assert requests.get(http_server.url("/r"), timeout=5).content == PNG  # requests gets there
    fetched = harness(attempts=1).fetch(http_server.url("/r"))  # was HTTP 404 (/bild-%C3%83%C2%A4.png), for good
    assert fetched.body == PNG and fetched.final_url == http_server.url(reached)


@pytest.mark.fault("image host redirects to a Location urlsplit cannot read (an unclosed '['): refused, no ValueError")
def test_a_redirect_to_a_malformed_location_is_refused(harness, http_server):
    http_server.routes["/r"] = redirect("http://[::1/x.png")
    with pytest.raises(MediaError, match="malformed redirect Location") as info:
        harness(attempts=1).fetch(http_server.url("/r"))
    assert info.value.permanent


@pytest.mark.fault("image behind more redirects than ETL_MAX_REDIRECTS")
def test_too_many_redirects(harness, http_server):
    for n in range(5):
        http_server.routes[f"/r{n}"] = redirect(f"/r{n + 1}")
    http_server.routes["/r5"] = Reply(body=PNG)
    with pytest.raises(MediaError, match="more than 2 redirects") as info:
        harness(ETL_MAX_REDIRECTS="2").fetch(http_server.url("/r0"))
    assert info.value.permanent
    assert "/r3" not in http_server.hits and "/r5" not in http_server.hits


@pytest.mark.fault("image host redirects in a loop")
def test_redirect_loop_is_bounded(harness, http_server):
    http_server.routes["/a"] = redirect("/b")
    http_server.routes["/b"] = redirect("/a")
    with pytest.raises(MediaError, match="more than 5 redirects"):
        harness().fetch(http_server.url("/a"))
    assert http_server.hits["/a"] + http_server.hits["/b"] == 6


@pytest.mark.fault("image host redirects without a Location header")
def test_redirect_without_location(harness, http_server):
    http_server.routes["/a"] = Reply(302, b"", content_type=None)
    with pytest.raises(MediaError, match="redirect without a Location") as info:
        harness().fetch(http_server.url("/a"))
    assert info.value.permanent


class RecordingGuard(URLGuard):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checked: list[str] = []

    def check(self, url: str) -> list[str]:
        self.checked.append(url)
        return super().check(url)


@pytest.mark.fault("image host redirects to the cloud metadata service (169.254.169.254)")
def test_every_hop_is_checked_and_a_redirect_to_metadata_is_refused(harness, http_server):
    port = http_server.server.server_address[1]
    guard = RecordingGuard(trusted={f"127.0.0.1:{port}"})
    http_server.routes["/a"] = redirect("/b")
    http_server.routes["/b"] = redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    h = harness(guard=guard, ETL_ALLOW_PRIVATE_HOSTS="false")
    with pytest.raises(MediaError, match="non-public address 169.254.169.254") as info:
        h.fetch(http_server.url("/a"))
    assert not info.value.permanent
    assert guard.checked == [
        http_server.url("/a"),
        http_server.url("/b"),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    ]


@pytest.mark.fault("image host redirects to a DNS name that resolves to a private address")
def test_redirect_to_a_name_resolving_privately_is_refused(harness, http_server):
    port = http_server.server.server_address[1]
    resolver = FakeResolver({"metadata.internal": ["10.0.0.7"]})
    guard = URLGuard(trusted={f"127.0.0.1:{port}"}, resolve=resolver)
    http_server.routes["/a"] = redirect("http://metadata.internal/secret.png")
    with pytest.raises(MediaError, match="'metadata.internal': it resolves to the non-public address 10.0.0.7"):
        harness(guard=guard, ETL_ALLOW_PRIVATE_HOSTS="false").fetch(http_server.url("/a"))
    assert resolver.calls == ["metadata.internal"]


@pytest.mark.fault("image host redirects to a file:// URL")
def test_redirect_to_another_scheme_is_refused(harness, http_server):
    http_server.routes["/a"] = redirect("file:///etc/passwd")
    with pytest.raises(MediaError, match="refused URL scheme 'file'") as info:
        harness().fetch(http_server.url("/a"))
    assert info.value.permanent
