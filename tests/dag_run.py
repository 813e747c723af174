"""Runs one DAG of dags/ with Airflow's own dag.test() and prints what became of it (used by tests/test_dags.py).

    python tests/dag_run.py check                       # the DagBag: import errors and the DAGs' settings
    python tests/dag_run.py DAG_ID '{"shards": 3}'      # one DAG run; the last line is DAGRUN {json}

Airflow is configured by the caller's environment (AIRFLOW_HOME with a migrated SQLite metadata database);
the archiver's settings come from the environment as on a worker. Retries wait 1 s instead of 5 minutes.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _value(state: object) -> str:
    return str(getattr(state, "value", state))


def main(argv: list[str]) -> int:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    if argv[0] == "check":
        dags = {}
        for dag_id in bag.dag_ids:
            dag = bag.get_dag(dag_id)
            dags[dag_id] = {
                "schedule": str(getattr(dag.timetable, "summary", None) or getattr(dag, "schedule", None)),
                "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
                "params": {k: dag.params[k] for k in dag.params}, "tasks": sorted(dag.task_ids),
            }  # fmt: skip
        print("DAGBAG " + json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags}))
        return 0
    dag = bag.get_dag(argv[0])
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=1)
    run = dag.test(run_conf=json.loads(argv[1]) if len(argv) > 1 else None)
    tasks = [
        {"task_id": ti.task_id, "map_index": ti.map_index, "state": _value(ti.state), "try_number": ti.try_number}
        for ti in run.get_task_instances()
    ]
    print("DAGRUN " + json.dumps({"state": _value(run.state), "run_id": run.run_id, "tasks": tasks}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
