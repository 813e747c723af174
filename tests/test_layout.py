"""Layout: etl/db/ is the one home of SQL. No module under etl/ outside it holds SQL text or hands SQL to a cursor."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

# SQL as this code base writes it: upper-case keywords. Each pattern needs two keywords in SQL's order, so
# prose such as "S3 DELETE failed" or a setting named ETL_DELETED_AT_SOURCE is not taken for SQL.
SQL_TEXT = re.compile(
    r"\bSELECT\s+(\*|DISTINCT\b|EXISTS\b|[\w(])"
    r"|\bINSERT\s+INTO\b|\bUPDATE\s+\w+(\s+(AS\s+)?\w+)?\s+SET\b|\bDELETE\s+FROM\b|\bON\s+CONFLICT\b"
    r"|\b(CREATE|ALTER|DROP)\s+(TEMP\s+|TEMPORARY\s+|UNIQUE\s+)?(TABLE|INDEX|VIEW|FUNCTION)\b"
    r"|\bTRUNCATE\s+\w|\bCOPY\s+\w+.*\b(FROM\s+STDIN|TO\s+STDOUT)\b|\bSET\s+TRANSACTION\b"
)
# Cursor methods that only ever take SQL, and psycopg2.extras' helpers that send it.
SQL_METHODS = {"executemany", "copy_expert", "copy_from", "copy_to", "mogrify", "callproc"}
SQL_HELPERS = {"execute_values", "execute_batch"}
CURSOR_NAMES = re.compile(r"(^|_)(cur|cursor|scan)$")  # `execute` on these is SQL (Runner.execute is not)


def _receiver(node: ast.expr) -> str:
    """The name an attribute call is made on: `cur` for cur.execute, `cursor` for conn.cursor().execute."""
    if isinstance(node, ast.Call):
        return _receiver(node.func)
    if isinstance(node, ast.Attribute):
        return node.attr
    return getattr(node, "id", "")


def sql_problems(path: Path, root: Path = ROOT) -> list[str]:
    """file:line and what was found, for every piece of SQL text or cursor call in one module."""
    where = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    problems = [
        f"{where}:{n}: SQL text belongs in etl/db/: {line.strip()[:100]}"
        for n, line in enumerate(text.splitlines(), 1)
        if SQL_TEXT.search(line)
    ]
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        receiver = _receiver(func.value) if isinstance(func, ast.Attribute) else ""
        if name in SQL_METHODS or name in SQL_HELPERS or (name == "execute" and CURSOR_NAMES.search(receiver)):
            problems.append(f"{where}:{node.lineno}: {ast.unparse(func)}() sends SQL: call a function of etl/db/ instead")
    return problems


def test_no_module_outside_etl_db_holds_sql():
    modules = sorted(p for p in (ROOT / "etl").rglob("*.py") if "db" not in p.relative_to(ROOT / "etl").parts[:1])
    assert len(modules) > 20, "the scan found too few modules to prove anything"
    problems = [problem for path in modules for problem in sql_problems(path)]
    assert problems == [], "SQL outside etl/db/:\n" + "\n".join(problems)


def test_the_scan_finds_sql_text_and_cursor_calls_and_spares_prose(tmp_path):
    probe = tmp_path / "etl" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        'QUERY = (\n    "SELECT id FROM t"\n    " WHERE x = %s"\n)\n'  # line 2: SQL text
        "def f(cur, conn, runner, rows):\n"
        "    cur.execute(QUERY, (1,))\n"  # line 6
        "    conn.cursor().execute(QUERY)\n"  # line 7
        "    psycopg2.extras.execute_values(cur, QUERY, rows)\n"  # line 8
        "    cur.copy_expert(QUERY, rows)\n"  # line 9
        "    runner.execute(rows)\n"  # not SQL
        '    raise ValueError(f"S3 DELETE {rows} failed; see ETL_DELETED_AT_SOURCE, then UPDATE the docs")\n'
        '    return "update posts as you like; select a platform"\n'
    )
    found = sql_problems(probe, tmp_path)
    assert [p.split(":")[1] for p in found] == ["2", "6", "7", "8", "9"], found
    assert found[0] == 'etl/probe.py:2: SQL text belongs in etl/db/: "SELECT id FROM t"'
    assert "cur.execute() sends SQL" in found[1]
