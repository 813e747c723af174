"""A new platform is one source file: ETL_SOURCE_PATHS loads it, and the real etl.py archives it end to end."""

from __future__ import annotations

import textwrap

from tests.conftest import query
from tests.support import Reply, png_bytes

PLUGIN = '''
"""Posts of a tiny JSON API: one file, registered by importing it (README, "Adding a platform")."""

import os

from etl.records import post_from_dict
from etl.sources import register
from etl.sources.base import Source


@register
class TinySource(Source):
    name = "tiny"

    def streams(self):
        return [f"board:{b}" for b in os.environ["TINY_BOARDS"].split(",")]

    def fetch(self, window):
        for stream in self.streams():
            if not self.reads(stream):
                continue
            self.stream = stream
            board = stream.removeprefix("board:")
            for item in self.session.get(f"{os.environ['TINY_BASE']}/{board}.json", timeout=10).json():
                post = post_from_dict({**item, "platform": "tiny"})
                if window.since is None or post.created_at >= window.since:
                    yield post
'''


def test_a_source_from_a_single_file_is_archived_end_to_end(run_etl, http_server, db, tmp_path):
    plugin = tmp_path / "tiny_source.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    http_server.routes["/img/a.png"] = Reply(body=png_bytes(5, 4))
    http_server.routes["/cats.json"] = Reply(body=(
        b'[{"post_id": "c1", "created_at": "2026-11-01T10:00:00Z", "caption": "a happy cat #cats",'
        b' "image_urls": ["' + http_server.url("/img/a.png").encode() + b'"]}]'
    ), content_type="application/json")  # fmt: skip
    http_server.routes["/dogs.json"] = Reply(
        body=b'[{"post_id": "d1", "created_at": "2026-11-02T10:00:00Z", "caption": "a dog"}]', content_type="application/json"
    )
    env = {"ETL_SOURCE_PATHS": str(plugin), "ETL_SOURCES": "tiny", "TINY_BASE": http_server.base,
           "TINY_BOARDS": "cats,dogs", "ETL_ALLOW_PRIVATE_HOSTS": "true"}  # fmt: skip
    first = run_etl("run", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert query(db.dsn, "SELECT platform, post_id, hashtags FROM social_posts ORDER BY 2") == [
        ("tiny", "c1", ["cats"]), ("tiny", "d1", []),
    ]  # fmt: skip
    assert query(db.dsn, "SELECT status FROM post_media") == [("stored",)]
    keys = {k for (k,) in query(db.dsn, "SELECT config_key FROM etl_state WHERE source = 'tiny'")}
    assert keys == {"stream:board:cats", "stream:board:dogs"}  # its streams have state of their own
    plan = run_etl("plan", "--shards", "2", env=env)
    assert plan.returncode == 0 and "tiny:board:cats" in plan.stdout and "tiny:board:dogs" in plan.stdout
    again = run_etl("run", env=env)
    assert again.returncode == 0 and http_server.hits["/img/a.png"] == 1  # nothing fetched twice
    missing = run_etl("run", env={**env, "ETL_SOURCE_PATHS": str(tmp_path / "nope.py")})
    assert missing.returncode == 2 and "ETL_SOURCE_PATHS" in missing.stderr and "nope.py" in missing.stderr
