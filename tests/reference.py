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


def trilinear(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``volume`` at ``points`` (3, M) in (z, y, x) voxels; voxels outside count as 0.

    Written corner by corner in float64, with each corner's weight and a bounds test.
    """
    volume = volume.astype(np.float64)
    base = np.floor(points).astype(np.int64)
    frac = points - base
    result = np.zeros(points.shape[1])
    for corner in np.ndindex(2, 2, 2):
        index = base + np.array(corner)[:, None]
        weight = np.prod([f if c else 1 - f for f, c in zip(frac, corner, strict=True)], axis=0)
        inside = np.all((index >= 0) & (index < np.array(volume.shape)[:, None]), axis=0)
        values = np.zeros(points.shape[1])
        values[inside] = volume[tuple(index[:, inside])]
        result += weight * values
    return result


def layers_reference(
    volume: np.ndarray,
    surface: np.ndarray,
    count: int,
    spacing: float,
    scale: float = 1.0,
    origin=(0, 0, 0),
    direction: str = "both",
) -> np.ndarray:
    """Layer values (count, H, W), float64 before rounding, of a .ppm ``surface`` (H, W, 6: x, y, z, nx, ny, nz).

    ``volume`` covers scroll voxels from ``origin`` (z, y, x) in steps of ``scale``; unmapped pixels are 0.
    Layer k lies (k - (count - 1) / 2) spacings along the normal (``both``), k spacings (``positive``) or
    k - (count - 1) spacings (``negative``).
    """
    mapped = np.any(surface[..., 3:] != 0, axis=-1)
    position = surface[mapped][:, [2, 1, 0]].T
    normal = surface[mapped][:, [5, 4, 3]].T
    out = np.zeros((count, *surface.shape[:2]))
    for k in range(count):
        steps = {"both": k - (count - 1) / 2, "positive": k, "negative": k - (count - 1)}[direction]
        point = position + steps * spacing * normal
        out[k][mapped] = trilinear(volume, (point - np.array(origin, dtype=float)[:, None]) / scale)
    return out
