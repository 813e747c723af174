"""The source registry: one module per platform, each registering its Source class by name."""

from __future__ import annotations

from etl.errors import UsageError
from etl.sources.base import FetchWindow, Source

REGISTRY: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    REGISTRY[cls.name] = cls
    return cls


def source_class(name: str) -> type[Source]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown source {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


# Importing the modules registers them.
from etl.sources import bluesky, instagram, jsonl, mastodon, mock, reddit, twitter, youtube  # noqa: E402,F401

__all__ = ["REGISTRY", "FetchWindow", "Source", "register", "source_class"]
