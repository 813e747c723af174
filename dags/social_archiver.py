"""Apache Airflow 3 DAGs for the social archiver: `social_archiver` (every 6 hours) and `social_archiver_backfill`.

Put this file (or a link to it) in Airflow's dags folder on every worker, with this project importable
(`pip install -r requirements.txt -r requirements-airflow.txt` in the workers' environment and the project
folder on PYTHONPATH). Settings come from the workers' environment (or a .env in their working directory),
exactly as under cron. Each task runs the archiver in-process (etl.orchestrate) and maps how its run ended
onto Airflow's task states:

- complete -> success
- partial (images or items failed, a platform ended a stream with a 5xx or a rate limit; all recorded and
  picked up by the next run) -> success, with a warning in the task log
- a configuration error -> failed, without retries (AirflowFailException)
- the database or the object store unreachable, at start or mid-run -> failed, retried by Airflow
- every stream of the shard locked by another run -> skipped
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from etl import orchestrate
from etl.errors import ConfigError, ServiceUnavailable

log = logging.getLogger("social_archiver")

SCHEDULE = "17 */6 * * *"  # the minute of crontab.example
MAX_MAP_LENGTH = 1024  # Airflow's default [core] max_map_length: the most chunks one backfill DAG run maps
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=5)}


def _orchestrator() -> dict[str, object]:
    context = get_current_context()
    ti = context["ti"]
    return {"system": "airflow", "dag_id": ti.dag_id, "run_id": context["run_id"], "task_id": ti.task_id,
            "map_index": ti.map_index, "try_number": ti.try_number}  # fmt: skip


def _settle(outcome: orchestrate.Outcome) -> dict[str, object]:
    """An Outcome as Airflow's task state: complete/partial succeed (partial with a warning), locked skips."""
    if outcome.state == orchestrate.LOCKED:
        raise AirflowSkipException(outcome.message)
    if outcome.state == orchestrate.PARTIAL:
        log.warning("partial run %s (recorded; the next run picks the rest up): %s", outcome.run_id, outcome.message)
    else:
        log.info("run %s complete: %s", outcome.run_id, outcome.message)
    return outcome.as_dict()


def _configuration_fails(fn):
    """A configuration error fails the task at once (no retries); an unreachable service is retried."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServiceUnavailable:
            raise
        except ConfigError as exc:
            raise AirflowFailException(f"configuration error: {exc}") from exc

    return wrapped


@dag(
    dag_id="social_archiver",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"shards": Param(orchestrate.default_shards(), type="integer", minimum=1, maximum=MAX_MAP_LENGTH,
                            description="how many shards the run is cut into (default: ETL_SHARDS)")},  # fmt: skip
    tags=["social-archiver"],
    doc_md=__doc__,
)
def social_archiver():
    @task(retries=2)
    @_configuration_fails
    def prepare() -> dict:
        """Settings, services and migrations: a configuration error fails here, before any shard starts."""
        return orchestrate.prepare()

    @task
    @_configuration_fails
    def plan(prepared: dict) -> list[str]:
        shards = int(get_current_context()["params"]["shards"])
        planned = orchestrate.plan(shards)
        for entry in planned:
            log.info("shard %s: %s", entry["shard"], ", ".join(entry["units"]) or "(no work)")
        return [entry["shard"] for entry in planned]

    @task
    @_configuration_fails
    def archive(shard: str) -> dict:
        return _settle(orchestrate.archive_shard(shard, _orchestrator()))

    @task(trigger_rule="all_done")
    @_configuration_fails
    def retry_part(part: str) -> dict:
        """Failed images of earlier runs, part K of N by id, once the shards have run."""
        return _settle(orchestrate.retry_images(part, _orchestrator()))

    @task(trigger_rule="none_failed")  # a failed shard or part fails the DAG run; a skipped (locked) one does not
    def summary(results: list) -> dict:
        totals = orchestrate.summarize(get_current_context()["run_id"])
        log.info("DAG run totals: %s", totals)
        return totals

    shards = plan(prepare())
    archived = archive.expand(shard=shards)
    retried = retry_part.expand(part=shards)
    archived >> retried
    archived >> summary(retried)


@dag(
    dag_id="social_archiver_backfill",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    params={
        "source": Param("", type="string", description="the source to backfill (as in ETL_SOURCES)"),
        "since": Param("", type="string", description="start date, YYYY-MM-DD or ISO 8601"),
        "until": Param("", type="string", description="end date (exclusive)"),
        "chunk_days": Param(1.0, type="number", exclusiveMinimum=0, description="days per chunk"),
    },
    tags=["social-archiver"],
    doc_md=__doc__,
)
def social_archiver_backfill():
    @task
    @_configuration_fails
    def plan_chunks() -> list[int]:
        """The unfinished chunks, oldest first, at most max_map_length of them (trigger again for the rest)."""
        p = get_current_context()["params"]
        since, until = orchestrate.parse_date(p["since"]), orchestrate.parse_date(p["until"])
        return orchestrate.plan_backfill(p["source"], since, until, float(p["chunk_days"]), most=MAX_MAP_LENGTH)

    @task
    @_configuration_fails
    def archive_chunk(index: int) -> dict:
        p = get_current_context()["params"]
        since, until = orchestrate.parse_date(p["since"]), orchestrate.parse_date(p["until"])
        return _settle(orchestrate.archive_chunk(p["source"], since, until, float(p["chunk_days"]), index, _orchestrator()))

    archive_chunk.expand(index=plan_chunks())


social_archiver()
social_archiver_backfill()
