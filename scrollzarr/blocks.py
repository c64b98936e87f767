"""Chunk-aligned blocks: the independent units of work of a conversion.

A block is a box of whole chunks of one level, given as (start, stop) per axis
in z, y, x order.  Two blocks of one level never share a chunk, so any
executor may write them in any order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

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
