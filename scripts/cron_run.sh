#!/usr/bin/env bash
# Cron wrapper: runs the archiver from the project directory with its venv, appends to a log file,
# and passes the exit code on (0 ok, 1 partial, 2 configuration, 75 another run holds the lock).
#
# Overlap on this host: `flock -n` on ETL_CRON_LOCK (default /tmp/social-archiver.lock). A second copy
# started while one runs does nothing, logs one line and exits 75, like a run that finds a source's
# advisory lock taken. -o: the lock is not inherited by the run's children (an embedded PostgreSQL
# started by the run must not hold it after the run ends).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
LOG_FILE="${ETL_CRON_LOG:-logs/etl.log}"
LOCK_FILE="${ETL_CRON_LOCK:-/tmp/social-archiver.lock}"
mkdir -p "$(dirname "$LOG_FILE")"
PY="${ETL_PYTHON:-.venv/bin/python}"
LOCKED_OUT=200  # flock's own code for "held by another"; the archiver never exits 200
# .env is read by the program itself (python-dotenv); nothing secret passes through this script's arguments.
{
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) start: etl.py $*"
  flock -n -o -E "$LOCKED_OUT" "$LOCK_FILE" "$PY" etl.py "$@"
  code=$?
  if [ "$code" -eq "$LOCKED_OUT" ]; then
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) another run holds $LOCK_FILE (flock -n): nothing done"
    code=75
  fi
  # Perceptual hashes are a stage after loading (README, "Image fingerprints"): new images get theirs here.
  case "${1:-run}" in run | backfill | -*) fingerprint=yes ;; *) fingerprint=no ;; esac
  # On N hosts (`run --shard K/N`) the host of shard 1 does it: the pass covers the whole archive, and N of them
  # would each read and hash every new image.
  previous=""
  for arg in "$@"; do
    case "$previous/$arg" in --shard/[0-9]*/* | */--shard=[0-9]*/*) shard="${arg#--shard=}" ;; esac
    case "${shard:-1/}" in 1/*) ;; *) fingerprint=no ;; esac
    previous="$arg"
  done
  if [ "$code" -le 1 ] && [ "$fingerprint" = yes ]; then "$PY" etl.py fingerprint || true; fi
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit $code"
} >>"$LOG_FILE" 2>&1
exit "${code:-1}"
