"""Starting the embedded PostgreSQL (pgserver): stale handles of killed runs removed first, and, as root, the
folders above the data directory opened only as far as PostgreSQL's own user needs, and said so."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HANDLES = ".handle_pids.json"  # pgserver's list of the processes using a server; the last one out stops it
SYSTEM_USER = "pgserver"  # the user pgserver runs PostgreSQL as when we are root (PostgreSQL refuses root)


def start_server(pgdata: Path) -> Any:
    """pgserver.get_server(pgdata, cleanup_mode="stop"), after dropping the handles of dead processes."""
    import fasteners
    import pgserver
    from pgserver import postgres_server

    pgdata.mkdir(exist_ok=True)
    # pgserver serialises starts, its handle list and the last user's stop with a lock under $XDG_RUNTIME_DIR,
    # which cron has not (/tmp/runtime-UID) and a login shell has (/run/user/UID): a command typed by hand while
    # cron's last run stopped the server joined it and lost it. The lock is taken beside the data instead.
    lock = fasteners.InterProcessLock(str(pgdata.parent / ".pgserver.lock"))
    postgres_server.PostgresServer._lock = lock
    with lock:
        drop_stale_handles(pgdata)
    if os.geteuid() != 0:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        server._lock = lock  # its stop at exit: the same lock, whatever another server of this process set
        return server
    user_existed = _user_exists(SYSTEM_USER)
    opened: list[Path] = []
    widen = postgres_server.ensure_prefix_permissions
    # As root, pgserver adds r-x for group and others to every folder from the data directory up to /
    # (drwxr-xr-x). PostgreSQL's user only needs to pass through them: give it that where it cannot already,
    # and nothing more. pgserver calls this before starting the server, on every start.
    postgres_server.ensure_prefix_permissions = lambda path: opened.extend(make_traversable(path, SYSTEM_USER))
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        server._lock = lock
    finally:
        postgres_server.ensure_prefix_permissions = widen
    if not user_existed:
        log.warning("created the system user %r to run the embedded PostgreSQL (it refuses to run as root)", SYSTEM_USER)
    if opened:
        log.warning(
            "the embedded PostgreSQL runs as the system user %r, which must pass through the folders above its data:"
            " added search (x) permission for it to %s",
            SYSTEM_USER, ", ".join(str(p) for p in dict.fromkeys(opened)),
        )  # fmt: skip
    return server


def drop_stale_handles(pgdata: Path) -> list[int]:
    """Remove from pgserver's handle list the pids of processes that are gone (a run killed by SIGKILL never
    removes its own); returns the pids removed. With none left, the next run that ends stops the server."""
    path = pgdata / HANDLES
    try:
        text = path.read_text()
        written = path.stat().st_mtime
    except FileNotFoundError:
        return []
    try:
        pids = [int(p) for p in json.loads(text)]
    except (ValueError, TypeError):
        pids = []  # unreadable: pgserver would fail on it; every live user re-registers on its next start
    live = [pid for pid in pids if _running_since(pid, written)]
    if live != pids or not text.strip().startswith("["):
        path.write_text(json.dumps(live))
        stale = [pid for pid in pids if pid not in live]
        log.warning("removed %d stale handle(s) of the embedded PostgreSQL (pids %s ended without releasing it)",
                    len(stale), ", ".join(map(str, stale)) or "-")  # fmt: skip
        return stale
    return []


def _running_since(pid: int, written: float) -> bool:
    """True when `pid` is a live process that existed when the list was last written (not a reused pid)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= written + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def make_traversable(path: Path, user: str) -> list[Path]:
    """Give `user` (running with our groups) search permission on every folder above `path` where it has none;
    returns the folders changed."""
    import pwd

    entry = pwd.getpwnam(user)
    # pgserver starts initdb and postgres with subprocess's user= alone: the uid changes, the group and the
    # supplementary groups stay ours, so those are the groups that decide.
    groups = {os.getegid(), *os.getgroups()}
    changed = []
    for folder in Path(path).parents:
        info = folder.stat()
        if info.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            folder.chmod(stat.S_IMODE(info.st_mode) | bit)
            changed.append(folder)
    return changed


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
