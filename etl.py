#!/usr/bin/env python3
"""Entrypoint for cron and people: `python etl.py [run|backfill|reenrich|status|migrate] ...`."""

import sys

from etl.cli import main

if __name__ == "__main__":
    sys.exit(main())
