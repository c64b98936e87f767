"""The conversion as task values: plain, picklable descriptions of work that any executor runs.

A :class:`Task` is a box of one level, and the boxes below it of the levels it
also writes.  A level-0 task reads its box from the TIFFs (``unit depth x
2**k`` slices of a band of rows and columns) and halves it in memory into the
``k`` levels below, so that the largest levels are never read back from the
store; a task of a lower level builds its box from the stored level above.
Every box is whole write units of its level, so no two tasks write one unit
(the way to corrupt a sharded store is two writers of one shard).
A task is idempotent: run again, it writes the same bytes.  Once its units
are durable it writes a *marker* into the store, with what it found; a
resumed run skips the tasks whose markers are there, so the record of a
distributed run is the store itself, not one process's memory.

The same :func:`run_task` runs on the local threads and on Dask workers
(:mod:`scrollzarr.cluster`); a :class:`Job` holds everything a task needs,
as values that cross a process boundary: the slices' paths, the output's
:class:`~scrollzarr.sinks.SinkSpec` per level, the algorithm.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import zarr

from scrollzarr import downsample as ds
from scrollzarr.allocator import keep_freed_memory
from scrollzarr.blocks import Box, Shape3, box_size, iter_boxes
from scrollzarr.cluster import Executor
from scrollzarr.errors import ScrollzarrError
from scrollzarr.progress import MARKERS
from scrollzarr.readback import write_downsampled_block
from scrollzarr.report import ProgressBar
from scrollzarr.sinks import CheckedSink, SinkSpec, open_sink
from scrollzarr.storage import Location, storage, zarr_store
from scrollzarr.store import damaged_units, unit_index
from scrollzarr.streaming import band_streams, stream_slabs, stripe_rows
from scrollzarr.tiffstack import SliceReadError, StackError, TiffStack, first_unreadable_row, read_rows
from scrollzarr.window import Window
from scrollzarr.workers import Workers

log = logging.getLogger(__name__)

# The markers of finished tasks, in the store: MARKERS/<run>/<level>/<Task.name>.json, under the run's identity
# (:attr:`scrollzarr.progress.Progress.run`); MARKERS/<run>/FENCE is the run's fence (see :func:`run_task`).
FENCE = "fence"


class StoreReplaced(ScrollzarrError):
    """The store a task writes was removed or replaced (its run's fence is gone)."""


@dataclass(frozen=True)
class SliceSource:
    """Level 0's voxels as the TIFFs give them: read, converted to the output's type, bad slices as zeros.

    Attributes
    ----------
    stack : TiffStack
    dtype : str
        The output's voxel type (``uint8`` from uint16 by ``--window``, else by ``value // 256``).
    window : Window or None
    bad_slices : str
        ``"error"`` or ``"zero"`` (``--bad_slices``).
    """

    stack: TiffStack
    dtype: str
    window: Window | None
    bad_slices: str

    def read(
        self,
        z: int,
        rows: tuple[int, int],
        cols: tuple[int, int],
        out: np.ndarray,
        bad: dict[int, int],
        lock: threading.Lock,
    ) -> None:
        """Read rows of slice ``z`` (scan numbering) into ``out``; with ``--bad_slices zero`` a failure reads zeros.

        A slice that fails is zeros from its first unreadable row on
        (:func:`first_unreadable_row`: a property of the file, so the store does
        not depend on how the work is cut) and read as it is above that row.
        ``bad`` (bad slice: first row written as zeros, guarded by ``lock``) is
        where the failures found so far are kept: a slice in it is not read from
        that row on, and a new failure is added to it.  A file that changed
        after its header check is zeros from the first row of the read that
        found the change (rows converted before came from the file as checked).

        Parameters
        ----------
        out : ndarray, shape (rows[1] - rows[0], cols[1] - cols[0]), :attr:`dtype`

        Raises
        ------
        StackError
            If the slice cannot be read and ``bad_slices`` is ``"error"``.
        """
        first = bad.get(z)
        stop = rows[1] if first is None else min(rows[1], max(first, rows[0]))
        out[stop - rows[0] :] = 0
        if stop == rows[0]:
            return
        try:
            self._read(z, (rows[0], stop), cols, out[: stop - rows[0]])
        except SliceReadError as error:
            if self.bad_slices == "error":
                raise StackError(f"{error}, or pass --bad_slices zero to write it as zeros") from None
            self._zero_from_failure(z, rows, cols, out, error, bad, lock)

    def _read(self, z: int, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
        if np.dtype(self.dtype) == self.stack.dtype:
            read_rows(self.stack, z, rows, cols, out)
            return
        planes = np.empty(out.shape, self.stack.dtype)
        read_rows(self.stack, z, rows, cols, planes)
        if self.window is None:
            out[...] = ds.to_uint8(planes)
        else:
            self.window.apply(planes, out)

    def _zero_from_failure(
        self,
        z: int,
        rows: tuple[int, int],
        cols: tuple[int, int],
        out: np.ndarray,
        error: SliceReadError,
        bad: dict[int, int],
        lock: threading.Lock,
    ) -> None:
        """Fill ``out`` (rows of slice ``z`` whose read failed with ``error``) by the bad-slice rule; record it."""
        first = rows[0]
        if not error.changed:
            try:
                first = first_unreadable_row(self.stack, z)
            except SliceReadError as again:
                error = again
        if first >= rows[1]:  # every row could be read this time: the failure did not last
            try:
                self._read(z, rows, cols, out)
                return
            except SliceReadError as again:
                error, first = again, rows[0]
        first = max(first, rows[0])  # rows above were read before; a later failure cannot unread them
        out[first - rows[0] :] = 0
        if first > rows[0]:
            try:
                self._read(z, (rows[0], first), cols, out[: first - rows[0]])
            except SliceReadError as again:
                error, first = again, rows[0]
                out[...] = 0
        with lock:
            if z not in bad:
                where = f" from row {first} on" if first else ""
                log.warning("%s; written as zeros%s", error, where)
            bad[z] = min(first, bad.get(z, first))


@dataclass(frozen=True)
class Task:
    """A box of one level, and of the levels below it the task also writes: whole write units of each, written
    by this task alone.

    Attributes
    ----------
    level : int
    box : ((int, int), (int, int), (int, int))
        ``[start, stop)`` in z, y and x, in the level's voxels.
    levels : int
        Levels the task writes: ``level`` and the ``levels - 1`` below it, each halved in memory from the one
        above (:meth:`box_at`).  The box's start is a multiple of the write unit times ``2**(levels - 1)``.
    """

    level: int
    box: Box
    levels: int = 1

    def box_at(self, below: int) -> Box:
        """The box the task writes of level ``level + below``: its box halved ``below`` times, rounded up (the
        volume's odd edges)."""
        scale = 2**below
        return tuple((start // scale, -(-stop // scale)) for start, stop in self.box)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """The task's marker name: its box, ``z0-z1_y0-y1_x0-x1`` (a resumed run may cut a level otherwise)."""
        return "_".join(f"{start}-{stop}" for start, stop in self.box)

    def describe(self) -> str:
        """The task in words, for messages: its level and box (x, y, z, as users give ``--ranges``)."""
        (z0, z1), (y0, y1), (x0, x1) = self.box
        return f"level {self.level}, x {x0}:{x1}, y {y0}:{y1}, z {z0}:{z1}"


@dataclass(frozen=True)
class Job:
    """What every task of a conversion (or rebuild) needs, as plain values.

    Attributes
    ----------
    output : Path or ObjectStore
        The store (its markers go in it): a directory, or a prefix in a bucket.
    run : str
        The run's identity: its markers and its fence are under it (:func:`run_prefix`).
    levels : tuple of SinkSpec
        Every level of the store, by number.
    algorithm : str
    source : SliceSource or None
        Where level 0 comes from; ``None`` for a rebuild (no level-0 tasks).
    origin : (int, int, int)
        Scan position (slice, row, column) of level-0 voxel (0, 0, 0).
    threads : int
        Threads a task uses (``--workers``).
    advice : str or None
        For a rebuild: what to do about a damaged chunk of the first level read
        (see :func:`scrollzarr.readback.write_downsampled_block`).
    first_read : int
        The level that ``advice`` is about.
    bad_rows : tuple of (int, int)
        The bad slices known when the tasks start (scan slice, first row written as zeros, scan rows): a
        level-0 task writes them as zeros from that row on without reading them (:meth:`SliceSource.read`).
    """

    output: Location
    run: str
    levels: tuple[SinkSpec, ...]
    algorithm: ds.Algorithm
    source: SliceSource | None
    origin: Shape3 = (0, 0, 0)
    threads: int = 1
    advice: str | None = None
    first_read: int = 0
    bad_rows: tuple[tuple[int, int], ...] = ()


@dataclass
class TaskResult:
    """What a finished task reports: chunk files written (not all zero) of each level it writes (its own first),
    the bad slices it found (slice: first row written as zeros), and the seconds it took (0 for a task finished
    by an earlier run)."""

    chunks: tuple[int, ...] = ()
    bad_rows: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class LevelTotal:
    """What the tasks that write a level found: its chunk files written (not all zero), and the bad slices
    (slice: first row written as zeros; level 0's tasks)."""

    chunks: int = 0
    bad_rows: dict[int, int] = field(default_factory=dict)


def level_tasks(shape: Shape3, block: Shape3, level: int) -> list[Task]:
    """The tasks that build a level of ``shape`` in boxes of ``block`` (z slowest)."""
    return [Task(level, box) for box in iter_boxes(shape, block)]


def run_task(job: Job, task: Task) -> TaskResult:
    """Build and write ``task``'s box, make it durable, and mark the task finished in the store.

    Safe to run twice, even at once: every unit is written whole under a
    temporary name and renamed (in a bucket: put as one object), with the same
    bytes.  Not safe to outlive its run: a task of a client that was killed goes
    on running on its worker, and the store may meanwhile be replaced
    (``--overwrite``, other options).  So before each unit it checks that its
    run's fence is still in the store (one ``stat``, or one request in a
    bucket), and stops if not.

    Raises
    ------
    StoreReplaced
        If the run's fence is gone.
    """
    started = time.monotonic()
    _limit_threads(job.threads)
    # a decoded slice and zarr's buffers are fresh memory from the kernel otherwise, page-faulted in for every
    # slice (measured on the cluster bench: 7.0 s of system time in 10.5 s, 5.0 s with this; wall 9.4 s)
    keep_freed_memory()
    fence = partial(_check_fence, job)
    sinks = [CheckedSink(open_sink(job.levels[level]), fence) for level in range(task.level, task.level + task.levels)]
    bad = dict(job.bad_rows)
    if task.level == 0:
        chunks = _convert_box(job, task, sinks, bad)
    else:
        assert task.levels == 1  # lower levels are built a level at a time, from the stored level above
        chunks = (_downsample_box(job, task, sinks[0]),)
    # the units are durable before the marker that vouches for them is written
    store = storage(job.output)
    store.sync()
    _check_fence(job)
    store.put(marker_key(job.run, task), json.dumps({"chunks": list(chunks), "bad_rows": bad}).encode())
    return TaskResult(chunks, bad, time.monotonic() - started)


def _check_fence(job: Job) -> None:
    if not storage(job.output).exists(fence_key(job.run)):
        raise StoreReplaced(
            f"{job.output} was removed or replaced while a task of an earlier run was writing it; "
            "that task stopped and wrote nothing more"
        )


def _limit_threads(threads: int) -> None:
    """Keep zarr's own thread pool to the task's threads, so that threads do not multiply on a worker (a Dask
    worker already runs a task per core)."""
    if zarr.config.get("threading.max_workers") != threads:
        zarr.config.set({"threading.max_workers": threads})


def _convert_box(job: Job, task: Task, sinks: list[CheckedSink], bad: dict[int, int]) -> tuple[int, ...]:
    """Stream level-0 ``task``'s box from the slices through the levels it writes, a row of write units deep at
    a time, as the local run streams a band (:func:`scrollzarr.streaming.band_streams`); the chunks written of
    each level.

    One unit row of slices is held at a time, not the box: a box of the bench volume writing three levels is
    four unit rows deep.  Every worker process touches its memory once, and fresh memory is this machine's
    dearest (0.1-2.3 s a GiB); the worker process of a 256 x 512 x 2048 task spent 0.74-0.90 s of system
    time touching its 0.56 GiB slab (one slab of 128 slices instead: see bench/RESULTS_cluster.md).
    """
    assert job.source is not None  # a job with level-0 tasks is a conversion's
    source = job.source
    (z0, z1), (y0, y1), (x0, x1) = task.box
    oz, oy, ox = job.origin
    depth = job.levels[0].layout.unit[0]
    lock = threading.Lock()
    rows, cols = (oy + y0, oy + y1), (ox + x0, ox + x1)
    stripe = stripe_rows(job.levels[0].layout.unit[1], job.algorithm, bool(source.stack.decode_bytes))
    slabs = [range(oz + z, oz + min(z + depth, z1)) for z in range(z0, z1, depth)]

    def read(z: int, band: tuple[int, int], columns: tuple[int, int], out: np.ndarray) -> None:
        source.read(z, band, columns, out, bad, lock)

    with Workers(job.threads, writers=True) as workers:
        streams = band_streams(
            task.box, task.levels, np.dtype(source.dtype), job.levels[0].layout.unit, job.algorithm, sinks,
            workers, lambda _: None,
        )  # fmt: skip
        stream_slabs(streams[0], source.stack, slabs, rows, cols, stripe, read, lambda _: None)
    return tuple(stream.chunks_written for stream in streams)


def _downsample_box(job: Job, task: Task, sink: CheckedSink) -> int:
    """Build ``task``'s box from the stored level above and write its units; the chunks written."""
    above = zarr.open_array(zarr_store(job.levels[task.level - 1].directory, read_only=True), mode="r")
    advice = job.advice if task.level - 1 == job.first_read else None
    with Workers(job.threads) as workers:
        return sum(
            workers.run(
                partial(write_downsampled_block, above, sink, box, job.algorithm, advice)
                for box in _split(task.box, sink.unit, job.threads)
            )
        )


def _split(box: Box, unit: Shape3, parts: int) -> list[Box]:
    """``box`` cut along y into about ``parts`` boxes of whole units, for the task's threads."""
    (z0, z1), (y0, y1), (x0, x1) = box
    rows = -(-(y1 - y0) // unit[1])
    step = -(-rows // parts) * unit[1]
    return [((z0, z1), (y, min(y + step, y1)), (x0, x1)) for y in range(y0, y1, step)]


def task_voxels(task: Task) -> int:
    """Voxels ``task`` writes, of all its levels (for the progress bar)."""
    return sum(box_size(task.box_at(below)) for below in range(task.levels))


def run_prefix(run: str) -> str:
    """Where the markers and the fence of run ``run`` are in the store."""
    return f"{MARKERS}/{run}"


def fence_key(run: str) -> str:
    """The fence of run ``run``: its tasks write while it is in the store (the client puts it first, and
    ``--overwrite`` deletes it first)."""
    return f"{run_prefix(run)}/{FENCE}"


def marker_key(run: str, task: Task) -> str:
    """Where ``task``'s marker is in the store."""
    return f"{run_prefix(run)}/{task.level}/{task.name}.json"


def finished(output: Location, run: str, tasks: list[Task]) -> dict[Task, TaskResult]:
    """The tasks of ``tasks`` whose markers (of run ``run``) are in the store at ``output``, with what they
    reported.

    A marker that cannot be read (a stop while it was written leaves none: it is
    renamed in whole), or that counts the chunks of another number of levels than
    the task writes, counts as not finished.
    """
    done = {}
    store = storage(output)
    # one listing, not a request per task (in a bucket, a request costs milliseconds)
    marked = set(store.listing(run_prefix(run)))
    for task in tasks:
        if marker_key(run, task) not in marked:
            continue
        try:
            recorded = json.loads(store.get(marker_key(run, task)))
            chunks = recorded["chunks"]  # a number in the markers of runs before a task wrote several levels
            chunks = tuple(chunks) if isinstance(chunks, list) else (chunks,)
            if len(chunks) != task.levels:  # a marker of a task that wrote other levels: run it again
                continue
            done[task] = TaskResult(chunks, {int(z): row for z, row in recorded["bad_rows"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return done


def run_levels(executor: Executor, job: Job, levels: dict[int, list[Task]], bar: ProgressBar) -> dict[int, LevelTotal]:
    """Run the tasks of each level of ``levels`` on ``executor``, a level after the one above (a barrier: a
    level is built from the stored level above), but those marked finished by an earlier run.

    A bad slice is zeros from its first unreadable row on, whichever way the
    work is cut (:func:`~scrollzarr.tiffstack.first_unreadable_row`).  A
    level-0 task finds a bad slice only where it reads the slice's rows, so a
    task that read rows below that row, in a strip it could decode, wrote them
    as voxels: once level 0's tasks have finished, those tasks are run again
    (their markers removed first) with the bad slices known, and write those
    rows as zeros, as the run on one machine does.

    Returns
    -------
    dict of int to LevelTotal
        For each level written: what the tasks that write it found.
    """
    totals: dict[int, LevelTotal] = {}
    reported: set[int] = set()
    for level, tasks in levels.items():
        bar.set_description(f"level {level}")
        done = finished(job.output, job.run, tasks)
        log.debug("level %d: %d tasks, %d finished before", level, len(tasks), len(done))
        bar.update(sum(task_voxels(task) for task in done))
        results = dict(done)
        if level == 0:
            job = replace(job, bad_rows=_merged_bad(job.bad_rows, results.values()))
        seconds = []
        pending = [task for task in tasks if task not in done]
        again = False
        while True:
            for task, result in executor.run(run_task, job, pending):
                for z, row in sorted(result.bad_rows.items()):
                    if z not in reported and z not in dict(job.bad_rows):  # the worker logged why, on its side
                        where = f" from row {row} on" if row else ""
                        log.warning(
                            "slice %d could not be read by the task for %s; written as zeros%s",
                            z, task.describe(), where,
                        )  # fmt: skip
                        reported.add(z)
                results[task] = result
                seconds.append(result.seconds)
                if not again:
                    bar.update(task_voxels(task))
            if level != 0:
                break
            # also when every task was finished before: a run stopped before its tasks were run again, or of an
            # earlier version, left them marked
            job = replace(job, bad_rows=_merged_bad(job.bad_rows, results.values()))
            pending = _disagreeing(results, dict(job.bad_rows), job.origin)
            if not pending:
                break
            log.info(
                "%d level-0 task(s) read rows of a bad slice below its first unreadable row; run again to write "
                "them as zeros", len(pending),
            )  # fmt: skip
            if not again:  # levels below that an earlier run built from the voxels that change: built again
                for lower, lower_tasks in levels.items():
                    if lower > 0 and has_markers(job.output, job.run, lower):
                        for task in lower_tasks:
                            unmark(job.output, job.run, task)
            again = True
            for task in pending:
                unmark(job.output, job.run, task)
        if seconds:
            log.info(
                "level %d: %d task(s) run, %.3f s each on average (%.3f s the longest)",
                level, len(seconds), sum(seconds) / len(seconds), max(seconds),
            )  # fmt: skip
        for result in results.values():
            for below, chunks in enumerate(result.chunks):
                totals.setdefault(level + below, LevelTotal()).chunks += chunks
            bad = totals.setdefault(level, LevelTotal()).bad_rows
            for z, row in result.bad_rows.items():
                bad[z] = min(row, bad.get(z, row))
    return totals


def _merged_bad(known: tuple[tuple[int, int], ...], results: Iterable[TaskResult]) -> tuple[tuple[int, int], ...]:
    """The bad slices of ``known`` and of every result, each with the first row written as zeros of any."""
    bad = dict(known)
    for result in results:
        for z, row in result.bad_rows.items():
            bad[z] = min(row, bad.get(z, row))
    return tuple(sorted(bad.items()))


def _disagreeing(results: dict[Task, TaskResult], bad: dict[int, int], origin: Shape3) -> list[Task]:
    """The level-0 tasks of ``results`` that wrote voxels of a bad slice of ``bad`` (scan slice: first row written
    as zeros) from that row on: their box holds the slice and rows from that row on, and they wrote zeros
    from a later row, or none."""
    oz, oy, _ = origin
    stale = []
    for task, result in results.items():
        (z0, z1), (y0, y1), _ = task.box
        for z, first in bad.items():
            if not oz + z0 <= z < oz + z1 or oy + y1 <= first:
                continue
            if result.bad_rows.get(z, oy + y1) > max(first, oy + y0):
                stale.append(task)
                break
    return stale


def unmark_damaged(output: Location, run: str, level: int, spec: SinkSpec, tasks: list[Task]) -> None:
    """Find the damaged unit files of ``level`` (its ``spec``: :func:`~scrollzarr.store.damaged_units`); forget
    the task of ``tasks`` (of any level) that wrote each, then delete it: the resumed run writes it again."""
    for path, problem in damaged_units(spec):
        log.warning("chunk file %s is damaged (%s); it is written again", path, problem)
        corner = [i * n for i, n in zip(unit_index(spec, path), spec.layout.unit, strict=True)]
        for task in tasks:
            if not task.level <= level < task.level + task.levels:
                continue
            if all(a <= c < b for (a, b), c in zip(task.box_at(level - task.level), corner, strict=True)):
                unmark(output, run, task)
        path.unlink()


def has_markers(output: Location, run: str, level: int) -> bool:
    """Whether a task of ``level`` of run ``run`` marked itself finished in the store at ``output``."""
    return bool(storage(output).listing(f"{run_prefix(run)}/{level}"))


def unmark(output: Location, run: str, task: Task) -> None:
    """Forget that ``task`` finished (before one of its units is deleted: never a marker without its units)."""
    storage(output).delete(marker_key(run, task))


def put_fence(output: Location, run: str) -> None:
    """Put run ``run``'s fence into the store at ``output``, before any of its tasks runs."""
    storage(output).put(fence_key(run), run.encode())


def remove_markers(output: Location) -> None:
    """Delete every marker of the store at ``output`` (once its metadata is written)."""
    storage(output).delete_all(MARKERS)
