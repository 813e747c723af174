"""Scoring workers started with `etl.py reenrich` itself, before its own start-up (issue 16).

Re-scoring 20,000 posts takes under a second, and a third of it was start-up on one core while the other waited:
the interpreter, the modules, the settings, the database and the first read, then the lexicon and the language
model (numpy's import alone about 50 ms), and only then the fork of the scoring workers. Here etl.py forks one
process as it starts (start()): it loads the lexicon and the language model while the main process imports its
modules, reads the settings and opens the database, then forks the other workers from itself (sharing what it
loaded, copy-on-write) and serves as the first of them. reenrich takes them (take()) when it has captions to
score; when nothing took them (nothing to score, an error) they are killed (release(), at exit at the latest).

The workers take tasks (a function and its arguments, as a ProcessPoolExecutor's) from one queue and each sends
its results back on a pipe of its own, which a thread of the main process reads into the tasks' futures. A
worker that dies (killed, out of memory) closes its pipe: the pool is broken, the workers left are killed, and
what they held is decided in the main process, as when a ProcessPoolExecutor breaks. A task carries the
enricher's settings (threshold, language detection): the workers are forked before the settings are read, and
each makes its enricher on its first task. They are a process group of their own, killed as one; each also
leaves once its parent is gone (etl/ahead.py end_with_parent), so a main process killed outright leaves none.

This module imports nothing of the archiver's at its top: etl.py imports it before anything else.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from concurrent.futures import Executor, Future
from typing import Any

COMMAND = "reenrich"
GLOBAL_OPTIONS = ("--log-format", "--log-level")  # options taking a value, before or after the command
LEAVE_SECONDS = 10.0  # how long shutdown() waits for the workers to finish their tasks and leave, then kills them

_started: Preforked | None = None


def command_at(args: list[str]) -> int:
    """Where the command goes: after the global options (and their values) that come first."""
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        i += 1 if "=" in args[i] else 2
    return i


def wanted(args: list[str]) -> bool:
    """Whether the command line is a reenrich that may score (not its help), on more than one core."""
    i = command_at(args)
    return i < len(args) and args[i] == COMMAND and not {"-h", "--help"} & set(args) and (os.cpu_count() or 1) > 1


def start(workers: int | None = None) -> None:
    """Forks the first scoring worker now; it loads the models and forks the others (one per core in all)."""
    global _started
    workers = workers or os.cpu_count() or 1
    if _started is not None or workers < 2:
        return
    try:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        tasks = context.Queue()
        pipes = [context.Pipe(duplex=False) for _ in range(workers)]  # (reader, writer): a worker's results
        pid = os.fork()
    except Exception:  # (no fork here: reenrich forks its workers as it always could, or scores in-process)
        return
    if pid == 0:
        _first_worker(tasks, pipes)
    try:
        os.setpgid(pid, pid)  # (the child does it too: whichever runs first)
    except OSError:
        pass
    for _, writer in pipes:
        writer.close()
    _started = Preforked(pid, tasks, [reader for reader, _ in pipes])
    atexit.register(release)


def take(threshold: float, detect_language: bool, workers: int) -> Preforked | None:
    """The workers forked at start, for an enricher of these settings; None when there are none, or not as many
    as asked for (they are killed)."""
    global _started
    pool, _started = _started, None
    if pool is not None and pool.workers != workers:
        pool.kill()
        return None
    if pool is not None:
        import logging

        pool.config = (threshold, detect_language)
        logging.getLogger(__name__).info("scoring with the %d workers forked as etl.py started", pool.workers)
    return pool


def release() -> None:
    """Kills the workers forked at start when nothing took them."""
    global _started
    pool, _started = _started, None
    if pool is not None:
        pool.kill()


def _first_worker(tasks: Any, pipes: list[Any]) -> None:
    """The process forked at start: loads the models, forks the other workers, and serves as the first."""
    code = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the run, then us
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a warning written to the terminal from our own group
        for reader, _ in pipes:
            reader.close()
        import gc

        from etl.ahead import end_with_parent
        from etl.enrich import preload

        end_with_parent()
        preload()
        import etl.reenrich  # noqa: F401  # the module of the tasks' function

        gc.freeze()  # (etl.py disabled the collector before the fork, as for its own imports)
        gc.enable()
        mine, children = 0, []
        for n in range(1, len(pipes)):
            child = os.fork()
            if child == 0:
                end_with_parent()
                mine, children = n, []
                break
            children.append(child)
        for n, (_, writer) in enumerate(pipes):
            if n != mine:
                writer.close()
        _serve(tasks, pipes[mine][1])
        for child in children:  # reaped here: their CPU and peak RSS count in the main process's children
            os.waitpid(child, 0)
        code = 0
    except BaseException:  # the main process scores in-process (and says so); why is told here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _serve(tasks: Any, results: Any) -> None:
    from etl.ahead import adopt_enricher
    from etl.enrich import SentimentEnricher

    config = None
    while (task := tasks.get()) is not None:
        number, settings, fn, args = task
        try:
            if settings != config:
                threshold, detect_language = settings
                adopt_enricher(SentimentEnricher(threshold, detect_language=detect_language))
                config = settings
            answer = (number, True, fn(*args))
        except Exception as exc:  # handed to the task's future
            answer = (number, False, exc)
        try:
            results.send(answer)
        except Exception as exc:  # (an exception that does not pickle)
            results.send((number, False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class Preforked(Executor):
    """The workers forked at start, as an executor (submit, shutdown) of the tasks reenrich gives them."""

    def __init__(self, pid: int, tasks: Any, results: list[Any]):
        self.pid, self.tasks, self.results = pid, tasks, results
        self.workers = len(results)
        self.config: tuple[float, bool] | None = None
        self.broken: str | None = None
        self._futures: dict[int, Future] = {}
        self._number = 0
        self._lock = threading.Lock()
        self._closing = False
        self._gone = False  # the group killed and its first worker reaped
        self._receiver: threading.Thread | None = None

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        from concurrent.futures import BrokenExecutor

        assert not kwargs
        with self._lock:
            if self.broken:
                raise BrokenExecutor(self.broken)
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._number += 1
            if self._receiver is None:
                self._receiver = threading.Thread(target=self._receive, name="prefork-results", daemon=True)
                self._receiver.start()
            try:
                self.tasks.put((self._number, self.config, fn, args))
            except (ValueError, OSError) as exc:  # the queue closed: the pool broke meanwhile
                raise BrokenExecutor(self.broken or str(exc)) from exc
            self._futures[self._number] = future
        return future

    def _receive(self) -> None:
        from multiprocessing.connection import wait

        open_pipes = list(self.results)
        while open_pipes:
            for pipe in wait(open_pipes):
                try:
                    number, ok, value = pipe.recv()
                except (EOFError, OSError):  # its worker has left: at shutdown, or died
                    open_pipes.remove(pipe)
                    if not self._closing:
                        self._break(f"a scoring worker ended unexpectedly ({len(open_pipes)} of {self.workers} left)")
                        return
                    continue
                with self._lock:
                    future = self._futures.pop(number, None)
                if future is None or not future.set_running_or_notify_cancel():
                    continue  # (cancelled)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _break(self, why: str) -> None:
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            self.broken = why
            futures, self._futures = list(self._futures.values()), {}
        self.kill()
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(BrokenProcessPool(why))

    def kill(self) -> None:
        """Ends every worker at once (their process group) and reaps the first."""
        with self._lock:
            if self._gone:
                return
            self._gone = True
        for kill in (os.killpg, os.kill):  # the group; the first worker alone if it had no group yet
            try:
                kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.tasks.cancel_join_thread()  # (what is still queued for them is dropped)
        self.tasks.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The workers finish their tasks and leave (killed after LEAVE_SECONDS); with cancel_futures, the tasks
        not begun are dropped and they are killed at once."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = [future for future in self._futures.values() if not future.running()]
        if cancel_futures and any(future.cancel() for future in pending):
            self.kill()
        if not self._gone:
            for _ in range(self.workers):
                self.tasks.put(None)
        if self._receiver is not None and wait:
            self._receiver.join(LEAVE_SECONDS)
        if wait or self._receiver is None:
            self.kill()  # (they have left: this only reaps the first; or they are killed)
        for pipe in self.results:
            pipe.close()
