"""The sampling kernel compiled (numba): :func:`scrollzarr.sampling.sample_layers`, byte for byte, several times
faster, with the GIL released so that the threads sampling tiles run at once, reading the voxels straight from
the chunk cache's chunks.

The numpy kernel samples a box of voxels copied out of the cached chunks.  On
the benchmark's segment those boxes are far larger than the voxels sampled
(the sheet runs diagonally through them): copying them cost 28 ns a sample
and the kernel 17 ns in them, against 14.5 ns for this kernel in the chunks
themselves (60 tiles of the benchmark, one thread).

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
from scrollzarr.sampling import OUTSIDE


def sample_chunks(
    chunks: ChunkTable,
    positions: np.ndarray,
    normals: np.ndarray,
    offsets: np.ndarray,
    shape: tuple[int, int, int],
    out: np.ndarray,
) -> None:
    """:func:`scrollzarr.sampling.sample_layers`, compiled, reading the voxels from ``chunks`` instead of a box.

    Parameters
    ----------
    chunks : ChunkTable
        The chunks holding every voxel the samples touch (:meth:`ChunkCache.table` of their
        :func:`~scrollzarr.sampling.sample_bounds`); chunks not in it count as 0.
    positions, normals, offsets, shape, out
        As :func:`scrollzarr.sampling.sample_layers`; ``out`` has the chunks' dtype.
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
    addresses = np.array([array.ctypes.data for array in chunks.arrays] or [0], np.intp)
    (z0, y0, x0), (cz, cy, cx) = (int(i) for i in chunks.origin), chunks.shape
    _sample(
        addresses, slots, z0, y0, x0, cz, cy, cx, _shift(cz), _shift(cy), _shift(cx),
        np.ascontiguousarray(positions, np.float64), np.ascontiguousarray(normals, np.float64),
        np.ascontiguousarray(offsets, np.float64), shape[0], shape[1], shape[2], out,
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
) -> None:  # pragma: no cover (compiled; run through sample_chunks)
    """The kernel of :func:`sample_chunks`: ``addresses`` of the chunks' voxels, ``slots`` (nz, ny, nx) the
    number of each chunk from ``(z0, y0, x0)`` on (-1: all zero), ``(cz, cy, cx)`` the chunk shape and
    ``(sz, sy, sx)`` its log2 (-1 where not a power of two).

    Pixel by pixel, its layers one after another (they lie side by side in the volume: 85 against 67 M
    samples/s the other way round, random pixels, one thread).  The arithmetic is exactly the numpy kernel's:
    coordinates in float64, fractions and the interpolation ``a + (b - a) · f`` in float32, rounded half to
    even (tests/test_kernel.py checks the two agree bit for bit).

    The samples along a normal mostly stay in one chunk: the kernel keeps the chunk of the last cell that lay
    wholly in one, and looks a chunk up only when a cell leaves it.  A cell across chunk faces (2 % of cells
    with 128³ chunks) reads each of its voxels from its own chunk.
    """
    row, plane = cx, cy * cx
    far_away = -(1 << 40)
    bz, by, bx = far_away, far_away, far_away  # the current chunk's first voxel: no chunk yet
    chunk = _pointer(addresses[0], out)
    empty = True  # the current chunk is all zero (or outside the volume)
    v = np.zeros(8, np.float32)
    for m in range(positions.shape[1]):
        for k in range(offsets.shape[0]):
            t = offsets[k]
            iz, fz = _cell(positions[0, m], normals[0, m], t, depth)
            iy, fy = _cell(positions[1, m], normals[1, m], t, height)
            ix, fx = _cell(positions[2, m], normals[2, m], t, width)
            dz, dy, dx = iz - bz, iy - by, ix - bx
            if not (0 <= dz < cz - 1 and 0 <= dy < cy - 1 and 0 <= dx < cx - 1):
                qz, dz = _split(iz, cz, sz)
                qy, dy = _split(iy, cy, sy)
                qx, dx = _split(ix, cx, sx)
                if dz < cz - 1 and dy < cy - 1 and dx < cx - 1:  # the cell lies in chunk (qz, qy, qx): keep it
                    bz, by, bx = qz * cz, qy * cy, qx * cx
                    slot = _slot(slots, qz - z0, qy - y0, qx - x0)
                    empty = slot < 0
                    if not empty:
                        chunk = _pointer(addresses[slot], out)
                else:  # across chunk faces: each voxel from its own chunk
                    for corner in range(8):
                        z, y, x = iz + (corner >> 2), iy + ((corner >> 1) & 1), ix + (corner & 1)
                        qz, rz = _split(z, cz, sz)
                        qy, ry = _split(y, cy, sy)
                        qx, rx = _split(x, cx, sx)
                        slot = _slot(slots, qz - z0, qy - y0, qx - x0)
                        v[corner] = 0 if slot < 0 else _pointer(addresses[slot], out)[(rz * cy + ry) * cx + rx]
                    out[k, m] = _interpolate(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], fz, fy, fx)
                    continue
            if empty:
                out[k, m] = 0
                continue
            index = (dz * cy + dy) * cx + dx
            out[k, m] = _interpolate(
                np.float32(chunk[index]), np.float32(chunk[index + 1]),
                np.float32(chunk[index + row]), np.float32(chunk[index + row + 1]),
                np.float32(chunk[index + plane]), np.float32(chunk[index + plane + 1]),
                np.float32(chunk[index + plane + row]), np.float32(chunk[index + plane + row + 1]),
                fz, fy, fx,
            )  # fmt: skip


@numba.njit(nogil=True, cache=True, inline="always")
def _slot(slots: np.ndarray, z: int, y: int, x: int) -> int:  # pragma: no cover (compiled)
    """``slots[z, y, x]``, -1 outside it."""
    if 0 <= z < slots.shape[0] and 0 <= y < slots.shape[1] and 0 <= x < slots.shape[2]:
        return slots[z, y, x]
    return -1


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
