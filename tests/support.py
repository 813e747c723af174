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
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer._serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                outer._serve(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
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
