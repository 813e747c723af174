"""Instagram Graph API source: a Business/Creator account's own media and the recent media of hashtags."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from etl.config import Secret, Setting, comma_list, flag, http_base, text
from etl.db.platform import HashtagSearches
from etl.errors import ConfigError, RecordError, SourceError
from etl.http import WaitTooLong, retry_after_seconds
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import MAX_IMAGES, Post, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, Entry, Paginator, Stream, StreamError, Verdict, fatal, retry
from etl.sources.base import FetchWindow

SETTINGS = (
    Setting("INSTAGRAM_ACCESS_TOKEN", text, Secret(""), "Instagram Graph API user access token", secret=True),
    Setting("INSTAGRAM_USER_ID", text, "", "Instagram Business/Creator account id"),
    Setting("INSTAGRAM_HASHTAGS", comma_list, (), "hashtags (without #) to archive"),
    Setting("INSTAGRAM_API_BASE", http_base, "https://graph.facebook.com/v21.0", "Graph API base URL"),
    Setting("INSTAGRAM_OWN_MEDIA", flag, True, "archive the account's own media (false: only INSTAGRAM_HASHTAGS)"),
)

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # recent_media allows at most 50 a page; /media takes the same
# children{...} is a field expansion: a carousel's images come inline, in order, in one call.
OWN_MEDIA_FIELDS = (
    "id,caption,media_type,media_url,thumbnail_url,permalink,timestamp,like_count,comments_count,username,"
    "children{media_url,media_type,thumbnail_url}"
)
# recent_media refuses `username` (hashtag posts have no author here) and documents no thumbnail_url, so
# only documented fields are asked: an unknown field fails the whole request with error #100.
HASHTAG_MEDIA_FIELDS = (
    "id,caption,media_type,media_url,permalink,timestamp,like_count,comments_count,children{media_url,media_type}"
)

# Graph API throttling: 4 app, 17 user, 32 page, 613 "calls within one hour", 80002 Instagram Business Use Case.
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80002})
TOKEN_CODES = frozenset({190, 102})  # expired, revoked or invalid token / session
HASHTAG_LIMIT = 30  # unique hashtags an account may query in a rolling window ...
HASHTAG_WINDOW_DAYS = 7  # ... of this many days, counted from each hashtag's first query
HASHTAG_REACH = timedelta(hours=24)  # recent_media only returns media published in the last 24 hours
HASHTAG_RE = re.compile(r"^\w{1,100}$", re.UNICODE)  # hashtag search takes no emoji, spaces or punctuation
_OFFSET_RE = re.compile(r"([+-]\d{2})(\d{2})$")


def graph_timestamp(value: Any) -> Any:
    """Instagram writes '2017-08-31T18:10:00+0000'; Python 3.10's fromisoformat wants '+00:00'."""
    if isinstance(value, str):
        return _OFFSET_RE.sub(r"\1:\2", value.strip())
    return value


def image_urls(item: Mapping[str, Any]) -> list[str]:
    """A media item's images in order: every carousel child, a video's thumbnail (media_url is the video)."""
    children = api.dig(item, "children.data", list) if item.get("media_type") == "CAROUSEL_ALBUM" else None
    fields = {"VIDEO": "thumbnail_url"}  # any other type: media_url
    urls = (api.url_by_type(media, fields, "media_type", "media_url") for media in children or [item])
    return [url for url in urls if url]


def to_post(item: Any) -> Post:
    """One IG Media object -> Post; RecordError names what is missing or wrong."""
    if not isinstance(item, Mapping):
        raise RecordError(f"expected a media object, got {type(item).__name__}")
    media_id = item.get("id")
    if isinstance(media_id, bool) or not isinstance(media_id, (str, int)) or not str(media_id).strip():
        raise RecordError("missing id")
    if not item.get("timestamp"):
        raise RecordError("missing timestamp")
    urls = image_urls(item)
    if len(urls) > MAX_IMAGES:
        log.warning("instagram media %s has %d images; keeping the first %d", media_id, len(urls), MAX_IMAGES)
    # media_url values are signed CDN links that expire within days: the pipeline downloads them in the same
    # run, and raw keeps them only as a record of what the API said.
    return post_from_dict(
        {
            "platform": "instagram",
            "post_id": str(media_id).strip(),
            "author_username": item.get("username"),
            "caption": item.get("caption"),
            "created_at": graph_timestamp(item.get("timestamp")),
            "like_count": item.get("like_count"),  # omitted when the owner hides like counts
            "comment_count": item.get("comments_count"),
            "permalink": item.get("permalink"),
            "image_urls": urls[:MAX_IMAGES],
            "raw": dict(item),
        }
    )


def normalize_hashtag(value: str) -> str:
    """'#Coffee ' -> 'coffee' (Instagram hashtags are case-insensitive)."""
    return value.strip().lstrip("#").strip().lower()


def _error_object(response: requests.Response) -> dict[str, Any] | None:
    """The Graph error object ({"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}), if any."""
    if response.status_code < 400 and '"error"' not in response.text[:200]:
        return None
    error = api.dig(api.json_of(response), "error")
    return error if isinstance(error, dict) else None


def _next_cursor(paging: Any) -> str | None:
    """The `after` cursor when paging.next says there is another page (the last page has no next)."""
    following = api.dig(paging, "next")
    if not following:
        return None
    after = api.dig(paging, "cursors.after")
    if not after and isinstance(following, str):
        after = (parse_qs(urlsplit(following).query).get("after") or [None])[0]
    return str(after) if after else None


class HashtagBudget:
    """The 30 unique hashtags an account may query per rolling 7 days, remembered in the database when there is one.

    Without one (`searches` None) nothing is remembered between runs: every hashtag is searched again, and
    only this run's hashtags are counted.
    """

    def __init__(self, searches: HashtagSearches | None, user_id: str):
        self.searches = searches
        self.user_id = user_id
        self._run: dict[str, str | None] = {}  # hashtag -> id, for hashtags this run has queried

    def known(self, hashtag: str) -> tuple[str, bool] | None:
        """(hashtag id, still inside its 7-day window) if the id is cached, else None."""
        return None if self.searches is None else self.searches.known(self.user_id, hashtag, HASHTAG_WINDOW_DAYS)

    def in_window(self) -> int:
        """How many unique hashtags count against the account's limit right now."""
        stored = set() if self.searches is None else self.searches.in_window(self.user_id, HASHTAG_WINDOW_DAYS)
        return len(stored | set(self._run))

    def spend(self, hashtag: str, hashtag_id: str | None) -> None:
        """Count a query of this hashtag (None: searched, but no id came back)."""
        self._run[hashtag] = hashtag_id
        if self.searches is not None and hashtag_id is not None:
            self.searches.searched(self.user_id, hashtag, hashtag_id, HASHTAG_WINDOW_DAYS)


class GraphPaginator(Paginator):
    """paging.cursors.after while paging.next says there is more; the request is rebuilt from the cursor, so the
    token only ever goes to INSTAGRAM_API_BASE. recent_media repeats its `after` on every page (documented):
    there a page that brings nothing new ends the list instead."""

    kind = "paging cursor"

    def __init__(self, may_repeat: bool = False):
        super().__init__()
        self.may_repeat, self.ids = may_repeat, set()

    def next(self, response: requests.Response, body: Any) -> dict[str, str] | str | None:
        if not self.may_repeat:
            return super().next(response, body)  # a repeated cursor ends the stream, as on every platform
        ids = {str(i["id"]) for i in api.dig(body, "data", list) or [] if api.dig(i, "id")}
        token, fresh = self.token(response, body), bool(ids - self.ids)
        self.ids |= ids
        return self.request(token) if token and fresh else None

    def token(self, response: requests.Response, body: Any) -> Any:
        return _next_cursor(api.dig(body, "paging"))

    def request(self, token: str) -> dict[str, str]:
        return {"after": token}


class Media(Stream):
    """An edge of media: the account's own (newest first) or a hashtag's recent_media (in no known order)."""

    ordered = False  # its entries carry no order: a resume point marks the account's own media by their timestamp

    def __init__(self, source: InstagramSource, key: str, label: str, hashtag: str | None = None):
        super().__init__(key, label, slot=label)
        self.source, self.hashtag = source, hashtag
        # recent_media is "not always in chronological order": a page is past the watermark only when all of it is.
        self.in_order = hashtag is None

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        source, since = self.source, window.since
        size = api.page_size(window.limit, PAGE_SIZE)
        if self.hashtag is None:
            path, params = f"{source.user_id}/media", {"fields": OWN_MEDIA_FIELDS, "limit": size}
        else:
            if window.until is not None and window.until <= source.now() - HASHTAG_REACH:
                # A backfill chunk older than a day: recent_media cannot hold any of it, so spend no hashtag on it.
                log.info("instagram: %s skipped, recent_media reaches back 24 hours only (window ends %s)",
                         self.label, window.until)  # fmt: skip
                return
            hashtag_id = source.hashtag_id(self.hashtag)
            if hashtag_id is None:
                return
            path = f"{hashtag_id}/recent_media"
            params = {"user_id": source.user_id, "fields": HASHTAG_MEDIA_FIELDS, "limit": size}
        pages = source.pages(source.url(path), params, GraphPaginator(self.hashtag is not None), what=f"GET {path}")
        # Own media come newest first: a post older than the watermark ends the list after its page (so one post
        # out of place on it loses nothing); a hashtag's page ends it only when every post on it is older.
        listed = (source.listed(page, "data", f"GET {path}") for page in pages)
        for number, item in api.newest_first(listed, _created, since, whole_page=not self.in_order):
            media_id = api.dig(item, "id")
            yield Entry(item, label=f"page {number}" + (f", media {media_id}" if media_id else ""))

    def where(self, entry: Entry) -> str:
        return f"{self.label} {entry.label}"


def _created(item: Any) -> datetime | None:
    return api.parse_time(graph_timestamp(item.get("timestamp"))) if isinstance(item, Mapping) else None


@register
class InstagramSource(APISource):
    """A Business/Creator account's own media and the last 24 hours of media under INSTAGRAM_HASHTAGS."""

    name = "instagram"
    api_name = "Graph API"
    required = ("access_token", "user_id")
    state_type = HashtagSearches
    secret_params = ("access_token",)  # Graph URLs (paging.next too) carry the token as a query parameter
    keeps_positions = False  # the run's watermark bounds every stream (media ids carry no order)

    def __init__(self, settings: Any, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.user_id = self.config.user_id.strip()
        self.hashtags = tuple(dict.fromkeys(normalize_hashtag(t) for t in self.config.hashtags if t.strip("# ")))
        self.token = self.config.access_token.reveal()
        self.secret_values = (self.token,)
        self.budget = HashtagBudget(self.state, self.user_id)
        self.problems: list[str] = []

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        super().check_settings(settings)
        config = settings.source(cls.name)
        if not config.user_id.strip().isdigit():
            raise ConfigError(
                "INSTAGRAM_USER_ID must be the numeric id of the Instagram Business/Creator account, not its @username"
            )
        if not config.own_media and not config.hashtags:
            raise ConfigError("INSTAGRAM_OWN_MEDIA=false leaves nothing to archive: set INSTAGRAM_HASHTAGS")

    def probe(self) -> str | None:
        # The account itself: one Graph call against the app's hourly rate limit, no hashtag-search budget.
        self.get_json(self.url(self.user_id), what=f"GET {self.user_id}", params={"fields": "id,username"})
        return "GET /{INSTAGRAM_USER_ID}?fields=id,username: 1 call of the app's hourly rate limit"

    def config_key(self) -> str:
        own = self.config.own_media
        return api.config_hash({"user": self.user_id, "hashtags": sorted(self.hashtags), "own": own})

    def stream_objects(self) -> list[Stream]:
        own = [Media(self, f"own:{self.user_id}", "own media")] if self.config.own_media else []
        return [*own, *(Media(self, f"hashtag:{h}", f"#{h}", h) for h in self.hashtags)]

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        return to_post(item)

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        self.problems = []
        yield from super().fetch(window)
        if self.problems:
            raise SourceError("; ".join(self.problems))  # the pipeline names the source

    def stream_failed(self, stream: Stream, exc: StreamError, rest: list[str]) -> None:
        if exc.whole_source:  # the token, throttling past the retries, no connection: no stream can do better
            raise SourceError(self.scrub(str(exc))) from None
        message = f"{stream.label}: {self.scrub(str(exc))}"
        log.warning("instagram: %s", message)
        self.problems.append(message)  # the other streams still run; the fetch fails at its end

    # -- the Graph API over request(): the token as access_token, error objects, throttling codes ------

    def url(self, path: str) -> str:
        return f"{self.config.api_base.rstrip('/')}/{path.lstrip('/')}"

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs["params"] = {**(kwargs.get("params") or {}), "access_token": self.token}
        response = super().send(method, url, **kwargs)
        self.quota_used += 1
        return response

    def classify(self, response: requests.Response) -> Verdict:
        error = _error_object(response)
        if error is not None and error.get("code") in RATE_LIMIT_CODES:
            return retry(self.retry_after(response))
        return self.refused(response, "") if error is not None and response.ok else super().classify(response)

    def retry_after(self, response: requests.Response) -> float | None:
        """How long Meta says to wait: Retry-After, else the longest estimated_time_to_regain_access (minutes)."""
        asked = retry_after_seconds(response)
        if asked is not None:
            return asked
        # X-Business-Use-Case-Usage: {"<business id>": [{"type": "instagram", "call_count": 100, ...,
        # "estimated_time_to_regain_access": 19}]}; a throttled account gets minutes, not seconds, to wait.
        try:
            usage = json.loads(response.headers.get("X-Business-Use-Case-Usage") or "{}")
        except ValueError:
            return None
        values = usage.values() if isinstance(usage, dict) else []
        entries = [entry for value in values if isinstance(value, list) for entry in value]
        minutes = [api.dig(entry, "estimated_time_to_regain_access", (int, float)) for entry in entries]
        longest = max((m for m in minutes if m is not None and not isinstance(m, bool)), default=0)
        return float(longest) * 60 if longest > 0 else None

    def refused(self, response: requests.Response, text: str) -> Verdict:
        error = _error_object(response) or {}
        if error.get("code") in TOKEN_CODES:
            return fatal(f"INSTAGRAM_ACCESS_TOKEN ({self.explain(response, error)}); renew INSTAGRAM_ACCESS_TOKEN "
                         "(a long-lived token lasts 60 days) and run again", whole_source=True)  # fmt: skip
        return fatal(self.explain(response, error))

    def explain(self, response: requests.Response, error: Mapping[str, Any]) -> str:
        code, subcode = error.get("code"), error.get("error_subcode")
        parts = [f"HTTP {response.status_code}"]
        if code is not None:
            parts.append(f"code {code}" + (f"/{subcode}" if subcode is not None else ""))
        if error.get("type"):
            parts.append(str(error["type"]))
        text = ", ".join(parts) + (f": {error['message']}" if error.get("message") else "")
        return self.scrub(text + (f" (fbtrace_id {error['fbtrace_id']})" if error.get("fbtrace_id") else ""))

    def give_up(self, what: str, exc: Exception) -> StreamError:
        response = getattr(exc, "response", None)
        if isinstance(exc, requests.RequestException) or response is None:
            return StreamError(f"cannot reach the Graph API ({what}): {self.scrub(str(exc))}", whole_source=True)
        error = _error_object(response) or {}
        throttled = error.get("code") in RATE_LIMIT_CODES or response.status_code == 429
        why = (f"asks to wait {exc.wait:.0f}s, more than ETL_RETRY_MAX_WAIT allows" if isinstance(exc, WaitTooLong)
               else f"after {self.policy.attempts} attempts")  # fmt: skip
        return StreamError(
            f"{'rate limited by the Graph API' if throttled else 'the Graph API keeps failing'} on {what} "
            f"({self.explain(response, error)}) {why}; stopping this source for this run, the posts fetched so far "
            "are kept", whole_source=True,
        )  # fmt: skip

    def hashtag_id(self, hashtag: str) -> str | None:
        """The hashtag's id, from the cache or ig_hashtag_search; None (and a reject) when it cannot be queried."""
        where = f"hashtag #{hashtag}"
        if not HASHTAG_RE.match(hashtag):
            self.reject(where, "hashtag search takes letters, digits and _ only (no spaces, punctuation or emoji)")
            return None
        cached = self.budget.known(hashtag)
        if not (cached and cached[1]) and (used := self.budget.in_window()) >= HASHTAG_LIMIT:
            self.reject(
                where,
                f"refused: {used} unique hashtags were already queried for account {self.user_id} in the last "
                f"{HASHTAG_WINDOW_DAYS} days and the Graph API allows {HASHTAG_LIMIT}; #{hashtag} waits until "
                "one of them is older than that",
            )
            return None
        if cached is not None:
            # Inside its window a cached hashtag is free (its clock does not restart); outside it, ids are static
            # and global, so no search is needed, but a new window starts.
            self.budget.spend(hashtag, cached[0])
            return cached[0]
        try:
            _, body = self.get_json(self.url("ig_hashtag_search"), what="GET ig_hashtag_search",
                                    params={"user_id": self.user_id, "q": hashtag})  # fmt: skip
            found, why = api.dig(body, "data.0.id"), "found no such hashtag (or it is one Instagram will not serve)"
        except StreamError as exc:
            if exc.whole_source:
                raise
            found, why = None, f"failed: {self.scrub(str(exc))}"
        self.budget.spend(hashtag, str(found) if found else None)
        if not found:
            self.reject(where, f"ig_hashtag_search {why}")
            return None
        log.info("instagram: #%s is hashtag id %s", hashtag, found)
        return str(found)


__all__ = ["HashtagBudget", "InstagramSource", "graph_timestamp", "image_urls", "to_post"]
