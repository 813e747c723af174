"""The short paths of reading a jsonl post agree with the careful ones on awkward input: the same value or the
same error. The block reader against the line-by-line one, json's scanner against json.loads, each field of
post_from_dict against its careful helper, the resume tracker's inline marks against StreamMark.add."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etl import records
from etl.errors import RecordError
from etl.records import MAX_CAPTION_CHARS, MAX_COUNT, Post, parse_datetime, post_from_dict
from etl.resume import ResumePoint, ResumeTracker, StreamMark
from etl.sources import jsonl
from etl.sources.base import FetchWindow
from etl.sources.jsonl import JsonlSource
from tests.support import record


def outcome(call, *args):
    """("ok", type, repr) of what call(*args) returns, or ("error", message) of the RecordError it raises."""
    try:
        value = call(*args)
    except RecordError as exc:
        return ("error", str(exc))
    return ("ok", type(value).__name__, repr(value))


# -- the line reader -------------------------------------------------------------------------------------


class _ReadlineOnly:
    """A binary stream without read1: JsonlSource reads it line by line with readline(), the careful path."""

    def __init__(self, data: bytes):
        self._stream = io.BytesIO(data)

    def readline(self, size: int = -1) -> bytes:
        return self._stream.readline(size)


def _fetched(make_settings, stream, limit: int, chunk: int) -> tuple[list, list[str], list]:
    with mock.patch.object(jsonl, "MAX_LINE_BYTES", limit), mock.patch.object(jsonl, "_CHUNK", chunk):
        source = JsonlSource(make_settings(), input="-", stdin=stream)
        posts = list(source.fetch(FetchWindow()))
    return [(p.origin, p) for p in posts], source.rejects, source.gone


def _good(post_id: str, **fields) -> bytes:
    return json.dumps(record(post_id=post_id, **fields)).encode()


# Pieces of a jsonl file where a block reader could go wrong: line ends (LF, CRLF, a lone CR), a BOM, blank
# and whitespace lines, bytes that are not UTF-8 (alone, or a character cut short), multi-byte characters,
# lines near and over the limit, JSON that is valid but unusual, a deletion marker.
PIECES = [
    _good("a"), _good("é-ü", caption="naïve café 😀"), b'{"platform": "x", "post_id": "d", "deleted": true}',
    b"", b"   ", b"\t", b"\r", b"\xef\xbb\xbf", b"\xff", b"\xe2\x82", "€".encode(), b"x" * 70, b"{", b"}",
    b'  {"platform": "x", "post_id": "s", "created_at": "2024-01-01"}  ', b"[1, 2]", b"NaN", b"1" * 5000,
    b'{"platform": "x", "post_id": "\\u0000"}', b'{"a": "\\ud800"}', b"\x1c", "\u2028".encode(), b"\x00",
]  # fmt: skip
ENDS = [b"\n", b"\r\n", b"", b"\r"]
files = st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(ENDS)), max_size=12).map(
    lambda parts: b"".join(piece + end for piece, end in parts)
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=files, limit=st.sampled_from([1, 3, 40, 71, 200, 1 << 20]), chunk=st.sampled_from([1, 2, 7, 64, 1 << 16]))
@example(data=b"\xef\xbb\xbf" + _good("1") + b"\r\n\r\n   \n" + _good("2"), limit=1 << 20, chunk=5)
@example(data=b"x" * 40 + b"\n" + _good("after") + b"\n", limit=40, chunk=7)  # exactly the limit: read
@example(data=b"x" * 41 + b"\n" + _good("after"), limit=40, chunk=7)  # one byte over: refused, the rest read
@example(data=b"x" * 41, limit=40, chunk=64)  # over the limit, the last line, no newline
@example(data=_good("a") + b"\n" + b"\xff" + _good("b") + b"\n" + _good("c"), limit=1 << 20, chunk=1 << 16)
@pytest.mark.badinput("awkward jsonl bytes (CR, BOM, bad UTF-8, over-long lines): block reader = line reader")
def test_the_block_reader_gives_what_the_line_reader_gives(make_settings, data, limit, chunk):
    careful = _fetched(make_settings, _ReadlineOnly(data), limit, chunk)
    assert _fetched(make_settings, io.BytesIO(data), limit, chunk) == careful


class _LineByLineJsonl(JsonlSource):
    """The reading loop as it was before the block reader (e18b59f), kept here as the oracle of the whole of
    fetch(): readline() a line at a time, each line decoded, its BOM, blank test, JSON and post taken in turn."""

    def fetch(self, window):
        limit = jsonl.MAX_LINE_BYTES
        number = 0
        while line := self.stdin.readline(limit + 1):
            number += 1
            data = None
            try:
                if len(line) > limit and not line.endswith(b"\n"):
                    while (rest := self.stdin.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    raise RecordError(f"the line is longer than {limit} bytes")
                text = jsonl._decode(line)
                if number == 1:
                    text = text.lstrip("\ufeff")
                if not text.strip():
                    continue
                data = jsonl._parse(text)
                if isinstance(data, dict) and data.get("deleted") is True:
                    gone_id, gone_platform = jsonl._gone_key(data)
                    self.report_gone(gone_id, "marked deleted in the input", platform=gone_platform)
                    continue
                post = post_from_dict(data, origin=f"stdin line {number}")
            except RecordError as exc:
                self._reject_line(f"stdin line {number}", data, exc)
                continue
            if window.admits(post.created_at):
                yield post


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=files, limit=st.sampled_from([1, 3, 40, 71, 200, 1 << 20]), chunk=st.sampled_from([1, 7, 64, 1 << 16]))
@example(data=b"\xef\xbb\xbf" + _good("1") + b"\r\n\r\n   \n" + _good("2"), limit=1 << 20, chunk=5)
@example(data=b"x" * 41 + b"\n" + _good("after"), limit=40, chunk=7)
def test_fetch_gives_what_the_line_by_line_loop_before_it_gave(make_settings, data, limit, chunk):
    """The whole of fetch() (the block reader, the scanner, the loop) against the old loop on the same bytes."""
    with mock.patch.object(jsonl, "MAX_LINE_BYTES", limit):
        before = _LineByLineJsonl(make_settings(), input="-", stdin=io.BytesIO(data))
        expected = ([(p.origin, p) for p in before.fetch(FetchWindow())], before.rejects, before.gone)
    assert _fetched(make_settings, io.BytesIO(data), limit, chunk) == expected


def test_the_block_reader_refuses_a_long_line_by_number_and_reads_on(make_settings):
    data = _good("1") + b"\n" + b'"' + b"y" * 500 + b'"\r\n' + _good("3") + b"\n\xff\xfe\n" + _good("5")
    posts, rejects, _ = _fetched(make_settings, io.BytesIO(data), 400, 16)
    assert [p.post_id for _, p in posts] == ["1", "3", "5"]
    assert [origin for origin, _ in posts] == ["stdin line 1", "stdin line 3", "stdin line 5"]
    assert rejects == [
        "jsonl: stdin line 2: the line is longer than 400 bytes",
        "jsonl: stdin line 4: the line is not valid UTF-8 (byte 0xff at column 1)",
    ]


class _LongLine:
    """A binary stream of `size` bytes of one line, made as it is read, then a newline and a good record."""

    def __init__(self, size: int):
        self.left = size
        self.tail = b"\n" + _good("after") + b"\n"

    def read1(self, n: int) -> bytes:
        if self.left > 0:
            part = min(n, self.left)
            self.left -= part
            return b"x" * part
        tail, self.tail = self.tail, b""
        return tail


@pytest.mark.badinput("a 64 MiB line over a 1 MiB limit: refused without being held, the next line read")
def test_a_line_over_the_limit_is_not_held_in_memory(make_settings):
    import tracemalloc

    tracemalloc.start()
    try:
        posts, rejects, _ = _fetched(make_settings, _LongLine(64 << 20), 1 << 20, 1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [p.post_id for _, p in posts] == ["after"]
    assert rejects == [f"jsonl: stdin line 1: the line is longer than {1 << 20} bytes"]
    assert peak < 8 << 20, f"{peak:,} bytes held"


lines = st.one_of(
    st.text(alphabet=' {}[]",:0123456789.eE+-truefalsnNIiy\\u\t\r\x1c\u2028é', max_size=30),
    st.sampled_from(['{"a": 1}', '{"a": 1} ', ' {"a": 1}', '{"a": 1}\r', "[1] [2]", "1" * 5000, "NaN", "-Infinity",
                     '"\\ud800"', "{" * 100_000, '{"a": 1e400}', "  ", "\u2028", '{"a": 1}\x1c']),
)  # fmt: skip


@settings(max_examples=300)
@given(lines)
@pytest.mark.badinput("awkward JSON lines: the scanner's short path gives json.loads's value or its error")
def test_the_scanner_gives_what_json_loads_gives(text):
    got = outcome(jsonl._scan, text)
    if not text.strip():
        assert got == ("ok", "object", repr(jsonl._BLANK))
    else:
        assert got == outcome(jsonl._parse, text)


# -- the fields of a post -----------------------------------------------------------------------------


def _careful_date(value):
    if value in (None, ""):
        raise RecordError("missing created_at")
    return parse_datetime(value, now=datetime.now(timezone.utc))  # with `now`: the careful path, no clock cache


def _careful_caption(value):
    caption = records._optional_str("caption", value)
    return caption[:MAX_CAPTION_CHARS] if caption is not None else None


CAREFUL = {
    "platform": records._platform,
    "post_id": records._post_id,
    "created_at": _careful_date,
    "caption": _careful_caption,
    "author_username": lambda v: records._optional_str("author_username", v),
    "permalink": lambda v: records._optional_str("permalink", v),
    "like_count": lambda v: records._count("like_count", v),
    "comment_count": lambda v: records._count("comment_count", v),
    "image_urls": lambda v: records._image_urls({"image_urls": v}),
    "lang": records.normalize_language,
}


def _field(data: dict, name: str):
    """The value post_from_dict gives the field `name` of the record (lang is Post.language)."""
    return getattr(post_from_dict(data), "language" if name == "lang" else name)


AHEAD = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
AHEAD_Z = AHEAD.replace("+00:00", "Z")
AWKWARD = [
    None, "", " ", "\t\n", True, False, 0, 1, -1, MAX_COUNT, MAX_COUNT + 1, 10**30, -(10**30), 3.0, 3.5, -0.0,
    float("nan"), float("inf"), "7", " 7 ", "1_000", "²", "١٢", "x\x00y", "\x00", "a\ud800b", "\udfff", "naïve",
    "é" * 700, "a" * 1000, "a" * 1001, " a" * 600, "a\x07b\x1bc", " Twitter ", "TWITTER", "twitter", "x" * 33,
    "-x", "Mock", "mock", [], ["a"], ["https://h/1.jpg", " https://h/2.jpg "], ["", "u"], [1], {}, {"a": 1},
    "x" * (MAX_CAPTION_CHARS + 5), "EN", "en_US", "und", "qme", "e",
    "2024-05-01T12:00:00+00:00", "2024-05-01T12:00:00-00:00", "2024-05-01T12:00:00Z", "2024-05-01T12:00:00z",
    "2024-05-01T12:00:00", "2024-05-01 12:00:00+00:00", " 2024-05-01T12:00:00+00:00", "2024-05-01T12:00:00+00:00 ",
    "2024-05-01", "20240501T120000+0000", "2024-05-01T12:00:00.123456+00:00", "2024-05-01T14:00:00+02:00",
    "1999-12-31T23:59:59+00:00", "2000-01-01T00:00:00+00:00", "0001-01-01T00:00:00+01:00", AHEAD, AHEAD_Z,
    "1999-12-31T23:59:59Z", "2024-05-01T12:00:00.000Z", "2024-05-01T12:00:00+02:00Z", "2024-05-01Z", "Z",
    "2999-01-01T00:00:00+00:00", "9999-12-31T23:59:59-01:00", "2024-13-01T00:00:00+00:00", "2024-05-01T12:00:00+24:00",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CAREFUL))
@pytest.mark.badinput("awkward values of each field: post_from_dict's short path = the careful helper")
def test_each_field_gives_what_its_careful_helper_gives(name):
    parse_datetime(datetime.now(timezone.utc).isoformat())  # the clock read once, as a run has it
    for value in AWKWARD:
        records._PLATFORMS.clear()  # the platform cache cold, then warm
        for _ in range(2):
            got = outcome(_field, {**record(), name: value}, name)
            assert got == outcome(CAREFUL[name], value), (name, value)


@settings(max_examples=300)
@given(st.sampled_from(sorted(CAREFUL)), st.one_of(st.text(max_size=12), st.integers(), st.floats(), st.booleans()))
def test_each_field_agrees_on_generated_values(name, value):
    parse_datetime(datetime.now(timezone.utc).isoformat())
    got = outcome(_field, {**record(), name: value}, name)
    assert got == outcome(CAREFUL[name], value)


def test_the_short_paths_keep_what_the_careful_ones_refuse():
    # Each would pass if its short path skipped a check: a NUL in the id, a count out of range, a date ahead.
    parse_datetime(datetime.now(timezone.utc).isoformat())
    for name, value, message in [
        ("post_id", "a\x00", "NUL byte"),
        ("post_id", "a" * 1001, "1001 characters"),
        ("like_count", MAX_COUNT + 1, "out of range"),
        ("comment_count", True, "not a whole number"),
        ("created_at", "2999-01-01T00:00:00+00:00", "in the future"),
        ("created_at", "1999-12-31T23:59:59+00:00", "before 2000"),
        ("platform", "Bad Name", "must be lower-case"),
    ]:
        with pytest.raises(RecordError, match=message):
            post_from_dict({**record(), name: value})


# -- the resume tracker -----------------------------------------------------------------------------------

T0 = datetime(2026, 10, 1, 12, 0, tzinfo=timezone.utc)


class _Streams:
    def stream_of(self, post: Post) -> str | None:
        return None if post.post_id.startswith("n") else post.post_id[0]

    def place_of(self, post: Post) -> int | None:
        """Stream b is marked by its listing's order (here a number in its id), a by created_at."""
        return int(post.post_id[1:]) if post.post_id.startswith("b") else None


def _place(post: Post) -> tuple[str, object]:
    place = _Streams().place_of(post)
    return ("created", post.created_at) if place is None else ("order", place)


posts_in = st.lists(
    st.builds(lambda s, n, m: Post(platform="t", post_id=f"{s}{n}", created_at=T0 - timedelta(minutes=m)),
              st.sampled_from("abn"), st.integers(0, 5), st.integers(0, 4)),
    max_size=25,
)  # fmt: skip


@settings(max_examples=200)
@given(posts_in, st.none() | st.integers(0, 4), st.none() | st.integers(0, 4))
def test_the_tracker_marks_what_stream_mark_add_would(posts, limit, resume_minutes):
    resume = None
    if resume_minutes is not None:
        resume = ResumePoint(newest=T0, streams={
            "a": StreamMark(T0 - timedelta(minutes=resume_minutes), {"a1"}),
            "b": StreamMark(resume_minutes, {"b1"}, "order"),
        })  # fmt: skip
    tracker = ResumeTracker(_Streams(), resume, limit)
    passed = list(tracker(posts))
    expected, skipped = [], 0  # what the tracker does, written plainly
    for post in posts if limit is None or limit > 0 else ():
        stream = _Streams().stream_of(post)
        if resume is not None and stream is not None and resume.streams[stream].covers(*_place(post), post.post_id):
            skipped += 1
            continue
        expected.append(post)
        if limit is not None and len(expected) >= limit:
            break
    assert passed == expected
    assert (tracker.skipped, tracker.passed) == (skipped, len(expected))
    marks: dict[str, StreamMark] = {}
    for post in passed:  # what the careful _remember did: StreamMark.add for every post
        stream = _Streams().stream_of(post)
        if stream is not None:
            by, place = _place(post)
            marks.setdefault(stream, StreamMark.first(place, post.post_id, by)).add(place, post.post_id)
    assert tracker.streams == marks
    assert tracker.newest == max((p.created_at for p in passed), default=None)


def test_with_fields_is_replace_and_refuses_a_name_that_is_no_field():
    from dataclasses import replace

    post = post_from_dict(record())
    changes = {"sentiment": records.Sentiment(0.5, 0.5, "positive"), "language": "en", "language_source": "detected"}
    assert records.with_fields(post, **changes) == replace(post, **changes)
    assert vars(records.with_fields(post, **changes)).keys() == vars(post).keys()
    with pytest.raises(TypeError, match="Post has no field 'lang'"):
        records.with_fields(post, lang="en")
