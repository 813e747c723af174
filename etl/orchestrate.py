"""The archiver's work as tasks for an orchestrator (Apache Airflow's DAGs in dags/), with no Airflow import.

Each function runs in-process through the same Runner as the command line, records the orchestrator's run id
and map index in etl_runs (`arguments.orchestrator`), and returns an Outcome: what ended the work, not an
exit code, so that the DAG can tell a partial run (success with a warning) from a configuration error (fail,
no retries), an unreachable service (fail, retried) and a shard whose every stream was locked (skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from etl.config import Settings, load_settings
from etl.db import Ledger
from etl.errors import ConfigError, LockedError
from etl.run.runner import Runner, RunRequest, backfill_chunks, state_key
from etl.run.services import build_sources, open_services
from etl.shards import Shard, plan_shards, units_of

log = logging.getLogger(__name__)

COMPLETE, PARTIAL, LOCKED = "complete", "partial", "locked"


@dataclass(frozen=True)
class Outcome:
    """How one task's run ended: complete, partial (recorded, picked up next run) or locked (nothing done)."""

    state: str
    run_id: int | None = None
    status: str = ""
    message: str = ""
    counts: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "run_id": self.run_id, "status": self.status, "message": self.message,
                "counts": dict(self.counts)}  # fmt: skip


def default_shards() -> int:
    """ETL_SHARDS from the environment, for the DAG's param (1 when it cannot be read at parse time)."""
    try:
        return settings_from_environment().shards
    except Exception:  # the DAG file must import even where the settings are broken; prepare will say why
        return 1


def parse_date(text: str) -> datetime:
    """YYYY-MM-DD or ISO 8601 (naive means UTC), as on the command line; ConfigError naming the value otherwise."""
    import argparse

    from etl.cli import parse_date as parse_cli_date

    try:
        return parse_cli_date(str(text))
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(str(exc)) from None
def settings_from_environment() -> Settings:
    """The workers' settings: their environment and a .env in the working directory, as for cron."""
    return load_settings(None, dotenv_path=".env")


def prepare(settings: Settings | None = None) -> dict[str, Any]:
    """Check every configured source's settings, the object store and the database, and migrate it.

    A configuration error raises ConfigError here, before any shard starts.
    """
    settings = settings or settings_from_environment()
    if not settings.sources:
        raise ConfigError("ETL_SOURCES is not set: the workers need the list of sources to archive")
    sources = build_sources(settings, RunRequest(sources=list(settings.sources)))
    db, _ = open_services(settings)
    db.close()
    return {"sources": [s.name for s in sources], "shards": settings.shards}


def plan(shards: int, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The run's work as `shards` shards: [{"shard": "K/N", "units": ["youtube:channel:UC...", ...]}, ...]."""
    settings = settings or settings_from_environment()
    sources = build_sources(settings, RunRequest(sources=list(settings.sources)))
    return [
        {"shard": str(shard), "units": [unit.name for unit in units]} for shard, units in plan_shards(sources, shards)
    ]


def _execute(settings: Settings, request: RunRequest, orchestrator: Mapping[str, Any] | None) -> Outcome:
    request.arguments = {**request.arguments, "orchestrator": dict(orchestrator or {})}
    runner = Runner(settings)
    try:
        stats = runner.execute(request)
    except LockedError as exc:
        return Outcome(LOCKED, message=str(exc))
    finally:
        runner.close()
    counts = {"posts_fetched": stats.fetched, "posts_inserted": stats.inserted, "posts_updated": stats.updated,
              "images_stored": stats.images_stored, "images_failed": stats.images_failed,
              "locked_streams": list(stats.locked_streams)}  # fmt: skip
    if stats.status == "ok":
        return Outcome(COMPLETE, runner.run_id, stats.status, stats.summary_line(), counts)
    problems = "; ".join(stats.errors[:5]) or stats.status
    return Outcome(PARTIAL, runner.run_id, stats.status, f"{stats.summary_line()} | {problems}", counts)


def archive_shard(
    shard: str, orchestrator: Mapping[str, Any] | None = None, settings: Settings | None = None
) -> Outcome:
    """Shard K/N of an incremental run of the configured sources (its failed-image part is a separate task)."""
    settings = settings or settings_from_environment()
    request = RunRequest(mode="run", sources=list(settings.sources), shard=Shard.parse(shard), retry_images=False,
                         arguments={"shard": shard})  # fmt: skip
    return _execute(settings, request, orchestrator)


def retry_images(part: str, orchestrator: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Outcome:
    """Part K/N of the failed images of earlier runs (by id modulo N), and nothing else."""
    settings = settings or settings_from_environment()
    request = RunRequest(mode="run", sources=[], shard=Shard.parse(part), retry_images=True,
                         arguments={"retry_part": part})  # fmt: skip
    return _execute(settings, request, orchestrator)


def _chunks(since: datetime, until: datetime | None, chunk_days: float) -> list[tuple[datetime, datetime]]:
    return backfill_chunks(since, until or datetime.now(timezone.utc), timedelta(days=chunk_days))


def plan_backfill(
    source: str, since: datetime, until: datetime | None, chunk_days: float, *, most: int,
    settings: Settings | None = None,
) -> list[int]:  # fmt: skip
    """The indices of the chunks not yet finished, oldest first, at most `most` of them (a DAG run's share)."""
    settings = settings or settings_from_environment()
    (built,) = build_sources(settings, RunRequest(sources=[source]))
    chunks = _chunks(since, until, chunk_days)
    db, _ = open_services(settings, check_store=False)
    try:
        done = [
            Ledger(db).finished_chunks(built.name, state_key(built, unit), chunks[0][0], chunks[-1][1]) for unit in units_of(built)
        ] if chunks else []  # fmt: skip
    finally:
        db.close()
    todo = [n for n, chunk in enumerate(chunks) if not all(chunk in finished for finished in done)]
    if len(todo) > most:
        log.warning(
            "backfill %s: %d chunks left; this DAG run takes the first %d (Airflow's max_map_length); trigger it "
            "again for the rest", source, len(todo), most,
        )  # fmt: skip
    return todo[:most]


def archive_chunk(
    source: str, since: datetime, until: datetime | None, chunk_days: float, index: int,
    orchestrator: Mapping[str, Any] | None = None, settings: Settings | None = None,
) -> Outcome:  # fmt: skip
    """One chunk of a backfill (0-based index into its chunks); a finished chunk is recorded and skipped later."""
    settings = settings or settings_from_environment()
    if until is None:
        raise ConfigError("a backfill over workers needs an explicit until, so every worker cuts the same chunks")
    request = RunRequest(mode="backfill", sources=[source], since=since, until=until,
                         chunk=timedelta(days=chunk_days), chunk_index=index,
                         arguments={"since": since.isoformat(), "until": until.isoformat(),
                                    "chunk_days": chunk_days, "chunk_index": index})  # fmt: skip
    return _execute(settings, request, orchestrator)


def summarize(orchestrator_run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Totals over the ledger rows of one orchestrator run (every shard and retry part it recorded)."""
    settings = settings or settings_from_environment()
    db, _ = open_services(settings, check_store=False)
    try:
        return Ledger(db).orchestrator_totals(orchestrator_run_id)
    finally:
        db.close()
