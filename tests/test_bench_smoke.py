"""The benchmark runs end to end and prints its tables (its figures are read by people, not asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def quick_bench(tmp_path, scenarios: str) -> subprocess.CompletedProcess:
    """`make bench ARGS="--quick --only SCENARIOS"`, which must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--only", scenarios],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bench_quick_runs_and_prints_the_table(tmp_path):
    result = quick_bench(tmp_path, "ceiling,growth")
    out = result.stdout
    for line in ("ours: etl.py run, median of 2", "S3 ceiling, median of 3", "serial baseline", "rerun, nothing new",
                 "ours / S3 ceiling (median of 2)", "what separates this from a benchmark", "ours: 10,000 posts",
                 "peak RSS at 10,000", "Summary: every target"):  # fmt: skip
        assert line in out, line
    assert "0 image requests, 0 PUTs" in out
    # The floor of a rerun (scripts/bench/floor.py) ran on the rerun's archive and found every post and image held.
    floor = re.search(r"floor \(python, psycopg2, 2 lookups\)(?:, median of \d+)? +[\d.]+% of first .*?(\d+) posts read, (\d+) held, "
                      r"(\d+) images held; ours adds -?\d+ ms", out)  # fmt: skip
    assert floor, out
    read, held, images = map(int, floor.groups())
    assert read == held > 0 and images >= held
    # The same floor after loading the modules not ours that a rerun of ours loaded (listed by that rerun).
    loaded = re.search(r"floor \+ (\d+) modules not ours(?:, median of \d+)? +[\d.]+% of first .*?"
                       r"(\d+) posts read, (\d+) held, \d+ images held, (\d+) modules loaded first; ours adds", out)  # fmt: skip
    assert loaded, out
    listed, read_again, held_again, imported = map(int, loaded.groups())
    assert listed == imported > 50 and read_again == held_again == read
    assert "every service stopped" in out + result.stderr
    # The summary repeats every target of each scenario that ran, and no other scenario.
    summary = out.split("Summary: every target", 1)[1]
    assert summary.count("\nceiling ") == 4 and summary.count("\ngrowth ") == 2
    assert "\nimages " not in summary


@pytest.mark.slow
def test_bench_quick_reenrich_scores_both_archives_and_drops_databases_after_use(tmp_path):
    result = quick_bench(tmp_path, "metadata,reenrich")
    summary = result.stdout.split("Summary: every target", 1)[1]
    for line in ("reenrich of 2,000 (every caption scored again)", "reenrich of 5,000 (every caption scored again)",
                 "peak RSS re-scoring 5,000 / 2,000"):  # fmt: skip
        assert line in summary, line
    assert "ours: another scorer, 5,000 stored posts" in result.stdout
    assert "5,000 read" in result.stdout  # every post of the larger archive re-scored
    # The work of ours' first run: its CPU and PostgreSQL's, and the tables it keeps, counted (first counts on the
    # posts' rows: no history rows, sql/014).
    work = re.search(r"its work: CPU, and the tables it keeps +([\d.]+) CPU-s +etl\.py \(its scoring worker included\) "
                     r"([\d.]+) s, PostgreSQL ([\d.]+) s; keeps social_posts 2,000 \(5 indexes\); "
                     r"(\w+) (\d+) \(.*?\); (\d+) rows in \d+ more", result.stdout)  # fmt: skip
    assert work, result.stdout
    total, etl, postgres, rest = float(work[1]), float(work[2]), float(work[3]), int(work[6])
    assert etl > 0 and postgres > 0 and abs(total - etl - postgres) <= 0.011 and rest > 0
    assert work[4] != "post_engagement_changes" and int(work[5]) < 2_000, work[0]
    if "dlt (csv): first run" in result.stdout:  # (dlt installed: requirements-bench.txt)
        assert re.search(r"dlt [\d.]+ s, PostgreSQL [\d.]+ s; keeps dlt_bench_csv\.posts 2,000 ", result.stdout)
    # Each scenario's databases are dropped when it ends, but the archive reenrich re-scores, dropped after it.
    prefix = "bench: databases dropped: "
    dropped = [line.removeprefix(prefix).split(", ") for line in result.stderr.splitlines() if line.startswith(prefix)]
    # (dlt's databases, when dlt is installed, are dropped after metadata: the shared archive is not among them.)
    assert dropped and set(dropped[-1]) == {"metadata_0", "reenrich_large"}, result.stderr[-3000:]
    assert all("metadata_0" not in names for names in dropped[:-1])


@pytest.mark.badinput("make bench ARGS=\"--only\" with a mistyped scenario: exit 2 naming it and the valid names")
def test_bench_refuses_an_unknown_scenario(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--only", "images,nonesuch"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown scenario nonesuch" in result.stderr
