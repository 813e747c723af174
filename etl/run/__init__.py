"""The run, in named stages. Which file holds what:

- services.py  build_sources (the one place sources are built), open_services (store checked, database migrated)
- archiver.py  Archiver: a stream of posts, batch by batch, plan -> enrich -> images -> load; a dry run is the
               same archiver with no database and no store
- runner.py    Runner: locks and the ledger around a run, each source walked by a strategy (Incremental,
               Backfill, DryRun); RunRequest
- stats.py     RunStats and StageClock (the metrics file is written by etl/metrics.py)
"""
