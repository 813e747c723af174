"""A deterministic offline source: realistic posts whose images a loopback HTTP server of its own serves."""

from __future__ import annotations

import functools
import hashlib
import io
import random
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from etl.config import Setting, non_negative_int
from etl.records import Post, extract_hashtags
from etl.sources import register
from etl.sources.base import FetchWindow, Source

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

SETTINGS = (
    Setting("MOCK_SEED", non_negative_int, 42, "seed of the mock source"),
    Setting("MOCK_POSTS", non_negative_int, 40, "how many posts the mock source offers"),
)

# The feed's newest post; fixed so that the same seed always gives the same archive.
FEED_END = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)

_OPENINGS = [
    ("Absolutely love this view", 1), ("Best coffee in town, seriously amazing", 1),
    ("What a wonderful day with friends", 1), ("So happy with how this turned out", 1),
    ("New drop is here", 0), ("Morning commute, bus 42 again", 0), ("Throwback to last summer", 0),
    ("Sunday market haul", 0), ("Terrible service today, really disappointed", -1),
    ("Worst flight delay ever, so frustrating", -1), ("This update is awful and broken", -1),
    ("Rainy, cold and sad outside", -1),
]  # fmt: skip
_TAGS = ["travel", "foodie", "sunset", "tbt", "fitness", "coffee", "design", "music", "nofilter", "citylife"]
_EMOJI = ["😍", "🔥", "☕", "🌅", "😡", "😢", "🎉", "✨", "👀", "🙌"]
_USERS = ["maria.lens", "urban_eats", "trailrunner_42", "studio.kai", "the_daily_brew", "nomad.notes", "léa_photo"]


def _image(post_id: str, n: int, ext: str) -> bytes:
    from PIL import Image

    digest = hashlib.sha256(f"{post_id}/{n}".encode()).digest()
    size = (48 + digest[3] % 64, 32 + digest[4] % 64)
    img = Image.new("RGB", size, (digest[0], digest[1], digest[2]))
    for x in range(0, size[0], 8):  # a stripe, so images are not all flat
        img.paste((digest[5], digest[6], digest[7]), (x, 0, x + 3, size[1]))
    buf = io.BytesIO()
    img.save(buf, format="PNG" if ext == "png" else "JPEG", quality=85)
    return buf.getvalue()


@functools.cache
def _image_handler() -> type:
    """The image server's handler, defined on first use: only a run of the mock source imports http.server."""
    from http.server import BaseHTTPRequestHandler

    class _ImageHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else each small response waits ~40 ms for a delayed ACK

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")  # img/{post_id}/{n}.{ext}
            if len(parts) != 3 or parts[0] != "img" or "." not in parts[2]:
                self.send_error(404)
                return
            stem, ext = parts[2].rsplit(".", 1)
            if ext not in ("png", "jpg") or not stem.isdigit():
                self.send_error(404)
                return
            body = _image(parts[1], int(stem), ext)
            self.send_response(200)
            self.send_header("Content-Type", "image/png" if ext == "png" else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return _ImageHandler


@register
class MockSource(Source):
    """Seeded fake posts: captions with hashtags, mentions, emoji and mixed sentiment; 0-4 images each."""

    name = "mock"

    def __init__(self, settings: Any, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def config_key(self) -> str:
        return f"seed={self.config.seed}"

    def open(self) -> None:
        if self._server is not None:
            return
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _image_handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-images", daemon=True)
        self._thread.start()
        self.trusted_hosts.add(f"127.0.0.1:{self._server.server_address[1]}")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _base_url(self) -> str:
        if self._server is None:
            self.open()
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def posts(self) -> Iterator[Post]:
        """The whole feed, newest first."""
        rng = random.Random(self.config.seed)
        created = FEED_END
        base = self._base_url()
        for i in range(self.config.posts):
            created -= timedelta(minutes=rng.randint(20, 600))
            post_id = f"m{self.config.seed}-{i:05d}"
            opening, _ = rng.choice(_OPENINGS)
            tags = rng.sample(_TAGS, rng.randint(0, 3))
            mention = f" with @{rng.choice(_USERS)}" if rng.random() < 0.3 else ""
            caption = f"{opening}{mention} {rng.choice(_EMOJI)} " + " ".join(f"#{t}" for t in tags)
            images = [f"{base}/img/{post_id}/{n}.{rng.choice(['png', 'jpg'])}" for n in range(rng.randint(0, 4))]
            yield Post(
                platform="mock",
                post_id=post_id,
                created_at=created,
                author_username=rng.choice(_USERS),
                caption=caption.strip(),
                like_count=int(rng.paretovariate(1.2) * 10),
                comment_count=rng.randint(0, 80),
                permalink=f"https://mock.example/p/{post_id}",
                image_urls=tuple(images),
                hashtags=extract_hashtags(caption),
                raw={"seed": self.config.seed, "index": i},
            )

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        for post in self.posts():
            if window.since is not None and post.created_at < window.since:
                break  # newest first: everything after is older
            if window.admits(post.created_at):
                yield post
