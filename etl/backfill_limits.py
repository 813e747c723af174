"""The bounds of one backfill: a chunk of at least a minute, at most 10,000 chunks (checked before any work)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from etl.errors import UsageError

MIN_CHUNK = timedelta(minutes=1)
MAX_CHUNKS = 10_000


def checked_chunk(since: datetime, until: datetime, chunk_days: float) -> timedelta:
    """The chunk of --chunk-days D for a backfill of [since, until); UsageError (exit 2) for an absurd one."""
    if not math.isfinite(chunk_days) or chunk_days <= 0:
        raise UsageError(f"--chunk-days must be a positive number of days (got {chunk_days!r})")
    if chunk_days * 86_400 < MIN_CHUNK.total_seconds():
        raise UsageError(
            f"--chunk-days {chunk_days:g} is shorter than the smallest chunk, one minute "
            f"(--chunk-days {_up_to_6_decimals(MIN_CHUNK / timedelta(days=1))} or more)"
        )
    if until > since and chunk_days * 86_400 >= (until - since).total_seconds():
        return until - since  # one chunk (a longer one, 1e300 days, is no timedelta, and ended past the year 9999)
    chunk = timedelta(days=chunk_days)
    chunks = math.ceil((until - since) / chunk)
    if chunks > MAX_CHUNKS:
        # The smallest chunk that fits, rounded up to 6 decimals so that it really does.
        fits = _up_to_6_decimals((until - since) / timedelta(days=1) / MAX_CHUNKS)
        raise UsageError(
            f"--chunk-days {chunk_days:g} cuts {since:%Y-%m-%d}..{until:%Y-%m-%d} into {chunks:,} chunks, more than "
            f"the {MAX_CHUNKS:,} one backfill may have; use --chunk-days {fits} or more"
        )
    return chunk


def _up_to_6_decimals(days: float) -> str:
    """`days` rounded up to 6 decimals, as text with every one of them kept (`:g` kept 6 significant digits, and
    rounded 1.000121 down to 1.00012): a size named as the least that fits must fit when typed back."""
    return f"{math.ceil(days * 1e6) / 1e6:.6f}".rstrip("0").rstrip(".")
