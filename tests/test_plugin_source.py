"""A new platform is one source file: ETL_SOURCE_PATHS loads it, and the real etl.py archives it end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, query
from tests.support import Reply, png_bytes

PLUGIN = '''
"""Posts of a tiny JSON API: one file, registered by importing it (README, "Adding a platform")."""

import logging

from etl.config import Secret, Setting, comma_list, http_base, text
from etl.records import post_from_dict
from etl.sources import register
from etl.sources.base import Source

SETTINGS = (
    Setting("TINY_BOARDS", comma_list, (), "boards whose posts to archive"),
    Setting("TINY_BASE", http_base, "https://tiny.example", "API base URL"),
    Setting("TINY_TOKEN", text, Secret(""), "API token", secret=True),
)
log = logging.getLogger(__name__)


@register
class TinySource(Source):
    name = "tiny"
    required = ("boards", "token")

    def streams(self):
        return [f"board:{b}" for b in self.config.boards]

    def fetch(self, window):
        log.info("tiny: token %s", self.config.token.reveal())  # a slip the log redaction must catch
        for stream in self.streams():
            if not self.reads(stream):
                continue
            self.stream = stream
            board = stream.removeprefix("board:")
            headers = {"Authorization": "Bearer " + self.config.token.reveal()}
            for item in self.session.get(f"{self.config.base}/{board}.json", headers=headers, timeout=10).json():
                post = post_from_dict({**item, "platform": "tiny"})
                if window.since is None or post.created_at >= window.since:
                    yield post
'''


def write_plugin(tmp_path: Path) -> Path:
    plugin = tmp_path / "tiny_source.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    return plugin


def test_a_source_from_a_single_file_is_archived_end_to_end(run_etl, http_server, db, tmp_path):
    plugin = write_plugin(tmp_path)
    http_server.routes["/img/a.png"] = Reply(body=png_bytes(5, 4))
    http_server.routes["/cats.json"] = Reply(body=(
        b'[{"post_id": "c1", "created_at": "2026-11-01T10:00:00Z", "caption": "a happy cat #cats",'
        b' "image_urls": ["' + http_server.url("/img/a.png").encode() + b'"]}]'
    ), content_type="application/json")  # fmt: skip
    http_server.routes["/dogs.json"] = Reply(
        body=b'[{"post_id": "d1", "created_at": "2026-11-02T10:00:00Z", "caption": "a dog"}]', content_type="application/json"
    )
    env = {"ETL_SOURCE_PATHS": str(plugin), "ETL_SOURCES": "tiny", "TINY_BASE": http_server.base,
           "TINY_BOARDS": "cats,dogs", "TINY_TOKEN": "tiny-token-5eC7", "ETL_ALLOW_PRIVATE_HOSTS": "true"}  # fmt: skip
    first = run_etl("run", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tiny-token-5eC7" not in first.stderr and "tiny: token ***" in first.stderr  # its secret is redacted
    api_calls = [headers for _, path, headers in http_server.requests if path == "/cats.json"]
    assert api_calls and api_calls[0]["Authorization"] == "Bearer tiny-token-5eC7"  # configured from the environment
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


@pytest.mark.badinput("a plugin source's own setting malformed, misspelt or missing")
def test_a_single_file_source_declares_its_own_settings(run_etl, db, tmp_path):
    plugin = write_plugin(tmp_path)
    env = {"ETL_SOURCE_PATHS": str(plugin), "ETL_SOURCES": "tiny", "TINY_BOARDS": "cats", "TINY_TOKEN": "tiny-token-5eC7"}
    bad = run_etl("run", env={**env, "TINY_BASE": "ftp://tiny.example"})
    assert bad.returncode == 2 and "TINY_BASE='ftp://tiny.example' is invalid" in bad.stderr
    secret = run_etl("run", env={**env, "TINY_TOKEN": "   "})  # blank: the default, which `required` refuses
    assert secret.returncode == 2 and "TINY_TOKEN is not set" in secret.stderr
    check = run_etl("check", env={**env, "TINY_BORDS": "dogs"})
    rows = {line.split()[1]: line for line in check.stdout.splitlines() if line.startswith(("source ", "settings "))}
    assert "credentials present" in rows["tiny"] and " ok " in rows["tiny"]  # `check` reports it as a source
    assert "misspelling of TINY_BOARDS" in rows["TINY_BORDS"]  # its names are known to the misspelling warning
    assert "tiny-token-5eC7" not in check.stdout + check.stderr

    out = tmp_path / "env.example"
    generated = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_env_example.py"), "--source-path", str(plugin), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    text = out.read_text()
    assert "# --- the tiny source (tiny_source.py) ---\n# boards whose posts to archive\n# TINY_BOARDS=\n" in text
    assert "# API token (SECRET)\n# TINY_TOKEN=\n" in text and "# TINY_BASE=https://tiny.example\n" in text
    assert "# DATABASE_URL=" in text and "# YOUTUBE_API_KEY=" in text  # with every other setting
    assert "TINY_" not in (ROOT / ".env.example").read_text()  # the repository's file is left alone
