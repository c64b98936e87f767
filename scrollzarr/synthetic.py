"""A synthetic scroll for demos, tests and benchmarks: a rolled papyrus sheet in noise.

Each slice shows an Archimedean spiral (the rolled sheet, bright) in darker
noisy air, inside a round case; the spiral's centre drifts and turns slowly
with z, like a real scroll's.  The *masked* variant sets everything outside the
scroll to 0 and compresses the TIFFs, like the ``masked_volumes``.  With
``ink``, the sheet carries writing: capital letters that make the sheet a
little denser where they lie, as carbon ink does on papyrus, laid out on the
unrolled sheet (rows = slices, columns = voxels of arc along the spiral from
one turn out, the columns of :func:`sheet_surface`), so that a render of the
sheet shows them upright and undistorted.

Run ``python -m scrollzarr.synthetic OUTPUT_DIR --shape Z Y X [--masked] [--ink TEXT]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from scrollzarr.ppm import write_ppm

log = logging.getLogger(__name__)

SHEET_LEVEL = 24000
AIR_LEVEL = 4000
NOISE = 1500.0
# What ink adds to the sheet's density: a quarter of the sheet's contrast with the air, 3.3 x the noise, so that
# a single layer shows the letters faintly and the stacked image clearly.
INK_LEVEL = 5000
INK_HEIGHT = 0.5  # of the slices: the letters' height


def _geometry(
    z: np.ndarray, shape: tuple[int, int], depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Centre row and column, turn (radians), radius and pitch of the spiral in slices ``z``."""
    rows, cols = shape
    turn = 2 * np.pi * z / max(depth, 1) * 0.5
    cy = rows / 2 + rows * 0.03 * np.sin(turn)
    cx = cols / 2 + cols * 0.03 * np.cos(turn)
    radius = 0.45 * min(rows, cols)
    pitch = max(radius / 6, 3.0)
    return cy, cx, turn, radius, pitch


def ink_image(text: str, depth: int, width: int) -> np.ndarray:
    """``text`` in capitals on the unrolled sheet: 1 where ink lies, 0 elsewhere.

    The letters are rasterised by Pillow (its built-in font, scaled), half
    the slices high, centred on the sheet's rows, and start a tenth of the
    sheet's width in; text wider than the sheet is cut.

    Returns
    -------
    ndarray, shape (depth, width), float32
        Rows are slices (z), columns voxels of arc along the sheet.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = max(4, int(depth * INK_HEIGHT))
    try:
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.load_default(size=size)
    except (ImportError, AttributeError, TypeError):  # a Pillow without FreeType: its bitmap font, scaled below
        font = ImageFont.load_default()
    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text.upper(), font=font)
    left, top, right, bottom = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    canvas = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text.upper(), font=font, fill=255)
    scale = size / canvas.height
    canvas = canvas.resize((max(1, round(canvas.width * scale)), size), Image.Resampling.NEAREST)
    letters = np.asarray(canvas, dtype=np.float32) / 255.0
    image = np.zeros((depth, width), np.float32)
    z0, u0 = (depth - size) // 2, width // 10
    part = letters[:, : max(0, width - u0)]
    image[z0 : z0 + part.shape[0], u0 : u0 + part.shape[1]] = part
    return image


def scroll_slice(
    z: int, shape: tuple[int, int], depth: int, masked: bool, seed: int = 0, ink: np.ndarray | None = None
) -> np.ndarray:
    """Slice ``z`` of a synthetic scroll.

    Parameters
    ----------
    z : int
        Slice number (0 … depth-1).
    shape : (int, int)
        Rows and columns of the slice.
    depth : int
        Number of slices of the whole scroll (sets how far the spiral turns).
    masked : bool
        Zero everything outside the scroll's outer turn.
    seed : int
        Noise seed; the same arguments always give the same slice.
    ink : ndarray, shape (depth, W), optional
        :func:`ink_image`: the ink on the unrolled sheet.

    Returns
    -------
    numpy.ndarray, shape ``shape``, uint16
    """
    rows, cols = shape
    cy, cx, turn, radius, pitch = _geometry(np.float64(z), shape, depth)
    y, x = np.ogrid[:rows, :cols]
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx)
    phase = (np.arctan2(dy, dx) + turn) % (2 * np.pi)
    along = (r - pitch * phase / (2 * np.pi)) % pitch
    distance = np.minimum(along, pitch - along)
    sheet = np.exp(-((distance / max(pitch * 0.12, 0.8)) ** 2)) * (r < radius)
    rng = np.random.default_rng([seed, z])
    density: float | np.ndarray = SHEET_LEVEL - AIR_LEVEL
    if ink is not None:
        density = density + INK_LEVEL * _ink_on_sheet(ink[z], r, phase, pitch)
    values = AIR_LEVEL + density * sheet + rng.normal(0.0, NOISE, shape)
    image = np.clip(np.round(values), 0, 65535).astype(np.uint16)
    if masked:
        image[r >= radius] = 0
    return image


def _ink_on_sheet(row: np.ndarray, r: np.ndarray, phase: np.ndarray, pitch: float) -> np.ndarray:
    """The ink of the voxels of a slice: ``row`` (the slice's row of :func:`ink_image`) at the arc position of the
    turn of the sheet nearest each voxel (radius ``r``, spiral phase ``phase``), in :func:`sheet_surface`'s
    columns."""
    a = pitch / (2 * np.pi)
    winding = np.round((r - a * phase) / pitch)
    psi = phase + 2 * np.pi * winding
    column = np.round(a * psi**2 / 2 - a * (2 * np.pi * START_TURN) ** 2 / 2).astype(np.int64)
    inside = (column >= 0) & (column < row.size) & (winding >= 0)
    return np.where(inside, row[np.clip(column, 0, row.size - 1)], 0.0)


START_TURN = 1.0  # the sheet's first column lies one turn out from the centre
TIFXYZ_STEP = 4  # pixels between grid points of the demo's tifxyz surface (VC3D's grids are coarser than voxels)


def sheet_surface(
    shape: tuple[int, int, int], zs: np.ndarray, width: int, start_turn: float = START_TURN
) -> np.ndarray:
    """A ``.ppm`` surface that follows the synthetic scroll's sheet: row v lies in slice ``zs[v]``.

    Column u walks along the spiral, one voxel of arc per pixel, from
    ``start_turn`` turns out from the centre; the normal is the spiral's
    in-plane normal, pointing outwards (unit length, nz = 0).  Pixels beyond
    the scroll's outer turn are unmapped (all six values 0).

    Parameters
    ----------
    shape : (int, int, int)
        The scroll's (slices, rows, columns).
    zs : ndarray, shape (H,)
        Slice (z coordinate, may be fractional) of each row.
    width : int
        Pixels per row.

    Returns
    -------
    ndarray, shape (H, width, 6), float64
        (x, y, z, nx, ny, nz) per pixel.
    """
    depth, rows, cols = shape
    z = np.asarray(zs, dtype=np.float64)[:, None]
    cy, cx, turn, radius, pitch = _geometry(z, (rows, cols), depth)
    a = pitch / (2 * np.pi)
    arc = a * (2 * np.pi * start_turn) ** 2 / 2 + np.arange(width, dtype=np.float64)[None, :]
    psi = np.sqrt(2 * arc / a)
    r = a * psi
    theta = psi - turn
    cos, sin = np.cos(theta), np.sin(theta)
    tx, ty = a * cos - r * sin, a * sin + r * cos
    length = np.hypot(tx, ty)
    surface = np.stack(
        np.broadcast_arrays(cx + r * cos, cy + r * sin, z, ty / length, -tx / length, np.zeros_like(r)), axis=-1
    )
    surface[np.broadcast_to(r >= radius, surface.shape[:2])] = 0.0
    return surface


def sheet_width(shape: tuple[int, int, int], start_turn: float = START_TURN) -> int:
    """Columns of :func:`sheet_surface` that stay inside the scroll's outer turn."""
    _, _, _, radius, pitch = _geometry(np.float64(0), shape[1:], shape[0])
    a = pitch / (2 * np.pi)
    return max(1, int(a * (radius / a) ** 2 / 2 - a * (2 * np.pi * start_turn) ** 2 / 2))


def write_tifxyz(folder: Path, surface: np.ndarray, step: int) -> None:
    """Write ``surface`` (a ``.ppm``'s pixels, (H, W, 6)) as a tifxyz folder as VC3D writes one: every ``step``-th
    pixel's point as float32 ``x.tif``, ``y.tif``, ``z.tif`` (tiled), unmapped pixels as (-1, -1, -1), and
    ``meta.json`` with ``scale`` 1/``step`` grid points per voxel (one pixel of the surface is one voxel of arc)."""
    grid = surface[::step, ::step]
    points = np.where((grid[..., 3:] != 0).any(axis=-1, keepdims=True), grid[..., :3], -1.0).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for axis, name in enumerate("xyz"):
        tifffile.imwrite(folder / f"{name}.tif", points[..., axis], tile=(16, 16), compression="zlib")
    meta = {"format": "tifxyz", "type": "seg", "uuid": folder.name, "scale": [1 / step, 1 / step]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def write_stack(
    directory: Path,
    shape: tuple[int, int, int],
    masked: bool = False,
    seed: int = 0,
    quiet: bool = True,
    ink: str | None = None,
) -> list[Path]:
    """Write a synthetic scroll as ``00000.tif`` … into ``directory``.

    Parameters
    ----------
    shape : (int, int, int)
        Slices, rows, columns (z, y, x).
    masked : bool
        Masked variant: zeros outside the scroll, zlib-compressed TIFFs.
        Otherwise plain uncompressed TIFFs.
    ink : str, optional
        Text written on the sheet (:func:`ink_image`).

    Returns
    -------
    list of Path
        The files written, in z order.
    """
    depth, rows, cols = shape
    directory.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(depth - 1)))
    letters = None if ink is None else ink_image(ink, depth, sheet_width(shape))
    paths = []
    for z in tqdm(range(depth), desc="synthetic scroll", unit="slice", disable=quiet):
        path = directory / f"{z:0{digits}d}.tif"
        image = scroll_slice(z, (rows, cols), depth, masked, seed, letters)
        tifffile.imwrite(path, image, compression="zlib" if masked else None, rowsperstrip=64 if masked else None)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scrollzarr.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write the TIFFs into (created if missing)")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(256, 320, 352), help="slices, rows, columns"
    )
    parser.add_argument("--masked", action="store_true", help="zeros outside the scroll, zlib-compressed TIFFs")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument(
        "--ppm",
        type=Path,
        default=None,
        help="also write a .ppm surface along the sheet, one row per slice (for ppm_to_layers)",
    )
    parser.add_argument(
        "--ink", default=None, metavar="TEXT", help="writing on the sheet: TEXT in capitals, slightly denser"
    )
    parser.add_argument(
        "--tifxyz",
        type=Path,
        default=None,
        help="also write the .ppm's surface as a tifxyz folder (VC3D's format), a grid point every 4 pixels",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if min(args.shape) < 1:
        print(f"{parser.prog}: error: --shape needs three positive sizes, not {args.shape}", file=sys.stderr)
        return 2
    shape = tuple(args.shape)
    write_stack(args.output_dir, shape, args.masked, args.seed, args.quiet, args.ink)
    surface = sheet_surface(shape, np.arange(shape[0], dtype=np.float64), sheet_width(shape))
    if args.ppm is not None:
        write_ppm(args.ppm, surface)
    if args.tifxyz is not None:
        write_tifxyz(args.tifxyz, surface, TIFXYZ_STEP)
    return 0


if __name__ == "__main__":
    sys.exit(main())
