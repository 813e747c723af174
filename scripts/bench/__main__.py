"""`make bench`: the archiver side by side with its peers, every scenario in one run, on services it starts itself.

    .venv/bin/python -m scripts.bench                          # every scenario (about 15-25 minutes)
    .venv/bin/python -m scripts.bench --only images,metadata   # some scenarios
    .venv/bin/python -m scripts.bench --quick                  # a smoke run of every scenario, small sizes

Scenarios (scripts/bench/scenarios.py): images (vs gallery-dl), ceiling (vs the S3 endpoint's own ceiling and a
serial archiver), metadata (vs dlt), reenrich, memory, growth, scaleout, export, insights. The peers come from
requirements-bench.txt; a scenario whose peer is missing says so. Figures are printed with the ratios, the
targets and what is unfair each way; nothing asserts: the exit code is 1 only when an etl.py run failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if not __package__:  # run as `python scripts/bench`: make `scripts.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts import profile_summary  # noqa: E402
from scripts.bench import report  # noqa: E402
from scripts.bench.measure import SETTLE_TIMEOUT_S, Runner, busy_before, code_version  # noqa: E402
from scripts.bench.scenarios import SCENARIOS, Bench  # noqa: E402
from scripts.bench.services import ROOT, Services  # noqa: E402

# name: (full size, --quick size); a size given on the command line wins over both.
SIZES: dict[str, tuple[Any, Any]] = {
    "posts": (2_000, 150),
    "rounds": (5, 2),
    "warm_up": (4_000, 200),
    "baseline_posts": (100, 20),
    "images": (1_000, 100),
    "metadata_posts": (20_000, 2_000),
    "reenrich_posts": (200_000, 5_000),
    "memory_posts": ((10_000, 100_000), (1_000, 5_000)),
    "growth_posts": ((20_000, 1_000_000), (2_000, 10_000)),
    "scaleout_streams": (24, 4),
    "scaleout_posts": (40, 10),
    "shards": ((1, 2, 4), (1, 2)),
    "export_rows": (1_000_000, 20_000),
    "writer_rows": (200_000, 5_000),
    "insights_posts": (1_000_000, 20_000),
    "lookups": (200, 20),
    "repeat": (3, 1),
    "settle_timeout": (SETTLE_TIMEOUT_S, 0.0),  # a smoke run does not wait (its note says when it would have)
}


def scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = parser.add_argument
    add("--only", type=scenario_list, default=list(SCENARIOS), metavar="A,B", help=f"scenarios: {', '.join(SCENARIOS)}")
    add("--quick", action="store_true", help="a smoke run: small sizes, 2 ceiling rounds, no profile")
    add("--latency-ms", type=float, default=50.0, help="image host latency per request (default 50)")
    add("--concurrency", type=int, help="ETL_CONCURRENCY of etl.py (default: its own)")
    add("--set", action="append", default=[], metavar="NAME=VALUE", help="extra environment for etl.py")
    add("--no-profile", dest="profile", action="store_false", help="skip the py-spy profiled runs")
    add("--profile-dir", type=Path, help="keep the raw py-spy profiles (collapsed stacks) here")
    add("--top", type=int, default=15, help="functions listed per profile (default 15)")
    add("--settle-timeout", type=float, metavar="S", help="on ext4 without a journal, the longest wait before a "
        "scenario that creates files, for recent deletions to stop slowing it; 0 = no wait "
        f"(default {SETTLE_TIMEOUT_S:g}, --quick 0)")  # fmt: skip
    add("--repeat", type=int, metavar="N", help="runs of ours, of dlt and of the 16 gallery-dl processes for each "
        "figure of images, metadata and reenrich; the figure is the run of median time (default 3)")
    images = parser.add_argument_group("images (vs gallery-dl)")
    images.add_argument("--images", type=int, help="images (default 1,000)")
    images.add_argument("--gallery-dl-processes", type=int, default=16, help="parallel gallery-dl (default 16)")
    ceiling = parser.add_argument_group("ceiling (vs the S3 endpoint's own ceiling and a serial archiver)")
    ceiling.add_argument("--posts", type=int, help="posts (default 2,000)")
    ceiling.add_argument("--images-per-post", type=int, default=1, help="images per post (default 1)")
    ceiling.add_argument("--store", choices=("s3", "local"), default="s3", help="object store of the ETL (default s3)")
    ceiling.add_argument("--rounds", type=int, help="rounds of ceiling and ours; the target reads the median (default 5)")
    ceiling.add_argument("--ceiling-threads", type=int, default=16, help="threads of the ceiling (default 16)")
    ceiling.add_argument("--warm-up", type=int, help="PUTs that bring the endpoint to its steady state (default 4,000)")
    ceiling.add_argument("--baseline-posts", type=int, help="posts of the serial baseline (default 100)")
    meta = parser.add_argument_group("metadata (vs dlt), reenrich, memory, growth")
    meta.add_argument("--metadata-posts", type=int, help="posts (default 20,000)")
    meta.add_argument("--dlt-formats", nargs="+", default=["insert_values", "csv"], help="dlt loader file formats")
    meta.add_argument("--reenrich-posts", type=int, metavar="N", help="the larger archive re-scored once after the "
                      "metadata one, 0 = none (default 200,000)")
    meta.add_argument("--memory-posts", type=int, nargs=2, metavar=("SMALL", "LARGE"), help="default 10,000 100,000")
    meta.add_argument("--growth-posts", type=int, nargs=2, metavar=("SMALL", "LARGE"), help="default 20,000 1,000,000")
    other = parser.add_argument_group("scaleout, export, insights")
    other.add_argument("--scaleout-streams", type=int, help="streams (default 24)")
    other.add_argument("--scaleout-posts", type=int, help="posts per stream, one image each (default 40)")
    other.add_argument("--worker-concurrency", type=int, default=8, help="ETL_CONCURRENCY of each worker (default 8)")
    other.add_argument("--shards", type=lambda t: tuple(int(x) for x in t.split(",")), help="default 1,2,4")
    other.add_argument("--export-rows", type=int, help="posts to export (default 1,000,000)")
    other.add_argument("--writer-rows", type=int, help="rows of the pyarrow/DuckDB comparison, 0 = skip (default 200,000)")
    other.add_argument("--insights-posts", type=int, help="posts of the insights (default 1,000,000)")
    other.add_argument("--lookups", type=int, help="random `similar` lookups (default 200)")
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.quick:
        args.profile = False
    if args.posts < 1 or args.images_per_post < 1 or args.latency_ms < 0 or args.rounds < 1 or args.repeat < 1:
        parser.error("--posts, --images-per-post, --rounds and --repeat must be positive, --latency-ms not negative")
    if args.settle_timeout < 0:
        parser.error("--settle-timeout must not be negative")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every service is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    sys.path.insert(0, str(ROOT))
    if args.profile and not profile_summary.available():
        print("note: py-spy is not installed; no per-stage profile (pip install py-spy)", file=sys.stderr)
    busy = busy_before()
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, code {code_version()}"
    if busy > 20:
        machine += f"; WARNING: the machine was {busy:.0f}% busy before the benchmark started (other processes)"
        print(f"bench: the machine is {busy:.0f}% busy before the start: figures will be low and noisy", file=sys.stderr)
    started = time.perf_counter()
    results: list[report.Result] = []
    try:
        with ExitStack() as stack:
            services = Services(stack, latency_ms=args.latency_ms, concurrency=args.concurrency, extra_env=args.set)
            bench = Bench(args, services, Runner(services, args.profile_dir), machine)
            for name in args.only:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                result = SCENARIOS[name](bench)
                results.append(result)
                dropped = bench.tidy()
                if dropped:
                    print(f"bench: databases dropped: {', '.join(dropped)}", file=sys.stderr, flush=True)
                print(report.render(result), flush=True)
            print(report.summary(results, machine), flush=True)
    except KeyboardInterrupt:
        print("\nbench: interrupted; services stopped", file=sys.stderr)
        return 130
    print(f"\nbench: done in {time.perf_counter() - started:.0f} s; every service stopped", file=sys.stderr)
    if bench.runner.failed:
        # Not a speed verdict: the figures above include runs that did not archive everything.
        print(f"bench: etl.py failed in: {', '.join(bench.runner.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
