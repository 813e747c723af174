"""Bluesky (AT Protocol XRPC): actors' author feeds from the public AppView, and a post search with a login."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from etl.config import Secret, Setting, comma_list, http_base, text
from etl.errors import RecordError
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post, post_from_dict
from etl.sources import api, register
from etl.sources.api import APISource, CursorPaginator, Entry, Stream, StreamError, Verdict, fatal, parse_time
from etl.sources.base import FetchWindow, query_stream

SETTINGS = (
    Setting("BLUESKY_ACTORS", comma_list, (), "Bluesky handles or DIDs whose author feeds to archive"),
    Setting(
        "BLUESKY_QUERY", text, "", "Bluesky post search (searchPosts, needs BLUESKY_HANDLE and BLUESKY_APP_PASSWORD)"
    ),
    Setting("BLUESKY_HANDLE", text, "", "Bluesky account handle for the session (search only)"),
    Setting("BLUESKY_APP_PASSWORD", text, Secret(""), "Bluesky app password (Settings > App passwords)", secret=True),
    Setting("BLUESKY_API_BASE", http_base, "https://public.api.bsky.app", "Bluesky AppView for public reads"),
    Setting("BLUESKY_PDS_BASE", http_base, "https://bsky.social", "Bluesky PDS for the session and search"),
)

log = logging.getLogger(__name__)

AUTHOR_FEED = "/xrpc/app.bsky.feed.getAuthorFeed"
SEARCH_POSTS = "/xrpc/app.bsky.feed.searchPosts"
GET_POSTS = "/xrpc/app.bsky.feed.getPosts"
GET_POSTS_MAX = 25  # the most URIs getPosts takes per call
CREATE_SESSION = "/xrpc/com.atproto.server.createSession"
REFRESH_SESSION = "/xrpc/com.atproto.server.refreshSession"
PAGE_SIZE = 100  # the most getAuthorFeed and searchPosts return per page
SESSION_FILE = "bluesky-session.json"

# createdAt is written by the poster's client: anything before the network existed, or after the AppView
# indexed the post, is not when it was posted; indexedAt (the AppView's clock) is used instead.
NETWORK_START = datetime(2022, 11, 1, tzinfo=timezone.utc)
CLOCK_SLACK = timedelta(minutes=10)
HANDLE_RE = re.compile(r"^(did:[a-z]+:[A-Za-z0-9._:%-]+|([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})$")
EXPIRED = ("ExpiredToken", "InvalidToken")


def _actor(value: str) -> str:
    return value.strip().lstrip("@")


class SessionFile:
    """The account's session (access and refresh JWTs) in a file under ETL_DATA_DIR that only its owner may read."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, handle: str, pds: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("handle", "").lower() != handle.lower() or data.get("pds") != pds:
            return None  # another account or server: log in afresh
        if not all(isinstance(data.get(k), str) and data[k] for k in ("accessJwt", "refreshJwt")):
            return None
        if self.path.stat().st_mode & 0o077:
            os.chmod(self.path, 0o600)  # copied with looser permissions: tighten before going on
        return data

    def save(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(dict(data), handle)
        os.chmod(temporary, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
        os.replace(temporary, self.path)


class AuthorFeed(Stream):
    """An actor's author feed (posts and reposts), newest first by sortAt (about the feed's indexedAt)."""

    def __init__(self, source: BlueskySource, actor: str):
        super().__init__(f"actor:{actor.lower()}", f"Bluesky actor {actor}")
        self.source, self.actor = source, actor

    def rewind(self, after: Any, minutes: int) -> Any:
        # The AppView lists an author feed and a search by sortAt, the earlier of a post's createdAt and indexedAt
        # (searchPosts' lexicon: "which may not match createdAt"; getAuthorFeed pages by feed_item.sortAt): a post
        # indexed after the last read whose createdAt is earlier (a phone's clock behind) sits below the saved
        # indexedAt, and a read that stops there never shows it.
        return after - timedelta(minutes=minutes)

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        url = self.source.config.api_base + AUTHOR_FEED
        params = {"actor": self.actor, "limit": PAGE_SIZE}
        for page in self.source.pages(url, params, CursorPaginator(), what=f"getAuthorFeed {self.actor}"):
            yield from self.source.entries(page, "feed", f"getAuthorFeed {self.actor}")

    def encode(self, order: Any) -> Any:
        return order.isoformat()

    def decode(self, value: Any) -> Any:
        return parse_time(value)


class Search(AuthorFeed):
    """searchPosts with sort=latest, through the account's PDS (the search needs a session)."""

    def __init__(self, source: BlueskySource, query: str):
        Stream.__init__(self, query_stream(query), f"Bluesky search {query!r}")
        self.source, self.query = source, query

    def entries(self, after: Any, window: FetchWindow) -> Iterator[Entry]:
        url = self.source.config.pds_base + SEARCH_POSTS
        params: dict[str, Any] = {"q": self.query, "sort": "latest", "limit": PAGE_SIZE}
        since = after or window.since
        if since is not None:
            params["since"] = since.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        if window.until is not None:
            params["until"] = window.until.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        pages = self.source.pages(url, params, CursorPaginator(), what="searchPosts", get=self.source.authed_get)
        for page in pages:
            yield from self.source.entries(page, "posts", "searchPosts")


def _images(embed: Any) -> list[str]:
    """The post's images in order: images#view fullsize, recordWithMedia's media, a video's thumbnail."""
    if not isinstance(embed, Mapping):
        return []
    kind = str(embed.get("$type", ""))
    if kind.startswith("app.bsky.embed.images"):
        return [url for i in api.dig(embed, "images", list) or [] if (url := api.dig(i, "fullsize", str)) is not None]
    if kind.startswith("app.bsky.embed.video"):
        return [thumb] if (thumb := api.dig(embed, "thumbnail", str)) else []
    if kind.startswith("app.bsky.embed.recordWithMedia"):
        return _images(embed.get("media"))
    return []  # a quoted record's own images belong to that post; an external link card is not the post's


def _hashtags(record: Mapping[str, Any]) -> list[str] | None:
    tags: list[str] = []
    for facet in record.get("facets") or []:
        for feature in (facet.get("features") or []) if isinstance(facet, Mapping) else []:
            if isinstance(feature, Mapping) and str(feature.get("$type", "")).endswith("#tag"):
                if isinstance(feature.get("tag"), str):
                    tags.append(feature["tag"])
    tags += [t for t in record.get("tags") or [] if isinstance(t, str)]
    return tags or None  # None: taken from the text


def item_to_post(item: Any) -> Post:
    """A feedViewPost (or a bare postView from search) -> Post; a repost is the original post."""
    if not isinstance(item, Mapping):
        raise RecordError(f"expected a feed item object, got {type(item).__name__}")
    post = api.dig(item, "post", Mapping) or item
    uri = post.get("uri")
    if not isinstance(uri, str) or not uri.startswith("at://"):
        raise RecordError("missing at:// uri" if not uri else f"uri {uri!r:.100} is not an at:// URI")
    record = api.dig(post, "record", Mapping) or {}
    handle = api.dig(post, "author.handle", str)
    did = api.dig(post, "author.did", str) or uri[5:].split("/", 1)[0]
    shown = handle if handle and handle != "handle.invalid" else did
    indexed = parse_time(post.get("indexedAt"))
    created = parse_time(record.get("createdAt"))
    limit = (indexed or datetime.now(timezone.utc)) + CLOCK_SLACK
    if created is None or created < NETWORK_START or created > limit:
        created = indexed
    if created is None:
        raise RecordError("no usable createdAt and no indexedAt")
    return post_from_dict(
        {
            "platform": "bluesky",
            "post_id": uri,
            "created_at": created,
            "author_username": shown,
            "caption": api.dig(record, "text", str),
            "like_count": post.get("likeCount"),
            "comment_count": post.get("replyCount"),
            "permalink": f"https://bsky.app/profile/{shown}/post/{uri.rsplit('/', 1)[-1]}",
            "image_urls": list(dict.fromkeys(_images(post.get("embed")))),
            "hashtags": _hashtags(record),
            "raw": dict(item),
        }
    )


@register
class BlueskySource(APISource):
    """Bluesky posts: author feeds of BLUESKY_ACTORS (no login) and/or a BLUESKY_QUERY search (a login)."""

    name = "bluesky"
    api_name = "Bluesky API"
    rate_limit_headers = ("ratelimit-remaining", "ratelimit-limit", "ratelimit-reset")
    one_of = MappingProxyType({"actors": "author feeds", "query": "a search"})
    patterns = MappingProxyType({"actors": (HANDLE_RE, "neither a handle (name.bsky.social) nor a DID", _actor)})

    def __init__(self, settings: Any, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.session_file = SessionFile(settings.data_dir / SESSION_FILE)
        self._login: dict[str, Any] | None = None

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        super().check_settings(settings)
        if (config := settings.source(cls.name)).query:
            config.require("handle", "app_password")

    def stream_objects(self) -> list[Stream]:
        streams: list[Stream] = [AuthorFeed(self, a) for a in dict.fromkeys(_actor(a) for a in self.config.actors)]
        if self.config.query:
            streams.append(Search(self, self.config.query))
        return streams

    def entries(self, page: Mapping[str, Any], field: str, what: str) -> Iterator[Entry]:
        for item in self.listed(page, field, what):
            post = api.dig(item, "post", Mapping) or item
            uri, reason = str(api.dig(post, "uri") or ""), api.dig(item, "reason", Mapping)
            if str(api.dig(reason, "$type")).endswith("#reasonPin"):
                yield Entry(item, label=uri)  # a pinned post sits outside the feed's order
                continue
            # A repost sits in the feed at the time it was reposted, not at the original's.
            order = parse_time(api.dig(reason, "indexedAt") if reason else api.dig(post, "indexedAt"))
            yield Entry(item, order=order, at=order, label=uri)

    def to_post(self, item: Any, stream: Stream) -> Post | None:
        return item_to_post(item)

    # -- re-checking held posts (etl/recheck.py) ------------------------------------------------------------

    can_recheck = True
    recheck_prefix = "at://"

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """app.bsky.feed.getPosts, 25 URIs a call, no login: a post the AppView no longer returns was deleted
        (or taken down, or its account deleted or deactivated)."""
        url = self.config.api_base + GET_POSTS
        for batch in api.batches(post_ids, GET_POSTS_MAX):
            what = f"getPosts ({len(batch)} held posts)"
            _, body = self.get_json(url, what=what, params={"uris": batch})
            present = {p.get("uri") for p in self.listed(body, "posts", what) if isinstance(p, Mapping)}
            for uri in batch:
                if uri not in present:
                    self.report_gone(uri, "deleted on Bluesky (getPosts no longer returns it)")
                yield uri

    # -- responses ---------------------------------------------------------------------------------------

    def reset_at(self, response: requests.Response) -> float | None:
        reset = response.headers.get("ratelimit-reset", "").strip()
        return float(reset) if reset.isdigit() else None

    def refused(self, response: requests.Response, text: str) -> Verdict:
        status = response.status_code
        if str(api.dig(api.json_of(response), "error") or "") in EXPIRED:
            return fatal(f"the session has expired ({text})", code="expired")
        if status == 401:
            return fatal(f"HTTP 401 {text}: check BLUESKY_HANDLE and BLUESKY_APP_PASSWORD", code="auth")
        if status == 400 and ("actor" in text.lower() or "profile" in text.lower()):
            return fatal(f"HTTP 400 {text} (check BLUESKY_ACTORS)")
        return fatal(f"HTTP {status} {text}")

    # -- the session (search only) -----------------------------------------------------------------------

    def credentials(self, renew: bool) -> dict[str, str]:
        """The account's session (searchPosts needs one): kept in a file, created or refreshed when need be."""
        if renew:
            self._refresh_session()
        elif self._login is None:
            self._login = self.session_file.load(self.config.handle, self.config.pds_base)
            if self._login is None:
                self._create_session()
        return self._bearer("accessJwt")

    def _bearer(self, which: str) -> dict[str, str]:
        assert self._login is not None
        return {"Authorization": "Bearer " + self._login[which]}

    def _create_session(self) -> None:
        handle = self.config.handle
        log.info("bluesky: logging in as %s (createSession)", handle)
        try:
            response = self.request(
                "POST", self.config.pds_base + CREATE_SESSION, what="createSession",
                json={"identifier": handle, "password": self.config.app_password.reveal()},
            )  # fmt: skip
        except StreamError as exc:
            raise StreamError(f"login as BLUESKY_HANDLE={handle} failed: {exc}", code="auth") from None
        self._keep(self.json_object(response, "createSession"))

    def _refresh_session(self) -> None:
        log.info("bluesky: the access token has expired; refreshing the session (refreshSession)")
        try:
            response = self.request("POST", self.config.pds_base + REFRESH_SESSION, what="refreshSession",
                                    headers=self._bearer("refreshJwt"))  # fmt: skip
        except StreamError as exc:
            if exc.code not in ("expired", "auth"):
                raise
            log.info("bluesky: the refresh token is no longer valid; logging in again")
            self._create_session()
            return
        self._keep(self.json_object(response, "refreshSession"))

    def _keep(self, body: Mapping[str, Any]) -> None:
        if not all(isinstance(body.get(k), str) and body[k] for k in ("accessJwt", "refreshJwt")):
            raise StreamError("Bluesky API answered the login without accessJwt and refreshJwt")
        self._login = {
            "handle": self.config.handle,
            "pds": self.config.pds_base,
            "did": body.get("did"),
            "accessJwt": body["accessJwt"],
            "refreshJwt": body["refreshJwt"],
        }
        self.session_file.save(self._login)
