"""Workers: writer threads beside the workers, so that tasks waiting for the disk leave the cores free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from scrollzarr.workers import Workers, wait_out

from conftest import ROOT, write_stack


def test_writers_that_wait_leave_every_worker_free():
    disk = threading.Event()
    with Workers(2, writers=True) as workers:
        waiting = [workers.submit_write(disk.wait, 10) for _ in range(2)]  # both writers block, as on a slow disk
        names = workers.run([lambda: threading.current_thread().name] * 4)  # would hang if writers took workers
        disk.set()
        assert all(future.result() for future in waiting)
    assert all(name.startswith("scrollzarr_") for name in names)


def test_writer_threads_are_their_own():
    with Workers(2, writers=True) as workers:
        name = workers.submit_write(lambda: threading.current_thread().name).result()
    assert name.startswith("scrollzarr-write")


def test_an_urgent_task_runs_before_the_tasks_waiting_for_a_worker():
    """Chunks to encode for a waiting writer go before the reading queued ahead of them (streaming)."""
    started = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    order: list[str] = []

    def blocker(number: int) -> None:
        started[number].set()
        release[number].wait(10)

    with Workers(2) as workers:
        busy = [workers.submit(blocker, number) for number in range(2)]  # both workers taken
        assert all(event.wait(10) for event in started)
        queued = [workers.submit(order.append, f"usual {i}") for i in range(3)]
        urgent = workers.submit_urgent(order.append, "urgent")
        release[0].set()  # one worker free: it runs what waits, in turn
        for future in [*queued, urgent]:
            future.result(10)
        release[1].set()
        for future in busy:
            future.result(10)
    assert order == ["urgent", "usual 0", "usual 1", "usual 2"]


def test_an_urgent_task_runs_with_no_other_task_and_hands_back_its_error():
    with Workers(2) as workers:
        assert workers.submit_urgent(threading.current_thread).result(10).name.startswith("scrollzarr_")
        failing = workers.submit_urgent(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            failing.result(10)


def test_urgent_tasks_not_started_are_cancelled_when_the_workers_stop():
    """A writer waiting for a chunk it asked for is never left waiting for ever once the workers stop."""
    started = [threading.Event(), threading.Event()]
    release = threading.Event()

    def blocker(number: int) -> None:
        started[number].set()
        release.wait(10)

    with Workers(2) as workers:
        for number in range(2):
            workers.submit(blocker, number)
        assert all(event.wait(10) for event in started)
        waiting = workers.submit_urgent(int, "1")  # no worker free: it waits
        timer = threading.Timer(0.2, release.set)
        timer.start()
    timer.join()
    assert waiting.cancelled()


def test_one_worker_runs_its_other_tasks_in_the_calling_thread_and_its_writes_on_a_writer_thread():
    with Workers(1, writers=True) as workers:
        assert workers.submit(threading.current_thread).result() is threading.current_thread()
        assert workers.submit_write(threading.current_thread).result() is not threading.current_thread()
        assert workers.submit_write(lambda: threading.current_thread().name).result().startswith("scrollzarr-write")
    with Workers(1) as workers:
        assert workers.submit_write(threading.current_thread).result() is threading.current_thread()


def processes_naming(marker: str) -> list[int]:
    """Pids of the processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile
    return found


def test_worker_processes_end_when_the_main_process_is_killed(tmp_path):
    """kill -9 of decompress_tiffs must not leave its worker processes (and their forkserver) behind: they held
    the terminal's output open for ever, so that `decompress_tiffs … | tee log` never returned."""
    rng = np.random.default_rng(3)
    write_stack(tmp_path / "in", rng.integers(0, 4000, size=(40, 512, 512), dtype=np.uint16), compression="zlib")
    marker = str(tmp_path / "marker")  # on the forkserver's and workers' command lines, through sys.path
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{marker}")
    command = [sys.executable, str(ROOT / "decompress_tiffs.py"), str(tmp_path / "in"), str(tmp_path / "out")]
    main = subprocess.Popen([*command, "--workers", "2", "--quiet"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(processes_naming(marker)) < 3 and main.poll() is None:  # the forkserver and two workers
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert main.poll() is None, "the run ended before it could be killed"
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.monotonic() + 20
    while processes_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_naming(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the main process was killed: {left}"


def test_a_wait_out_goes_on_through_two_ctrl_c_and_raises_the_first_once_the_work_is_done():
    interrupted, finished = threading.Event(), threading.Event()

    def work() -> None:  # the work outlasts both signals
        interrupted.wait(30)
        time.sleep(0.1)
        finished.set()

    def interrupt_twice() -> None:
        for _ in range(2):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
        interrupted.set()

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        threading.Thread(target=interrupt_twice).start()
        with pytest.raises(KeyboardInterrupt):
            wait_out(future)
        assert finished.is_set() and future.done()
