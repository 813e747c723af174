"""Incremental state per stream (etl_state): the watermark and cursor, and the resume point a cut run left."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg2.extensions

from etl.db.connection import Database, adapt_json
from etl.records import clean_json


class StreamState:
    """etl_state rows, keyed (source, key): a stream's key, or a source configuration's key of before."""

    def __init__(self, db: Database):
        self.db = db

    def window_state(self, source: str, key: str, legacy_key: str | None = None) -> tuple[datetime | None, dict[str, Any]]:
        """(watermark, cursor) of `key`; a stream with no state of its own adopts `legacy_key`'s, its source's
        state of before state was kept per stream (an upgraded archive refetches nothing)."""
        watermark, cursor = self.get_state(source, key)
        if legacy_key is not None and watermark is None and not cursor:
            watermark, cursor = self.get_state(source, legacy_key)
        return watermark, cursor

    def get_state(self, source: str, config_key: str) -> tuple[datetime | None, dict[str, Any]]:
        """(watermark, cursor) of one row; (None, {}) when there is none."""
        row = self._row(source, config_key, what="reading the watermark")
        return (row[0], dict(row[1] or {})) if row else (None, {})

    def _row(self, source: str, config_key: str, *, what: str) -> tuple[Any, ...] | None:
        """(watermark, cursor, resume) of one etl_state row, or None."""

        def read(cur: psycopg2.extensions.cursor) -> Any:
            cur.execute(
                "SELECT watermark, cursor, resume FROM etl_state WHERE source = %s AND config_key = %s", (source, config_key)
            )
            return cur.fetchone()

        return self.db.run(read, what=what)

    def save_state(self, source: str, config_key: str, watermark: datetime | None, cursor: dict[str, Any]) -> None:
        """Move the watermark forward (never back), replace the cursor, clear the resume point (window complete)."""
        self.db.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_state AS s (source, config_key, watermark, cursor) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (source, config_key) DO UPDATE SET"
                " watermark = GREATEST(s.watermark, EXCLUDED.watermark),"
                " cursor = CASE WHEN EXCLUDED.cursor = '{}'::jsonb THEN s.cursor ELSE EXCLUDED.cursor END,"
                " resume = NULL, updated_at = now()",
                (source, config_key, watermark, adapt_json(clean_json(cursor))),
            ),
            what="saving the watermark",
        )

    def get_resume(self, source: str, config_key: str) -> dict[str, Any] | None:
        """The resume point a run cut short left (etl/resume.py), or None."""
        row = self._row(source, config_key, what="reading the resume point")
        return row[2] if row else None

    def save_resume(self, source: str, config_key: str, resume: dict[str, Any]) -> None:
        """Record where a cut run stopped; the watermark and cursor stay as they were."""
        self.db.run(
            lambda cur: cur.execute(
                "INSERT INTO etl_state AS s (source, config_key, resume) VALUES (%s, %s, %s)"
                " ON CONFLICT (source, config_key) DO UPDATE SET resume = EXCLUDED.resume, updated_at = now()",
                (source, config_key, adapt_json(resume)),
            ),
            what="saving the resume point",
        )
