"""A synthetic scroll for demos, tests and benchmarks: a rolled papyrus sheet in noise.

Each slice shows an Archimedean spiral (the rolled sheet, bright) in darker
noisy air, inside a round case; the spiral's centre drifts and turns slowly
with z, like a real scroll's.  The *masked* variant sets everything outside the
scroll to 0 and compresses the TIFFs, like the ``masked_volumes``.

Run ``python -m scrollzarr.synthetic OUTPUT_DIR --shape Z Y X [--masked]``.
"""

from __future__ import annotations

import argparse
import logging
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


def scroll_slice(z: int, shape: tuple[int, int], depth: int, masked: bool, seed: int = 0) -> np.ndarray:
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
    values = AIR_LEVEL + (SHEET_LEVEL - AIR_LEVEL) * sheet + rng.normal(0.0, NOISE, shape)
    image = np.clip(np.round(values), 0, 65535).astype(np.uint16)
    if masked:
        image[r >= radius] = 0
    return image


def sheet_surface(shape: tuple[int, int, int], zs: np.ndarray, width: int, start_turn: float = 1.0) -> np.ndarray:
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


def sheet_width(shape: tuple[int, int, int], start_turn: float = 1.0) -> int:
    """Columns of :func:`sheet_surface` that stay inside the scroll's outer turn."""
    _, _, _, radius, pitch = _geometry(np.float64(0), shape[1:], shape[0])
    a = pitch / (2 * np.pi)
    return max(1, int(a * (radius / a) ** 2 / 2 - a * (2 * np.pi * start_turn) ** 2 / 2))


def write_stack(
    directory: Path, shape: tuple[int, int, int], masked: bool = False, seed: int = 0, quiet: bool = True
) -> list[Path]:
    """Write a synthetic scroll as ``00000.tif`` … into ``directory``.

    Parameters
    ----------
    shape : (int, int, int)
        Slices, rows, columns (z, y, x).
    masked : bool
        Masked variant: zeros outside the scroll, zlib-compressed TIFFs.
        Otherwise plain uncompressed TIFFs.

    Returns
    -------
    list of Path
        The files written, in z order.
    """
    depth, rows, cols = shape
    directory.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(depth - 1)))
    paths = []
    for z in tqdm(range(depth), desc="synthetic scroll", unit="slice", disable=quiet):
        path = directory / f"{z:0{digits}d}.tif"
        image = scroll_slice(z, (rows, cols), depth, masked, seed)
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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if min(args.shape) < 1:
        print(f"{parser.prog}: error: --shape needs three positive sizes, not {args.shape}", file=sys.stderr)
        return 2
    shape = tuple(args.shape)
    write_stack(args.output_dir, shape, args.masked, args.seed, args.quiet)
    if args.ppm is not None:
        write_ppm(args.ppm, sheet_surface(shape, np.arange(shape[0], dtype=np.float64), sheet_width(shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
