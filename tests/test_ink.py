"""The demo's ink: the synthetic sheet's writing comes out of ppm_to_layers, from the .ppm and from the tifxyz surface.

The synthetic scroll is written with ``--ink`` (and its .ppm and tifxyz
surfaces) by ``python -m scrollzarr.synthetic``, converted by scroll_to_ome
and rendered by ppm_to_layers; the stacked images are compared with the ink
pattern drawn here (``ink_image``): they correlate, and a surface moved off
the sheet, between two turns, does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import TIFXYZ_STEP, _geometry, ink_image, sheet_surface, sheet_width

from conftest import assert_ok, run_script, scroll_to_ome

SHAPE = (64, 160, 176)  # z, y, x: turns 12 voxels apart
TEXT = "PAPYRVS"


def ppm_to_layers(*args: object):
    return run_script("ppm_to_layers.py", *args, "--number_of_layers", 9, "--quiet")


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ink")
    args = ["--shape", *SHAPE, "--ink", TEXT, "--ppm", root / "sheet.ppm", "--tifxyz", root / "sheet", "--quiet"]
    assert_ok(run_script("-m", "scrollzarr.synthetic", root / "tiffs", *args))
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 32, "--nlevels", 1, "--quiet"))
    return root


def correlation(image: np.ndarray, ink: np.ndarray) -> float:
    """Pearson's r of the image and the ink over the image's mapped pixels (non-zero)."""
    mapped = image > 0
    return float(np.corrcoef(image[mapped].astype(np.float64), ink[mapped])[0, 1])


def test_the_stacked_image_of_the_ppm_shows_the_ink(scroll, tmp_path):
    assert_ok(ppm_to_layers(scroll / "sheet.ppm", scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif"))
    stacked = tifffile.imread(tmp_path / "s.tif")
    ink = ink_image(TEXT, SHAPE[0], sheet_width(SHAPE))
    assert stacked.shape == ink.shape
    assert ink.mean() > 0.01  # the letters are there to be found (2 % of the sheet)
    # Measured 0.42: the noise between the letters keeps r down; a surface off the sheet gives 0.
    assert correlation(stacked, ink) > 0.35
    # The middle layer alone (on the sheet) shows them too, fainter.
    assert correlation(tifffile.imread(tmp_path / "l" / "04.tif"), ink) > 0.3  # measured 0.39


def test_the_tifxyz_surface_shows_the_same_ink(scroll, tmp_path):
    meta = json.loads((scroll / "sheet" / "meta.json").read_text())
    assert meta["scale"] == [1 / TIFXYZ_STEP] * 2
    assert_ok(ppm_to_layers(scroll / "sheet", scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif"))
    stacked = tifffile.imread(tmp_path / "s.tif")
    ink = ink_image(TEXT, SHAPE[0], sheet_width(SHAPE))
    # The grid holds every 4th pixel of the .ppm: at --scale 1 its output pixel (r, c) is the .ppm's.
    height, width = stacked.shape
    assert (height - 1) // TIFXYZ_STEP == (SHAPE[0] - 1) // TIFXYZ_STEP
    assert correlation(stacked, ink[:height, :width]) > 0.35  # measured 0.47


def test_a_surface_between_two_turns_shows_no_ink(scroll, tmp_path):
    surface = sheet_surface(SHAPE, np.arange(SHAPE[0], dtype=np.float64), sheet_width(SHAPE))  # the demo's
    _, _, _, _, pitch = _geometry(np.float64(0), SHAPE[1:], SHAPE[0])
    moved = surface.copy()
    mapped = np.any(surface[..., 3:] != 0, axis=-1)
    moved[mapped, :3] += surface[mapped, 3:] * pitch / 2  # half a turn's spacing out: between two sheets
    write_ppm(tmp_path / "moved.ppm", moved)
    assert_ok(ppm_to_layers(tmp_path / "moved.ppm", scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif"))
    ink = ink_image(TEXT, SHAPE[0], sheet_width(SHAPE))
    # The middle layer, half way between two turns (the outer layers reach the turns' edges: the stacked image
    # still shows a trace of the ink, r 0.1).
    assert abs(correlation(tifffile.imread(tmp_path / "l" / "04.tif"), ink)) < 0.05
