"""Leaving the process after SIGTERM without waiting for image downloads stalled past the grace."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)
WORKER_PREFIXES = ("images", "retry")  # the download pools of etl.run.archiver.Archiver


def stalled_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and t.name.startswith(WORKER_PREFIXES)]


def exit_now(code: int) -> None:
    """Flush what was written and end the process at once (os._exit): the interpreter would otherwise wait at
    exit for every download thread, however long a stalled host keeps it."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def leave_if_stalled(code: int) -> None:
    """After a stopped run: when downloads are still stuck (their images already recorded failed), leave now."""
    stuck = stalled_workers()
    if stuck:
        log.warning("leaving %d image download(s) behind that did not finish after the stop", len(stuck))
        exit_now(code)
