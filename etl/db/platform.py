"""Platform state kept in the database: Instagram's hashtag searches and YouTube's quota spent.

A source is handed only the piece it needs (a HashtagSearches, a QuotaLedger) at construction, never the whole
Database: `Source.state_type` names the piece, and the runner builds it from its Database.
"""

from __future__ import annotations

from datetime import datetime

from etl.db.connection import Database

# The window is 7 x 24 hours: "1 day" in timestamptz arithmetic is a calendar day of the session's time zone, 23 or
# 25 hours across a DST change (a server whose TimeZone is Europe/Berlin, say).
_HASHTAG_KNOWN_SQL = (
    "SELECT hashtag_id, first_searched_at > now() - %s * interval '24 hours' FROM instagram_hashtags"
    " WHERE user_id = %s AND hashtag = %s"
)
_HASHTAGS_IN_WINDOW_SQL = (
    "SELECT hashtag FROM instagram_hashtags WHERE user_id = %s AND first_searched_at > now() - %s * interval '24 hours'"
)
# A query inside the window neither counts again nor restarts the clock; one after it starts a new one.
_HASHTAG_SEARCHED_SQL = (
    "INSERT INTO instagram_hashtags AS h (user_id, hashtag, hashtag_id) VALUES (%s, %s, %s)"
    " ON CONFLICT (user_id, hashtag) DO UPDATE SET hashtag_id = EXCLUDED.hashtag_id,"
    " first_searched_at = CASE WHEN h.first_searched_at > now() - %s * interval '24 hours'"
    " THEN h.first_searched_at ELSE now() END, last_queried_at = now()"
)
_QUOTA_SPENT_SQL = (
    "SELECT COALESCE(SUM((per_source -> %s ->> 'quota_used')::numeric), 0) FROM etl_runs"
    " WHERE started_at >= %s AND jsonb_typeof(per_source -> %s -> 'quota_used') = 'number'"
)


class HashtagSearches:
    """The hashtags an Instagram account has searched (instagram_hashtags): their ids and when each window began."""

    def __init__(self, db: Database):
        self.db = db

    def known(self, user_id: str, hashtag: str, window_days: int) -> tuple[str, bool] | None:
        """(hashtag id, first searched less than `window_days` ago) if the id is stored, else None."""
        with self.db.transaction() as cur:
            cur.execute(_HASHTAG_KNOWN_SQL, (window_days, user_id, hashtag))
            row = cur.fetchone()
        return (row[0], bool(row[1])) if row else None

    def in_window(self, user_id: str, window_days: int) -> set[str]:
        """The hashtags the account first searched less than `window_days` ago."""
        with self.db.transaction() as cur:
            cur.execute(_HASHTAGS_IN_WINDOW_SQL, (user_id, window_days))
            return {row[0] for row in cur.fetchall()}

    def searched(self, user_id: str, hashtag: str, hashtag_id: str, window_days: int) -> None:
        """Record a query of the hashtag (its window starts now unless one is still open)."""
        with self.db.transaction() as cur:
            cur.execute(_HASHTAG_SEARCHED_SQL, (user_id, hashtag, hashtag_id, window_days))


class QuotaLedger:
    """Quota units a platform's source spent, as the run ledger recorded them (etl_runs.per_source -> quota_used)."""

    def __init__(self, db: Database):
        self.db = db

    def spent_since(self, platform: str, moment: datetime) -> int:
        """Units recorded by the runs of `platform` that started at or after `moment`."""
        with self.db.transaction() as cur:
            cur.execute(_QUOTA_SPENT_SQL, (platform, moment, platform))
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0


__all__ = ["HashtagSearches", "QuotaLedger"]
