"""Scoring workers started with `etl.py reenrich` itself, before its own start-up (issue 16).

Re-scoring 20,000 posts takes under a second, and a third of it was start-up on one core while the other waited:
the interpreter, the modules, the settings, the database and the first read, then the lexicon and the language
model (numpy's import alone about 50 ms), and only then the fork of the scoring workers. Here etl.py forks one
process as it starts, before it imports anything else (start()): that process loads the lexicon and the language
model while the main process imports its modules, reads the settings and opens the database; then it forks the
other workers from itself (sharing what it loaded, copy-on-write) and serves as the first of them. reenrich takes
them (take()) when it has captions to score; when nothing took them (nothing to score, an error) they are killed
(release(), at exit at the latest).

Each worker has two pipes of its own to the main process: tasks in (a function and its arguments, as a
ProcessPoolExecutor's), results out. The main process gives a task to the worker with the fewest unfinished, sends
it from a thread (its pickling and its wait for the worker never hold up the reading), and a thread reads the
results into the tasks' futures. A worker that dies (killed, out of memory) closes its results pipe: the pool is
broken, the workers left are killed, and what they held is decided in the main process, as when a
ProcessPoolExecutor breaks. The main process closing a worker's tasks pipe (shut down, or killed outright) ends
it. A task carries the enricher's settings (threshold, language detection): the workers are forked before the
settings are read, and each makes its enricher on its first task. They are a process group of their own, killed
as one.

Only `os` is imported before the fork: etl.py imports this module before anything else.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # (typing itself is not imported before the fork)
if TYPE_CHECKING:
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
    pipes: list[tuple[int, int]] = []
    try:
        for _ in range(2 * workers):
            pipes.append(os.pipe())
        tasks, results = pipes[:workers], pipes[workers:]  # (read, write) ends: to worker n; from worker n
        pid = os.fork()
    except (OSError, AttributeError):  # (no fork, no pipes: reenrich forks its workers as it always could)
        for fd in (fd for pipe in pipes for fd in pipe):
            os.close(fd)
        return
    if pid == 0:
        _first_worker(tasks, results)
    try:
        os.setpgid(pid, pid)  # (the child does it too: whichever runs first)
    except OSError:
        pass
    for (task_end, _), (_, result_end) in zip(tasks, results, strict=True):
        os.close(task_end)
        os.close(result_end)
    _started = Preforked(pid, [end for _, end in tasks], [end for end, _ in results])
    import atexit

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


def _first_worker(tasks: list[tuple[int, int]], results: list[tuple[int, int]]) -> None:
    """The process forked at start: loads the models, forks the other workers, and serves as the first."""
    code = 1
    try:
        os.setpgid(0, 0)
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the run, then us
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a warning written to the terminal from our own group
        for (_, main_end), (other_end, _) in zip(tasks, results, strict=True):
            os.close(main_end)  # only the main process holds it: its end (or its death) is each worker's EOF
            os.close(other_end)
        import gc
        from multiprocessing.connection import Connection

        sends = [Connection(end, readable=False) for _, end in results]  # each worker keeps its own (below)
        forward = _forward_logs(sends[0])
        from etl.enrich import preload

        preload()
        import etl.rescore  # noqa: F401  # the module of the tasks' function (it needs no database)

        gc.freeze()  # (etl.py disabled the collector before the fork, as for its own imports)
        gc.enable()
        mine, children = 0, []
        for n in range(1, len(tasks)):
            child = os.fork()
            if child == 0:
                mine, children = n, []
                break
            children.append(child)
        forward.results = sends[mine]
        for n, ((task_end, _), send) in enumerate(zip(tasks, sends, strict=True)):
            if n != mine:
                os.close(task_end)
                send.close()
        _serve(Connection(tasks[mine][0], writable=False), sends[mine], children)
        code = 0
    except BaseException:  # the main process scores in-process (and says so); why is told here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _serve(tasks: Any, results: Any, children: list[int]) -> None:
    """Runs the tasks that come in until the main process closes its end; then reaps `children`, while its results
    pipe is still open (its end tells the main process that every worker is gone): their CPU and peak RSS then count
    in the main process's children's."""
    from etl.ahead import adopt_enricher
    from etl.enrich import SentimentEnricher

    config = None
    while True:
        try:
            number, settings, fn, args = tasks.recv()
        except EOFError:
            for child in children:
                os.waitpid(child, 0)
            return
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


_LOG = 0  # the task number of a message that is a log record, not a result


def _forward_logs(results: Any) -> Any:
    """A handler sending this worker's log records (INFO and above) to the main process, which logs them as its own:
    its settings (level, text or JSON, the log file, redaction) were not read when the workers were forked."""
    import logging

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                self.results.send((_LOG, None, (record.levelno, record.name, record.getMessage())))
            except Exception:  # (the main process is gone: nothing to tell)
                pass

    handler = Forward(logging.INFO)
    handler.results = results  # type: ignore[attr-defined]  # (each worker points it at its own pipe)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def _log_record(level: int, name: str, message: str) -> None:
    import logging

    logging.getLogger(name).log(level, "%s (scoring worker)", message)


class Preforked:
    """The workers forked at start, as an executor (submit, shutdown) of the tasks reenrich gives them."""

    def __init__(self, pid: int, task_ends: list[int], result_ends: list[int]):
        import threading

        self.pid, self.task_ends, self.result_ends = pid, task_ends, result_ends
        self.workers = len(task_ends)
        self.config: tuple[float, bool] | None = None
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._futures: dict[int, tuple[Any, int]] = {}  # the unfinished tasks by number: (its future, its worker)
        self._number = 0
        self._queues: list[Any] = []  # a sender thread's tasks, per worker (once the first task is given)
        self._threads: list[Any] = []
        self._closing = False
        self._gone = False  # killed (or left) and reaped

    def submit(self, fn: Any, /, *args: Any) -> Any:
        from concurrent.futures import BrokenExecutor, Future

        with self._lock:
            if self.broken:
                raise BrokenExecutor(self.broken)
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._threads:
                self._begin()
            unfinished = [0] * self.workers
            for _, taken in self._futures.values():
                unfinished[taken] += 1
            worker = unfinished.index(min(unfinished))
            self._number += 1
            future: Future = Future()
            self._futures[self._number] = (future, worker)
            self._queues[worker].put((self._number, self.config, fn, args))
        return future

    def _begin(self) -> None:
        import multiprocessing.connection  # noqa: F401  # here, not in the threads: they start at once
        import queue
        import threading

        self._queues = [queue.SimpleQueue() for _ in range(self.workers)]
        for n in range(self.workers):
            self._threads.append(threading.Thread(target=self._send, args=(n,), name=f"prefork-send-{n}", daemon=True))
        self._threads.append(threading.Thread(target=self._receive, name="prefork-results", daemon=True))
        for thread in self._threads:
            thread.start()

    def _send(self, n: int) -> None:
        """Sends worker n its tasks; closes its tasks pipe at the end (None), which ends it."""
        from multiprocessing.connection import Connection

        tasks = Connection(self.task_ends[n], readable=False)
        try:
            while (task := self._queues[n].get()) is not None:
                try:
                    tasks.send(task)
                except OSError:  # it died: the receiver sees its results pipe close
                    return
                except Exception as exc:  # (a task that does not pickle: nothing was sent)
                    self._finish(task[0], False, exc)
        finally:
            tasks.close()

    def _receive(self) -> None:
        from multiprocessing.connection import Connection, wait

        pipes = {Connection(end, writable=False): n for n, end in enumerate(self.result_ends)}
        try:
            while pipes:
                for pipe in wait(list(pipes)):
                    try:
                        number, ok, value = pipe.recv()
                    except (EOFError, OSError):  # its worker has left: at shutdown, or died
                        n = pipes.pop(pipe)
                        pipe.close()
                        if not self._closing:
                            self._break(f"scoring worker {n + 1} of {self.workers} ended unexpectedly")
                            return
                        continue
                    except Exception as exc:  # (a message that does not unpickle here: whose it was is lost)
                        self._break(f"a scoring worker's answer could not be read: {type(exc).__name__}: {exc}")
                        return
                    if number == _LOG:
                        _log_record(*value)
                    else:
                        self._finish(number, ok, value)
        finally:
            for pipe in pipes:
                pipe.close()

    def _finish(self, number: int, ok: bool, value: Any) -> None:
        """Task `number`'s future gets its result (ok) or exception, unless it was cancelled."""
        with self._lock:
            future, _ = self._futures.pop(number, (None, None))
        if future is None or not future.set_running_or_notify_cancel():
            return  # (cancelled; or the pool broke meanwhile)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _break(self, why: str) -> None:
        with self._lock:
            self.broken = why
        self.kill(why)

    def kill(self, why: str = "the scoring workers were stopped") -> None:
        """Ends every worker at once (their process group) and reaps the first; the tasks not finished fail."""
        import signal

        with self._lock:
            if self._gone:
                return
            self._gone = True
            self._closing = True
            futures, self._futures = [future for future, _ in self._futures.values()], {}
        for kill in (os.killpg, os.kill):  # the group; the first worker alone if it had no group yet
            try:
                kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._close_ends()
        if futures:
            # Imported only here: release() kills the workers nothing took at exit, where this import would fail
            # (it registers an exit hook of its own), leave them running and print a traceback.
            from concurrent.futures.process import BrokenProcessPool

            for future in futures:
                if future.set_running_or_notify_cancel():
                    future.set_exception(BrokenProcessPool(why))

    def _close_ends(self) -> None:
        """The pipes' ends no thread has taken (none was started) closed; the senders told to close theirs."""
        if not self._threads:
            for fd in (*self.task_ends, *self.result_ends):
                os.close(fd)
            self.task_ends, self.result_ends = [], []
        for tasks in self._queues:
            tasks.put(None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The workers finish their tasks and leave (killed after LEAVE_SECONDS); with cancel_futures, the tasks
        not finished are dropped and the workers killed at once."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = [future for future, _ in self._futures.values()]
        if cancel_futures and any([future.cancel() for future in pending]):
            self.kill()
            return
        if not self._threads:
            self.kill()
            return
        for tasks in self._queues:
            tasks.put(None)  # each sender closes its worker's tasks pipe: the worker leaves
        if wait:
            for thread in self._threads:
                thread.join(LEAVE_SECONDS)
            self.kill()  # (they have left: this reaps the first; or they are killed)
