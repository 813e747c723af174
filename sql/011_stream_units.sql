-- Per-stream work (issues 11 and 13): a run records the units it held the locks of (a stream of a source,
-- "twitter:user:jack", or a stream-less source, "mock"), so that a run whose units another run now holds is
-- known to be dead, and `status` can tell a live run by its locks. NULL for runs of earlier versions.
ALTER TABLE etl_runs ADD COLUMN units TEXT[];
