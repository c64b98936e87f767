"""Executors of task values: this machine's threads, or a Dask cluster (``--scheduler``).

Both run the same function (:func:`~scrollzarr.tasks.run_task`, or a tool's
own) on the same picklable task values and yield each task's result as it
finishes.  dask is imported only when a cluster is asked for (it is an
optional extra).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from scrollzarr import __version__
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.storage import Location, ObjectStore, parse_location

log = logging.getLogger(__name__)

# Times Dask runs a task again after it raised (a worker lost to its machine is not counted: the scheduler
# reschedules those itself, up to distributed.scheduler.allowed-failures).
RETRIES = 2
SCHEDULER_TIMEOUT = 10  # seconds a scheduler has to answer whether it is still there, after a task failed
INSTALL = 'pip install "scrollzarr[dask]"'
# Seconds to reach a scheduler, and for its first worker to join (then the run says which is missing).
CONNECT_SECONDS = 20
WAIT_FOR_WORKERS = 60
# local:N above this is a typo (as --workers' bound): each worker process holds its own interpreter and buffers.
MAX_LOCAL_WORKERS = 1024


S = TypeVar("S")
T = TypeVar("T", bound="Work")
R = TypeVar("R")


class TaskFailed(ScrollzarrError):
    """A task failed for good; the store stays resumable."""


class Work(Protocol):
    """A task value: picklable, and able to say what it is for messages."""

    def describe(self) -> str: ...


class Executor(Protocol):
    """What runs tasks: ``threads`` per task, any number of tasks at once."""

    threads: int

    def run(self, function: Callable[[S, T], R], shared: S, tasks: list[T]) -> Iterator[tuple[T, R]]:
        """Run ``function(shared, task)`` for every task of ``tasks``; yield each task with its result as it
        finishes.  ``shared`` (what every task needs) is sent to each worker once.

        Raises
        ------
        ScrollzarrError
            The first task's error that could not be overcome, after the other tasks were stopped.
        """
        ...

    def check_paths(self, readable: Path, writable: Location) -> None:
        """Refuse to start unless every worker can read the file ``readable`` and write into ``writable`` (a
        directory, or a prefix in a bucket)."""
        ...


class LocalExecutor:
    """Tasks one at a time on this machine, ``threads`` threads each (a run of tasks resumed without a cluster:
    one task's memory, as the plan counts it)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def run(self, function: Callable[[S, T], R], shared: S, tasks: list[T]) -> Iterator[tuple[T, R]]:
        for task in tasks:
            yield task, function(shared, task)

    def check_paths(self, readable: Path, writable: Location) -> None:
        """Nothing to check: this process planned the run from the same paths."""


class DaskExecutor:
    """Tasks on the workers of a Dask cluster, through a ``distributed.Client``.

    Parameters
    ----------
    address : str
        ``tcp://host:port`` (any Dask address), a scheduler file's path, or
        ``local:N`` for a ``LocalCluster`` of ``N`` worker processes here.
    threads : int
        Threads each task uses (``--workers``).
    then : str
        What to do once the cause of a task's failure is fixed, for its message.
    """

    def __init__(self, address: str, threads: int, then: str = "continue with --resume") -> None:
        self.address = address
        self.threads = threads
        self.then = then
        self._cluster: Any = None
        self.client: Any = None
        self.slots = 1
        self.parallel = 1

    def __enter__(self) -> DaskExecutor:
        try:
            import distributed
        except ImportError:
            raise UsageError(f"--scheduler needs dask.distributed, which is not installed: {INSTALL}") from None
        # distributed logs each worker's and the scheduler's comings and goings at INFO, and a lost scheduler as a
        # traceback at ERROR: not ours to show (run() says in one line what went wrong)
        # (distributed gives some of its loggers levels and handlers of their own: each is set)
        for name in [*logging.root.manager.loggerDict]:
            if name == "distributed" or name.startswith("distributed."):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            if self.address.startswith("local:"):
                count = _local_workers(self.address)
                # Ctrl-C reaches the worker processes too (one process group); they start with it ignored
                # (a disposition a process inherits), or each printed a KeyboardInterrupt traceback while this
                # process stopped them itself
                interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    # their logs come to this terminal: a task's failure is reported once, by run()
                    self._cluster = distributed.LocalCluster(
                        n_workers=count,
                        threads_per_worker=1,
                        processes=True,
                        # no dashboard; its HTTP server (which the scheduler always starts) on a free port: on the
                        # default 8787, a second run at once printed a three-line UserWarning that the port was taken
                        dashboard_address=":0",
                        scheduler_kwargs={"dashboard": False},
                        silence_logs=logging.CRITICAL,
                    )
                finally:
                    signal.signal(signal.SIGINT, interrupt)
                self.client = distributed.Client(self._cluster)
            else:
                self.client = _connect(distributed, self.address)
            self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
        except UsageError:
            self.close()
            raise
        except TimeoutError as error:
            connected = self.client is not None
            self.close()
            if not connected:
                raise ScrollzarrError(
                    f"no Dask scheduler answered at {self.address} within {CONNECT_SECONDS} s ({error}); start it, "
                    "or check --scheduler (the scheduler's port, 8786 by default, not its dashboard's)"
                ) from None
            raise ScrollzarrError(
                f"no Dask worker joined the scheduler at {self.address} within {WAIT_FOR_WORKERS} s; start workers "
                "(dask worker ADDRESS), then run again"
            ) from None
        except Exception as error:  # distributed raises many kinds for an address it cannot use
            self.close()
            raise ScrollzarrError(
                f"cannot use the Dask scheduler at {self.address} ({type(error).__name__}: {error}); start it (and "
                "its workers), or check --scheduler"
            ) from None
        except BaseException:
            self.close()
            raise
        workers = self.client.scheduler_info()["workers"].values()
        # tasks a worker process runs at once: --max_gb, which bounds a process, is shared between them
        self.slots = max(worker["nthreads"] for worker in workers)
        # tasks the cluster runs at once: each level is cut into at least as many where it can be
        self.parallel = sum(worker["nthreads"] for worker in workers)
        log.info("Dask cluster at %s: %d worker(s), %d task(s) at once each", self.address, len(workers), self.slots)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if error is not None and self._cluster is None and self.client is not None:
            # a worker cannot stop a task midway: those running finish (and a run replaced meanwhile gets nothing)
            log.warning(
                "tasks already running on the cluster at %s finish on their own, for up to a task's time", self.address
            )
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None

    def run(self, function: Callable[[S, T], R], shared: S, tasks: list[T]) -> Iterator[tuple[T, R]]:
        import distributed

        if not tasks:
            return
        from scrollzarr.clustershared import Shared, call

        run = uuid.uuid4().hex[:8]
        # Sent once to each worker (and to a worker that joins or is restarted later), not with every task.  Not
        # scattered: a worker killed before it was copied to the others failed every task ("lost dependencies";
        # measured: 1 run in 3 with a worker killed a second into the render).  Not a task's result either (see
        # scrollzarr.clustershared: Dask then ran the tasks of a small level on one worker).
        name = f"scrollzarr-{run}-shared"
        futures: dict[Any, T] = {}
        try:
            try:
                self.client.register_plugin(Shared(shared), name=name)
            except Exception as error:  # distributed raises many kinds: a worker or the scheduler lost, ...
                what = " ".join(f"{type(error).__name__}: {error}".split())
                raise TaskFailed(
                    f"could not send the run's work to every Dask worker of {self.address} ({what}); check the "
                    f"workers, then {self.then}"
                ) from None
            for index, task in enumerate(tasks):
                key = f"scrollzarr-{run}-{index}"
                futures[self.client.submit(call, name, function, task, key=key, pure=False, retries=RETRIES)] = task
            for future in distributed.as_completed(futures):
                task = futures[future]
                try:
                    result = future.result()
                except ScrollzarrError:
                    raise
                except Exception as error:
                    raise TaskFailed(self._failure(task, error)) from None
                yield task, result
        finally:
            self._release(futures, name)

    def _release(self, futures: dict[Any, T], name: str) -> None:
        """Cancel the run's tasks and remove its plugin from the cluster.  Quietly: after a scheduler was lost
        or restarted meanwhile (distributed then raises a connection error, a ValueError for a plugin the new
        scheduler never had, or a ClosedClientError), what the run reports is that, not this."""
        with contextlib.suppress(Exception):
            self.client.cancel([*futures])
        with contextlib.suppress(Exception):
            if self.client.status == "running":
                self.client.unregister_worker_plugin(name)

    def _failure(self, task: Work, error: Exception) -> str:
        """What to say of ``task``, which failed for good with ``error``: the scheduler or every worker lost, or
        the task's own error, in one line."""
        what = " ".join(f"{type(error).__name__}: {error}".split())
        # Asked of the scheduler now: the client's own view (its status, its copy of scheduler_info) may not know
        # yet that the scheduler is gone (CI: a killed scheduler was reported as the task's own CommClosedError)
        try:
            identity = self.client.sync(self.client.scheduler.identity, callback_timeout=SCHEDULER_TIMEOUT)
        except Exception:  # no answer: the scheduler is gone
            identity = None
        if identity is None or self.client.status != "running" or "connection-lost" in what:
            return f"lost the Dask scheduler at {self.address} ({what}); restart it and its workers, then {self.then}"
        workers = identity.get("workers", {}) if isinstance(identity, dict) else {}
        if not workers:
            return (
                f"every Dask worker of the scheduler at {self.address} was lost while the task for "
                f"{task.describe()} ran (killed, or out of memory?); start workers, then {self.then}"
            )
        return f"the task for {task.describe()} failed on the cluster ({what}); fix the cause, then {self.then}"

    def check_paths(self, readable: Path, writable: Location) -> None:
        """Also refuse workers that cannot run this scrollzarr's tasks (not installed there, or another version)."""
        # A file made here that each worker must find: a worker with a directory of its own at the same path
        # (a local disk where the shared one should be mounted) passed a bare write test, and wrote there.
        made = None if isinstance(writable, ObjectStore) else writable / f".scrollzarr-probe-{uuid.uuid4().hex}"
        if made is not None:
            made.write_bytes(b"")
        try:
            problems = self.client.run(
                _check_paths, str(readable), str(writable), None if made is None else made.name, __version__
            )
        except Exception as error:  # the function could not be unpickled or run there: scrollzarr is missing
            raise ScrollzarrError(
                f"the Dask workers cannot run scrollzarr's tasks ({type(error).__name__}: {error}); "
                f"install scrollzarr {__version__} (as here) on every worker"
            ) from None
        finally:
            if made is not None:
                made.unlink(missing_ok=True)
        remote = isinstance(writable, ObjectStore)
        for worker, problem in sorted(problems.items()):
            if problem is not None:
                need = "the output at the same paths (a shared file system)"
                if remote and "output" in problem:
                    need = "the bucket, with AWS_ENDPOINT_URL and credentials in their environment"
                if problem.startswith("runs scrollzarr"):
                    raise ScrollzarrError(f"Dask worker {worker} {problem}")
                raise ScrollzarrError(f"Dask worker {worker} {problem}; every worker must see the input and {need}")


def _connect(distributed: Any, address: str) -> Any:
    """A client of the scheduler at ``address`` (an address, or a scheduler file), within :data:`CONNECT_SECONDS`.

    The connection is made on a thread of its own: a port that is not a Dask scheduler's (a web server's, say)
    accepts the connection and never answers the handshake, past distributed's own timeout.

    Raises
    ------
    UsageError
        For an address that is neither a Dask address nor a scheduler file.
    TimeoutError
        If no scheduler answered in time.
    """
    if "://" not in address and _HOST_PORT.fullmatch(address) and not Path(address).exists():
        address = f"tcp://{address}"  # as dask takes it
    if "://" in address:
        arguments: dict[str, Any] = {"address": address}
    elif Path(address).is_file():
        arguments = {"scheduler_file": address}
    else:
        raise UsageError(
            f"scheduler {address} (--scheduler, or DASK_SCHEDULER_ADDRESS): no such scheduler file; give "
            "tcp://HOST:PORT, a scheduler file (dask scheduler --scheduler-file), or local:N"
        )
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            outcome["client"] = distributed.Client(**arguments, timeout=f"{CONNECT_SECONDS}s")
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, name="scrollzarr-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS + 5)
    if thread.is_alive():
        raise TimeoutError(f"no answer to the handshake in {CONNECT_SECONDS + 5} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["client"]


_HOST_PORT = re.compile(r"[A-Za-z0-9.\-]+:\d+")


def _local_workers(address: str) -> int:
    text = address.removeprefix("local:")
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LOCAL_WORKERS:
        raise UsageError(
            f"--scheduler {address}: local:N needs a whole number of worker processes, 1 to {MAX_LOCAL_WORKERS}"
        )
    return int(text)


def _check_paths(readable: str, writable: str, made: str | None, version: str) -> str | None:
    """On a worker: what it cannot do of reading the file ``readable``, finding the file ``made`` that the client
    made in the directory ``writable`` (``None`` for a bucket), and writing into ``writable``, or that its
    scrollzarr is not ``version``; ``None`` if all is well."""
    if __version__ != version:
        return f"runs scrollzarr {__version__}, this machine {version}; install the same version on every worker"
    try:
        with open(readable, "rb") as file:
            file.read(1)
    except OSError as error:
        return f"cannot read the input {readable} ({error.strerror or error})"
    output = parse_location(writable)
    if made is not None and not (Path(writable) / made).is_file():
        return f"does not see the output {writable} that the client sees (a file made there is missing for it)"
    name = f".scrollzarr-probe-{uuid.uuid4().hex}"
    try:
        if isinstance(output, ObjectStore):
            output.put(name, b"")
            output.delete(name)
        else:
            (output / name).write_bytes(b"")
            (output / name).unlink()
    except Exception as error:  # OSError on a disk; botocore and s3fs raise many kinds
        text = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
        return f"cannot write into the output {writable} ({text})"
    return None
