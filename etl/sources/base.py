"""The small base class every source derives from, and the window an incremental run or backfill asks for."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from etl.config import Settings
from etl.http import RetryPolicy, make_session
from etl.lazy import requests  # imported on first use: a run without HTTP never loads it
from etl.records import Post

log = logging.getLogger(__name__)
MAX_REJECTS_KEPT = 200


@dataclass(frozen=True)
class FetchWindow:
    """What to fetch: posts created in [since, until), after the saved cursor, at most `limit` of them.

    `cursor` is what the source left in `Source.cursor` at the end of the last complete incremental run
    (for example Twitter's since_id); it is empty on a first run and on backfills.
    """

    since: datetime | None = None
    until: datetime | None = None
    cursor: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None

    def admits(self, created_at: datetime) -> bool:
        return (self.since is None or created_at >= self.since) and (self.until is None or created_at < self.until)


def query_stream(query: str) -> str:
    """The stream id of a search query: changing the query starts another stream with state of its own."""
    return "query:" + hashlib.sha256(query.strip().encode("utf-8")).hexdigest()[:12]


class Source:
    """A platform client: yields normalized Posts, knows nothing of S3, SQL or sentiment.

    Subclasses set `name`, declare their own settings in their module (`SETTINGS`, read into `self.config`),
    list those they cannot work without in `required` (attribute names of `self.config`), and implement
    `fetch`. A bad item is reported with `reject` and skipped; a condition that ends
    the source for this run (quota, rate limit past the allowed wait, a revoked token) raises SourceError,
    and everything yielded before it is still loaded.
    """

    name: ClassVar[str] = ""
    incremental: ClassVar[bool] = True  # False: no watermark (an import reads all it is given)
    required: ClassVar[tuple[str, ...]] = ()
    # The piece of the database this source keeps platform state in (etl/db/platform.py), built by the runner
    # from its Database and handed to the constructor as `state`; None without a database (a dry run).
    state_type: ClassVar[Callable[[Any], Any] | None] = None

    def __init__(
        self, settings: Settings, *, session: requests.Session | None = None, state: Any = None, **options: Any
    ):
        self.settings = settings  # the core settings: timeouts, retries, limits
        self.config = settings.source(self.name)  # this source's own settings (its module's SETTINGS)
        self.options = options
        self.state = state
        self._session = session
        self.policy = RetryPolicy.from_settings(settings)
        self.rejects: list[str] = []  # the first MAX_REJECTS_KEPT messages
        self.rejected = 0  # every bad item, however many
        self.cursor: dict[str, Any] = {}  # saved by the pipeline once every post up to it is loaded
        self.quota_used = 0
        self.trusted_hosts: set[str] = set()  # host:port the source itself serves (the mock's image server)
        self.only_stream: str | None = None  # set by `restrict`: this instance reads that one stream only
        self.stream: str | None = ""  # the stream being read (see stream_of); None: one of unknown order
        # Whether the run was asked to stop (SIGTERM; set by the runner): for a source that can wait on its input.
        self.should_stop: Callable[[], bool] = lambda: False
        self.gone: list[tuple[str, str, str]] = []  # (platform, post_id, why): the platform says these are gone
        self.recheck_state: dict[str, Any] = {}  # a re-check's work left for a later run (etl/recheck.py)
        self.rechecked = 0  # held posts this run asked the platform about

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        """Raise ConfigError naming the first missing setting this source needs."""
        settings.source(cls.name).require(*cls.required)

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = make_session()
        return self._session

    def config_key(self) -> str:
        """Names the configuration whose watermark this is, so a changed query starts a fresh history.

        With streams, state is kept per stream (`stream_key`); this key names the whole configuration's state
        of before, which a stream without state of its own adopts once (an upgraded archive refetches nothing).
        """
        return ""

    def streams(self) -> list[str]:
        """The streams this source reads, each with its own state, lock and shard: a channel, a user, a
        hashtag, a query. [] for a source that is one unit (mock, jsonl)."""
        return []

    def restrict(self, stream: str) -> None:
        """From now on read `stream` only (one of `streams()`)."""
        self.only_stream = stream

    def reads(self, stream: str) -> bool:
        return self.only_stream is None or self.only_stream == stream

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        raise NotImplementedError

    def stream_of(self, post: Post) -> str | None:
        """The stream (channel, user, hashtag, query) a just-yielded post came from, read newest first; None
        for a stream of unknown order. A run cut short keeps a resume point per stream (etl/resume.py)."""
        return self.stream

    # place_of(post) -> the just-yielded post's place in its stream's own order (comparable within the stream), or
    # None for its created_at. Sources whose listings are in created_at order define none (etl/resume.py).
    place_of: Callable[[Post], Any] | None = None

    def probe(self) -> str | None:
        """For `etl.py check`: one cheap authenticated call; returns what it cost, in words, or None when the
        platform has no such call (or needs no credentials). Raises SourceError when the platform refuses."""
        return None

    def reject(self, where: str, reason: str) -> None:
        message = f"{self.name}: {where}: {reason}"
        log.warning("skipped %s", message)
        self.rejected += 1
        if len(self.rejects) < MAX_REJECTS_KEPT:  # a file of a million bad lines must not fill memory
            self.rejects.append(message)

    def report_gone(self, post_id: str, why: str, platform: str | None = None) -> None:
        """The platform says this post is gone (deleted, made private): the run applies ETL_DELETED_AT_SOURCE
        to it once the source is done, if the archive holds it (etl.forget.apply_gone)."""
        if len(self.gone) < 100_000:  # a bound on memory; the rest are reported by a later run
            self.gone.append((platform or self.name, str(post_id), why))

    # Re-checking held posts (etl/recheck.py): a source that can ask its platform whether posts still exist sets
    # `can_recheck` and implements `recheck`; `recheck_prefix` limits it to post_ids starting with that text.
    can_recheck: ClassVar[bool] = False
    recheck_prefix: str = ""
    recheck_cap: ClassVar[int | None] = None  # a platform's own bound per run (one call per post: Mastodon)

    def recheck(self, post_ids: list[str]) -> Iterator[str]:
        """Ask the platform about held posts: `report_gone` those it says are gone, and yield each id once the
        platform has answered about it (so a re-check cut short by an error records what it did ask).
        `self.recheck_state` (JSON) is kept for the next run, for a platform whose answer comes later (X)."""
        raise NotImplementedError

    def open(self) -> None:
        """Acquire what fetch needs (the mock starts its image server here)."""

    def close(self) -> None:
        """Release it; called once the run no longer needs the source (after its images are fetched)."""

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
