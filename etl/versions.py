"""An installed package's version, as importlib.metadata.version gives it, without importing importlib.metadata.

Every run records the sentiment scorer's version (textblob's and py3langid's) on the rows it decides, so it
asks for both at start-up. importlib.metadata imports the email package to read one header (about 10 ms of a
run's start-up, issue 16); here the `Version:` line of the package's `*.dist-info/METADATA` is read directly,
found the way importlib.metadata finds it (the first entry of sys.path holding a matching .dist-info).
Anything else (an .egg-info, a zip, a header it does not expect) is left to importlib.metadata itself.
"""

from __future__ import annotations

import functools
import os
import sys


def _normalized(name: str) -> str:
    """importlib.metadata's name normalization (PEP 503, '-' as '_'): re.sub(r"[-_.]+", "-", name).lower() with '_'
    for '-', without a regex (it runs on every .dist-info of site-packages)."""
    folded = name.lower().replace("-", "_").replace(".", "_")
    while "__" in folded:
        folded = folded.replace("__", "_")
    return folded


def version(name: str) -> str:
    """importlib.metadata.version(name); raises its PackageNotFoundError when `name` is not installed."""
    found = _from_dist_info(_normalized(name))
    if found is not None:
        return found
    from importlib.metadata import version as metadata_version

    return metadata_version(name)


def _from_dist_info(wanted: str) -> str | None:
    import importlib.machinery

    if any(hasattr(finder, "find_distributions") for finder in sys.meta_path if finder is not importlib.machinery.PathFinder):
        return None  # another finder may know distributions (importlib.metadata asks every one, in order)
    metadata = _first_metadata(tuple(sys.path)).get(wanted)
    return _metadata_version(metadata) if metadata else None


@functools.lru_cache(maxsize=4)
def _first_metadata(path: tuple[str, ...]) -> dict[str, str | None]:
    """Normalized name -> the METADATA of its first .dist-info on `path` (sys.path), or None where the answer is
    importlib.metadata's (an .egg-info or .egg first). Listed once for every package a run asks about; the listing
    stops at a zip or anything else that is not a plain directory, which importlib.metadata reads."""
    found: dict[str, str | None] = {}
    for entry in path:
        try:
            children = os.listdir(entry or ".")
        except FileNotFoundError:  # a path that is not there holds nothing, for importlib.metadata too
            continue
        except OSError:
            break
        for child in children:
            low = child.lower()
            if low.endswith((".dist-info", ".egg-info", ".egg")):
                name = _normalized(low.rpartition(".")[0].partition("-")[0])
                is_dist = low.endswith(".dist-info")
                found.setdefault(name, os.path.join(entry or ".", child, "METADATA") if is_dist else None)
    return found


def _metadata_version(path: str) -> str | None:
    """The Version header of a METADATA file as the email parser reads it (leading blanks and the line end
    dropped); None when unsure (no such header, a folded one, a line that is not a header)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = iter(file)
            for line in lines:
                key, colon, value = line.partition(":")
                if not colon or not line.strip():
                    return None
                if key.lower() == "version":
                    following = next(lines, "")
                    return None if following[:1] in (" ", "\t") else value.lstrip(" \t").rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None
    return None
