"""The normalized record: validation, cleaning, dates, counts, hashtags, and the jsonl round trip."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from etl.errors import RecordError
from etl.records import chunked, clean_json, clean_text, extract_hashtags, parse_datetime, post_from_dict, post_to_dict
from tests.support import record

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def parse(**overrides: object):
    return post_from_dict(record(**overrides), now=NOW)


def test_a_full_record():
    post = parse(hashtags=None, like_count="12", image_url="https://cdn.example.com/a.jpg", raw={"id": 1})
    assert post.platform == "jsonl"
    assert post.post_id == "p1"
    assert post.created_at == datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert post.like_count == 12
    assert post.comment_count == 1
    assert post.hashtags == ("sun",)
    assert post.image_urls == ()  # image_urls (empty list) wins over image_url
    assert post.raw == {"id": 1}


def test_image_url_alone_is_accepted():
    data = record(image_url="https://cdn.example.com/a.jpg")
    del data["image_urls"]
    assert post_from_dict(data, now=NOW).image_urls == ("https://cdn.example.com/a.jpg",)


def test_integer_post_id_becomes_text_and_platform_is_lowered():
    post = parse(post_id=123456789012345678, platform=" Twitter ")
    assert post.post_id == "123456789012345678"
    assert post.platform == "twitter"


@pytest.mark.parametrize("platform", ["9gag", "4chan", "123", "a", "x" * 32])
def test_a_platform_may_begin_with_a_digit(platform):
    """README, "The normalized record": lower-case letters, digits, `_`, `-` (a leading letter was once demanded)."""
    assert parse(platform=platform).platform == platform


def test_an_image_key_of_a_platform_beginning_with_a_digit_is_an_archive_key():
    """verify judges the objects of such a platform as it does every other's (the key pattern is the record's)."""
    from etl.store_ops import is_archive_key, key_date

    key = "social/9gag/2026/11/01/a1/0.jpg"
    assert is_archive_key("social/", key)
    assert key_date("social/", key) == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert not is_archive_key("social/", "social/.etl-check/0123.txt")


def test_unknown_fields_are_ignored():
    assert parse(colour="blue", nested={"a": [1]}).post_id == "p1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-01T12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=timezone.utc)),
        ("2024-03-01T12:00:00", datetime(2024, 3, 1, 12, tzinfo=timezone.utc)),  # naive means UTC
        ("2024-03-01T23:30:00-05:00", datetime(2024, 3, 2, 4, 30, tzinfo=timezone.utc)),
        ("2024-03-01T12:00:00.123456+02:00", datetime(2024, 3, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=timezone.utc)),
        # A leap second (RFC 3339; PostgreSQL takes it): the next second, as PostgreSQL stores it. It was refused.
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=timezone.utc)),
        ("2016-12-31T18:59:60.5-05:00", datetime(2017, 1, 1, 0, 0, 0, 500000, tzinfo=timezone.utc)),
    ],
)
def test_dates_become_aware_utc(value, expected):
    parsed = parse_datetime(value, now=NOW)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yesterday", "not an ISO 8601 date"),
        ("2024-13-01", "not an ISO 8601 date"),
        ("2016-12-31T23:60:00Z", "not an ISO 8601 date"),  # a leap second is :60 seconds, not minutes
        ("2016-12-31T23:59:61Z", "not an ISO 8601 date"),
        ("", "not an ISO 8601 date"),
        (1709294400, "not an ISO 8601 date"),
        ("1999-12-31T23:59:59Z", "before 2000"),
        ("2025-06-03T00:00:00Z", "in the future"),
        ("0001-01-01T00:00:00+01:00", "out of range"),
        ("9999-12-31T23:59:59-01:00", "out of range"),
    ],
)
@pytest.mark.badinput("a created_at that is not a date, before 2000, in the future or out of range is refused")
def test_bad_dates_are_refused(value, message):
    with pytest.raises(RecordError, match=message):
        parse_datetime(value, now=NOW)


def test_a_day_of_clock_skew_is_tolerated():
    assert parse_datetime("2025-06-02T11:00:00Z", now=NOW).day == 2


def test_the_clock_read_once_still_refuses_what_is_in_the_future():
    """Without `now`, the clock is read only for a date past the slack of its last reading: never a wrong answer."""
    from datetime import datetime, timezone

    real_now = datetime.now(timezone.utc)
    for _ in range(2):  # the second time, with the clock's last reading in hand
        assert parse_datetime((real_now + timedelta(hours=23)).isoformat()) == real_now + timedelta(hours=23)
        with pytest.raises(RecordError, match="in the future"):
            parse_datetime((real_now + timedelta(hours=25)).isoformat())
        assert parse_datetime("2024-06-01T00:00:00Z").year == 2024


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"platform": None}, "missing platform"),
        ({"platform": "  "}, "missing platform"),
        ({"platform": "Not Valid!"}, "platform"),
        ({"platform": "_hidden"}, "platform '_hidden' must be .* beginning with a letter or a digit"),
        ({"platform": "-x"}, "beginning with a letter or a digit"),
        ({"platform": "x" * 33}, r"at most 32"),
        ({"post_id": None}, "missing post_id"),
        ({"post_id": ""}, "missing post_id"),
        ({"post_id": 1.5}, "post_id must be text or a whole number"),
        ({"post_id": True}, "post_id must be text or a whole number"),
        ({"post_id": {"id": 1}}, "post_id must be text or a whole number"),
        ({"post_id": "a\x00b"}, "NUL byte or a lone surrogate"),
        ({"post_id": "a\ud800"}, "NUL byte or a lone surrogate"),
        ({"post_id": "x" * 1001}, "post_id is 1001 characters"),
        ({"created_at": None}, "missing created_at"),
        ({"like_count": -1}, "like_count -1 is out of range"),
        ({"like_count": 10**13}, "out of range"),
        ({"like_count": "many"}, "not a whole number"),
        ({"like_count": "²"}, "not a whole number"),
        ({"like_count": "--5"}, "not a whole number"),
        ({"like_count": 2.5}, "not a whole number"),
        ({"like_count": float("nan")}, "not a whole number"),
        ({"like_count": True}, "not a whole number"),
        ({"comment_count": [1]}, "comment_count"),
        ({"caption": {"text": "hi"}}, "caption must be text"),
        ({"post_id": "\U0001d11e" * 1000}, "post_id is 4,000 bytes in UTF-8"),
        ({"raw": {"stats": [1, float("-inf")]}}, r"raw.stats\[1\] = -inf"),
        ({"raw": {"x": float("nan")}}, "raw.x = nan"),
        ({"image_urls": {"a": 1}}, "image_urls must be a list"),
        ({"image_urls": [""]}, "not a URL"),
        ({"image_urls": ["\x00"]}, "not a URL"),
        ({"image_urls": [None]}, "not a URL"),
        ({"image_urls": [f"https://e.com/{n}.jpg" for n in range(21)]}, "21 images"),
        ({"hashtags": "travel"}, "hashtags must be a list of strings"),
        ({"hashtags": ["ok", 5]}, "hashtags must be a list of strings"),
    ],
)
@pytest.mark.badinput("a record with a missing, mistyped or absurd field is refused, the message naming the field")
def test_bad_records_name_the_problem(overrides, message):
    with pytest.raises(RecordError, match=message):
        parse(**overrides)


@pytest.mark.parametrize("data", [None, [], "text", 5, [record()]])
def test_not_an_object(data):
    with pytest.raises(RecordError, match="expected a JSON object"):
        post_from_dict(data, now=NOW)


@pytest.mark.badinput("a record nested thousands of levels deep is refused, not a crash")
def test_deep_nesting_is_a_record_error():
    raw: list = []
    for _ in range(5000):
        raw = [raw]
    with pytest.raises(RecordError, match="nested too deeply"):
        parse(raw=raw)


def test_counts_accept_whole_number_forms():
    post = parse(like_count="  42 ", comment_count=7.0)
    assert (post.like_count, post.comment_count) == (42, 7)
    assert parse(like_count=None, comment_count="").like_count is None


@pytest.mark.badinput("NUL bytes and lone surrogates in text are cleaned so PostgreSQL accepts the row")
def test_text_is_cleaned_of_nul_and_lone_surrogates():
    post = parse(caption="a\x00b\ud800c", author_username="\x00ana", raw={"k\x00": ["v\udfff", 1.5]})
    assert post.caption == "ab\ufffdc"
    assert post.author_username == "ana"
    assert post.raw == {"k": ["v\ufffd", 1.5]}


def test_clean_text_keeps_every_other_character():
    text = "emoji 😀👩‍👩‍👧 RTL שלום مرحبا combining é CJK 漢字 control \t\x07"
    assert clean_text(text) == text
    assert clean_text(None) is None
    assert clean_text(12) == "12"
    assert clean_json({"a": ("x\x00",)}) == {"a": ["x"]}


def test_hashtags_from_the_caption_in_order_lowered_and_unique():
    assert extract_hashtags("Sun #Beach and #sun, #café! not#this &#39; #日本") == ("beach", "sun", "café", "日本")
    assert extract_hashtags(None) == ()


def test_given_hashtags_are_normalized():
    post = parse(hashtags=["#Travel", " # travel ", "Food", "", "#", "\x00", "\t"])
    assert post.hashtags == ("travel", "food")


def test_round_trip_through_post_to_dict():
    post = parse(caption="Hello #World 😀", like_count=5, raw={"x": [1, 2]}, image_urls=["https://e.com/1.png"])
    again = post_from_dict(post_to_dict(post), now=NOW)
    assert again == post


def test_chunked_streams_in_bounded_lists():
    assert list(chunked(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []


def test_chunked_gives_what_came_before_an_error_then_the_error():
    def stream():
        yield from range(5)
        raise RuntimeError("source broke")

    batches = chunked(stream(), 3)
    assert next(batches) == [0, 1, 2]
    assert next(batches) == [3, 4]
    with pytest.raises(RuntimeError, match="source broke"):
        next(batches)
