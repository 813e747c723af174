"""The command line: parses arguments, runs a command, prints its summary, returns the exit code."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING

from etl import __version__, cli_insights, cli_trust
from etl.backfill_limits import checked_chunk
from etl.check import path_errors
from etl.cli_args import quick_run_args
from etl.config import Settings, load_settings, merged_environment, misspelled_settings
from etl.errors import ConfigError, ETLError, ExitCode, UsageError
from etl.logs import RedactingFilter, setup_logging
from etl.prefork import command_at
from etl.shards import Shard, format_plan, plan_shards
from etl.sources import source_names
from etl.stopping import exit_now, leave_if_stalled

# What a command needs beyond parsing its arguments is imported where the command runs (issue 16): a rerun
# with nothing new is mostly start-up, and `--help` or `status` should not load the archiver, its downloader,
# the metrics writer or the re-enrichment's process pool.
if TYPE_CHECKING:
    import argparse

    from etl.run.runner import Runner, RunRequest
    from etl.run.stats import RunStats

log = logging.getLogger("etl")
COMMANDS = (
    "run", "backfill", "reenrich", "status", "migrate", "check", "plan", "copy-store", "fingerprint", "similar", "trends",
    "report", "verify", "forget", "export",
)
EXIT_CODES = """exit codes:
  0   all archived (or: the command succeeded)
  1   the run finished but some items failed; they are recorded and retried by the next run
  2   bad configuration or usage; the message names the setting or option
  75  another run holds the lock; nothing was done"""


def _epilog(*examples: str, sources: bool = False) -> str:
    parts = []
    if sources:
        parts.append("sources: " + ", ".join(source_names()) + " (ETL_SOURCES is the default set of a bare run)")
    parts.append(EXIT_CODES)
    parts.append("examples:\n" + "\n".join(f"  {e}" for e in examples))
    return "\n\n".join(parts)


def parse_date(value: str) -> datetime:
    """YYYY-MM-DD or an ISO 8601 date-time; naive means UTC."""
    try:
        text = value.strip().replace("Z", "+00:00")
        parsed = datetime.fromisoformat(text)
    except ValueError:
        import argparse  # (a type= of argparse's: it is loaded)

        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD or ISO 8601)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _shard(value: str) -> Shard:
    try:
        return Shard.parse(value)
    except UsageError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_int(value: str) -> int:
    import argparse

    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 0 or more")
    return int(value)


def _shard_count(value: str) -> int:
    import argparse

    from etl.config import MAX_SHARDS

    number = _positive_int(value)
    if number > MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"{value!r} must be a whole number from 1 to {MAX_SHARDS} (Airflow's max_map_length)")
    return number


def _positive_int(value: str) -> int:
    import argparse

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 < number <= 1_000_000:  # (a larger one reached PostgreSQL as a bigint out of range: a traceback)
        raise argparse.ArgumentTypeError(f"{value!r} must be a whole number from 1 to 1,000,000")
    return number


class _Unbuilt:
    """The parser of a command this invocation does not run (build_parser(only=...)): takes its arguments, keeps none."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        return None

    def add_mutually_exclusive_group(self, **kwargs: object) -> _Unbuilt:
        return self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the top level and that one command (what a run parses: the same
    answers, without building the other 14 commands' parsers at every start)."""
    import argparse  # here: a plain run's arguments are read without it (etl/cli_args.py)

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="etl.py",
        description="Archive public social media posts: images to object storage, metadata to PostgreSQL.\n"
        "Without a command: `run` (an incremental run of the sources in ETL_SOURCES).",
        formatter_class=formatter,
        epilog=_epilog(
            "python etl.py                          # what cron runs: every configured source",
            "python etl.py check                    # is the configuration right, end to end?",
            "python etl.py backfill --source youtube --since 2026-01-01",
            "python etl.py COMMAND --help           # the options of one command",
            sources=True,
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Global options are accepted before or after the command; after it, SUPPRESS keeps an absent one from
    # overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, None), (common, argparse.SUPPRESS)):
        target.add_argument(
            "--log-format", choices=("text", "json"), default=default, help="log lines as text or JSON (default: ETL_LOG_FORMAT)"
        )
        target.add_argument(
            "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=default, help="default: ETL_LOG_LEVEL"
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, help_text: str, *examples: str, sources: bool = False) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unbuilt()  # type: ignore[return-value]
        return sub.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", parents=[common],
            formatter_class=formatter, epilog=_epilog(*examples, sources=sources),
        )  # fmt: skip

    run = command(
        "run", "incremental run of the configured sources (the default command)",
        "python etl.py run                                   # every source in ETL_SOURCES",
        "python etl.py run --source youtube --limit 50",
        "kcat -C -t posts -e | python etl.py run --source jsonl --input -",
        sources=True,
    )  # fmt: skip
    run.add_argument("--source", action="append", dest="sources", metavar="NAME", help="a source to run (repeatable; default: ETL_SOURCES)")
    run.add_argument("--limit", type=int, metavar="N", help="at most N posts per source")
    run.add_argument("--dry-run", action="store_true", help="fetch and score only; write nothing")
    run.add_argument("--input", metavar="FILE", help="for the jsonl source: a file, or - for standard input")
    run.add_argument("--shard", type=_shard, metavar="K/N", help="only shard K of N (1-based): its streams and its part of the failed images (see `plan`)")

    backfill = command(
        "backfill", "archive a date range of one source, in chunks, oldest first (resumable)",
        "python etl.py backfill --source youtube --since 2026-01-01 --until 2026-02-01",
        "python etl.py backfill --source twitter --since 2026-03-01 --chunk-days 0.25",
        "python etl.py backfill --source jsonl --since 2025-01-01 --input old-posts.jsonl",
        sources=True,
    )  # fmt: skip
    backfill.add_argument("--source", required=True, dest="sources", action="append", metavar="NAME", help="the source to backfill (repeatable)")
    backfill.add_argument("--since", required=True, type=parse_date, metavar="DATE", help="first day (YYYY-MM-DD or ISO 8601; naive = UTC)")
    backfill.add_argument("--until", type=parse_date, metavar="DATE", help="end of the range, exclusive (default: now)")
    backfill.add_argument("--chunk-days", type=float, default=1.0, metavar="D", help="days per chunk (default 1; at least a minute, at most 10,000 chunks); finished chunks are skipped by a rerun")
    backfill.add_argument("--limit", type=int, metavar="N", help="at most N posts per chunk")
    backfill.add_argument("--input", metavar="FILE", help="for the jsonl source: a file, or - for standard input")
    backfill.add_argument("--chunk-index", type=_non_negative_int, metavar="I", help="only chunk I (0-based, oldest first): one worker's share")

    reenrich = command(
        "reenrich", "re-score stored posts with the current sentiment settings (no fetching)",
        "python etl.py reenrich",
        "python etl.py reenrich --platform twitter --since 2026-01-01",
    )  # fmt: skip
    reenrich.add_argument("--platform", metavar="NAME", help="only posts of this platform (default: all)")
    reenrich.add_argument("--since", type=parse_date, metavar="DATE", help="only posts created on or after DATE")

    status = command(
        "status", "last runs, totals, failures, watermarks",
        "python etl.py status", "python etl.py status --runs 30", "python etl.py status --json | jq '.runs[0]'",
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--runs", type=_positive_int, default=10, metavar="N", help="how many runs to list (default 10)")

    command("migrate", "apply the sql/ migrations (run does it too)", "python etl.py migrate")

    check = command(
        "check", "check the whole configuration end to end: database, object store, sources, paths, spelling",
        "python etl.py check", "S3_BUCKET=my-archive python etl.py check --create-bucket",
    )  # fmt: skip
    check.add_argument("--create-bucket", action="store_true", help="create S3_BUCKET when it does not exist")

    plan = command(
        "plan", "the run's work as N shards: every stream of every configured source in exactly one",
        "python etl.py plan --shards 4", "python etl.py plan --shards 4 --json",
        "python etl.py run --shard 2/4                      # what host 2 of 4 runs",
    )  # fmt: skip
    plan.add_argument("--shards", type=_shard_count, default=None, metavar="N", help="how many shards (default: ETL_SHARDS)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    command(
        "copy-store", "copy images archived in another object store into the configured one (verified, resumable)",
        "python etl.py copy-store                  # after setting S3_BUCKET on an archive kept in the local store",
    )  # fmt: skip
    if only is None or only in cli_insights.COMMANDS:
        cli_insights.add_parsers(command, parse_date)
    cli_trust.add_parsers(command, parse_date)

    export = command(
        "export", "the archive as partitioned Parquet (posts/, media/), incrementally",
        "python etl.py export                          # into the object store, under ETL_EXPORT_PREFIX",
        "python etl.py export --to /data/lake --since 2026-11-01",
        "python etl.py export --to s3://analytics/social/ --full",
    )  # fmt: skip
    export.add_argument("--to", metavar="DIR|s3://BUCKET/PREFIX", help="default: the object store, under ETL_EXPORT_PREFIX")
    export.add_argument("--since", type=parse_date, metavar="DATE", help="only partitions of posts from this UTC date on")
    export.add_argument("--full", action="store_true", help="rewrite every partition, changed or not")
    return parser


def commands_of(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The command names the parser knows (every subparser block registers itself)."""
    import argparse

    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            return tuple(action.choices)
    return COMMANDS


def main(argv: Sequence[str] | None = None, *, env: dict[str, str] | None = None, stdout: IO[str] | None = None) -> int:
    """Run the command line; returns the exit code. `env` replaces the environment (tests)."""
    out = stdout or sys.stdout
    try:
        args_list = with_default_command(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    args = quick_run_args(args_list)
    if args is None:
        args = build_parser(only=_command_word(args_list)).parse_args(args_list)
    command = args.command or "run"
    setup_logging("INFO", "text")  # until the settings are read (a bad .env line is reported on stderr)
    try:
        environment = merged_environment(".env") if env is None else dict(env)
        settings = load_settings(environment, dotenv_path=None)
        writes = ("log_file", "metrics_path") if command in ("run", "backfill", "verify") else ("log_file",)
        unwritable = path_errors(settings, writes)
        if unwritable and command != "check":  # `check` reports them in its table
            raise unwritable[0]
    except ETLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    log_file = "" if command == "check" and unwritable else settings.log_file
    setup_logging(args.log_level or settings.log_level, args.log_format or settings.log_format, settings.secrets(), log_file)
    if command != "check":
        for name, meant in misspelled_settings(environment):
            log.warning("%s is not a setting of ours (ignored); did you mean %s?", name, meant)
    redact = RedactingFilter(settings.secrets()).redact
    try:
        if command == "check":
            return _check(args, settings, environment, out)
        return _dispatch(args, settings, out)
    except ETLError as exc:
        # On a terminal the `error:` line is enough; the log file (and a non-terminal stderr) keep the log line.
        log.error("%s", exc, extra={"console": False} if sys.stderr.isatty() else {})
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
    """SIGTERM (cron, a container stopping): stop fetching and starting downloads, give the downloads in flight
    ETL_STOP_GRACE seconds, load every post fetched (unfinished images recorded failed), record the run
    interrupted, exit 1.

    A second SIGTERM stops at once with exit 1 (the database keeps only committed batches; the next run marks
    this one abandoned and completes the rest).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    received = threading.Event()  # not `stop`: a run or command whose locks were lost sets that too (LockWatch)

    def handler(signum: int, frame: object) -> None:
        if received.is_set():
            log.error("second SIGTERM: stopping at once; the next run completes what this one did not")
            exit_now(int(ExitCode.PARTIAL))
        received.set()
        log.warning("SIGTERM received: no new downloads, loading what was fetched, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, handler)


def _command_word(args: list[str]) -> str | None:
    """The command argparse will run, when it is certain (else None: the whole parser is built)."""
    i = command_at(args)
    return args[i] if i < len(args) and args[i] in COMMANDS else None


def with_default_command(args: list[str]) -> list[str]:
    """`etl.py [global options] [run options]` means `etl.py [global options] run [run options]`.

    A word where the command goes that is not one is a UsageError listing the commands.
    """
    i = command_at(args)
    if i >= len(args):
        return [*args, "run"]
    word = args[i]
    if word in COMMANDS or word in ("-h", "--help", "--version"):
        return args
    if not word.startswith("-"):
        raise UsageError(
            f"{word!r} is not a command. Commands: {', '.join(COMMANDS)} (without one: run). "
            "See `python etl.py --help`."
        )
    return [*args[:i], "run", *args[i:]]


def _dispatch(args: argparse.Namespace, settings: Settings, out: IO[str]) -> int:
    command = args.command or "run"
    stop = threading.Event()
    _on_sigterm(stop)
    if command in ("run", "backfill"):
        from etl.progress import ProgressReporter
        from etl.run.runner import Runner, RunRequest

        if args.limit is not None and args.limit < 0:
            raise UsageError("--limit must be zero or more")
        if not args.sources and not settings.sources:
            raise ConfigError(
                "ETL_SOURCES is not set: with DATABASE_URL set, a bare run does not fall back to the mock source; "
                "set ETL_SOURCES (for example ETL_SOURCES=youtube,twitter) or pass --source NAME"
            )
        request = RunRequest(
            mode=command,
            sources=args.sources or list(settings.sources),
            limit=args.limit,
            source_options=_source_options(args),
            arguments=_recorded(args),
        )
        if command == "run":
            request.dry_run, request.shard = args.dry_run, args.shard
        else:
            request.chunk_index = args.chunk_index
            if args.until is not None and args.until <= args.since:
                raise UsageError("--until must be after --since")
            chunk = checked_chunk(args.since, args.until or datetime.now(timezone.utc), args.chunk_days)
            request.since, request.until, request.chunk = args.since, args.until, chunk
        runner = Runner(settings, stop=stop)
        title = _title(request)
        tty = sys.stderr.isatty()
        with ProgressReporter(runner.live, title=title, tty=tty, interval=settings.progress_seconds, stream=sys.stderr):
            stats = runner.execute(request)
        _print_run_summary(out, stats, runner, settings, title=title)
        if stop.is_set():
            leave_if_stalled(int(stats.exit_code))
        return int(stats.exit_code)
    if command == "reenrich":
        return _reenrich(args, settings, out, stop)
    if command == "plan":
        from etl.run.runner import RunRequest
        from etl.run.services import build_sources

        sources = build_sources(settings, RunRequest(sources=list(settings.sources)))
        planned = plan_shards(sources, args.shards or settings.shards)
        print(format_plan(planned, as_json=args.json), file=out)
        return int(ExitCode.OK)
    if command in cli_insights.COMMANDS:
        return cli_insights.dispatch(command, args, settings, out, stop)
    if command == "copy-store":
        from etl.copystore import copy_store

        result = copy_store(settings, _recorded(args), stop)
        print(result.format(settings), file=out)
        return int(result.exit_code)
    if command == "status":
        from etl.status import collect_status, format_status, open_archive

        db = open_archive(settings)  # never creates one
        report = collect_status(db, runs=args.runs)
        if args.json:
            print(cli_insights.json_text(report), file=out)
        else:
            print(format_status(report), file=out)
        return int(ExitCode.OK)
    if command == "verify":
        return cli_trust.verify_command(args, settings, out, stop)
    if command == "forget":
        return cli_trust.forget_command(args, settings, out)
    if command == "export":
        from etl.export import export, resolve_target
        from etl.run.services import open_services

        target = resolve_target(settings, args.to)
        db, _ = open_services(settings, check_store=False)
        stats = export(settings, db, target, full=args.full, since=args.since, stop=stop, arguments=_recorded(args))
        print(stats.summary(), file=out)
        return int(stats.exit_code)
    if command == "migrate":
        from etl.db import Database

        db = Database.from_settings(settings)  # not open_services: it migrates, and none would be left to report
        applied = db.migrate()
        print(f"{len(applied)} migration(s) applied{': ' + ', '.join(applied) if applied else ''} ({db.display})", file=out)
        return int(ExitCode.OK)
    raise UsageError(f"unknown command {command!r}")


def _reenrich(args: argparse.Namespace, settings: Settings, out: IO[str], stop: threading.Event) -> int:
    from etl.db import Ledger
    from etl.enrich import SentimentEnricher
    from etl.reenrich import reenrich
    from etl.run.services import open_services
    from etl.run.stats import RunStats

    db, _ = open_services(settings, check_store=False)
    enricher = SentimentEnricher(settings.sentiment_threshold, detect_language=settings.detect_language)
    stats = RunStats()
    unit = f"reenrich {args.platform or '*'}"
    with Ledger(db).locked_recording("reenrich", unit, [args.platform or "*"], _recorded(args), stats, busy=f"{unit} is running", stop=stop):
        reenrich(db, enricher, stats, platform=args.platform, since=args.since, should_stop=stop.is_set)
    stats.seconds = time.monotonic() - stats.started
    log.info("summary: re-enriched %d posts, %d changed, %d unchanged in %.1fs", stats.fetched, stats.updated, stats.unchanged, stats.seconds)
    print(
        f"\nRe-enrichment ({enricher.version}): {stats.status} in {stats.seconds:.1f}s\n"
        f"  posts    scored {stats.fetched}, changed {stats.updated}, unchanged {stats.unchanged}\n"
        f"  sentiment positive {stats.sentiment['positive']}, neutral {stats.sentiment['neutral']}, "
        f"negative {stats.sentiment['negative']}, not scored {stats.sentiment['unscored']} (not English)",
        file=out,
    )
    return int(stats.exit_code)


def _source_options(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    options: dict[str, dict[str, object]] = {}
    if getattr(args, "input", None):
        options["jsonl"] = {"input": args.input}
    return options


def _recorded(args: argparse.Namespace) -> dict[str, object]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in vars(args).items() if v is not None}


def _title(request: RunRequest) -> str:
    """What ran, for the summary and the progress display: `Run of mock`, `Backfill of youtube, 2026-01-01 to now`."""
    names = ", ".join(request.sources)
    if request.dry_run:
        return f"Dry run (nothing written) of {names}"
    if request.mode == "backfill" and request.since is not None:
        until = f"{request.until:%Y-%m-%d %H:%M}" if request.until else "now"
        return f"Backfill of {names}, {request.since:%Y-%m-%d %H:%M} to {until}"
    return f"Run of {names}"


def _check(args: argparse.Namespace, settings: Settings, environment: dict[str, str], out: IO[str]) -> int:
    from etl.check import exit_code, format_checks, run_checks

    checks = run_checks(settings, environment, create_bucket=args.create_bucket)
    print(RedactingFilter(settings.secrets()).redact(format_checks(checks)), file=out)
    return exit_code(checks)


def _print_run_summary(out: IO[str], stats: RunStats, runner: Runner, settings: Settings, *, title: str) -> None:
    log.info("summary: %s", stats.summary_line())
    dry_run = title.startswith("Dry run")
    s = stats.sentiment
    lines = [
        "",
        f"{title}: {stats.status} in {stats.seconds:.1f}s",
        f"  posts    fetched {stats.fetched}, inserted {stats.inserted}, updated {stats.updated}, "
        f"unchanged {stats.unchanged}, rejected {stats.rejected}",
    ]
    if not dry_run:
        lines.append(
            f"  images   stored {stats.images_stored}, already archived {stats.images_skipped}, failed {stats.images_failed}"
            + (f" (of which {stats.images_retried} retried from earlier runs)" if stats.images_retried else "")
        )
    lines.append(
        f"  sentiment positive {s['positive']}, neutral {s['neutral']}, negative {s['negative']}"
        + (f", not scored {s['unscored']} (not English)" if s["unscored"] else "")
    )
    if stats.deleted_at_source or stats.forgotten_skipped or stats.rechecked:
        lines.append(
            f"  deletions {stats.deleted_at_source} post(s) gone at source ({settings.deleted_at_source}), "
            f"{stats.forgotten_skipped} forgotten post(s) not archived again"
            + (f", {stats.rechecked} held post(s) re-checked" if stats.rechecked else "")
        )
    if stats.quota_used:
        lines.append(f"  API quota units used {stats.quota_used}")
    if not dry_run and runner.db is not None and runner.store is not None:
        lines.append(f"  database {runner.db.display}")
        lines.append(f"  images   {runner.store.describe()}")
    if stats.error_count:
        # One count everywhere: the ledger's error_count. Every problem is a WARNING/ERROR log line.
        where = settings.log_file or "stderr"
        kept = f"; the first 50 are in etl_runs.errors of run {runner.run_id}" if runner.run_id else ""
        shown = min(10, len(stats.errors))
        lines.append(f"  problems {stats.error_count} (the first {shown} below; every one is logged in {where}{kept})")
        lines.extend(f"    - {e}" for e in stats.errors[:shown])
    print("\n".join(lines), file=out)
