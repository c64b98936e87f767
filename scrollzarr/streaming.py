"""Streaming the pyramid: planes of a level arrive in z order, are written as rows of write units,
and are halved into the level below, so that no level is read back from the store.

One :class:`LevelStream` per level holds the planes of a *band* (a box of rows
and columns, whole write units of every streamed level) that are not yet
written or not yet halved.  Level 0's planes come from the TIFFs; each stream
passes its halved planes to the next.  A row of write units (chunks, or
shards) is written once all its planes are there; planes are halved in pairs, once the context a pair needs
(:func:`scrollzarr.downsample.halo` planes beyond it) is there too.  The
tasks of one step (the units of a row, the row stripes of a halving) are
independent and run on the shared :class:`~scrollzarr.workers.Workers`;
each write unit is written by exactly one task.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from functools import partial

import numpy as np

from scrollzarr import downsample as ds
from scrollzarr.blocks import Box, Shape3
from scrollzarr.durable import aligned_empty
from scrollzarr.sinks import LevelSink, PooledSink, UnitAssembly, pooled
from scrollzarr.tiffstack import Lookahead, TiffStack
from scrollzarr.workers import Workers

# Halving works on stripes of rows of about this many input bytes at a time, which keeps
# its temporary arrays small and in the processor's cache (measured on 128 planes of 2048
# columns: 3.0 GB/s with 2 MiB stripes, 2.7 with 4 MiB, 1.5 with 16 MiB) and gives every
# worker a share.
STRIPE_BYTES = 2 * 2**20


def pool_buffers(workers: int) -> int:
    """Chunk buffers the streams of a band share for compressed or sharded units (:class:`BufferPool`), with
    ``workers`` workers: a write group may keep every worker encoding while its writer waits for the disk, but
    all groups together hold at most two buffers a worker and one more."""
    return 2 * workers + 1


class BufferPool:
    """Page-aligned buffers of ``nbytes`` that write groups borrow (:meth:`take`) and give back (:meth:`give`);
    at most ``limit`` of them are ever made, and they are freed with the pool (with the band's streams).

    Reused rather than made per chunk: fresh pages cost page faults (blosc-lz4 into a reused buffer 1552 MB/s,
    into a fresh one 646 MB/s: :func:`scrollzarr.sinks._encoder`).
    """

    def __init__(self, nbytes: int, limit: int) -> None:
        self.nbytes = nbytes
        self.limit = limit
        self.made = 0
        self.free: list[np.ndarray] = []
        self.ready = threading.Condition()

    def take(self, want: int) -> list[np.ndarray]:
        """Between 1 and ``want`` buffers, waiting until one is free (a group that holds some never waits for
        more, so every holder finishes and gives its buffers back)."""
        with self.ready:
            while not self.free and self.made >= self.limit:
                self.ready.wait()
            while len(self.free) < want and self.made < self.limit:
                self.free.append(aligned_empty((self.nbytes,), np.dtype(np.uint8)))
                self.made += 1
            taken, self.free = self.free[:want], self.free[want:]
            return taken

    def give(self, buffers: list[np.ndarray]) -> None:
        with self.ready:
            self.free += buffers
            self.ready.notify_all()


class _FilledRows:
    """How many rows of the slab being committed are filled, for write groups that wait for their chunks' rows
    (a unit taller than a stripe: its first chunks are written while its last rows are read)."""

    def __init__(self) -> None:
        self.rows = 0
        self.failed = False
        self.changed = threading.Condition()

    def reset(self, rows: int) -> None:
        with self.changed:
            self.rows, self.failed = rows, False

    def filled(self, rows: int) -> None:
        with self.changed:
            self.rows = rows
            self.changed.notify_all()

    def fail(self) -> None:
        """Filling stopped (an error): every waiting group gives up."""
        with self.changed:
            self.failed = True
            self.changed.notify_all()

    def ready(self, rows: int) -> bool:
        return self.rows >= rows

    def wait(self, rows: int) -> None:
        """Wait until the first ``rows`` rows are filled; raise if filling stopped before."""
        with self.changed:
            while self.rows < rows and not self.failed:
                self.changed.wait()
            if self.rows < rows:
                raise RuntimeError("the slab's rows were not all read")


def stripe_rows(unit_rows: int, algorithm: ds.Algorithm, decoded: bool) -> int | None:
    """Rows of a slab read at a time (whole rows of write units of ``unit_rows``, even), or ``None`` for all
    rows at once.

    Reading a slab a stripe at a time lets the stripes already read be
    written and halved while the disk delivers the next.  Only for slices read
    straight from the file (not ``decoded``): a compressed slice would be
    opened and parsed again for every stripe (measured: slower), and not for
    gaussian, whose halving needs rows beyond a stripe.
    """
    if ds.halo(algorithm) or decoded:
        return None
    return unit_rows if unit_rows % 2 == 0 else 2 * unit_rows


def band_streams(
    box: Box,
    levels: int,
    dtype: np.dtype,
    unit: Shape3,
    algorithm: ds.Algorithm,
    writers: Sequence[LevelSink],
    workers: Workers,
    on_written: Callable[[int], object],
) -> list[LevelStream]:
    """The streams of levels 0 … ``levels - 1`` of level-0 ``box`` (z, y, x ``[start, stop)``), each fed with
    the halved planes of the one above; level ``k``'s box is ``box`` halved ``k`` times, rounded up (the
    volume's odd edges).  ``writers[k]`` writes level ``k``'s units."""
    streams: list[LevelStream] = []
    below = None
    for level in range(levels - 1, -1, -1):
        scale = 2**level
        planes, rows, cols = ((start // scale, -(-stop // scale)) for start, stop in box)
        below = LevelStream(planes, rows, cols, dtype, unit, algorithm, writers[level], below, workers, on_written)
        streams.insert(0, below)
    return streams


# Reads rows ``rows`` and columns ``cols`` (scan coordinates) of slice ``z`` (scan numbering) into ``out``.
SliceReader = Callable[[int, tuple[int, int], tuple[int, int], np.ndarray], None]


def stream_slabs(
    top: LevelStream,
    stack: TiffStack,
    slabs: Sequence[range],
    rows: tuple[int, int],
    cols: tuple[int, int],
    stripe: int | None,
    read: SliceReader,
    after: Callable[[int], None],
) -> None:
    """Feed ``top`` (level 0's stream of a band) the slabs of slices ``slabs`` (scan numbering, a row of write
    units deep each) of rows ``rows`` and columns ``cols``, each slice's rows read by ``read`` on the stream's
    workers, ``stripe`` rows at a time (:func:`stripe_rows`); ``after(number)`` once slab ``number`` of
    ``slabs`` is written and halved.  The disk reads the next slab (stripe by stripe, as the work takes it)
    while one is processed (:class:`~scrollzarr.tiffstack.Lookahead`)."""
    workers = top.workers

    def filler(view: np.ndarray, z0: int) -> Callable[[int, int], None]:
        """What fills rows ``[r0, r1)`` (band coordinates) of ``view``, the slab of slices from ``z0``."""

        def fill(r0: int, r1: int) -> None:
            band = (rows[0] + r0, rows[0] + r1)
            workers.run(partial(read, z0 + index, band, cols, view[index, r0:r1]) for index in range(len(view)))

        return fill

    with Lookahead(stack, slabs, rows, stripe) as lookahead:
        for number, slab in enumerate(slabs):
            if number:
                lookahead.advance()
            view = top.reserve(len(slab))
            top.commit(len(view), filler(view, slab.start), stripe)
            after(number)


def halving_stripe_rows(row_bytes: int) -> int:
    """Rows halved at a time when a row (all planes of it) is ``row_bytes`` bytes: even, at least 2."""
    rows = max(2, STRIPE_BYTES // max(row_bytes, 1))
    return rows + rows % 2


class LevelStream:
    """The pending planes of one level's band.

    Parameters
    ----------
    planes : (int, int)
        ``[start, stop)`` of z, in this level's coordinates: every plane of
        the level for a band of the local run, or a task's box
        (:mod:`scrollzarr.tasks`).  The start is a multiple of the write
        unit's depth (even), and the stop the level's depth or a multiple of
        the unit's.
    rows, cols : (int, int)
        The band, in this level's coordinates: ``[start, stop)`` of y and of x.
        Both starts are multiples of the write unit's.
    unit : (int, int, int)
        Shape of the level's write units, voxels (z, y, x).
    full_plane : bool
        Whether the band is the whole plane (needed for ``gaussian``, whose
        context across the band's sides is not held).
    writer : LevelSink
        Where this level's write units go.
    below : LevelStream or None
        The next level, fed with this one's halved planes; ``None`` for the
        last streamed level.
    on_written : callable
        Called with the number of voxels of each row of units written (progress).
    """

    def __init__(
        self,
        planes: tuple[int, int],
        rows: tuple[int, int],
        cols: tuple[int, int],
        dtype: np.dtype,
        unit: Shape3,
        algorithm: ds.Algorithm,
        writer: LevelSink,
        below: LevelStream | None,
        workers: Workers,
        on_written: Callable[[int], object],
    ) -> None:
        self.first, self.stop = planes
        self.rows = rows
        self.cols = cols
        self.unit = unit
        self.algorithm = algorithm
        self.margin = ds.halo(algorithm) if below is not None else 0
        self.writer = writer
        self.below = below
        self.workers = workers
        self.on_written = on_written
        self.chunks_written = 0
        self.start = self.first  # z of self.buffer[0]
        self.count = 0  # planes held
        self.written = self.first  # first z not yet written
        self.halved = self.first  # first z not yet halved (even)
        # a level (or a task's box) shallower than a unit holds fewer
        held = self.capacity(min(unit[0], self.stop - self.first), algorithm, below is not None)
        self.buffer = np.empty((held, *self.plane_shape), dtype)
        # compressed or sharded units: chunks encoded on the workers, files assembled on the writer threads
        self.pooled = pooled(writer) if workers.count > 1 else None
        # With one worker such units are written on the calling thread: a writer thread would encode them beside
        # the reading and halving, two cores for --workers 1 (and for every one-thread task of a Dask worker,
        # which already runs a task per core).  Uncompressed chunks go to the writer thread: it waits for the disk.
        self.submit_write = (
            workers.submit if workers.count == 1 and pooled(writer) is not None else workers.submit_write
        )
        self.pool: BufferPool | None = None
        self.filled = _FilledRows()
        if self.pooled is not None:
            size = self.pooled.buffer_bytes
            shared = below.pool if below is not None else None  # the band's streams share one pool
            self.pool = shared if shared is not None and shared.nbytes == size else None
            if self.pool is None:
                self.pool = BufferPool(size, pool_buffers(workers.count))

    @staticmethod
    def capacity(depth: int, algorithm: ds.Algorithm, halves: bool) -> int:
        """Planes a stream holds at most: one row of write units ``depth`` planes deep, plus context and an odd
        plane when halving."""
        extra = ds.halo(algorithm) + 1 if halves and (depth % 2 or ds.halo(algorithm)) else 0
        return depth + extra

    @property
    def plane_shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def end(self) -> int:
        """First z not yet received."""
        return self.start + self.count

    def reserve(self, planes: int) -> np.ndarray:
        """Room for the next ``planes`` planes, to fill and then :meth:`commit`."""
        keep = min(self.written, max(self.halved - self.margin, 0)) if self.below else self.written
        keep = max(keep, self.start)
        if keep > self.start:  # drop what is written and halved
            held = self.end - keep
            self.buffer[:held] = self.buffer[keep - self.start : self.count]
            self.start, self.count = keep, held
        if self.count + planes > len(self.buffer):  # more than the usual one row: grow
            grown = np.empty((self.count + planes, *self.plane_shape), self.buffer.dtype)
            grown[: self.count] = self.buffer[: self.count]
            self.buffer = grown
        return self.buffer[self.count : self.count + planes]

    def commit(self, planes: int, fill: Callable[[int, int], None] | None = None, stripe: int | None = None) -> None:
        """Take the ``planes`` planes just reserved; write and halve what is ready.

        Parameters
        ----------
        planes : int
            Planes reserved with :meth:`reserve`.
        fill : callable, optional
            ``fill(r0, r1)`` fills rows ``[r0, r1)`` (band coordinates) of those
            planes; without it they must be filled already.
        stripe : int, optional
            With ``fill``: fill ``stripe`` rows at a time (a multiple of the
            write unit's rows, even), and hand each stripe's units and halves to the
            workers as soon as it is filled, so that they are written and
            halved while the next stripe is read.  Not for an algorithm that
            needs context across rows (gaussian): that fills all rows at once.
            Compressed or sharded units are filled a chunk row at a time: a
            unit's chunks are prepared and written as their rows arrive.
        """
        self.count += planes
        final = self.end == self.stop
        writes: list[tuple[int, int]] = []
        rows_done = []
        depth = self.unit[0]
        while self.written < self.end and (self.written + depth <= self.end or final):
            stop = min(self.written + depth, self.stop)
            writes.append((self.written, stop))
            rows_done.append((stop - self.written) * self.plane_shape[0] * self.plane_shape[1])
            self.written = stop
        halved_from, halved_to = self.halved, self._halvable(final)
        out = None
        if self.below is not None and halved_to > halved_from:
            out = self.below.reserve((halved_to + 1) // 2 - halved_from // 2)
            self.halved = halved_to
        height = self.plane_shape[0]
        striped = fill is not None and stripe is not None and stripe > 0 and not self.margin
        step = stripe if striped and stripe is not None else height
        if self.pooled is not None and striped:
            # units taller than a chunk row (shards) are written as their rows are read, a chunk row at a time:
            # a shard as wide and as high as the plane was written only once its whole slab was read
            chunk_rows = self.pooled.chunks[1]
            step = min(step, chunk_rows + chunk_rows % 2)
        self.filled.reset(0 if fill is not None else height)
        futures: list[Future[object]] = []
        try:
            for r0 in range(0, height, step):
                rows = (r0, min(r0 + step, height))
                if fill is not None:
                    fill(*rows)
                    self.filled.filled(rows[1])
                for z0, z1 in writes:  # to the writer threads: with direct I/O they mostly wait for the disk
                    futures += [self.submit_write(task) for task in self._write_tasks(z0, z1, rows)]
                if out is not None:
                    halves = self._halve_tasks(halved_from, halved_to, out, rows=rows)
                    futures += [self.workers.submit(task) for task in halves]
        except BaseException:
            self.filled.fail()  # write groups waiting for rows give up
            raise
        finally:
            wait(futures)  # no task is left writing, even when filling failed
        self.chunks_written += sum(result for future in futures if isinstance(result := future.result(), int))
        for voxels in rows_done:
            self.on_written(voxels)
        if out is not None:
            assert self.below is not None
            self.below.commit(len(out))

    def _halvable(self, final: bool) -> int:
        """End (exclusive) of the planes that can be halved now: even, with context, or the level's end."""
        if final:
            return self.stop
        ready = self.end - self.margin
        return max(ready - ready % 2, self.halved)

    def _write_tasks(self, z0: int, z1: int, rows: tuple[int, int]) -> list[Callable[[], int]]:
        """Tasks that write the units of planes ``[z0, z1)`` that start in rows ``rows`` (band coordinates): one
        each, or for compressed or sharded units, a group of consecutive units each (:meth:`_write_group`)."""
        planes = self.buffer[z0 - self.start : z1 - self.start]
        (y0, y1), (x0, x1) = self.rows, self.cols
        _, height, width = self.unit
        units: list[tuple[Shape3, np.ndarray]] = []
        for y in range(y0 + -(-rows[0] // height) * height, y0 + rows[1], height):
            for x in range(x0, x1, width):
                piece = planes[:, y - y0 : min(y + height, y1) - y0, x - x0 : min(x + width, x1) - x0]
                units.append(((z0, y, x), piece))
        if self.pooled is None or not units:
            return [partial(self.writer.write, corner, piece) for corner, piece in units]
        # as many groups as writer threads, and enough chunks prepared ahead in each to keep every worker busy
        count = self.workers.count
        groups = min(count, len(units))
        ahead = 1 + math.ceil(count / groups)
        size = math.ceil(len(units) / groups)
        return [partial(self._write_group, self.pooled, units[i : i + size], ahead) for i in range(0, len(units), size)]

    def _write_group(self, sink: PooledSink, units: list[tuple[Shape3, np.ndarray]], ahead: int) -> int:
        """Write ``units`` (corner, voxels) in turn, on this (writer) thread; their chunks are prepared (padded,
        tested for zeros, encoded) on the workers, up to ``ahead`` at a time, in buffers of the pool.

        Why: a writer thread that encodes and then writes leaves its core idle while it waits for the disk
        (blosc-zstd 3, the synthetic scroll of bench/: 4.6 s of CPU encoding level 0, 3.4 s blocked in direct-I/O
        writes; two writers kept 1.1 cores busy once the slab was read), and a level of fewer units than
        workers (a shard as wide as the plane) was encoded by one core.  A chunk is prepared once its rows are
        filled (:class:`_FilledRows`), so a shard taller than a stripe is written while its last rows are read.
        Chunks are prepared before the reading and halving waiting for the workers
        (:meth:`~scrollzarr.workers.Workers.submit_urgent`): behind them, the writers fell idle while a slab was
        read, and its last units were encoded and written after it, with the disk and one core busy (the
        synthetic scroll of bench/, page cache, medians of alternating runs: blosc-lz4 3.09 s against 3.56 s,
        shards 128,2048,2048 2.19 s against 2.60 s; bench/RESULTS.md).  The files are those
        :meth:`LevelSink.write` writes: each unit by this one task.

        Returns
        -------
        int
            The chunks stored (not all zero).
        """
        assert self.pool is not None
        chunks: list[tuple[int, Shape3, np.ndarray, int]] = []  # unit, index in it, voxels, rows they need
        for number, (corner, piece) in enumerate(units):
            for inner, box in sink.chunk_boxes(corner):
                part = piece[tuple(slice(a - c, b - c) for (a, b), c in zip(box, corner, strict=True))]
                chunks.append((number, inner, part, box[1][1] - self.rows[0]))
        buffers = self.pool.take(ahead)
        pending: deque[tuple[Future[int], np.ndarray]] = deque()
        queued = 0

        def prepare_ahead() -> None:
            nonlocal queued
            while buffers and queued < len(chunks):
                _, _, part, needed = chunks[queued]
                if not self.filled.ready(needed):
                    if pending:  # write what is prepared while the rows are read
                        return
                    self.filled.wait(needed)
                buffer = buffers.pop()
                pending.append((self.workers.submit_urgent(sink.prepare, part, buffer), buffer))
                queued += 1

        stored = 0
        assembly: UnitAssembly | None = None
        try:
            prepare_ahead()
            for position, (number, inner, _, _) in enumerate(chunks):
                if assembly is None:
                    assembly = sink.assemble(units[number][0])
                future, buffer = pending.popleft()
                try:
                    nbytes = future.result()
                    if nbytes:
                        assembly.add(inner, buffer[:nbytes])
                finally:
                    buffers.append(buffer)
                prepare_ahead()
                if position + 1 == len(chunks) or chunks[position + 1][0] != number:  # the unit's last chunk
                    stored += assembly.finish()
                    assembly = None
        except BaseException as error:
            if assembly is not None:
                assembly.abort(error)
            raise
        finally:
            wait([future for future, _ in pending])  # no worker is left writing into a buffer
            self.pool.give(buffers + [buffer for _, buffer in pending])
        return stored

    def _halve_tasks(
        self,
        z0: int,
        z1: int,
        out: np.ndarray,
        source: np.ndarray | None = None,
        rows: tuple[int, int] | None = None,
    ) -> list[Callable[[], None]]:
        """Tasks that write the halves of planes ``[z0, z1)`` into ``out``, a stripe of rows each.

        ``source`` holds planes ``[z0 - margin, z1 + margin)`` (clipped to the level); by default
        they are taken from the buffer.  ``rows`` (band coordinates, starting even) limits the
        work to those rows; by default all.
        """
        margin = self.margin
        lo, hi = max(z0 - margin, self.first), min(z1 + margin, self.stop)
        if source is None:
            source = self.buffer[lo - self.start : hi - self.start]
        height, cols = self.plane_shape
        first, last = rows if rows is not None else (0, height)
        stripe = halving_stripe_rows((hi - lo) * cols * self.buffer.itemsize)
        tasks: list[Callable[[], None]] = []
        for r0 in range(first, last, stripe):
            r1 = min(r0 + stripe, last)
            a, b = max(r0 - margin, 0), min(r1 + margin, height)
            block = source[:, a:b]
            target = out[:, r0 // 2 : (r1 + 1) // 2]
            core = (slice(z0 - lo, z1 - lo), slice(r0 - a, r1 - a), slice(None))
            tasks.append(partial(self._halve, block, core, target))
        return tasks

    def state(self) -> list[int]:
        """Where the stream stands: first plane held, planes held, first not written, first not halved."""
        return [self.start, self.count, self.written, self.halved]

    def restore(self, state: list[int], stored: Callable[[int, int], np.ndarray]) -> None:
        """Take up ``state`` again after a stop: read the held planes that were written back.

        ``stored(z0, z1)`` reads written planes of this level from the store.  Held
        planes that were not written are rebuilt by the level above's
        :meth:`restore_below`, which must run after this.
        """
        self.start, self.count, self.written, self.halved = state
        if self.count > len(self.buffer):
            self.buffer = np.empty((self.count, *self.plane_shape), self.buffer.dtype)
        end = min(self.written, self.end)
        if end > self.start:
            self.buffer[: end - self.start] = stored(self.start, end)

    def restore_below(self, stored: Callable[[int, int], np.ndarray]) -> None:
        """Rebuild the held planes of the stream below that are not written: halve them again.

        ``stored(z0, z1)`` reads written planes of *this* level back; this stream's
        own held planes are in its buffer (restored already).
        """
        below = self.below
        assert below is not None
        z0, z1 = max(below.start, below.written), below.end
        if z1 <= z0:
            return
        lo, hi = max(2 * z0 - self.margin, self.first), min(2 * z1 + self.margin, self.stop)
        source = np.empty((hi - lo, *self.plane_shape), self.buffer.dtype)
        split = min(max(self.written, lo), hi)  # planes below this were written; the rest are held
        if split > lo:
            source[: split - lo] = stored(lo, split)
        if hi > split:
            source[split - lo :] = self.buffer[split - self.start : hi - self.start]
        out = below.buffer[z0 - below.start : z1 - below.start]
        self.workers.run(self._halve_tasks(2 * z0, min(2 * z1, self.stop), out, source))

    def _halve(self, block: np.ndarray, core: tuple[slice, slice, slice], target: np.ndarray) -> None:
        if self.margin:
            target[...] = ds.downsample_gaussian(block, core)
        else:
            target[...] = ds.downsample(block[core], self.algorithm)
