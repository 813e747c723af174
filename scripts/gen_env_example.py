#!/usr/bin/env python3
"""Write .env.example and the README's settings table from the Settings declarations in etl/config.py."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etl.config import BOTO3_VARIABLES, Settings  # noqa: E402

HEADER = """\
# Settings of the social archiver. Copy to .env (never commit it) or set them in the environment;
# the environment wins over .env. Everything is optional: with nothing set, `python etl.py` runs the
# mock source into an embedded PostgreSQL and a local object store under ./data.
# Secrets (marked SECRET) are never logged, printed or stored in etl_runs.
# Generated from etl/config.py by scripts/gen_env_example.py.
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


def main() -> None:
    out = [HEADER]
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else ""
        doc = f.metadata["doc"] + (" (SECRET)" if f.metadata["secret"] else "")
        out.append(f"# {doc}")
        out.append(f"# {f.metadata['env']}={render_default(default)}")
    out.append(BOTO3)
    assert all(name in BOTO3 for name in BOTO3_VARIABLES)
    root = Path(__file__).resolve().parent.parent
    target = root / ".env.example"
    target.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {target}")
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- settings:start -->", "<!-- settings:end -->"
    table = [start, "", "| setting | default | what it does |", "|---|---|---|"]
    for f in fields(Settings):
        default = render_default(f.default) if f.default is not MISSING else ""
        doc = f.metadata["doc"].replace("|", "\\|") + (" **secret**" if f.metadata["secret"] else "")
        table.append(f"| `{f.metadata['env']}` | {('`' + default + '`') if default else ''} | {doc} |")
    table += ["", end]
    readme.write_text(text[: text.index(start)] + "\n".join(table) + text[text.index(end) + len(end) :], encoding="utf-8")
    print(f"updated the settings table in {readme}")


if __name__ == "__main__":
    main()
