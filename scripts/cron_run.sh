#!/usr/bin/env bash
# Cron wrapper: runs the archiver from the project directory with its venv, appends to a log file,
# and passes the exit code on (0 ok, 1 partial, 2 configuration, 75 another run holds the lock).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
LOG_FILE="${ETL_CRON_LOG:-logs/etl.log}"
mkdir -p "$(dirname "$LOG_FILE")"
PY="${ETL_PYTHON:-.venv/bin/python}"
# .env is read by the program itself (python-dotenv); nothing secret passes through this script's arguments.
{
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) start: etl.py $*"
  "$PY" etl.py "$@"
  code=$?
  # Perceptual hashes are a stage after loading (README, "Image fingerprints"): new images get theirs here.
  case "${1:-run}" in run | backfill | -*) fingerprint=yes ;; *) fingerprint=no ;; esac
  if [ "$code" -le 1 ] && [ "$fingerprint" = yes ]; then "$PY" etl.py fingerprint || true; fi
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit $code"
} >>"$LOG_FILE" 2>&1
exit "${code:-1}"
