-- Reliability, round two (issue 10).
-- A caption longer than the cap is kept, cut at the cap, and flagged.
ALTER TABLE social_posts ADD COLUMN caption_truncated BOOLEAN NOT NULL DEFAULT false;
-- Where a run cut short (--limit, SIGTERM, quota, rate limit) stopped, per stream: the next run fills the
-- gap below it before the watermark moves (etl/resume.py).
ALTER TABLE etl_state ADD COLUMN resume JSONB;
