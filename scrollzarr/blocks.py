"""Chunk-aligned blocks: the independent units of work of a conversion.

A block is a box of whole chunks of one level, given as (start, stop) per axis
in z, y, x order.  Two blocks of one level never share a chunk, so any
executor may write them in any order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from scrollzarr.errors import UsageError

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
Shape3 = tuple[int, int, int]


def iter_boxes(shape: Shape3, step: Shape3) -> Iterator[Box]:
    """Boxes of size ``step`` (smaller at the far edges) tiling ``shape``, z slowest."""
    starts = [range(0, n, s) for n, s in zip(shape, step, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple((c, min(c + s, n)) for c, s, n in zip(corner, step, shape, strict=True))  # type: ignore[misc]


def box_size(box: Box) -> int:
    """Number of voxels in ``box``."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return (z1 - z0) * (y1 - y0) * (x1 - x0)


def choose_block(shape: Shape3, chunk: int, cost: Callable[[Shape3], int], budget: int) -> Shape3:
    """The largest block of one chunk row in z whose ``cost`` (bytes) fits ``budget``.

    Whole planes are preferred (one chunk row in z, all of y and x); then
    fewer chunk rows in y; then fewer chunks in x.

    Raises
    ------
    UsageError
        If even a single chunk does not fit, saying how much memory is needed.
    """
    depth = min(chunk, shape[0])
    rows = -(-shape[1] // chunk)
    cols = -(-shape[2] // chunk)
    candidates = [(depth, min(k * chunk, shape[1]), shape[2]) for k in range(rows, 0, -1)]
    candidates += [(depth, min(chunk, shape[1]), min(k * chunk, shape[2])) for k in range(cols - 1, 0, -1)]
    for block in candidates:
        if cost(block) <= budget:
            return block
    need = cost(candidates[-1])
    raise UsageError(
        f"--max_gb {budget / 2**30:.3g} is too small for chunks of {chunk}: at least "
        f"{need / 2**30:.3g} GB (GiB, 2^30 bytes) is needed; raise --max_gb or lower --chunk_size"
    )
