-- What `etl.py export` last wrote to each target: one row per Parquet partition object, with the row
-- count and a fingerprint of the rows it holds. A partition whose rows now fingerprint differently (a post
-- updated, re-scored, added or forgotten; an image stored or hashed) is written again; one that matches is
-- left alone. Rows are recorded only after their object was written, so a crash costs a rewrite, never a gap.

CREATE TABLE export_partitions (
    target       TEXT        NOT NULL,  -- the dataset root, e.g. s3://bucket/social/export/ or file:///srv/lake/
    dataset      TEXT        NOT NULL CHECK (dataset IN ('posts', 'media')),
    platform     TEXT        NOT NULL,
    dt           DATE        NOT NULL,  -- the posts' created_at date in UTC
    row_count    BIGINT      NOT NULL,
    fingerprint  TEXT        NOT NULL,
    object_key   TEXT        NOT NULL,
    bytes        BIGINT      NOT NULL,
    exported_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (target, dataset, platform, dt)
);
