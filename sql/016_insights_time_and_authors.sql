-- Answers of sql/006 and sql/015 that were wrong on some archives.
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
