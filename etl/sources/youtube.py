"""YouTube Data API v3: recent uploads of configured channels and/or search results, thumbnails as images."""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import islice
from types import MappingProxyType
from typing import Any

from etl.config import Secret, Setting, Settings, comma_list, http_base, positive_int, text
from etl.db.platform import QuotaLedger
from etl.errors import SourceError
from etl.http import Retriable, retry_after_seconds
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, extract_hashtags, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, Entry, Stream, StreamError
from etl.sources.base import FetchWindow, query_stream

SETTINGS = (
    Setting("YOUTUBE_API_KEY", text, Secret(""), "YouTube Data API v3 key", secret=True),
    Setting("YOUTUBE_CHANNEL_IDS", comma_list, (), "channels whose uploads to archive"),
    Setting("YOUTUBE_QUERY", text, "", "search.list query (costs 100 units a page)"),
    Setting("YOUTUBE_API_BASE", http_base, "", "API endpoint override (proxies, mirrors, tests)"),
    Setting("YOUTUBE_DAILY_QUOTA", positive_int, 10000, "quota units this archiver may spend a day"),
)

log = logging.getLogger(__name__)

# Quota units per call (developers.google.com/youtube/v3/determine_quota_cost). The cost does not depend
# on `part` or on maxResults; every request is charged, failed ones included, so each attempt is counted.
COSTS = {"channels.list": 1, "playlistItems.list": 1, "search.list": 100, "videos.list": 1}
PAGE_SIZE = 50  # the API's largest maxResults, and the most ids videos.list accepts in one call
THUMBNAIL_SIZES = ("maxres", "standard", "high", "medium", "default")  # best first
WATCH_URL = "https://www.youtube.com/watch?v={}"

# Error reasons (error.errors[0].reason in Google's error JSON).
QUOTA_REASONS = frozenset({"quotaExceeded", "dailyLimitExceeded"})
RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
KEY_REASONS = frozenset({"keyInvalid", "keyExpired", "API_KEY_INVALID", "API_KEY_EXPIRED"})

_HTML_TAG = re.compile(r"<[^>]+>")


# The google client logs its request URLs, the API key among their parameters.
api.scrub_logs(("googleapiclient.discovery", "googleapiclient.http"), ("key",))


def quota_day_start(now: datetime | None = None) -> datetime:
    """Midnight Pacific time that began the current quota day (YouTube resets quotas then), in UTC."""
    try:
        from zoneinfo import ZoneInfo

        pacific: Any = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database on this machine: standard time is the safer (earlier) guess
        pacific = timezone(timedelta(hours=-8))
    local = (now or datetime.now(timezone.utc)).astimezone(pacific)
    return datetime(local.year, local.month, local.day, tzinfo=pacific).astimezone(timezone.utc)


def best_thumbnail(thumbnails: Any) -> str | None:
    """The URL of the largest thumbnail offered (maxres > standard > high > medium > default), or None."""
    if not isinstance(thumbnails, Mapping):
        return None
    for size in THUMBNAIL_SIZES:
        entry = thumbnails.get(size)
        url = entry.get("url") if isinstance(entry, Mapping) else None
        if isinstance(url, str) and url.strip():
            return url.strip()
    return None


def _published(item: Mapping[str, Any]) -> datetime | None:
    """When a playlist item's or search result's video was published; None when the item does not say."""
    # A playlist item's snippet.publishedAt is when it was added to the playlist; for uploads that is the
    # upload time, while contentDetails.videoPublishedAt is when the video went public (absent if private).
    details, snippet = item.get("contentDetails") or {}, item.get("snippet") or {}
    return api.parse_time(details.get("videoPublishedAt") or snippet.get("publishedAt"))


def _video_id(item: Mapping[str, Any]) -> str | None:
    """The video id of a playlistItem (contentDetails.videoId) or a searchResult (id.videoId)."""
    ident = item.get("id")
    if isinstance(ident, Mapping):
        value = ident.get("videoId")
    else:
        value = (item.get("contentDetails") or {}).get("videoId") or (
            ((item.get("snippet") or {}).get("resourceId") or {}).get("videoId")
        )
    return value if isinstance(value, str) and value else None


def google_error(response: requests.Response) -> tuple[str, str]:
    """(reason, message) from Google's error JSON: {"error": {"code", "message", "errors": [{"reason", ...}]}}."""
    reason, message = "", ""
    try:
        data = response.json()
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = error.get("message") if isinstance(error.get("message"), str) else ""
        errors = error.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            reason = str(errors[0].get("reason") or "")
            message = message or str(errors[0].get("message") or "")
        for detail in error.get("details") or []:  # newer errors carry an ErrorInfo with a reason
            if isinstance(detail, dict) and detail.get("reason") in KEY_REASONS:
                reason = detail["reason"]
        reason = reason or str(error.get("status") or "")
    elif isinstance(error, str):
        message = error
    message = message or response.text.strip()[:200] or response.reason or ""
    # Google's messages contain HTML ("exceeded your <a href=...>quota</a>").
    return reason, " ".join(html.unescape(_HTML_TAG.sub("", message)).split()) or f"HTTP {response.status_code}"


@dataclass(frozen=True)
class _PageMark:
    """One page of a playlist as seen: the token that fetched it, its oldest video, the next page's token."""

    token: str | None
    oldest: datetime | None
    next_token: str | None


class Videos(Stream):
    """A newest-first listing of videos (a channel's uploads playlist, or the query's search results), read in
    batches of videos.list so that every video comes with its statistics and full snippet."""

    ordered = False  # its entries carry no order: a resume point marks it by the videos' publishedAt

    def __init__(self, source: YouTubeSource, key: str, slot: str, channel: str | None = None):
        super().__init__(key, f"channel {channel}" if channel else "search", slot=slot)
        self.source, self.channel = source, channel

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        source, taken = self.source, 0
        candidates = self._candidates(window)
        while True:
            # Ask videos.list only for as many as the limit still allows, 50 at most.
            left = None if window.limit is None or taken >= window.limit else window.limit - taken
            batch = list(islice(candidates, api.page_size(left, PAGE_SIZE)))
            if not batch:
                return
            videos = source.videos([vid for vid, _ in batch])
            for vid, listing in batch:
                video = videos.get(vid)
                if video is None:
                    # Private and deleted videos stay in playlists ("Private video") but videos.list omits them.
                    log.info("youtube: video %s is private or deleted; skipped", vid)
                    source.report_gone(vid, "private or deleted on YouTube")
                    continue
                published = api.parse_time((video.get("snippet") or {}).get("publishedAt"))
                if published is None or window.admits(published):
                    taken += 1
                    yield Entry((vid, video, listing), label=vid)

    def _candidates(self, window: FetchWindow) -> Iterator[tuple[str, dict[str, Any]]]:
        """(video id, listing item) of newest-first pages in the window, stopping after the page that reaches
        window.since: the page is paid for, so an item scheduled or reordered late on it is still seen."""
        pages = self._pages(window)
        items = ([i for i in page.get("items") or [] if isinstance(i, dict) and _video_id(i)] for page in pages)
        for _, item in api.newest_first(items, _published, window.since):
            published = _published(item)
            if published is None or window.until is None or published < window.until:
                yield _video_id(item), item  # (newer than a backfill's end: skipped, paging on towards it)

    def _pages(self, window: FetchWindow) -> Iterator[dict[str, Any]]:
        source = self.source
        if self.channel is None:
            params: dict[str, Any] = {"part": "snippet", "q": source.config.query, "type": "video",
                                      "order": "date", "maxResults": PAGE_SIZE}  # fmt: skip
            if window.since is not None:
                params["publishedAfter"] = api.utc_text(window.since)
            if window.until is not None:
                params["publishedBefore"] = api.utc_text(window.until, round_up=True)
            yield from source.listing("search.list", params)
            return
        playlist = source.uploads(self.channel)
        if playlist is None:
            return
        try:
            yield from source.playlist_pages(playlist, window)
        except StreamError as exc:
            if exc.code != "playlistNotFound":
                raise
            # A channel without public uploads has no uploads playlist to list: nothing to archive.
            log.warning("youtube: channel %s has no public uploads (%s)", self.channel, exc)

    def where(self, entry: Entry) -> str:
        return f"video {entry.label}"


@register
class YouTubeSource(APISource):
    """Uploads of YOUTUBE_CHANNEL_IDS and/or YOUTUBE_QUERY search results; the best thumbnail is the image.

    Calls go through google-api-python-client's transport: `http` (an httplib2.Http, or
    googleapiclient.http.HttpMockSequence in tests) replaces the real one.
    """

    name = "youtube"
    api_name = "YouTube Data API"
    required = ("api_key",)
    state_type = QuotaLedger
    secret_params = ("key",)  # the google client puts the API key in its request URLs
    keeps_positions = False  # the run's watermark bounds every stream (kept per stream by the runner)
    stream_error_ends_fetch = True  # the runner records the stream as failed and runs the next one
    one_of = MappingProxyType({"channel_ids": "channels whose uploads to archive", "query": "a search query"})

    def __init__(self, settings: Settings, *, http: Any = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self._http = http
        self._key = self.config.api_key.reveal()
        self.secret_values = (self._key,)
        self._service: Any = None
        # Kept for the source's lifetime, so the chunks of a backfill (one fetch each) do not pay again:
        self._uploads: dict[str, str | None] = {}  # channel -> uploads playlist (None: no such channel)
        self._page_index: dict[str, list[_PageMark]] = {}  # per playlist, the pages seen, from the top
        self.quota_used_earlier = 0  # by earlier runs of today's quota day, read from etl_runs

    def probe(self) -> str | None:
        # channels.list of one id: 1 quota unit, whether or not the channel exists; a bad key is refused.
        channel = (self.config.channel_ids or ("UC_x5XG1OV2P6uZZ5FSM9Ttw",))[0]
        self.call("channels.list", {"part": "id", "id": channel, "maxResults": 1})
        return f"channels.list: {COSTS['channels.list']} quota unit of YOUTUBE_DAILY_QUOTA"

    def config_key(self) -> str:
        spec = {"channels": sorted(set(self.config.channel_ids)), "query": self.config.query}
        return "cfg-" + api.config_hash(spec, 16)

    def stream_objects(self) -> list[Stream]:
        # Resume points name the query's stream "search", as before streams had keys of their own.
        query = self.config.query
        channels = [Videos(self, f"channel:{c}", f"channel:{c}", c) for c in dict.fromkeys(self.config.channel_ids)]
        return channels + ([Videos(self, query_stream(query), "search")] if query else [])

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        self.quota_used_earlier = self._quota_used_earlier_today()
        log.info("youtube: %d channel(s), query %s, quota budget %d (%d used earlier today)",
                 len(self.config.channel_ids), "set" if self.config.query else "unset",
                 self.config.daily_quota, self.quota_used_earlier)  # fmt: skip
        yield from super().fetch(window)
        log.info("youtube: %d quota unit(s) used", self.quota_used)

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        vid, video, listing = item
        snippet = {**(listing.get("snippet") or {}), **(video.get("snippet") or {})}
        statistics = video.get("statistics") or {}
        title, description = snippet.get("title") or "", snippet.get("description") or ""
        caption = f"{title}\n\n{description}" if description else title
        thumbnail = best_thumbnail(snippet.get("thumbnails"))
        languages = (snippet.get("defaultLanguage"), snippet.get("defaultAudioLanguage"))
        return post_from_dict(
            {
                "platform": self.name,
                "post_id": vid,
                "author_username": snippet.get("channelTitle") or None,
                "caption": caption or None,
                "created_at": snippet.get("publishedAt"),
                # Counts are strings in the API; likeCount is absent when likes are hidden, commentCount when
                # comments are off.
                "like_count": statistics.get("likeCount"),
                "comment_count": statistics.get("commentCount"),
                "permalink": WATCH_URL.format(vid),
                "image_urls": [thumbnail] if thumbnail else [],
                "hashtags": list(extract_hashtags(caption)),
                "raw": {**video, "listing": listing},  # the videos.list item, with the item that listed it
                # The language of title and description when the channel set it, else the audio's.
                "lang": next((v for v in languages if isinstance(v, str) and v), None),
            }
        )

    # -- endpoints -------------------------------------------------------------------------------

    def listing(self, method: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every page of a list call, following nextPageToken (a repeated token ends the stream, not complete)."""
        return self.pages(method, params, api.CursorPaginator("nextPageToken", "pageToken"), what=method, get=self.get)

    def uploads(self, channel: str) -> str | None:
        """The channel's uploads playlist; the channels this source reads are resolved together, once."""
        if channel not in self._uploads:
            pending = [c for c in dict.fromkeys(self.config.channel_ids)
                       if c not in self._uploads and self.reads(f"channel:{c}")]  # fmt: skip
            ids = [c for c in pending if not c.startswith("@")]
            found = {k: v for n in range(0, len(ids), PAGE_SIZE) for k, v in self.channels(id=",".join(ids[n : n + PAGE_SIZE])).items()}
            for handle in (c for c in pending if c.startswith("@")):  # channels.list?forHandle=@name resolves it
                found.update((handle, playlist) for playlist in self.channels(forHandle=handle).values())
            for name in pending:
                self._uploads[name] = found.get(name)
                if name not in found:  # channels.list answers an unknown id with an empty list, not an error
                    self.reject(f"channel {name}", "not found (check YOUTUBE_CHANNEL_IDS)")
        return self._uploads.get(channel)

    def channels(self, **params: Any) -> dict[str, str]:
        """Channel id -> uploads playlist, by one channels.list call."""
        page = self.call("channels.list", {"part": "contentDetails", "maxResults": PAGE_SIZE, **params})
        items = [item for item in page.get("items") or [] if isinstance(item, dict)]
        return {item.get("id"): playlist for item in items
                if (playlist := ((item.get("contentDetails") or {}).get("relatedPlaylists") or {}).get("uploads"))}  # fmt: skip

    def playlist_pages(self, playlist: str, window: FetchWindow) -> Iterator[dict[str, Any]]:
        """The playlist's pages for this window; a backfill chunk starts near its `until` instead of at the top.

        The uploads playlist is newest first and a backfill walks its chunks oldest first, so without this
        every chunk would page down from the newest upload again. Page tokens are offsets, so the tokens
        (and the oldest date) of the pages seen earlier in this run say where a chunk's videos begin.
        """
        index = self._page_index.setdefault(playlist, [])
        position, token = 0, None
        if window.until is not None and index:
            first = next((n for n, mark in enumerate(index) if mark.oldest is not None and mark.oldest < window.until), None)
            if first is None:  # every page seen is newer than the chunk: go on after the last one
                if index[-1].next_token is None:
                    return
                position, token = len(index), index[-1].next_token
            else:
                # One page early: a video deleted meanwhile moves later items up across a page boundary.
                position = max(first - 1, 0)
                token = index[position].token
        params = {"part": "snippet,contentDetails", "playlistId": playlist, "maxResults": PAGE_SIZE}
        for page in self.listing("playlistItems.list", {**params, **({"pageToken": token} if token else {})}):
            dates = [d for d in (_published(i) for i in page.get("items") or [] if isinstance(i, dict)) if d]
            mark = _PageMark(token, min(dates) if dates else None, page.get("nextPageToken") or None)
            index[position : position + 1] = [mark]
            position, token = position + 1, mark.next_token
            yield page

    def videos(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """id -> videos.list item (snippet, statistics) for up to 50 ids; private and deleted videos are absent."""
        page = self.call("videos.list", {"part": "snippet,statistics", "id": ",".join(ids)})
        return {item["id"]: item for item in page.get("items") or [] if isinstance(item, dict) and item.get("id")}

    # -- the Data API over request(): google's transport, quota per attempt, Google's error JSON -------

    @property
    def service(self) -> Any:
        if self._service is None:
            import httplib2
            from googleapiclient.discovery import build

            base = self.config.api_base
            # api_endpoint replaces rootUrl; the method paths (youtube/v3/...) are joined to it, so it needs
            # its trailing slash or a path prefix of the override would be dropped.
            self._http = self._http or httplib2.Http(timeout=self.settings.read_timeout)
            self._service = build("youtube", "v3", developerKey=self._key, http=self._http,
                                  static_discovery=True,  # the discovery document shipped with the library: no fetch
                                  cache_discovery=False, client_options={"api_endpoint": base + "/"} if base else None)  # fmt: skip
        return self._service

    def call(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.get(method, what=method, params=params)[1]

    def get(self, method: str, *, what: str, params: Mapping[str, Any] | None = None) -> tuple[requests.Response, dict]:
        """One API call (e.g. "videos.list"): the google client builds the request, request() sends and sorts it."""
        resource, verb = method.split(".")
        built = getattr(getattr(self.service, resource)(), verb)(**(params or {}))
        response = self.request(built.method, built.uri, what=method, endpoint=method, headers=built.headers)
        return response, self.json_object(response, method)

    def send(self, method: str, url: str, *, endpoint: str = "", headers: Any = None, **kwargs: Any) -> requests.Response:
        """One attempt over the client's httplib2 transport, charged to the quota first, as a requests.Response."""
        import http.client  # here: only a youtube run needs it

        from httplib2 import HttpLib2Error

        self._spend(COSTS[endpoint], endpoint)
        try:
            answer, content = self._http.request(url, method=method, headers=dict(headers or {}))
        except (OSError, http.client.HTTPException, HttpLib2Error) as exc:  # the network: worth another attempt
            raise Retriable(f"cannot reach the API: {self.scrub(str(exc) or type(exc).__name__)}") from None
        response = requests.Response()
        response.status_code, response.reason = int(answer.status), getattr(answer, "reason", "") or ""
        response.headers = requests.structures.CaseInsensitiveDict(answer)
        response._content = content.encode("utf-8") if isinstance(content, str) else content
        return response

    def classify(self, response: requests.Response) -> api.Verdict:
        if not response.ok and google_error(response)[0] in RATE_REASONS:
            return api.retry(retry_after_seconds(response))
        return super().classify(response)

    def refused(self, response: requests.Response, text: str) -> api.Verdict:
        reason, message = google_error(response)
        message = self.scrub(message)
        if reason in QUOTA_REASONS:
            text = f"HTTP {response.status_code} {reason}: {message}"
            return api.fatal(f"the project's YouTube Data API quota is used up for today ({text}); it resets at "
                             "midnight Pacific time", whole_source=True, code=reason)  # fmt: skip
        key = reason in KEY_REASONS or "API key" in message
        text = f"HTTP {response.status_code}{' ' + reason if reason else ''}: {message}"
        return api.fatal(text + (" (check YOUTUBE_API_KEY)" if key else ""), whole_source=key, code=reason)

    def error_text(self, response: requests.Response) -> str:
        reason, message = google_error(response)
        return self.scrub(f"{reason + ': ' if reason else ''}{message}")

    def give_up(self, what: str, exc: Exception) -> StreamError:
        if isinstance(exc, Retriable):
            why = f"HTTP {exc.response.status_code} {self.error_text(exc.response)}" if exc.response is not None else exc
            return StreamError(f"{self.api_name} {what}: {why} (gave up after {self.policy.attempts} attempts)")
        return super().give_up(what, exc)

    # -- quota -----------------------------------------------------------------------------------

    def _quota_used_earlier_today(self) -> int:
        """Units that earlier runs recorded since midnight Pacific (etl_runs.per_source -> youtube -> quota_used)."""
        if self.state is None:
            return 0
        try:
            return self.state.spent_since(self.name, quota_day_start())
        except Exception as exc:  # without knowing what is left, spending could overrun the budget
            raise SourceError(f"youtube: cannot read today's quota use from etl_runs: {exc}") from None

    def _spend(self, units: int, method: str) -> None:
        budget = self.config.daily_quota
        if self.quota_used_earlier + self.quota_used + units > budget:
            raise SourceError(
                f"youtube: stopping before {method} ({units} unit{'s' if units != 1 else ''}): it would exceed "
                f"the daily budget YOUTUBE_DAILY_QUOTA={budget} ({self.quota_used_earlier} used by earlier runs "
                f"today, {self.quota_used} by this run); the quota day starts at midnight Pacific time"
            )
        self.quota_used += units
