"""The `verify` and `forget` commands: their arguments, their run, their summary."""

from __future__ import annotations

import logging
import threading
from datetime import timezone
from typing import IO, TYPE_CHECKING, Any

from etl.config import Settings
from etl.errors import ExitCode, UsageError

if TYPE_CHECKING:
    import argparse  # a plain run reads its arguments without it (etl/cli_args.py)

log = logging.getLogger("etl")


def _fraction(value: str) -> float:
    import argparse  # (a type= of argparse's: it is loaded)

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError("--sample must be a fraction above 0 and at most 1 (e.g. 0.1)")
    return number


def _minutes(value: str) -> float:
    import argparse

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of minutes") from None
    if not 0 <= number <= 24 * 60:
        raise argparse.ArgumentTypeError("--wait must be between 0 and 1440 minutes")
    return number


def add_parsers(command: Any, parse_date: Any) -> None:
    """verify and forget, through the CLI's `command(name, help, *examples)`."""
    verify = command(
        "verify", "fixity: read stored objects back and compare them with their sha256",
        "python etl.py verify", "python etl.py verify --sample 0.05     # a twentieth, least recently checked first",
    )  # fmt: skip
    verify.add_argument("--sample", type=_fraction, metavar="F", help="check this fraction, least recently checked first")
    verify.add_argument("--platform", metavar="NAME", help="only this platform (default: all)")
    verify.add_argument("--since", type=parse_date, metavar="DATE", help="only posts created since DATE")

    forget = command(
        "forget", "remove posts, their images and rows, and keep a tombstone",
        "python etl.py forget --post twitter:1849 --reason 'author request'",
        "python etl.py forget --author mastodon:alice@example.social          # lists what would go",
        "python etl.py forget --author mastodon:alice@example.social --yes",
    )  # fmt: skip
    target = forget.add_mutually_exclusive_group(required=True)
    target.add_argument("--post", metavar="PLATFORM:POST_ID", help="one post (removed at once)")
    target.add_argument("--author", metavar="PLATFORM:USERNAME", help="every post of an author (lists them unless --yes)")
    forget.add_argument("--reason", metavar="TEXT", help="recorded in the tombstone (no content of the post)")
    forget.add_argument("--yes", action="store_true", help="execute (needed with --author)")
    forget.add_argument(
        "--wait", type=_minutes, default=30.0, metavar="MINUTES",
        help="wait this long for runs in progress to finish (default 30; 0: do not wait)",
    )  # fmt: skip


def verify_command(args: argparse.Namespace, settings: Settings, out: IO[str], stop: threading.Event) -> int:
    # Imported here, not at the top: every command builds the parser, only `verify` needs these (and the metrics).
    from etl.copystore import refuse_if_elsewhere
    from etl.db import Ledger
    from etl.logs import RedactingFilter
    from etl.run.services import open_services
    from etl.verify import Scope, Verifier, VerifyStats, write_verify_metrics

    scope = Scope(platform=args.platform, since=args.since, sample=args.sample)
    services = open_services(settings)
    # Images still in another store would all read as missing here, and be marked failed (copy-store then skips them).
    why = "a verify would look for them in the configured store, find none, and mark them failed"
    refuse_if_elsewhere(services.db, services.store, settings, why=why)
    stats = VerifyStats()
    unit = f"verify {args.platform or '*'}"
    recording = Ledger(services.db).locked_recording(
        "verify", unit, [args.platform or "*"], {"scope": scope.arguments()}, stats,
        busy=f"{unit} is running", stop=stop, redact=RedactingFilter(settings.secrets()).redact,
    )  # fmt: skip
    try:
        with recording:
            Verifier(settings, services.db, services.store, should_stop=stop.is_set).run(scope, stats)
    finally:
        if settings.metrics_path:
            write_verify_metrics(settings.metrics_path, stats)
    log.info(
        "summary: verify checked=%d ok=%d missing=%d changed=%d unreadable=%d unexpected=%d in %.1fs",
        stats.checked, stats.ok, stats.missing, stats.changed, stats.unreadable, stats.unexpected, stats.seconds,
    )  # fmt: skip
    lines = [
        "",
        f"Fixity check: {stats.status} in {stats.seconds:.1f}s ({services.store.describe()})",
        f"  objects  checked {stats.checked}, ok {stats.ok}, missing {stats.missing}, changed {stats.changed}, "
        f"unreadable {stats.unreadable}; {stats.bytes_read / 1e6:.1f} MB read",
        "  unexpected objects "
        + (str(stats.unexpected) if stats.listed else "not looked for (a sampled check, or the listing failed)"),
    ]
    if stats.changed_meanwhile:
        lines.append(f"  {stats.changed_meanwhile} image(s) forgotten or stored again by a run while read: not judged")
    if stats.resumed_from:
        lines.append(f"  continued the check interrupted at {stats.resumed_from:%Y-%m-%d %H:%M:%S %Z}")
    if stats.missing or stats.changed:
        lines.append("  missing and changed images are marked failed and refetched by the next run")
    lines += stats.problem_lines(stats.problems)
    print("\n".join(lines), file=out)
    return int(stats.exit_code)


def forget_command(args: argparse.Namespace, settings: Settings, out: IO[str]) -> int:
    from etl.copystore import refuse_if_elsewhere
    from etl.db import Ledger
    from etl.db.ledger import release_locks
    from etl.forget import find_posts, forget_posts, parse_target
    from etl.run.services import open_services

    post = parse_target(args.post, "--post") if args.post else None
    author = parse_target(args.author, "--author") if args.author else None
    if author is not None and author[1].startswith("@"):
        author = (author[0], author[1][1:])
    services = open_services(settings)
    # forget deletes objects from the configured store: a post's images elsewhere would stay, and no row name them.
    why = "a forget would delete a post's images from the configured store only, and leave them where they are"
    refuse_if_elsewhere(services.db, services.store, settings, why=why)
    if author is not None and not args.yes:
        posts = find_posts(services.db, post=post, author=author)
        if not posts:
            raise UsageError(f"no archived post by {author[0]}:{author[1]}")
        print(f"\nWould forget {len(posts)} post(s) by {author[0]}:{author[1]} (run again with --yes to do it):", file=out)
        for platform, post_id, created_at in posts[:200]:
            print(f"  {platform}:{post_id}  {created_at.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC", file=out)
        if len(posts) > 200:
            print(f"  ... and {len(posts) - 200} more", file=out)
        return int(ExitCode.OK)

    def waiting(runs: str) -> None:
        print(f"waiting for {runs} to finish (at most {args.wait:g} min; --wait) ...", file=out, flush=True)

    # Runs, backfills, copy-store and export hold the archive's lock shared while they work: a post one of them
    # looked up before its tombstone would be loaded again (its images stored again) after the forget.
    lock = Ledger(services.db).forget_lock(args.wait * 60, waiting)
    try:
        posts = find_posts(services.db, post=post, author=author)
        if author is not None and not posts:
            raise UsageError(f"no archived post by {author[0]}:{author[1]}")
        result = forget_posts(services.db, services.store, settings, posts, args.reason)
    finally:
        release_locks(lock)
    held = sum(1 for p in posts if p[2] is not None)
    rows = ", ".join(f"{table} {n}" for table, n in sorted(result.rows.items()) if n) or "none"
    print(
        f"\nForgot {len(posts)} post(s) ({held} archived): {result.objects} object(s) deleted, rows deleted: {rows}; "
        f"tombstone(s) recorded: {result.tombstones} (never archived again)",
        file=out,
    )
    return int(ExitCode.OK)
