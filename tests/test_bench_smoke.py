"""The benchmark runs end to end and prints its table (its figures are read by people, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_quick_runs_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--no-profile"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("ours: etl.py run", "S3 ceiling", "serial baseline", "rerun, nothing new", "ours / S3 ceiling"):
        assert line in result.stdout
    assert "0 image requests, 0 PUTs" in result.stdout
    assert "every service stopped" in result.stdout + result.stderr
