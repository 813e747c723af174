"""The URL guard (schemes, private addresses, DNS names resolving there), connection pinning, image sniffing."""

from __future__ import annotations

import io
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from etl.errors import MediaError
from etl.http import RetryPolicy, make_session
from etl.media import (
    DecodeBudget,
    Downloader,
    NotAnImage,
    URLGuard,
    check_jpeg,
    check_png,
    is_public_address,
    sniff_image,
)
from tests.support import FakeResolver, Reply, jpeg_bytes, png_bytes, self_signed_cert

PNG = png_bytes(12, 10)


@pytest.fixture(autouse=True)
def no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
PUBLIC = FakeResolver({"cdn.example.com": ["93.184.216.34", "2606:2800:220:1::1"]})


# -- the guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "data:image/png;base64,AAAA", "javascript:alert(1)",
     "//example.com/a.png", "example.com/a.png", "s3://bucket/key.png"],
)  # fmt: skip
@pytest.mark.badinput("an image URL with a scheme other than http/https is refused")
def test_other_schemes_are_refused(url):
    with pytest.raises(MediaError, match="refused URL scheme") as info:
        URLGuard(allow_private=True, resolve=PUBLIC).check(url)
    assert info.value.permanent


@pytest.mark.parametrize("url", ["http://", "http:///a.png", "http://[::1/a.png", "http://example.com:99999/a.png"])
@pytest.mark.badinput("a malformed image URL is refused")
def test_malformed_urls_are_refused(url):
    with pytest.raises(MediaError) as info:
        URLGuard(resolve=PUBLIC).check(url)
    assert info.value.permanent


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.5.5.5", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "239.255.255.250", "255.255.255.255", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
     "::ffff:169.254.169.254", "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "2001:db8::1"],
)  # fmt: skip
@pytest.mark.badinput("an image URL on a loopback, private, link-local, multicast or reserved address is refused")
def test_non_public_literals_are_refused(address):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(MediaError, match="non-public address") as info:
        URLGuard().check(f"http://{host}/a.png")
    assert not info.value.permanent  # the configuration's refusal: ETL_ALLOW_PRIVATE_HOSTS may change it


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "fd00::5", "224.0.0.251"])
@pytest.mark.badinput("an image URL whose DNS name resolves to a non-public address is refused")
def test_names_resolving_to_non_public_addresses_are_refused(address):
    resolver = FakeResolver({"images.evil.example": ["93.184.216.34", address]})  # one bad answer is enough
    with pytest.raises(MediaError, match=r"refused host 'images.evil.example': it resolves to the non-public"):
        URLGuard(resolve=resolver).check("https://images.evil.example/a.png")
    assert resolver.calls == ["images.evil.example"]


@pytest.mark.parametrize("url", ["http://2130706433/a.png", "http://0x7f.1/a.png", "http://localhost/a.png"])
def test_numeric_and_local_names_are_resolved_then_refused(url):
    with pytest.raises(MediaError, match="non-public address 127.0.0.1"):
        URLGuard().check(url)


def test_public_hosts_pass_and_their_addresses_are_returned():
    guard = URLGuard(resolve=PUBLIC)
    assert guard.check("https://cdn.example.com/a.jpg?sig=1") == ["93.184.216.34", "2606:2800:220:1::1"]
    assert guard.check("http://93.184.216.34:8080/a.jpg") == ["93.184.216.34"]
    assert PUBLIC.calls.count("cdn.example.com") >= 1


def test_unresolvable_host_is_a_transient_failure():
    with pytest.raises(MediaError, match="cannot resolve host 'nowhere.invalid'") as info:
        URLGuard(resolve=FakeResolver({})).check("http://nowhere.invalid/a.png")
    assert not info.value.permanent


def test_allow_private_hosts_allows_them(make_settings):
    guard = Downloader(make_settings(ETL_ALLOW_PRIVATE_HOSTS="true")).guard
    assert guard.check("http://10.0.0.5/a.png") == ["10.0.0.5"]
    assert guard.check("http://[::1]:8080/a.png") == ["::1"]
    assert Downloader(make_settings()).guard.allow_private is False


def test_trusted_host_port_is_allowed_and_nothing_else():
    guard = URLGuard(trusted={"127.0.0.1:8123"})
    assert guard.check("http://127.0.0.1:8123/img/1/0.png") == ["127.0.0.1"]
    with pytest.raises(MediaError):
        guard.check("http://127.0.0.1:8124/img/1/0.png")


def test_is_public_address():
    import ipaddress

    assert is_public_address(ipaddress.ip_address("8.8.8.8"))
    assert is_public_address(ipaddress.ip_address("2606:4700::1111"))
    assert is_public_address(ipaddress.ip_address("64:ff9b::808:808"))  # NAT64 of 8.8.8.8
    assert not is_public_address(ipaddress.ip_address("64:ff9b::7f00:1"))  # NAT64 of 127.0.0.1


# -- pinning: the connection goes to the address the guard vetted ------------------------------------------


@pytest.mark.fault("image host name answers DNS differently on the second lookup (DNS rebinding)")
def test_connection_goes_to_the_vetted_address(make_settings, http_server):
    """The name resolves once, in the guard; a second lookup (which would now say 127.0.0.2, where nothing
    listens) never happens, and the system resolver, which does not know the name, is never asked."""
    port = http_server.server.server_address[1]
    resolver = FakeResolver({"images.test": [["127.0.0.1"], ["127.0.0.2"]]})

    class OnlyFirstAnswerIsPublic(URLGuard):
        def check(self, url):
            addresses = super().check(url)
            assert addresses == ["127.0.0.1"], "a rebinding answer reached the connection"
            return addresses

    http_server.routes["/a.png"] = Reply(body=PNG)
    guard = OnlyFirstAnswerIsPublic(allow_private=True, resolve=resolver)
    downloader = Downloader(make_settings(), guard=guard, policy=RetryPolicy(attempts=1))
    fetched = downloader.fetch(f"http://images.test:{port}/a.png")
    assert fetched.body == PNG
    assert fetched.final_url == f"http://images.test:{port}/a.png"
    assert resolver.calls == ["images.test"]
    [(_, path, headers)] = http_server.requests
    assert path == "/a.png"
    assert headers["Host"] == f"images.test:{port}"


def test_each_redirect_hop_is_resolved_and_pinned(make_settings, http_server):
    port = http_server.server.server_address[1]
    resolver = FakeResolver({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    http_server.routes["/start"] = Reply(
        302, b"", headers={"Location": f"http://b.test:{port}/a.png"}, content_type=None
    )
    http_server.routes["/a.png"] = Reply(body=PNG)
    downloader = Downloader(make_settings(), guard=URLGuard(allow_private=True, resolve=resolver))
    assert downloader.fetch(f"http://a.test:{port}/start").body == PNG
    assert resolver.calls == ["a.test", "b.test"]
    assert [h["Host"] for _, _, h in http_server.requests] == [f"a.test:{port}", f"b.test:{port}"]


def test_an_unreachable_address_falls_back_to_the_next(make_settings, http_server):
    """The server listens on 127.0.0.1 only, so 127.0.0.2 refuses: like an IPv6 answer on a host without IPv6."""
    port = http_server.server.server_address[1]
    http_server.routes["/a.png"] = Reply(body=PNG)
    resolver = FakeResolver({"dual.test": ["127.0.0.2", "127.0.0.1"]})
    settings = make_settings(ETL_CONNECT_TIMEOUT="0.5")
    downloader = Downloader(
        settings, guard=URLGuard(allow_private=True, resolve=resolver), policy=RetryPolicy(attempts=1)
    )
    assert downloader.fetch(f"http://dual.test:{port}/a.png").body == PNG
    assert http_server.hits["/a.png"] == 1


def test_behind_a_proxy_the_proxy_resolves_the_name(make_settings, http_server, monkeypatch):
    """With HTTP_PROXY set the request goes to the proxy by name (it cannot be pinned); the guard still checks."""
    monkeypatch.setenv("HTTP_PROXY", http_server.base)
    monkeypatch.setenv("NO_PROXY", "")
    http_server.routes["http://images.test/a.png"] = Reply(body=PNG)
    resolver = FakeResolver({"images.test": ["127.0.0.1"]})
    downloader = Downloader(make_settings(), guard=URLGuard(allow_private=True, resolve=resolver))
    assert downloader.fetch("http://images.test/a.png").body == PNG
    assert [path for _, path, _ in http_server.requests] == ["http://images.test/a.png"]
    assert resolver.calls == ["images.test"]
    with pytest.raises(MediaError, match="non-public"):
        Downloader(make_settings(), guard=URLGuard(resolve=resolver)).fetch("http://images.test/a.png")


@pytest.fixture
def https_server(tmp_path: Path):
    """An https server whose certificate names images.test only; records the SNI it was sent."""
    cert, key = self_signed_cert(tmp_path, "images.test")
    seen_sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1], cert, seen_sni
    server.shutdown()
    server.server_close()


def test_https_pinned_to_the_address_keeps_sni_and_certificate_check(make_settings, https_server):
    port, cert, seen_sni = https_server
    session = make_session()
    session.verify = str(cert)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides session.verify
    guard = URLGuard(
        allow_private=True, resolve=FakeResolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    )
    downloader = Downloader(make_settings(), session=session, guard=guard, policy=RetryPolicy(attempts=1))
    assert downloader.fetch(f"https://images.test:{port}/a.png").body == PNG
    assert seen_sni == ["images.test"]
    # The same address under a name the certificate does not carry fails verification.
    with pytest.raises(MediaError, match="SSLError"):
        downloader.fetch(f"https://other.test:{port}/a.png")


# -- sniffing ---------------------------------------------------------------------------------------------


def image_bytes(fmt: str, size=(10, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_sniff_supported_formats(fmt, ctype):
    assert sniff_image(image_bytes(fmt)) == (ctype, 10, 8)


def _multi_picture_jpeg() -> bytes:
    """A JPEG with a Multi-Picture index of two pictures, as phone cameras write them (Pillow opens it as "MPO")."""
    buf = io.BytesIO()
    first, second = Image.new("RGB", (64, 48), (10, 200, 30)), Image.new("RGB", (64, 48), (200, 10, 30))
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def test_a_multi_picture_jpeg_is_fetched_and_stored_as_a_jpeg(make_settings, http_server):
    body = _multi_picture_jpeg()
    assert body[:2] == b"\xff\xd8" and Image.open(io.BytesIO(body)).format == "MPO"
    http_server.routes["/photo.jpg"] = Reply(body=body, content_type="image/jpeg")
    settings = make_settings(ETL_ALLOW_PRIVATE_HOSTS="true")
    downloader = Downloader(settings, policy=RetryPolicy(attempts=1, base=0.01, sleep=lambda s: None))
    fetched = downloader.fetch(http_server.url("/photo.jpg"))  # was "unsupported image format MPO", permanent
    assert (fetched.content_type, fetched.width, fetched.height, fetched.body) == ("image/jpeg", 64, 48, body)
    with pytest.raises(NotAnImage):  # checked as a JPEG: its first picture cut short is refused
        sniff_image(body[: len(body) // 4])


def _animated_gif(local_palettes: bool) -> bytes:
    import random

    rng = random.Random(1)
    frames = []
    for _ in range(3):
        frame = Image.new("RGB", (64, 48))
        frame.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64 * 48)])
        frames.append(frame.quantize(64) if local_palettes else frame)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, comment=b"hi")
    return buf.getvalue()


@pytest.mark.badinput("an animated GIF cut short after its first frame: refused (the decode reads the first frame only)")
@pytest.mark.parametrize("local_palettes", [False, True])
def test_an_animated_gif_is_whole_only_to_its_trailer(local_palettes):
    gif = _animated_gif(local_palettes)
    assert sniff_image(gif) == ("image/gif", 64, 48)
    assert sniff_image(gif + b"junk after the trailer") == ("image/gif", 64, 48)  # as decoders ignore it
    first_frame_ends = len(gif) // 3  # past the first frame: what Pillow's load() checked was all there
    for cut in range(first_frame_ends, len(gif), 97):
        with pytest.raises(MediaError, match="not a valid image"):
            sniff_image(gif[:cut])
    with pytest.raises(MediaError, match="not a valid image"):
        sniff_image(gif[:-1])  # only the trailer missing


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not a valid image"),
        (b"<html><body>hi</body></html>", "HTML"),
        (b"\xef\xbb\xbf  <!DOCTYPE html>", "HTML"),
        (b'<?xml version="1.0"?><svg/>', "HTML/XML"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "HTML/XML"),
        (png_bytes(40, 30, (0, 0, 0))[:40], "not a valid image"),
        (jpeg_bytes()[: len(jpeg_bytes()) // 2], "not a valid image"),
        (image_bytes("BMP"), "unsupported image format BMP"),
    ],
)
@pytest.mark.badinput("bytes that are not a whole image of a supported format are refused")
def test_sniff_refuses_what_is_not_an_image(body, message):
    with pytest.raises(MediaError, match=message) as info:
        sniff_image(body)
    assert info.value.permanent


def test_sniff_refuses_decompression_bombs():
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, format="PNG")  # 144 megapixels in a few kilobytes
    with pytest.raises(MediaError, match="too large|decompression bomb"):
        sniff_image(buf.getvalue())


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
@pytest.mark.badinput("a JPEG cut short (no Content-Length to tell) is refused by the image check")
def test_a_truncated_jpeg_is_not_an_image(keep):
    buf = io.BytesIO()
    noise = Image.effect_noise((320, 240), 60).convert("RGB")  # detailed, so the cut lands inside scan data
    noise.save(buf, format="JPEG", quality=90)
    body = buf.getvalue()
    assert sniff_image(body)[0] == "image/jpeg"
    with pytest.raises(MediaError):
        sniff_image(body[: int(len(body) * keep)])


def _noise_jpeg(size=(160, 120), mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "save", [{}, {"progressive": True}, {"optimize": True}, {"subsampling": 0}, {"mode": "L"}, {"mode": "CMYK"}]
)
@pytest.mark.badinput("a JPEG cut short anywhere (no Content-Length to tell) is refused without decoding it")
def test_jpeg_check_refuses_every_cut_and_accepts_the_whole(save):
    """JPEGs are checked by their structure, not decoded (etl.media.check_jpeg): the decode it replaced refused every
    cut and accepted whatever Pillow writes; so does the walk, and bytes after the EOI are ignored as decoders do."""
    mode = save.pop("mode", "RGB")
    body = _noise_jpeg(mode=mode, **save)
    assert sniff_image(body) == ("image/jpeg", 160, 120)
    check_jpeg(body + b"trailing bytes after the end")
    for cut in range(0, len(body), 7):
        with pytest.raises(NotAnImage):
            check_jpeg(body[:cut])
    with pytest.raises(NotAnImage, match="no EOI"):
        check_jpeg(body[:-2])


def _segment(body: bytes, marker: int) -> int:
    """Where the first segment with this marker starts."""
    pos = 2
    while body[pos + 1] != marker:
        pos += 2 + int.from_bytes(body[pos + 2 : pos + 4], "big")
    return pos


@pytest.mark.parametrize(
    ("marker", "offset", "value", "what"),
    [
        (0xC4, 4, 0x25, "Huffman table"),  # table class 2 does not exist
        (0xC4, 5, 0xFF, "Huffman table"),  # 255 codes of length 1: the code space overflows
        (0xC0, 11, 0x00, "frame header"),  # a component sampled 0 times
        (0xDA, 5, 0x99, "scan header"),  # a component the frame does not have
    ],
)
@pytest.mark.badinput("a JPEG whose tables or headers are damaged is refused, as libjpeg's decode refused it")
def test_jpeg_check_refuses_damaged_tables_and_headers(marker, offset, value, what):
    body = bytearray(_noise_jpeg())
    body[_segment(bytes(body), marker) + offset] = value
    with pytest.raises(NotAnImage, match=what):
        sniff_image(bytes(body))


def test_jpeg_check_accepts_what_libjpeg_only_warns_about():
    """Stray bytes before a marker (libjpeg: "extraneous bytes before marker", a warning) and a damaged Huffman
    table no scan uses (libjpeg builds only the tables its scans use) are decoded by Pillow: such a file is an
    image, not a permanent failure. The same damage in a table a scan uses is still refused."""
    body = _noise_jpeg()
    at = _segment(body, 0xDB)
    stray = body[:at] + b"\x00\x17" + body[at:]
    stray_zero = body[:at] + b"\x00\xff\x00\x17" + body[at:]  # among them 0xFF 0x00, no marker either
    # A DC table whose only code stands for symbol 16, which no DC coefficient can have: in slot 3, no scan uses it.
    bad_table = lambda slot: b"\xff\xc4\x00\x14" + bytes([slot]) + b"\x01" + b"\x00" * 15 + b"\x10"  # noqa: E731
    sos = _segment(body, 0xDA)
    unused = body[:sos] + bad_table(3) + body[sos:]
    for variant in (stray, stray_zero, unused):
        Image.open(io.BytesIO(variant)).load()  # Pillow (libjpeg) decodes it
        check_jpeg(variant)
        assert sniff_image(variant) == ("image/jpeg", 160, 120)
    used = body[:sos] + bad_table(0) + body[sos:]  # the same table in slot 0, which the scan decodes with
    with pytest.raises(NotAnImage, match="Huffman table of the JPEG's scan"):
        check_jpeg(used)


def test_a_jpeg_is_checked_without_a_decode():
    """The budget of decodes is never asked for by a JPEG (a PNG neither); a GIF still is decoded."""

    class Counting(DecodeBudget):
        asked: list[int] = []

        def reserve(self, need: int):
            self.asked.append(need)
            return super().reserve(need)

    budget = Counting()
    sniff_image(_noise_jpeg(progressive=True), budget)
    sniff_image(_png("RGB"), budget)
    assert budget.asked == []
    sniff_image(image_bytes("GIF"), budget)
    assert len(budget.asked) == 1


def _png(mode: str, size=(33, 21), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert(mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunks(body: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk of a PNG."""
    out, pos = [], 8
    while pos < len(body):
        length = int.from_bytes(body[pos : pos + 4], "big")
        out.append((pos, body[pos + 4 : pos + 8]))
        pos += 12 + length
    return out


@pytest.mark.parametrize(
    ("mode", "save"),
    [("RGB", {}), ("RGBA", {}), ("L", {}), ("P", {}), ("1", {}), ("I;16", {}), ("RGB", {"interlace": 1})],
)
def test_png_check_accepts_whole_pngs_of_every_kind(mode, save):
    """PNGs are checked by their own checksums, not decoded (etl.media.check_png): whatever Pillow writes passes."""
    body = _png(mode, **save)
    assert sniff_image(body) == ("image/png", 33, 21)


@pytest.mark.badinput("a PNG cut short anywhere, or with any byte altered, is refused by its checksums")
def test_png_check_refuses_every_cut_and_every_altered_byte():
    body = _png("RGB", size=(24, 16))
    check_png(body)
    for cut in range(len(body)):  # every length short of the whole
        with pytest.raises(NotAnImage):
            check_png(body[:cut])
    for where in range(len(body)):  # every byte, signature and CRCs included
        altered = bytearray(body)
        altered[where] ^= 0x10
        with pytest.raises(NotAnImage):
            check_png(bytes(altered))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(data, zlib.crc32(kind)).to_bytes(4, "big")


def _built_png(width: int, height: int, depth: int, colour: int, interlace: int, extra: int = 0) -> bytes:
    """A PNG built by hand (Pillow writes no interlaced ones): its rows, pass by pass for Adam7, found by walking
    the pixels each holds; `extra` bytes more (or fewer, if negative) than they need."""
    import random
    import zlib

    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    rng, raw = random.Random(width * height), bytearray()
    for x0, y0, dx, dy in passes if interlace else [(0, 0, 1, 1)]:
        columns = len(range(x0, width, dx))
        for _ in range(y0, height, dy) if columns else ():
            raw += b"\0" + rng.randbytes((columns * depth * channels + 7) // 8)  # filter "none", then the pixels
    raw = bytes(raw) + bytes(max(0, extra)) if extra >= 0 else bytes(raw[:extra])
    plte = _png_chunk(b"PLTE", bytes(range(256)) * 3) if colour == 3 else b""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, colour, 0, 0, interlace])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + plte + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize(
    ("width", "height", "depth", "colour"),
    [(1, 1, 8, 0), (3, 5, 1, 0), (9, 9, 2, 3), (33, 21, 4, 0), (7, 2, 16, 2), (5, 11, 8, 6), (10, 3, 16, 4)],
)
def test_png_check_inflates_as_many_bytes_as_the_header_declares(width, height, depth, colour, interlace):
    """Interlaced or not, at every depth: the whole image data passes, as Pillow decodes it; a byte short is refused,
    as Pillow refuses it; data past the last row is not inflated and, as Pillow ignores it, accepted."""
    whole = _built_png(width, height, depth, colour, interlace)
    Image.open(io.BytesIO(whole)).load()
    check_png(whole)
    short = _built_png(width, height, depth, colour, interlace, extra=-1)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(short)).load()
    with pytest.raises(NotAnImage, match="bytes its header declares"):
        check_png(short)
    longer = _built_png(width, height, depth, colour, interlace, extra=1000)
    Image.open(io.BytesIO(longer)).load()
    check_png(longer)


def test_png_check_refuses_image_data_that_does_not_inflate_to_its_end():
    """Chunks whose CRCs hold (recomputed, as a faulty encoder would) around a zlib stream cut short."""
    import zlib

    body = _png("RGB", size=(64, 48))
    (pos, kind), = [(p, k) for p, k in _chunks(body) if k == b"IDAT"]
    length = int.from_bytes(body[pos : pos + 4], "big")
    data = body[pos + 8 : pos + 8 + length][: length // 2]
    idat = len(data).to_bytes(4, "big") + b"IDAT" + data + zlib.crc32(data, zlib.crc32(b"IDAT")).to_bytes(4, "big")
    broken = body[:pos] + idat + body[pos + 12 + length :]
    with pytest.raises(NotAnImage, match="zlib stream"):
        check_png(broken)
    garbage = b"\x78\x9c" + bytes(range(200))  # a zlib header, then no valid deflate data
    idat = len(garbage).to_bytes(4, "big") + b"IDAT" + garbage + zlib.crc32(garbage, zlib.crc32(b"IDAT")).to_bytes(4, "big")
    with pytest.raises(NotAnImage, match="does not inflate"):
        check_png(body[:pos] + idat + body[pos + 12 + length :])
