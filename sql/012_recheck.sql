-- Re-checking held posts at their platform (issue 18, "deleted at source"): when each post was last asked
-- about, so that every run re-checks the ETL_RECHECK_POSTS least recently checked posts of each source and the
-- whole archive is covered over time. A forgotten post's row goes with it (forget_post_rows finds every table
-- with platform and post_id columns).
CREATE TABLE post_checks (
    platform   TEXT NOT NULL,
    post_id    TEXT NOT NULL,
    checked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, post_id)
);
CREATE INDEX post_checks_checked_at_idx ON post_checks (platform, checked_at);

-- A re-check that spans runs (X's batch compliance job: created and uploaded by one run, its result read by a
-- later one): per platform, what the source left to pick up.
CREATE TABLE recheck_state (
    platform   TEXT PRIMARY KEY,
    state      JSONB NOT NULL DEFAULT '{}'::jsonb,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
