"""Reddit (app-only OAuth): subreddits' /new listings, galleries in their order, previews for the rest."""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from etl.config import Secret, Setting, comma_list, http_base, text
from etl.errors import RecordError
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, CursorPaginator, Entry, Stream, StreamError, Verdict, fatal
from etl.sources.base import FetchWindow

SETTINGS = (
    Setting("REDDIT_CLIENT_ID", text, "", "Reddit app client id (approved API access)"),
    Setting("REDDIT_CLIENT_SECRET", text, Secret(""), "Reddit app client secret", secret=True),
    Setting(
        "REDDIT_USER_AGENT", text, "", "descriptive User-Agent Reddit requires, e.g. 'linux:org.example.archiver:1.0 (by /u/you)'"
    ),
    Setting("REDDIT_SUBREDDITS", comma_list, (), "subreddits (without r/) whose /new listing to archive"),
    Setting("REDDIT_API_BASE", http_base, "https://oauth.reddit.com", "Reddit OAuth API base URL"),
    Setting("REDDIT_AUTH_BASE", http_base, "https://www.reddit.com", "Reddit token endpoint base URL"),
)

log = logging.getLogger(__name__)

TOKEN_PATH = "/api/v1/access_token"
NEW_PATH = "/r/{name}/new"
INFO_PATH = "/api/info"
NOT_GONE = ("automod_filtered",)  # removed_by_category values that mean "held for review", not removed
PAGE_SIZE = 100  # the most a listing returns per page
SUBREDDIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{1,20}$")
ID_RE = re.compile(r"^[0-9a-z]{1,13}$")
IMAGE_HOSTS = ("i.redd.it", "i.imgur.com")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
MEDIA_IMAGE_KINDS = ("Image", "AnimatedImage")  # media_metadata's "e" of a picture (not "RedditVideo")
TOKEN_MARGIN = 60.0  # seconds before expiry at which the token is renewed
CHAR_REF_RE = re.compile(r"&#(?:[0-9]+|[xX][0-9a-fA-F]+);")  # numeric only: &#8203; &#x200B;
ZERO_WIDTH_SPACE = "\u200b"
BLANK_LINES_RE = re.compile(r"\n(?:[ \t]*\n){2,}")  # more than one empty line in a row
LEADING_BLANK_RE = re.compile(r"^\s*\n")  # the empty lines before the first with text (not its indent)


def _subreddit(value: str) -> str:
    return value.strip().removeprefix("r/")


class Subreddit(Stream):
    """A subreddit's /new listing, newest first; ids (base 36) give the order, created_utc the server's time."""

    warn_when_short = (
        "the listing ended before the last run's newest post: Reddit lists only about the newest 1,000 posts, "
        "so posts in between may be lost; run more often for this subreddit"
    )
    # /new shows a post a moderator approves out of the spam filter at the top, with its old id: a read ends at the
    # third post in a row at or below the saved id, so one or two such posts do not hide the new ones below them.
    ends_after_below = 3

    def __init__(self, source: RedditSource, name: str):
        super().__init__(f"r:{name.lower()}", f"Reddit r/{name}")
        self.source, self.subreddit = source, name

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        url = self.source.config.api_base + NEW_PATH.format(name=self.subreddit)
        # raw_json=1: text and URLs as written, not HTML-escaped (&amp; in every preview URL otherwise).
        params = {"limit": PAGE_SIZE, "raw_json": 1}
        what = f"r/{self.subreddit}/new"
        source = self.source
        for page in source.pages(url, params, CursorPaginator("data.after", "after"), what=what, get=source.authed_get):
            for child in source.listed(page, "data.children", what, "a Listing"):
                pid = api.dig(child, "data.id")
                order = int(pid, 36) if isinstance(pid, str) and ID_RE.match(pid) else None
                created = api.dig(child, "data.created_utc")
                at = datetime.fromtimestamp(created, tz=timezone.utc) if isinstance(created, (int, float)) else None
                yield Entry(child, order=order, at=at, label=str(pid or ""))

    def encode(self, order: Any) -> Any:
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"
        text = ""
        while True:
            order, rest = divmod(order, 36)
            text = digits[rest] + text
            if not order:
                return text

    def decode(self, value: Any) -> Any:
        return int(value, 36) if isinstance(value, str) and ID_RE.match(value) else None


def _images(post: Mapping[str, Any]) -> list[str]:
    """A gallery in its order, images uploaded into a text post in the text's order, a direct image, else the
    preview's source image; a crosspost's, of the post it shares (a crosspost of a gallery holds no media of its
    own: only crosspost_parent_list[0] has them)."""
    own = _own_images(post)
    parents = post.get("crosspost_parent_list")
    if not own and isinstance(parents, list) and parents and isinstance(parents[0], Mapping):
        return _own_images(parents[0])
    return own


def _own_images(post: Mapping[str, Any]) -> list[str]:
    gallery = api.dig(post, "gallery_data.items", list)
    if gallery is not None:
        return _media_urls(post, [api.dig(item, "media_id", str) or "" for item in gallery])
    inline = _media_urls(post, _in_text_order(post))
    if inline:
        return inline
    url = post.get("url_overridden_by_dest") or post.get("url")
    if isinstance(url, str) and (
        post.get("post_hint") == "image"
        or (urlsplit(url).hostname in IMAGE_HOSTS and urlsplit(url).path.lower().endswith(IMAGE_SUFFIXES))
    ):
        return [url]
    url = api.dig(post, "preview.images.0.source.url", str)
    return [url] if url else []


def _media_urls(post: Mapping[str, Any], media_ids: list[str]) -> list[str]:
    """The source images of these media_metadata entries, in this order: images and GIFs only (not an inline
    video, which has no still of its own there), and not one Reddit reports failed or removed."""
    metadata = [api.dig(post, ("media_metadata", media_id), Mapping) for media_id in media_ids]
    valid = [
        meta for meta in metadata
        if meta and meta.get("e") in MEDIA_IMAGE_KINDS and meta.get("status") in (None, "valid")
    ]  # fmt: skip
    urls = [api.dig(meta, "s.u") or api.dig(meta, "s.gif") for meta in valid]
    return [url for url in urls if isinstance(url, str) and url]


def _in_text_order(post: Mapping[str, Any]) -> list[str]:
    """media_metadata's ids of a post without gallery_data (images uploaded into a text post), in the order the
    reader sees them: where each first appears in the self text (its keys come sorted, not in that order); an id
    the text does not name goes last, in media_metadata's order. Not an emote or a GIF picker's sticker
    (`emote|t5_…|…`, `giphy|…`: Reddit's, not the author's upload, though its "e" says Image)."""
    metadata = api.dig(post, "media_metadata", Mapping)
    if not metadata:
        return []
    body = api.dig(post, "selftext", str) or ""
    uploads = [media_id for media_id in metadata if isinstance(media_id, str) and media_id and "|" not in media_id]
    at = {media_id: body.find(media_id) for media_id in uploads}
    return sorted(at, key=lambda media_id: (at[media_id] < 0, at[media_id]))  # stable: unnamed ids keep their order


def _self_text(post: Mapping[str, Any]) -> str:
    """The self text as Reddit shows it. raw_json=1 gives the markdown unescaped, but the rich editor writes an empty
    paragraph as "&#x200B;" (a zero-width space as a numeric character reference, which markdown renders), and the
    caption must not keep those 8 characters: numeric references are decoded (html.unescape's rules: an invalid one
    becomes U+FFFD), zero-width spaces dropped and the blank lines they leave collapsed to one. A named entity
    stays as it is: with raw_json=1 an "&amp;" is what the author typed. NUL and lone surrogates are
    records.clean_text's business."""
    body = api.dig(post, "selftext", str) or ""
    if "&#" in body:
        body = CHAR_REF_RE.sub(lambda ref: html.unescape(ref.group()), body)
    if ZERO_WIDTH_SPACE in body:
        body = body.replace(ZERO_WIDTH_SPACE, "")
        body = LEADING_BLANK_RE.sub("", BLANK_LINES_RE.sub("\n\n", body)).rstrip()
    return body


def thing_to_post(thing: Any) -> Post:
    """A t3 thing of a listing -> Post (post_id = the id without t3_)."""
    if not isinstance(thing, Mapping) or thing.get("kind") != "t3" or not isinstance(thing.get("data"), Mapping):
        raise RecordError("expected a t3 (link) thing")
    post = thing["data"]
    pid = post.get("id")
    if not isinstance(pid, str) or not ID_RE.match(pid):
        raise RecordError("missing id" if not pid else f"id {pid!r:.40} is not a Reddit id")
    created = post.get("created_utc")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise RecordError("missing created_utc")
    title, body = api.dig(post, "title", str) or "", _self_text(post)
    score = post.get("score")
    permalink = post.get("permalink")
    return post_from_dict(
        {
            "platform": "reddit",
            "post_id": pid,
            "created_at": datetime.fromtimestamp(created, tz=timezone.utc),
            "author_username": api.dig(post, "author", str),
            "caption": "\n\n".join(part for part in (title, body) if part) or None,
            # A score can go below zero; like_count cannot (the score itself stays in raw).
            "like_count": max(0, score) if isinstance(score, int) and not isinstance(score, bool) else None,
            "comment_count": post.get("num_comments"),
            "permalink": f"https://www.reddit.com{permalink}" if isinstance(permalink, str) else None,
            "image_urls": list(dict.fromkeys(_images(post))),
            "raw": dict(post),
        }
    )


def _gone_why(post: Mapping[str, Any]) -> str | None:
    """Why Reddit shows this post (a t3's data) as gone, or None: removed_by_category set (by its author,
    "deleted"; by moderators, Reddit, a takedown) unless it only means held for review (NOT_GONE), or the author
    "[deleted]" (deleted by its author, or the account is gone). One rule for the listing and the re-check."""
    removed = post.get("removed_by_category")
    if removed and removed not in NOT_GONE:
        return f"removed on Reddit ({removed})"
    if post.get("author") == "[deleted]":
        return "deleted by its author on Reddit"
    return None


@register
class RedditSource(APISource):
    """Posts of REDDIT_SUBREDDITS' /new listings, with app-only OAuth (client_credentials)."""

    name = "reddit"
    api_name = "Reddit API"
    required = ("client_id", "client_secret", "user_agent", "subreddits")
    patterns = MappingProxyType({"subreddits": (SUBREDDIT_RE, "not a subreddit name", _subreddit)})

    def __init__(self, settings: Any, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self._token: str | None = None
        self._expires = 0.0
        # Reddit throttles or blocks generic agents; its rules ask for "<platform>:<app id>:<version> (by /u/name)".
        self.auth_headers = {"User-Agent": self.config.user_agent}

    def stream_objects(self) -> list[Stream]:
        return [Subreddit(self, n) for n in dict.fromkeys(map(_subreddit, self.config.subreddits))]

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        """A post the listing shows as gone (`_gone_why`) is reported gone, not stored: its author and text are
        Reddit's placeholders ("[deleted]"), which would overwrite those of the post archived before (a backfill
        reads it again). The run applies ETL_DELETED_AT_SOURCE to it if the archive holds it; it is no reject."""
        post = thing_to_post(item)
        why = _gone_why(item["data"])
        if why:
            self.report_gone(post.post_id, why)
            return None
        return post

    # -- re-checking held posts (etl/recheck.py) ------------------------------------------------------------

    can_recheck = True

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """/api/info, 100 fullnames a call: a post `_gone_why` names (its author "[deleted]", removed_by_category
        set) is gone. A post missing from the answer (an id Reddit does not know) is recorded as checked, not as
        gone."""
        url = self.config.api_base + INFO_PATH
        for batch in api.batches(post_ids, PAGE_SIZE):
            names = ",".join(f"t3_{p}" for p in batch if ID_RE.match(p))
            found: dict[str, Mapping[str, Any]] = {}
            if names:
                what = f"api/info ({len(batch)} held posts)"
                _, page = self.authed_get(url, what=what, params={"id": names, "raw_json": 1})
                for child in self.listed(page, "data.children", what, "a Listing"):
                    if isinstance(pid := api.dig(child, "data.id"), str):
                        found[pid] = child["data"]
            for pid in batch:
                post = found.get(pid)
                if post is None:
                    log.info("reddit: %s is not in /api/info's answer; not taken as gone", pid)
                elif why := _gone_why(post):
                    self.report_gone(pid, why)
                yield pid

    def credentials(self, renew: bool) -> dict[str, str]:
        """The app's bearer token (client_credentials), fetched again when it expires or is refused."""
        if renew or self._token is None or time.time() > self._expires - TOKEN_MARGIN:
            self._fetch_token()
        return {"Authorization": f"Bearer {self._token}"}

    def _fetch_token(self) -> None:
        config = self.config
        try:
            response = self.request(
                "POST", config.auth_base + TOKEN_PATH, what="access_token",
                data={"grant_type": "client_credentials"},
                auth=(config.client_id, config.client_secret.reveal()),
            )  # fmt: skip
        except StreamError as exc:
            raise StreamError(
                f"Reddit refused the app credentials ({exc}): check REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET "
                "(and that the app's API access was approved)",
                whole_source=True,
            ) from None
        body = self.json_object(response, "access_token")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            reason = body.get("error") or "no access_token in the answer"
            raise StreamError(
                f"Reddit gave no token for REDDIT_CLIENT_ID ({reason}); check REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET",
                whole_source=True,
            )
        self._token = token
        expires = body.get("expires_in")
        self._expires = time.time() + (float(expires) if isinstance(expires, (int, float)) else 3600.0)

    def reset_at(self, response: requests.Response) -> float | None:
        try:
            return time.time() + float(response.headers.get("X-Ratelimit-Reset", "").strip())  # seconds from now
        except ValueError:
            return None

    def refused(self, response: requests.Response, text: str) -> Verdict:
        status = response.status_code
        if status == 401 and urlsplit(response.url).path != TOKEN_PATH:
            return fatal(f"HTTP 401 {text} (the token expired or was revoked)", code="expired")
        if status == 403:
            return fatal(f"HTTP 403 {text}: the subreddit is private or quarantined, or the app may not read it")
        if status == 404:
            return fatal(f"HTTP 404 {text}: no such subreddit (check REDDIT_SUBREDDITS)")
        return fatal(f"HTTP {status} {text}")

    def note_rate_limit(self, what: str, response: requests.Response) -> None:
        headers = response.headers
        if "X-Ratelimit-Remaining" in headers:
            log.debug(
                "Reddit API %s: HTTP %s, %s requests left, %s used, window resets in %ss",
                what, response.status_code, headers.get("X-Ratelimit-Remaining"),
                headers.get("X-Ratelimit-Used", "?"), headers.get("X-Ratelimit-Reset", "?"),
            )  # fmt: skip
