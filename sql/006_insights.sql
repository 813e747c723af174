-- From archive to answers (issue 14): image fingerprints and their near-duplicate index, rising hashtags,
-- and the aggregates of `etl.py report`. Every function here is plain SQL, usable from any BI tool.

-- Image fingerprints: a 64-bit difference hash (etl/fingerprint.py) stored as a signed BIGINT (same bits).
ALTER TABLE post_media
    ADD COLUMN phash           BIGINT,
    ADD COLUMN phash_algorithm TEXT,
    ADD COLUMN phash_version   SMALLINT;

-- Exact duplicates: the same bytes.
CREATE INDEX post_media_sha256_idx ON post_media (sha256) WHERE status = 'stored';
-- Hashes still to compute (`etl.py fingerprint`).
CREATE INDEX post_media_unhashed_idx ON post_media (id) WHERE status = 'stored' AND phash IS NULL;

-- Near duplicates: the hash cut into eight 8-bit bands, each indexed. Two hashes within Hamming distance t
-- share at least one whole band when t < 8 (t differing bits touch at most t of the 8 bands), so looking up
-- the 8 bands and filtering the candidates by bit_count finds every match with t <= 7, and no scan.
CREATE INDEX post_media_phash_b0 ON post_media (((phash >> 56) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b1 ON post_media (((phash >> 48) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b2 ON post_media (((phash >> 40) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b3 ON post_media (((phash >> 32) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b4 ON post_media (((phash >> 24) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b5 ON post_media (((phash >> 16) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b6 ON post_media (((phash >> 8) & 255)) WHERE phash IS NOT NULL;
CREATE INDEX post_media_phash_b7 ON post_media ((phash & 255)) WHERE phash IS NOT NULL;

-- The hashtags of posts in a time range (trends, report).
CREATE INDEX social_posts_created_at_all_idx ON social_posts (created_at);

CREATE FUNCTION phash_distance(a BIGINT, b BIGINT) RETURNS INTEGER
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT bit_count((a # b)::bit(64))::integer $$;

-- Images whose hash is within max_distance (0..7) of target: an indexed lookup of the 8 bands.
CREATE FUNCTION near_duplicate_media(target BIGINT, max_distance INTEGER)
RETURNS TABLE (media_id BIGINT, distance INTEGER)
LANGUAGE sql STABLE
AS $$
    SELECT m.id, phash_distance(m.phash, target)
    FROM post_media m
    WHERE m.phash IS NOT NULL
      AND (((m.phash >> 56) & 255) = ((target >> 56) & 255)
        OR ((m.phash >> 48) & 255) = ((target >> 48) & 255)
        OR ((m.phash >> 40) & 255) = ((target >> 40) & 255)
        OR ((m.phash >> 32) & 255) = ((target >> 32) & 255)
        OR ((m.phash >> 24) & 255) = ((target >> 24) & 255)
        OR ((m.phash >> 16) & 255) = ((target >> 16) & 255)
        OR ((m.phash >> 8) & 255) = ((target >> 8) & 255)
        OR (m.phash & 255) = (target & 255))
      AND bit_count((m.phash # target)::bit(64)) <= max_distance
$$;

-- Where the images of one post were seen again: the same bytes (exact) first, then near duplicates.
CREATE FUNCTION image_sightings(p_platform TEXT, p_post_id TEXT, max_distance INTEGER)
RETURNS TABLE (
    image_position INTEGER, match TEXT, distance INTEGER, platform TEXT, post_id TEXT, media_position INTEGER,
    author_username TEXT, created_at TIMESTAMPTZ, storage_url TEXT
)
LANGUAGE sql STABLE
AS $$
    WITH mine AS (
        SELECT id, position, sha256, phash FROM post_media
        WHERE platform = p_platform AND post_id = p_post_id AND status = 'stored'
    ), found AS (
        SELECT mine.position, 'exact'::text AS match, 0 AS distance, o.id AS other
        FROM mine JOIN post_media o ON o.sha256 = mine.sha256 AND o.status = 'stored' AND o.id <> mine.id
        UNION ALL
        SELECT mine.position, 'near', n.distance, n.media_id
        FROM mine CROSS JOIN LATERAL near_duplicate_media(mine.phash, max_distance) n
        JOIN post_media o ON o.id = n.media_id
        WHERE mine.phash IS NOT NULL AND n.media_id <> mine.id AND o.sha256 IS DISTINCT FROM mine.sha256
    )
    SELECT f.position, f.match, f.distance, o.platform, o.post_id, o.position, p.author_username, p.created_at,
           o.storage_url
    FROM found f JOIN post_media o ON o.id = f.other JOIN social_posts p USING (platform, post_id)
    ORDER BY f.position, f.distance, p.created_at, o.platform, o.post_id, o.position
$$;

-- Rising hashtags: the last window against the `baseline` before it, cut into windows of the same length.
-- x = posts with the tag in the last window; mu, sigma = mean and standard deviation of its count per window
-- over the baseline (windows without the tag count as 0); z = (x - mu) / max(sigma, sqrt(mu), 1): the
-- sqrt(mu) floor is the Poisson noise a count of mean mu has anyway, the 1 keeps never-seen tags finite
-- (their z is x). growth = (x + 1) / (mu + 1). Tags under min_count in the window are left out.
CREATE FUNCTION hashtag_trends(
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
               floor(extract(epoch FROM (p_as_of - p.created_at)) / params.w)::integer AS bucket
        FROM params, social_posts p, unnest(p.hashtags) AS t(tag)
        WHERE p.created_at < p_as_of AND p.created_at >= p_as_of - p_window * (params.n + 1)
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

-- The report's aggregates. Every one takes the same scope: posts created in [p_since, p_until) (NULL = open)
-- of one platform (NULL = all).
CREATE FUNCTION report_posts(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS SETOF social_posts
LANGUAGE sql STABLE
AS $$
    SELECT * FROM social_posts
    WHERE (p_since IS NULL OR created_at >= p_since) AND (p_until IS NULL OR created_at < p_until)
      AND (p_platform IS NULL OR platform = p_platform)
$$;

CREATE FUNCTION report_totals(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (posts BIGINT, authors BIGINT, platforms BIGINT, first_post TIMESTAMPTZ, last_post TIMESTAMPTZ,
               likes NUMERIC, comments NUMERIC, images_stored BIGINT, images_failed BIGINT, bytes_stored NUMERIC,
               distinct_images BIGINT)
LANGUAGE sql STABLE
AS $$
    WITH p AS (SELECT * FROM report_posts(p_since, p_until, p_platform)),
    m AS (SELECT m.* FROM post_media m JOIN p USING (platform, post_id))
    SELECT (SELECT count(*) FROM p), (SELECT count(DISTINCT (platform, author_username)) FROM p),
           (SELECT count(DISTINCT platform) FROM p), (SELECT min(created_at) FROM p), (SELECT max(created_at) FROM p),
           (SELECT coalesce(sum(like_count), 0) FROM p), (SELECT coalesce(sum(comment_count), 0) FROM p),
           (SELECT count(*) FILTER (WHERE status = 'stored') FROM m),
           (SELECT count(*) FILTER (WHERE status = 'failed') FROM m),
           (SELECT coalesce(sum(bytes) FILTER (WHERE status = 'stored'), 0) FROM m),
           (SELECT count(DISTINCT sha256) FROM m WHERE status = 'stored')
$$;

CREATE FUNCTION report_posts_per_day(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (day DATE, platform TEXT, posts BIGINT)
LANGUAGE sql STABLE
AS $$
    SELECT (created_at AT TIME ZONE 'UTC')::date, platform, count(*)
    FROM report_posts(p_since, p_until, p_platform) GROUP BY 1, 2 ORDER BY 1, 2
$$;

CREATE FUNCTION report_sentiment_per_day(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (day DATE, positive BIGINT, neutral BIGINT, negative BIGINT, posts BIGINT)
LANGUAGE sql STABLE
AS $$
    SELECT (created_at AT TIME ZONE 'UTC')::date,
           count(*) FILTER (WHERE sentiment = 'positive'), count(*) FILTER (WHERE sentiment = 'neutral'),
           count(*) FILTER (WHERE sentiment = 'negative'), count(*)
    FROM report_posts(p_since, p_until, p_platform) GROUP BY 1 ORDER BY 1
$$;

CREATE FUNCTION report_share_of_voice(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (platform TEXT, posts BIGINT, authors BIGINT, engagement NUMERIC, post_share DOUBLE PRECISION,
               engagement_share DOUBLE PRECISION)
LANGUAGE sql STABLE
AS $$
    WITH per AS (
        SELECT platform, count(*) AS posts, count(DISTINCT author_username) AS authors,
               coalesce(sum(coalesce(like_count, 0) + coalesce(comment_count, 0)), 0) AS engagement
        FROM report_posts(p_since, p_until, p_platform) GROUP BY platform
    )
    SELECT platform, posts, authors, engagement,
           posts::double precision / nullif(sum(posts) OVER (), 0),
           coalesce(engagement::double precision / nullif(sum(engagement) OVER (), 0), 0)
    FROM per ORDER BY posts DESC, platform
$$;

CREATE FUNCTION report_top_hashtags(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT, p_limit INTEGER)
RETURNS TABLE (hashtag TEXT, posts BIGINT, platforms BIGINT)
LANGUAGE sql STABLE
AS $$
    SELECT lower(t.tag), count(DISTINCT p.id), count(DISTINCT p.platform)
    FROM report_posts(p_since, p_until, p_platform) p, unnest(p.hashtags) AS t(tag)
    WHERE t.tag <> '' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT p_limit
$$;

-- Engagement = likes + comments.
CREATE FUNCTION report_top_posts(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT, p_limit INTEGER)
RETURNS TABLE (platform TEXT, post_id TEXT, author_username TEXT, caption TEXT, created_at TIMESTAMPTZ,
               like_count BIGINT, comment_count BIGINT, engagement BIGINT, sentiment TEXT, permalink TEXT,
               image_key TEXT, image_type TEXT)
LANGUAGE sql STABLE
AS $$
    SELECT p.platform, p.post_id, p.author_username, p.caption, p.created_at, p.like_count, p.comment_count,
           coalesce(p.like_count, 0) + coalesce(p.comment_count, 0), p.sentiment, p.permalink,
           m.storage_key, m.content_type
    FROM report_posts(p_since, p_until, p_platform) p
    LEFT JOIN post_media m ON m.platform = p.platform AND m.post_id = p.post_id AND m.position = 0
                          AND m.status = 'stored'
    ORDER BY 8 DESC, p.created_at DESC, p.platform, p.post_id LIMIT p_limit
$$;

-- Images seen in the most posts: groups of the same bytes (sha256), largest first, with the posts, accounts
-- and platforms of each, and how many more posts hold a near duplicate (a hash within max_distance; only
-- for these top groups, never a clustering of the whole archive).
CREATE FUNCTION report_image_spread(
    p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT, p_limit INTEGER, max_distance INTEGER
)
RETURNS TABLE (sha256 TEXT, posts BIGINT, accounts BIGINT, platforms BIGINT, first_seen TIMESTAMPTZ,
               last_seen TIMESTAMPTZ, near_posts BIGINT, phash BIGINT, storage_key TEXT, content_type TEXT)
LANGUAGE sql STABLE
AS $$
    WITH groups AS (
        SELECT m.sha256, count(DISTINCT (p.platform, p.post_id)) AS posts,
               count(DISTINCT (p.platform, p.author_username)) AS accounts, count(DISTINCT p.platform) AS platforms,
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
            WHERE o.sha256 <> g.sha256),
           g.phash, g.storage_key, g.content_type
    FROM groups g ORDER BY g.posts DESC, g.first_seen, g.sha256
$$;

-- Failed images by reason: the error's first words (an HTTP status, "not a valid image", ...).
CREATE FUNCTION report_failed_images(p_since TIMESTAMPTZ, p_until TIMESTAMPTZ, p_platform TEXT)
RETURNS TABLE (reason TEXT, permanent BOOLEAN, images BIGINT, platforms BIGINT)
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(substring(m.last_error FROM '^(HTTP [0-9]+)'),
                    left(split_part(coalesce(m.last_error, 'unknown'), ':', 1), 80)),
           m.permanent, count(*), count(DISTINCT m.platform)
    FROM post_media m JOIN report_posts(p_since, p_until, p_platform) p USING (platform, post_id)
    WHERE m.status = 'failed' GROUP BY 1, 2 ORDER BY 3 DESC, 1
$$;

CREATE VIEW report_runs AS
    SELECT id, mode, sources, status, started_at, finished_at,
           extract(epoch FROM (coalesce(finished_at, now()) - started_at))::double precision AS seconds,
           posts_fetched, posts_inserted, posts_updated, posts_rejected, images_stored, images_skipped, images_failed,
           error_summary
    FROM etl_runs;
