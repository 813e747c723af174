"""Bad input through the whole pipeline: each bad item refused with a clear message, everything else loaded.

Each test runs the real Runner in-process on a jsonl file, against the real PostgreSQL and a local store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etl.errors import ExitCode
from etl.run.runner import Runner, RunRequest
from etl.run.stats import RunStats
from etl.store import LocalStore
from tests.support import Reply, png_bytes, record, write_jsonl


@pytest.fixture
def run_jsonl(make_settings, db, tmp_path: Path):
    def run(lines: list, **env: str) -> RunStats:
        path = write_jsonl(tmp_path / "input.jsonl", lines)
        # Timeouts wide enough for a loaded CI machine: these runs fetch from the test's own server in this
        # process, and 0.5 s (as before) was shorter than the stalls a 2-core machine shared by several test
        # suites gives it; the loopback image then failed once. No test here waits for a timeout to expire.
        settings = make_settings(ETL_CONNECT_TIMEOUT="10", ETL_READ_TIMEOUT="10", ETL_HTTP_RETRIES="1", **env)
        runner = Runner(settings, db=db, store=LocalStore(settings.objects_dir))
        return runner.execute(RunRequest(sources=["jsonl"], source_options={"jsonl": {"input": str(path)}}))

    return run


def rows(db, sql: str) -> list[tuple]:
    with db.transaction() as cur:
        cur.execute(sql)
        return cur.fetchall()


def post_ids(db) -> list[str]:
    return [r[0] for r in rows(db, "SELECT post_id FROM social_posts ORDER BY post_id")]


BAD_LINES = [
    ("truncated JSON", '{"platform": "jsonl", "post_id": "bad", "created_at": "2024-01-0', "not valid JSON"),
    ("a JSON array, not an object", "[1, 2, 3]", "expected a JSON object"),
    ("a bare string", '"just text"', "expected a JSON object"),
    ("missing platform", record(post_id="bad", platform=None), "missing platform"),
    ("missing post_id", record(post_id=None), "missing post_id"),
    ("missing created_at", record(post_id="bad", created_at=None), "missing created_at"),
    ("post_id of the wrong type", record(post_id=["bad"]), "post_id must be text or a whole number"),
    (
        "like_count of the wrong type",
        record(post_id="bad", like_count="lots"),
        "like_count 'lots' is not a whole number",
    ),
    ("caption of the wrong type", record(post_id="bad", caption={"t": 1}), "caption must be text"),
    ("image_urls of the wrong type", record(post_id="bad", image_urls=5), "image_urls must be a list of URLs"),
    ("negative like_count", record(post_id="bad", like_count=-5), "like_count -5 is out of range"),
    (
        "huge comment_count",
        record(post_id="bad", comment_count=10**15),
        "comment_count 1000000000000000 is out of range",
    ),
    (
        "a number of 5,000 digits",
        '{"platform": "jsonl", "post_id": "bad", "like_count": ' + "9" * 5000 + "}",
        "not valid JSON",
    ),
    ("created_at far in the future", record(post_id="bad", created_at="2999-01-01T00:00:00Z"), "in the future"),
    ("created_at before 2000", record(post_id="bad", created_at="1970-01-01T00:00:00Z"), "before 2000"),
    ("unparseable created_at", record(post_id="bad", created_at="31/12/2024"), "not an ISO 8601 date"),
    (
        "Infinity in raw (JSON for Python, not for PostgreSQL)",
        '{"platform": "jsonl", "post_id": "bad", "created_at": "2024-03-01T12:00:00Z", "raw": {"v": [Infinity]}}',
        "raw.v[0] = inf",
    ),
    ("a NUL byte in the post_id", record(post_id="bad\x00id"), "NUL byte"),
    ("a lone surrogate in the post_id", record(post_id="bad\ud800"), "lone surrogate"),
    ("a platform name with a slash", record(post_id="bad", platform="../etc"), "platform '../etc'"),
    (
        "invalid UTF-8 bytes",
        b'{"platform": "jsonl", "post_id": "bad", "caption": "caf\xe9"}',
        "not valid UTF-8 (byte 0xe9",
    ),
    ("nesting thousands of levels deep", '{"raw": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
]


@pytest.mark.parametrize(("bad", "message"), [pytest.param(b, m, id=i) for i, b, m in BAD_LINES])
@pytest.mark.badinput("a jsonl line that is malformed, mistyped, missing a field or absurd is refused by line number")
def test_bad_line_is_refused_and_the_rest_loads(run_jsonl, db, bad, message):
    stats = run_jsonl([record(post_id="before"), bad, record(post_id="after")])
    assert post_ids(db) == ["after", "before"]
    assert stats.rejected == 1
    assert stats.exit_code == ExitCode.PARTIAL
    [problem] = stats.errors
    assert "input.jsonl line 2" in problem
    assert message in problem
    assert rows(db, "SELECT status, posts_rejected, posts_inserted FROM etl_runs") == [("partial", 1, 2)]


@pytest.mark.badinput("a file mixing every kind of bad line loads all its good lines")
def test_a_file_of_many_bad_lines_loads_every_good_one(run_jsonl, db):
    lines: list = []
    for n, (_, bad, _) in enumerate(BAD_LINES):
        lines += [record(post_id=f"good-{n:02d}"), bad]
    stats = run_jsonl(lines)
    assert post_ids(db) == [f"good-{n:02d}" for n in range(len(BAD_LINES))]
    assert stats.rejected == len(BAD_LINES)
    assert [int(e.split(" line ")[1].split()[0].rstrip(":")) for e in stats.errors] == list(
        range(2, 2 * len(BAD_LINES) + 1, 2)
    )


@pytest.mark.badinput("NUL bytes and lone surrogates in a caption are cleaned and the post loads")
def test_nul_bytes_and_lone_surrogates_in_text_are_cleaned(run_jsonl, db):
    line = json.dumps(
        record(post_id="1", caption="nul\u0000 and \ud83d lone", author_username="a\u0000b", raw={"x\u0000": "\udc00"})
    )
    assert "\\u0000" in line and "\\ud83d" in line  # JSON escapes, as an API would send them
    stats = run_jsonl([line])
    assert stats.exit_code == ExitCode.OK
    assert rows(db, "SELECT caption, author_username, raw FROM social_posts") == [
        ("nul and \ufffd lone", "ab", {"x": "\ufffd"})
    ]


@pytest.mark.badinput("every kind of Unicode (emoji, RTL, combining marks, CJK) is stored exactly")
def test_every_kind_of_unicode_is_stored_exactly(run_jsonl, db):
    captions = {
        "emoji": "Sunset 🌅🔥 with 👩‍👩‍👧‍👦 and flags 🇯🇵🏳️‍🌈 #travel",
        "rtl": "שלום עולם مرحبا بالعالم \u202eevil\u202c",
        "combining": "e\u0301 a\u0308 Z\u0335\u0321\u0322 n\u0303",
        "cjk": "漢字 かな カナ 한국어 𠮷野家",
        "zero-width": "a\u200bb\u200dc\ufeffd",
    }
    stats = run_jsonl([record(post_id=k, caption=v, author_username=f"ü_{k}") for k, v in captions.items()])
    assert stats.exit_code == ExitCode.OK
    stored = dict(rows(db, "SELECT post_id, caption FROM social_posts"))
    assert stored == captions
    assert rows(db, "SELECT hashtags FROM social_posts WHERE post_id = 'emoji'") == [(["travel"],)]


@pytest.mark.badinput("duplicate post_ids in one input: one row, the last line wins")
def test_duplicate_post_ids_in_one_input_last_wins(run_jsonl, db):
    stats = run_jsonl(
        [record(post_id="d", like_count=1), record(post_id="x"), record(post_id="d", like_count=2, caption="Edited")]
    )
    assert stats.exit_code == ExitCode.OK
    assert rows(db, "SELECT post_id, like_count, caption FROM social_posts ORDER BY post_id") == [
        ("d", 2, "Edited"),
        ("x", 3, "What a lovely day #sun"),
    ]


@pytest.mark.badinput("timestamps with offsets are stored as UTC; timestamps without are taken as UTC")
def test_timestamps_with_and_without_offsets(run_jsonl, db):
    run_jsonl([
        record(post_id="offset", created_at="2024-03-01T23:30:00-05:00"),
        record(post_id="naive", created_at="2024-03-01T23:30:00"),
        record(post_id="zulu", created_at="2024-03-01T23:30:00Z"),
        record(post_id="plus", created_at="2024-03-02T08:00:00+09:30"),
    ])  # fmt: skip
    got = dict(
        rows(db, "SELECT post_id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM social_posts")
    )
    assert got == {
        "offset": "2024-03-02 04:30",
        "naive": "2024-03-01 23:30",
        "zulu": "2024-03-01 23:30",
        "plus": "2024-03-01 22:30",
    }


@pytest.mark.badinput("a very long post_id is stored and keyed safely inside the store")
def test_long_and_hostile_post_ids_are_stored_under_safe_keys(run_jsonl, db, http_server, tmp_path):
    http_server.routes["/a.png"] = Reply(body=png_bytes())
    ids = ["../../escape", "a/b", "a_b", "x" * 1000, "ctl\x07\x1b"]
    stats = run_jsonl(
        [record(post_id=i, image_urls=[http_server.url("/a.png")]) for i in ids], ETL_ALLOW_PRIVATE_HOSTS="true"
    )
    assert stats.exit_code == ExitCode.OK, stats.errors
    keys = [r[0] for r in rows(db, "SELECT storage_key FROM post_media")]
    assert len(set(keys)) == 5
    objects = tmp_path / "data" / "objects"
    files = sorted(p for p in objects.rglob("*") if p.is_file())
    assert len(files) == 5
    assert all(objects.resolve() in f.resolve().parents for f in files)
    assert not any((tmp_path / name).exists() for name in ("escape", "data/escape"))


# -- image URLs -----------------------------------------------------------------------------------------


def media(db) -> list[tuple]:
    return rows(db, "SELECT post_id, status, permanent, last_error FROM post_media ORDER BY post_id")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("file:///etc/passwd", "refused URL scheme 'file'"),
        ("ftp://example.com/a.png", "refused URL scheme 'ftp'"),
        ("data:image/png;base64,iVBORw0KGgo=", "refused URL scheme 'data'"),
        ("http://169.254.169.254/latest/meta-data/", "non-public address 169.254.169.254"),
        ("http://127.0.0.1:9/a.png", "non-public address 127.0.0.1"),
        ("http://[::1]/a.png", "non-public address ::1"),
        ("http://10.0.0.1/a.png", "non-public address 10.0.0.1"),
        ("http://224.0.0.1/a.png", "non-public address 224.0.0.1"),
    ],
)
@pytest.mark.badinput(
    "an image URL with another scheme or a non-public host: the post loads, the image is marked failed"
)
def test_refused_image_urls_fail_the_image_not_the_post(run_jsonl, db, url, error):
    stats = run_jsonl([record(post_id="p", image_urls=[url]), record(post_id="q")])
    assert post_ids(db) == ["p", "q"]
    [(post_id, status, permanent, last_error)] = media(db)
    # Another scheme is wrong for good; a non-public host is refused by this configuration only.
    assert (post_id, status, permanent) == ("p", "failed", "refused URL scheme" in error)
    assert error in last_error
    assert stats.images_failed == 1 and stats.exit_code == ExitCode.PARTIAL
    assert rows(db, "SELECT image_s3_url FROM social_posts WHERE post_id = 'p'") == [(None,)]


def test_loopback_images_are_refused_by_default_and_allowed_by_setting(run_jsonl, db, http_server):
    http_server.routes["/a.png"] = Reply(body=png_bytes())
    line = record(post_id="p", image_urls=[http_server.url("/a.png")])
    refused = run_jsonl([line])
    assert refused.images_failed == 1
    assert http_server.hits == {}
    assert media(db)[0][1:3] == ("failed", False)  # the refusal is the configuration's, not the host's
    # The same post imported again with the setting: its failed image is fetched and the row upgraded.
    allowed = run_jsonl([line], ETL_ALLOW_PRIVATE_HOSTS="true")
    assert allowed.images_stored == 1 and allowed.exit_code == ExitCode.OK
    assert media(db) == [("p", "stored", False, None)]
    assert http_server.hits == {"/a.png": 1}
