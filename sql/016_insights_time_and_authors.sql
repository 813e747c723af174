-- Answers of sql/006 and sql/015 that were wrong on some archives (a zone with daylight saving, posts without an
-- author).
--
-- hashtag_trends: the baseline's start was p_as_of - p_window * (n + 1), interval arithmetic in the session's time
-- zone: '1 day' is a calendar day there, so across a daylight saving change the start moved by an hour from the
-- n + 1 windows of exactly extract(epoch FROM p_window) seconds the posts are cut into, and the posts of that hour
-- fell into a window n + 1 that the baseline's mean counted. The start is now that many seconds before p_as_of,
-- whatever the zone.
CREATE OR REPLACE FUNCTION hashtag_trends(
    p_window INTERVAL, p_baseline INTERVAL, p_platform TEXT DEFAULT NULL, p_min_count INTEGER DEFAULT 5,
    p_as_of TIMESTAMPTZ DEFAULT now()
)
RETURNS TABLE (hashtag TEXT, window_posts BIGINT, baseline_mean DOUBLE PRECISION, baseline_stddev DOUBLE PRECISION,
               z_score DOUBLE PRECISION, growth DOUBLE PRECISION)
LANGUAGE sql STABLE
AS $$
    WITH params AS (
        SELECT greatest(1, floor(extract(epoch FROM p_baseline) / extract(epoch FROM p_window)))::integer AS n,
               extract(epoch FROM p_window)::double precision AS w
    ), tagged AS (
        SELECT DISTINCT p.id, lower(t.tag) AS hashtag,
               ceil(extract(epoch FROM (p_as_of - p.created_at)) / params.w)::integer - 1 AS bucket
        FROM params, social_posts p, unnest(p.hashtags) AS t(tag)
        WHERE p.created_at < p_as_of AND p.created_at >= p_as_of - make_interval(secs => params.w * (params.n + 1))
          AND (p_platform IS NULL OR p.platform = p_platform) AND t.tag <> ''
    ), per_window AS (
        SELECT hashtag, bucket, count(*)::double precision AS c FROM tagged GROUP BY hashtag, bucket
    ), stats AS (
        SELECT hashtag,
               coalesce(sum(c) FILTER (WHERE bucket = 0), 0) AS x,
               coalesce(sum(c) FILTER (WHERE bucket > 0), 0) / params.n AS mu,
               coalesce(sum(c * c) FILTER (WHERE bucket > 0), 0) / params.n AS m2
        FROM per_window, params GROUP BY hashtag, params.n
    )
    SELECT hashtag, x::bigint, mu, sqrt(greatest(m2 - mu * mu, 0)),
           (x - mu) / greatest(sqrt(greatest(m2 - mu * mu, 0)), sqrt(mu), 1),
           (x + 1) / (mu + 1)
    FROM stats
    WHERE x >= p_min_count
    ORDER BY 5 DESC, 6 DESC, 1
$$;

-- report_totals' authors and report_image_spread's accounts: count(DISTINCT (platform, author_username)) counts a
-- row value, and a row value with a NULL field is not NULL, so the posts whose author the platform did not give
-- made one more "author" per platform, where report_share_of_voice (count(DISTINCT author_username)) leaves them
-- out. Posts without an author are now no author in all three.
CREATE OR REPLACE FUNCTION report_totals(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (posts BIGINT, authors BIGINT, platforms BIGINT, first_post TIMESTAMPTZ, last_post TIMESTAMPTZ,
               likes NUMERIC, comments NUMERIC, images_stored BIGINT, images_failed BIGINT, bytes_stored NUMERIC,
               distinct_images BIGINT)
LANGUAGE sql STABLE
AS $$
    WITH p AS (SELECT * FROM report_posts(p_since, p_until, p_platform)),
    m AS (SELECT m.* FROM post_media m JOIN p USING (platform, post_id))
    SELECT (SELECT count(*) FROM p),
           (SELECT count(DISTINCT (platform, author_username)) FILTER (WHERE author_username IS NOT NULL) FROM p),
           (SELECT count(DISTINCT platform) FROM p), (SELECT min(created_at) FROM p), (SELECT max(created_at) FROM p),
           (SELECT coalesce(sum(like_count), 0) FROM p), (SELECT coalesce(sum(comment_count), 0) FROM p),
           (SELECT count(*) FILTER (WHERE status = 'stored') FROM m),
           (SELECT count(*) FILTER (WHERE status = 'failed') FROM m),
           (SELECT coalesce(sum(bytes) FILTER (WHERE status = 'stored'), 0) FROM m),
           (SELECT count(DISTINCT sha256) FROM m WHERE status = 'stored')
$$;

CREATE OR REPLACE FUNCTION report_image_spread(
    p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT, p_limit INTEGER, max_distance INTEGER
)
RETURNS TABLE (sha256 TEXT, posts BIGINT, accounts BIGINT, platforms BIGINT, first_seen TIMESTAMPTZ,
               last_seen TIMESTAMPTZ, near_posts BIGINT, phash BIGINT, storage_key TEXT, content_type TEXT)
LANGUAGE sql STABLE
AS $$
    WITH groups AS (
        SELECT m.sha256, count(DISTINCT (p.platform, p.post_id)) AS posts,
               count(DISTINCT (p.platform, p.author_username)) FILTER (WHERE p.author_username IS NOT NULL)
                 AS accounts, count(DISTINCT p.platform) AS platforms,
               min(p.created_at) AS first_seen, max(p.created_at) AS last_seen, min(m.phash) AS phash,
               min(m.storage_key) AS storage_key, min(m.content_type) AS content_type
        FROM post_media m JOIN report_posts(p_since, p_until, p_platform) p USING (platform, post_id)
        WHERE m.status = 'stored' AND m.sha256 IS NOT NULL
        GROUP BY m.sha256 HAVING count(DISTINCT (p.platform, p.post_id)) > 1
        ORDER BY 2 DESC, 5, 1 LIMIT p_limit
    )
    SELECT g.sha256, g.posts, g.accounts, g.platforms, g.first_seen, g.last_seen,
           (SELECT count(DISTINCT (o.platform, o.post_id))
            FROM near_duplicate_media(g.phash, max_distance) n JOIN post_media o ON o.id = n.media_id
            JOIN report_posts(p_since, p_until, p_platform) op USING (platform, post_id)
            WHERE o.sha256 <> g.sha256
              AND NOT EXISTS (SELECT 1 FROM post_media x WHERE x.platform = o.platform AND x.post_id = o.post_id
                              AND x.sha256 = g.sha256 AND x.status = 'stored')),
           g.phash, g.storage_key, g.content_type
    FROM groups g ORDER BY g.posts DESC, g.first_seen, g.sha256
$$;
