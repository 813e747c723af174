"""The records stages hand each other: Post (normalized, what every source yields) and Media (one image)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from etl.errors import RecordError

# Bounds that make a value absurd rather than merely unusual.
MIN_CREATED_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)
FUTURE_SLACK = timedelta(days=1)
MAX_COUNT = 10**12
MAX_CAPTION_CHARS = 100_000  # a longer caption is cut here and flagged (Post.caption_truncated)
MAX_POST_ID_CHARS = 1_000
# PostgreSQL's btree index on (platform, post_id) takes entries of at most about 2,700 bytes.
MAX_POST_ID_BYTES = 2_000
MAX_IMAGES = 20
# A platform: lower-case letters, digits, '_', '-', beginning with a letter or a digit (9gag, 4chan); at most 32.
# The first segment of its image keys (etl/store_ops.py builds its key pattern from this one).
PLATFORM_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}"
PLATFORM_RE = re.compile(rf"^{PLATFORM_PATTERN}$")
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{1,8})*$")
# Codes platforms give when they could not tell: X's und, zxx and q* (qme: media links only, qht: hashtags
# only...), ISO 639's mul and mis.
UNKNOWN_LANGUAGES = frozenset({"und", "zxx", "mul", "mis"})
# A '#' not preceded by a word character or '&' (an HTML entity): the '#' first, its lookbehind after it, so the
# engine searches for the literal '#' (five times faster than the lookbehind first, with the same matches).
HASHTAG_RE = re.compile(r"#(?<![\w&]#)(\w{1,100})", re.UNICODE)
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_TAG_EDGES = re.compile(r"^[\s#]+|\s+$")  # '#travel ' and ' # travel' are both 'travel'


@dataclass(frozen=True)
class Sentiment:
    """A caption's score: TextBlob polarity [-1, 1], subjectivity [0, 1], and the label they give."""

    polarity: float
    subjectivity: float
    label: str  # positive | neutral | negative


@dataclass(frozen=True)
class Post:
    """One normalized public post. created_at is always timezone-aware UTC."""

    platform: str
    post_id: str
    created_at: datetime
    author_username: str | None = None
    caption: str | None = None
    like_count: int | None = None
    comment_count: int | None = None
    permalink: str | None = None
    image_urls: tuple[str, ...] = ()
    hashtags: tuple[str, ...] = ()
    raw: Any = None
    sentiment: Sentiment | None = None
    caption_truncated: bool = False  # the caption was longer than MAX_CAPTION_CHARS and is cut there
    origin: str = ""  # where the source read it, for messages (e.g. "in.jsonl line 300")
    language: str | None = None  # BCP 47 tag, lower-case ("en", "pt-br"); None unknown
    language_source: str | None = None  # "platform" (the platform said so) or "detected"
    sentiment_skipped: str | None = None  # why no sentiment label: e.g. "language fr" (TextBlob is English-only)


@dataclass
class Media:
    """One image of a post and what became of it: stored, failed or skipped (already stored)."""

    platform: str
    post_id: str
    position: int
    source_url: str
    status: str = "pending"
    key: str | None = None
    url: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    permanent: bool = False  # a failure that retrying will not heal
    created_at: datetime | None = field(default=None, repr=False)
    tried: bool = True  # False: never requested (a stop came first): no attempt is counted, no backoff starts


# COPY's text format: a backslash, tab, newline and carriage return inside a value are escaped; \N is NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_SPECIAL = ("\\", "\t", "\n", "\r")


def copy_text(value: str) -> str:
    """A text value as COPY's text format holds it (etl/db's loaders; etl/rescore.py's decisions)."""
    # Most values hold none of the four characters: checking first is cheaper than translating every one.
    for ch in _COPY_SPECIAL:
        if ch in value:
            return value.translate(_COPY_ESCAPES)
    return value


def clean_text(value: Any) -> str | None:
    """Text PostgreSQL accepts: no NUL bytes, no lone surrogates. None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii() and _SURROGATES.search(value):  # isascii() is a flag of the string: no scan
        value = _SURROGATES.sub("\ufffd", value)
    return value


def clean_json(value: Any) -> Any:
    """A JSON value with every string cleaned (JSONB refuses \\u0000 and lone surrogates)."""
    if value is None:
        return None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, Mapping):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # NaN and Infinity are not JSON for PostgreSQL
        return None
    return value


def non_finite_path(value: Any, path: str = "raw") -> str | None:
    """Where in a JSON value a NaN or Infinity sits (e.g. "raw.stats[2]"), or None: PostgreSQL refuses them."""
    if value is None:
        return None
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where} = {item!r}"
        if isinstance(item, Mapping):
            stack.extend((v, f"{where}.{str(k)[:40]}") for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{n}]") for n, v in enumerate(item))
    return None


_POST_FIELDS = frozenset(Post.__dataclass_fields__)
_POST_DEFAULTS = {name: f.default for name, f in Post.__dataclass_fields__.items() if f.default is not MISSING}


def with_fields(post: Post, **changes: Any) -> Post:
    """dataclasses.replace() for a Post, without running __init__ again: a tenth of the cost, on every post of
    a run. Only fields already validated may be given."""
    new = object.__new__(Post)
    fields = new.__dict__
    fields.update(post.__dict__)
    fields.update(changes)
    if len(fields) != len(_POST_FIELDS) and not changes.keys() <= _POST_FIELDS:  # checked when a key was added
        raise TypeError(f"Post has no field {sorted(changes.keys() - _POST_FIELDS)[0]!r}")
    return new


def cap_caption(post: Post) -> Post:
    """The post with its caption cut at MAX_CAPTION_CHARS and flagged, when it is longer."""
    if post.caption is None or len(post.caption) <= MAX_CAPTION_CHARS:
        return post
    return replace(post, caption=post.caption[:MAX_CAPTION_CHARS], caption_truncated=True)


def extract_hashtags(text: str | None) -> tuple[str, ...]:
    """Hashtags in order of first appearance, lower-cased, without '#'."""
    if not text or "#" not in text:
        return ()
    seen: dict[str, None] = {}
    for tag in HASHTAG_RE.findall(text):
        seen.setdefault(tag.lower(), None)
    return tuple(seen)


def parse_datetime(value: Any, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (or a datetime) -> aware UTC datetime; naive means UTC. Refuses absurd dates."""
    if type(value) is str and now is None and value[:1].isdigit() and (value[-1:].isdigit() or value[-1:] == "Z"):
        # The usual forms, "2024-05-01T12:00:00+00:00" and the APIs' "2024-05-01T12:00:00.000Z" (which Python
        # reads as UTC from 3.11 on): nothing to strip or replace, already UTC, after 2000 and not past the clock's
        # last reading. Anything else goes the careful way below, with the same result.
        try:
            parsed = _fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is timezone.utc and MIN_CREATED_AT <= parsed <= _clock_read[0]:
                return parsed
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = _from_iso_text(text)
        except ValueError:
            raise RecordError(f"created_at {value!r:.100} is not an ISO 8601 date") from None
    else:
        raise RecordError(f"created_at {value!r:.100} is not an ISO 8601 date")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        parsed = parsed.astimezone(timezone.utc)
    except OverflowError:  # year 1 or 9999 shifted by its offset out of datetime's range
        raise RecordError(f"created_at {value!r:.100} is out of range") from None
    if parsed < MIN_CREATED_AT:
        raise RecordError(f"created_at {value!r:.100} is before 2000")
    if now is None:
        # A date within the slack of an earlier reading is taken as within it now too (the clock moves on; a step
        # back of the wall clock, NTP or a resumed VM, could let through a date at most that step too far ahead),
        # and most dates are: reading the clock for every post of a run cost a tenth of this function.
        if parsed <= _clock_read[0]:
            return parsed
        now = datetime.now(timezone.utc)
        _clock_read[0] = now + FUTURE_SLACK
    if parsed > now + FUTURE_SLACK:
        raise RecordError(f"created_at {value!r:.100} is in the future")
    return parsed


_fromisoformat = datetime.fromisoformat
_LEAP_SECOND = re.compile(r"(?<=[T ][0-9]{2}:[0-9]{2}):60(?=[.,][0-9]|[+-]|$)")


def _from_iso_text(text: str) -> datetime:
    """datetime.fromisoformat, and a leap second too: RFC 3339 allows 23:59:60 (2016-12-31) and PostgreSQL takes
    it, but Python refuses it, which lost the post. It is read as :59 plus one second (the next day's 00:00:00,
    as PostgreSQL stores it)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        leap = _LEAP_SECOND.search(text)
        if leap is None:
            raise
        return datetime.fromisoformat(text[: leap.start()] + ":59" + text[leap.end() :]) + timedelta(seconds=1)
_clock_read = [MIN_CREATED_AT]  # the latest created_at accepted by parse_datetime's last reading of the clock


def _count(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RecordError(f"{name} {value!r} is not a whole number")
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: int() would take '١٢' or '1_000', and str.isdigit() accepts '²', which int() refuses.
        if not re.fullmatch(r"-?[0-9]{1,30}", text):
            raise RecordError(f"{name} {text[:40]!r} is not a whole number")
        value = int(text)
    elif isinstance(value, float):
        if not value.is_integer():
            raise RecordError(f"{name} {value!r} is not a whole number")
        value = int(value)
    elif not isinstance(value, int):
        raise RecordError(f"{name} {value!r} is not a whole number")
    if value < 0 or value > MAX_COUNT:
        raise RecordError(f"{name} {value} is out of range (0 to {MAX_COUNT})")
    return value


def _optional_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is str:  # the usual case, first
        return clean_text(value)
    if isinstance(value, (dict, list, bool)):
        raise RecordError(f"{name} must be text, got {type(value).__name__}")
    return clean_text(value)


def normalize_language(value: Any) -> str | None:
    """A platform's language code as a lower-case BCP 47 tag ('en', 'pt-br'); None for 'undetermined' codes.
    RecordError for something that is not a language tag at all."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError(f"lang {value!r:.40} is not a language tag")
    tag = value.strip().replace("_", "-").lower()
    if not LANGUAGE_RE.match(tag) or len(tag) > 35:
        raise RecordError(f"lang {value[:40]!r} is not a language tag")
    primary = tag.split("-", 1)[0]
    if primary in UNKNOWN_LANGUAGES or (len(primary) == 3 and primary.startswith("q")):
        return None
    return tag


def _image_urls(data: Mapping[str, Any]) -> tuple[str, ...]:
    urls = data.get("image_urls")
    if urls is None:
        single = data.get("image_url")
        urls = [single] if single else []
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, (list, tuple)):
        raise RecordError("image_urls must be a list of URLs")
    cleaned = []
    for url in urls:
        text = clean_text(url).strip() if isinstance(url, str) else ""
        if not text:
            raise RecordError(f"image_urls has a value that is not a URL: {url!r:.200}")
        cleaned.append(text)
    if len(cleaned) > MAX_IMAGES:
        raise RecordError(f"{len(cleaned)} images is more than the {MAX_IMAGES} a post may have")
    return tuple(cleaned)


def post_from_dict(data: Any, *, now: datetime | None = None, origin: str = "") -> Post:
    """Validate one normalized record (the jsonl format, DESIGN.md) into a Post; RecordError names the problem.
    `origin`: where it was read, for messages (Post.origin)."""
    try:
        return _post_from_dict(data, now, origin)
    except RecursionError:
        raise RecordError("the record is nested too deeply") from None


def _post_from_dict(data: Any, now: datetime | None, origin: str) -> Post:
    if type(data) is not dict and not isinstance(data, Mapping):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}")
    # Each field takes a short path for its usual value (plain ASCII text, a whole number in range, null) and the
    # careful one for anything else; both give the same value or the same error (tests/test_fast_paths.py).
    get = data.get
    given = get("platform")
    platform = (type(given) is str and _PLATFORMS.get(given)) or _platform(given)
    post_id = get("post_id")
    if type(post_id) is str and post_id.isascii() and "\x00" not in post_id:
        post_id = post_id.strip()  # ASCII: its UTF-8 bytes are its characters, below both limits once these are
        if not post_id:
            raise RecordError("missing post_id")
        if len(post_id) > MAX_POST_ID_CHARS:
            post_id = _post_id(post_id)
    else:
        post_id = _post_id(post_id)
    if "created_at" not in data or data["created_at"] in (None, ""):
        raise RecordError("missing created_at")
    caption = get("caption")
    if caption is not None and (type(caption) is not str or not caption.isascii() or "\x00" in caption):
        caption = _optional_str("caption", caption)
    truncated = caption is not None and len(caption) > MAX_CAPTION_CHARS
    if truncated:
        caption = caption[:MAX_CAPTION_CHARS]  # the post is kept; the row says the caption was cut
    raw = get("raw")
    if raw is not None:
        bad_number = non_finite_path(raw)
        if bad_number:
            raise RecordError(f"{bad_number}: NaN and Infinity are not JSON numbers (PostgreSQL refuses them)")
    hashtags = get("hashtags")
    if hashtags is None:
        tags = extract_hashtags(caption)
    elif isinstance(hashtags, (list, tuple)) and all(isinstance(t, str) for t in hashtags):
        normalized = (_TAG_EDGES.sub("", clean_text(t).lower()) for t in hashtags)
        tags = tuple(dict.fromkeys(t for t in normalized if t))
    else:
        raise RecordError("hashtags must be a list of strings")
    created_at = parse_datetime(data["created_at"], now=now)
    author = get("author_username")
    if author is not None and (type(author) is not str or not author.isascii() or "\x00" in author):
        author = _optional_str("author_username", author)
    likes = get("like_count")
    if type(likes) is not int or not 0 <= likes <= MAX_COUNT:
        likes = _count("like_count", likes)
    comments = get("comment_count")
    if type(comments) is not int or not 0 <= comments <= MAX_COUNT:
        comments = _count("comment_count", comments)
    permalink = get("permalink")
    if permalink is not None and (type(permalink) is not str or not permalink.isascii() or "\x00" in permalink):
        permalink = _optional_str("permalink", permalink)
    urls = get("image_urls")
    image_urls = () if type(urls) is list and not urls else _image_urls(data)
    if raw is not None:
        raw = clean_json(raw)
    language = get("lang")
    if language is not None:
        language = normalize_language(language)
    # Built as with_fields() does: the frozen dataclass's __init__ (a guarded setattr per field) was a third of
    # this function's cost, on every post of a run; every field is validated above.
    post = object.__new__(Post)
    post.__dict__.update(
        _POST_DEFAULTS,
        platform=platform,
        post_id=post_id,
        created_at=created_at,
        author_username=author,
        caption=caption,
        like_count=likes,
        comment_count=comments,
        permalink=permalink,
        image_urls=image_urls,
        hashtags=tags,
        raw=raw,
        caption_truncated=truncated,
        language=language,
        language_source="platform" if language else None,
        origin=origin,
    )
    return post


# Platform names as given -> as stored, for names seen valid (a handful per run): one lookup instead of strip,
# lower and a match on every post. Bounded, in case a file gives a new spelling on every line.
_PLATFORMS: dict[str, str] = {}


def _platform(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError("missing platform")
    platform = value.strip().lower()
    if not PLATFORM_RE.match(platform):
        raise RecordError(f"platform {platform[:40]!r} must be lower-case letters, digits, '_' or '-', beginning with a letter or a digit (at most 32)")
    if type(value) is str and len(_PLATFORMS) < 256:
        _PLATFORMS[value] = platform
    return platform


def _post_id(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RecordError("missing post_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"post_id must be text or a whole number, got {type(value).__name__}")
    post_id = str(value).strip()
    if clean_text(post_id) != post_id:
        # Cleaning would change the key itself, and two different ids could then become one.
        raise RecordError("post_id contains a NUL byte or a lone surrogate")
    if len(post_id) > MAX_POST_ID_CHARS:
        raise RecordError(f"post_id is {len(post_id)} characters long (at most {MAX_POST_ID_CHARS})")
    size = len(post_id.encode("utf-8"))
    if size > MAX_POST_ID_BYTES:
        raise RecordError(
            f"post_id is {size:,} bytes in UTF-8 (at most {MAX_POST_ID_BYTES:,}: the database's index on it "
            "takes about 2,700 bytes an entry)"
        )
    return post_id


def post_to_dict(post: Post) -> dict[str, Any]:
    """The jsonl form of a post (the inverse of post_from_dict)."""
    return {
        "platform": post.platform,
        "post_id": post.post_id,
        "author_username": post.author_username,
        "caption": post.caption,
        "created_at": post.created_at.isoformat(),
        "like_count": post.like_count,
        "comment_count": post.comment_count,
        "permalink": post.permalink,
        "image_urls": list(post.image_urls),
        "hashtags": list(post.hashtags),
        "raw": post.raw,
        **({"lang": post.language} if post.language_source == "platform" else {}),
    }


def chunked(items: Iterable[Any], size: int | Callable[[list[Any] | None], int]) -> Iterator[list[Any]]:
    """Lists of at most `size` items, streaming; `size` may be a function of the batch before (None for the first)
    that gives the next batch's. If the stream raises, the items it gave before the error come out first (a
    source that fails mid-batch still has what it yielded loaded), then the error."""
    sizer = size if callable(size) else (lambda _: size)
    limit = sizer(None)
    batch: list[Any] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) >= limit:
                yield batch
                limit = sizer(batch)
                batch = []
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch
