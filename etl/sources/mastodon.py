"""Mastodon (any instance): hashtag timelines and accounts' statuses, the HTML content turned into plain text."""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from html.parser import HTMLParser
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlsplit

from etl.config import Secret, Setting, comma_list, http_base, text
from etl.errors import RecordError
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, Entry, LinkHeaderPaginator, MaxIdPaginator, Stream, StreamError, Verdict, fatal
from etl.sources.base import FetchWindow

SETTINGS = (
    Setting("MASTODON_INSTANCE", http_base, "", "Mastodon instance base URL, e.g. https://mastodon.social"),
    Setting("MASTODON_HASHTAGS", comma_list, (), "hashtag timelines (without #) to archive"),
    Setting("MASTODON_ACCOUNTS", comma_list, (), "accounts (@user@host) whose statuses to archive"),
    Setting(
        "MASTODON_ACCESS_TOKEN", text, Secret(""), "optional Mastodon access token (instances that refuse public timelines)", secret=True
    ),
)

log = logging.getLogger(__name__)

TAG_TIMELINE = "/api/v1/timelines/tag/{tag}"
LOOKUP = "/api/v1/accounts/lookup"
STATUSES = "/api/v1/accounts/{id}/statuses"
STATUS = "/api/v1/statuses/{id}"
LOCAL_STATUS_RE = re.compile(r"/users/[^/]+/statuses/(\d+)$")
PAGE_SIZE = 40  # the most Mastodon returns per page
ACCOUNT_RE = re.compile(r"^@?[A-Za-z0-9_]+(@[A-Za-z0-9.-]+\.[A-Za-z]{2,})?$")
TAG_RE = re.compile(r"^\w+$")
# An image is its own file; a video or GIF (gifv) gives its preview frame.
IMAGE_FIELDS = {"image": "url", "gifv": "preview_url", "video": "preview_url"}
# Mastodon ids since 2.0 are snowflakes: milliseconds since the epoch shifted 16 bits, then a sequence.
SNOWFLAKE_FLOOR = 1 << 40


def _account(value: str) -> str:
    return value.strip().lstrip("@")


def _tag(value: str) -> str:
    return value.strip().lstrip("#")


class _Text(HTMLParser):
    """Status HTML -> plain text: paragraphs become blank lines, <br> a line break, entities unescaped.

    Mastodon splits a long link into invisible and ellipsis spans (hidden by CSS); their text together is the
    whole URL, so every span's text is kept."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.parts.append("\n")
        elif tag == "p" and self.parts:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Mastodon's `content` HTML as the plain text a reader sees (link texts whole, entities unescaped)."""
    parser = _Text()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts).strip()


def status_time(status_id: Any) -> datetime | None:
    """When a snowflake status id was minted (the instance's clock), or None for an older sequential id."""
    text = str(status_id)
    if not text.isdigit() or int(text) < SNOWFLAKE_FLOOR:
        return None
    return datetime.fromtimestamp((int(text) >> 16) / 1000, tz=timezone.utc)


class Listing(Stream):
    """A newest-first list of statuses (a hashtag timeline, an account's statuses), ordered by status id."""

    def __init__(self, source: MastodonSource, key: str, label: str):
        super().__init__(key, label)
        self.source = source

    def path(self) -> str | None:
        raise NotImplementedError

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        path = self.path()
        if path is None:
            return
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        if after is not None:
            params["since_id"] = str(after)  # newest first down to the saved id, paged by the Link header
        if window.until is not None:
            params["max_id"] = str(int(window.until.timestamp() * 1000) << 16)  # a backfill starts at its end
        # Some proxies strip the Link header: then page by max_id, the smallest id on the page.
        paginator = LinkHeaderPaginator(fallback=MaxIdPaginator(lambda page: [api.dig(s, "id") for s in page]))
        source, what = self.source, f"{self.label} ({path})"
        for statuses in source.pages(source.base + path, params, paginator, what=what, get=source.get_list):
            for status in statuses:
                sid = api.dig(status, "id")
                order = int(sid) if isinstance(sid, str) and sid.isdigit() else None
                at = status_time(sid) or api.parse_time(api.dig(status, "created_at"))
                yield Entry(status, order=order, at=at, label=str(sid or ""))

    def encode(self, order: Any) -> Any:
        return str(order)

    def decode(self, value: Any) -> Any:
        return int(value) if str(value).isdigit() else None

    def rewind(self, after: Any, minutes: int) -> Any:
        # A status from another server gets the id of its published time (Mastodon::Snowflake.id_at): one that
        # reaches this instance late (a slow server, a delivery retried) sits below ids already read, and a
        # since_id of the saved id never shows it. The read starts at the id minted ETL_OVERLAP_MINUTES earlier.
        if after < SNOWFLAKE_FLOOR:  # an old sequential id: no time in it
            return after
        return max(SNOWFLAKE_FLOOR, ((after >> 16) - minutes * 60_000) << 16)


class Hashtag(Listing):
    def __init__(self, source: MastodonSource, tag: str):
        super().__init__(source, f"tag:{tag.lower()}", f"Mastodon #{tag}")
        self.tag = tag

    def path(self) -> str:
        return TAG_TIMELINE.format(tag=quote(self.tag, safe=""))


class Account(Listing):
    def __init__(self, source: MastodonSource, acct: str):
        super().__init__(source, f"account:{acct.lower()}", f"Mastodon @{acct}")
        self.acct = acct

    def path(self) -> str | None:
        account_id = self.source.lookup(self.acct)
        return STATUSES.format(id=account_id) if account_id else None


def _images(status: Mapping[str, Any]) -> list[str]:
    urls = (api.url_by_type(media, IMAGE_FIELDS) for media in api.dig(status, "media_attachments", list) or [])
    return list(dict.fromkeys(url for url in urls if url))


def status_to_post(status: Any, instance_host: str) -> Post:
    """A Status entity -> Post; a reblog is the original status (post_id = its global `uri`)."""
    if not isinstance(status, Mapping):
        raise RecordError(f"expected a status object, got {type(status).__name__}")
    original = api.dig(status, "reblog", Mapping) or status
    uri = api.dig(original, "uri", str)
    if not uri or not uri.strip():
        raise RecordError("missing uri")
    acct = api.dig(original, "account.acct", str)
    if acct and "@" not in acct:  # a local account: name it with its server, as remote ones are
        acct = f"{acct}@{urlsplit(str(api.dig(original, 'account.url') or '')).hostname or instance_host}"
    text = html_to_text(api.dig(original, "content", str) or "")
    spoiler = html.unescape(api.dig(original, "spoiler_text", str) or "").strip()
    caption = "\n\n".join(part for part in (spoiler, text) if part) or None
    tags = [name for t in api.dig(original, "tags", list) or [] if (name := api.dig(t, "name", str)) is not None]
    return post_from_dict(
        {
            "platform": "mastodon",
            "post_id": uri.strip(),
            "created_at": original.get("created_at"),
            "author_username": acct,
            "caption": caption,
            "like_count": original.get("favourites_count"),
            "comment_count": original.get("replies_count"),
            "permalink": original.get("url") or uri,
            "image_urls": _images(original),
            "hashtags": tags,
            "raw": dict(status),
        }
    )


@register
class MastodonSource(APISource):
    """Statuses from one Mastodon instance: MASTODON_HASHTAGS timelines and MASTODON_ACCOUNTS' statuses."""

    name = "mastodon"
    api_name = "Mastodon API"
    rate_limit_headers = ("X-RateLimit-Remaining", "X-RateLimit-Limit", "X-RateLimit-Reset")
    required = ("instance",)
    one_of = MappingProxyType({"hashtags": "hashtag timelines", "accounts": "accounts' statuses"})
    patterns = MappingProxyType({
        "hashtags": (TAG_RE, "not a hashtag (letters, digits, _)", _tag),
        "accounts": (ACCOUNT_RE, "not an account (@user@host or user)", str.strip),
    })  # fmt: skip

    def __init__(self, settings: Any, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.base = self.config.instance.rstrip("/")
        token = self.config.access_token.reveal().strip()
        # On each request, never on the session: the session may be shared with the image downloader.
        self.auth_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ids: dict[str, str | None] = {}
        # Re-checked: statuses of this instance only (their uri is on it). A remote status's id here is this
        # instance's copy, and a 404 may only mean it never heard of the delete or dropped its cache.
        self.recheck_prefix = self.base + "/"

    def stream_objects(self) -> list[Stream]:
        tags = dict.fromkeys(_tag(t) for t in self.config.hashtags)
        accounts = dict.fromkeys(_account(a) for a in self.config.accounts)
        return [*(Hashtag(self, t) for t in tags), *(Account(self, a) for a in accounts)]

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        return status_to_post(item, urlsplit(self.base).hostname or "")

    def get_list(self, url: str, *, what: str, params: Any) -> tuple[requests.Response, list]:
        response = self.request("GET", url, what=what, params=params or None)
        return response, self.listed(api.json_of(response), "", what, "a list of statuses")

    can_recheck = True
    recheck_cap = 100  # one call per status; instances allow 300 calls per 5 minutes, the fetch needs some too

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """GET /api/v1/statuses/:id for each held status of this instance: 404 (or 410) = deleted."""
        for uri in post_ids:
            match = LOCAL_STATUS_RE.search(uri)
            if match is None:  # not a Mastodon-shaped local uri (another server software): nothing to ask
                log.debug("mastodon: %s has no status id in its uri; not re-checked", uri)
                yield uri
                continue
            try:
                self.request("GET", self.base + STATUS.format(id=match.group(1)), what=f"statuses/{match.group(1)}")
            except StreamError as exc:
                if exc.code != "not_found":
                    raise
                self.report_gone(uri, f"deleted on {urlsplit(self.base).hostname} (HTTP 404 for the status)")
            yield uri

    def lookup(self, acct: str) -> str | None:
        """The instance's id for an account, looked up once; an unknown account is reported and skipped."""
        if acct not in self._ids:
            try:
                _, body = self.get_json(self.base + LOOKUP, what=f"accounts/lookup {acct}", params={"acct": acct})
            except StreamError as exc:
                if exc.code != "not_found":
                    raise
                self.reject(f"MASTODON_ACCOUNTS @{acct}", f"no such account on {self.base}")
                self._ids[acct] = None
                return None
            account_id = body.get("id")
            self._ids[acct] = str(account_id) if isinstance(account_id, (str, int)) and str(account_id) else None
            if self._ids[acct] is None:
                raise StreamError(f"Mastodon API accounts/lookup {acct} answered without an account id")
        return self._ids[acct]

    def reset_at(self, response: requests.Response) -> float | None:
        reset = api.parse_time(response.headers.get("X-RateLimit-Reset"))
        return reset.timestamp() if reset else None

    def refused(self, response: requests.Response, text: str) -> Verdict:
        status = response.status_code
        if status == 401 and self.auth_headers:
            return fatal(f"HTTP 401 {text}: check MASTODON_ACCESS_TOKEN (revoked, or from another instance)", whole_source=True)
        if status in (401, 403, 422):
            return fatal(f"HTTP {status} {text}: this instance may require MASTODON_ACCESS_TOKEN for public timelines")
        return fatal(f"HTTP {status} {text}", code="not_found" if status in (404, 410) else "")
