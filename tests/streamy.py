"""A source with many streams for the shard and Airflow tests, and its fake API over real HTTP.

`streamy` reads STREAMY_BASE/feed/NAME for each NAME of STREAMY_STREAMS (newest first, JSON records in our
normalized format); images are served by the same server. Importing this module registers the source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from etl.errors import RecordError, SourceError
from etl.records import Post, post_from_dict
from etl.sources import REGISTRY, register
from etl.sources.base import FetchWindow, Source
from tests.support import HTTPServerFixture, Reply, png_bytes

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


class StreamySource(Source):
    """One stream per name in STREAMY_STREAMS; each is an HTTP feed of normalized records, newest first."""

    name = "streamy"

    @staticmethod
    def _names() -> list[str]:
        return [n for n in os.environ.get("STREAMY_STREAMS", "").split(",") if n]

    def streams(self) -> list[str]:
        return [f"feed:{n}" for n in self._names()]

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        base = os.environ["STREAMY_BASE"]
        for name in self._names():
            if not self.reads(f"feed:{name}"):
                continue
            self.stream = f"feed:{name}"
            response = self.session.get(f"{base}/feed/{name}", timeout=10)
            if response.status_code != 200:
                raise SourceError(f"streamy feed {name}: HTTP {response.status_code}")
            for item in response.json():
                try:
                    post = post_from_dict(item)
                except RecordError as exc:
                    self.reject(f"feed {name}", str(exc))
                    continue
                if window.since is not None and post.created_at < window.since:
                    break
                if window.until is not None and post.created_at >= window.until:
                    continue
                yield post


if "streamy" not in REGISTRY:
    register(StreamySource)


class StreamyAPI:
    """Feeds of `per_stream` posts each (one PNG image per post), served by a local HTTP server."""

    def __init__(self, server: HTTPServerFixture, names: list[str], per_stream: int = 4, start: datetime = T0):
        self.server, self.names = server, names
        for n, name in enumerate(names):
            records = []
            for k in range(per_stream):
                post_id = f"{name}-{k}"
                image = f"/img/{post_id}.png"
                server.routes[image] = Reply(body=png_bytes(8 + n, 6 + k), content_type="image/png")
                records.append({
                    "platform": "streamy", "post_id": post_id, "author_username": f"author-{name}",
                    "caption": f"post {k} of {name} #shards", "created_at": (start - timedelta(hours=k, minutes=n)).isoformat(),
                    "like_count": k, "image_urls": [server.url(image)],
                })  # fmt: skip
            self.serve(name, records)

    def serve(self, name: str, records: list[dict], status: int = 200) -> None:
        body = json.dumps(records).encode() if status == 200 else b'{"error": "boom"}'
        self.server.routes[f"/feed/{name}"] = Reply(status=status, body=body, content_type="application/json")

    def env(self) -> dict[str, str]:
        return {"STREAMY_BASE": self.server.base, "STREAMY_STREAMS": ",".join(self.names)}
