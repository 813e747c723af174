"""`etl.py check`: the whole configuration, end to end, as a table; each failure says what to do."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from etl.config import Settings, env_name, misspelled_settings
from etl.errors import ConfigError, ETLError, ExitCode
from etl.status import table

log = logging.getLogger(__name__)
OK, FAIL, WARN, NONE = "ok", "FAIL", "warn", "-"


@dataclass
class Check:
    """One line of the table: what was checked, how it went, and what to do when it failed."""

    area: str
    item: str
    result: str
    detail: str
    fix: str = ""


def path_problem(path: str) -> str | None:
    """None when a file can be written at `path` (tried for real, nothing left behind); else the reason."""
    target = Path(path).expanduser()
    if target.is_dir():
        return f"{target} is a directory"
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        if target.exists():
            with target.open("a", encoding="utf-8"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".etl-check-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return f"cannot write there: {exc.strerror or exc}"
    return None


def path_errors(settings: Settings, names: tuple[str, ...] = ("log_file", "metrics_path")) -> list[ConfigError]:
    """ETL_LOG_FILE and ETL_METRICS_PATH (Settings field names), checked before any work (a bad one would
    end in a traceback after the work)."""
    errors = []
    for field_name in names:
        value = getattr(settings, field_name)
        problem = path_problem(value) if value else None
        if problem:
            errors.append(ConfigError(f"{env_name(field_name)}={value!r} is not writable: {problem}"))
    return errors


def check_settings(settings: Settings, env: Mapping[str, str]) -> list[Check]:
    checks = []
    for name, meant in misspelled_settings(env):
        checks.append(Check("settings", name, FAIL, f"unknown; looks like a misspelling of {meant}", f"rename {name} to {meant}"))
    if settings.sources:
        checks.append(Check("settings", "ETL_SOURCES", OK, ", ".join(settings.sources)))
    else:
        checks.append(
            Check(
                "settings", "ETL_SOURCES", FAIL, "not set (DATABASE_URL is set, so the mock default does not apply)",
                "set ETL_SOURCES to the sources a bare run archives, for example ETL_SOURCES=youtube,twitter",
            )
        )  # fmt: skip
    for field_name in ("log_file", "metrics_path"):
        value = getattr(settings, field_name)
        name = env_name(field_name)
        if not value:
            checks.append(Check("paths", name, NONE, "not set"))
        elif problem := path_problem(value):
            checks.append(Check("paths", name, FAIL, problem, f"point {name} at a writable file, or create its folder"))
        else:
            checks.append(Check("paths", name, OK, f"{Path(value).expanduser().resolve()} is writable"))
    return checks


def check_database(settings: Settings) -> list[Check]:
    from etl.db import Database, migration_files
    from etl.db.status import applied_migrations

    pgdata = (settings.data_dir / "postgres").resolve()
    if settings.embedded_db and not (pgdata / "PG_VERSION").is_file():
        problem = path_problem(str(pgdata / "probe"))
        if problem:
            return [Check("database", "embedded", FAIL, problem, "set ETL_DATA_DIR to a writable folder")]
        return [Check("database", "embedded", OK, f"not created yet: the first run creates it in {pgdata}")]
    kind = "embedded" if settings.embedded_db else "DATABASE_URL"
    try:
        db = Database.from_settings(settings)
    except ETLError as exc:
        fix = "start the server, or correct DATABASE_URL (host, port, user, password, database)"
        return [Check("database", kind, FAIL, str(exc), fix if kind == "DATABASE_URL" else "see the message; ETL_DATA_DIR")]
    try:
        done = applied_migrations(db)
        versions = {version for version, _ in migration_files()}
        pending = len(versions - done)
    finally:
        db.close()
    checks = [Check("database", kind, OK, f"reachable: {db.display}")]
    if pending:
        checks.append(Check("database", "migrations", WARN, f"{pending} of {len(versions)} not applied yet (the next run or `etl.py migrate` applies them)"))
    else:
        checks.append(Check("database", "migrations", OK, f"all {len(versions)} applied"))
    return checks


def check_store(settings: Settings, *, create_bucket: bool = False) -> list[Check]:
    if not settings.s3_bucket:
        root = settings.objects_dir.resolve()
        problem = path_problem(str(root / ".incoming" / "probe"))
        if problem:
            return [Check("store", "local", FAIL, problem, "set ETL_DATA_DIR to a writable folder (or S3_BUCKET)")]
        return [Check("store", "local", OK, f"{root} is writable (a test file was written and deleted)")]
    return _check_s3(settings, create_bucket)


def _check_s3(settings: Settings, create_bucket: bool) -> list[Check]:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from etl.store import make_s3_client

    bucket = settings.s3_bucket
    session = boto3.session.Session()
    checks = []
    credentials = session.get_credentials()
    if credentials is None:
        return [
            Check(
                "store", "credentials", FAIL, "no AWS credentials found",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); a local S3-compatible store needs them too",
            )
        ]  # fmt: skip
    checks.append(Check("store", "credentials", OK, f"from {credentials.method}"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    where = f"s3://{bucket}/{settings.s3_prefix}" + (f" at {endpoint}" if endpoint else "")
    client = make_s3_client(settings, pool_size=1, session=session)
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
            if not create_bucket:
                checks.append(
                    Check("store", "S3_BUCKET", FAIL, f"{bucket!r} does not exist", "create it: `python etl.py check --create-bucket`, or `aws s3 mb s3://" + bucket + "`")
                )
                return checks
            region = settings.aws_region or session.region_name or ""
            options = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region and region != "us-east-1" else {}
            client.create_bucket(Bucket=bucket, **options)
            checks.append(Check("store", "S3_BUCKET", OK, f"{bucket!r} created" + (f" in {region}" if region else "")))
        else:
            checks.append(Check("store", "S3_BUCKET", OK, f"{where} exists"))
        import uuid  # here: a run checks its paths with this module, and uuid imports platform (a dozen regexes)

        key = f"{settings.s3_prefix}.etl-check/{uuid.uuid4().hex}.txt"  # never an archive key (those start with a platform)
        body = b"social-archiver check\n"
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/plain")
        read = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.delete_object(Bucket=bucket, Key=key)
        if read != body:
            checks.append(Check("store", "test-object", FAIL, "read back different bytes than written", "check the endpoint (AWS_ENDPOINT_URL)"))
        else:
            checks.append(Check("store", "test-object", OK, "written, read back and deleted"))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "")) or "error"
        operation = getattr(exc, "operation_name", "") or "request"
        checks.append(
            Check(
                "store", "S3_BUCKET", FAIL, f"{operation} on {bucket!r} refused: {code}",
                "grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the bucket (README: S3 set-up)",
            )
        )  # fmt: skip
    except BotoCoreError as exc:
        checks.append(Check("store", "S3_BUCKET", FAIL, f"cannot reach {where}: {exc}", "check AWS_ENDPOINT_URL and the network"))
    local = settings.objects_dir
    if local.is_dir() and any(p.is_dir() and p.name != ".incoming" for p in local.iterdir()):
        checks.append(
            Check("store", "local-images", WARN, f"{local} holds images archived before S3_BUCKET was set",
                  "run `python etl.py copy-store` to copy them into the bucket")
        )  # fmt: skip
    return checks


def check_sources(settings: Settings) -> list[Check]:
    from etl.sources import REGISTRY

    checks = []
    for name in settings.sources:
        if name not in REGISTRY:
            checks.append(Check("source", name, FAIL, "unknown source", f"use one of: {', '.join(sorted(REGISTRY))}"))
    for name, cls in sorted(REGISTRY.items()):
        configured = name in settings.sources
        credentials = any(getattr(settings.source(name), r) for r in cls.required)
        if not configured and not credentials:
            checks.append(Check("source", name, NONE, "not configured"))
            continue
        note = "" if configured else "(not in ETL_SOURCES) "
        try:
            cls.check_settings(settings)
        except ConfigError as exc:
            checks.append(Check("source", name, FAIL, note + str(exc), "set the settings the message names (README: Platforms)"))
            continue
        try:
            cost = cls(settings).probe()
        except ETLError as exc:
            checks.append(Check("source", name, FAIL, note + str(exc), "check the credentials (README: Platforms, " + name + ")"))
            continue
        except Exception as exc:  # a bug or an outage in one platform's call must not hide the others
            checks.append(Check("source", name, FAIL, f"{note}{type(exc).__name__}: {exc}", "see the log for details"))
            continue
        if cost:
            checks.append(Check("source", name, OK, f"{note}credentials accepted; cost: {cost}"))
        elif cls.required:
            checks.append(Check("source", name, OK, f"{note}credentials present (this platform has no cheap call to test them)"))
        else:
            checks.append(Check("source", name, OK, f"{note}no credentials needed"))
    return checks


def run_checks(settings: Settings, env: Mapping[str, str], *, create_bucket: bool = False) -> list[Check]:
    checks = check_settings(settings, env)
    for area, step in (
        ("database", lambda: check_database(settings)),
        ("store", lambda: check_store(settings, create_bucket=create_bucket)),
        ("source", lambda: check_sources(settings)),
    ):
        try:
            checks += step()
        except Exception as exc:  # one area failing unexpectedly still lets the others be checked
            log.debug("check of %s failed", area, exc_info=True)
            checks.append(Check(area, "-", FAIL, f"{type(exc).__name__}: {exc}", "see the log (ETL_LOG_LEVEL=DEBUG)"))
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = ["Configuration check:", ""]
    lines.append(table(["area", "item", "result", "detail"], [[c.area, c.item, c.result, c.detail] for c in checks]))
    failed = [c for c in checks if c.result == FAIL]
    advice = [c for c in checks if c.result in (FAIL, WARN) and c.fix]
    lines.append("")
    lines.append(f"{len(failed)} problem(s)." if failed else "All checks passed.")
    if advice:
        lines.append("What to do:")
        lines.extend(f"  - {c.area} {c.item}: {c.fix}" for c in advice)
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    return int(ExitCode.CONFIG if any(c.result == FAIL for c in checks) else ExitCode.OK)
