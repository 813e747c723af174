-- The archive: posts, their images, the run ledger and per-source incremental state.

CREATE TABLE social_posts (
    id                      BIGSERIAL PRIMARY KEY,
    platform                TEXT        NOT NULL,
    post_id                 TEXT        NOT NULL,
    author_username         TEXT,
    caption                 TEXT,
    sentiment               TEXT        CHECK (sentiment IN ('positive', 'neutral', 'negative')),
    sentiment_polarity      DOUBLE PRECISION,
    sentiment_subjectivity  DOUBLE PRECISION,
    sentiment_version       TEXT,
    image_s3_url            TEXT,
    like_count              BIGINT      CHECK (like_count >= 0),
    comment_count           BIGINT      CHECK (comment_count >= 0),
    permalink               TEXT,
    hashtags                TEXT[]      NOT NULL DEFAULT '{}',
    raw                     JSONB,
    created_at              TIMESTAMPTZ NOT NULL,
    archived_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT social_posts_platform_post_id_key UNIQUE (platform, post_id)
);
CREATE INDEX social_posts_created_at_idx ON social_posts (platform, created_at);

CREATE TABLE post_media (
    id            BIGSERIAL PRIMARY KEY,
    platform      TEXT        NOT NULL,
    post_id       TEXT        NOT NULL,
    position      INTEGER     NOT NULL CHECK (position >= 0),
    source_url    TEXT        NOT NULL,
    storage_key   TEXT,
    storage_url   TEXT,
    sha256        TEXT,
    bytes         BIGINT,
    content_type  TEXT,
    width         INTEGER,
    height        INTEGER,
    status        TEXT        NOT NULL CHECK (status IN ('stored', 'failed')),
    permanent     BOOLEAN     NOT NULL DEFAULT false,
    attempts      INTEGER     NOT NULL DEFAULT 0,
    last_error    TEXT,
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    stored_at     TIMESTAMPTZ,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT post_media_platform_post_id_position_key UNIQUE (platform, post_id, position),
    CONSTRAINT post_media_post_fk FOREIGN KEY (platform, post_id)
        REFERENCES social_posts (platform, post_id) ON DELETE CASCADE
);
CREATE INDEX post_media_failed_idx ON post_media (updated_at) WHERE status = 'failed';

CREATE TABLE etl_runs (
    id              BIGSERIAL PRIMARY KEY,
    mode            TEXT        NOT NULL,
    sources         TEXT[]      NOT NULL,
    arguments       JSONB       NOT NULL DEFAULT '{}',
    host            TEXT,
    pid             INTEGER,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ,
    status          TEXT        NOT NULL DEFAULT 'running',
    posts_fetched   INTEGER     NOT NULL DEFAULT 0,
    posts_inserted  INTEGER     NOT NULL DEFAULT 0,
    posts_updated   INTEGER     NOT NULL DEFAULT 0,
    posts_unchanged INTEGER     NOT NULL DEFAULT 0,
    posts_rejected  INTEGER     NOT NULL DEFAULT 0,
    images_stored   INTEGER     NOT NULL DEFAULT 0,
    images_failed   INTEGER     NOT NULL DEFAULT 0,
    images_skipped  INTEGER     NOT NULL DEFAULT 0,
    quota_used      INTEGER     NOT NULL DEFAULT 0,
    sentiment       JSONB       NOT NULL DEFAULT '{}',
    per_source      JSONB       NOT NULL DEFAULT '{}',
    errors          JSONB       NOT NULL DEFAULT '[]',
    error_summary   TEXT
);
CREATE INDEX etl_runs_started_at_idx ON etl_runs (started_at DESC);

CREATE TABLE etl_state (
    source      TEXT        NOT NULL,
    config_key  TEXT        NOT NULL DEFAULT '',
    watermark   TIMESTAMPTZ,
    cursor      JSONB       NOT NULL DEFAULT '{}',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, config_key)
);
