"""Chunk-aligned blocks: the independent units of work of a conversion.

A block is a box of whole chunks of one level, given as (start, stop) per axis
in z, y, x order.  Two blocks of one level never share a chunk, so any
executor may write them in any order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
Shape3 = tuple[int, int, int]


def shape3(shape: Sequence[int]) -> Shape3:
    """``shape`` (zarr's and numpy's ``tuple[int, ...]``) as a z, y, x shape; ValueError unless it has 3 axes."""
    z, y, x = shape
    return int(z), int(y), int(x)


def iter_boxes(shape: Shape3, step: Shape3) -> Iterator[Box]:
    """Boxes of size ``step`` (smaller at the far edges) tiling ``shape``, z slowest."""
    (nz, ny, nx), (sz, sy, sx) = shape, step
    for z, y, x in itertools.product(range(0, nz, sz), range(0, ny, sy), range(0, nx, sx)):
        yield (z, min(z + sz, nz)), (y, min(y + sy, ny)), (x, min(x + sx, nx))


def box_size(box: Box) -> int:
    """Number of voxels in ``box``."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return (z1 - z0) * (y1 - y0) * (x1 - x0)
