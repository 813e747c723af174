"""The commands that turn the archive into answers: fingerprint, similar, trends, report (issue 14)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from etl.config import Settings
from etl.errors import ExitCode, UsageError

if TYPE_CHECKING:
    import argparse  # a plain run reads its arguments without it (etl/cli_args.py)

COMMANDS = ("fingerprint", "similar", "trends", "report")


def add_parsers(command: Callable[..., Any], parse_date: Callable[[str], datetime]) -> None:
    """The insight commands, through the CLI's `command(name, help, *examples)` (help with examples and exit codes)."""
    from etl.trends import parse_duration

    def duration(value: str) -> Any:
        try:
            return parse_duration(value)
        except ValueError as exc:
            import argparse

            raise argparse.ArgumentTypeError(str(exc)) from None

    fingerprint = command(
        "fingerprint", "perceptual hashes for stored images that have none (resumable)", "python etl.py fingerprint"
    )
    fingerprint.add_argument("--workers", type=int, default=4, metavar="N", help="objects read and hashed at once (default 4)")

    similar = command(
        "similar", "where a post's images were seen again (exact, then near duplicates)",
        "python etl.py similar --post youtube:dQw4w9WgXcQ", "python etl.py similar --post twitter:1849 --json",
    )  # fmt: skip
    similar.add_argument("--post", required=True, metavar="PLATFORM:POST_ID", help="the post whose images to look for")
    similar.add_argument("--json", action="store_true", help="machine-readable output")

    trends = command(
        "trends", "rising hashtags: the last window against its trailing baseline",
        "python etl.py trends", "python etl.py trends --window 6h --baseline 7d --platform mastodon --json",
    )  # fmt: skip
    trends.add_argument("--window", type=duration, default=duration("24h"), metavar="DURATION", help="default 24h")
    trends.add_argument("--baseline", type=duration, default=duration("28d"), metavar="DURATION", help="default 28d")
    trends.add_argument("--platform", metavar="NAME", help="only this platform (default: all)")
    trends.add_argument("--limit", type=int, default=25, metavar="N", help="hashtags listed (default 25)")
    trends.add_argument("--json", action="store_true", help="machine-readable output")

    report = command(
        "report", "one self-contained HTML report of the archive",
        "python etl.py report", "python etl.py report --since 2026-11-01 --platform bluesky --out november.html",
    )  # fmt: skip
    report.add_argument("--since", type=parse_date, metavar="DATE", help="only posts created on or after DATE")
    report.add_argument("--until", type=parse_date, metavar="DATE", help="exclusive")
    report.add_argument("--platform", metavar="NAME", help="only this platform (default: all)")
    report.add_argument("--out", metavar="FILE.html", help="default ETL_DATA_DIR/report.html")


def json_text(value: object) -> str:
    """A command's `--json` output: indented, non-ASCII kept, datetimes in ISO 8601, durations in seconds."""
    return json.dumps(value, default=_json_default, indent=2, ensure_ascii=False)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "total_seconds"):
        return value.total_seconds()
    return str(value)


def dispatch(command: str, args: argparse.Namespace, settings: Settings, out: IO[str], stop: threading.Event) -> int:
    from etl.run.services import open_services  # only when a command runs (--help, status need none of it)

    services = open_services(settings, check_store=command in ("fingerprint", "report"))
    db = services.db
    assert db is not None
    if command == "fingerprint":
        from etl.fingerprint import ALGORITHM, VERSION, fingerprint_stored

        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        stats = fingerprint_stored(db, services.store, batch_size=settings.batch_size, workers=args.workers, should_stop=stop.is_set)
        print(
            f"Fingerprints ({ALGORITHM} v{VERSION}): {stats.hashed} image(s) hashed, {stats.failed} failed, in {stats.seconds:.1f}s",
            file=out,
        )
        for error in stats.errors or []:
            print(f"  - {error}", file=out)
        return int(ExitCode.PARTIAL if stats.failed else ExitCode.OK)
    if command == "similar":
        from etl.similar import find_similar, format_similar, parse_post_ref

        platform, post_id = parse_post_ref(args.post)
        result = find_similar(db, platform, post_id, settings.similar_max_distance)
        text = json_text(result) if args.json else format_similar(result)
        print(text, file=out)
        return int(ExitCode.OK)
    if command == "trends":
        from etl.trends import collect_trends, format_trends

        if args.window > args.baseline:
            raise UsageError("--baseline must be at least as long as --window")
        report = collect_trends(db, args.window, args.baseline, args.platform, settings.trends_min_count, args.limit)
        text = json_text(report) if args.json else format_trends(report)
        print(text, file=out)
        return int(ExitCode.OK)
    from etl.report import Scope, write_report

    if args.since and args.until and args.until <= args.since:
        raise UsageError("--until must be after --since")
    path = args.out or str(settings.data_dir / "report.html")
    data = write_report(
        db, services.store, Scope(args.since, args.until, args.platform), path,
        max_distance=settings.similar_max_distance, min_count=settings.trends_min_count,
    )  # fmt: skip
    t = data["totals"]
    from pathlib import Path

    print(
        f"Report: {Path(path).resolve()} ({data['bytes'] / 1024:,.0f} KB; {t['posts']} posts, {t['images_stored']} images;"
        f" SQL {data['timings']['sql']:.2f}s, rendering {data['timings']['render']:.2f}s)",
        file=out,
    )
    return int(ExitCode.OK)
