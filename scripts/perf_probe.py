"""CPU, wall time and peak RSS of the metadata path, for issue 16's changes (`python -m scripts.bench` stays the side-by-side one).

    .venv/bin/python scripts/perf_probe.py [--posts 20000] [--runs first,rerun,reenrich]
    .venv/bin/python scripts/perf_probe.py --stages [--posts 20000]   # in-process: records, language, score

Each `etl.py` run is a child process timed with wait4 (its own user+sys CPU and peak RSS, like /usr/bin/time
-v) against a fresh database of an embedded PostgreSQL in a temporary directory. The machine is shared, so
CPU seconds are the figure to compare; wall time is printed too. The reenrich run uses another sentiment
threshold only, so it measures the relabelling from stored polarities (no model loaded, nothing scored again);
`python -m scripts.bench --only reenrich` measures that and a full re-score.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_WORDS = (
    "the a this my our new old first morning night day city street beach park coffee dinner trip road view "
    "light rain sun sky river mountain friends family team launch release photo walk game show album book "
    "with from at in on for after again still just finally today tomorrow love amazing great happy awesome "
    "best fun perfect good nice bad terrible awful sad worst boring broken tired ugly poor wrong late"
).split()
_TAGS = ("travel", "food", "photography", "nature", "music", "tech", "sports", "art")


def write_posts(path: Path, count: int, seed: int = 16) -> None:
    """`count` posts without images; every caption differs (a number at its end), some carry a language."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            words = rng.choices(_WORDS, k=rng.randint(6, 27))
            if rng.random() < 0.2:
                words.append(f"@user{rng.randrange(1000)}")
            words.extend("#" + t for t in rng.sample(_TAGS, rng.randint(0, 3)))
            platform = ("instagram", "twitter", "youtube")[n % 3]
            post = {
                "platform": platform,
                "post_id": f"probe-{n:07d}",
                "author_username": f"author{rng.randrange(5000)}",
                "caption": f"{' '.join(words)} {n}",
                "created_at": (now - timedelta(seconds=count - n)).isoformat(),
                "like_count": rng.randrange(100_000),
                "comment_count": rng.randrange(5_000),
                "permalink": f"https://{platform}.example/p/{n}",
                "image_urls": [],
            }
            out.write(json.dumps(post) + "\n")


def run_etl(argv: list[str], env: dict[str, str], log: Path, profile: Path | None = None) -> dict[str, float]:
    started = time.perf_counter()
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    with log.open("wb") as out:
        root = Path(env["PYTHONPATH"])
        proc = subprocess.Popen([sys.executable, *prefix, str(root / "etl.py"), *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=root)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text(errors="replace")[-3000:])
    return {
        "exit": code, "wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime,
        "user": usage.ru_utime, "sys": usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
    }  # fmt: skip


def runs(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="perf-probe-") as tmp:
        posts = Path(tmp) / "posts.jsonl"
        write_posts(posts, args.posts)
        env = {
            "PATH": os.environ.get("PATH", ""), "HOME": tmp, "LANG": "C.UTF-8", "PYTHONPATH": str(args.root or ROOT),
            "ETL_DATA_DIR": str(Path(tmp) / "data"), "ETL_LOG_LEVEL": "INFO",
            # The unpacked language model of earlier runs (etl/language.py); --cold: none yet.
            "XDG_CACHE_HOME": str(Path(tmp) / "cache") if args.cold else (
                os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")),
        }  # fmt: skip
        run_etl(["migrate"], env, Path(tmp) / "migrate.log")  # the embedded server's start-up, not measured
        plan = {
            "first": (["run", "--source", "jsonl", "--input", str(posts)], {}),
            "rerun": (["run", "--source", "jsonl", "--input", str(posts)], {}),
            "reenrich": (["reenrich"], {"SENTIMENT_THRESHOLD": "0.0625"}),
        }
        print(f"{args.posts:,} posts; CPU = user+sys of the etl.py process (PostgreSQL's not included)")
        for name in args.runs.split(","):
            argv, extra = plan[name]
            profile = Path(tmp) / f"{name}.prof" if args.profile else None
            r = run_etl(argv, {**env, **extra}, Path(tmp) / f"{name}.log", profile)
            per20k = r["cpu"] * 20_000 / args.posts
            print(
                f"{name:9} exit {r['exit']}  wall {r['wall']:6.2f} s  {args.posts / r['wall']:8,.0f} posts/s  "
                f"CPU {r['cpu']:6.2f} s (user {r['user']:.2f}, sys {r['sys']:.2f}; {per20k:.2f} s per 20k)  "
                f"peak RSS {r['rss_mb']:.0f} MB"
            )
            if profile:
                import pstats

                pstats.Stats(str(profile)).sort_stats(args.profile).print_stats(args.top)
        if args.keep_log:
            for log in Path(tmp).glob("*.log"):
                print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-args.keep_log :]))


def stages(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.root or ROOT))
    from etl.enrich import SentimentEnricher
    from etl.records import post_from_dict

    with tempfile.TemporaryDirectory(prefix="perf-probe-") as tmp:
        path = Path(tmp) / "posts.jsonl"
        write_posts(path, args.posts)
        data = [json.loads(line) for line in path.open(encoding="utf-8")]
    t = time.process_time()
    posts = [post_from_dict(d) for d in data]
    print(f"records   {time.process_time() - t:.3f} CPU s")
    enricher = SentimentEnricher()
    enricher.decide_caption("warm up the language model and the lexicon")
    captions = [p.caption for p in posts]
    t = time.process_time()
    if hasattr(enricher, "decide_captions"):
        enricher.decide_captions([(c, None) for c in captions])
    else:
        [enricher.decide_caption(c) for c in captions]
    print(f"decide    {time.process_time() - t:.3f} CPU s (language + score of {len(captions):,} captions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--runs", default="first,rerun,reenrich")
    parser.add_argument("--stages", action="store_true", help="in-process CPU of records and enrichment only")
    parser.add_argument("--root", type=Path, help="run the etl.py of another checkout (e.g. the code before)")
    parser.add_argument("--cold", action="store_true", help="no unpacked language model from earlier runs")
    parser.add_argument("--profile", metavar="SORT", help="cProfile each run (main process), sorted by SORT")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    parser.add_argument("--keep-log", type=int, default=0, metavar="LINES", help="print the last LINES of each log")
    args = parser.parse_args()
    stages(args) if args.stages else runs(args)


if __name__ == "__main__":
    main()
