"""Resume points: where an incremental run cut short (--limit, SIGTERM, quota, rate limit) stopped, per stream.

A cut run does not move the watermark. It records, for every stream it read (a channel, a user, a hashtag,
a query), the oldest post it loaded: a stream is read newest first, so every post of that stream in the
window and newer than that one is loaded. The next run reads the same window again, skips those posts
without counting them against --limit, and loads the gap below them. Only a run that reads its whole window
moves the watermark (to the newest post any of these runs loaded) and clears the resume point.

A stream is marked in its listing's own order where the source knows it (Source.place_of: Bluesky's indexedAt,
a Mastodon status id, a Reddit or X id), else by created_at. The two differ for a repost or a boost: it sits in
the listing at the time it was reposted, while its post keeps the original's created_at; a mark by created_at
would then fall to the original's date and the next run would skip every post between the two as loaded.

Streams whose order is unknown (Source.stream_of returns None, e.g. Instagram's hashtag listings) are never
skipped: they are read again in full, which costs requests but loses nothing. Nor is a mark of the other kind
(one an earlier version saved by created_at, for a stream now marked by its order) used to skip anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from etl.records import Post

MAX_BOUNDARY_IDS = 1000  # post ids kept at a stream's oldest timestamp (ties of created_at)


@dataclass
class StreamMark:
    """The places of one stream cut runs loaded, oldest to newest (`top`), and the ids loaded at exactly each end.

    `by` says what a place is: "created" (a post's created_at) or "order" (its place in the listing's own order,
    Source.place_of: a time or an integer). Between `oldest` and `top` every post of the stream was loaded (it was
    read newest first); above `top` come posts published since, which no run loaded. A mark an earlier version
    saved has no `top` (None): it covers every place above its oldest, as it did then."""

    oldest: Any
    ids: set[str] = field(default_factory=set)
    by: str = "created"
    top: Any = None
    top_ids: set[str] = field(default_factory=set)

    @classmethod
    def first(cls, place: Any, post_id: str, by: str) -> StreamMark:
        """The mark of a stream's first post loaded."""
        return cls(place, {post_id}, by, place, {post_id})

    def covers(self, by: str, place: Any, post_id: str) -> bool:
        """True when a cut run already loaded this post (between the mark's ends, or one of the ids at either)."""
        if by != self.by or type(place) is not type(self.oldest):
            return False  # a mark of another kind says nothing of this place: the post is read again
        if place == self.oldest:
            return post_id in self.ids
        if self.top is None:
            return place > self.oldest
        return self.oldest < place < self.top or (place == self.top and post_id in self.top_ids)

    def add(self, place: Any, post_id: str) -> None:
        if place < self.oldest:
            self.oldest, self.ids = place, {post_id}
        elif place == self.oldest and len(self.ids) < MAX_BOUNDARY_IDS:
            self.ids.add(post_id)
        if self.top is None:
            return
        if place > self.top:
            self.top, self.top_ids = place, {post_id}
        elif place == self.top and len(self.top_ids) < MAX_BOUNDARY_IDS:
            self.top_ids.add(post_id)

    def joined(self, newer: StreamMark) -> StreamMark:
        """This mark and `newer` (the next cut run's, which read the stream from its top again), when what both
        loaded is one run of places: the mark of them all; else this one (what lies between is read again)."""
        top, top_ids = self.top, set(self.top_ids)
        if newer.top is not None and (top is None or newer.top > top):
            top, top_ids = newer.top, set(newer.top_ids)
        elif newer.top is not None and newer.top == top:
            top_ids |= newer.top_ids
        if newer.oldest < self.oldest:  # read on below this mark: everything from its top down is loaded now
            return StreamMark(newer.oldest, set(newer.ids), self.by, top, top_ids)
        if newer.oldest == self.oldest:
            return StreamMark(self.oldest, self.ids | newer.ids, self.by, top, top_ids)
        if self.top is None or newer.oldest <= self.top:  # it reached this mark's top: one run of places
            return StreamMark(self.oldest, set(self.ids), self.by, top, top_ids)
        return StreamMark(self.oldest, set(self.ids), self.by, self.top, set(self.top_ids))  # cut above it

    @classmethod
    def from_json(cls, mark: Mapping[str, Any]) -> StreamMark:
        by = str(mark.get("by") or "created")
        top = mark.get("top")
        return cls(_place(mark["oldest"]), set(mark.get("ids") or ()), by,
                   None if top is None else _place(top), set(mark.get("top_ids") or ()))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"oldest": _json_place(self.oldest)}
        if self.by != "created":  # a mark by created_at keeps the format earlier versions wrote
            data["by"] = self.by
        data["ids"] = sorted(self.ids)
        if self.top is not None:
            data["top"], data["top_ids"] = _json_place(self.top), sorted(self.top_ids)
        return data


def _place(value: Any) -> Any:
    """A place as JSON keeps it: an integer, or a time in ISO 8601."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return datetime.fromisoformat(str(value))


def _json_place(place: Any) -> Any:
    return place.isoformat() if isinstance(place, datetime) else place


@dataclass
class ResumePoint:
    """What cut runs of one (source, configuration) loaded: the newest post, and a mark per stream."""

    newest: datetime | None = None
    streams: dict[str, StreamMark] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ResumePoint | None:
        if not data:
            return None
        newest = data.get("newest")
        point = cls(newest=datetime.fromisoformat(newest) if newest else None)
        for name, mark in (data.get("streams") or {}).items():
            point.streams[name] = StreamMark.from_json(mark)
        return point

    def to_json(self) -> dict[str, Any]:
        return {
            "newest": self.newest.isoformat() if self.newest else None,
            "streams": {name: mark.to_json() for name, mark in self.streams.items()},
        }


class ResumeTracker:
    """Wraps a source's posts: skips what a cut run loaded, applies --limit, remembers what passed through.

    Every post it yields is loaded by the archiver before the state is saved (chunked() hands on the posts
    of a failing stream first), so what it remembers is what was loaded; unless `broken` (the archiver itself
    failed on posts it read: then no resume point is saved from it).
    """

    def __init__(self, source: Any, resume: ResumePoint | None, limit: int | None):
        self.source = source
        self.resume = resume
        self.limit = limit
        self.passed = 0  # posts yielded (to be loaded)
        self.skipped = 0  # posts a cut run had loaded already
        self.limited = False  # the limit was reached: the window was not read to its end
        self.broken = False  # the archiver failed on posts it yielded: what it remembers may not be loaded
        self.newest: datetime | None = None
        self.streams: dict[str, StreamMark] = {}

    def __call__(self, posts: Iterable[Post]) -> Iterator[Post]:
        if self.limit is not None and self.limit <= 0:
            self.limited = True
            return
        # Once per post of every run: the lookups are bound here and what _remember does is written out inline.
        stream_of = self.source.stream_of
        place_of = getattr(self.source, "place_of", None)  # None: every place is a created_at (Source.place_of)
        done_marks = self.resume.streams if self.resume is not None else {}
        marks = self.streams
        limit = self.limit
        for post in posts:
            stream = stream_of(post)
            created = post.created_at
            if stream is not None:
                place = place_of(post) if place_of is not None else None
                by, place = ("created", created) if place is None else ("order", place)
                if done_marks:
                    done = done_marks.get(stream)
                    if done is not None and done.covers(by, place, post.post_id):
                        self.skipped += 1
                        continue
                mark = marks.get(stream)
                if mark is None:
                    marks[stream] = StreamMark.first(place, post.post_id, by)
                elif place <= mark.oldest or place >= mark.top:  # mark.add() changes nothing for a place between
                    mark.add(place, post.post_id)
            if self.newest is None or created > self.newest:
                self.newest = created
            self.passed += 1
            yield post
            if limit is not None and self.passed >= limit:
                self.limited = True
                return

    def cut_point(self) -> ResumePoint:
        """The resume point after this run stopped early: the earlier one extended by what this run loaded."""
        point = ResumePoint(newest=self.resume.newest if self.resume else None)
        if self.resume is not None:
            point.streams = {name: replace(m, ids=set(m.ids), top_ids=set(m.top_ids)) for name, m in self.resume.streams.items()}
        if self.newest is not None and (point.newest is None or self.newest > point.newest):
            point.newest = self.newest
        for name, mark in self.streams.items():
            earlier = point.streams.get(name)
            if earlier is None or earlier.by != mark.by or type(earlier.oldest) is not type(mark.oldest):
                point.streams[name] = mark  # (a mark of another kind was not used: this run read the stream again)
            else:
                point.streams[name] = earlier.joined(mark)
        return point

    def watermark(self) -> datetime | None:
        """The newest post loaded by this run and the cut runs before it (the watermark once complete)."""
        candidates = [t for t in (self.newest, self.resume.newest if self.resume else None) if t is not None]
        return max(candidates, default=None)
