"""A pool of worker threads or processes, or none: what runs the independent tasks of a job.

Reading and decoding TIFFs, testing and writing chunks and downsampling all
spend their time in code that releases the GIL (file I/O, imagecodecs,
numpy), so threads share the cores without copying data between processes.
Tasks that hold the GIL (libtiff decoding through imagecodecs) and exchange
little data run in worker processes instead.  Tasks that mostly wait for
the disk can go to writer threads of their own, so that the waiting does
not keep a core idle.  With one worker every other task runs at once in the
calling thread.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Inline(Executor):
    """An executor that runs each task when it is submitted."""

    def submit(self, fn: Callable[..., T], /, *args: object, **kwargs: object) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # handed back through the future, as a pool would
            future.set_exception(error)
        # Ctrl-C (KeyboardInterrupt) is not a task's failure: raised here, it stops the tasks not yet submitted (in a
        # pool it reaches the main thread, not a worker); caught, the other tasks ran on (measured: a render with
        # one worker went on fetching for minutes after Ctrl-C).
        return future


def _start_worker(main: int) -> None:
    """In a worker process: leave Ctrl-C to the main process, which lets the running tasks finish, and exit
    when the main process ``main`` (a pid) is gone.

    A pool's workers hold both ends of its task queue, so a main process killed
    with SIGKILL (or by the kernel's OOM killer) left them, and the forkserver
    whose pipe they hold, waiting for tasks for ever, holding the terminal's
    output open (``decompress_tiffs … | tee log`` never returned).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(main,), name="scrollzarr-watch", daemon=True).start()


def _exit_without(main: int) -> None:
    """Wait until process ``main`` ends (a pidfd wakes at once; else ask every second), then exit this process."""
    try:
        select.select([os.pidfd_open(main)], [], [])
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): poll
        while True:
            try:
                os.kill(main, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
    os._exit(1)


def wait_out(future: Future[Any]) -> None:
    """Wait until ``future`` is done, even through Ctrl-C or SIGTERM (the first is raised again once it is): the
    thread it runs on must not outlive its caller's clean-up (Python 3.11 counts a thread whose join was
    interrupted as stopped, and no later join waits for it)."""
    interrupted: KeyboardInterrupt | None = None
    while not future.done():
        try:
            wait([future])
        except KeyboardInterrupt as error:
            interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted


class _UrgentFirst:
    """Tasks that a worker thread takes before any task submitted the usual way, even one submitted earlier.

    ThreadPoolExecutor runs its tasks in the order they came.  An urgent task
    waits here; every task of the pool first runs the urgent ones waiting
    (:meth:`drain`), and each urgent task also puts a drain of its own in the
    pool's queue, so that it runs even when no other task follows.
    """

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.waiting: deque[tuple[Future[Any], Callable[..., Any], tuple[object, ...]]] = deque()

    def submit(self, fn: Callable[..., T], args: tuple[object, ...]) -> Future[T]:
        future: Future[T] = Future()
        self.waiting.append((future, fn, args))
        try:
            self.executor.submit(self.drain)
        except BaseException:  # the pool is shut down: no drain of a worker still running may take it
            future.cancel()
            raise
        return future

    def after(self, fn: Callable[..., T], *args: object) -> T:
        """Run the urgent tasks waiting, then ``fn(*args)``."""
        self.drain()
        return fn(*args)

    def drain(self) -> None:
        while True:
            try:
                future, fn, args = self.waiting.popleft()  # deque.popleft is atomic: each task is taken once
            except IndexError:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed back through the future, as the pool does
                future.set_exception(error)
            # a failed task's traceback holds this frame: without this, the future, its error and the task's
            # arguments (a chunk buffer) stayed alive in a cycle until the garbage collector ran
            del future, fn, args

    def cancel(self) -> None:
        """Cancel the urgent tasks not started (the pool is shut down: their drains will not run)."""
        while self.waiting:
            self.waiting.popleft()[0].cancel()


class Workers:
    """``count`` workers for :meth:`submit`, :meth:`submit_urgent` and :meth:`run`; use as a context manager.

    Parameters
    ----------
    count : int
        Number of workers; 1 runs every task in the calling thread.
    processes : bool
        Worker processes instead of threads: tasks and their arguments and
        results must then be picklable.
    preload : sequence of str
        Modules the worker processes import once, before they are forked.
    writers : bool
        Also ``count`` threads for :meth:`submit_write`: tasks that mostly wait
        for the disk (direct I/O) then leave the cores to the other workers.
        With one worker too: a Dask task of one thread that wrote its own
        units waited for the disk with its core idle (the cluster bench's
        512-slice input, medians of 3: ``--scheduler local:2`` 6.81 s with a
        writer thread against 7.54 s without, the threaded run 6.46 s).
    """

    def __init__(self, count: int, processes: bool = False, preload: Sequence[str] = (), writers: bool = False) -> None:
        self.count = count
        self._executor: Executor
        self._writers: Executor | None = None
        self._urgent: _UrgentFirst | None = None
        if writers:
            self._writers = ThreadPoolExecutor(count, "scrollzarr-write")
        if count == 1:
            self._executor = _Inline()
        elif processes:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            if method == "forkserver":
                context.set_forkserver_preload(list(preload))
            self._executor = ProcessPoolExecutor(
                count, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
            )
        else:
            self._executor = ThreadPoolExecutor(count, "scrollzarr")
            self._urgent = _UrgentFirst(self._executor)

    def submit(self, fn: Callable[..., T], /, *args: object) -> Future[T]:
        """Start ``fn(*args)`` on a worker (at once, in this thread, with one worker)."""
        if self._urgent is not None:
            return self._executor.submit(self._urgent.after, fn, *args)
        return self._executor.submit(fn, *args)

    def submit_urgent(self, fn: Callable[..., T], /, *args: object) -> Future[T]:
        """Start ``fn(*args)`` on the first worker thread free, before the tasks of :meth:`submit` waiting (as
        :meth:`submit` with one worker or with processes)."""
        if self._urgent is not None:
            return self._urgent.submit(fn, args)
        return self._executor.submit(fn, *args)

    def submit_write(self, fn: Callable[..., T], /, *args: object) -> Future[T]:
        """Start ``fn(*args)`` on a writer thread (or as :meth:`submit` does, without writers)."""
        if self._writers is None:
            return self.submit(fn, *args)
        return self._writers.submit(fn, *args)

    def run(self, tasks: Iterable[Callable[[], T]]) -> list[T]:
        """Run every task, wait for all of them, and return their results in order.

        The first exception raised by a task is raised here, after the other
        tasks have finished, so that no task is left writing.
        """
        futures = [self.submit(task) for task in tasks]
        wait(futures)
        return [future.result() for future in futures]

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            # no urgent task is left for a waiter to hang on, even if a second Ctrl-C or SIGTERM cuts the join short:
            # once the pool is shut down, no drain is queued for them
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._urgent is not None:
                self._urgent.cancel()
            self._executor.shutdown(wait=True)
        finally:
            if self._writers is not None:
                self._writers.shutdown(wait=True, cancel_futures=True)
