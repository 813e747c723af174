"""Shards: the work of a run cut into N disjoint parts by a stable hash of each stream, for several workers."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from etl.config import MAX_SHARDS
from etl.errors import UsageError

if TYPE_CHECKING:
    from etl.sources.base import Source

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def bucket(name: str, count: int) -> int:
    """0..count-1 for a unit's name; the same on every host and in every run (sha256, not Python's hash)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1-based), as written on the command line: K/N."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(str(text))
        if not match:
            raise UsageError(f"--shard {text!r} is not K/N (for example 2/4)")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= count <= MAX_SHARDS:
            raise UsageError(f"--shard {text!r}: N must be between 1 and {MAX_SHARDS}")
        if not 1 <= index <= count:
            raise UsageError(f"--shard {text!r}: K must be between 1 and N ({count})")
        return cls(index, count)

    def owns(self, unit: str) -> bool:
        return bucket(unit, self.count) == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Unit:
    """One unit of work: a stream of a source (a channel, a user, a hashtag, a query) or a stream-less source."""

    source: str
    stream: str = ""

    @property
    def name(self) -> str:
        return f"{self.source}:{self.stream}" if self.stream else self.source


def units_of(source: Source) -> list[Unit]:
    return [Unit(source.name, stream) for stream in source.streams()] or [Unit(source.name)]


def plan_shards(sources: Sequence[Source], count: int) -> list[tuple[Shard, list[Unit]]]:
    """Every unit of every source in exactly one of `count` shards."""
    if not 1 <= count <= MAX_SHARDS:
        raise UsageError(f"--shards must be between 1 and {MAX_SHARDS}")
    shards = [Shard(k, count) for k in range(1, count + 1)]
    return [(shard, [u for source in sources for u in units_of(source) if shard.owns(u.name)]) for shard in shards]


def format_plan(planned: list[tuple[Shard, list[Unit]]], *, as_json: bool = False) -> str:
    """`etl.py plan`: each shard and its units, as text or JSON."""
    if as_json:
        return json.dumps(
            [{"shard": str(s), "units": [{"source": u.source, "stream": u.stream, "name": u.name} for u in units]}
             for s, units in planned],
            indent=2,
        )  # fmt: skip
    lines = []
    for shard, units in planned:
        lines.append(f"shard {shard}: {len(units)} unit(s)" + ("" if units else " (nothing to do)"))
        lines.extend(f"  {u.name}" for u in units)
    return "\n".join(lines)
