-- Backfill progress: one row per finished chunk, so an interrupted backfill resumes where it stopped.

CREATE TABLE etl_backfill_chunks (
    source       TEXT        NOT NULL,
    config_key   TEXT        NOT NULL DEFAULT '',
    chunk_start  TIMESTAMPTZ NOT NULL,
    chunk_end    TIMESTAMPTZ NOT NULL,
    posts        INTEGER     NOT NULL DEFAULT 0,
    run_id       BIGINT      REFERENCES etl_runs (id) ON DELETE SET NULL,
    finished_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, config_key, chunk_start, chunk_end)
);
