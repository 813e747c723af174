"""The API-source layer: one request() with a per-platform verdict hook, paginators that refuse a repeated
cursor, and streams read newest first by one base loop (dedup, rejects, window, stop, limit, per-stream state)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, ClassVar

from etl.errors import ConfigError, RecordError, SourceError
from etl.http import Retriable, WaitTooLong, is_retriable_status, retry_after_seconds
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, clean_text
from etl.sources.base import FetchWindow, Source

log = logging.getLogger(__name__)


# -- what a platform says about one response ----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A platform's reading of one response: ok, retry (after N s), rate limited until an epoch time, or fatal."""

    kind: str  # "ok" | "retry" | "wait" | "fatal"
    retry_after: float | None = None  # retry: seconds the server asked for (None: the policy's backoff)
    until: float | None = None  # wait: epoch seconds when the limit resets
    message: str = ""  # fatal: what to tell the user
    whole_source: bool = False  # fatal: no other stream can do better (credentials refused)
    code: str = ""  # a platform's name for the condition (e.g. "expired"), for hooks that can heal it


OK = Verdict("ok")


def retry(after: float | None = None) -> Verdict:
    return Verdict("retry", retry_after=after)


def rate_limited(until: float) -> Verdict:
    return Verdict("wait", until=until)


def fatal(message: str, *, whole_source: bool = False, code: str = "") -> Verdict:
    return Verdict("fatal", message=message, whole_source=whole_source, code=code)


class StreamError(SourceError):
    """Ends one stream for this run; its saved position stays where it was. `whole_source` ends the others too."""

    def __init__(self, message: str, *, whole_source: bool = False, code: str = "", reported: bool = False):
        super().__init__(message)
        self.whole_source = whole_source
        self.code = code
        self.reported = reported  # already rejected by the platform (a suspended account): end the stream quietly


class RepeatedCursor(StreamError):
    """The API handed back a cursor it had already given: following it would loop forever."""


# -- paginators -----------------------------------------------------------------------------------------------


class Paginator:
    """Turns one page into the next request: a dict of parameters to merge, a full URL, or None at the end.

    Every kind refuses a cursor it has already followed (RepeatedCursor): the stream stops, not complete.
    """

    kind = "cursor"

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def next(self, response: requests.Response, body: Any) -> dict[str, str] | str | None:
        token = self.token(response, body)
        if token in (None, ""):
            return None
        token = str(token)
        if token in self._seen:
            raise RepeatedCursor(f"the API returned the same {self.kind} twice ({token[:80]}); stopping rather than "
                                 "looping on a repeated cursor")  # fmt: skip
        self._seen.add(token)
        return self.request(token)

    def token(self, response: requests.Response, body: Any) -> Any:
        raise NotImplementedError

    def request(self, token: str) -> dict[str, str] | str:
        raise NotImplementedError


class CursorPaginator(Paginator):
    """A next-token or cursor in the body (dotted path, e.g. `data.after`), sent back as `param`."""

    def __init__(self, path: str = "cursor", param: str = "cursor"):
        super().__init__()
        self.path, self.param, self.kind = path, param, param

    def token(self, response: requests.Response, body: Any) -> Any:
        value = dig(body, self.path)
        return value if isinstance(value, (str, int)) else None

    def request(self, token: str) -> dict[str, str]:
        return {self.param: token}


class LinkHeaderPaginator(Paginator):
    """RFC 8288 `Link: <url>; rel="next"` (Mastodon, GitHub): the next page is that URL as given."""

    kind = "Link next URL"

    def __init__(self, rel: str = "next", fallback: Paginator | None = None):
        super().__init__()
        self.rel, self.fallback = rel, fallback

    def next(self, response: requests.Response, body: Any) -> dict[str, str] | str | None:
        if isinstance(body, list) and not body:
            return None  # an empty page ends the listing
        if self.fallback is not None and not response.links:
            return self.fallback.next(response, body)  # some proxies strip the Link header
        return super().next(response, body)

    def token(self, response: requests.Response, body: Any) -> Any:
        return (response.links.get(self.rel) or {}).get("url")

    def request(self, token: str) -> str:
        return token


class MaxIdPaginator(Paginator):
    """Older pages by `max_id` = the smallest id on this page (for lists with numeric ids and no Link header)."""

    kind = "max_id"

    def __init__(self, ids: Callable[[Any], list[Any]], param: str = "max_id"):
        super().__init__()
        self.ids, self.param = ids, param

    def token(self, response: requests.Response, body: Any) -> Any:
        numbers = [int(i) for i in self.ids(body) if str(i).isdigit()]
        return str(min(numbers)) if numbers else None

    def request(self, token: str) -> dict[str, str]:
        return {self.param: token}


# -- streams ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One item of a newest-first listing and its place in the listing's own order.

    `order` is comparable within the stream (indexedAt, a status id, a Reddit id); None means the item is
    not in order (a pinned post) and neither stops the stream nor moves its state. `at` is the server's time
    for that place, used to stop at the window's start; never a time the author's client wrote.
    """

    item: Any
    order: Any = None
    at: datetime | None = None
    label: str = ""  # how to name the item in a message (its id)


class Stream:
    """One listing a source reads: an actor's feed, a hashtag, an account, a subreddit, a query.

    `key` names its state in the source's cursor; `entries(after, window)` yields Entry newest first,
    following pages itself (through the source's `pages`); `after` is the saved position (or None).
    """

    warn_when_short: ClassVar[str] = ""  # warn if the listing ends before the saved position (Reddit's reach)
    in_order: ClassVar[bool] = True  # False: a listing in no known order (resume points never skip its posts)
    # True: its entries carry their place in the listing (Entry.order), and a resume point marks the stream by it
    # (an entry without one, a pinned post, is then never skipped); False: marked by the posts' created_at.
    ordered: ClassVar[bool] = True
    # How many entries in a row at or below the saved position end a read. 1: the listing never lifts an old entry
    # above newer ones. More where it does (Reddit's /new shows a post a moderator approved out of the spam filter at
    # the top, with its old id): a lone old entry is archived and the read goes on below it.
    ends_after_below: ClassVar[int] = 1

    def __init__(self, key: str, label: str, slot: str | None = None):
        # `slot` names the stream in the source's cursor and resume points where an older format fixed other
        # names than `key` (Twitter's "search"); None: `key` in the cursor, one resume mark per unit.
        self.key, self.label, self.slot = key, label, slot

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        raise NotImplementedError

    def where(self, entry: Entry) -> str:
        """How a reject names a bad item of this stream."""
        return f"{self.label} item {entry.label}".rstrip()

    def encode(self, order: Any) -> Any:
        """A position as JSON for the cursor."""
        return order

    def decode(self, value: Any) -> Any:
        """A saved position back; None if it is unusable (the stream then starts as new)."""
        return value

    def rewind(self, after: Any, minutes: int) -> Any:
        """Where a read from the saved position `after` starts: `after` itself, unless the listing can show a post
        below a position already read (then ETL_OVERLAP_MINUTES before it: the posts read again are unchanged)."""
        return after


@dataclass
class StreamOutcome:
    complete: bool
    newest: Any = None
    posts: int = 0
    since: datetime | None = None  # the lower bound the read used when it had no saved place


class APISource(Source):
    """A source over an HTTP API, read as streams. A platform supplies `streams()`, `to_post()` and `classify()`."""

    api_name: ClassVar[str] = "API"  # in messages: "Bluesky API refused ..."
    rate_limit_headers: ClassVar[tuple[str, ...]] = ()  # (remaining, limit, reset) names, logged at debug
    wait_setting: ClassVar[str] = ""  # the setting that bounds a rate-limit wait, named when it is too short
    secret_params: ClassVar[tuple[str, ...]] = ()  # URL parameters that carry a secret ("key", "access_token")
    secret_values: tuple[str, ...] = ()  # the secrets themselves, scrubbed from every message
    auth_headers: Mapping[str, str] = MappingProxyType({})  # sent with every call, never set on the shared session
    # False: the run's watermark bounds every stream and the source keeps no cursor of its own (ids carry no order).
    keeps_positions: ClassVar[bool] = True
    # True: a stream's error ends the fetch (the runner runs each stream as a unit, so the others still run).
    stream_error_ends_fetch: ClassVar[bool] = False
    # Settings checks beyond `required`: at least one of `one_of` (attribute: what it is for), and every value of
    # a list setting in `patterns` matching once cleaned (attribute: (pattern, what a bad value is, clean)).
    one_of: ClassVar[Mapping[str, str]] = MappingProxyType({})
    patterns: ClassVar[Mapping[str, tuple[re.Pattern[str], str, Callable[[str], str]]]] = MappingProxyType({})

    def __init__(self, settings: Any, *, now: Callable[[], datetime] | None = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.now = now or (lambda: datetime.now(timezone.utc))  # the clock for a platform's reach (tests set it)
        self.place: Any = None  # the place in its listing of the post just yielded (place_of)

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        super().check_settings(settings)
        config = settings.source(cls.name)
        if cls.one_of:
            need_one_of(cls.name, config, **cls.one_of)
        for attr, (pattern, what, clean) in cls.patterns.items():
            each_matches(config, attr, pattern, what, clean)

    # -- requests ----------------------------------------------------------------------------------------

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def classify(self, response: requests.Response) -> Verdict:
        """The platform's hook: sort a response. The default: 2xx ok; 429 waits until `reset_at` says (else it is
        retried like a 5xx, after `retry_after`); any other answer is `refused`."""
        if response.ok:
            return OK
        if response.status_code == 429 and (until := self.reset_at(response)) is not None:
            return rate_limited(until)
        if is_retriable_status(response.status_code):
            return retry(self.retry_after(response))
        return self.refused(response, self.error_text(response))

    def reset_at(self, response: requests.Response) -> float | None:
        """When a 429's limit resets (epoch seconds), from the platform's own header; None: not said."""
        return None

    def retry_after(self, response: requests.Response) -> float | None:
        """Seconds to wait before retrying (Retry-After); None: the policy's backoff."""
        return retry_after_seconds(response)

    def refused(self, response: requests.Response, text: str) -> Verdict:
        """The fatal verdict for an answer that no retry can mend (`text`: the error body, as `error_text` reads it)."""
        return fatal(f"HTTP {response.status_code}: {text}")

    def error_text(self, response: requests.Response) -> str:
        """The error body as one short line (platforms override for their error shapes)."""
        body = json_of(response)
        parts: list[str] = []
        if isinstance(body, Mapping):
            for name in ("error", "message", "error_description", "detail"):
                value = body.get(name)
                if isinstance(value, (str, int)) and str(value) not in parts:
                    parts.append(str(value))
        if not parts:
            parts.append(" ".join(response.text.split())[:200] or response.reason or "no details")
        return clean_text(": ".join(parts)) or ""

    def scrub(self, text: str) -> str:
        """The text without this source's secrets (`secret_values`, and `secret_params` in URLs)."""
        return scrub(text, self.secret_params, self.secret_values)

    def note_rate_limit(self, what: str, response: requests.Response) -> None:
        """The platform's hook for its rate-limit headers: by default `rate_limit_headers`, logged at debug."""
        if not self.rate_limit_headers or self.rate_limit_headers[0] not in response.headers:
            return
        remaining, limit, reset = (response.headers.get(name, "?") for name in self.rate_limit_headers)
        log.debug("%s %s: HTTP %s, %s of %s requests left, resets at %s",
                  self.api_name, what, response.status_code, remaining, limit, reset)  # fmt: skip

    def request(self, method: str, url: str, *, what: str, **kwargs: Any) -> requests.Response:
        """One call, retried by the policy as `classify` says; the response when ok, else StreamError."""
        verdicts: list[Verdict] = []

        def attempt() -> requests.Response:
            response = self.send(method, url, **kwargs)
            self.note_rate_limit(what, response)
            verdict = self.classify(response)
            verdicts.append(verdict)
            if verdict.kind == "retry":
                raise Retriable(f"HTTP {response.status_code}", retry_after=verdict.retry_after, response=response)
            if verdict.kind == "wait":
                wait = max(0.0, (verdict.until or 0) - time.time())
                raise Retriable(f"rate limited (HTTP {response.status_code})", retry_after=wait, response=response)
            return response

        try:
            response = self.policy.call(attempt, describe=f"{self.api_name} {what}")
        except (WaitTooLong, Retriable, requests.RequestException) as exc:
            raise self.give_up(what, exc) from None
        verdict = verdicts[-1]
        if verdict.kind == "fatal":
            raise StreamError(
                f"{self.api_name} refused {what}: {verdict.message}", whole_source=verdict.whole_source, code=verdict.code
            )
        return response

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One attempt over the session, with `auth_headers` (a platform may count it or clean its exceptions)."""
        if self.auth_headers:
            kwargs["headers"] = {**self.auth_headers, **(kwargs.get("headers") or {})}
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            # requests names the full URL, a secret parameter included, and the retry log prints the exception.
            text = self.scrub(str(exc))
            if text == str(exc):
                raise
            try:
                raise type(exc)(text) from None
            except TypeError:  # an exception class with another constructor
                raise requests.ConnectionError(text) from None

    def give_up(self, what: str, exc: Exception) -> StreamError:
        """The error for a call the policy gave up on: a wait past max_wait, retries spent, or no connection."""
        if isinstance(exc, WaitTooLong):
            at = datetime.fromtimestamp(time.time() + exc.wait, tz=timezone.utc).strftime("%H:%M:%S UTC")
            bound = f"{self.wait_setting}={self.policy.max_wait:.0f}s allows" if self.wait_setting else (
                f"the {self.policy.max_wait:.0f}s this run may wait")  # fmt: skip
            return StreamError(
                f"{self.api_name} rate limit reached on {what}: it resets at {at} (in {exc.wait:.0f}s), longer than "
                f"{bound}; stopping this stream (what was fetched is kept)"
            )
        if isinstance(exc, Retriable):
            status = exc.response.status_code if exc.response is not None else "?"
            text = self.error_text(exc.response) if exc.response is not None else str(exc)
            return StreamError(
                f"{self.api_name} {what} still failing after {self.policy.attempts} attempts (HTTP {status}: {text})"
            )
        return StreamError(f"{self.api_name} {what} could not be reached: {type(exc).__name__}: {exc}")

    def get_json(self, url: str, *, what: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[requests.Response, dict]:
        """A GET whose answer must be a JSON object; a malformed page is a StreamError naming the request."""
        response = self.request("GET", url, what=what, params=params, **kwargs)
        return response, self.json_object(response, what)

    def json_object(self, response: requests.Response, what: str) -> dict:
        body = json_of(response)
        if not isinstance(body, dict):
            raise StreamError(f"{self.api_name} {what} answered HTTP {response.status_code} with a body that is not a JSON object")
        return body

    def listed(self, body: Any, path: str, what: str, expected: str = "") -> list:
        """The list at `path` (dotted; "" for the body itself) of a page; a page without one is a StreamError
        naming the request and what was `expected` (by default a list under that path)."""
        items = dig(body, path)
        if not isinstance(items, list):
            expected = expected or f"a page with a {path!r} list"
            raise StreamError(f"{self.api_name} {what} answered with something that is not {expected}")
        return items

    def authed_get(self, url: str, *, what: str, params: Any = None) -> tuple[requests.Response, dict]:
        """A GET with the platform's login (`credentials`); one refused as expired is renewed once and repeated."""
        try:
            return self.get_json(url, what=what, params=params, headers=self.credentials(renew=False))
        except StreamError as exc:
            if exc.code != "expired":
                raise
        return self.get_json(url, what=what, params=params, headers=self.credentials(renew=True))

    def credentials(self, renew: bool) -> dict[str, str]:
        """The platform's hook for a login (a session, an app token): the headers that authenticate a call,
        logging in first if need be; `renew`: the last ones were refused as expired."""
        raise NotImplementedError

    def pages(
        self,
        url: str,
        params: Mapping[str, Any],
        paginator: Paginator,
        *,
        what: str,
        get: Callable[..., tuple[requests.Response, dict]] | None = None,
        **kwargs: Any,
    ) -> Iterator[dict]:
        """Every page of a listing, the next request built by `paginator` (params to merge, or a full URL).

        `get` replaces `get_json` for a platform whose calls need more (Bluesky's session refresh)."""
        current: dict[str, Any] | None = dict(params)
        get = get or self.get_json
        while True:
            response, body = get(url, what=what, params=current, **kwargs)
            yield body
            following = paginator.next(response, body)
            if following is None:
                return
            if isinstance(following, str):
                url, current = following, None  # a Link URL carries every parameter itself
            else:
                current = {**(current or {}), **following}

    # -- streams -----------------------------------------------------------------------------------------

    def stream_objects(self) -> list[Stream]:
        """The platform's streams as objects (an actor's feed, a hashtag, a subreddit, a query)."""
        raise NotImplementedError

    def streams(self) -> list[str]:
        return [stream.key for stream in self.stream_objects()]

    def place_of(self, post: Post) -> Any:
        """The just-yielded post's Entry.order in a stream marked by its order (Stream.ordered), else None."""
        return self.place

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        """The platform's JSON -> Post (RecordError names what is wrong); None for an item that is no post."""
        raise NotImplementedError

    def load_positions(self, cursor: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        """The saved state of each stream (by slot or key) out of the source's cursor."""
        saved = cursor.get("streams") if isinstance(cursor, Mapping) and self.keeps_positions else None
        return {str(k): v for k, v in saved.items() if isinstance(v, Mapping)} if isinstance(saved, Mapping) else {}

    def dump_positions(self, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The cursor to save for these stream states (a platform with an older format keeps it)."""
        return {"streams": dict(states)} if states and self.keeps_positions else {}

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        """Read every stream newest first; a stream that fails is reported and the others go on.

        State is kept per stream in `self.cursor["streams"][key]`: {"after": newest position read}. A stream read
        to its saved position (or to the window's start, or to the end of its listing) moves it; one cut short by
        the limit or an error keeps its old one. A backfill (a window with an end) never moves any.
        """
        saved = self.load_positions(window.cursor)
        states: dict[str, Any] = dict(saved)
        self.cursor = self.dump_positions(states)
        incremental = window.until is None
        seen: set[str] = set()  # a post found by two streams (a repost, a hashtag and an account) is yielded once
        budget = [window.limit]
        streams = [s for s in self.stream_objects() if self.reads(s.key)]
        for n, stream in enumerate(streams):
            if budget[0] is not None and budget[0] <= 0:
                break
            slot = stream.slot or stream.key
            state = saved.get(slot) if incremental else None
            try:
                outcome = yield from self._read_stream(stream, state or {}, window, seen, budget)
            except StreamError as exc:
                if exc.reported:
                    continue
                if not incremental:
                    # A backfill records a chunk done once its window is read: this error must end the fetch (the
                    # posts read before it are loaded), so that the chunk is not, and the next backfill reads it again.
                    raise
                self.stream_failed(stream, exc, [s.label for s in streams[n + 1 :]] if exc.whole_source else [])
                if incremental and state is None:
                    # Remember where this never-finished stream must read back to, whatever the watermark becomes.
                    states[slot] = {"floor": window.since.isoformat() if window.since else None}
                    self.cursor = self.dump_positions(states)
                if exc.whole_source:
                    break
                continue
            if outcome.complete and incremental:
                newest = outcome.newest if outcome.newest is not None else stream.decode((state or {}).get("after"))
                if newest is not None:
                    states[slot] = {"after": stream.encode(newest)}
                else:  # nothing in order was read: keep the lower bound this read used
                    states[slot] = {"floor": outcome.since.isoformat() if outcome.since else None}
                self.cursor = self.dump_positions(states)

    def stream_failed(self, stream: Stream, exc: StreamError, rest: list[str]) -> None:
        """A stream ended by an error (`rest`: the streams a whole-source error leaves unread). The default
        rejects it and the fetch goes on; with `stream_error_ends_fetch` it is raised instead (the runner runs each
        stream as a unit of its own, so the others still run), and that stream's state stays where it was either way."""
        if self.stream_error_ends_fetch:
            raise exc from None
        note = f"; not read either: {', '.join(rest)}" if rest else ""
        self.reject(stream.label, f"{exc}; the posts read before it are kept, and it resumes from its saved place{note}")

    def _read_stream(
        self, stream: Stream, state: Mapping[str, Any], window: FetchWindow, seen: set[str], budget: list[int | None]
    ) -> Iterator[Post]:
        saved = stream.decode(state.get("after")) if state.get("after") is not None else None
        after = stream.rewind(saved, self.settings.overlap_minutes) if saved is not None else None
        since = window.since
        if after is not None:
            since = None  # the saved position is the lower bound, not the run's watermark
        elif "floor" in state:
            since = _parse_floor(state.get("floor"))
            # A failed read's floor: the listing is asked and paged down to it, not to the run's watermark, which
            # the other posts of this unit may have moved past what that read never reached.
            window = replace(window, since=since)
        newest: Any = None
        posts = 0
        ended = "listing"
        slot = (stream.slot or "") if stream.in_order else None  # the resume point's mark (etl/resume.py)
        self.stream, self.place = slot, None
        by_order = slot is not None and stream.ordered
        below = 0  # entries in a row at or below the saved position
        for entry in stream.entries(after, window):
            if entry.order is not None:
                if after is not None and entry.order <= after:
                    below += 1
                    if below >= stream.ends_after_below:
                        ended = "saved place"
                        break
                else:
                    below = 0
                    if since is not None and entry.at is not None and entry.at < since:
                        ended = "window start"
                        break
                    if newest is None or entry.order > newest:
                        newest = entry.order
            try:
                post = self.to_post(entry.item, stream)
            except RecordError as exc:
                self.reject(stream.where(entry), str(exc))
                continue
            if post is None or post.post_id in seen:
                continue
            # A backfill chunk takes the posts created inside it; an incremental read takes all down to its bound.
            if window.until is not None and not window.admits(post.created_at):
                continue
            seen.add(post.post_id)
            posts += 1
            if by_order:  # a repost sits in the listing at its own place, its post keeps the original's created_at
                self.stream, self.place = (slot, entry.order) if entry.order is not None else (None, None)
            yield post
            if budget[0] is not None:
                budget[0] -= 1
                if budget[0] <= 0:
                    log.info("%s: %s: stopped at the limit after %d posts", self.name, stream.label, posts)
                    return StreamOutcome(False, newest, posts, since)
        if ended == "listing" and below:  # it ended on entries at or below the saved position: it got there
            ended = "saved place"
        if ended == "listing" and stream.warn_when_short and (after is not None or since is not None):
            log.warning("%s: %s: %s", self.name, stream.label, stream.warn_when_short)
        log.info("%s: %s: %d posts (read to the %s)", self.name, stream.label, posts, ended)
        if saved is not None and (newest is None or newest < saved):
            newest = saved  # a read rewound below its saved position never moves it back
        return StreamOutcome(True, newest, posts, since)


def _parse_floor(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from an API as aware UTC, or None if it is not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def json_of(response: requests.Response) -> Any:
    """The response's JSON body, or None when it is not JSON (an HTML error page, an empty body)."""
    try:
        return response.json()
    except ValueError:
        return None


def dig(body: Any, path: str | Sequence[str | int], kind: type | tuple[type, ...] | None = None) -> Any:
    """The value at a dotted path ("data.after", "images.0.url": a number steps into a list) of nested objects, or
    None where a step is missing; with `kind`, None unless the value is of that type too."""
    for part in path.split(".") if isinstance(path, str) and path else path or ():
        if isinstance(body, Mapping):
            body = body.get(part)
        elif isinstance(body, list) and str(part).isdigit() and int(part) < len(body):
            body = body[int(part)]
        else:
            return None
    return body if kind is None or isinstance(body, kind) else None


def url_by_type(media: Any, fields: Mapping[Any, str], type_field: str = "type", default: str = "") -> str | None:
    """The image URL of a media object, from the field its type keeps one in (`fields`: type -> field, `default`
    for other types; a video or GIF gives its still frame), stripped; None for a type without one, or a blank URL."""
    kind = dig(media, type_field, (str, int))  # a list or an object there is no type of ours: the default's field
    field = fields.get(kind, default) if kind is not None else default
    url = dig(media, field, str) if field else None
    return url.strip() if url and url.strip() else None


def newest_first(
    pages: Iterable[list[Any]],
    time_of: Callable[[Any], datetime | None],
    since: datetime | None,
    *,
    whole_page: bool = False,
) -> Iterator[tuple[int, Any]]:
    """(page number, item) of a newest-first listing down to `since`: an older item is left out, and the listing
    ends after the page that passes `since` (the page is paid for, so an item out of place on it is still seen).
    `whole_page`: for a listing in no known order, only a page whose every dated item is older ends it."""
    for number, items in enumerate(pages, start=1):
        times = [time_of(item) for item in items]
        for item, at in zip(items, times, strict=True):
            if since is None or at is None or at >= since:
                yield number, item
        dated = [at for at in times if at is not None]
        past = [at for at in dated if since is not None and at < since]
        if past and (not whole_page or len(past) == len(dated)):
            return


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """`items` in consecutive slices of at most `size` (the most ids one lookup call takes)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def config_hash(spec: Mapping[str, Any], length: int = 12) -> str:
    """A source's configuration as a short stable hash (its `config_key`: the state kept before streams)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:length]


def scrub(text: str, params: Iterable[str] = (), secrets: Iterable[str] = ()) -> str:
    """The text with the values of these URL parameters (`key=...`) and these secret values replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for name in params:
        text = re.sub(rf"(?<![\w.-])({re.escape(name)}=)[^&#\s\"'>]+", r"\1***", text)
    return text


class _ScrubFilter(logging.Filter):
    """Rewrites a library's log records so the secrets among its request URLs' parameters never reach a handler."""

    def __init__(self, params: tuple[str, ...]):
        super().__init__()
        self.params = params

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(f"{name}=" in message for name in self.params):
            record.msg, record.args = scrub(message, self.params), ()
        return True


def scrub_logs(loggers: Iterable[str], params: tuple[str, ...]) -> None:
    """Scrub these URL parameters from every line the named loggers (a client library's own) write."""
    for name in loggers:
        logging.getLogger(name).addFilter(_ScrubFilter(params))


def utc_text(moment: datetime, *, round_up: bool = False) -> str:
    """An RFC 3339 UTC time to the second ("2026-03-10T12:00:00Z"); `round_up` for an exclusive upper bound."""
    moment = moment.astimezone(timezone.utc)
    if round_up and moment.microsecond:
        moment += timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def page_size(limit: int | None, largest: int, smallest: int = 1) -> int:
    """How many items to ask a page for: no more than the limit still allows, within what the endpoint takes."""
    return largest if limit is None else max(smallest, min(largest, limit))


def need_one_of(source: str, config: Any, **described: str) -> None:
    """ConfigError unless at least one of these settings of the source's own (attribute = what it is for) is set."""
    if not any(getattr(config, attr) for attr in described):
        wanted = " or ".join(f"{config.env_name(attr)} ({what})" for attr, what in described.items())
        raise ConfigError(f"the {source} source needs {wanted}, or both; neither is set")


def each_matches(
    config: Any, attr: str, pattern: re.Pattern[str], what: str, clean: Callable[[str], str] = str.strip
) -> None:
    """ConfigError naming the first value of a list setting that does not match `pattern` once cleaned."""
    for value in getattr(config, attr):
        if not pattern.match(clean(value)):
            raise ConfigError(f"{config.env_name(attr)} has {value!r}, which is {what}")


__all__ = [
    "OK", "APISource", "CursorPaginator", "Entry", "LinkHeaderPaginator", "MaxIdPaginator", "Paginator",
    "RepeatedCursor", "Stream", "StreamError", "Verdict", "batches", "config_hash", "dig", "each_matches", "fatal",
    "json_of", "need_one_of", "newest_first", "page_size", "parse_time", "rate_limited", "retry", "scrub", "scrub_logs",
    "url_by_type", "utc_text",
]  # fmt: skip
