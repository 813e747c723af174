"""The command line: parses arguments, runs a command, prints its summary, returns the exit code."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import IO

from etl import __version__
from etl.config import Settings, load_settings
from etl.enrich import SentimentEnricher
from etl.errors import ETLError, ExitCode, UsageError
from etl.logs import RedactingFilter, setup_logging
from etl.pipeline import Runner, RunRequest, RunStats
from etl.reenrich import reenrich
from etl.status import collect_status, format_status

log = logging.getLogger("etl")
COMMANDS = ("run", "backfill", "reenrich", "status", "migrate", "export")
GLOBAL_OPTIONS = ("--log-format", "--log-level")  # options taking a value, placed before the command


def parse_date(value: str) -> datetime:
    """YYYY-MM-DD or an ISO 8601 date-time; naive means UTC."""
    try:
        text = value.strip().replace("Z", "+00:00")
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD or ISO 8601)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etl.py", description="Archive public social media posts: images to object storage, metadata to PostgreSQL."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON (ETL_LOG_FORMAT)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="ETL_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="incremental run of the configured sources (the default)")
    run.add_argument("--source", action="append", dest="sources", metavar="NAME", help="a source to run (repeatable)")
    run.add_argument("--limit", type=int, metavar="N", help="at most N posts per source")
    run.add_argument("--dry-run", action="store_true", help="fetch and score only; write nothing")
    run.add_argument("--input", metavar="FILE", help="for the jsonl source: a file, or - for standard input")

    backfill = sub.add_parser("backfill", help="archive a date range of one source")
    backfill.add_argument("--source", required=True, dest="sources", action="append", metavar="NAME")
    backfill.add_argument("--since", required=True, type=parse_date, metavar="DATE")
    backfill.add_argument("--until", type=parse_date, metavar="DATE", help="exclusive; default now")
    backfill.add_argument("--chunk-days", type=float, default=1.0, metavar="D", help="days per chunk (default 1)")
    backfill.add_argument("--limit", type=int, metavar="N")
    backfill.add_argument("--input", metavar="FILE")

    reenrich = sub.add_parser("reenrich", help="re-score stored posts with the current enricher (no fetching)")
    reenrich.add_argument("--platform", metavar="NAME")
    reenrich.add_argument("--since", type=parse_date, metavar="DATE")

    status = sub.add_parser("status", help="last runs, totals, failures, watermarks")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--runs", type=int, default=10, metavar="N", help="how many runs to list")

    sub.add_parser("migrate", help="apply the sql/ migrations")

    export = sub.add_parser("export", help="the archive as partitioned Parquet (posts/, media/), incrementally")
    export.add_argument("--to", metavar="DIR|s3://BUCKET/PREFIX", help="default: the object store, under ETL_EXPORT_PREFIX")
    export.add_argument("--since", type=parse_date, metavar="DATE", help="only partitions of posts from this UTC date on")
    export.add_argument("--full", action="store_true", help="rewrite every partition, changed or not")
    return parser


def main(argv: Sequence[str] | None = None, *, env: dict[str, str] | None = None, stdout: IO[str] | None = None) -> int:
    """Run the command line; returns the exit code. `env` replaces the environment (tests)."""
    out = stdout or sys.stdout
    args_list = with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        settings = load_settings(env, dotenv_path=".env" if env is None else None)
    except ETLError as exc:
        setup_logging("INFO", "text")
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    setup_logging(
        args.log_level or settings.log_level, args.log_format or settings.log_format, settings.secrets(), settings.log_file
    )
    redact = RedactingFilter(settings.secrets()).redact
    try:
        return _dispatch(args, settings, out)
    except ETLError as exc:
        log.error("%s", exc)
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception:
        # A bug or an unforeseen outage: logged with its traceback (secrets redacted), the run is recorded.
        log.exception("the run stopped on an unexpected error")
        return int(ExitCode.PARTIAL)


def _on_sigterm(stop: threading.Event) -> None:
    """SIGTERM (cron, a container stopping): stop fetching, load what is in flight, record the run interrupted.

    A second SIGTERM stops at once (the database keeps only committed batches; the next run completes the rest).
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("SIGTERM received: finishing the batches in flight, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, handler)


def with_default_command(args: list[str]) -> list[str]:
    """`etl.py [global options] [run options]` means `etl.py [global options] run [run options]`."""
    if any(a in COMMANDS for a in args) or any(a in ("-h", "--help", "--version") for a in args):
        return args
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        i += 1 if "=" in args[i] else 2
    return [*args[:i], "run", *args[i:]]


def _dispatch(args: argparse.Namespace, settings: Settings, out: IO[str]) -> int:
    command = args.command or "run"
    stop = threading.Event()
    _on_sigterm(stop)
    if command in ("run", "backfill"):
        if args.limit is not None and args.limit < 0:
            raise UsageError("--limit must be zero or more")
        request = RunRequest(
            mode=command,
            sources=args.sources or list(settings.sources),
            limit=args.limit,
            source_options=_source_options(args),
            arguments=_recorded(args),
        )
        if command == "run":
            request.dry_run = args.dry_run
        else:
            if args.until is not None and args.until <= args.since:
                raise UsageError("--until must be after --since")
            if args.chunk_days <= 0:
                raise UsageError("--chunk-days must be positive")
            request.since, request.until, request.chunk = args.since, args.until, timedelta(days=args.chunk_days)
        bar = ProgressBar(sys.stderr) if command == "backfill" and sys.stderr.isatty() else None
        runner = Runner(settings, stop=stop, progress=bar)
        stats = runner.execute(request)
        if bar:
            bar.close()
        _print_run_summary(out, stats, runner, settings, dry_run=request.dry_run)
        return int(stats.exit_code)
    if command == "reenrich":
        return _reenrich(args, settings, out, stop)
    if command == "export":
        from etl.export import export, resolve_target

        target = resolve_target(settings, args.to)
        runner = Runner(settings)
        runner.open_services(store=False)
        assert runner.db is not None
        stats = export(settings, runner.db, target, full=args.full, since=args.since, should_stop=stop.is_set, arguments=_recorded(args))
        print(stats.summary(), file=out)
        return int(stats.exit_code)
    runner = Runner(settings)
    runner.open_services(store=False)
    assert runner.db is not None
    if command == "migrate":
        applied = runner.db.migrate()
        print(f"{len(applied)} migration(s) applied{': ' + ', '.join(applied) if applied else ''} ({runner.db.display})", file=out)
        return int(ExitCode.OK)
    if command == "status":
        report = collect_status(runner.db, runs=args.runs)
        if args.json:
            print(json.dumps(report, default=_json_default, indent=2, ensure_ascii=False), file=out)
        else:
            print(format_status(report), file=out)
        return int(ExitCode.OK)
    raise UsageError(f"unknown command {command!r}")


def _reenrich(args: argparse.Namespace, settings: Settings, out: IO[str], stop: threading.Event) -> int:
    runner = Runner(settings)
    runner.open_services(store=False)
    db = runner.db
    assert db is not None
    enricher = SentimentEnricher(settings.sentiment_threshold)
    stats = RunStats()
    scope = [args.platform or "*"]
    run_id = db.start_run("reenrich", scope, _recorded(args))
    status = "failed"
    try:
        reenrich(db, enricher, stats, platform=args.platform, since=args.since, should_stop=stop.is_set)
        status = stats.status
    finally:
        stats.seconds = time.monotonic() - stats.started
        db.finish_run(run_id, status, stats.ledger())
    log.info("summary: re-enriched %d posts, %d changed, %d unchanged in %.1fs", stats.fetched, stats.updated, stats.unchanged, stats.seconds)
    print(
        f"\nRe-enrichment ({enricher.version}): {status} in {stats.seconds:.1f}s\n"
        f"  posts    scored {stats.fetched}, changed {stats.updated}, unchanged {stats.unchanged}\n"
        f"  sentiment positive {stats.sentiment['positive']}, neutral {stats.sentiment['neutral']}, "
        f"negative {stats.sentiment['negative']}",
        file=out,
    )
    return int(stats.exit_code)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class ProgressBar:
    """A one-line progress bar on a terminal (never under cron: only used when stderr is a TTY)."""

    def __init__(self, stream: IO[str], width: int = 30):
        self.stream = stream
        self.width = width

    def __call__(self, done: int, total: int, stats: RunStats) -> None:
        filled = int(self.width * done / total) if total else self.width
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} chunks, {stats.fetched} posts, "
            f"{stats.images_stored} images"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _source_options(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    options: dict[str, dict[str, object]] = {}
    if getattr(args, "input", None):
        options["jsonl"] = {"input": args.input}
    return options


def _recorded(args: argparse.Namespace) -> dict[str, object]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in vars(args).items() if v is not None}


def _print_run_summary(out: IO[str], stats: RunStats, runner: Runner, settings: Settings, *, dry_run: bool) -> None:
    log.info("summary: %s", stats.summary_line())
    s = stats.sentiment
    lines = [
        "",
        ("Dry run (nothing written): " if dry_run else "Archive run: ") + f"{stats.status} in {stats.seconds:.1f}s",
        f"  posts    fetched {stats.fetched}, inserted {stats.inserted}, updated {stats.updated}, "
        f"unchanged {stats.unchanged}, rejected {stats.rejected}",
    ]
    if not dry_run:
        lines.append(
            f"  images   stored {stats.images_stored}, already archived {stats.images_skipped}, failed {stats.images_failed}"
            + (f" (of which {stats.images_retried} retried from earlier runs)" if stats.images_retried else "")
        )
    lines.append(f"  sentiment positive {s['positive']}, neutral {s['neutral']}, negative {s['negative']}")
    if stats.quota_used:
        lines.append(f"  API quota units used {stats.quota_used}")
    if not dry_run and runner.db is not None and runner.store is not None:
        lines.append(f"  database {runner.db.display}")
        lines.append(f"  images   {runner.store.describe()}")
    if stats.errors:
        lines.append(f"  {len(stats.errors)} problem(s), first ones:")
        lines.extend(f"    - {e}" for e in stats.errors[:10])
    print("\n".join(lines), file=out)
