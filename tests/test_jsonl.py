"""The jsonl source: files and stdin, bad lines reported with their number and skipped, the CLI's exit code."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from etl.errors import ConfigError, ExitCode, UsageError
from etl.sources import source_class
from etl.sources.base import FetchWindow
from etl.sources.jsonl import JsonlSource
from tests.conftest import query
from tests.support import record, write_jsonl


def load(make_settings, lines: list, tmp_path: Path, **window) -> tuple[list, list[str]]:
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    source = JsonlSource(make_settings(), input=str(path))
    posts = list(source.fetch(FetchWindow(**window)))
    return posts, source.rejects


def test_registered_and_not_incremental():
    assert source_class("jsonl") is JsonlSource
    assert JsonlSource.incremental is False


def test_loads_every_good_line(make_settings, tmp_path):
    posts, rejects = load(make_settings, [record(post_id=str(n)) for n in range(5)], tmp_path)
    assert [p.post_id for p in posts] == ["0", "1", "2", "3", "4"]
    assert rejects == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"platform": "jsonl", "post_id": "x", "created_at": "2024-01-01"', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        (json.dumps(record(platform=None)), "missing platform"),
        (json.dumps(record(post_id=None)), "missing post_id"),
        (json.dumps(record(created_at="last tuesday")), "not an ISO 8601 date"),
        (json.dumps([record()]), "expected a JSON object"),
    ],
)
@pytest.mark.badinput("a bad jsonl line is reported with its line number and skipped; the rest load")
def test_a_bad_line_is_reported_with_its_number_and_skipped(make_settings, tmp_path, bad, message):
    lines = [record(post_id="a"), bad, record(post_id="b")]
    posts, rejects = load(make_settings, lines, tmp_path)
    assert [p.post_id for p in posts] == ["a", "b"]
    assert len(rejects) == 1
    assert "in.jsonl line 2" in rejects[0]
    assert message in rejects[0]


def test_the_reject_names_the_post_when_it_can(make_settings, tmp_path):
    _, rejects = load(make_settings, [record(post_id="abc", like_count=-4)], tmp_path)
    assert rejects == [
        f"jsonl: {tmp_path / 'in.jsonl'} line 1 (post_id 'abc'): like_count -4 is out of range (0 to 1000000000000)"
    ]


def test_blank_lines_crlf_and_a_byte_order_mark(make_settings, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(record(post_id="1")).encode()
        + b"\r\n\r\n   \n"
        + json.dumps(record(post_id="2")).encode()
    )
    source = JsonlSource(make_settings(), input=str(path))
    assert [p.post_id for p in source.fetch(FetchWindow())] == ["1", "2"]
    assert source.rejects == []


def test_stdin_binary_and_text(make_settings):
    data = (json.dumps(record(post_id="s1")) + "\n" + "{oops\n" + json.dumps(record(post_id="s2")) + "\n").encode()
    for stream in (io.BytesIO(data), io.StringIO(data.decode())):
        source = JsonlSource(make_settings(), input="-", stdin=stream)
        assert [p.post_id for p in source.fetch(FetchWindow())] == ["s1", "s2"]
        assert len(source.rejects) == 1 and source.rejects[0].startswith("jsonl: stdin line 2:")


def test_window_filters_by_created_at(make_settings, tmp_path):
    from datetime import datetime, timezone

    lines = [record(post_id="old", created_at="2023-01-01"), record(post_id="new", created_at="2024-06-01")]
    posts, _ = load(make_settings, lines, tmp_path, since=datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert [p.post_id for p in posts] == ["new"]


def test_missing_file_and_missing_input_are_config_errors_when_the_source_is_built(make_settings, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        JsonlSource(make_settings(), input=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="--input"):
        JsonlSource(make_settings())


def test_very_long_line_is_refused_without_holding_it(make_settings, monkeypatch):
    import etl.sources.jsonl as jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    data = (json.dumps(record(post_id="1")) + "\n" + json.dumps(record(post_id="2", caption="x" * 5000)) + "\n"
            + json.dumps(record(post_id="3")) + "\n").encode()  # fmt: skip
    source = JsonlSource(make_settings(), input="-", stdin=io.BytesIO(data))
    assert [p.post_id for p in source.fetch(FetchWindow())] == ["1", "3"]
    assert source.rejects == ["jsonl: stdin line 2: the line is longer than 1000 bytes"]


# -- through the command line -----------------------------------------------------------------------------


def test_cli_file_with_a_bad_line_loads_the_rest_and_exits_1(db, run_etl, tmp_path):
    path = write_jsonl(
        tmp_path / "posts.jsonl",
        [
            record(post_id="1"),
            '{"platform": "jsonl", "post_id": "2", "created_at": ',
            record(post_id="3"),
            record(post_id="4", created_at="2999-01-01"),
        ],
    )
    result = run_etl("run", "--source", "jsonl", "--input", str(path))
    assert result.returncode == ExitCode.PARTIAL, result.stderr
    assert "line 2" in result.stdout and "not valid JSON" in result.stdout
    assert "line 4 (post_id '4')" in result.stdout and "in the future" in result.stdout
    assert "rejected 2" in result.stdout
    assert query(db.dsn, "SELECT post_id FROM social_posts ORDER BY post_id") == [("1",), ("3",)]
    assert query(db.dsn, "SELECT status, posts_rejected, posts_inserted FROM etl_runs") == [("partial", 2, 2)]


def test_cli_stdin(db, run_etl):
    text = "\n".join(json.dumps(record(post_id=f"in-{n}", caption="Great fun 😀")) for n in range(3)) + "\n"
    result = run_etl("run", "--source", "jsonl", "--input", "-", input=text)
    assert result.returncode == ExitCode.OK, result.stderr
    assert "inserted 3" in result.stdout
    assert query(db.dsn, "SELECT count(*) FROM social_posts WHERE caption = 'Great fun 😀'") == [(3,)]


def test_cli_loads_a_post_of_a_platform_beginning_with_a_digit(db, run_etl):
    line = json.dumps(record(platform="9gag", post_id="a1", caption="hi"))
    result = run_etl("run", "--source", "jsonl", "--input", "-", input=line + "\n")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr[-1500:]
    assert "inserted 1" in result.stdout
    assert query(db.dsn, "SELECT platform, post_id FROM social_posts") == [("9gag", "a1")]


def test_cli_jsonl_without_input_is_a_usage_error(run_etl):
    result = run_etl("run", "--source", "jsonl")
    assert result.returncode == ExitCode.CONFIG
    assert "--input" in result.stderr
    assert issubclass(UsageError, ConfigError)


def test_a_post_made_in_a_leap_second_is_archived(db, run_etl, tmp_path):
    # 23:59:60 (RFC 3339, 2016-12-31; PostgreSQL takes it) was refused as "not an ISO 8601 date": the post was lost.
    lines = [record(post_id="leap", created_at="2016-12-31T23:59:60Z"), record(post_id="next", created_at="2017-01-01T00:00:01Z")]
    result = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "p.jsonl", lines)))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = query(db.dsn, "SELECT post_id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM social_posts ORDER BY created_at")
    assert rows == [("leap", "2017-01-01 00:00:00"), ("next", "2017-01-01 00:00:01")]
