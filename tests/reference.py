"""Independent numpy references for the pyramid, written without the package's code.

Each level is computed from the whole previous level at once, the slow and
obvious way, so that the pipeline's blockwise results can be checked against it.
"""

from __future__ import annotations

import itertools

import numpy as np
import skimage.filters


def _offsets():
    return itertools.product((0, 1), repeat=3)


def mean_level(a: np.ndarray) -> np.ndarray:
    """Average over the voxels that exist of each 2x2x2 block, numpy.round (ties to even)."""
    shape = tuple((n + 1) // 2 for n in a.shape)
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for dz, dy, dx in _offsets():
        part = a[dz::2, dy::2, dx::2]
        where = tuple(slice(0, n) for n in part.shape)
        total[where] += part
        count[where] += 1
    return np.round(total / count).astype(a.dtype)


def max_level(a: np.ndarray) -> np.ndarray:
    shape = tuple((n + 1) // 2 for n in a.shape)
    result = np.zeros(shape, a.dtype)
    for dz, dy, dx in _offsets():
        part = a[dz::2, dy::2, dx::2]
        where = tuple(slice(0, n) for n in part.shape)
        result[where] = np.maximum(result[where], part)
    return result


def nearest_level(a: np.ndarray) -> np.ndarray:
    return a[::2, ::2, ::2]


GAUSSIAN_SIGMA = 2.0 / 3.0  # what the README documents


def gaussian_level(a: np.ndarray) -> np.ndarray:
    smoothed = skimage.filters.gaussian(a.astype(np.float64), sigma=GAUSSIAN_SIGMA, mode="nearest", truncate=4.0)
    info = np.iinfo(a.dtype)
    return np.clip(np.round(smoothed[::2, ::2, ::2]), info.min, info.max).astype(a.dtype)


LEVEL = {"mean": mean_level, "max": max_level, "nearest": nearest_level, "gaussian": gaussian_level}


def pyramid(volume: np.ndarray, nlevels: int, algorithm: str = "mean") -> list[np.ndarray]:
    """Levels 0 … nlevels-1, each computed from the previous, whole."""
    levels = [volume]
    for _ in range(nlevels - 1):
        levels.append(LEVEL[algorithm](levels[-1]))
    return levels
