"""Test helpers: a programmable local HTTP server, image bytes, and env builders."""

from __future__ import annotations

import io
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
