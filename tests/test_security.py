"""Security: SQL always parameterized, secrets never in output, the ledger or the status report."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, query
from tests.support import s3_env

SQL_CALLS = {"execute", "executemany", "execute_values", "mogrify"}


def sql_argument_problems(path: Path) -> list[str]:
    """Calls that hand SQL to the driver built from something other than literals or module constants."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.lstrip("_").isupper()
    }
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in SQL_CALLS:
            continue
        receiver = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        if name == "execute" and receiver not in ("cur", "scan", "cursor"):
            continue  # runner.execute, request.execute: not SQL
        args = node.args[1:] if name == "execute_values" else node.args
        if not args:
            continue
        sql = args[0]
        ok = (
            (isinstance(sql, ast.Constant) and isinstance(sql.value, str))
            or (isinstance(sql, ast.Name) and sql.id in constants)
            # migrations: the text of our own sql/ files
            or (isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "read_text")
        )
        if not ok:
            problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: SQL built at run time ({ast.unparse(sql)[:80]})")
    return problems


def test_every_sql_statement_is_a_literal_or_a_module_constant_with_parameters():
    problems = [p for path in sorted((ROOT / "etl").rglob("*.py")) for p in sql_argument_problems(path)]
    assert problems == []


def test_the_sql_check_catches_string_built_sql(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cur, name):\n    cur.execute(f"SELECT * FROM t WHERE name = \'{name}\'")\n')
    bad_rel = ROOT / "etl" / "_probe_bad.py"
    bad_rel.write_text(bad.read_text())
    try:
        assert len(sql_argument_problems(bad_rel)) == 1
    finally:
        bad_rel.unlink()


@pytest.mark.fault("a DEBUG run with every secret in use: none appears in output, etl_runs or status")
def test_no_secret_reaches_output_ledger_or_status(db, run_etl, moto_s3):
    proxy, client = moto_s3
    password = "pg-pass-Zq81x"
    with db.transaction() as cur:
        cur.execute("DROP ROLE IF EXISTS archiver_test")
        cur.execute(f"CREATE ROLE archiver_test LOGIN SUPERUSER PASSWORD '{password}'")  # a test literal
    dsn = db.dsn.replace("postgres:@", f"archiver_test:{password}@")
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "aws-Secret-7fQ2",
        "YOUTUBE_API_KEY": "AIzaSy-secret-youtube-3k",
        "TWITTER_BEARER_TOKEN": "AAAA-secret-bearer-9p",
        "INSTAGRAM_ACCESS_TOKEN": "EAAG-secret-ig-4m",
    }
    env = {**s3_env(proxy), **secrets, "DATABASE_URL": dsn, "ETL_LOG_LEVEL": "DEBUG", "MOCK_POSTS": "8"}
    outputs = []
    for args in (("run", "--source", "mock"), ("status",), ("status", "--json"), ("reenrich",)):
        result = run_etl(*args, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "DEBUG" in outputs[0]  # it really was a debug-level run
    ledger = json.dumps(query(db.dsn, "SELECT * FROM etl_runs"), default=str)
    for secret in [password, *secrets.values()]:
        for text in (*outputs, ledger):
            assert secret not in text
    assert len(list(client.list_objects_v2(Bucket="archive-test").get("Contents", []))) > 0


@pytest.mark.fault("a DATABASE_URL password holding '#' or '?' (urlsplit ends the host there, libpq does not): never shown")
@pytest.mark.parametrize("password", ["pg#pass-Zq81x", "pg?pass-Zq81x"])
def test_a_database_password_with_a_hash_or_question_mark_is_never_shown(db, run_etl, password):
    with db.transaction() as cur:
        cur.execute("DROP ROLE IF EXISTS archiver_odd")
        cur.execute("CREATE ROLE archiver_odd LOGIN SUPERUSER PASSWORD %s", (password,))
    dsn = db.dsn.replace("postgres:@", f"archiver_odd:{password}@")
    assert dsn != db.dsn
    env = {"DATABASE_URL": dsn, "MOCK_POSTS": "4", "ETL_SOURCES": "mock"}
    shown = {}
    for args in (("run", "--source", "mock"), ("migrate",), ("status",), ("status", "--json"), ("check",)):
        result = run_etl(*args, env=env)
        assert result.returncode in (0, 1), result.stdout + result.stderr  # it connects: libpq reads it rightly
        shown[" ".join(args)] = result.stdout + result.stderr
    assert "archiver_odd:***@" in shown["migrate"]
    assert not [command for command, text in shown.items() if password in text], shown
    assert password not in json.dumps(query(db.dsn, "SELECT * FROM etl_runs"), default=str)
    # A URL of the wrong scheme (SQLAlchemy's, pasted) is named with its password masked too; and one given as a
    # URI parameter is masked in any message.
    wrong = run_etl("run", "--source", "mock", env={"DATABASE_URL": f"postgresql+psycopg2://u:{password}@localhost/db"})
    assert wrong.returncode == 2 and password not in wrong.stderr and "u:***@localhost" in wrong.stderr, wrong.stderr
    from etl.config import mask_url_password

    assert mask_url_password(f"postgresql://h/db?user=u&password={password}&x=1") == "postgresql://h/db?user=u&password=***&x=1"
