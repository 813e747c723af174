"""The error tree and the exit codes the command line turns a run's outcome into."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """What cron reads from the process: see DESIGN.md."""

    OK = 0
    PARTIAL = 1  # the run finished, some items failed (recorded, retried next run)
    CONFIG = 2  # bad configuration or usage; the message names the setting
    LOCKED = 75  # another run holds the lock (EX_TEMPFAIL); nothing done


class Outcome:
    """What a command's run ended as: `interrupted` (SIGTERM) wins, else `partial` when some items failed, else
    ok; the exit code follows. Each command's stats says what counts as partial, and what etl_runs records."""

    interrupted: bool

    @property
    def partial(self) -> bool:
        raise NotImplementedError

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "partial" if self.partial else "ok"

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.PARTIAL if self.interrupted or self.partial else ExitCode.OK

    def ledger(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        """What etl_runs records of the run; `redact` is applied to every error message."""
        raise NotImplementedError

    def add_error(self, message: str, *, first: bool = False) -> None:
        """One more problem, among those the summary and etl_runs report; `first`: it leads them, kept whatever
        number came before (etl_runs keeps the first 50 and names the first)."""
        raise NotImplementedError

    def locks_lost(self, why: str) -> None:
        """Its locks were lost and could not be taken again (LockWatch): stopped as on SIGTERM, saying `why` first."""
        self.interrupted = True
        self.add_error(why, first=True)

    @staticmethod
    def _into(messages: list[str], message: str, first: bool, kept: int | None = None) -> None:
        """add_error()'s list: `message` appended while fewer than `kept` are (None: no bound), or put first (the
        last one then dropped when `kept` are)."""
        if first:
            messages.insert(0, message)
            if kept is not None:
                del messages[kept:]
        elif kept is None or len(messages) < kept:
            messages.append(message)

    @staticmethod
    def problem_lines(problems: list[str], shown: int = 10) -> list[str]:
        """The summary's list of problems: how many, then the first `shown` (none when there are none)."""
        if not problems:
            return []
        return [f"  {len(problems)} problem(s), first ones:", *(f"    - {p}" for p in problems[:shown])]


class ETLError(Exception):
    """Base of every error the package raises on purpose."""

    exit_code = ExitCode.PARTIAL


class ConfigError(ETLError):
    """A setting is missing or malformed, or a service named by a setting cannot be used."""

    exit_code = ExitCode.CONFIG


class ServiceUnavailable(ConfigError):
    """A service named by a setting (the database, the object store) cannot be reached now; a later attempt may
    succeed. Still exit 2 for cron; an orchestrator retries it where it fails a task for a ConfigError."""


class UsageError(ConfigError):
    """The command line itself is wrong."""


class LockedError(ETLError):
    """Another run holds the lock for a source."""

    exit_code = ExitCode.LOCKED


class LocksLost(ETLError):
    """The connection holding a run's advisory locks was lost and they could not all be taken again (another run
    took a unit, a forget took the archive): the run stops as after a SIGTERM, writing nothing more (exit 1)."""


class SourceError(ETLError):
    """A source cannot go on for this run (quota, rate limit, token); what it yielded is kept."""


class RecordError(ETLError):
    """One input record is unusable; it is reported and skipped, the rest still load."""


class MediaError(ETLError):
    """One image could not be archived."""

    def __init__(self, message: str, *, permanent: bool = False, requested: bool = True):
        super().__init__(message)
        self.permanent = permanent  # 404/410, not an image, over the cap: retrying will not help
        self.requested = requested  # False: refused before any request (this configuration's): no attempt counted


class StoreError(ETLError):
    """The object store refused or failed a write."""


class LoadError(ETLError):
    """The database refused a batch."""
