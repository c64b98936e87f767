"""tifxyz surfaces (VC3D's format): a grid of scroll points, upsampled to output pixels with their normals.

A tifxyz surface is a folder: ``x.tif``, ``y.tif``, ``z.tif`` (one value per
grid point, any integer or float type, tiled or stripped), ``meta.json``
(``"format": "tifxyz"``, ``"scale": [sx, sy]``: grid samples per voxel along the
grid's columns and rows) and optionally ``mask.tif`` (channel 0; a value below
255 marks the point invalid; its size may be an integer multiple of the
grid's: a point is then masked if any pixel of its block is).  A point is
invalid where it is (-1, -1, -1), where z <= 0 or where a coordinate is not
finite, as volume-cartographer's loader has it.  Only the first page of each
image is read, as VC reads it.

How the grid becomes output pixels, at ``scale`` output pixels per voxel (the
choices where the definition had to choose are marked *):

- Output pixel (r, c) lies at grid coordinates (r * sy / scale, c * sx /
  scale)*: pixel (0, 0) is grid point (0, 0) (no half-pixel shift), so at a
  render scale equal to the grid's own (sx = sy = scale) pixel (r, c) is grid
  point (r, c).  The output is as large as the grid covers: ``floor((n - 1) *
  scale / s) + 1`` pixels along an axis of ``n`` grid points*.
- Its position is the bilinear interpolation of the four grid points around
  it; it is valid where every point with a non-zero weight is valid* (so a
  pixel on a grid point needs that point only).
- Its normal is the cross product of the central differences of the
  interpolated surface one output pixel away along the columns and along the
  rows, ``d/dc x d/dr``, made unit length: vc_render_tifxyz's sign, pointing
  out of the scroll for VC3D's surfaces (``--flip_normals`` turns it round).
  vc_render_tifxyz takes each pixel's normal from its nearest grid point
  instead (the README says where the two differ).  A pixel whose four
  neighbours are not all valid, the output's outermost pixels among them, or
  whose differences are parallel, has no normal and is unmapped.

Unmapped pixels are given a zero normal, a ``.ppm``'s mark of an unmapped
pixel, so that both surfaces render through one path.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from scrollzarr.errors import ScrollzarrError

COORDINATES = ("x.tif", "y.tif", "z.tif")
META = "meta.json"
MASK = "mask.tif"
# The largest output a render makes from one grid, pixels along an axis: a typo'd --scale or meta.json scale
# (1e-9) would otherwise plan a render of millions of times the grid.
MAX_PIXELS = 10_000_000


class TifxyzError(ScrollzarrError):
    """A folder that cannot be read as a tifxyz surface."""


@dataclass(frozen=True)
class Tifxyz:
    """A checked tifxyz surface rendered at ``scale`` output pixels per voxel, read a block of pixels at a time.

    A plain value (a process that renders a band loads the grid once, on first use).

    Attributes
    ----------
    path : Path
        The surface's folder.
    width, height : int
        Size of the output in pixels.
    grid_scale : (float, float)
        ``meta.json``'s scale: grid samples per voxel along the columns and the rows.
    scale : float
        Output pixels per voxel (``--scale``).
    """

    path: Path
    width: int
    height: int
    grid_scale: tuple[float, float]
    scale: float

    def rows(self, v0: int, v1: int, u0: int, u1: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and unit normals of the output pixels ``[v0:v1, u0:u1]``, in array axis order.

        Returns
        -------
        positions, normals : ndarray, shape (v1 - v0, u1 - u0, 3), float64
            (z, y, x) and (nz, ny, nx) in voxels; an unmapped pixel's normal is zero.
        """
        points, valid = _grid(self.path)
        steps = (self.grid_scale[1] / self.scale, self.grid_scale[0] / self.scale)
        # one pixel more on every side: the central differences of the block's edge pixels
        rows, cols = np.arange(v0 - 1, v1 + 1), np.arange(u0 - 1, u1 + 1)
        inside_rows = (rows >= 0) & (rows < self.height)
        inside_cols = (cols >= 0) & (cols < self.width)
        position, ok = upsample(points, valid, rows * steps[0], cols * steps[1])
        ok &= inside_rows[:, None] & inside_cols[None, :]
        normal, has = central_normals(position, ok)
        positions = position[1:-1, 1:-1]
        normals = np.where(has[..., None], normal, 0.0)
        return positions[..., ::-1].copy(), normals[..., ::-1].copy()


def upsample(
    points: np.ndarray, valid: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation of the grid ``points`` at grid coordinates ``rows`` x ``cols``.

    Parameters
    ----------
    points : ndarray, shape (H, W, 3), float32 or float64
        (x, y, z) of each grid point, voxels (invalid points' values are not used).
    valid : ndarray, shape (H, W), bool
    rows, cols : ndarray, shape (R,) and (C,), float64
        Grid coordinates; outside ``[0, H - 1]`` x ``[0, W - 1]`` is invalid.

    Returns
    -------
    positions : ndarray, shape (R, C, 3), float64
    ok : ndarray, shape (R, C), bool
        Where every grid point with a non-zero weight is valid.
    """
    height, width = valid.shape
    r0, tr, r_in = _cells(rows, height)
    c0, tc, c_in = _cells(cols, width)
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    wr, wc = tr[:, None, None], tc[None, :, None]
    top = points[r0][:, c0] * (1 - wc) + points[r0][:, c1] * wc
    bottom = points[r1][:, c0] * (1 - wc) + points[r1][:, c1] * wc
    positions = top * (1 - wr) + bottom * wr
    need_r1, need_c1 = (tr > 0)[:, None], (tc > 0)[None, :]
    ok = valid[r0][:, c0].copy()
    ok &= ~need_c1 | valid[r0][:, c1]
    ok &= ~need_r1 | valid[r1][:, c0]
    ok &= ~(need_r1 & need_c1) | valid[r1][:, c1]
    ok &= r_in[:, None] & c_in[None, :]
    return positions, ok


def _cells(coordinates: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For grid coordinates along an axis of ``size`` points: each one's cell (its lower point), its fraction
    of the way to the next point, and whether it lies on the grid."""
    inside = (coordinates >= 0) & (coordinates <= size - 1)
    clipped = np.clip(coordinates, 0, size - 1)
    cell = np.minimum(np.floor(clipped).astype(np.int64), max(size - 2, 0))
    return cell, clipped - cell, inside


def central_normals(positions: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals of the inner pixels of ``positions``: ``d/dc x d/dr`` from central differences.

    Parameters
    ----------
    positions : ndarray, shape (R, C, 3), float64
        (x, y, z) of a block of output pixels with one pixel more on every side.
    ok : ndarray, shape (R, C), bool

    Returns
    -------
    normals : ndarray, shape (R - 2, C - 2, 3), float64
    has : ndarray, shape (R - 2, C - 2), bool
        Where the pixel and its four neighbours are valid and the differences are not parallel.
    """
    along_cols = (positions[1:-1, 2:] - positions[1:-1, :-2]) / 2
    along_rows = (positions[2:, 1:-1] - positions[:-2, 1:-1]) / 2
    cross = np.cross(along_cols, along_rows)
    length = np.linalg.norm(cross, axis=-1)
    has = ok[1:-1, 1:-1] & ok[1:-1, 2:] & ok[1:-1, :-2] & ok[2:, 1:-1] & ok[:-2, 1:-1] & (length > 0)
    normals = cross / np.where(has, length, 1.0)[..., None]
    return normals, has


def is_tifxyz(path: Path) -> bool:
    """Whether ``path`` is a folder to be read as a tifxyz surface (a surface that is not a ``.ppm`` file)."""
    return path.is_dir()


def open_tifxyz(path: Path, scale: float) -> Tifxyz:
    """Check a tifxyz folder (its meta.json, the three coordinate images and the mask) for rendering at
    ``scale`` output pixels per voxel.

    Raises
    ------
    TifxyzError
        Naming what is missing or wrong, in one line.
    """
    grid_scale = _meta(path)
    _, valid = _grid(path)
    height, width = valid.shape
    sizes = []
    for points_count, step in ((height, grid_scale[1]), (width, grid_scale[0])):
        span = (points_count - 1) * scale / step  # output pixels the grid spans (float: inf for absurd scales)
        if not span < MAX_PIXELS:
            raise TifxyzError(
                f"{path}: at --scale {scale:g} the output would be {span + 1:.3g} pixels along an axis (the grid has "
                f"{points_count} points, {step:g} per voxel; at most {MAX_PIXELS} are made); give a smaller --scale"
            )
        sizes.append(math.floor(span + 1e-9) + 1)
    if not valid.any():
        raise TifxyzError(f"{path}: no grid point is valid (all are -1, z <= 0, not finite or masked)")
    return Tifxyz(path.absolute(), width=sizes[1], height=sizes[0], grid_scale=grid_scale, scale=scale)


def _meta(path: Path) -> tuple[float, float]:
    """meta.json's scale, checked."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise TifxyzError(
            f"{path}: a folder without {META}; a surface is a .ppm file or a tifxyz folder (x.tif, y.tif, z.tif "
            f"and {META})"
        ) from None
    except (OSError, ValueError) as error:
        raise TifxyzError(f"{path / META}: cannot be read as JSON ({error})") from None
    if not isinstance(meta, dict):
        raise TifxyzError(f"{path / META}: not a tifxyz surface's (a JSON object with 'scale' is expected)")
    if meta.get("format", "tifxyz") != "tifxyz":
        raise TifxyzError(f"{path / META}: not a tifxyz surface's (its format is {meta.get('format')!r})")
    scale = meta.get("scale")
    numbers = []
    if isinstance(scale, list) and len(scale) == 2:
        for value in scale:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                with contextlib.suppress(OverflowError):  # a whole number of hundreds of digits: left out
                    numbers.append(float(value))
    if len(numbers) != 2 or not all(math.isfinite(n) and n > 0 for n in numbers):
        shown = repr(scale) if len(repr(scale)) <= 60 else repr(scale)[:57] + "..."
        raise TifxyzError(f"{path / META}: 'scale' must be two positive numbers (grid samples per voxel), not {shown}")
    return numbers[0], numbers[1]


_GRIDS: dict[tuple[str, tuple[tuple[int, int], ...]], tuple[np.ndarray, np.ndarray]] = {}
_GRIDS_LOCK = threading.Lock()


def _grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The grid's points (H, W, 3: x, y, z, float64) and validity (H, W), read once per process and file state."""
    files = [path / name for name in (*COORDINATES, MASK)]
    key = (str(path), tuple(_identity(file) for file in files))
    with _GRIDS_LOCK:
        if key not in _GRIDS:
            _GRIDS.clear()  # one surface per render
            _GRIDS[key] = _read_grid(path)
        return _GRIDS[key]


def _identity(path: Path) -> tuple[int, int]:
    try:
        status = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return status.st_size, status.st_mtime_ns


def _read_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    coordinates = []
    for name in COORDINATES:
        file = path / name
        try:
            image = tifffile.imread(file, key=0)  # the first page, as VC reads it
        except FileNotFoundError:
            raise TifxyzError(
                f"{path}: no {name}; a tifxyz surface folder has x.tif, y.tif, z.tif and {META}"
            ) from None
        except Exception as error:  # tifffile raises many kinds for a damaged file
            raise TifxyzError(f"{file}: cannot be read as a TIFF ({type(error).__name__}: {error})") from None
        if image.ndim != 2 or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise TifxyzError(
                f"{file}: a coordinate image must be one 2-D plane of numbers, not {image.shape} {image.dtype}"
            )
        coordinates.append(image.astype(np.float32))  # as VC holds them: 12 bytes a point
    shapes = {image.shape for image in coordinates}
    if len(shapes) != 1:
        sizes = ", ".join(str(image.shape) for image in coordinates)
        raise TifxyzError(f"{path}: x.tif, y.tif and z.tif differ in size ({sizes})")
    points = np.stack(coordinates, axis=-1)
    height, width = points.shape[:2]
    if height < 2 or width < 2:
        raise TifxyzError(f"{path}: the grid is {height} x {width} points; a surface needs at least 2 x 2")
    valid = np.isfinite(points).all(axis=-1) & (points[..., 2] > 0) & ~(points == -1).all(axis=-1)
    mask_file = path / MASK
    if mask_file.exists():
        try:
            mask = tifffile.imread(mask_file, key=0)  # VC3D may store the mask with an image as a second page
        except Exception as error:  # tifffile raises many kinds for a damaged file
            raise TifxyzError(f"{mask_file}: cannot be read as a TIFF ({type(error).__name__}: {error})") from None
        if mask.ndim == 3:
            mask = mask[..., 0]  # channel 0
        rows, cols = (mask.shape[0] // height, mask.shape[1] // width) if mask.ndim == 2 else (0, 0)
        if rows < 1 or cols < 1 or mask.shape != (height * rows, width * cols):
            raise TifxyzError(
                f"{mask_file}: {mask.shape} is not the grid's size ({height} x {width}) or a whole multiple of it"
            )
        # a point is masked if any pixel of its block is (as VC's loader reduces a larger mask)
        valid &= mask.reshape(height, rows, width, cols).min(axis=(1, 3)) >= 255
    # an invalid point's coordinates (-1, NaN) never reach an output pixel, not even with a weight of 0 (NaN x 0)
    points[~valid] = 0.0
    return points, valid
