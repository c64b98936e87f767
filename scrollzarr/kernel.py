"""The sampling kernel compiled (numba): :func:`scrollzarr.sampling.sample_layers`, byte for byte, several times
faster, with the GIL released so that the threads sampling tiles run at once, reading the voxels straight from
the chunk cache's chunks.

The numpy kernel samples a box of voxels copied out of the cached chunks.  On
the benchmark's segment those boxes are far larger than the voxels sampled
(the sheet runs diagonally through them): copying them cost 28 ns a sample
and the kernel 17 ns in them, against 10 ns for this kernel in the chunks
themselves (one thread).

Imported only for renders large enough to repay loading it: importing numba
and loading the cached machine code of the kernel costs about 0.55 s (0.23 s
and 0.32 s, measured), against 39 M samples/s of the numpy kernel.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from scrollzarr.chunkcache import ChunkTable
from scrollzarr.sampling import OUTSIDE, largest_sample


def sample_chunks(
    chunks: ChunkTable,
    positions: np.ndarray,
    normals: np.ndarray,
    offsets: np.ndarray,
    shape: tuple[int, int, int],
    out: np.ndarray,
    pixels: np.ndarray | None = None,
) -> None:
    """:func:`scrollzarr.sampling.sample_layers`, compiled, reading the voxels from ``chunks`` instead of a box.

    Parameters
    ----------
    chunks : ChunkTable
        The chunks holding every voxel the samples touch (:meth:`ChunkCache.table` of their
        :func:`~scrollzarr.sampling.sample_bounds`); chunks not in it count as 0.
    positions, normals, offsets, shape
        As :func:`scrollzarr.sampling.sample_layers`.
    out : ndarray, shape (K, M), or (K, rows, columns) with ``pixels``
        Where the samples go, of the chunks' dtype: with ``pixels``, sample ``(k, m)`` goes to
        ``out[k, pixels[0, m], pixels[1, m]]`` (the layers of a band of the images, written in place).
    pixels : ndarray, shape (2, M), int64, optional
    """
    for array in chunks.arrays:  # the kernel reads them through their addresses: their layout must be right
        if array.dtype != out.dtype or array.shape != chunks.shape or not array.flags.c_contiguous:
            raise ValueError(f"chunk of {array.dtype} {array.shape}, not {out.dtype} {chunks.shape} C-contiguous")
    slots = chunks.slots
    if (
        slots.dtype != np.int32
        or slots.ndim != 3
        or (slots.size and not -1 <= slots.min() <= slots.max() < len(chunks.arrays))
    ):
        raise ValueError(
            f"chunk slots of {slots.dtype} {slots.shape} that do not number the {len(chunks.arrays)} chunks"
        )
    if pixels is None:
        out = out[:, None, :]
        pixels = np.stack([np.zeros(out.shape[2], np.int64), np.arange(out.shape[2])])
    count = positions.shape[1]
    if (
        out.ndim != 3
        or out.shape[0] != len(offsets)
        or pixels.shape != (2, count)
        or (count and not (pixels.min() >= 0 and pixels[0].max() < out.shape[1] and pixels[1].max() < out.shape[2]))
    ):  # the kernel writes where they say, unchecked
        raise ValueError(f"{count} pixels of {len(offsets)} layers do not fit in an output of shape {out.shape}")
    addresses = np.array([array.ctypes.data for array in chunks.arrays] or [0], np.intp)
    (z0, y0, x0), (cz, cy, cx) = (int(i) for i in chunks.origin), chunks.shape
    _sample(
        addresses, slots, z0, y0, x0, cz, cy, cx, _shift(cz), _shift(cy), _shift(cx),
        np.ascontiguousarray(positions, np.float64), np.ascontiguousarray(normals, np.float64),
        np.ascontiguousarray(offsets, np.float64), shape[0], shape[1], shape[2], out, pixels,
        largest_sample(out.dtype),
    )  # fmt: skip
    # chunks.arrays is alive until here, so every address stayed valid while the kernel read it


def _shift(size: int) -> int:
    """log2 of ``size`` if it is a power of two (a shift and a mask then split an index: 17 ns a sample against
    24 with integer division, measured), else -1."""
    return size.bit_length() - 1 if size & (size - 1) == 0 else -1


def _as_pointer(typingctx: Any, address: Any, like: Any) -> Any:  # pragma: no cover (compiled)
    """The integer ``address`` as a pointer to elements of the array ``like``'s dtype (``_pointer(address,
    like)`` in compiled code)."""
    pointer = types.CPointer(like.dtype)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


_pointer: Any = intrinsic(_as_pointer)


@numba.njit(nogil=True, cache=True, inline="always")
def _split(index: int, size: int, shift: int) -> tuple[int, int]:  # pragma: no cover (compiled)
    """Chunk of voxel ``index`` on one axis (floored: -1 is in chunk -1) and its place in that chunk."""
    if shift >= 0:
        return index >> shift, index & (size - 1)
    chunk = index // size
    return chunk, index - chunk * size


@numba.njit(nogil=True, cache=True)
def _sample(
    addresses: np.ndarray,
    slots: np.ndarray,
    z0: int,
    y0: int,
    x0: int,
    cz: int,
    cy: int,
    cx: int,
    sz: int,
    sy: int,
    sx: int,
    positions: np.ndarray,
    normals: np.ndarray,
    offsets: np.ndarray,
    depth: int,
    height: int,
    width: int,
    out: np.ndarray,
    pixels: np.ndarray,
    largest: np.float32,
) -> None:  # pragma: no cover (compiled; run through sample_chunks)
    """The kernel of :func:`sample_chunks`: ``addresses`` of the chunks' voxels, ``slots`` (nz, ny, nx) the
    number of each chunk from ``(z0, y0, x0)`` on (-1: all zero), ``(cz, cy, cx)`` the chunk shape and
    ``(sz, sy, sx)`` its log2 (-1 where not a power of two); the samples go to ``out`` at ``pixels``, cut to
    ``largest`` (:func:`~scrollzarr.sampling.largest_sample`).

    Pixel by pixel (its layers lie side by side in the volume), in three passes over its K samples:

    1. the cells and fractions of every sample, in a loop LLVM vectorises;
    2. the cells' 8 voxels copied out of the chunks, a run of consecutive samples in one chunk at a time
       (the samples of a pixel lie on a line: it crosses few chunk faces); a cell across chunk faces
       reads each voxel from its own chunk;
    3. the interpolation, vectorised again.

    Measured on 108 tiles of the benchmark's segment (59 % of its pixels cross a chunk face), one thread:
    9.5-10.3 ns a sample, against 15.5 for one loop doing all three per sample, which LLVM did not
    vectorise.  The arithmetic is exactly the numpy kernel's:
    coordinates in float64, fractions and the interpolation ``a + (b - a) · f`` in float32, rounded half to
    even (tests/test_kernel.py checks the two agree bit for bit).
    """
    count = offsets.shape[0]
    if not addresses[0] or not slots.size:  # no chunk holds data: every sample is 0
        for m in range(positions.shape[1]):
            for k in range(count):
                out[k, pixels[0, m], pixels[1, m]] = 0
        return
    row, plane = cx, cy * cx
    tz, ty, tx = slots.shape
    cells = np.empty((4, count), np.int64)  # z, y, x of each sample's cell, and its voxel's place in C order
    fractions = np.empty((3, count), np.float32)
    voxels = np.empty((count, 8), out.dtype)  # the cell's voxels, v<z><y><x> in binary order
    values = np.empty(count, out.dtype)
    for m in range(positions.shape[1]):
        pz, py, px = positions[0, m], positions[1, m], positions[2, m]
        nz, ny, nx = normals[0, m], normals[1, m], normals[2, m]
        for k in range(count):
            t = offsets[k]
            iz, fractions[0, k] = _cell(pz, nz, t, depth)
            iy, fractions[1, k] = _cell(py, ny, t, height)
            ix, fractions[2, k] = _cell(px, nx, t, width)
            cells[0, k], cells[1, k], cells[2, k], cells[3, k] = iz, iy, ix, (iz * cy + iy) * cx + ix
        k = 0
        while k < count:
            iz, iy, ix = cells[0, k], cells[1, k], cells[2, k]
            qz, dz = _split(iz, cz, sz)
            qy, dy = _split(iy, cy, sy)
            qx, dx = _split(ix, cx, sx)
            if not (dz < cz - 1 and dy < cy - 1 and dx < cx - 1):  # across chunk faces
                _straddle(addresses, slots, z0, y0, x0, cz, cy, cx, sz, sy, sx, iz, iy, ix, voxels[k], out)
                k += 1
                continue
            bz, by, bx = qz * cz, qy * cy, qx * cx
            end = k + 1
            while (
                end < count
                and 0 <= cells[0, end] - bz < cz - 1
                and 0 <= cells[1, end] - by < cy - 1
                and 0 <= cells[2, end] - bx < cx - 1
            ):
                end += 1
            qz, qy, qx = qz - z0, qy - y0, qx - x0
            slot = slots[qz, qy, qx] if 0 <= qz < tz and 0 <= qy < ty and 0 <= qx < tx else -1
            if slot < 0:
                voxels[k:end] = 0
            else:
                chunk = _pointer(addresses[slot], out)
                first = (bz * cy + by) * cx + bx
                for j in range(k, end):
                    index = cells[3, j] - first
                    voxels[j, 0] = chunk[index]
                    voxels[j, 1] = chunk[index + 1]
                    voxels[j, 2] = chunk[index + row]
                    voxels[j, 3] = chunk[index + row + 1]
                    voxels[j, 4] = chunk[index + plane]
                    voxels[j, 5] = chunk[index + plane + 1]
                    voxels[j, 6] = chunk[index + plane + row]
                    voxels[j, 7] = chunk[index + plane + row + 1]
            k = end
        for k in range(count):
            value = _interpolate(
                np.float32(voxels[k, 0]), np.float32(voxels[k, 1]),
                np.float32(voxels[k, 2]), np.float32(voxels[k, 3]),
                np.float32(voxels[k, 4]), np.float32(voxels[k, 5]),
                np.float32(voxels[k, 6]), np.float32(voxels[k, 7]),
                fractions[0, k], fractions[1, k], fractions[2, k],
            )  # fmt: skip
            values[k] = min(value, largest)
        r, c = pixels[0, m], pixels[1, m]
        for k in range(count):
            out[k, r, c] = values[k]


@numba.njit(nogil=True, cache=True, inline="always")
def _straddle(
    addresses: np.ndarray,
    slots: np.ndarray,
    z0: int,
    y0: int,
    x0: int,
    cz: int,
    cy: int,
    cx: int,
    sz: int,
    sy: int,
    sx: int,
    iz: int,
    iy: int,
    ix: int,
    voxels: np.ndarray,
    like: np.ndarray,
) -> None:  # pragma: no cover (compiled)
    """The 8 voxels of the cell at ``(iz, iy, ix)``, which lies across chunk faces, into ``voxels``, each from
    its own chunk (0 from none); without branches on the chunks (8 % faster overall than branching)."""
    tz, ty, tx = slots.shape
    qz0, rz0 = _split(iz, cz, sz)
    qy0, ry0 = _split(iy, cy, sy)
    qx0, rx0 = _split(ix, cx, sx)
    qz1, rz1 = _split(iz + 1, cz, sz)
    qy1, ry1 = _split(iy + 1, cy, sy)
    qx1, rx1 = _split(ix + 1, cx, sx)
    for corner in range(8):
        a, b, c = corner >> 2, (corner >> 1) & 1, corner & 1
        qz, qy, qx = (qz1 if a else qz0) - z0, (qy1 if b else qy0) - y0, (qx1 if c else qx0) - x0
        inside = 0 <= qz < tz and 0 <= qy < ty and 0 <= qx < tx
        slot = slots[qz if inside else 0, qy if inside else 0, qx if inside else 0]
        slot = slot if inside else -1
        index = ((rz1 if a else rz0) * cy + (ry1 if b else ry0)) * cx + (rx1 if c else rx0)
        value = _pointer(addresses[max(slot, 0)], like)[index]  # chunk 0 stands in for a missing one
        voxels[corner] = value if slot >= 0 else 0


@numba.njit(nogil=True, cache=True, inline="always")
def _interpolate(
    v000: np.float32,
    v001: np.float32,
    v010: np.float32,
    v011: np.float32,
    v100: np.float32,
    v101: np.float32,
    v110: np.float32,
    v111: np.float32,
    fz: np.float32,
    fy: np.float32,
    fx: np.float32,
) -> np.float32:  # pragma: no cover (compiled)
    """Trilinear interpolation of a cell's voxels ``v<z><y><x>``, rounded half to even."""
    c00 = (v001 - v000) * fx + v000
    c01 = (v011 - v010) * fx + v010
    c10 = (v101 - v100) * fx + v100
    c11 = (v111 - v110) * fx + v110
    near = (c01 - c00) * fy + c00
    far = (c11 - c10) * fy + c10
    return np.rint((far - near) * fz + near)


@numba.njit(nogil=True, cache=True, inline="always")
def _cell(position: float, normal: float, t: float, size: int) -> tuple[int, np.float32]:  # pragma: no cover
    """The voxel below ``position + t · normal`` on one axis (clipped to ``[OUTSIDE, size]``) and the fraction
    of the way to the next one."""
    coordinate = normal * t
    coordinate += position
    coordinate = min(max(coordinate, OUTSIDE), float(size))
    floor = np.floor(coordinate)
    return np.intp(floor), np.float32(coordinate - floor)


def mapped_pixels(
    positions: np.ndarray, normals: np.ndarray, flip: bool, translation: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """:func:`scrollzarr.sampling.mapped_pixels`, compiled, with the GIL released (in numpy it held the GIL for
    1.4 s of a quarter of the benchmark's render, where the kernel took 5.3 s)."""
    mapped = np.empty(positions.shape[:2], np.bool_)
    p = np.empty((3, mapped.size))
    n = np.empty((3, mapped.size))
    count, nonfinite = _mapped(positions, normals, flip, translation, scale, mapped, p, n)
    return mapped, nonfinite, np.ascontiguousarray(p[:, :count]), np.ascontiguousarray(n[:, :count])


@numba.njit(nogil=True, cache=True)
def _mapped(
    positions: np.ndarray,
    normals: np.ndarray,
    flip: bool,
    translation: np.ndarray,
    scale: np.ndarray,
    mapped: np.ndarray,
    p: np.ndarray,
    n: np.ndarray,
) -> tuple[int, int]:  # pragma: no cover (compiled; run through mapped_pixels)
    """:func:`mapped_pixels` into ``mapped``, ``p`` and ``n`` (3, rows x columns): the mapped pixels' count and
    the count of pixels with a non-finite coordinate."""
    count = nonfinite = 0
    for r in range(positions.shape[0]):
        for c in range(positions.shape[1]):
            finite = True
            nonzero = False
            for axis in range(3):
                normal = -normals[r, c, axis] if flip else normals[r, c, axis]
                finite = finite and np.isfinite(positions[r, c, axis]) and np.isfinite(normal)
                nonzero = nonzero or normal != 0
            nonfinite += not finite
            mapped[r, c] = finite and nonzero
            if finite and nonzero:
                for axis in range(3):
                    normal = -normals[r, c, axis] if flip else normals[r, c, axis]
                    p[axis, count] = (positions[r, c, axis] - translation[axis]) / scale[axis]
                    n[axis, count] = normal / scale[axis]
                count += 1
    return count, nonfinite
