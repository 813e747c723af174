"""The benchmark waits, on ext4 without a journal, until earlier deletions stop slowing the files it creates."""

from __future__ import annotations

import os

import pytest

from scripts.bench import measure


def settle(monkeypatch, tmp_path, costs: list[float], *, journal_less: bool = True, timeout: float = 60.0):
    """settle_files with these probe results in turn; (its note, the probes made, the sleeps asked for)."""
    monkeypatch.setattr(measure, "ext4_without_journal", lambda path: journal_less)
    made, slept = [], []

    def probe(where):
        assert where == tmp_path
        made.append(costs[len(made)])
        return made[-1]

    note = measure.settle_files(tmp_path, timeout=timeout, every=10.0, probe=probe, sleep=slept.append)
    return note, made, slept


def test_a_quiet_file_system_is_probed_twice_and_not_waited_for(monkeypatch, tmp_path):
    assert settle(monkeypatch, tmp_path, [20.0, 30.0]) == ("", [20.0, 30.0], [])


def test_slow_creates_are_waited_out_until_two_quiet_probes_in_a_row(monkeypatch, tmp_path):
    note, made, slept = settle(monkeypatch, tmp_path, [110.0, 90.0, 30.0, 70.0, 25.0, 20.0])
    assert made == [110.0, 90.0, 30.0, 70.0, 25.0, 20.0]
    assert slept == [10.0] * 5  # once waiting, each probe 10 s after the one before, quiet or not
    assert note.startswith("waited 50 s for the file system to settle")
    assert "110, 90, 30, 70, 25, 20" in note


def test_a_quiet_probe_then_a_slow_one_at_the_start_is_waited_out(monkeypatch, tmp_path):
    note, made, slept = settle(monkeypatch, tmp_path, [30.0, 100.0, 40.0, 50.0])
    assert (made, slept) == ([30.0, 100.0, 40.0, 50.0], [10.0, 10.0]) and note.startswith("waited 20 s")


def test_a_file_system_that_never_settles_is_reported_not_waited_for_forever(monkeypatch, tmp_path):
    note, made, slept = settle(monkeypatch, tmp_path, [100.0] * 10, timeout=30.0)
    assert slept == [10.0, 10.0, 10.0] and len(made) == 4
    assert note.startswith("FILE SYSTEM NOT SETTLED after 30 s") and "figures that create files are low" in note


def test_no_wait_asked_still_says_the_file_system_was_slow(monkeypatch, tmp_path):
    note, made, slept = settle(monkeypatch, tmp_path, [100.0], timeout=0.0)
    assert (made, slept) == ([100.0], []) and note.startswith("FILE SYSTEM NOT SETTLED after 0 s")


def test_other_file_systems_are_not_probed(monkeypatch, tmp_path):
    assert settle(monkeypatch, tmp_path, [], journal_less=False) == ("", [], [])


def test_the_probe_creates_a_folder_with_a_file_as_an_image_is_stored_and_keeps_them(tmp_path):
    cost = measure.create_cost_us(tmp_path, folders=50)
    (top,) = tmp_path.iterdir()
    folders = list(top.iterdir())
    assert cost > 0 and len(folders) == 50  # kept: deleting them would free inodes
    assert all([f.name for f in folder.iterdir()] == ["f"] for folder in folders)


def test_a_file_system_without_a_block_device_is_not_ext4():
    assert measure.ext4_without_journal("/proc") is False


@pytest.mark.parametrize(("journal_task", "expected"), [("<none>\n", True), ("812\n", False), (None, False)])
def test_the_journal_is_read_from_the_device_of_the_path(tmp_path, journal_task, expected):
    """A sysfs of our own: dev/block/MAJ:MIN links to the device, fs/ext4/DEVICE/journal_task says its journal
    (absent: not ext4)."""
    st = os.stat(tmp_path)
    sysfs = tmp_path / "sys"
    (sysfs / "devices" / "block" / "vdz").mkdir(parents=True)
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}").symlink_to(sysfs / "devices" / "block" / "vdz")
    if journal_task is not None:
        (sysfs / "fs" / "ext4" / "vdz").mkdir(parents=True)
        (sysfs / "fs" / "ext4" / "vdz" / "journal_task").write_text(journal_task, encoding="ascii")
    assert measure.ext4_without_journal(tmp_path, sysfs=sysfs) is expected


def test_the_benchmark_refuses_a_negative_wait(capsys):
    from scripts.bench.__main__ import parse_args

    assert parse_args([]).settle_timeout == measure.SETTLE_TIMEOUT_S and parse_args(["--quick"]).settle_timeout == 0
    with pytest.raises(SystemExit):
        parse_args(["--settle-timeout", "-1"])
    assert "--settle-timeout must not be negative" in capsys.readouterr().err
