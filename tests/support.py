"""Test helpers: a programmable local HTTP server, image bytes, and env builders."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 16, height: int = 12, color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@dataclass
class Reply:
    """One canned response. `body` may be cut short with `send_bytes` (a truncated body)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = "image/png"
    send_length: bool = True  # send Content-Length (else the body ends when the connection closes)
    send_bytes: int | None = None  # stop after this many bytes of body
    delay: float = 0.0  # seconds before the status line


class HTTPServerFixture:
    """A threaded loopback HTTP server whose replies tests set per path: a Reply, a list (one per hit), or a callable."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply | list[Reply] | Callable[[BaseHTTPRequestHandler], Reply]] = {}
        self.hits: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.posted: list[tuple[str, bytes]] = []  # (path, body) of every POST
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer._serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                outer._serve(self, head=True)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""  # for the route; kept in `posted` too
                with outer._lock:
                    outer.posted.append((self.path, self.body))
                outer._serve(self)

            do_PUT = do_POST  # noqa: N815  (X's signed upload URLs take a PUT)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def _serve(self, handler: BaseHTTPRequestHandler, head: bool = False) -> None:
        path = handler.path
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            hit = self.hits[path]
            self.requests.append((handler.command, path, dict(handler.headers)))
        route = self.routes.get(path.split("?")[0], self.routes.get(path))
        if route is None:
            reply = Reply(status=404, body=b"not found", content_type="text/plain")
        elif callable(route):
            reply = route(handler)
        elif isinstance(route, list):
            reply = route[min(hit, len(route)) - 1]
        else:
            reply = route
        if reply.delay:
            time.sleep(reply.delay)
        try:
            handler.send_response(reply.status)
            if reply.content_type:
                handler.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            if reply.send_length:
                handler.send_header("Content-Length", str(len(reply.body)))
            else:
                handler.send_header("Connection", "close")
            handler.end_headers()
            if not head:
                body = reply.body if reply.send_bytes is None else reply.body[: reply.send_bytes]
                handler.wfile.write(body)
                handler.wfile.flush()
            if reply.send_bytes is not None or not reply.send_length:
                handler.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- added for the core and reliability tests ------------------------------------------------------

import datetime as _dt  # noqa: E402
import json as _json  # noqa: E402
import re as _re  # noqa: E402
import socket as _socket  # noqa: E402
import socketserver as _socketserver  # noqa: E402
from pathlib import Path as _Path  # noqa: E402


def record(**overrides: object) -> dict:
    """A valid normalized record (the jsonl format); keyword arguments replace or add fields (None removes one)."""
    base: dict = {
        "platform": "jsonl",
        "post_id": "p1",
        "author_username": "ana",
        "caption": "What a lovely day #sun",
        "created_at": "2024-03-01T12:00:00Z",
        "like_count": 3,
        "comment_count": 1,
        "permalink": "https://example.com/p/p1",
        "image_urls": [],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def write_jsonl(path: _Path, lines: list) -> _Path:
    """Write records (dicts, serialized as UTF-8, lone surrogates as \\u escapes the way JSON carries them) and
    raw lines (str or bytes, written as given), one per line."""
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            line = _re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", _json.dumps(line, ensure_ascii=False))
        out += (line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line) + b"\n"
    path.write_bytes(bytes(out))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeResolver:
    """A getaddrinfo stand-in: host -> list of addresses (or a list of such lists, one per call); records calls."""

    def __init__(self, answers: dict[str, list[str] | list[list[str]]]):
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: object, **kwargs: object) -> list:
        self.calls.append(host)
        answer = self.answers.get(host)
        if answer is None:
            raise _socket.gaierror(_socket.EAI_NONAME, "Name or service not known")
        if answer and isinstance(answer[0], list):  # one answer per call, the last repeated
            answer = answer[min(self.calls.count(host), len(answer)) - 1]
        return [
            (_socket.AF_INET6 if ":" in a else _socket.AF_INET, _socket.SOCK_STREAM, 6, "", (a, port)) for a in answer
        ]


class RawServer:
    """A loopback TCP server for faults an HTTP library will not produce: each connection, after the request
    head is read, is handed to the next script (a function of the socket); the last script repeats."""

    def __init__(self, *scripts: Callable[[_socket.socket], None]):
        self.scripts = list(scripts)
        self.connections = 0
        outer = self

        class Handler(_socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer.connections += 1
                    script = outer.scripts[min(outer.connections, len(outer.scripts)) - 1]
                head = b""
                self.request.settimeout(5)
                while b"\r\n\r\n" not in head:
                    data = self.request.recv(65536)
                    if not data:
                        return
                    head += data
                try:
                    script(self.request)
                except OSError:
                    pass

        self._lock = threading.Lock()
        self.server = _socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/img.png") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reset(sock: _socket.socket) -> None:
    """Abort the connection with a TCP RST."""
    import struct

    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def respond(body: bytes, *, content_type: str = "image/png", chunked: bool = False, trickle: float = 0.0) -> Callable:
    """A script that answers 200 with `body`: whole, chunked, or one byte every `trickle` seconds."""

    def script(sock: _socket.socket) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
        if chunked:
            sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            for i in range(0, len(body), 7):
                piece = body[i : i + 7]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        else:
            sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode())
            if trickle:
                for byte in body:
                    sock.sendall(bytes([byte]))
                    time.sleep(trickle)
            else:
                sock.sendall(body)
        sock.close()

    return script


def self_signed_cert(directory: _Path, hostname: str) -> tuple[_Path, _Path]:
    """A certificate for `hostname` only (and its key), to serve https under a name that is not the address."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def assert_refused_cleanly(result: object, dsn: str, secret: str, *needles: str) -> None:
    """A run refused by a platform for its credentials: exit 1, a message naming what to fix (`needles`),
    no traceback, the secret never shown, and no post loaded."""
    from tests.conftest import query

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert all(needle in output for needle in needles), output
    assert "Traceback" not in output and secret not in output
    assert query(dsn, "SELECT count(*) FROM social_posts")[0][0] == 0


def photo_like(seed: int, size: tuple[int, int] = (1600, 1200)) -> Image.Image:
    """A synthetic photograph: a lit gradient sky and ground, blurred shapes at random places, sensor noise.

    Distinct seeds give unrelated scenes; the same seed the same scene (for resized or cropped copies)."""
    import random

    from PIL import ImageDraw, ImageFilter

    rng = random.Random(seed)
    w, h = size
    angle = rng.uniform(0, 360)
    base = Image.linear_gradient("L").rotate(angle, resample=Image.Resampling.BILINEAR).resize(size)
    tint = [rng.randint(40, 220) for _ in range(3)]
    channels = [Image.eval(base, lambda v, t=t: int(v * 0.6 + t * 0.4)) for t in tint]
    image = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 14)):
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        x1, y1 = x0 + rng.randint(w // 12, w // 2), y0 + rng.randint(h // 12, h // 2)
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    image = image.filter(ImageFilter.GaussianBlur(w / 200))
    # Sensor noise from the seeded rng (uniform over 97..159: a standard deviation of 18). Not Image.effect_noise:
    # it draws from C's rand(), whose state depends on what ran before in the process, so the same seed gave
    # another picture in a full suite run than alone (and, 1 time in 30, a resized copy at distance 0).
    noise = Image.frombytes("L", size, rng.randbytes(w * h)).point(lambda v: 97 + v * 62 // 255).convert("RGB")
    return Image.blend(image, noise, 0.12)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


CHROMIUM = "/usr/bin/chromium"
_PROBE = """<pre id="layout-probe"></pre><script>
addEventListener('load', () => {
  const out = [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    const s = svg ? getComputedStyle(svg) : null;
    return {chart: f.dataset.chart, width: r.width, height: r.height, shapes: svg ? svg.querySelectorAll('path').length : 0,
            shown: !!s && s.display !== 'none' && s.visibility !== 'hidden' && +s.opacity > 0};
  });
  const imgs = [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}));
  document.getElementById('layout-probe').textContent = JSON.stringify({charts: out, images: imgs});
});
</script>"""


class RecordingProxy:
    """An HTTP proxy that answers nothing and records every request line it is sent (GET http://..., CONNECT
    host:443): Chromium pointed at it through --proxy-server cannot reach any network without it showing here."""

    def __init__(self) -> None:
        self.requests: list[str] = []

        def record_line(sock: _socket.socket) -> None:
            sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        outer = self

        class Server(RawServer):
            pass

        self.raw = Server(record_line)
        handler = self.raw.server.RequestHandlerClass
        original = handler.handle

        def handle(h: object) -> None:
            peek = h.request.recv(65536, _socket.MSG_PEEK)
            if peek:
                outer.requests.append(peek.split(b"\r\n", 1)[0].decode("latin-1"))
            original(h)

        handler.handle = handle
        self.address = f"127.0.0.1:{self.raw.server.server_address[1]}"

    def close(self) -> None:
        self.raw.close()


# Chromium's own background calls (clock sync, component updates, sign-in), made whatever the page holds and
# despite --disable-background-networking. Only these exact hosts are ignored: a font from fonts.googleapis.com
# or anything else a page asks for still counts.
CHROMIUM_OWN_HOSTS = ("clients2.google.com", "update.googleapis.com", "accounts.google.com")


def page_requests(requests: list[str]) -> list[str]:
    """The recorded requests that did not come from Chromium's own services."""
    own = []
    for line in requests:
        target = line.split(" ")[1] if " " in line else line
        host = target.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if host not in CHROMIUM_OWN_HOSTS:
            own.append(line)
    return own


def chromium(html_file: _Path, *, screenshot: _Path | None = None, probe: bool = True, timeout: float = 90) -> tuple[str, list[str]]:
    """Open `html_file` in headless Chromium with every network request sent to a RecordingProxy.

    Returns (the DOM after load, the requests that tried to leave the machine). With `probe`, a copy of the file
    gets a script measuring each chart's laid-out size (read back from the DOM); the file itself is not changed.
    With `screenshot`, the unmodified file is also rendered to that PNG."""
    import subprocess
    import tempfile

    proxy = RecordingProxy()
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-") as tmp:
            target = html_file
            if probe:
                target = _Path(tmp) / "probed.html"
                target.write_text(html_file.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
            flags = [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--proxy-server=http://{proxy.address}", "--proxy-bypass-list=<-loopback>",
                "--hide-scrollbars", "--window-size=1280,4200", "--virtual-time-budget=5000",
            ]  # fmt: skip
            result = subprocess.run(
                [*flags, f"--user-data-dir={tmp}/profile", "--dump-dom", target.resolve().as_uri()],
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            if result.returncode != 0:
                raise AssertionError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(
                    [*flags, f"--user-data-dir={tmp}/profile2", f"--screenshot={screenshot}", html_file.resolve().as_uri()],
                    capture_output=True, text=True, timeout=timeout, check=True,
                )  # fmt: skip
    finally:
        proxy.close()
    return result.stdout, page_requests(proxy.requests)


# -- image bombs: tiny files that declare huge images -----------------------------------------------------


def webp_declaring(width: int, height: int, color: tuple[int, int, int] = (9, 99, 199)) -> bytes:
    """A lossless WebP of a few dozen bytes whose header declares width x height pixels, and which decodes.

    A one-colour lossless image is coded with single-symbol Huffman codes, zero bits a pixel, so the same
    bitstream decodes at any size: the header's 14-bit width and height fields are all that change.
    """
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="WEBP", lossless=True)
    body = bytearray(buf.getvalue())
    assert body[12:16] == b"VP8L" and body[20] == 0x2F
    bits = int.from_bytes(body[21:25], "little") & ~((1 << 28) - 1)
    body[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(body)


# Runs a script (argv[1]) as __main__ and writes its own peak resident memory to stderr as `peak-rss-kb N`.
# Not getrusage's ru_maxrss: Linux carries the pre-exec memory into it (exec_mmap keeps the larger of the old and
# new peaks), and a child forked or vforked from pytest starts as a copy of pytest, so late in a full suite run
# ru_maxrss reported pytest's own 1.1-1.2 GB however little the child used. VmHWM is the peak of the process's
# address space since its exec, which is the number we mean.
PEAK_RSS_WRAPPER = """\
import resource, runpy, sys
sys.argv = sys.argv[1:]


def peak_kb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss // 1024 if sys.platform == "darwin" else maxrss


try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stderr.write(f"peak-rss-kb {peak_kb()}\\n")
"""


def peak_rss_mb(stderr: str) -> float:
    """The peak RSS (MB) reported by PEAK_RSS_WRAPPER."""
    found = _re.findall(r"peak-rss-kb (\d+)", stderr)
    assert found, stderr[-2000:]
    return int(found[-1]) / 1024


class DatabaseProxy:
    """A TCP proxy in front of the test PostgreSQL (TCP or a unix socket), so a test can cut the database away
    from a running process (`cut()`: every connection closed, new ones refused) and bring it back (`restore()`)."""

    def __init__(self, dsn: str):
        import psycopg2.extensions

        params = psycopg2.extensions.parse_dsn(dsn)
        host, port = params.get("host") or "localhost", int(params.get("port") or 5432)
        self._target = (_socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (_socket.AF_INET, (host, port))
        self.port = free_port()
        from urllib.parse import quote

        user, password = quote(params.get("user") or "postgres"), quote(params.get("password") or "")
        self.dsn = f"postgresql://{user}{':' + password if password else ''}@127.0.0.1:{self.port}/{params.get('dbname') or 'postgres'}"
        self._conns: list[_socket.socket] = []
        self._listener: _socket.socket | None = None
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = _socket.socket()
        listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: _socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = _socket.socket(self._target[0])
            upstream.connect(self._target[1])
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: _socket.socket, dst: _socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(_socket.SHUT_RDWR)  # wakes the accepting thread; close alone does not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(_socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()


def run_in_pty(
    args: list[str], *, env: dict[str, str], cwd: _Path | str, feed: list[bytes] = (), delay: float = 0.0, timeout: float = 120
) -> tuple[int, str]:
    """Run a process with stdout and stderr on a pseudo-terminal (200 columns), feeding `feed` to its stdin one
    item every `delay` seconds; (exit code, everything it wrote to the terminal, with \\r\\n made \\n)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.stdin is not None
        for item in feed:
            proc.stdin.write(item)
            proc.stdin.flush()
            time.sleep(delay)
        proc.stdin.close()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


# -- fake platform APIs served from recorded fixtures (bluesky, mastodon, reddit) ---------------------------


class FixtureAPI:
    """A fake API on an HTTPServerFixture: fixture files with the platform's media hosts pointed at the server,
    and every media URL found in them served as a small JPEG (a distinct one per path)."""

    def __init__(self, server: HTTPServerFixture, folder: _Path, media_hosts: tuple[str, ...]):
        self.server, self.folder, self.media_hosts = server, folder, media_hosts
        self.overrides: dict[str, list[Reply]] = {}  # path -> replies served (in order) before the normal answers
        self.images: dict[str, bytes] = {}
        for path in sorted(folder.glob("*.json")):
            for url in _re.findall(r'https?://[^"\s]+', self.text(path.name)):
                if url.startswith(server.base + "/") and not url.startswith(server.base + "/api/"):
                    image_path = url[len(server.base) :].split("?")[0]
                    if image_path not in self.images and _re.search(r"\.(jpe?g|png|mp4)$|@jpeg$", image_path):
                        self.images[image_path] = jpeg_bytes(10 + len(self.images), 10)
                        server.routes[image_path] = Reply(body=self.images[image_path], content_type="image/jpeg")

    def text(self, name: str) -> str:
        text = (self.folder / name).read_text(encoding="utf-8")
        for host in self.media_hosts:
            text = text.replace(host, self.server.base)
        return text

    def json(self, name: str) -> object:
        return _json.loads(self.text(name))

    def reply(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        data = body if isinstance(body, bytes) else _json.dumps(body).encode()
        return Reply(status=status, body=data, content_type="application/json; charset=utf-8", headers=headers or {})

    def error(self, name: str, status: int, headers: dict[str, str] | None = None) -> Reply:
        return self.reply((self.folder / name).read_bytes(), status, headers)

    def overridden(self, path: str) -> Reply | None:
        queue = self.overrides.get(path)
        return queue.pop(0) if queue else None

    def api_calls(self, prefix: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
        """(path, query parameters, headers) of every request under `prefix`, in order."""
        from urllib.parse import parse_qs, urlsplit

        calls = []
        for _, path, headers in self.server.requests:
            parts = urlsplit(path)
            if parts.path.startswith(prefix):
                calls.append((parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}, headers))
        return calls


def stored_objects(root: _Path) -> set[str]:
    """Keys of the local object store under `root` (ETL_DATA_DIR/objects)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def stream_states(dsn: str, source: str) -> dict:
    """The state rows of a source's streams merged into one cursor shape, {"streams": {key: state}}, checking that
    each stream has a row of its own (config_key "stream:KEY") holding its own state only."""
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT config_key, cursor FROM etl_state WHERE source = %s", (source,))
        rows = cur.fetchall()
    conn.close()
    merged: dict = {}
    for key, cursor in rows:
        assert key.startswith("stream:"), f"{source}: a state row not kept per stream: {key!r}"
        streams = (cursor or {}).get("streams", {})
        assert set(streams) <= {key.removeprefix("stream:")}, (key, cursor)
        merged.update(streams)
    return {"streams": merged}


# -- the advisory locks of runs, as the lock tests read them -----------------------------------------------

# The advisory locks other sessions hold in this database, as runs and commands hold them: pid, classid, objid, mode
# (not the one a load takes for its transaction alone: etl/db/archive.py, LOADS_LOCK).
ADVISORY = (
    "SELECT pid, classid, objid, mode FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND pid <> pg_backend_pid()"
    " AND classid::bigint <> (hashtext('social-archiver:loads')::bigint & 4294967295)"
)
ARCHIVE_LOCK = "hashtext('social-archiver:archive'), 0"  # its two keys (etl/db/ledger.py)


# -- shared by the S3 fault tests, the direct-PUT tests and the security tests -----------------------------

BUCKET = "archive-test"
Injection = tuple[int, str, bytes] | str | None  # (status, code, body) | "drop" | None (forward)


class FaultProxy:
    """Forwards to moto; `plan(method, path, n)` may answer instead (n counts requests of that method)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.plan: Callable[[str, str, int], Injection] = lambda method, path, n: None
        self.counts: dict[str, int] = {}
        self.forwarded: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer.lock:
                    n = outer.counts[self.command] = outer.counts.get(self.command, 0) + 1
                injected = outer.plan(self.command, self.path, n)
                if injected == "drop":
                    self.close_connection = True
                    self.connection.close()  # the endpoint went away: no status line at all
                    return
                if injected is not None:
                    status, code, extra = injected
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected {code}</Message></Error>"
                    ).encode() + extra
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                with outer.lock:
                    outer.forwarded[self.command] = outer.forwarded.get(self.command, 0) + 1
                conn = http.client.HTTPConnection("127.0.0.1", outer.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(name, value)
                # A HEAD has no body, but its Content-Length is the object's: pass moto's on.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_one  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_env(proxy: FaultProxy, **extra: str) -> dict[str, str]:
    """bucket_env() through the fault proxy, with small batches and quick retries."""
    return bucket_env(proxy.url, BUCKET, **{
        "S3_PREFIX": "archive/",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
        "ETL_BATCH_SIZE": "10",
        "ETL_CONCURRENCY": "4",
        "ETL_RETRY_MAX_WAIT": "0.2",
        "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0",
        **extra,
    })  # fmt: skip


def stored_keys(client: object) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def write_posts(path: _Path, server, n: int, *, delay: float = 0.0, prefix: str = "p") -> _Path:
    """n jsonl posts, one image each, served by `server` after `delay` seconds."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            server.routes[f"/img/{prefix}{i}.png"] = Reply(body=png_bytes(4 + i % 7, 4, (i % 256, 80, 160)), delay=delay)
            post = {
                "platform": "fixture",
                "post_id": f"{prefix}{i}",
                "caption": f"post number {i} is great",
                "created_at": f"2026-10-{1 + i % 28:02d}T12:00:00Z",
                "like_count": i,
                "image_urls": [server.url(f"/img/{prefix}{i}.png")],
            }
            f.write(json.dumps(post) + "\n")
    return path


def fetch_over_fake(source_cls: type, fake_cls: type, env: Callable[..., dict[str, str]], tmp_path: _Path) -> list:
    """Everything a source yields from its fake API's fixtures on loopback (the contract test's input)."""
    from etl.config import load_settings
    from etl.sources.base import FetchWindow

    server = HTTPServerFixture()
    try:
        fake_cls(server)
        settings = load_settings(env(server, tmp_path), dotenv_path=None)
        source_cls.check_settings(settings)
        with source_cls(settings) as source:
            return list(source.fetch(FetchWindow()))
    finally:
        server.close()


def start_etl(tmp_path: _Path, env: dict[str, str], *args: str):
    """The real `python etl.py ARGS` as a child process (stdout and stderr piped), for tests that signal it."""
    import subprocess
    import sys

    root = _Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, str(root / "etl.py"), *args],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def process_env(tmp_path: _Path, dsn: str, **extra: str) -> dict[str, str]:
    """The environment of a real etl.py child: the test database, a data dir under tmp_path, loopback images."""
    import os

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(_Path.home() / ".cache"),  # one unpacked model
        "DATABASE_URL": dsn,
        "ETL_DATA_DIR": str(tmp_path / "data"),
        "ETL_ALLOW_PRIVATE_HOSTS": "true",
    }
    env.update(extra)
    return env


# -- what a child process imported (issue 16: start-up cost) -------------------------------------------------

# Runs etl.py as `python etl.py` would, then writes the names of every module it imported to stderr.
MODULES_AT_EXIT = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("modules-at-exit:", ",".join(sorted(sys.modules)), file=sys.stderr, flush=True)
"""


def imported(result) -> set[str]:
    """The modules a child run with the MODULES_AT_EXIT wrapper had imported when it ended."""
    line = next(line for line in result.stderr.splitlines() if line.startswith("modules-at-exit: "))
    return set(line.removeprefix("modules-at-exit: ").split(","))


def iam_user_key(moto_url: str) -> tuple[str, str]:
    """(access key, secret) of a new IAM user of moto's that may do anything in S3: a key moto's signature checks
    (moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0) accept."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )  # fmt: skip
    iam.create_user(UserName="archiver")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="archiver", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="archiver")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def die_in_worker(rows: object) -> None:
    """A scoring worker killed mid-task (picklable by name, as the pools send their tasks)."""
    import os

    os._exit(1)


def still_alive(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive (not zombies) after waiting up to `seconds` for them to end."""
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def outliving_a_killed_parent(tmp_path: _Path, code: str, count: int) -> list[int]:
    """Run `code` in a Python process that prints the pids of the `count` workers it started, then SIGKILLs itself
    (nothing of its own shutdown runs); the workers still alive 30 s later, killed here so that no test leaves them."""
    import os
    import signal
    import subprocess
    import sys

    # Into files, not pipes: the workers inherit them, and a pipe would stay open as long as they live.
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        done = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=err, timeout=120,
                              cwd=_Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (tmp_path / "err").read_text()[-2000:]
    workers = [int(pid) for pid in (tmp_path / "out").read_text().split()]
    assert len(workers) == count
    alive = still_alive(workers, 30)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


# -- S3 over moto's server, and the media rows: shared by the copy-store, lock and end-to-end S3 tests ----------


def s3_client(endpoint: str):
    """A boto3 S3 client of moto's server at `endpoint` (its fixed test credentials)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def bucket_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """The settings of an archive kept in `bucket` of moto's server at `endpoint` (no fault proxy: see s3_env)."""
    env = {
        "S3_BUCKET": bucket,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    env.update(extra)
    return env


def media_rows(dsn: str) -> list[tuple]:
    """post_media as (id, storage_key, storage_url, sha256, platform, post_id, position), by id."""
    from tests.conftest import query

    return query(
        dsn, "SELECT id, storage_key, storage_url, sha256, platform, post_id, position FROM post_media ORDER BY id"
    )
