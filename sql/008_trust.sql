-- Keeping the archive trustworthy over years: fixity checks, deletions (tombstones, deleted at source),
-- each post's language, and the history of its engagement counts.

-- Language: as the platform gave it ('platform') or as detected from the caption ('detected'); NULL unknown.
-- A post in another language than English gets no sentiment label; sentiment_skipped says why.
ALTER TABLE social_posts
    ADD COLUMN language          TEXT,
    ADD COLUMN language_source   TEXT CHECK (language_source IN ('platform', 'detected')),
    ADD COLUMN sentiment_skipped TEXT,
    ADD COLUMN deleted_at_source TIMESTAMPTZ;
CREATE INDEX social_posts_deleted_at_source_idx ON social_posts (deleted_at_source) WHERE deleted_at_source IS NOT NULL;

-- Fixity: the last check of each stored object ('ok', 'missing', 'changed'; NULL never checked).
ALTER TABLE post_media
    ADD COLUMN fixity      TEXT CHECK (fixity IN ('ok', 'missing', 'changed')),
    ADD COLUMN verified_at TIMESTAMPTZ;
CREATE INDEX post_media_verified_at_idx ON post_media (verified_at NULLS FIRST, id) WHERE status = 'stored';
CREATE INDEX post_media_storage_key_idx ON post_media (storage_key);

-- Tombstones: posts removed on request (or deleted at source under ETL_DELETED_AT_SOURCE=forget). No content:
-- only which post, when and why, so that no later run or backfill archives it again.
CREATE TABLE forgotten_posts (
    platform     TEXT        NOT NULL,
    post_id      TEXT        NOT NULL,
    forgotten_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason       TEXT,
    PRIMARY KEY (platform, post_id)
);

-- Engagement history: one row each time a run sees a post's counts change (and its first counts).
CREATE TABLE post_engagement (
    platform      TEXT        NOT NULL,
    post_id       TEXT        NOT NULL,
    observed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    like_count    BIGINT,
    comment_count BIGINT,
    PRIMARY KEY (platform, post_id, observed_at),
    CONSTRAINT post_engagement_post_fk FOREIGN KEY (platform, post_id)
        REFERENCES social_posts (platform, post_id) ON DELETE CASCADE
);

-- Growth of each post between its first and its latest snapshot.
CREATE VIEW post_engagement_growth AS
SELECT p.platform, p.post_id, p.author_username, p.permalink, p.created_at,
       f.observed_at AS first_observed_at, l.observed_at AS last_observed_at,
       f.like_count AS first_like_count, l.like_count AS last_like_count,
       f.comment_count AS first_comment_count, l.comment_count AS last_comment_count,
       COALESCE(l.like_count, 0) - COALESCE(f.like_count, 0) AS likes_gained,
       COALESCE(l.comment_count, 0) - COALESCE(f.comment_count, 0) AS comments_gained,
       (COALESCE(l.like_count, 0) + COALESCE(l.comment_count, 0) - COALESCE(f.like_count, 0) - COALESCE(f.comment_count, 0))
         / GREATEST(EXTRACT(EPOCH FROM (l.observed_at - f.observed_at)) / 86400.0, 1.0 / 24) AS engagement_per_day
FROM social_posts p
CROSS JOIN LATERAL (SELECT e.observed_at, e.like_count, e.comment_count FROM post_engagement e
                    WHERE e.platform = p.platform AND e.post_id = p.post_id ORDER BY e.observed_at LIMIT 1) f
CROSS JOIN LATERAL (SELECT e.observed_at, e.like_count, e.comment_count FROM post_engagement e
                    WHERE e.platform = p.platform AND e.post_id = p.post_id ORDER BY e.observed_at DESC LIMIT 1) l;

-- The fastest-growing posts since a moment: growth from the last snapshot at or before p_since (else the
-- first one after it) to the latest, largest likes + comments gained first. For the report:
--   SELECT * FROM fastest_growing_posts(now() - interval '7 days', 20);
CREATE FUNCTION fastest_growing_posts(p_since TIMESTAMPTZ, p_limit INTEGER DEFAULT 20)
RETURNS TABLE (platform TEXT, post_id TEXT, author_username TEXT, permalink TEXT, like_count BIGINT,
               comment_count BIGINT, likes_gained BIGINT, comments_gained BIGINT, since_observed_at TIMESTAMPTZ,
               last_observed_at TIMESTAMPTZ)
LANGUAGE sql STABLE AS $$
    SELECT p.platform, p.post_id, p.author_username, p.permalink, l.like_count, l.comment_count,
           COALESCE(l.like_count, 0) - COALESCE(b.like_count, 0),
           COALESCE(l.comment_count, 0) - COALESCE(b.comment_count, 0),
           b.observed_at, l.observed_at
    FROM social_posts p
    CROSS JOIN LATERAL (SELECT e.observed_at, e.like_count, e.comment_count FROM post_engagement e
                        WHERE e.platform = p.platform AND e.post_id = p.post_id ORDER BY e.observed_at DESC LIMIT 1) l
    CROSS JOIN LATERAL (
        SELECT * FROM (
            (SELECT e.observed_at, e.like_count, e.comment_count FROM post_engagement e
              WHERE e.platform = p.platform AND e.post_id = p.post_id AND e.observed_at <= p_since
              ORDER BY e.observed_at DESC LIMIT 1)
            UNION ALL
            (SELECT e.observed_at, e.like_count, e.comment_count FROM post_engagement e
              WHERE e.platform = p.platform AND e.post_id = p.post_id AND e.observed_at > p_since
              ORDER BY e.observed_at LIMIT 1)
        ) c ORDER BY c.observed_at <= p_since DESC, c.observed_at LIMIT 1
    ) b
    WHERE l.observed_at > p_since
    ORDER BY (COALESCE(l.like_count, 0) + COALESCE(l.comment_count, 0)
              - COALESCE(b.like_count, 0) - COALESCE(b.comment_count, 0)) DESC, p.platform, p.post_id
    LIMIT p_limit
$$;

-- Deletes the rows of these posts from every table with platform and post_id columns (other modules' tables
-- too), social_posts last, and returns how many each lost. Tombstones stay. Used by etl.py forget.
CREATE FUNCTION forget_post_rows(p_platforms TEXT[], p_post_ids TEXT[])
RETURNS TABLE (table_name TEXT, deleted BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    t TEXT;
    n BIGINT;
BEGIN
    FOR t IN
        SELECT c.table_name::text FROM information_schema.columns c
        JOIN information_schema.tables tb ON tb.table_schema = c.table_schema AND tb.table_name = c.table_name
             AND tb.table_type = 'BASE TABLE'
        WHERE c.table_schema = current_schema() AND c.column_name IN ('platform', 'post_id')
          AND c.table_name <> 'forgotten_posts'
        GROUP BY c.table_name HAVING count(*) = 2
        ORDER BY c.table_name = 'social_posts', c.table_name
    LOOP
        EXECUTE format('DELETE FROM %I x USING unnest($1, $2) AS k(platform, post_id)'
                       ' WHERE x.platform = k.platform AND x.post_id = k.post_id', t)
            USING p_platforms, p_post_ids;
        GET DIAGNOSTICS n = ROW_COUNT;
        table_name := t;
        deleted := n;
        RETURN NEXT;
    END LOOP;
END
$$;
