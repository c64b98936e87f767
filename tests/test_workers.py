"""Workers: writer threads beside the workers, so that tasks waiting for the disk leave the cores free."""

from __future__ import annotations

import threading

from scrollzarr.workers import Workers


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


def test_one_worker_runs_writes_at_once_in_the_calling_thread():
    with Workers(1, writers=True) as workers:
        assert workers.submit_write(threading.current_thread).result() is threading.current_thread()
