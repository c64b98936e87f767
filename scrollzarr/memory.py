"""How much memory the work needs, and how to cut it to fit ``--max_gb``.

Pure arithmetic on shapes and byte counts.  Level 0 is converted one *band*
at a time: a box of whole level-0 rows and columns, all of z, streamed through
the levels it is chunk-aligned for (see :mod:`scrollzarr.streaming`); levels
below those are built from the stored level above in *blocks*.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from scrollzarr import downsample as ds
from scrollzarr.blocks import Shape3
from scrollzarr.errors import UsageError
from scrollzarr.sizes import GIB
from scrollzarr.streaming import LevelStream, halving_stripe_rows, pool_buffers


@dataclass(frozen=True)
class Layout:
    """What the memory model needs to know about a conversion.

    Attributes
    ----------
    shapes : tuple of (int, int, int)
        Every level's shape, z, y, x.
    chunk : int
        Edge of the cubic chunks, voxels.
    in_itemsize, out_itemsize : int
        Bytes per voxel of the TIFFs and of the store.
    slice_shape : (int, int)
        Rows and columns of a whole TIFF slice (before cropping).
    decode_bytes : int
        The largest piece of a slice decoded at once (a compressed strip, or a
        whole tiled slice); 0 when every slice is read directly.
    algorithm : str
    workers : int
    unit : (int, int, int) or None
        Shape of a write unit (a shard), voxels (z, y, x); ``None`` for one chunk.
        Bands and blocks are whole units, and a stream holds a unit's depth of planes.
    encoded : bool
        Whether units are compressed: each writer then also holds a chunk's encoded bytes.
    """

    shapes: tuple[Shape3, ...]
    chunk: int
    in_itemsize: int
    out_itemsize: int
    slice_shape: tuple[int, int]
    decode_bytes: int
    algorithm: ds.Algorithm
    workers: int
    unit: Shape3 | None = None
    encoded: bool = False

    @property
    def write_unit(self) -> Shape3:
        """The write unit's shape, voxels (z, y, x)."""
        return self.unit if self.unit is not None else (self.chunk,) * 3

    @property
    def chunk_bytes(self) -> int:
        """Bytes a writer holds for one chunk: its padded voxels, and its encoded bytes when compressed."""
        return self.chunk**3 * self.out_itemsize * (2 if self.encoded else 1)


@dataclass(frozen=True)
class BandPlan:
    """How level 0 is cut: bands of ``rows`` x ``cols`` level-0 voxels, streamed through ``streamed`` more levels."""

    rows: int
    cols: int
    streamed: int
    nbytes: int


def band_cost(layout: Layout, rows: int, cols: int, streamed: int) -> int:
    """Bytes to convert one band of ``rows`` x ``cols`` with levels 1 … ``streamed`` streamed.

    The streams' plane buffers, plus for each worker: what reading one slice's
    rows needs beside them and a halving stripe's temporaries; and the chunk
    buffers of writing (:func:`_write_buffers`).
    """
    depth = layout.write_unit[0]
    nbytes = 0
    for level in range(streamed + 1):
        area = math.ceil(rows / 2**level) * math.ceil(cols / 2**level)
        planes = LevelStream.capacity(min(depth, layout.shapes[level][0]), layout.algorithm, level < streamed)
        nbytes += planes * area * layout.out_itemsize
    halving = _halving_cost(layout, rows, cols, streamed)
    return nbytes + layout.workers * (_read_cost(layout, rows, cols) + halving) + _write_buffers(layout)


def _read_cost(layout: Layout, rows: int, cols: int) -> int:
    """Bytes a worker needs beside a band's planes to read one slice's ``rows`` x ``cols``."""
    read = layout.decode_bytes  # a decoded strip (or whole tiled slice)
    if not layout.decode_bytes and cols < layout.slice_shape[1]:
        read += rows * layout.slice_shape[1] * layout.in_itemsize  # whole rows, then cut
    if layout.in_itemsize != layout.out_itemsize:
        read += rows * cols * layout.in_itemsize  # the rows before --obytes conversion
    return read


def _write_buffers(layout: Layout) -> int:
    """Bytes of the chunk buffers that writing the streamed levels holds.

    Each worker's share (:attr:`Layout.chunk_bytes`: a padded chunk and, compressed, the encoded bytes of one:
    the writer thread's, or with the pool below the worker's padded chunk and the writer's unit-file buffer),
    and for compressed or sharded units with more than one worker, whose chunks are prepared on the workers
    while the writer threads assemble the files (:meth:`scrollzarr.streaming.LevelStream._write_group`), the
    band's pool of prepared chunks (:func:`scrollzarr.streaming.pool_buffers`).  Buffers are counted by the
    chunk's bytes, the pages a chunk touches (blosc-zstd chunks of the synthetic scroll take 0.82 of the voxels'
    bytes, 1.922 GiB for 2.336: bench/RESULTS.md; the room for incompressible data, 1/128 and a 4096-byte
    block more, is seldom touched).
    """
    shares = layout.workers * layout.chunk_bytes
    if layout.workers == 1 or not (layout.encoded or _sharded(layout)):
        return shares
    return shares + pool_buffers(layout.workers) * layout.chunk**3 * layout.out_itemsize


def _halving_cost(layout: Layout, rows: int, cols: int, streamed: int) -> int:
    """Temporaries of one halving task (a stripe of rows of a stream), the most over the levels that halve."""
    cost = 0
    for level in range(streamed):
        shape = (layout.shapes[level][0], math.ceil(rows / 2**level), math.ceil(cols / 2**level))
        row_bytes = LevelStream.capacity(layout.write_unit[0], layout.algorithm, True) * shape[2] * layout.out_itemsize
        stripe = halving_stripe_rows(row_bytes) * row_bytes
        cost = max(cost, _stripe_cost(layout, stripe, odd=any(n % 2 for n in shape)))
    return cost


def _stripe_cost(layout: Layout, stripe: int, odd: bool) -> int:
    """Temporaries of halving a stripe of ``stripe`` bytes.

    For gaussian three float64 copies of the stripe and a padded one; otherwise a
    padded copy where an axis is odd, and per algorithm, an eighth of the voxels each:
    for mean the sums, the rounding's temporary (4 or 8 bytes a voxel) and the
    result, for nearest and max the result and its running value.
    """
    itemsize = layout.out_itemsize
    if layout.algorithm == "gaussian":
        return stripe * (1 + 3 * 8 // itemsize)
    eighth = -(-stripe // itemsize // 8)
    if layout.algorithm == "mean":
        accumulator = 4 if itemsize <= 2 else 8
        temporaries = eighth * (2 * accumulator + itemsize)
    else:
        temporaries = 2 * eighth * itemsize
    return temporaries + (stripe if odd else 0)


def plan_bands(layout: Layout, budget: int | None) -> BandPlan:
    """The band to convert level 0 in, within ``budget`` bytes (``None``: whole planes).

    Whole planes, streamed through every level, come first.  Otherwise bands
    of whole rows: for each number of streamed levels, most first, the largest
    height that is a multiple of the write unit's rows times ``2**streamed`` and
    fits.  Otherwise one row of write units by as many whole units of columns as
    fit, nothing streamed.
    ``gaussian`` needs whole planes to stream (its context crosses a band's sides).

    Raises
    ------
    UsageError
        If even one chunk's worth does not fit, saying how much the whole run needs at the least.
    """
    _, height, width = layout.shapes[0]
    _, unit_rows, unit_cols = layout.write_unit
    nlevels = len(layout.shapes)
    whole = band_cost(layout, height, width, nlevels - 1)
    if budget is None or whole <= budget:
        return BandPlan(height, width, nlevels - 1, whole)
    for streamed in range(0 if layout.algorithm == "gaussian" else nlevels - 1, -1, -1):
        step = unit_rows * 2**streamed
        for rows in range((height - 1) // step * step, 0, -step):
            cost = band_cost(layout, rows, width, streamed)
            if cost <= budget:
                return BandPlan(rows, width, streamed, cost)
    rows = min(unit_rows, height)
    for cols in range((width - 1) // unit_cols * unit_cols, 0, -unit_cols):
        cost = band_cost(layout, rows, cols, 0)
        if cost <= budget:
            return BandPlan(rows, cols, 0, cost)
    # nothing streamed: levels 1 … are then built from the stored level above, which needs its own minimum
    # (--max_gb 1e-05 once quoted 0.000144 GB for 16 x 64 x 48 shards, and refused that for 0.00194)
    need = max(band_cost(layout, rows, min(unit_cols, width), 0), read_back_need(layout, 1))
    raise _too_small(budget, layout.chunk, need, layout.unit)


def task_depth(unit: int, slices: int, levels: int) -> int:
    """Slices a level-0 task that writes ``levels`` levels reads, of ``slices`` in all: the write unit's depth
    (``unit``) times ``2**(levels - 1)``, so that each level it writes is whole units deep (or all there are)."""
    return min(unit * 2 ** (levels - 1), slices)


def task_band(layout: Layout, budget: int | None, parallel: int) -> BandPlan | None:
    """The band of the level-0 tasks that write the most levels, whole planes wide, within ``budget`` bytes a
    task, in at least two tasks for each of the ``parallel`` the cluster runs at once (``streamed``: the levels
    below level 0 a task writes); ``None`` if no such band writes more than level 0.

    Two tasks a slot, not one: a worker's second task reuses the memory its first touched, and the scheduler
    can even out tasks of unequal work (a masked band's all-zero chunks are not written).  Measured on the
    bench volume with two workers, when a task held its whole box: 7.0-7.95 s with four tasks of 0.5 GiB,
    7.7 s with two of 1 GiB (fresh memory costs this machine about 2 s a GiB to touch the first time).

    A level read back from the store costs a pass over it (level 0 read back to build level 1: as many bytes
    again as the conversion wrote); a task that streams its box through the levels below saves those passes
    and a barrier between levels each (measured, the cluster bench on two workers: level 1 read back took
    2.8 s of 9.4).  A task streams its box as the run on one machine streams a band, so its memory is
    :func:`band_cost`'s.  For ``k`` levels below, the band's rows are whole write units times ``2**k`` and
    its depth the unit's times ``2**k``.  Bands are whole planes wide: a compressed slice is decoded in whole
    rows (strips), so a band cut along x would decode each strip once per band.  Without a budget a task
    holds no more than the run on one machine does by default (:func:`band_cost` of whole planes streamed).
    ``gaussian``'s smoothing crosses a task's box, so it writes level 0 only.
    """
    nz, height, width = layout.shapes[0]
    nlevels = len(layout.shapes)
    if budget is None:
        budget = band_cost(layout, height, width, nlevels - 1)
    if ds.halo(layout.algorithm):
        return None
    for below in range(nlevels - 1, 0, -1):
        step = layout.write_unit[1] * 2**below
        depth = task_depth(layout.write_unit[0], nz, below + 1)
        for pieces in range(1, -(-height // step) + 1):
            rows = min(math.ceil(math.ceil(height / pieces) / step) * step, height)  # about equal bands
            cost = band_cost(layout, rows, width, below)  # a task streams its box as a band is streamed
            if cost <= budget and -(-nz // depth) * -(-height // rows) >= 2 * parallel:
                return BandPlan(rows, width, below, cost)
    return None


def downsample_cost(source_shape: Shape3, itemsize: int, algorithm: ds.Algorithm) -> Callable[[Shape3], int]:
    """Bytes to build one block of a level from the stored level above (``source_shape``)."""
    margin = ds.halo(algorithm)
    # the block read, a padded copy at odd edges, and per algorithm: mean's 32- or 64-bit sums and one
    # temporary (an eighth of the voxels each), gaussian's three float64 copies
    per_voxel = 2 * itemsize + {"mean": 1 if itemsize <= 2 else 2, "gaussian": 24}.get(algorithm, 0)

    def cost(block: Shape3) -> int:
        voxels = 1
        for n, limit in zip(block, source_shape, strict=True):
            voxels *= min(2 * n + 2 * margin, limit)
        return voxels * per_voxel

    return cost


def choose_block(shape: Shape3, unit: Shape3, cost: Callable[[Shape3], int], budget: int) -> Shape3:
    """The largest block of one row of write units (``unit``: z, y, x voxels) in z whose ``cost`` (bytes) fits
    ``budget``.

    Whole planes are preferred (one unit row in z, all of y and x); then
    fewer unit rows in y; then fewer units in x.

    Raises
    ------
    UsageError
        If even a single chunk does not fit, saying how much memory is needed.
    """
    depth = min(unit[0], shape[0])
    rows = -(-shape[1] // unit[1])
    cols = -(-shape[2] // unit[2])
    candidates = [(depth, min(k * unit[1], shape[1]), shape[2]) for k in range(rows, 0, -1)]
    candidates += [(depth, min(unit[1], shape[1]), min(k * unit[2], shape[2])) for k in range(cols - 1, 0, -1)]
    for block in candidates:
        if cost(block) <= budget:
            return block
    raise _too_small(budget, unit[0], cost(candidates[-1]), None if len(set(unit)) == 1 else unit)


# What zarr holds, per reading worker, while it decodes a region of a compressed or sharded level above, in
# chunks' raw bytes (measured: --first_new_level 1 --nlevels 5 --max_gb 0.2 of a 512 x 1024 x 1280 uint16
# level 0 with 128^3 chunks and 2 workers peaked 86 MB above the plan with blosc-zstd, 222 MB with blosc-zstd
# in shards of 128 x 256 x 256: 10 and 26 chunks a worker; uncompressed chunks 4 MB below it).  Its reads of
# a shard take whole byte ranges of the shard file, and up to async.concurrency (10) chunks at once.
ZARR_DECODE_CHUNKS = {"sharded": 28, "compressed": 12}


def _chunk_buffers(layout: Layout) -> int:
    """Chunk buffers kept while levels are built from the stored level above: one per worker and one per
    writer thread of the streamed pass (they live as long as the workers), and what zarr holds while it
    decodes the compressed or sharded level above (:data:`ZARR_DECODE_CHUNKS`)."""
    raw = layout.chunk**3 * layout.out_itemsize
    if _sharded(layout):
        decoding = ZARR_DECODE_CHUNKS["sharded"] * raw
    else:
        decoding = ZARR_DECODE_CHUNKS["compressed"] * raw if layout.encoded else 0
    return layout.workers * (2 * layout.chunk_bytes + decoding)


def read_back_blocks(layout: Layout, first: int, budget: int) -> tuple[Shape3, ...]:
    """Blocks for building levels ``first …`` from the stored level above, ``workers`` at a time.

    Unsharded, the largest blocks of whole chunks that fit (:func:`choose_block`).
    Sharded, one shard each: a shard is built a chunk at a time
    (:func:`scrollzarr.readback.write_downsampled_block`), so its memory is one chunk's.

    Raises
    ------
    UsageError
        If even one chunk per worker does not fit ``budget``, saying how much is needed.
    """
    need = read_back_need(layout, first)
    if budget < need:
        raise _too_small(budget, layout.chunk, need, layout.unit)
    levels = range(first, len(layout.shapes))
    if _sharded(layout):
        return tuple(layout.write_unit for _ in levels)
    share = (budget - _chunk_buffers(layout)) // layout.workers
    itemsize = layout.out_itemsize
    return tuple(
        choose_block(
            layout.shapes[level],
            layout.write_unit,
            downsample_cost(layout.shapes[level - 1], itemsize, layout.algorithm),
            share,
        )
        for level in levels
    )


def split_for(shape: Shape3, block: Shape3, unit: Shape3, parallel: int) -> Shape3:
    """``block`` made smaller, in whole write units (``unit``), until a level of ``shape`` has at least
    ``parallel`` blocks (or blocks are one unit row in z and y and one unit in x): rows first, then columns.

    For tasks on a cluster: a level cut into fewer tasks than the cluster runs at once leaves workers idle
    (a 128 x 1024 x 1024 level 1 was one task, on one of two workers).  A smaller block always fits the
    memory a larger one did.
    """
    z, y, x = block

    def count(rows: int, cols: int) -> int:
        return -(-shape[0] // z) * -(-shape[1] // rows) * -(-shape[2] // cols)

    def even(length: int, pieces: int, step: int) -> int:
        """The size, in whole ``step``, of ``pieces`` about equal pieces of ``length``."""
        size = -(-length // pieces)
        return -(-size // step) * step

    for pieces in range(-(-shape[1] // y) + 1, -(-shape[1] // unit[1]) + 1):
        if count(y, x) >= parallel:
            break
        y = min(y, even(shape[1], pieces, unit[1]))
    for pieces in range(-(-shape[2] // x) + 1, -(-shape[2] // unit[2]) + 1):
        if count(y, x) >= parallel:
            break
        x = min(x, even(shape[2], pieces, unit[2]))
    return (z, y, x)


def recorded_blocks(planned: tuple[Shape3, ...], recorded: list[list[int]]) -> tuple[Shape3, ...]:
    """The blocks a stopped run of tasks recorded (:attr:`scrollzarr.progress.Progress.blocks`), if it recorded
    as many as are ``planned`` now; else ``planned``."""
    if len(recorded) != len(planned) or not all(len(block) == 3 for block in recorded):
        return planned
    return tuple((int(z), int(y), int(x)) for z, y, x in recorded)


def _sharded(layout: Layout) -> bool:
    """Whether a write unit holds more than one chunk (read-back levels are then built a chunk at a time)."""
    return layout.write_unit != (layout.chunk,) * 3


def read_back_cost(layout: Layout, first: int, blocks: tuple[Shape3, ...]) -> int:
    """Bytes that building levels ``first …`` in ``blocks`` needs, ``workers`` blocks (sharded: chunks) at a time."""
    built = [(layout.chunk,) * 3 if _sharded(layout) else block for block in blocks]
    costs = [
        downsample_cost(layout.shapes[level - 1], layout.out_itemsize, layout.algorithm)(piece)
        for level, piece in enumerate(built, start=first)
    ]
    return layout.workers * max(costs, default=0) + (_chunk_buffers(layout) if costs else 0)


def read_back_need(layout: Layout, first: int) -> int:
    """Bytes the read-back levels need at the least (one chunk built per worker)."""
    smallest = (layout.chunk,) * 3
    needs = [
        downsample_cost(layout.shapes[level - 1], layout.out_itemsize, layout.algorithm)(smallest)
        for level in range(first, len(layout.shapes))
    ]
    return layout.workers * max(needs, default=0) + (_chunk_buffers(layout) if needs else 0)


def _too_small(budget: int, chunk: int, need: int, shard: Shape3 | None = None) -> UsageError:
    units = f"chunks of {chunk}" if shard is None else "shards of " + " x ".join(map(str, shard))
    smaller = "--chunk_size" if shard is None else "--shard_shape"
    return UsageError(
        f"--max_gb {budget / GIB:.3g} is too small for {units}: at least {_gib_up(need)} GB "
        f"(GiB, 2^30 bytes) is needed; raise --max_gb or lower {smaller} (or --workers)"
    )


def _gib_up(nbytes: int) -> str:
    """``nbytes`` in GiB to three significant digits, rounded up (so that the figure given is enough)."""
    value = nbytes / GIB
    scale = 10 ** (2 - math.floor(math.log10(value)))
    return f"{math.ceil(value * scale) / scale:.3g}"
