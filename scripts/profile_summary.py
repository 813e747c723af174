"""Reads a py-spy raw profile (collapsed stacks) of an `etl.py` run and tells where the time went, per stage.

    .venv/bin/python scripts/profile_summary.py PROFILE.txt [--mode wall|gil] [--wall SECONDS] [--top N]

Two kinds of profile, both made by the benchmark (scripts/bench/) (py-spy record --format raw):
- wall: `--idle --threads`: every thread sampled, waiting or not. The main thread's samples are the run's
  critical path (stage shares of wall time); the image workers' show how busy the pool is and on what.
- gil: `--gil`: only the thread holding the GIL is sampled, so the samples are the interpreter's CPU time;
  shares are of wall time (GIL held 95% = the process is bound by one core of Python).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

RATE = 100  # samples a second

_THREAD_RE = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")
_FRAME_RE = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")

# (stage, function pattern, file pattern). The innermost frame that matches names the stage of a sample.
STAGE_RULES: list[tuple[str, str, str]] = [
    ("start-up: imports", r"_find_and_load|_call_with_frames_removed|_handle_fromlist", r"importlib"),
    ("images: verify (Pillow full decode)", r"sniff_image", r"etl/media\.py"),
    ("images: download (HTTP GET)", r"Downloader\.|URLGuard\.", r"etl/media\.py"),
    ("images: store (PUT)", r"S3Store\.put|LocalStore\.put", r"etl/store\.py"),
    ("images: other", r"Archiver\.archive_image|object_key|safe_segment", r"etl/"),
    ("sentiment (TextBlob)", r"SentimentEnricher\.", r"etl/enrich\.py"),
    ("db: stored-image lookup", r"stored_media", r"etl/db\.py"),
    ("db: upsert posts", r"upsert_posts|_post_line", r"etl/db/"),
    ("db: upsert media", r"upsert_media", r"etl/db/"),
    ("db: connect / commit", r"Database\.(transaction|connection|connect)", r"etl/db/"),
    ("waiting for image workers", r"Future\.result", r"concurrent/futures"),
    ("main: submit images to the pool", r"ThreadPoolExecutor\.submit", r"concurrent/futures"),
    ("pool idle (no work queued)", r"_worker", r"concurrent/futures/thread\.py"),
    ("parse jsonl (read, json, validate)", r"JsonlSource\.|post_from_dict|chunked|ResumeTracker\.__call__", r"etl/"),
    ("main: batch set-up (other)", r"Archiver\.(_start|plan|enrich|images)", r"etl/run/archiver\.py"),
    ("main: batch finish (other)", r"Archiver\.(load|_load)", r"etl/run/archiver\.py"),
    ("retry of failed images (query)", r"Archiver\.retry_failed_images", r"etl/run/archiver\.py"),
    ("start-up: services (connect, migrate, bucket check)", r"open_services", r"etl/run/services\.py"),
    ("run ledger, locks, state", r"Ledger\.|StreamState\.", r"etl/db/"),
    ("shutdown (pool, interpreter)", r"ThreadPoolExecutor\.shutdown|_python_exit|_shutdown", r""),
    ("summary output", r"_print_run_summary", r"etl/cli\.py"),
    ("start-up: imports", r"<module>", r"etl\.py"),  # the entrypoint's frame alone: importing etl.cli
]
_RULES = [(stage, re.compile(f), re.compile(p)) for stage, f, p in STAGE_RULES]

# Leaf functions where a thread blocks on the network or a lock rather than computing.
_WAIT_LEAF = re.compile(
    r"SocketIO\.readinto|create_connection|wait_for_read|do_poll|select|_PollLikeSelector|Condition\.wait"
    r"|_wait_for_tstate_lock|Event\.wait|SimpleQueue|get \(queue|sleep"
)
_SPLIT_BY_WAIT = ("images: download (HTTP GET)", "images: store (PUT)", "db: upsert posts", "db: upsert media",
                  "db: stored-image lookup", "db: connect / commit")  # fmt: skip


def available() -> bool:
    return py_spy() is not None


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def py_spy_command(output: Path, command: list[str], *, mode: str) -> list[str]:
    """py-spy record around `command`: wall = every thread, idle too; gil = only the GIL holder."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed")
    flags = ["--idle", "--threads"] if mode == "wall" else ["--gil", "--threads"]
    return [exe, "record", "--format", "raw", "--rate", str(RATE), *flags, "--output", str(output), "--", *command]


def frame_parts(frame: str) -> tuple[str, str]:
    m = _FRAME_RE.match(frame)
    return (m.group(1), m.group(2)) if m else (frame, "")


def stage_of(frames: tuple[str, ...]) -> str:
    if not frames:
        return "interpreter start / exit (no Python frame)"
    for frame in reversed(frames):
        func, path = frame_parts(frame)
        for stage, func_re, path_re in _RULES:
            if func_re.search(func) and path_re.search(path):
                if stage in _SPLIT_BY_WAIT:
                    waiting = bool(_WAIT_LEAF.search(frames[-1]))
                    return f"{stage}: {'waiting (I/O)' if waiting else 'CPU'}"
                return stage
    return "other"


def library_of(frame: str) -> str:
    _, path = frame_parts(frame)
    if path.startswith("<frozen"):
        return "python (import machinery)" if "importlib" in path else "python stdlib"
    head = path.split("/", 1)[0] if "/" in path else path
    return head.removesuffix(".py")


@dataclass
class Profile:
    """Collapsed stacks of one run, by thread."""

    mode: str
    wall: float
    stacks: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)  # (thread, frames, count)
    names: dict[str, str] = field(default_factory=dict)  # thread id -> name

    @property
    def samples(self) -> int:
        return sum(c for _, _, c in self.stacks)

    def main_thread(self) -> str | None:
        for tid, frames, _ in self.stacks:
            if frames and frames[0].startswith("<module> (etl.py"):
                return tid
        return None

    def worker_ids(self) -> set[str]:
        return {tid for tid in self.names if re.match(r"(images|retry)_\d+", self.names[tid])}

    @property
    def worker_threads(self) -> int:
        return len(self.worker_ids())

    def _shares(self, threads: set[str] | None) -> list[tuple[str, float]]:
        by_stage: Counter = Counter()
        for tid, frames, count in self.stacks:
            if threads is None or tid in threads:
                by_stage[stage_of(frames)] += count
        total = sum(by_stage.values()) or 1
        return [(stage, n / total) for stage, n in by_stage.most_common()]

    def main_stages(self) -> list[tuple[str, float]]:
        main = self.main_thread()
        return self._shares({main} if main else set())

    def worker_stages(self) -> list[tuple[str, float]]:
        workers = self.worker_ids()
        return self._shares(workers) if workers else []

    def report(self, mode: str, top: int = 15) -> list[str]:
        lines: list[str] = []
        if mode == "wall":
            main = self.main_thread()
            lines.append(f"profile (wall, every thread incl. idle): main thread's top functions, {self.wall:.1f} s run")
            lines.extend(self._top({main} if main else set(), top, total=None))
            return lines
        ticks = max(self.wall * RATE, 1)
        held = self.samples / ticks
        lines.append(
            f"profile (GIL holder only = the interpreter's CPU): GIL held {held * 100:.0f}% of the {self.wall:.1f} s run "
            f"({self.samples:,} samples at {RATE}/s)"
        )
        lines.append("  by stage, share of wall time with the GIL held:")
        by_stage: Counter = Counter()
        for _, frames, count in self.stacks:
            by_stage[stage_of(frames)] += count
        for stage, n in by_stage.most_common():
            if n / ticks >= 0.005:
                lines.append(f"    {stage:<52} {n / ticks * 100:5.1f} %")
        lines.append("  by library (self time), share of wall time:")
        by_lib: Counter = Counter()
        for _, frames, count in self.stacks:
            if frames:
                by_lib[library_of(frames[-1])] += count
        for lib, n in by_lib.most_common(12):
            lines.append(f"    {lib:<52} {n / ticks * 100:5.1f} %")
        lines.extend(self._top(None, top, total=ticks))
        return lines

    def _top(self, threads: set[str] | None, top: int, total: float | None) -> list[str]:
        own: Counter = Counter()
        inclusive: Counter = Counter()
        for tid, frames, count in self.stacks:
            if threads is not None and tid not in threads:
                continue
            if frames:
                own[_strip_line(frames[-1])] += count
            for frame in {_strip_line(f) for f in frames}:
                inclusive[frame] += count
        denominator = total or sum(own.values()) or 1
        lines = [f"  top {top} by self time (% of {'wall' if total else 'thread samples'}):"]
        lines += [f"    {n / denominator * 100:5.1f} %  {frame}" for frame, n in own.most_common(top)]
        ours = [(f, n) for f, n in inclusive.most_common() if "(etl/" in f][:top]
        lines.append(f"  top {top} of the package's functions by inclusive time:")
        lines += [f"    {n / denominator * 100:5.1f} %  {frame}" for frame, n in ours]
        return lines


def _strip_line(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def load(path: Path, *, mode: str, wall: float | None = None) -> Profile:
    """Parse py-spy's raw output: `thread (TID): NAME;frame;frame ... COUNT` per line."""
    names: dict[str, str] = {}
    merged: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        tid = "?"
        if parts and (m := _THREAD_RE.match(parts[0])):
            tid = m.group(1)
            if m.group(2):
                names[tid] = m.group(2)
            parts = parts[1:]
        merged[(tid, tuple(parts))] += int(count)
    stacks = [(tid, frames, n) for (tid, frames), n in merged.items()]
    profile = Profile(mode=mode, wall=wall or 0.0, stacks=stacks, names=names)
    main = profile.main_thread()
    if mode == "wall" and main is not None:
        # Every thread is sampled at every tick, so the main thread's samples measure the sampled wall time.
        profile.wall = sum(n for t, _, n in stacks if t == main) / RATE
    elif wall is None:
        raise ValueError("a GIL profile needs the run's wall time (--wall)")
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--mode", choices=("wall", "gil"), default="wall")
    parser.add_argument("--wall", type=float, help="wall seconds of the run (needed for --mode gil)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    profile = load(args.profile, mode=args.mode, wall=args.wall)
    if args.mode == "wall":
        print(f"main thread, share of wall time ({profile.wall:.1f} s):")
        for stage, share in profile.main_stages():
            print(f"  {stage:<52} {share * 100:5.1f} %")
        if profile.worker_threads:
            print(f"image workers ({profile.worker_threads} threads), share of their time:")
            for stage, share in profile.worker_stages():
                print(f"  {stage:<52} {share * 100:5.1f} %")
    print("\n".join(profile.report(args.mode, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
