#!/usr/bin/env python3
"""Entrypoint for cron and people: `python etl.py [run|backfill|reenrich|status|migrate] ...`."""

import gc
import sys

# Start-up (issue 16): the ~150 modules a command loads make objects that live as long as the process. No
# collection runs while they load, and gc.freeze() then sets them apart: no later collection (nor the one at
# exit, nor one in a forked scoring worker) walks them again. A tenth of a rerun's CPU with nothing new.
gc.disable()
# Batches (issue 16, round fifteen): a batch's posts, rows and JSON are thousands of containers, acyclic and freed
# together. At the default threshold (700) a 20,000-post run made about 270 collections, 50-76 ms of this process,
# each walking the batches in flight again; at 50,000 it makes one. Garbage in cycles stays until a pass, so it
# counts toward the threshold: at most 50,000 of its containers wait for one. Forked scoring workers inherit it.
gc.set_threshold(50_000, 10, 10)
try:
    from etl import prefork

    if prefork.wanted(sys.argv[1:]):  # reenrich: its scoring workers load the models while this process starts
        prefork.start()
    from etl.cli import main
finally:
    gc.freeze()
    gc.enable()

if __name__ == "__main__":
    sys.exit(main())
