"""Copies made from files of installed packages, kept between runs in $XDG_CACHE_HOME/social-archiver: py3langid's
model unpacked (etl/language.py) and TextBlob's lexicon parsed (etl/enrich.py), so that no run pays for either again.

A copy is a folder named after its family, the package's version and the file it was made from (size and
modification time: a package installed again or changed gets a copy of its own). It is made whole or not at all,
and records the path of that file, and of every other file of the same size and time that it served (installs that
share a file, hard-linked by uv, share its copy). When a copy is made, the copies of its family none of whose files
is still there unchanged (a virtualenv made again, an upgrade) are removed, as are the half-made folders of builders
killed over an hour ago: before, every fresh install left a copy of the model (66 MB) behind for good. The copies of
an install that is still there are kept, whatever else uses the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE = "source.txt"  # in each copy: the paths of the files it serves, one a line
_BUILDING = ".building-"
_ABANDONED_AFTER = 3600.0  # seconds: a half-made copy this old was left by a builder that died


def cache_root() -> Path:
    """$XDG_CACHE_HOME/social-archiver (default ~/.cache/social-archiver)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "social-archiver"


def _stamp(source: Path) -> str:
    st = source.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def copy_folder(family: str, version: str, source: Path) -> Path:
    """Where the copy made from `source` (of `version` of the package) is kept, whether or not it is there yet."""
    return cache_root() / f"{family}-{version}-{_stamp(source)}"


def used(folder: Path, source: Path) -> None:
    """Record that the copy in `folder` serves `source` (read from it just now), unless it does already: a copy is
    kept while any file it serves is there. Nothing is raised (a cache that cannot be written is only slower)."""
    try:
        line = os.fsencode(source.resolve())
        with open(folder / SOURCE, "a+b") as record:
            record.seek(0)
            if line not in record.read().split(b"\n"):
                record.write(b"\n" + line)
    except OSError as exc:
        log.debug("could not record %s as using %s: %s", source, folder, exc)


def read_copy(
    family: str, version: str, source: Path, read: Callable[[Path], T], damaged: tuple[type[Exception], ...]
) -> T | None:
    """read(folder) of the copy made from `source`, which is then recorded as used; None when there is none to read
    (the caller makes it: make_copy). A copy missing a file (an rmtree killed half-way), one read() finds damaged
    (raises one of `damaged`: a checksum, a hand edit) or one that cannot be read is removed first, so that it is
    made anew; only a damaged one is warned of (a cache that cannot be read is only slower)."""
    try:
        folder = copy_folder(family, version, source)
    except OSError as exc:  # the source is gone: nothing names a copy
        log.debug("no copy of %s to read: %s", source, exc)
        return None
    try:
        value = read(folder)
    except FileNotFoundError:  # not made yet; or made, and a file of it lost since
        if folder.is_dir():
            log.debug("the copy in %s lacks a file: made again", folder)
            shutil.rmtree(folder, ignore_errors=True)
        return None
    except damaged as exc:
        log.warning("the copy kept in %s is damaged (%s): made again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    except OSError as exc:  # not a folder, no permission, a disk error
        log.debug("the copy in %s cannot be read: %s", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    used(folder, source)
    return value


def make_copy(family: str, version: str, source: Path, fill: Callable[[Path], None]) -> Path | None:
    """Make the copy of `source`: fill(folder) writes its files into a new folder, which then takes its name. None
    when it cannot be kept (the cache is not writable, or full, or another process made it first); stale copies of
    the family are removed once it is in place."""
    folder = building = None
    try:
        folder = copy_folder(family, version, source)
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=_BUILDING, dir=folder.parent))
        fill(building)
        (building / SOURCE).write_bytes(os.fsencode(source.resolve()))
        building.rename(folder)  # whole or not at all
        building = None
    except OSError as exc:  # (the source gone too: nothing to name the copy after)
        log.debug("%s not kept in %s: %s", family, folder or cache_root(), exc)
        return None
    finally:
        if building is not None:
            shutil.rmtree(building, ignore_errors=True)
    prune(family)
    return folder


def prune(family: str) -> list[str]:
    """Remove the copies of `family` none of whose files is still there unchanged (or that record none: made before
    copies did), and half-made copies abandoned over an hour ago; return their names."""
    removed = []
    try:
        entries = list(os.scandir(cache_root()))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if name.startswith(_BUILDING):
            stale = _age(entry, now) > _ABANDONED_AFTER
        elif name.startswith(f"{family}-"):
            stale = not _source_there(Path(entry.path), name)
        else:
            continue
        if stale and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d stale cached cop%s: %s", len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def _age(entry: os.DirEntry, now: float) -> float:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _source_there(folder: Path, name: str) -> bool:
    """Whether a file `folder` serves is still there, unchanged (its size and time end the name)."""
    try:
        recorded = (folder / SOURCE).read_bytes().split(b"\n")
    except OSError:
        return False
    for line in recorded:
        try:
            if line and name.endswith(f"-{_stamp(Path(os.fsdecode(line)))}"):
                return True
        except (OSError, ValueError):
            continue
    return False
