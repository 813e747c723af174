"""reenrich stamps what it scored with the current version, changed or not."""

from __future__ import annotations

import pytest


@pytest.mark.fault("reenrich after a threshold change stamps every row it scored: the next reenrich reads 0")
def test_reenrich_twice_after_a_threshold_change_reads_nothing_the_second_time(run_etl, db):
    assert run_etl("run", "--source", "mock").returncode == 0
    first = run_etl("reenrich", env={"SENTIMENT_THRESHOLD": "0.3"})
    assert first.returncode == 0, first.stderr
    assert "scored 40," in first.stdout
    changed = int(first.stdout.split("changed ")[1].split(",")[0])
    assert 0 < changed < 40, "some rows must keep their score for this test to mean anything"
    second = run_etl("reenrich", env={"SENTIMENT_THRESHOLD": "0.3"})
    assert second.returncode == 0, second.stderr
    assert "scored 0, changed 0, unchanged 0" in second.stdout
