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


def tifxyz_reference(
    points: np.ndarray, valid: np.ndarray, grid_scale: tuple[float, float], scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tifxyz grid as output pixels, pixel by pixel, the slow and obvious way (the README's definition).

    ``points`` (H, W, 3: x, y, z) and ``valid`` (H, W); ``grid_scale`` meta.json's (sx, sy); ``scale`` output
    pixels per voxel.  Returns positions (h, w, 3: x, y, z), unit normals d/dc x d/dr (h, w, 3) and the pixels
    that are mapped (h, w).
    """
    height, width = valid.shape
    sx, sy = grid_scale
    out_h = int(np.floor((height - 1) * scale / sy + 1e-9)) + 1
    out_w = int(np.floor((width - 1) * scale / sx + 1e-9)) + 1
    positions = np.zeros((out_h, out_w, 3))
    ok = np.zeros((out_h, out_w), bool)
    for r in range(out_h):
        for c in range(out_w):
            gr, gc = r * sy / scale, c * sx / scale
            if not (0 <= gr <= height - 1 and 0 <= gc <= width - 1):
                continue
            i, j = min(int(gr), height - 2), min(int(gc), width - 2)
            fr, fc = gr - i, gc - j
            total = np.zeros(3)
            good = True
            for di, dj, weight in (
                (0, 0, (1 - fr) * (1 - fc)),
                (0, 1, (1 - fr) * fc),
                (1, 0, fr * (1 - fc)),
                (1, 1, fr * fc),
            ):
                if weight > 0:
                    good &= bool(valid[i + di, j + dj])
                    total += weight * points[i + di, j + dj]
            positions[r, c], ok[r, c] = total, good
    normals = np.zeros_like(positions)
    mapped = np.zeros_like(ok)
    for r in range(1, out_h - 1):
        for c in range(1, out_w - 1):
            if not (ok[r, c] and ok[r, c - 1] and ok[r, c + 1] and ok[r - 1, c] and ok[r + 1, c]):
                continue
            along_c = (positions[r, c + 1] - positions[r, c - 1]) / 2
            along_r = (positions[r + 1, c] - positions[r - 1, c]) / 2
            n = np.cross(along_c, along_r)
            if np.linalg.norm(n) > 0:
                normals[r, c], mapped[r, c] = n / np.linalg.norm(n), True
    return positions, normals, mapped
