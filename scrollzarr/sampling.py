"""Layer sampling along surface normals: pure functions on numpy arrays.

Layer ``k`` of ``N`` at a surface pixel with position ``p`` and normal ``n``
is the volume at ``p + (k - (N - 1) / 2) · s · n`` (spacing ``s``), sampled
by trilinear interpolation of the voxels, with voxels outside the volume
counting as 0, and rounded to nearest.  Coordinates here are array indices
(z, y, x) of the volume being sampled, as float64.
"""

from __future__ import annotations

import numpy as np

STACK_FILTERS = ("max", "mean", "median", "min")

# Coordinates are clipped to [-1, size] on each axis: every voxel a sample
# that far out (or further) would touch lies outside the volume, so it is 0
# either way, and a box of finite size holds every sample.
OUTSIDE = -1.0
BATCH = 1 << 17


# Where the layers lie around the surface (``--direction``), as volume-cartographer's programs let them lie.
DIRECTIONS = ("both", "positive", "negative")


def layer_offsets(count: int, spacing: float, direction: str = "both") -> np.ndarray:
    """Distances along the normal of the ``count`` layers, in voxels.

    ``both``: ``(k - (count - 1) / 2) · spacing``, centred on the surface;
    ``positive``: ``k · spacing`` (layer 0 on the surface); ``negative``:
    ``(k - (count - 1)) · spacing`` (the last layer on the surface).

    Returns
    -------
    ndarray, shape (count,), float64
    """
    layer = np.arange(count, dtype=np.float64)
    first = {"both": (count - 1) / 2, "positive": 0, "negative": count - 1}[direction]
    return (layer - first) * spacing


def stacked_layers(count: int, stacked: int, direction: str = "both") -> range:
    """The ``stacked`` layers of ``count`` nearest the surface (see :func:`layer_offsets`).

    ``both``: those closest to the middle one (ties go to the lower layers; with
    odd ``count`` and odd ``stacked``, ``(count - 1) / 2 ± (stacked - 1) / 2``);
    ``positive``: the first ``stacked``; ``negative``: the last ``stacked``.
    """
    first = {"both": (count - stacked) // 2, "positive": 0, "negative": count - stacked}[direction]
    return range(first, first + stacked)


def stack(layers: np.ndarray, chosen: range, how: str) -> np.ndarray:
    """Combine the ``chosen`` layers pixel by pixel.

    Parameters
    ----------
    layers : ndarray, shape (N, ...), integer
        Rounded layer values.
    how : {"max", "mean", "median", "min"}
        ``mean`` and ``median`` are rounded to nearest (half to even).

    Returns
    -------
    ndarray, shape layers.shape[1:], layers.dtype
    """
    part = layers[chosen.start : chosen.stop]
    if how == "max":
        return part.max(axis=0)
    if how == "min":
        return part.min(axis=0)
    if how == "mean":
        combined = part.mean(axis=0, dtype=np.float64)
    elif how == "median":
        combined = np.median(part, axis=0)
    else:
        raise ValueError(f"unknown stack filter {how!r}")
    return np.rint(combined).astype(layers.dtype)


def mapped_pixels(
    positions: np.ndarray, normals: np.ndarray, flip: bool, translation: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """The pixels of a block of the surface that are sampled, and where, in array voxels.

    Parameters
    ----------
    positions, normals : ndarray, shape (rows, columns, 3), float64
        (z, y, x) positions and normals of the block's pixels, in full-resolution voxels.
    flip : bool
        Turn the normals round.
    translation, scale : ndarray, shape (3,), float64
        The volume level's (:class:`scrollzarr.volume.Volume`): voxel = (position - translation) / scale.

    Returns
    -------
    mapped : ndarray, shape (rows, columns), bool
        Pixels with finite coordinates and a non-zero normal.
    nonfinite : int
        Pixels with a non-finite coordinate.
    p, n : ndarray, shape (3, M), float64
        The mapped pixels' positions and normals in array voxels, in C order of the pixels.
    """
    if flip:
        normals = -normals
    finite = np.isfinite(positions).all(axis=-1) & np.isfinite(normals).all(axis=-1)
    mapped = finite & (normals != 0).any(axis=-1)
    p = (positions[mapped].T - translation[:, None]) / scale[:, None]
    return (
        mapped,
        int((~finite).sum()),
        np.ascontiguousarray(p),
        np.ascontiguousarray(normals[mapped].T / scale[:, None]),
    )


def sample_bounds(
    positions: np.ndarray, normals: np.ndarray, offsets: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The box of voxels that :func:`sample_layers` reads for these samples.

    Parameters
    ----------
    positions, normals : ndarray, shape (3, M), float64
        Finite (z, y, x) positions and normals of M > 0 pixels, in array voxels.
    offsets : ndarray, shape (K,), float64
        Distances along the normal, increasing.
    shape : (int, int, int)
        The volume's shape.

    Returns
    -------
    lo, hi : ndarray, shape (3,), int64
        Half-open voxel box ``[lo, hi)``; it may reach outside the volume by a
        few voxels (those count as 0).
    """
    lo = np.empty(3, np.int64)
    hi = np.empty(3, np.int64)
    for axis in range(3):
        ends = [np.clip(positions[axis] + t * normals[axis], OUTSIDE, shape[axis]) for t in (offsets[0], offsets[-1])]
        # One voxel of margin either side absorbs the last bit of rounding in p + t·n.
        lo[axis] = int(np.floor(min(end.min() for end in ends))) - 1
        hi[axis] = int(np.floor(max(end.max() for end in ends))) + 3
    return lo, hi


def sample_layers(
    box: np.ndarray,
    origin: np.ndarray,
    positions: np.ndarray,
    normals: np.ndarray,
    offsets: np.ndarray,
    shape: tuple[int, int, int],
    out: np.ndarray,
) -> None:
    """Trilinear samples of the volume at ``positions + t · normals`` for each offset ``t``.

    Parameters
    ----------
    box : ndarray, shape (bz, by, bx), C-contiguous
        The volume's voxels ``[origin, origin + box.shape)``, 0 outside the
        volume; it must contain :func:`sample_bounds` of the same samples.
    origin : ndarray, shape (3,), int
        Volume index of ``box[0, 0, 0]``.
    positions, normals : ndarray, shape (3, M), float64
        Finite (z, y, x) positions and normals in array voxels.
    offsets : ndarray, shape (K,), float64
    shape : (int, int, int)
        The volume's shape.
    out : ndarray, shape (K, M), unsigned integer
        Receives the samples rounded to nearest (half to even).  Trilinear
        interpolation is a convex combination of voxels, so the values stay
        within the dtype's range, but for float32 rounding: a sample of uint32
        voxels near 2^32 is cut to :func:`largest_sample`.
    """
    largest = largest_sample(out.dtype)
    flat = box.reshape(-1)
    strides = (box.shape[1] * box.shape[2], box.shape[2], 1)
    count = positions.shape[1]
    # Layers go through in groups of about BATCH samples: numpy releases the GIL
    # during each operation, and operations that long keep other threads running.
    group = max(1, BATCH // max(count, 1))
    corners = [dz + dy + dx for dz in (0, strides[0]) for dy in (0, strides[1]) for dx in (0, 1)]
    for first in range(0, len(offsets), group):
        t = offsets[first : first + group, None]
        index = np.zeros((len(t), count), np.intp)
        fractions = []
        for axis in range(3):
            coordinate = normals[axis] * t
            coordinate += positions[axis]
            np.clip(coordinate, OUTSIDE, shape[axis], out=coordinate)
            floor = np.floor(coordinate)
            coordinate -= floor
            fractions.append(coordinate.astype(np.float32))
            floor -= origin[axis]
            index += floor.astype(np.intp) * strides[axis]
        fz, fy, fx = fractions
        v = [flat[index + corner].astype(np.float32) for corner in corners]
        c00 = _lerp(v[0], v[1], fx)
        c01 = _lerp(v[2], v[3], fx)
        c10 = _lerp(v[4], v[5], fx)
        c11 = _lerp(v[6], v[7], fx)
        result = _lerp(_lerp(c00, c01, fy), _lerp(c10, c11, fy), fz)
        np.rint(result, out=result)
        np.minimum(result, largest, out=result)
        out[first : first + group] = result


def largest_sample(dtype: np.dtype) -> np.float32:
    """The largest float32 that ``dtype`` (unsigned) holds: its maximum, or for 32 and 64 bits, whose maximum
    float32 rounds up past it (2^32 - 1 to 2^32, which would wrap to 0), the float32 below."""
    top = np.float32(np.iinfo(dtype).max)
    return top if int(top) <= np.iinfo(dtype).max else np.nextafter(top, np.float32(0))


def _lerp(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``a + (b - a) · f``, in place in ``b``."""
    b -= a
    b *= f
    b += a
    return b
