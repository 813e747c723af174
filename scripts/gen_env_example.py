#!/usr/bin/env python3
"""Write .env.example and the README's settings table from the declarations in the code: the core settings
of etl/config.py, then each source's own (the SETTINGS of its module), grouped by source.

    python scripts/gen_env_example.py                                  # .env.example and README.md
    python scripts/gen_env_example.py --source-path my_source.py --out my.env.example   # with a plugin's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from etl.config import BOTO3_VARIABLES, Setting, all_settings  # noqa: E402
from etl.sources import REGISTRY, load_source_modules  # noqa: E402

HEADER = """\
# Settings of the social archiver. Copy to .env (never commit it) or set them in the environment;
# the environment wins over .env. Everything is optional: with nothing set, `python etl.py` runs the
# mock source into an embedded PostgreSQL and a local object store under ./data.
# Secrets (marked SECRET) are never logged, printed or stored in etl_runs.
# Generated from etl/config.py and each source's SETTINGS (etl/sources/) by scripts/gen_env_example.py.
"""

BOTO3 = """
# --- read by boto3 itself (S3 or any S3-compatible endpoint) ---
# AWS_ENDPOINT_URL=http://localhost:9000        # MinIO, Ceph, R2, moto... unset for AWS
# AWS_ACCESS_KEY_ID=                            # or an instance role / AWS_PROFILE
# AWS_SECRET_ACCESS_KEY=                        # SECRET
# AWS_SESSION_TOKEN=                            # SECRET
# AWS_PROFILE=
"""


def render_default(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def groups() -> list[tuple[str, list[Setting]]]:
    """(title, settings): the core settings, then one group per source that declares any."""
    by_group: dict[str, list[Setting]] = {}
    for group, setting in all_settings():
        by_group.setdefault(group, []).append(setting)
    return [(_title(group), settings) for group, settings in by_group.items()]


def _title(group: str) -> str:
    if not group:
        return "core settings (etl/config.py)"
    where = Path(sys.modules[REGISTRY[group].__module__].__file__ or "").resolve()
    shown = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where.name
    return f"the {group} source ({shown})"


def env_example() -> str:
    out = [HEADER]
    for title, settings in groups():
        out.append(f"# --- {title} ---")
        for setting in settings:
            out.append(f"# {setting.doc}" + (" (SECRET)" if setting.secret else ""))
            out.append(f"# {setting.env}={render_default(setting.default)}")
        out.append("")
    out.append(BOTO3)
    assert all(name in BOTO3 for name in BOTO3_VARIABLES)
    return "\n".join(out).rstrip() + "\n"


def settings_table() -> list[str]:
    table = ["| setting | default | what it does |", "|---|---|---|"]
    for title, settings in groups():
        table.append(f"| **{title}** | | |")
        for setting in settings:
            default = render_default(setting.default)
            doc = setting.doc.replace("|", "\\|") + (" **secret**" if setting.secret else "")
            table.append(f"| `{setting.env}` | {('`' + default + '`') if default else ''} | {doc} |")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-path", action="append", default=[], help="a source file or module (as in ETL_SOURCE_PATHS)")
    parser.add_argument("--out", type=Path, help="write the .env example here, and leave README.md alone")
    args = parser.parse_args(argv)
    if args.source_path and not args.out:
        parser.error("--source-path needs --out (the repository's .env.example lists its own sources only)")
    load_source_modules(args.source_path)
    target = args.out or ROOT / ".env.example"
    target.write_text(env_example(), encoding="utf-8")
    print(f"wrote {target}")
    if args.out:
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- settings:start -->", "<!-- settings:end -->"
    table = [start, "", *settings_table(), "", end]
    readme.write_text(text[: text.index(start)] + "\n".join(table) + text[text.index(end) + len(end) :], encoding="utf-8")
    print(f"updated the settings table in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
