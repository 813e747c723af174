"""How the benchmark measures: wall time from process start, peak RSS (the measured process's own VmHWM), CPU
(its own, and the services' and the machine's meanwhile), and the completeness checks that make a figure count."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from scripts import profile_summary
from scripts.bench.services import PYTHON, ROOT, Services, stop_process

# The child reports its own peak RSS (VmHWM of its address space) as it exits. wait4's ru_maxrss would not do:
# Linux carries the pre-exec high-water mark over exec, and subprocess forks with vfork, so it would report the
# benchmark's own peak (its images, its expected checksums) instead of the measured process's.
_VMHWM_CHILD = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    import resource
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("bench-peak-rss-kb", hwm.split()[1], file=sys.stderr, flush=True)
    # The largest of its scoring workers (reaped by then), each counted with what it shares with etl.py.
    print("bench-workers-peak-rss-kb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr, flush=True)
    import os
    if os.environ.get("BENCH_MODULES_TO"):  # the modules it loaded that are not ours (the floor loads them too)
        with open(os.environ["BENCH_MODULES_TO"], "w") as out:
            out.write("\\n".join(sorted(n for n, m in list(sys.modules.items())
                                         if m is not None and n != "__main__" and n.partition(".")[0] != "etl")))
"""
_VMHWM_RE = re.compile(r"^bench-peak-rss-kb (\d+)$", re.MULTILINE)
_WORKERS_HWM_RE = re.compile(r"^bench-workers-peak-rss-kb (\d+)$", re.MULTILINE)
SUMMARY_RE = re.compile(r"summary: (.*)$", re.MULTILINE)


@dataclass
class EtlRun:
    """One `etl.py` subprocess: what it cost and what it said."""

    label: str
    returncode: int
    wall: float
    peak_rss_mb: float  # VmHWM of the etl.py process itself
    cpu: float  # user + system seconds of the ETL process (and its reaped children: reenrich's workers)
    cpu_sys: float = 0.0  # of which in the kernel
    summary: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # per-stage seconds, if the pipeline logs them
    log_path: Path | None = None
    workers_peak_rss_mb: float = 0.0  # the largest of its forked scoring workers (ru_maxrss of its reaped children)
    profile: profile_summary.Profile | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""


def parse_summary(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """`posts fetched=2000 inserted=... | images stored=... | sentiment ... | 12.3s` -> {"posts.fetched": 2000,
    ..., "seconds": 12.3}, plus any `name=1.23s` stage timings the pipeline may add."""
    matches = SUMMARY_RE.findall(text)
    if not matches:
        return {}, {}
    counts: dict[str, float] = {}
    stages: dict[str, float] = {}
    for section in matches[-1].split("|"):
        words = section.split()
        if not words:
            continue
        if len(words) == 1 and (m := re.fullmatch(r"([\d.]+)s", words[0])):
            counts["seconds"] = float(m.group(1))
            continue
        group = words[0] if "=" not in words[0] else ""
        for word in words:
            if m := re.fullmatch(r"([\w.-]+)=([\d.]+)(s?)", word):
                key = f"{group}.{m.group(1)}" if group else m.group(1)
                (stages if m.group(3) else counts)[key] = float(m.group(2))
    return counts, stages


class Runner:
    """Runs the real `etl.py` as a child of its own, on the services, and measures it."""

    def __init__(self, services: Services, profile_dir: Path | None = None):
        self.services = services
        self.profile_dir = profile_dir
        self.failed: list[str] = []  # runs of etl.py that did not exit 0

    def etl(
        self, label: str, input_path: Path | None, env: dict[str, str], *, profile: str | None = None, argv: tuple = ()
    ) -> EtlRun:
        """`etl.py run --source jsonl --input FILE` (or `etl.py ARGV`); `profile` = "wall" or "gil" runs it under
        py-spy."""
        tmp = self.services.tmp
        log_path = tmp / f"{label}.log"
        etl_argv = argv or ("run", "--source", "jsonl", "--input", str(input_path))
        command = [PYTHON, "-c", _VMHWM_CHILD, str(ROOT / "etl.py"), *etl_argv]
        raw_path = tmp / f"{label}.pyspy.txt"
        if profile:
            command = profile_summary.py_spy_command(raw_path, command, mode=profile)
        with log_path.open("wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
            self.services.children.append(proc)
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU, exactly (no polling)
            except BaseException:
                stop_process(proc)
                raise
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        counts, stages = parse_summary(text)
        hwm = _VMHWM_RE.findall(text)
        workers_hwm = _WORKERS_HWM_RE.findall(text)
        run = EtlRun(
            label=label,
            returncode=proc.returncode,
            wall=wall,
            peak_rss_mb=int(hwm[-1]) / 1024 if hwm else usage.ru_maxrss / 1024,
            cpu=usage.ru_utime + usage.ru_stime,
            cpu_sys=usage.ru_stime,
            summary=counts,
            stages=stages,
            log_path=log_path,
            workers_peak_rss_mb=int(workers_hwm[-1]) / 1024 if workers_hwm else 0.0,
        )
        if proc.returncode != 0:
            self.failed.append(f"{label} (exit {proc.returncode})")
            tail = "\n".join(text.splitlines()[-15:])
            print(f"  ! {label}: etl.py exited {proc.returncode}; last lines of {log_path}:\n{tail}", file=sys.stderr)
        if profile and raw_path.is_file():
            run.profile = profile_summary.load(raw_path, mode=profile, wall=wall)
            if self.profile_dir:
                self.profile_dir.mkdir(parents=True, exist_ok=True)
                (self.profile_dir / raw_path.name).write_bytes(raw_path.read_bytes())
        return run

    def floor(self, input_path: Path, env: dict[str, str], imports: Sequence[str] = ()) -> tuple[float, str]:
        """Wall seconds of scripts/bench/floor.py over `input_path` (the least a Python rerun does), started as
        etl.py is (the same wrapper), after loading `imports`; and what it printed (how many posts and images it
        found held), or why it failed."""
        command = [PYTHON, "-c", _VMHWM_CHILD, str(ROOT / "scripts" / "bench" / "floor.py"), str(input_path)]
        if imports:
            command += ["--import", ",".join(imports)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=self.services.tmp, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        found = done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()[-300:]}"
        return wall, found

    @staticmethod
    def command() -> list[str]:
        """`etl.py` as a plain child (no peak-RSS report), for runs that start several at once."""
        return [PYTHON, str(ROOT / "etl.py")]

    def startup(self) -> float:
        """Wall seconds of `etl.py --version`: the interpreter plus every import, before any work."""
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, str(ROOT / "etl.py"), "--version"], env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
            cwd=self.services.tmp, capture_output=True, check=False,
        )  # fmt: skip
        return time.perf_counter() - started


def timed(commands: list[list[str]], env: dict[str, str], logs: list[Path], cwd: Path) -> tuple[float, int, float]:
    """Start every command at once; (wall seconds from their start until the last ends, the worst exit code, the
    CPU seconds of them all: user + system, each process's own and its reaped children's)."""
    started = time.perf_counter()
    outs = [log.open("wb") for log in logs]
    codes, cpu = [], 0.0
    try:
        procs = [
            subprocess.Popen(c, stdout=o, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            for c, o in zip(commands, outs, strict=True)
        ]
        for proc in procs:  # the order they end in does not matter: each is waited for
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            codes.append(proc.returncode)
            cpu += usage.ru_utime + usage.ru_stime
        wall = time.perf_counter() - started
    finally:
        for o in outs:
            o.close()
    return wall, max(codes, default=0), cpu


@contextmanager
def cpu_meter(services: Services) -> Iterator[dict[str, float]]:
    """CPU seconds spent meanwhile by the S3 endpoint, PostgreSQL, this process (image host, clients) and the
    whole machine ("busy", in core-seconds), so that load from other processes can be told apart."""
    import psutil

    moto = services.moto_running
    out: dict[str, float] = {}
    machine0 = psutil.cpu_times()
    moto0 = moto.cpu_seconds() if moto else 0.0
    pg0 = services.pg.cpu_seconds()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    yield out
    out["wall"] = time.perf_counter() - started
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    out["s3"] = (moto.cpu_seconds() - moto0) if moto else 0.0
    out["postgres"] = max(services.pg.cpu_seconds() - pg0, 0.0)
    out["bench"] = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    machine1 = psutil.cpu_times()
    idle = (machine1.idle - machine0.idle) + (machine1.iowait - machine0.iowait)
    out["busy"] = max(sum(machine1) - sum(machine0) - idle, 0.0)


def load_note(cpu: dict[str, float], etl: float = 0.0) -> str:
    """How busy the machine was meanwhile, and whether processes outside the benchmark took a share."""
    foreign = max(cpu["busy"] - cpu["s3"] - cpu["postgres"] - cpu["bench"] - etl, 0.0)
    share = foreign / (cpu["wall"] or 1)
    note = f"machine {cpu['busy'] / (cpu['wall'] or 1) / (os.cpu_count() or 1) * 100:.0f}% busy"
    if share > 0.1:
        note += f"; OTHER PROCESSES used {share:.1f} cores meanwhile: figures disturbed"
    return note


def busy_before(seconds: float = 1.0) -> float:
    """The machine's CPU use (%) over `seconds`, before anything starts: every figure depends on free cores."""
    import psutil

    return psutil.cpu_percent(interval=seconds)


# ext4 without a journal (this project's machine) keeps a freed inode from reuse for 60 s, 360 s while its inode
# table block is unwritten: creating a file or folder then checks those inodes of its block group one by one
# (fs/ext4/ialloc.c, find_inode_bit -> recently_deleted). After thousands of deletions nearby (the previous
# benchmark's clean-up, a test run), a folder with one file in it, as the archiver stores an image, took up to
# 435 us to create here (most probes 75-200) instead of 32-51.
SETTLED_CREATE_US = 60.0  # microseconds per folder with its file, above which the file system has not settled
SETTLE_TIMEOUT_S = 360.0  # the kernel's longest window


def ext4_without_journal(path: Path | str, sysfs: Path = Path("/sys")) -> bool:
    """Whether `path` lies on an ext4 file system without a journal: its block device's
    `fs/ext4/DEVICE/journal_task` reads `<none>` (else the journal thread's pid)."""
    st = os.stat(path)
    try:
        device = (sysfs / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve().name
        return (sysfs / "fs" / "ext4" / device / "journal_task").read_text(encoding="ascii").strip() == "<none>"
    except OSError:
        return False


def create_cost_us(where: Path, folders: int = 250) -> float:
    """Microseconds per folder created under `where` with one empty file in it, as the archiver stores an image
    (ext4 places a new folder's inode in a block group of its own choosing, and the file beside it). Wall time:
    the kernel's share of CPU is sampled by ticks. All stay: deleting them would free inodes, the cost measured."""
    top = tempfile.mkdtemp(prefix="settle-", dir=where)
    started = time.perf_counter()
    for i in range(folders):
        folder = os.path.join(top, str(i))
        os.mkdir(folder)
        os.close(os.open(os.path.join(folder, "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return (time.perf_counter() - started) / folders * 1e6


def settle_files(
    where: Path, timeout: float = SETTLE_TIMEOUT_S, every: float = 10.0, probe=create_cost_us, sleep=time.sleep
) -> str:
    """On ext4 without a journal, wait (at most `timeout` s) until two probes in a row create files at the cost
    of a quiet disk, so that the deletions before a scenario (the previous benchmark's clean-up, a test run) do
    not slow the files it creates; the archiver itself deletes none. Two quiet probes at once end it before any
    wait; once waiting, probes are `every` s apart (a quiet one may be a block group the deletions missed). A
    note of the wait, or "" if none."""
    if not ext4_without_journal(where):
        return ""
    waited, costs = 0.0, []
    while True:
        costs.append(probe(where))
        settled = len(costs) > 1 and max(costs[-2:]) < SETTLED_CREATE_US
        if settled or waited >= timeout:
            break
        if costs[-1] >= SETTLED_CREATE_US or waited:  # quiet at the start: probe again at once
            if not waited:
                print(f"bench: a folder with a file takes {costs[-1]:.0f} us to create (recently deleted inodes "
                      f"nearby, ext4 without a journal): waiting up to {timeout:.0f} s for the file system to settle",
                      file=sys.stderr, flush=True)  # fmt: skip
            sleep(every)
            waited += every
    if settled and not waited:
        return ""
    probes = ", ".join(f"{c:.0f}" for c in costs)
    if settled:
        return (
            f"waited {waited:.0f} s for the file system to settle (ext4 without a journal, recently deleted inodes "
            f"nearby): us per folder with a file {probes}"
        )
    return (
        f"FILE SYSTEM NOT SETTLED after {waited:.0f} s (ext4 without a journal, recently deleted inodes nearby: us "
        f"per folder with a file {probes}; quiet is under {SETTLED_CREATE_US:.0f}): figures that create files are low"
    )


def code_version() -> str:
    """The commit measured, and whether the working tree had changes to etl/ on top of it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "etl", "sql"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except OSError:
        return "unknown"
    return (commit.strip() or "unknown") + (" + uncommitted changes" if dirty.strip() else "")


def default_concurrency() -> str:
    try:
        from etl.config import Settings

        return f"{Settings().concurrency} (its default)"
    except Exception:  # only a label: never stop the benchmark for it
        return "its default"


# -- completeness: a speed figure counts only for a run that archived everything ------------------


def sql_one(dsn: str, sql: str) -> tuple:
    """The first row of one query on `dsn`; () when it fails (a run that failed before migrating)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return tuple(cur.fetchone() or ())
    except psycopg2.Error:
        return ()
    finally:
        conn.close()


# Every table of a database's own schemas (not PostgreSQL's), with its indexes and foreign keys.
_TABLES_SQL = (
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname,"
    " (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid),"
    " (SELECT count(*) FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f')"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'"
)


@dataclass
class TableHeld:
    """A table a run left in its database: its rows (counted), indexes and foreign keys."""

    name: str  # schema-qualified, but for public's tables
    rows: int
    indexes: int
    foreign_keys: int


def tables_held(dsn: str) -> list[TableHeld]:
    """The tables of a database that hold rows, the most rows first: what a load wrote and keeps."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(_TABLES_SQL)
            tables = cur.fetchall()
            held = []
            for name, schema, indexes, fks in tables:
                cur.execute(f"SELECT count(*) FROM {name}")  # (a name quoted by the server, above)
                rows = cur.fetchone()[0]
                if rows:
                    shown = name.removeprefix("public.") if schema == "public" else name
                    held.append(TableHeld(shown, rows, indexes, fks))
    finally:
        conn.close()
    return sorted(held, key=lambda t: (-t.rows, t.name))


def holdings(tables: list[TableHeld], shown: int = 2) -> str:
    """`tables_held()` in words: the largest `shown`, each with its indexes and foreign keys, then the rest summed."""

    def one(t: TableHeld) -> str:
        keys = f", {t.foreign_keys} foreign key{'s' * (t.foreign_keys != 1)}" if t.foreign_keys else ""
        return f"{t.name} {t.rows:,} ({t.indexes} index{'es' * (t.indexes != 1)}{keys})"

    words = [one(t) for t in tables[:shown]]
    if rest := tables[shown:]:
        words.append(f"{sum(t.rows for t in rest):,} rows in {len(rest)} more")
    return "; ".join(words)


def count_rows(dsn: str, table: str = "social_posts") -> tuple[int, int]:
    """(rows, distinct (platform, post_id)) of a table."""
    return sql_one(dsn, f"SELECT count(*), count(DISTINCT (platform, post_id)) FROM {table}") or (0, 0)


def stored_images(dsn: str) -> int:
    return (sql_one(dsn, "SELECT count(*) FROM post_media WHERE status = 'stored'") or (0,))[0]


def check_files(directory: Path, expected: dict[str, str]) -> tuple[int, int]:
    """(files whose sha256 is the served bytes', files wrong or missing), by file name (gallery-dl names a direct
    link's file after its host and path: 127.0.0.1:PORT_img_7.jpg)."""
    found = {
        p.name.rsplit("_", 1)[-1]: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }
    good = sum(1 for name, digest in expected.items() if found.get(name) == digest)
    return good, len(expected) - good


def check_stored(dsn: str, data_dir: Path, expected: dict[int, str]) -> tuple[int, int]:
    """Ours: (images whose stored object has the served bytes' sha256, the others), via post_media."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT source_url, storage_key FROM post_media WHERE status = 'stored'")
            rows = cur.fetchall()
    finally:
        conn.close()
    by_index = {int(url.rsplit("/", 1)[1].split(".")[0]): key for url, key in rows}
    good = 0
    for index, digest in expected.items():
        key = by_index.get(index)
        path = data_dir / "objects" / key if key else None
        if path is not None and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            good += 1
    return good, len(expected) - good


def files_written_since(root: Path, since: float) -> int:
    """Files under `root` written after `since` (a time.time()): what a local-store rerun wrote."""
    return sum(1 for p in root.rglob("*") if p.is_file() and p.stat().st_mtime > since) if root.is_dir() else 0
