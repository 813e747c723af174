-- The object store an archived image lives in, as named by its storage_url: 's3://BUCKET' for an S3 URL
-- (s3://BUCKET/KEY), 'local' for a file: URL (the local object store, always ETL_DATA_DIR/objects, wherever
-- that folder was when the image was stored). NULL for anything else.
--
-- Runs compare it with the configured store and refuse to go on while images live in another one
-- (`python etl.py copy-store` moves them). The partial index keeps that check to an index probe when
-- every image is where it should be.

CREATE FUNCTION media_store(url TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE
        WHEN url LIKE 's3://%' THEN 's3://' || split_part(substr(url, 6), '/', 1)
        WHEN url LIKE 'file:%' THEN 'local'
    END $$;

CREATE INDEX post_media_store_idx ON post_media (media_store(storage_url)) WHERE status = 'stored';
