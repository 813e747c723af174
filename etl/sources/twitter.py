"""X (Twitter) API v2: recent search and user timelines, with photos and video/GIF previews as images."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from etl.config import Secret, Setting, Settings, comma_list, http_base, non_negative_float, text
from etl.errors import ConfigError, RecordError
from etl.http import RetryPolicy
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, clean_text, extract_hashtags, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, CursorPaginator, Entry, Stream, StreamError, Verdict, fatal
from etl.sources.base import FetchWindow, query_stream

SETTINGS = (
    Setting("TWITTER_BEARER_TOKEN", text, Secret(""), "X API v2 app bearer token", secret=True),
    Setting("TWITTER_QUERY", text, "", "recent search query"),
    Setting("TWITTER_USERNAMES", comma_list, (), "user timelines to archive"),
    Setting("TWITTER_API_BASE", http_base, "https://api.x.com", "API base URL"),
    Setting("TWITTER_MAX_WAIT", non_negative_float, 900.0, "longest wait (s) for a rate-limit reset"),
)

log = logging.getLogger(__name__)

SEARCH_PATH = "/2/tweets/search/recent"
USER_BY_NAME_PATH = "/2/users/by/username/{username}"
TIMELINE_PATH = "/2/users/{id}/tweets"

# The same expansions and fields on every tweet request: media and author come back in `includes`. A retweet's own
# `text` is "RT @author: " and the original cut short; the original itself (its whole text, its author, its media)
# comes only in includes.tweets/users/media, through the referenced_tweets.id expansions (docs.x.com/x-api/
# fundamentals/expansions). tweet.fields apply to those included posts too (note_tweet, created_at, ...).
TWEET_PARAMS = {
    "expansions": "attachments.media_keys,author_id,referenced_tweets.id,referenced_tweets.id.author_id,"
    "referenced_tweets.id.attachments.media_keys",
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


# Photos carry the image itself; videos and GIFs only a still frame (their files are mp4 variants).
IMAGE_FIELDS = {"photo": "url", "video": "preview_image_url", "animated_gif": "preview_image_url"}


def _username(value: str) -> str:
    return value.strip().lstrip("@")


def _errors_text(body: Any, *keys: str) -> list[str]:
    """The texts of an {"errors": [...]} list (the error body, RFC 7807 or older), each error's first of `keys`."""
    errors = [e for e in api.dig(body, "errors", list) or [] if isinstance(e, Mapping)]
    return [str(t) for t in (next((e[k] for k in keys if e.get(k)), None) for e in errors) if t]


def _tweet_id(tweet: Any) -> str:
    if not isinstance(tweet, Mapping):
        raise RecordError(f"expected a tweet object, got {type(tweet).__name__}")
    post_id = tweet.get("id")
    if not isinstance(post_id, str) or not post_id.isdigit():
        raise RecordError("missing id" if post_id in (None, "") else f"id {post_id!r} is not a tweet id")
    return post_id


def retweeted_id(tweet: Mapping[str, Any]) -> str | None:
    """The id of the post a retweet reposts (its referenced_tweets entry of type "retweeted"); None for any other
    tweet (a quote or a reply keeps its own text: it is a post of its own)."""
    for ref in api.dig(tweet, "referenced_tweets", list) or ():
        if api.dig(ref, "type") == "retweeted":
            return str(api.dig(ref, "id") or "")
    return None


_NOTHING: Mapping[str, Any] = MappingProxyType({})


def tweet_to_post(
    tweet: Any,
    media_by_key: Mapping[str, Any],
    users_by_id: Mapping[str, Any],
    *,
    username: str | None = None,
    tweets_by_id: Mapping[str, Any] = _NOTHING,
    unavailable: Mapping[str, str] = _NOTHING,
) -> Post:
    """One tweet of a v2 page (with the page's includes) -> Post; RecordError names what is wrong with it.

    A retweet is the original post (from includes.tweets: its id, author, text, media, date and counts), as a
    Bluesky repost or a Mastodon reblog is; `unavailable` holds X's reason for an included post it did not send."""
    _tweet_id(tweet)
    original_id = retweeted_id(tweet)
    if original_id is None:
        return _post(tweet, media_by_key, users_by_id, username=username)
    original = tweets_by_id.get(original_id)
    if not isinstance(original, Mapping):
        # Deleted, protected or withheld: X sends an error beside the page instead. The retweet's own text is the
        # original cut short behind "RT @author: ", not a post of its own: nothing is archived for it.
        why = unavailable.get(original_id) or "not among the page's included posts"
        raise RecordError(f"a retweet of {original_id or '(no id)'}, which X did not send ({why}); not archived "
                          "with its own cut-short text")  # fmt: skip
    try:
        # username=None: the original's author is its own (includes.users), never the timeline's owner.
        return _post(original, media_by_key, users_by_id, retweet=tweet)
    except RecordError as exc:
        raise RecordError(f"the retweeted post {original_id}: {exc}") from None


def _post(
    tweet: Mapping[str, Any],
    media_by_key: Mapping[str, Any],
    users_by_id: Mapping[str, Any],
    *,
    username: str | None = None,
    retweet: Mapping[str, Any] | None = None,
) -> Post:
    post_id = _tweet_id(tweet)
    if not tweet.get("created_at"):
        raise RecordError("missing created_at")
    author = users_by_id.get(str(tweet.get("author_id")))
    author_name = api.dig(author, "username", str) or username
    keys = api.dig(tweet, "attachments.media_keys", list) or ()
    media = [media_by_key[k] for k in keys if isinstance(k, str) and k in media_by_key]
    urls = [url for url in (api.url_by_type(m, IMAGE_FIELDS) for m in media) if url]
    whole = tweet["note_tweet"] if api.dig(tweet, "note_tweet.text", str) is not None else tweet
    text = unescape_text(whole["text"]) if isinstance(whole.get("text"), str) else None
    tags = [api.dig(t, "tag", str) for t in api.dig(whole, "entities.hashtags", list) or ()]
    hashtags = tuple(dict.fromkeys(t.lower() for t in tags if t)) if tags else extract_hashtags(text)
    # x.com/i/web/status/{id} resolves to the post whoever wrote it, for the rare tweet without its author.
    permalink = f"https://x.com/{author_name or 'i/web'}/status/{post_id}"
    raw = {**tweet, "author": author, "media": media}
    if retweet is not None:
        raw["retweet"] = dict(retweet)  # provenance: the listing's item that brought the original in
    # The shared validator, as for every source: dates, counts, text and sizes checked one way.
    return post_from_dict(
        {
            "platform": "twitter",
            "post_id": post_id,
            "created_at": tweet["created_at"],
            "author_username": author_name,
            "caption": text,
            "like_count": api.dig(tweet, "public_metrics.like_count"),
            "comment_count": api.dig(tweet, "public_metrics.reply_count"),
            "permalink": permalink,
            "image_urls": urls[:MAX_IMAGES],
            "hashtags": list(hashtags),
            "raw": raw,
            # X's BCP 47 guess ("und" and the q* codes when it cannot tell: left unknown).
            "lang": api.dig(tweet, "lang", str),
        }
    )


def _unavailable(page: Any) -> dict[str, str]:
    """X's reason for each included post it could not send (a partial error naming a tweet: deleted, protected)."""
    reasons: dict[str, str] = {}
    for error in api.dig(page, "errors", list) or ():
        if isinstance(error, Mapping) and error.get("resource_type") == "tweet":
            key = error.get("resource_id") or error.get("value")
            text = error.get("detail") or error.get("title")
            if key is not None and text:
                reasons.setdefault(str(key), clean_text(str(text)))
    return reasons


class Tweets(Stream):
    """A newest-first list of tweets: the recent search (slot "search") or one user's timeline ("user:NAME")."""

    def __init__(self, source: TwitterSource, key: str, slot: str, username: str | None = None):
        super().__init__(key, slot, slot=slot)
        self.source, self.username = source, username

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        source = self.source
        if self.username is None:
            path, token_param, params = SEARCH_PATH, "next_token", {"query": source.config.query}
        else:
            user_id = source.user_id(self.username)
            if user_id is None:
                return
            path, token_param, params = TIMELINE_PATH.format(id=user_id), "pagination_token", {}
        bounds = _bounds(self.slot == "search", None if after is None else str(after), window, source.now())
        if bounds is None:
            return
        floor = None if "since_id" in bounds else window.since
        size = api.page_size(window.limit, PAGE_SIZE, MIN_PAGE_SIZE)
        params = {**params, **bounds, **TWEET_PARAMS, "max_results": size}
        pages = source.pages(source.base + path, params, CursorPaginator("meta.next_token", token_param), what=path)
        for number, page in enumerate(pages, start=1):
            media = {m["media_key"]: m for m in api.dig(page, "includes.media", list) or [] if api.dig(m, "media_key")}
            users = {str(u["id"]): u for u in api.dig(page, "includes.users", list) or [] if api.dig(u, "id")}
            # The posts the page's tweets refer to (a retweet's original, a quoted or replied-to post).
            included = {str(t["id"]): t for t in api.dig(page, "includes.tweets", list) or [] if api.dig(t, "id")}
            source.quota_used += len(included)  # X bills each post a response returns, the included ones too
            unavailable = _unavailable(page)
            tweets = api.dig(page, "data", list) or []
            if page.get("errors"):
                problem = "; ".join(dict.fromkeys(_errors_text(page, "detail", "title", "message")))
                if not tweets and self.username:
                    # A suspended or protected account answers 200 with only an errors list.
                    source.reject(f"@{self.username} timeline", problem or "no posts and an unexplained error")
                    raise StreamError(problem, reported=True)
                # Partial errors (a deleted media item, a withheld author) come beside the data they spoil.
                log.debug("twitter: %s page %d: partial errors: %s", self.slot, number, problem)
            for tweet in tweets:
                source.quota_used += 1  # X bills each post read
                tid = api.dig(tweet, "id", str)
                tid = tid if tid and tid.isdigit() else None
                minted = snowflake_time(tid) if tid else None
                if floor is not None and minted is not None and minted < floor:
                    continue  # start_time bounds the listing; a tweet older than the window is not taken
                # A retweet sits here at its own id (since_id and the resume point), its post is the original.
                item = (tweet, media, users, included, unavailable)
                yield Entry(item, order=tid and int(tid), label=f"{tid or '(no id)'} on page {number}")

    def encode(self, order: Any) -> Any:
        return str(order)

    def decode(self, value: Any) -> Any:
        minted = snowflake_time(str(value))
        if minted is None:
            return None
        if self.slot == "search" and minted < self.source.now() - SEARCH_REACH + SEARCH_REACH_SLACK:
            # X answers 400 to a since_id older than recent search reaches: read the window (7 days at most).
            log.info("twitter: the saved since_id for the search is older than recent search's 7 days; reading all 7 days")
            return None
        return int(value)


def _bounds(search: bool, since_id: str | None, window: FetchWindow, now: datetime) -> dict[str, str] | None:
    """since_id, or start_time/end_time, for one stream; None if the window is out of the stream's reach."""
    oldest_searchable = now - SEARCH_REACH + SEARCH_REACH_SLACK
    if since_id:
        return {"since_id": since_id}  # X refuses since_id together with start_time/end_time
    bounds: dict[str, str] = {}
    start, until = window.since, window.until
    if search and until is not None and until <= oldest_searchable:
        log.warning("twitter: recent search reaches back 7 days only; nothing before %s can be searched",
                    api.utc_text(until))  # fmt: skip
        return None
    if search and start is not None and start < oldest_searchable:
        log.warning("twitter: recent search reaches back 7 days only; searching from %s, not %s",
                    api.utc_text(oldest_searchable), api.utc_text(start))  # fmt: skip
        start = oldest_searchable
    if start is not None:
        bounds["start_time"] = api.utc_text(start)
    if until is not None and until < now - END_TIME_MARGIN:
        bounds["end_time"] = api.utc_text(until)
    return bounds


@register
class TwitterSource(APISource):
    """Posts from the X API v2: a recent search (TWITTER_QUERY) and/or user timelines (TWITTER_USERNAMES)."""

    name = "twitter"
    api_name = "X API"
    rate_limit_headers = ("x-rate-limit-remaining", "x-rate-limit-limit", "x-rate-limit-reset")
    wait_setting = "TWITTER_MAX_WAIT"
    required = ("bearer_token",)
    one_of = MappingProxyType({"query": "a recent search", "usernames": "user timelines"})
    patterns = MappingProxyType(
        {"usernames": (USERNAME_RE, "not an X username (1-15 letters, digits or _)", _username)}
    )
    stream_error_ends_fetch = True  # the runner records the stream as failed, keeps its since_id, runs the next

    def __init__(self, settings: Settings, **kwargs: Any):
        super().__init__(settings, **kwargs)
        # A 429 asks us to wait for x-rate-limit-reset, up to 15 minutes away: TWITTER_MAX_WAIT bounds it.
        self.policy = RetryPolicy.from_settings(settings, max_wait=self.config.max_wait)
        self.base = self.config.api_base.rstrip("/")
        token = self.config.bearer_token.reveal().strip()
        # On each request, never on the session: the session may be shared with the image downloader.
        self.auth_headers = {"Authorization": "Bearer " + token.removeprefix("Bearer ").strip()}
        self._user_ids: dict[str, str] = {}

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        super().check_settings(settings)
        if len(query := settings.source(cls.name).query) > MAX_QUERY_CHARS:
            raise ConfigError(
                f"TWITTER_QUERY is {len(query)} characters; recent search takes at most {MAX_QUERY_CHARS}"
            )

    def probe(self) -> str | None:
        # An app-only token cannot call /2/users/me; a username lookup is the cheapest authenticated call.
        name = _username(self.config.usernames[0]) if self.config.usernames else "X"
        self._lookup(name)
        return f"GET /2/users/by/username/{name}: 1 user lookup (no post reads billed)"

    def config_key(self) -> str:
        usernames = sorted({_username(u).lower() for u in self.config.usernames})
        return api.config_hash({"query": self.config.query, "usernames": usernames})

    def stream_objects(self) -> list[Stream]:
        # A changed query is another stream (its own state from scratch); its cursor slot stays "search".
        query = self.config.query
        search = [Tweets(self, query_stream(query), "search")] if query else []
        names = dict.fromkeys(_username(u) for u in self.config.usernames)
        return [*search, *(Tweets(self, f"user:{n.lower()}", f"user:{n.lower()}", n) for n in names)]

    def load_positions(self, cursor: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        saved = cursor.get("since_id") if isinstance(cursor, Mapping) else None
        saved = saved if isinstance(saved, Mapping) else {}
        return {str(k): {"after": str(v)} for k, v in saved.items() if str(v).isdigit()}

    def dump_positions(self, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        since_ids = {slot: state["after"] for slot, state in states.items() if "after" in state}
        return {"since_id": since_ids} if since_ids else {}

    can_recheck = True

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """Held posts X says to delete, by a batch compliance job (etl/sources/x_compliance.py)."""
        from etl.sources import x_compliance

        client = x_compliance.ComplianceClient(self.session, self.settings, self.policy)
        return x_compliance.recheck(self, client, post_ids)

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        tweet, media, users, included, unavailable = item
        username = getattr(stream, "username", None)
        return tweet_to_post(tweet, media, users, username=username, tweets_by_id=included, unavailable=unavailable)

    def classify(self, response: requests.Response) -> Verdict:
        if response.status_code == 429 and str(api.dig(api.json_of(response), "type")).endswith("/usage-capped"):
            # A monthly/spend cap: waiting for the 15-minute window will not lift it.
            return fatal(f"usage cap reached; no more reads until it resets or credits are added. X says: "
                         f"{self.error_text(response)}", whole_source=True)  # fmt: skip
        return super().classify(response)

    def refused(self, response: requests.Response, text: str) -> Verdict:
        status, problem = response.status_code, api.json_of(response)
        if status == 401:
            return fatal("the bearer token (401 Unauthorized): check TWITTER_BEARER_TOKEN; it may be mistyped, "
                         "or revoked or regenerated in the developer console", whole_source=True)  # fmt: skip
        if status == 403 and api.dig(problem, "reason") == "client-not-enrolled":
            return fatal(
                "403 client-not-enrolled: the app behind TWITTER_BEARER_TOKEN has no read access at its access level "
                "(the Free tier cannot read posts; the app must belong to a Project with pay-per-use credits or a "
                f"Basic/Pro plan). X says: {text}", whole_source=True,
            )  # fmt: skip
        if status == 403:
            return fatal(f"403 Forbidden: the token's app may not use this endpoint. X says: {text}")
        return fatal(f"HTTP {status}: {text}")

    def error_text(self, response: requests.Response) -> str:
        problem = api.json_of(response)
        parts = [str(v) for k in ("title", "detail") if (v := api.dig(problem, k))]
        parts += _errors_text(problem, "message", "detail")
        return clean_text("; ".join(dict.fromkeys(parts))) or super().error_text(response)

    def _lookup(self, username: str) -> dict[str, Any]:
        path = USER_BY_NAME_PATH.format(username=username)
        return self.get_json(self.base + path, what=path, params={"user.fields": "username"})[1]

    def user_id(self, username: str) -> str | None:
        """The user id behind a username, looked up once per source; an unknown user is rejected and skipped."""
        cached = self._user_ids.get(username.lower())
        if cached:
            return cached
        body = self._lookup(username)
        self.quota_used += 1
        user_id = str(api.dig(body, "data.id"))
        if not user_id.isdigit():
            reasons = _errors_text(body, "detail", "title")
            self.reject(f"TWITTER_USERNAMES @{username}", reasons[0] if reasons else "no user in the answer")
            return None
        self._user_ids[username.lower()] = user_id
        return user_id
