"""Halve a 3-D block along every axis: the maths of the pyramid, on numpy arrays only.

Each output voxel comes from the 2 x 2 x 2 block of the level above that starts
at twice its index.  At an odd edge the block is cut short, and the output is
computed from the voxels that exist, so a level of size ``n`` has
``ceil(n / 2)`` voxels along that axis.

Algorithms
----------
mean
    Average of the block, rounded to nearest with ties to even
    (:func:`numpy.round`); floating-point data is not rounded.
nearest
    The block's first voxel (``block[::2, ::2, ::2]``).
max
    The block's maximum, for label and indicator volumes.
gaussian
    Gaussian smoothing with sigma :data:`GAUSSIAN_SIGMA` voxels of the level
    above (the value of :func:`skimage.transform.pyramid_reduce`), truncated
    at :data:`GAUSSIAN_TRUNCATE` sigma, edges extended with the nearest voxel,
    then every second voxel; rounded like ``mean`` and clipped to the dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import skimage.filters

from scrollzarr.blocks import Shape3

Algorithm = Literal["mean", "gaussian", "nearest", "max"]
ALGORITHMS: tuple[Algorithm, ...] = ("mean", "gaussian", "nearest", "max")

GAUSSIAN_SIGMA = 2.0 / 3.0
GAUSSIAN_TRUNCATE = 4.0


def halo(algorithm: Algorithm) -> int:
    """Voxels of context beyond a block's edge that ``algorithm`` needs (0 except for gaussian)."""
    if algorithm == "gaussian":
        return int(GAUSSIAN_TRUNCATE * GAUSSIAN_SIGMA + 0.5)
    return 0


def halved_shape(shape: Shape3) -> Shape3:
    """Shape of the next level: ``ceil(n / 2)`` along every axis."""
    z, y, x = shape
    return math.ceil(z / 2), math.ceil(y / 2), math.ceil(x / 2)


def level_shapes(shape: Shape3, nlevels: int) -> tuple[Shape3, ...]:
    """Shapes of ``nlevels`` levels, each ``ceil(n / 2)`` of the previous along every axis."""
    shapes = [shape]
    for _ in range(nlevels - 1):
        shapes.append(halved_shape(shapes[-1]))
    return tuple(shapes)


def parameters(algorithm: Algorithm) -> dict[str, object]:
    """The algorithm's parameters, for the store's metadata."""
    if algorithm == "gaussian":
        return {"sigma": GAUSSIAN_SIGMA, "truncate": GAUSSIAN_TRUNCATE}
    return {}


def _pad_even(block: np.ndarray) -> np.ndarray:
    """Repeat the last plane of each odd axis, so every 2 x 2 x 2 block is whole."""
    pad = [(0, n % 2) for n in block.shape]
    return np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block


def _octants(block: np.ndarray) -> list[np.ndarray]:
    return [block[i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]


def _accumulator(dtype: np.dtype) -> np.dtype:
    """An integer type that holds the sum of eight values of ``dtype``."""
    if dtype.itemsize <= 2:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _round_half_even_div8(total: np.ndarray) -> np.ndarray:
    """``numpy.round(total / 8)`` for integer ``total``, exactly, in place.

    With ``total = 8q + r``: ``(total + 3 + (q & 1)) >> 3`` is ``q`` for ``r < 4``,
    ``q + 1`` for ``r > 4`` and, for ``r == 4``, whichever of the two is even.
    """
    parity = total >> 3
    parity &= 1
    total += parity
    total += 3
    total >>= 3
    return total


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round (for integer dtypes) and clip ``values`` into ``dtype``."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """Mean of each 2 x 2 x 2 block, over the voxels that exist; see the module docstring."""
    octants = _octants(_pad_even(block))
    if np.issubdtype(block.dtype, np.integer):
        total = octants[0].astype(_accumulator(block.dtype))
        for octant in octants[1:]:
            total += octant
        return _round_half_even_div8(total).astype(block.dtype)
    total = octants[0].astype(np.float64)
    for octant in octants[1:]:
        total += octant
    return (total / 8).astype(block.dtype)


def downsample_max(block: np.ndarray) -> np.ndarray:
    """Maximum of each 2 x 2 x 2 block."""
    octants = _octants(_pad_even(block))
    result = octants[0].copy()
    for octant in octants[1:]:
        np.maximum(result, octant, out=result)
    return result


def downsample_nearest(block: np.ndarray) -> np.ndarray:
    """First voxel of each 2 x 2 x 2 block."""
    return block[::2, ::2, ::2].copy()


def downsample_gaussian(block: np.ndarray, core: tuple[slice, slice, slice]) -> np.ndarray:
    """Gaussian smoothing then every second voxel of ``block[core]``.

    Parameters
    ----------
    block : numpy.ndarray, shape (Z, Y, X)
        The region to halve plus up to :func:`halo` voxels of context on each
        side; where a side has less context it must be the volume's own edge.
    core : tuple of slice
        The region to halve, inside ``block``.

    Returns
    -------
    numpy.ndarray
        ``ceil(n / 2)`` voxels along each axis of the core, ``block.dtype``.
    """
    smoothed = skimage.filters.gaussian(
        block, sigma=GAUSSIAN_SIGMA, mode="nearest", truncate=GAUSSIAN_TRUNCATE, preserve_range=True
    )
    return _cast(smoothed[core][::2, ::2, ::2], block.dtype)


def downsample(block: np.ndarray, algorithm: Algorithm) -> np.ndarray:
    """Halve ``block`` along every axis with ``algorithm`` (no context needed beyond it).

    Parameters
    ----------
    block : numpy.ndarray, shape (Z, Y, X)
    algorithm : {"mean", "gaussian", "nearest", "max"}
        For ``gaussian`` the block's edges are treated as the volume's edges.

    Returns
    -------
    numpy.ndarray, shape (ceil(Z/2), ceil(Y/2), ceil(X/2)), same dtype
    """
    if algorithm == "mean":
        return downsample_mean(block)
    if algorithm == "max":
        return downsample_max(block)
    if algorithm == "nearest":
        return downsample_nearest(block)
    if algorithm == "gaussian":
        return downsample_gaussian(block, (slice(None),) * 3)
    raise ValueError(f"unknown downsampling algorithm {algorithm!r}")


def to_uint8(block: np.ndarray) -> np.ndarray:
    """Convert uint16 voxels to uint8 by integer division by 256 (``--obytes 1``)."""
    return (block >> 8).astype(np.uint8)
