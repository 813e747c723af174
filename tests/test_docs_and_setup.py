"""The documented set-up matches the code: every setting documented, cron wrapper passes exit codes on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from etl.config import all_settings
from tests.conftest import ROOT


def test_every_setting_is_in_env_example_and_readme():
    env_example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for _, setting in all_settings():  # the core settings and every source's own
        name = setting.env
        assert f"# {name}=" in env_example, f"{name} missing from .env.example (run scripts/gen_env_example.py)"
        assert f"`{name}`" in readme, f"{name} missing from README's settings table"


def test_readme_starts_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make run" in head and "make test" in head


def test_crontab_runs_every_six_hours_through_the_wrapper():
    lines = [ln for ln in (ROOT / "crontab.example").read_text().splitlines() if ln and not ln.startswith("#")]
    schedule = [ln for ln in lines if "cron_run.sh" in ln]
    assert len(schedule) == 1
    minute, hour, *_ = schedule[0].split()
    assert minute.isdigit() and hour == "*/6"
    assert "scripts/cron_run.sh run" in schedule[0]  # the wrapper takes the flock (see test_operations_cron.py)


def test_cron_wrapper_logs_and_passes_the_exit_code_on(tmp_path: Path):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"args: $*\"\nexit 75\n")
    fake.chmod(0o755)
    log = tmp_path / "etl.log"
    env = {**os.environ, "ETL_PYTHON": str(fake), "ETL_CRON_LOG": str(log)}
    result = subprocess.run([str(ROOT / "scripts" / "cron_run.sh"), "run"], env=env, capture_output=True, text=True)
    assert result.returncode == 75
    text = log.read_text()
    assert "args: etl.py run" in text and "exit 75" in text
    assert result.stdout == "" and result.stderr == ""


def _junit(tmp_path: Path, cases: str) -> Path:
    report = tmp_path / "report.xml"
    report.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return report


def test_reliability_section_is_rendered_from_the_junit_report(tmp_path: Path):
    from scripts.reliability_readme import main

    case = '<testcase classname="tests.test_a" name="t{n}" file="tests/test_a.py">{body}</testcase>'
    prop = '<properties><property name="{kind}" value="{text}"/></properties>'
    report = _junit(tmp_path, "".join([
        case.format(n=1, body=prop.format(kind="fault", text="disk full")),
        case.format(n=2, body=prop.format(kind="fault", text="disk full")),
        case.format(n=3, body=prop.format(kind="badinput", text="a NUL byte")),
        case.format(n=4, body=""),
        case.format(n=5, body='<skipped message="x"/>'),
    ]))  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- reliability:start -->\nold\n<!-- reliability:end -->\ntail\n")
    assert main([str(report), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "**Faults injected: 2 cases in 1 kinds; survived: 2.**" in text
    assert "- disk full (2/2 cases ok; `tests/test_a.py`)" in text
    assert "**Bad inputs tried: 1 cases in 1 kinds" in text and "green run of 4 tests" in text
    assert "old" not in text and text.endswith("tail\n")
    assert main([str(report), "--readme", str(readme), "--check"]) == 0


def test_reliability_section_refuses_a_report_with_a_failure(tmp_path: Path):
    from scripts.reliability_readme import main

    report = _junit(tmp_path, '<testcase classname="a" name="t" file="a.py"><failure message="boom"/></testcase>')
    readme = tmp_path / "README.md"
    readme.write_text("<!-- reliability:start -->\nold\n<!-- reliability:end -->\n")
    assert main([str(report), "--readme", str(readme)]) == 2
    assert "old" in readme.read_text()
