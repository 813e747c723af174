-- Instagram hashtag ids, cached per account, and the rolling 7-day window each one counts in.
--
-- The Graph API lets one account query at most 30 unique hashtags in a rolling 7-day period, counted
-- from the first query; later queries of the same hashtag inside the period do not count again nor
-- restart its clock. Hashtag ids are static and global, so a cached id is good forever; only
-- first_searched_at (the start of the hashtag's current 7-day period) moves, once that period is over.

CREATE TABLE instagram_hashtags (
    user_id           TEXT        NOT NULL,
    hashtag           TEXT        NOT NULL,
    hashtag_id        TEXT        NOT NULL,
    first_searched_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_queried_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, hashtag)
);
CREATE INDEX instagram_hashtags_window_idx ON instagram_hashtags (user_id, first_searched_at);
