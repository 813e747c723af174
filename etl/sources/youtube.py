"""YouTube Data API v3: recent uploads of configured channels and/or search results, thumbnails as images."""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import Any

from etl.config import Settings
from etl.errors import ConfigError, RecordError, SourceError
from etl.http import Retriable, RetryPolicy, WaitTooLong
from etl.records import Post, extract_hashtags, parse_datetime, post_from_dict
from etl.sources import register
from etl.sources.base import FetchWindow, Source, query_stream

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

# The google client builds URLs with `key=<API key>` and puts them in HttpError and in its own
# debug/warning log lines; nothing with such a URL leaves this module unscrubbed.
_KEY_IN_TEXT = re.compile(r"([?&]key=)[^&#\s\"'>]+")
_HTML_TAG = re.compile(r"<[^>]+>")

# What the transport raises when the network fails (socket errors are OSError: refused, reset, timed out);
# httplib2's own HttpLib2Error is added in `call`, which imports it, like googleapiclient, only when used.
NETWORK_ERRORS = (OSError, http.client.HTTPException)

_QUOTA_TODAY_SQL = (
    "SELECT COALESCE(SUM((per_source -> %s ->> 'quota_used')::numeric), 0) FROM etl_runs"
    " WHERE started_at >= %s AND jsonb_typeof(per_source -> %s -> 'quota_used') = 'number'"
)


def scrub(text: str, *secrets: str) -> str:
    """The text without `key=...` URL parameters or any of the given secret values."""
    text = _KEY_IN_TEXT.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class _ScrubKeyFilter(logging.Filter):
    """Rewrites the google client's log records so the key in its request URLs never reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "key=" in message:
            record.msg, record.args = scrub(message), ()
        return True


for _logger_name in ("googleapiclient.discovery", "googleapiclient.http"):
    logging.getLogger(_logger_name).addFilter(_ScrubKeyFilter())


def quota_day_start(now: datetime | None = None) -> datetime:
    """Midnight Pacific time that began the current quota day (YouTube resets quotas then), in UTC."""
    try:
        from zoneinfo import ZoneInfo

        pacific: Any = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database on this machine: standard time is the safer (earlier) guess
        pacific = timezone(timedelta(hours=-8))
    local = (now or datetime.now(timezone.utc)).astimezone(pacific)
    midnight = datetime(local.year, local.month, local.day, tzinfo=pacific)
    return midnight.astimezone(timezone.utc)


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


def _rfc3339(moment: datetime, *, round_up: bool = False) -> str:
    moment = moment.astimezone(timezone.utc)
    if round_up and moment.microsecond:
        moment += timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _published(item: Mapping[str, Any]) -> datetime | None:
    """When a playlist item's or search result's video was published; None when the item does not say."""
    details = item.get("contentDetails") or {}
    snippet = item.get("snippet") or {}
    # A playlist item's snippet.publishedAt is when it was added to the playlist; for uploads that is the
    # upload time, while contentDetails.videoPublishedAt is when the video went public (absent if private).
    value = details.get("videoPublishedAt") or snippet.get("publishedAt")
    try:
        return parse_datetime(value)
    except RecordError:
        return None


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


@dataclass(frozen=True)
class _PageMark:
    """One page of a playlist as seen: the token that fetched it, its oldest video, the next page's token."""

    token: str | None
    oldest: datetime | None
    next_token: str | None


class YouTubeError(SourceError):
    """An error answer of the Data API, with its HTTP status and Google's reason; the key is never in it."""

    def __init__(self, message: str, *, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason


def _error_details(status: int, content: bytes, fallback: str) -> tuple[str, str]:
    """(reason, message) from Google's error JSON: {"error": {"code", "message", "errors": [{"reason", ...}]}}."""
    reason, message = "", ""
    try:
        data = json.loads(content.decode("utf-8", "replace"))
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
    if not message:
        message = content.decode("utf-8", "replace").strip()[:200] or fallback
    # Google's messages contain HTML ("exceeded your <a href=...>quota</a>").
    message = " ".join(html.unescape(_HTML_TAG.sub("", message)).split())
    return reason, message or f"HTTP {status}"


class YouTubeAPI:
    """The Data API calls the source makes: one method per endpoint, paging, retries, errors made readable.

    Quota is charged through `spend(units, method)` before every attempt; it raises to stop.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        policy: RetryPolicy,
        spend: Callable[[int, str], None],
        http: Any = None,
    ):
        self.settings = settings
        self.policy = policy
        self.spend = spend
        self._http = http
        self._key = settings.youtube_api_key.reveal()
        self._service: Any = None

    @property
    def service(self) -> Any:
        if self._service is None:
            import httplib2
            from googleapiclient.discovery import build

            base = self.settings.youtube_api_base
            # api_endpoint replaces rootUrl; the method paths (youtube/v3/...) are joined to it, so it needs
            # its trailing slash or a path prefix of the override would be dropped.
            options = {"api_endpoint": base + "/"} if base else None
            http = self._http or httplib2.Http(timeout=self.settings.read_timeout)
            self._service = build(
                "youtube",
                "v3",
                developerKey=self._key,
                http=http,
                static_discovery=True,  # the discovery document shipped with the library: no fetch
                cache_discovery=False,
                client_options=options,
            )
        return self._service

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One API call (e.g. "videos.list"), retried on 5xx, 429, rate limits and connection errors."""
        from googleapiclient.errors import HttpError
        from httplib2 import HttpLib2Error

        resource, verb = method.split(".")
        cost = COSTS[method]
        last: list[YouTubeError] = []

        def attempt() -> dict[str, Any]:
            self.spend(cost, method)
            request = getattr(getattr(self.service, resource)(), verb)(**params)
            try:
                # num_retries=0: retries are the policy's (one backoff for the whole package, and the
                # client's own retry log lines carry the key in the URL).
                response = request.execute(num_retries=0)
            except HttpError as exc:
                error = self._error(method, exc)
                if error.status is not None and (
                    error.status == 429 or error.status >= 500 or error.reason in RATE_REASONS
                ):
                    last[:] = [error]
                    raise Retriable(str(error), retry_after=_retry_after(exc)) from None
                raise error from None
            except (*NETWORK_ERRORS, HttpLib2Error) as exc:  # the network: worth another attempt
                reason = scrub(str(exc) or type(exc).__name__, self._key)
                last[:] = [YouTubeError(f"youtube {method}: cannot reach the API: {reason}")]
                raise Retriable(str(last[0])) from None
            if not isinstance(response, dict):
                # The client hands back a 2xx body that is not JSON as a string (a proxy's or portal's page).
                raise YouTubeError(f"youtube {method}: the API answered with something that is not a JSON object")
            return response

        try:
            return self.policy.call(attempt, describe=f"youtube {method}")
        except Retriable:
            error = last[0]
            raise YouTubeError(
                f"{error} (gave up after {self.policy.attempts} attempts)", status=error.status, reason=error.reason
            ) from None
        except WaitTooLong as exc:
            raise YouTubeError(
                f"youtube {method}: the API asked us to wait {exc.wait:.0f}s, longer than allowed"
            ) from None

    def _error(self, method: str, exc: Any) -> YouTubeError:
        status = int(exc.resp.status)
        reason, message = _error_details(status, exc.content or b"", getattr(exc.resp, "reason", "") or "")
        message = scrub(message, self._key)
        if reason in QUOTA_REASONS:
            text = (
                f"youtube {method}: the project's YouTube Data API quota is used up for today (HTTP {status} {reason}: "
                f"{message}); it resets at midnight Pacific time"
            )
        else:
            text = f"youtube {method}: HTTP {status}{' ' + reason if reason else ''}: {message}"
            if reason in KEY_REASONS or "API key" in message:
                text += " (check YOUTUBE_API_KEY)"
        return YouTubeError(text, status=status, reason=reason)

    def pages(self, method: str, *, start: str | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """Every page of a list call from page token `start`, following nextPageToken; a repeated token ends it."""
        seen: set[str] = set()
        token = start
        while True:
            page = self.call(method, **params, **({"pageToken": token} if token else {}))
            yield page
            token = page.get("nextPageToken")
            if not token:
                return
            if token in seen:
                log.warning("youtube %s repeated page token %r; stopping there", method, token)
                return
            seen.add(token)

    def channels(self, **params: Any) -> list[dict[str, Any]]:
        page = self.call("channels.list", part="contentDetails", maxResults=PAGE_SIZE, **params)
        return [item for item in page.get("items") or [] if isinstance(item, dict)]

    def playlist_items(self, playlist_id: str, *, start: str | None = None) -> Iterator[dict[str, Any]]:
        """Pages of a playlist from page token `start`; the uploads playlist comes newest first."""
        return self.pages(
            "playlistItems.list",
            start=start,
            part="snippet,contentDetails",
            playlistId=playlist_id,
            maxResults=PAGE_SIZE,
        )

    def search(self, query: str, *, since: datetime | None, until: datetime | None) -> Iterator[dict[str, Any]]:
        """Pages of video search results, newest first."""
        params: dict[str, Any] = {
            "part": "snippet",
            "q": query,
            "type": "video",
            "order": "date",
            "maxResults": PAGE_SIZE,
        }
        if since is not None:
            params["publishedAfter"] = _rfc3339(since)
        if until is not None:
            params["publishedBefore"] = _rfc3339(until, round_up=True)
        return self.pages("search.list", **params)

    def videos(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """id -> videos.list item (snippet, statistics) for up to 50 ids; private and deleted videos are absent."""
        page = self.call("videos.list", part="snippet,statistics", id=",".join(ids))
        return {item["id"]: item for item in page.get("items") or [] if isinstance(item, dict) and item.get("id")}


def _retry_after(exc: Any) -> float | None:
    value = exc.resp.get("retry-after") if hasattr(exc.resp, "get") else None
    return float(value) if isinstance(value, str) and value.strip().isdigit() else None


@register
class YouTubeSource(Source):
    """Uploads of YOUTUBE_CHANNEL_IDS and/or YOUTUBE_QUERY search results; the best thumbnail is the image.

    `http` (an httplib2.Http, or googleapiclient.http.HttpMockSequence in tests) replaces the real transport.
    """

    name = "youtube"
    required = ("youtube_api_key",)

    def __init__(self, settings: Settings, *, http: Any = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self._http = http
        self._api: YouTubeAPI | None = None
        # Kept for the source's lifetime, so the chunks of a backfill (one fetch each) do not pay again:
        self._uploads: list[tuple[str, str]] | None = None  # (channel, uploads playlist), resolved once
        self._page_index: dict[str, list[_PageMark]] = {}  # per playlist, the pages seen, from the top
        self.quota_used_earlier = 0  # by earlier runs of today's quota day, read from etl_runs
        self._stream_of_video: dict[str, str] = {}  # video id -> channel or "search" (candidates are read ahead)

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        super().check_settings(settings)
        if not settings.youtube_channel_ids and not settings.youtube_query:
            raise ConfigError(
                "the youtube source needs YOUTUBE_CHANNEL_IDS (channels whose uploads to archive) "
                "or YOUTUBE_QUERY (a search query), or both; neither is set"
            )

    def probe(self) -> str | None:
        # channels.list of one id: 1 quota unit, whether or not the channel exists; a bad key is refused.
        channel = (self.settings.youtube_channel_ids or ("UC_x5XG1OV2P6uZZ5FSM9Ttw",))[0]
        self.api.call("channels.list", part="id", id=channel, maxResults=1)
        return f"channels.list: {COSTS['channels.list']} quota unit of YOUTUBE_DAILY_QUOTA"

    def config_key(self) -> str:
        spec = json.dumps(
            {"channels": sorted(set(self.settings.youtube_channel_ids)), "query": self.settings.youtube_query},
            sort_keys=True,
        )
        return "cfg-" + hashlib.sha256(spec.encode("utf-8")).hexdigest()[:16]

    def streams(self) -> list[str]:
        channels = [f"channel:{c}" for c in dict.fromkeys(self.settings.youtube_channel_ids)]
        return channels + ([query_stream(self.settings.youtube_query)] if self.settings.youtube_query else [])

    def _query(self) -> str:
        query = self.settings.youtube_query
        return query if query and self.reads(query_stream(query)) else ""

    @property
    def api(self) -> YouTubeAPI:
        if self._api is None:
            self._api = YouTubeAPI(self.settings, policy=self.policy, spend=self._spend, http=self._http)
        return self._api

    # -- quota -----------------------------------------------------------------------------------

    def _quota_used_earlier_today(self) -> int:
        """Units that earlier runs recorded since midnight Pacific (etl_runs.per_source -> youtube -> quota_used)."""
        if self.db is None:
            return 0
        try:
            with self.db.transaction() as cur:
                cur.execute(_QUOTA_TODAY_SQL, (self.name, quota_day_start(), self.name))
                row = cur.fetchone()
        except Exception as exc:  # without knowing what is left, spending could overrun the budget
            raise SourceError(f"youtube: cannot read today's quota use from etl_runs: {exc}") from None
        return int(row[0]) if row and row[0] is not None else 0

    def _spend(self, units: int, method: str) -> None:
        budget = self.settings.youtube_daily_quota
        if self.quota_used_earlier + self.quota_used + units > budget:
            raise SourceError(
                f"youtube: stopping before {method} ({units} unit{'s' if units != 1 else ''}): it would exceed "
                f"the daily budget YOUTUBE_DAILY_QUOTA={budget} ({self.quota_used_earlier} used by earlier runs "
                f"today, {self.quota_used} by this run); the quota day starts at midnight Pacific time"
            )
        self.quota_used += units

    # -- fetching --------------------------------------------------------------------------------

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        self.quota_used_earlier = self._quota_used_earlier_today()
        log.info(
            "youtube: %d channel(s), query %s, quota budget %d (%d used earlier today)",
            len(self.settings.youtube_channel_ids),
            "set" if self.settings.youtube_query else "unset",
            self.settings.youtube_daily_quota,
            self.quota_used_earlier,
        )
        candidates = self._candidates(window)
        yielded = 0
        while True:
            # Ask videos.list only for as many as the limit still allows, 50 at most.
            size = PAGE_SIZE if window.limit is None else min(PAGE_SIZE, window.limit - yielded)
            batch = list(islice(candidates, size)) if size > 0 else []
            if not batch:
                break
            for post in self._posts(batch, window):
                yield post
                yielded += 1
        log.info("youtube: %d video(s), %d quota unit(s) used", yielded, self.quota_used)

    def stream_of(self, post: Post) -> str | None:
        return self._stream_of_video.get(post.post_id)

    def _candidates(self, window: FetchWindow) -> Iterator[tuple[str, dict[str, Any]]]:
        """(video id, playlist item or search result) in the window, each video once, newest first per listing."""
        seen: set[str] = set()
        for channel, playlist in self._uploads_playlists():
            try:
                for vid, item in self._listing(self._playlist_pages(playlist, window), window):
                    if vid not in seen:
                        seen.add(vid)
                        self._stream_of_video[vid] = f"channel:{channel}"
                        yield vid, item
            except YouTubeError as exc:
                if exc.reason != "playlistNotFound":
                    raise
                # A channel without public uploads has no uploads playlist to list: nothing to archive.
                log.warning("youtube: channel %s has no public uploads (%s)", channel, exc)
        if self._query():
            pages = self.api.search(self._query(), since=window.since, until=window.until)
            for vid, item in self._listing(pages, window):
                if vid not in seen:
                    seen.add(vid)
                    self._stream_of_video[vid] = "search"
                    yield vid, item

    def _uploads_playlists(self) -> list[tuple[str, str]]:
        """(channel, uploads playlist id) for each configured channel, in order; one channels.list per 50 ids."""
        if self._uploads is None:
            self._uploads = list(self._resolve_channels())
        return self._uploads

    def _resolve_channels(self) -> Iterator[tuple[str, str]]:
        configured = [c for c in dict.fromkeys(self.settings.youtube_channel_ids) if self.reads(f"channel:{c}")]
        uploads: dict[str, str] = {}
        ids = [c for c in configured if not c.startswith("@")]
        for start in range(0, len(ids), PAGE_SIZE):
            for item in self.api.channels(id=",".join(ids[start : start + PAGE_SIZE])):
                playlist = ((item.get("contentDetails") or {}).get("relatedPlaylists") or {}).get("uploads")
                if item.get("id") and playlist:
                    uploads[item["id"]] = playlist
        for channel in configured:
            if channel.startswith("@"):  # a handle: channels.list?forHandle=@name resolves it
                for item in self.api.channels(forHandle=channel):
                    playlist = ((item.get("contentDetails") or {}).get("relatedPlaylists") or {}).get("uploads")
                    if playlist:
                        uploads[channel] = playlist
            if channel in uploads:
                yield channel, uploads[channel]
            else:
                # channels.list answers an unknown id with an empty list, not an error.
                self.reject(f"channel {channel}", "not found (check YOUTUBE_CHANNEL_IDS)")

    def _playlist_pages(self, playlist: str, window: FetchWindow) -> Iterator[dict[str, Any]]:
        """The playlist's pages for this window; a backfill chunk starts near its `until` instead of at the top.

        The uploads playlist is newest first and a backfill walks its chunks oldest first, so without this
        every chunk would page down from the newest upload again. Page tokens are offsets, so the tokens
        (and the oldest date) of the pages seen earlier in this run say where a chunk's videos begin.
        """
        index = self._page_index.setdefault(playlist, [])
        position, start = 0, None
        if window.until is not None and index:
            first = next(
                (n for n, mark in enumerate(index) if mark.oldest is not None and mark.oldest < window.until), None
            )
            if first is None:  # every page seen is newer than the chunk: go on after the last one
                if index[-1].next_token is None:
                    return
                position, start = len(index), index[-1].next_token
            else:
                # One page early: a video deleted meanwhile moves later items up across a page boundary.
                position = max(first - 1, 0)
                start = index[position].token
        token = start
        for page in self.api.playlist_items(playlist, start=start):
            dates = [d for d in (_published(i) for i in page.get("items") or [] if isinstance(i, dict)) if d]
            mark = _PageMark(token, min(dates) if dates else None, page.get("nextPageToken") or None)
            if position < len(index):
                index[position] = mark
            else:
                index.append(mark)
            position += 1
            token = mark.next_token
            yield page

    def _listing(self, pages: Iterator[dict[str, Any]], window: FetchWindow) -> Iterator[tuple[str, dict[str, Any]]]:
        """Items of newest-first pages that fall in the window, stopping after the page that reaches window.since."""
        for page in pages:
            reached_since = False
            for item in page.get("items") or []:
                if not isinstance(item, dict):
                    continue
                vid = _video_id(item)
                if vid is None:
                    continue
                published = _published(item)
                if published is not None:
                    if window.since is not None and published < window.since:
                        # Older than the watermark: the rest is older too. The page is already paid for,
                        # so finish it (an item scheduled or reordered late is still seen), then stop.
                        reached_since = True
                        continue
                    if window.until is not None and published >= window.until:
                        continue  # a backfill: newer than its end, keep paging towards it
                yield vid, item
            if reached_since:
                return

    def _posts(self, batch: list[tuple[str, dict[str, Any]]], window: FetchWindow) -> Iterator[Post]:
        videos = self.api.videos([vid for vid, _ in batch])
        for vid, listing in batch:
            video = videos.get(vid)
            if video is None:
                # Private and deleted videos stay in playlists ("Private video") but videos.list omits them.
                log.info("youtube: video %s is private or deleted; skipped", vid)
                self.report_gone(vid, "private or deleted on YouTube")
                continue
            post = self._to_post(vid, video, listing)
            if post is not None and window.admits(post.created_at):
                yield post

    def _to_post(self, vid: str, video: dict[str, Any], listing: dict[str, Any]) -> Post | None:
        snippet = {**(listing.get("snippet") or {}), **(video.get("snippet") or {})}
        statistics = video.get("statistics") or {}
        title = snippet.get("title") or ""
        description = snippet.get("description") or ""
        caption = f"{title}\n\n{description}" if description else title
        thumbnail = best_thumbnail(snippet.get("thumbnails"))
        record = {
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
            "lang": next((v for v in (snippet.get("defaultLanguage"), snippet.get("defaultAudioLanguage")) if isinstance(v, str) and v), None),
        }
        try:
            return post_from_dict(record)
        except RecordError as exc:
            self.reject(f"video {vid}", str(exc))
            return None
