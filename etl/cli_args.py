"""The arguments of a plain `run`, read without argparse (issue 16: argparse, its gettext and the parser cost a
rerun with nothing new more than its work).

Only command lines whose every word is certain are read here: the run options written out in full, each value
plain (not one argparse could take for an option). Anything else (help, an abbreviation, an unknown or
misspelled option, a bad value) returns None, and argparse reads it as always: its answers and its errors stay
the only ones. tests/test_cli.py compares the two on many command lines.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from etl.errors import UsageError
from etl.shards import Shard

GLOBAL = {"--log-format": ("text", "json"), "--log-level": ("DEBUG", "INFO", "WARNING", "ERROR")}
# The `run` options: what each one takes (None: a flag).
RUN: dict[str, Any] = {"--source": str, "--limit": int, "--dry-run": None, "--input": str, "--shard": Shard.parse}


def _plain(value: str) -> bool:
    """A word argparse takes as an option's value wherever it stands: not one starting with '-' (but '-' itself)."""
    return not value.startswith("-") or value == "-"


def quick_run_args(args: list[str]) -> SimpleNamespace | None:
    """The namespace argparse gives for `[global options] run [run options]` (the same attributes, in the same
    order), or None when argparse must read these arguments."""
    found: dict[str, Any] = {"log_format": None, "log_level": None}
    run: dict[str, Any] = {"sources": None, "limit": None, "dry_run": False, "input": None, "shard": None}
    seen_run = False
    i = 0
    while i < len(args):
        word = args[i]
        if word == "run" and not seen_run:
            seen_run, i = True, i + 1
            continue
        option, equals, value = word.partition("=")
        if option in GLOBAL or (seen_run and option in RUN and RUN[option] is not None):
            if not equals:
                if i + 1 >= len(args) or not _plain(args[i + 1]):
                    return None
                value, i = args[i + 1], i + 1
            elif not value:
                return None
            if option in GLOBAL:
                if value not in GLOBAL[option]:
                    return None
                found[option[2:].replace("-", "_")] = value
            elif option == "--source":
                run["sources"] = [*(run["sources"] or []), value]
            else:
                try:
                    run[option[2:]] = RUN[option](value)
                except (ValueError, UsageError):
                    return None
        elif seen_run and word == "--dry-run":
            run["dry_run"] = True
        else:
            return None
        i += 1
    if not seen_run:
        return None
    return SimpleNamespace(**found, command="run", **run)
