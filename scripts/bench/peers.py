"""The tools users would otherwise reach for, run as users run them: gallery-dl (images) and dlt (metadata).

Both come from requirements-bench.txt (`make bench` installs it); each is timed from process start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.measure import timed
from scripts.bench.services import PYTHON

# A dlt pipeline as a user would write it: a resource over the jsonl lines, merged on the natural key.
DLT_SCRIPT = """
import json, sys, dlt
path, dsn, fmt, pipelines = sys.argv[1:5]
# pgserver's URI names no host (a Unix socket directory in ?host=); dlt wants a host, libpq takes the query's.
dsn = dsn.replace("@/", "@localhost/", 1)

@dlt.resource(name="posts", primary_key=("platform", "post_id"), write_disposition="merge")
def posts():
    # Pages of items, as dlt's performance guide advises (a list per yield, not one item): its fastest extract.
    with open(path, encoding="utf-8") as f:
        page = []
        for line in f:
            page.append(json.loads(line))
            if len(page) == 1000:
                yield page
                page = []
        if page:
            yield page

pipeline = dlt.pipeline(pipeline_name="peer_" + fmt, destination=dlt.destinations.postgres(dsn),
                        dataset_name="dlt_bench_" + fmt, pipelines_dir=pipelines, progress=None)
kwargs = {} if fmt == "insert_values" else {"loader_file_format": fmt}
info = pipeline.run(posts(), **kwargs)
info.raise_on_failed_jobs()
"""

# dlt at its best here, both settings its own documented configuration (read from the environment):
# - not in Airflow, so no Airflow secrets lookups: with Airflow installed in the same environment (make test puts it
#   in .venv) dlt asks Airflow's Variables for its secrets at every configuration lookup, 2.4 s of a 20,000-post run;
# - no gzip of its intermediate files ("disable compression", its performance guide): 0.5 s of CPU.
# Measured here on 20,000 posts: 5.0-5.2 s with neither, 2.3-2.5 s without the lookups, 1.6-1.8 s with both.
DLT_TUNING = {"PROVIDERS__ENABLE_AIRFLOW_SECRETS": "false", "DATA_WRITER__DISABLE_COMPRESSION": "true"}

GALLERY_DL = [PYTHON, "-m", "gallery_dl", "--config-ignore", "--no-part", "--no-mtime"]


@dataclass
class PeerRun:
    """One peer's run: wall seconds from process start, its (worst) exit code, and its processes' CPU seconds."""

    wall: float
    returncode: int
    cpu: float = 0.0


def missing() -> list[str]:
    """The peers that are not installed (pip install -r requirements-bench.txt)."""
    import importlib.util

    return [name for name in ("gallery_dl", "dlt") if importlib.util.find_spec(name) is None]


def gallery_dl(urls: list[str], directory: Path, processes: int, tmp: Path) -> PeerRun:
    """gallery-dl from a URL list into `directory` (its directlink extractor), split over `processes` processes
    (its maintainers' advice for parallel downloads; 1 = as shipped)."""
    commands, logs = [], []
    for k in range(processes):
        part = tmp / f"urls-{processes}-{k}.txt"
        part.write_text("\n".join(urls[k::processes]) + "\n")
        commands.append([*GALLERY_DL, "--input-file", str(part), "--directory", str(directory)])
        logs.append(tmp / f"gallery-dl-{processes}-{k}.log")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    return PeerRun(*timed(commands, env, logs, tmp))


def dlt(posts_path: Path, dsn: str, fmt: str, label: str, tmp: Path) -> PeerRun:
    """dlt's merge of the jsonl lines into PostgreSQL (`fmt`: its loader file format, insert_values or csv)."""
    script = tmp / "dlt_peer.py"
    script.write_text(DLT_SCRIPT)
    env = {**os.environ, **DLT_TUNING, "RUNTIME__LOG_LEVEL": "WARNING", "DLT_DATA_DIR": str(tmp / "dlt-data")}
    command = [PYTHON, str(script), str(posts_path), dsn, fmt, str(tmp / "dlt-pipelines")]
    return PeerRun(*timed([command], env, [tmp / f"{label}.log"], tmp))


def dlt_table(fmt: str) -> str:
    return f"dlt_bench_{fmt}.posts"
