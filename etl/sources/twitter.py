"""X (Twitter) API v2: recent search and user timelines, with photos and video/GIF previews as images."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Generator, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import requests

from etl.config import Settings
from etl.errors import ConfigError, RecordError, SourceError
from etl.http import Retriable, RetryPolicy, WaitTooLong, is_retriable_status, retry_after_seconds
from etl.records import Post, clean_text, extract_hashtags, post_from_dict
from etl.sources import register
from etl.sources.base import FetchWindow, Source, query_stream

log = logging.getLogger(__name__)

SEARCH_PATH = "/2/tweets/search/recent"
USER_BY_NAME_PATH = "/2/users/by/username/{username}"
TIMELINE_PATH = "/2/users/{id}/tweets"

# The same expansions and fields on every tweet request: media and author come back in `includes`.
TWEET_PARAMS = {
    "expansions": "attachments.media_keys,author_id",
    "media.fields": "url,preview_image_url,type",
    # note_tweet: a post longer than 280 characters comes whole only there (`text` is cut short).
    "tweet.fields": "created_at,public_metrics,entities,lang,note_tweet",
    "user.fields": "username",
}
PAGE_SIZE = 100  # the most either endpoint returns per page
MIN_PAGE_SIZE = 10  # recent search refuses max_results below 10 (timelines take 5)
MAX_IMAGES = 4
MAX_QUERY_CHARS = 512  # recent search's query length limit

# Recent search sees only the last 7 days; it answers 400 to a start_time or since_id older than that.
SEARCH_REACH = timedelta(days=7)
SEARCH_REACH_SLACK = timedelta(minutes=5)  # our clock and X's differ a little
# end_time must be at least 10 seconds before the request; a later `until` is the same as no end_time.
END_TIME_MARGIN = timedelta(seconds=30)
TWEPOCH_MS = 1288834974657  # snowflake ids carry their creation time in ms since this epoch, shifted 22 bits

USERNAME_RE = re.compile(r"^[A-Za-z0-9_]{1,15}$")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def snowflake_time(tweet_id: str) -> datetime | None:
    """When an X id was minted (ids are snowflakes), or None for something that is not one."""
    if not tweet_id.isdigit():
        return None
    return datetime.fromtimestamp(((int(tweet_id) >> 22) + TWEPOCH_MS) / 1000, tz=timezone.utc)


# X escapes exactly these three in `text` (and note_tweet.text); the archive keeps what the author wrote.
_ESCAPED = re.compile(r"&(amp|lt|gt);")
_UNESCAPED = {"amp": "&", "lt": "<", "gt": ">"}


def unescape_text(text: str) -> str:
    """`&amp;`, `&lt;` and `&gt;` back to `&`, `<`, `>` in one pass (so `&amp;lt;` stays the author's `&lt;`)."""
    return _ESCAPED.sub(lambda m: _UNESCAPED[m.group(1)], text)


def _username(value: str) -> str:
    return value.strip().lstrip("@")


def _problem(response: requests.Response) -> dict[str, Any]:
    """The error body (RFC 7807 problem, or the older {"errors": [...]}) as a dict; {} if it is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _problem_text(response: requests.Response) -> str:
    problem = _problem(response)
    parts = [str(problem[k]) for k in ("title", "detail") if problem.get(k)]
    for error in problem.get("errors") or []:
        if isinstance(error, dict) and (error.get("message") or error.get("detail")):
            parts.append(str(error.get("message") or error.get("detail")))
    if not parts:
        text = " ".join(response.text.split())[:200]
        parts.append(text or response.reason or "no details")
    return clean_text("; ".join(dict.fromkeys(parts))) or ""


class TwitterAPI:
    """The X API v2 endpoints the source calls: bearer auth, rate-limit headers, errors as SourceError."""

    def __init__(self, session: requests.Session, settings: Settings, policy: RetryPolicy):
        self.session = session
        self.base = settings.twitter_api_base.rstrip("/")
        token = settings.twitter_bearer_token.reveal().strip()
        # The header goes on each request, never on the session: the session may be shared with the
        # image downloader, and the token must not travel to media hosts.
        self._headers = {"Authorization": "Bearer " + token.removeprefix("Bearer ").strip()}
        self.policy = policy
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.max_wait = policy.max_wait

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One GET; 429 and 5xx retried by the policy (429 until x-rate-limit-reset); the JSON body, or SourceError."""
        url = self.base + path

        def attempt() -> requests.Response:
            response = self.session.get(url, params=params, headers=self._headers, timeout=self.timeout)
            self._log_rate_limit(path, response)
            if response.status_code == 429 and str(_problem(response).get("type", "")).endswith("/usage-capped"):
                return response  # a monthly/spend cap: waiting for the 15-minute window will not lift it
            if is_retriable_status(response.status_code):
                raise Retriable(
                    f"HTTP {response.status_code}", retry_after=retry_after_seconds(response), response=response
                )
            return response

        try:
            response = self.policy.call(attempt, describe=f"X API GET {path}")
        except (Retriable, WaitTooLong) as exc:
            if exc.response is None:
                raise SourceError(f"X API {path}: {exc}") from None
            response = exc.response
        except requests.RequestException as exc:
            raise SourceError(
                f"X API {path} could not be reached at {self.base}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise SourceError(f"X API {path} answered 200 with a body that is not a JSON object")
            return body
        raise self._error(path, response)

    def _error(self, path: str, response: requests.Response) -> SourceError:
        status = response.status_code
        problem = _problem(response)
        text = _problem_text(response)
        if status == 401:
            return SourceError(
                f"X API refused the bearer token (401 Unauthorized on {path}): check TWITTER_BEARER_TOKEN; "
                "it may be mistyped, or revoked or regenerated in the developer console"
            )
        if status == 403 and problem.get("reason") == "client-not-enrolled":
            return SourceError(
                f"X API 403 client-not-enrolled on {path}: the app behind TWITTER_BEARER_TOKEN has no read access "
                "at its access level (the Free tier cannot read posts; the app must belong to a Project with "
                f"pay-per-use credits or a Basic/Pro plan). X says: {text}"
            )
        if status == 403:
            return SourceError(
                f"X API 403 Forbidden on {path}: the token's app may not use this endpoint. X says: {text}"
            )
        if status == 429 and str(problem.get("type", "")).endswith("/usage-capped"):
            return SourceError(
                f"X API usage cap reached on {path}; no more reads until it resets or credits are added. X says: {text}"
            )
        if status == 429:
            wait = retry_after_seconds(response)
            reset = response.headers.get("x-rate-limit-reset", "")
            if wait is not None and wait > self.max_wait:
                at = (
                    datetime.fromtimestamp(int(reset), tz=timezone.utc).strftime("%H:%M:%S UTC")
                    if reset.isdigit()
                    else "?"
                )
                return SourceError(
                    f"X API rate limit reached on {path}: the window resets at {at} (in {wait:.0f}s), later than "
                    f"TWITTER_MAX_WAIT={self.max_wait:.0f}s allows; stopping the twitter source for this run "
                    "(what was fetched is kept)"
                )
            return SourceError(
                f"X API still rate limited on {path} after {self.policy.attempts} attempts; stopping for this run"
            )
        if status >= 500:
            return SourceError(f"X API {path} failed with HTTP {status} after {self.policy.attempts} attempts: {text}")
        return SourceError(f"X API refused {path} (HTTP {status}): {text}")

    @staticmethod
    def _log_rate_limit(path: str, response: requests.Response) -> None:
        headers = response.headers
        if "x-rate-limit-remaining" in headers:
            log.debug(
                "X API %s: HTTP %s, %s of %s requests left in the window, resets at %s",
                path,
                response.status_code,
                headers.get("x-rate-limit-remaining"),
                headers.get("x-rate-limit-limit", "?"),
                headers.get("x-rate-limit-reset", "?"),
            )

    def pages(self, path: str, params: Mapping[str, Any], token_param: str) -> Iterator[dict[str, Any]]:
        """Every page of a paginated endpoint; meta.next_token goes back as `token_param`. A repeated token stops it."""
        params = dict(params)
        seen: set[str] = set()
        while True:
            page = self.get(path, params)
            yield page
            token = (page.get("meta") or {}).get("next_token")
            if not token:
                return
            if token in seen:
                raise SourceError(f"X API {path} returned the same next_token twice; stopping rather than looping")
            seen.add(token)
            params[token_param] = token

    def user_by_username(self, username: str) -> dict[str, Any]:
        return self.get(USER_BY_NAME_PATH.format(username=username), {"user.fields": "username"})


def _image_url(media: Mapping[str, Any]) -> str | None:
    # Photos carry the image itself; videos and GIFs only a still frame (their files are mp4 variants).
    kind = media.get("type")
    if kind == "photo":
        url = media.get("url")
    elif kind in ("video", "animated_gif"):
        url = media.get("preview_image_url")
    else:
        return None
    return url.strip() if isinstance(url, str) and url.strip() else None


def tweet_to_post(
    tweet: Any, media_by_key: Mapping[str, Any], users_by_id: Mapping[str, Any], *, username: str | None = None
) -> Post:
    """One tweet of a v2 page (with the page's includes) -> Post; RecordError names what is wrong with it."""
    if not isinstance(tweet, Mapping):
        raise RecordError(f"expected a tweet object, got {type(tweet).__name__}")
    post_id = tweet.get("id")
    if not isinstance(post_id, str) or not post_id.isdigit():
        raise RecordError("missing id" if post_id in (None, "") else f"id {post_id!r} is not a tweet id")
    if not tweet.get("created_at"):
        raise RecordError("missing created_at")
    author = users_by_id.get(str(tweet.get("author_id")))
    author_name = author.get("username") if isinstance(author, Mapping) else None
    author_name = author_name if isinstance(author_name, str) and author_name else username
    attachments = tweet.get("attachments")
    keys = attachments.get("media_keys") if isinstance(attachments, Mapping) else None
    media = [media_by_key[k] for k in keys or () if isinstance(k, str) and k in media_by_key]
    urls = [url for url in map(_image_url, media) if url]
    note = tweet.get("note_tweet") if isinstance(tweet.get("note_tweet"), Mapping) else None
    whole = note if note is not None and isinstance(note.get("text"), str) else tweet
    text = unescape_text(whole["text"]) if isinstance(whole.get("text"), str) else None
    entities = whole.get("entities")
    tags = entities.get("hashtags") if isinstance(entities, Mapping) else None
    if isinstance(tags, list) and tags:
        names = (t.get("tag") for t in tags if isinstance(t, Mapping) and isinstance(t.get("tag"), str))
        hashtags = tuple(dict.fromkeys(name.lower() for name in names if name))
    else:
        hashtags = extract_hashtags(text)
    metrics = tweet.get("public_metrics") if isinstance(tweet.get("public_metrics"), Mapping) else {}
    # x.com/i/web/status/{id} resolves to the post whoever wrote it, for the rare tweet without its author.
    permalink = (
        f"https://x.com/{author_name}/status/{post_id}" if author_name else f"https://x.com/i/web/status/{post_id}"
    )
    # The shared validator, as for every source: dates, counts, text and sizes checked one way.
    return post_from_dict(
        {
            "platform": "twitter",
            "post_id": post_id,
            "created_at": tweet["created_at"],
            "author_username": author_name,
            "caption": text,
            "like_count": metrics.get("like_count"),
            "comment_count": metrics.get("reply_count"),
            "permalink": permalink,
            "image_urls": urls[:MAX_IMAGES],
            "hashtags": list(hashtags),
            "raw": {**tweet, "author": author, "media": media},
            # X's BCP 47 guess ("und" and the q* codes when it cannot tell: left unknown).
            "lang": tweet.get("lang") if isinstance(tweet.get("lang"), str) else None,
        }
    )


@register
class TwitterSource(Source):
    """Posts from the X API v2: a recent search (TWITTER_QUERY) and/or user timelines (TWITTER_USERNAMES)."""

    name = "twitter"
    required = ("twitter_bearer_token",)

    def __init__(self, settings: Settings, *, now: Callable[[], datetime] | None = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        # A 429 asks us to wait for x-rate-limit-reset, up to 15 minutes away: TWITTER_MAX_WAIT bounds it.
        self.policy = RetryPolicy.from_settings(settings, max_wait=settings.twitter_max_wait)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._user_ids: dict[str, str] = {}

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        settings.require(*cls.required)
        if not settings.twitter_query and not settings.twitter_usernames:
            raise ConfigError(
                "the twitter source needs TWITTER_QUERY (a recent search) or TWITTER_USERNAMES (user timelines), or both"
            )
        if len(settings.twitter_query) > MAX_QUERY_CHARS:
            raise ConfigError(
                f"TWITTER_QUERY is {len(settings.twitter_query)} characters; recent search takes at most {MAX_QUERY_CHARS}"
            )
        for name in settings.twitter_usernames:
            if not USERNAME_RE.match(_username(name)):
                raise ConfigError(
                    f"TWITTER_USERNAMES has {name!r}, which is not an X username (1-15 letters, digits or _)"
                )

    def probe(self) -> str | None:
        # An app-only token cannot call /2/users/me; a username lookup is the cheapest authenticated call.
        name = _username(self.settings.twitter_usernames[0]) if self.settings.twitter_usernames else "X"
        TwitterAPI(self.session, self.settings, self.policy).user_by_username(name)
        return f"GET /2/users/by/username/{name}: 1 user lookup (no post reads billed)"

    def config_key(self) -> str:
        usernames = sorted({_username(u).lower() for u in self.settings.twitter_usernames})
        ident = json.dumps({"query": self.settings.twitter_query, "usernames": usernames}, sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:12]

    def _streams(self) -> list[tuple[str, str | None]]:
        """(cursor key, username or None for the search), in the order they are read."""
        streams: list[tuple[str, str | None]] = [("search", None)] if self.settings.twitter_query else []
        for name in dict.fromkeys(_username(u) for u in self.settings.twitter_usernames):
            streams.append((f"user:{name.lower()}", name))
        return [(key, name) for key, name in streams if self.reads(self._stream_id(key))]

    def _stream_id(self, key: str) -> str:
        # A changed query is another stream (its own state from scratch); the cursor key stays "search".
        return query_stream(self.settings.twitter_query) if key == "search" else key

    def streams(self) -> list[str]:
        keys = (["search"] if self.settings.twitter_query else []) + [
            f"user:{name.lower()}" for name in dict.fromkeys(_username(u) for u in self.settings.twitter_usernames)
        ]
        return [self._stream_id(key) for key in keys]

    can_recheck = True

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """Held posts X says to delete, by a batch compliance job (etl/sources/x_compliance.py)."""
        from etl.sources import x_compliance

        client = x_compliance.ComplianceClient(self.session, self.settings, self.policy)
        return x_compliance.recheck(self, client, post_ids)

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        api = TwitterAPI(self.session, self.settings, self.policy)
        saved = window.cursor.get("since_id") if isinstance(window.cursor, Mapping) else None
        saved = {str(k): str(v) for k, v in saved.items() if str(v).isdigit()} if isinstance(saved, Mapping) else {}
        since_ids = dict(saved)
        self.cursor = {"since_id": dict(saved)} if saved else {}
        seen: set[str] = set()  # a post found by the search and a timeline both is yielded once
        budget = [window.limit]  # posts still allowed, shared by all streams; [None] = no limit
        for key, username in self._streams():
            if budget[0] is not None and budget[0] <= 0:
                break
            if username is None:
                path, token_param, params = SEARCH_PATH, "next_token", {"query": self.settings.twitter_query}
            else:
                user_id = self._user_id(api, username)
                if user_id is None:
                    continue
                path, token_param, params = TIMELINE_PATH.format(id=user_id), "pagination_token", {}
            bounds = self._bounds(key, saved.get(key), window)
            if bounds is None:
                continue
            self.stream = key  # newest first within a stream
            newest, complete = yield from self._read(
                api, key, path, {**params, **bounds}, token_param, window, username, seen, budget
            )
            # A backfill that stops before now, or a stream cut short by the limit, leaves its cursor alone:
            # the posts between the old since_id and the ones read would otherwise never be fetched.
            if newest and complete and window.until is None:
                since_ids[key] = str(max(int(newest), int(since_ids.get(key, 0))))
                self.cursor = {"since_id": dict(since_ids)}

    def _user_id(self, api: TwitterAPI, username: str) -> str | None:
        """The user id behind a username, looked up once per source; an unknown user is rejected and skipped."""
        cached = self._user_ids.get(username.lower())
        if cached:
            return cached
        body = api.user_by_username(username)
        self.quota_used += 1
        user = body.get("data")
        if not isinstance(user, Mapping) or not str(user.get("id", "")).isdigit():
            errors = [e for e in body.get("errors") or [] if isinstance(e, Mapping)]
            reason = (errors[0].get("detail") or errors[0].get("title")) if errors else "no user in the answer"
            self.reject(f"TWITTER_USERNAMES @{username}", str(reason))
            return None
        self._user_ids[username.lower()] = str(user["id"])
        return str(user["id"])

    def _bounds(self, key: str, since_id: str | None, window: FetchWindow) -> dict[str, str] | None:
        """since_id, or start_time/end_time, for one stream; None if the window is out of the stream's reach."""
        now = self._now()
        oldest_searchable = now - SEARCH_REACH + SEARCH_REACH_SLACK
        if since_id and key == "search" and (snowflake_time(since_id) or now) < oldest_searchable:
            log.info(
                "twitter: the saved since_id for the search is older than recent search's 7 days; reading all 7 days"
            )
            since_id = None
        if since_id:
            return {"since_id": since_id}  # X refuses since_id together with start_time/end_time
        bounds: dict[str, str] = {}
        start, until = window.since, window.until
        if key == "search" and until is not None and until <= oldest_searchable:
            log.warning(
                "twitter: recent search reaches back 7 days only; nothing before %s can be searched", _iso(until)
            )
            return None
        if key == "search" and start is not None and start < oldest_searchable:
            log.warning(
                "twitter: recent search reaches back 7 days only; searching from %s, not %s",
                _iso(oldest_searchable),
                _iso(start),
            )
            start = oldest_searchable
        if start is not None:
            bounds["start_time"] = _iso(start)
        if until is not None and until < now - END_TIME_MARGIN:
            bounds["end_time"] = _iso(until)
        return bounds

    def _read(
        self,
        api: TwitterAPI,
        key: str,
        path: str,
        params: dict[str, Any],
        token_param: str,
        window: FetchWindow,
        username: str | None,
        seen: set[str],
        budget: list[int | None],
    ) -> Generator[Post, None, tuple[str | None, bool]]:
        """Yield one stream's posts, newest first; return (the newest id seen, whether the stream was read to its end)."""
        by_since_id = "since_id" in params  # then the cursor, not window.since, is the lower bound
        params = {**params, **TWEET_PARAMS, "max_results": self._page_size(budget[0])}
        newest: str | None = None
        pages = posts = 0
        for page in api.pages(path, params, token_param):
            pages += 1
            includes = page.get("includes") if isinstance(page.get("includes"), Mapping) else {}
            media_by_key = {
                m["media_key"]: m for m in includes.get("media") or [] if isinstance(m, Mapping) and "media_key" in m
            }
            users_by_id = {str(u["id"]): u for u in includes.get("users") or [] if isinstance(u, Mapping) and "id" in u}
            tweets = page.get("data") if isinstance(page.get("data"), list) else []
            if page.get("errors"):
                if not tweets and username:
                    # A suspended or protected account answers 200 with only an errors list.
                    self.reject(f"@{username} timeline", _problem_text_of(page))
                    return newest, False
                # Partial errors (a deleted media item, a withheld author) come beside the data they spoil.
                log.debug("twitter: %s page %d: partial errors: %s", key, pages, _problem_text_of(page))
            for number, tweet in enumerate(tweets, start=1):
                self.quota_used += 1  # X bills each post read
                tweet_id = tweet.get("id") if isinstance(tweet, Mapping) else None
                if isinstance(tweet_id, str) and tweet_id.isdigit() and (newest is None or int(tweet_id) > int(newest)):
                    newest = tweet_id
                try:
                    post = tweet_to_post(tweet, media_by_key, users_by_id, username=username)
                except RecordError as exc:
                    shown = f" (id {tweet_id})" if tweet_id else ""
                    self.reject(f"{key} page {pages} item {number}{shown}", str(exc))
                    continue
                if by_since_id:
                    admitted = window.until is None or post.created_at < window.until
                else:
                    admitted = window.admits(post.created_at)
                if not admitted or post.post_id in seen:
                    continue
                seen.add(post.post_id)
                posts += 1
                yield post
                if budget[0] is not None:
                    budget[0] -= 1
                    if budget[0] <= 0:
                        log.info("twitter: %s: stopped at the limit after %d posts", key, posts)
                        return newest, False
        log.info("twitter: %s: %d posts from %d pages", key, posts, pages)
        return newest, True

    @staticmethod
    def _page_size(remaining: int | None) -> int:
        return PAGE_SIZE if remaining is None else max(MIN_PAGE_SIZE, min(PAGE_SIZE, remaining))


def _problem_text_of(body: Mapping[str, Any]) -> str:
    errors = [e for e in body.get("errors") or [] if isinstance(e, Mapping)]
    texts = [str(e.get("detail") or e.get("title") or e.get("message")) for e in errors]
    return "; ".join(dict.fromkeys(t for t in texts if t and t != "None")) or "no posts and an unexplained error"
