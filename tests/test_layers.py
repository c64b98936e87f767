"""ppm_to_layers renders what the definition says: every layer against an independent trilinear reference.

A synthetic scroll is converted by scroll_to_ome; a .ppm follows one of its
sheets.  Every test runs the real script and reads the TIFFs back with
tifffile; references are computed here in plain numpy (tests/reference.py).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import SHEET_LEVEL, sheet_surface, write_stack

from conftest import ROOT, assert_ok, run_script, scroll_to_ome, write_sheet
from reference import layers_reference

SHAPE = (40, 96, 112)  # z, y, x


def ppm_to_layers(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("ppm_to_layers.py", *args)


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    """The synthetic scroll's TIFFs and its OME-Zarr (chunks of 32, 2 levels)."""
    root = tmp_path_factory.mktemp("scroll")
    write_stack(root / "tiffs", SHAPE)
    assert_ok(scroll_to_ome(root / "tiffs", root / "scroll.zarr", "--chunk_size", 32, "--nlevels", 2))
    return root


@pytest.fixture(scope="module")
def volume(scroll) -> np.ndarray:
    return zarr.open_array(scroll / "scroll.zarr" / "0", mode="r")[:]


@pytest.fixture(scope="module")
def sheet(scroll) -> tuple[Path, np.ndarray]:
    """A .ppm along the sheet through every slice, with an unmapped hole."""
    return write_sheet(scroll, SHAPE)


def read_layers(directory: Path) -> tuple[list[str], np.ndarray]:
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))  # not the run's manifest
    return names, np.stack([tifffile.imread(directory / name) for name in names])


def assert_matches(layers: np.ndarray, reference: np.ndarray) -> None:
    """Rounded to nearest: at most 0.5 (plus float32 arithmetic) from the exact value, so at most 1 from round()."""
    difference = np.abs(layers.astype(np.float64) - reference)
    assert difference.max() < 0.55, difference.max()
    assert np.abs(layers.astype(np.float64) - np.rint(reference)).max() <= 1


def test_layers_and_stack_match_the_definition(scroll, volume, sheet, tmp_path):
    ppm, surface = sheet
    result = ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "layers", tmp_path / "stack.tif")
    assert_ok(result)
    names, layers = read_layers(tmp_path / "layers")
    assert names == [f"{k:02d}.tif" for k in range(65)]
    assert layers.shape == (65, *surface.shape[:2]) and layers.dtype == np.uint16
    with tifffile.TiffFile(tmp_path / "layers" / "00.tif") as tiff:
        assert tiff.pages[0].compression == 1 and len(tiff.pages) == 1
    reference = layers_reference(volume, surface, 65, 1.0)
    assert_matches(layers, reference)
    mapped = np.any(surface[..., 3:] != 0, axis=-1)
    assert not layers[:, ~mapped].any()
    # The middle layer is the traced sheet; 3 voxels off it, either way, is the dark gap between turns.
    assert layers[32][mapped].mean() > 0.8 * SHEET_LEVEL
    assert max(layers[29][mapped].mean(), layers[35][mapped].mean()) < 0.25 * SHEET_LEVEL
    stack = tifffile.imread(tmp_path / "stack.tif")
    np.testing.assert_array_equal(stack, layers[20:45].max(axis=0))
    assert "pixels mapped" in result.stderr  # the progress bar, on terminals only: test_cli_hostile.py


def test_even_layer_count_and_spacing(scroll, volume, sheet, tmp_path):
    ppm, surface = sheet
    options = ["--number_of_layers", 4, "--layer_spacing", 2.5, "--number_of_stacked_layers", 2]
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif", *options))
    names, layers = read_layers(tmp_path / "l")
    assert names == ["00.tif", "01.tif", "02.tif", "03.tif"]
    assert_matches(layers, layers_reference(volume, surface, 4, 2.5))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s.tif"), layers[1:3].max(axis=0))


@pytest.mark.parametrize("how", ["max", "mean", "median", "min"])
@pytest.mark.parametrize("stacked", [3, 4])
def test_stack_filters(scroll, sheet, tmp_path, how, stacked):
    ppm, _ = sheet
    options = ["--number_of_layers", 9, "--number_of_stacked_layers", stacked, "--stack_filter", how, "--quiet"]
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif", *options))
    _, layers = read_layers(tmp_path / "l")
    middle = layers[3:6] if stacked == 3 else layers[2:6]
    expected = {
        "max": middle.max(axis=0),
        "min": middle.min(axis=0),
        "mean": np.rint(middle.astype(np.float64).mean(axis=0)),
        "median": np.rint(np.median(middle.astype(np.float64), axis=0)),
    }[how]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s.tif"), expected.astype(np.uint16))


def edge_surface(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Pixels at, just inside and beyond every face and corner of the volume, with random unit normals."""
    z, y, x = shape
    marks = lambda n: [-3.0, -1.0, -0.5, -0.01, 0.0, 0.4, n / 2, n - 1.5, n - 1.0, n - 0.6, n - 0.01, n, n + 2.0]  # noqa: E731
    grid = np.array(np.meshgrid(marks(x), marks(y), marks(z), indexing="ij")).reshape(3, -1).T
    normals = rng.normal(size=grid.shape)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    surface = np.concatenate([grid, normals], axis=1)
    return surface.reshape(len(marks(x)) * len(marks(y)), len(marks(z)), 6)


def test_samples_at_and_beyond_the_edges(scroll, volume, tmp_path, rng):
    surface = edge_surface(SHAPE, rng)
    write_ppm(tmp_path / "edges.ppm", surface)
    options = ["--number_of_layers", 5, "--layer_spacing", 1.3, "--block_size", 3]
    assert_ok(ppm_to_layers(tmp_path / "edges.ppm", scroll / "scroll.zarr", tmp_path / "l", *options))
    _, layers = read_layers(tmp_path / "l")
    reference = layers_reference(volume, surface, 5, 1.3)
    assert_matches(layers, reference)
    # Every pixel whose samples touch the volume is rendered, none dropped with its block.
    assert np.all(layers[reference >= 1] > 0)
    assert (reference >= 1).sum() > 0.2 * reference.size


def test_an_ome_group_and_its_level_0_array_give_the_same_files(scroll, sheet, tmp_path):
    ppm, _ = sheet
    options = ["--number_of_layers", 7, "--quiet"]
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "group", tmp_path / "g.tif", *options))
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr" / "0", tmp_path / "array", tmp_path / "a.tif", *options))
    for k in range(7):
        assert (tmp_path / "group" / f"{k:02d}.tif").read_bytes() == (tmp_path / "array" / f"{k:02d}.tif").read_bytes()
    assert (tmp_path / "g.tif").read_bytes() == (tmp_path / "a.tif").read_bytes()


def test_level_1_samples_the_half_resolution_level(scroll, sheet, tmp_path):
    ppm, surface = sheet
    level1 = zarr.open_array(scroll / "scroll.zarr" / "1", mode="r")[:]
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "l", "--level", 1, "--number_of_layers", 5))
    _, layers = read_layers(tmp_path / "l")
    assert_matches(layers, layers_reference(level1, surface, 5, 1.0, scale=2.0))


def test_a_cropped_store_renders_like_the_whole_scroll(scroll, sheet, tmp_path):
    _ppm, surface = sheet
    part = surface[18:30, 20:60]
    write_ppm(tmp_path / "part.ppm", part)
    # The crop holds every voxel the 9 layers' samples touch, and starts well inside the scroll.
    points = np.concatenate([part[..., :3] + t * part[..., 3:] for t in (-4.0, 4.0)]).reshape(-1, 3)
    lo = np.floor(points.min(axis=0)).astype(int) - 1
    hi = np.floor(points.max(axis=0)).astype(int) + 2
    assert np.all(lo > 0)
    ranges = ",".join(f"{a}:{b}" for a, b in zip(lo, hi, strict=True))  # x, y, z
    assert_ok(scroll_to_ome(scroll / "tiffs", tmp_path / "crop.zarr", "--ranges", ranges, "--chunk_size", 16))
    options = ["--number_of_layers", 9, "--quiet"]
    assert_ok(ppm_to_layers(tmp_path / "part.ppm", scroll / "scroll.zarr", tmp_path / "whole", *options))
    assert_ok(ppm_to_layers(tmp_path / "part.ppm", tmp_path / "crop.zarr", tmp_path / "crop", *options))
    _, whole = read_layers(tmp_path / "whole")
    _, crop = read_layers(tmp_path / "crop")
    np.testing.assert_array_equal(crop, whole)
    assert whole[4][whole[4] > 0].mean() > 0.8 * SHEET_LEVEL


def test_workers_tiles_and_a_tiny_cache_change_nothing(scroll, sheet, tmp_path):
    ppm, _ = sheet
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "a", "--number_of_layers", 11, "--quiet"))
    options = ["--number_of_layers", 11, "--workers", 1, "--block_size", 7, "--zarr_cache_max_size_gb", 1e-5]
    result = ppm_to_layers(ppm, scroll / "scroll.zarr", tmp_path / "b", *options)
    assert_ok(result)
    _, a = read_layers(tmp_path / "a")
    _, b = read_layers(tmp_path / "b")
    np.testing.assert_array_equal(a, b)
    reads, distinct = map(int, re.search(r"(\d+) chunk reads of (\d+) different", result.stderr).groups())
    assert reads > distinct  # a cache of 10 KiB cannot keep a 64 KiB chunk for the next tile


def test_more_than_100_layers_get_three_digits(scroll, volume, sheet, tmp_path):
    ppm, surface = sheet
    assert_ok(
        ppm_to_layers(
            ppm, scroll / "scroll.zarr", tmp_path / "l", "--number_of_layers", 101, "--layer_spacing", 0.25, "--quiet"
        )
    )
    names, layers = read_layers(tmp_path / "l")
    assert names == [f"{k:03d}.tif" for k in range(101)]
    assert_matches(layers[::25], layers_reference(volume, surface, 101, 0.25)[::25])


def test_a_uint8_blosc_store_like_the_data_server(volume, sheet, tmp_path):
    """zarr format 2, '/' keys, 32-chunks, uint8, blosc zstd: what the official OME-Zarr volumes are."""
    import numcodecs

    ppm, surface = sheet
    small = (volume // 256).astype(np.uint8)
    group = zarr.open_group(tmp_path / "server.zarr", mode="w", zarr_format=2)
    array = group.create_array(
        "0",
        shape=small.shape,
        chunks=(32, 32, 32),
        dtype="uint8",
        compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    array[:] = small
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    assert_ok(ppm_to_layers(ppm, tmp_path / "server.zarr", tmp_path / "l", "--number_of_layers", 5, "--quiet"))
    _, layers = read_layers(tmp_path / "l")
    assert layers.dtype == np.uint8
    assert_matches(layers, layers_reference(small, surface, 5, 1.0))


def test_overwrite_replaces_layers_keeps_other_files_and_removes_stale_layers(scroll, sheet, tmp_path):
    ppm, _ = sheet
    out = tmp_path / "l"
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", out, tmp_path / "s.tif", "--number_of_layers", 9, "--quiet"))
    (out / "notes.txt").write_text("mine")
    first = (out / "04.tif").read_bytes()
    options = ["--number_of_layers", 5, "--layer_spacing", 2, "--overwrite", "--quiet"]
    assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", out, tmp_path / "s.tif", *options))
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["00.tif", "01.tif", "02.tif", "03.tif", "04.tif", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "04.tif").read_bytes() != first


def test_ctrl_c_leaves_no_file_under_a_final_name(scroll, tmp_path):
    surface = sheet_surface(SHAPE, np.tile(np.arange(SHAPE[0], dtype=np.float64), 100), 300)
    write_ppm(tmp_path / "long.ppm", surface)
    out = tmp_path / "l"
    script = ROOT / "ppm_to_layers.py"
    command = [sys.executable, script, tmp_path / "long.ppm", scroll / "scroll.zarr", out, tmp_path / "s.tif"]
    process = subprocess.Popen([*map(str, command), "--workers", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(out.glob(".*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted; to continue: " in stderr and "--resume" in stderr and "Traceback" not in stderr
    # Its partial files stay for --resume (tests/test_layers_resume.py), under names no reader takes for images.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    assert not (out / ".scrollzarr.lock").exists()
    assert not (tmp_path / "s.tif").exists() and (tmp_path / ".s.tif.partial").exists()


def test_memory_stays_bounded_on_a_segment_larger_than_the_bound(scroll, volume, sheet, tmp_path):
    """A 3200 x 4200 map, 65 layers: 1.7 GB of layers (and a 0.6 GB .ppm) through a process held to 1.05 GiB.

    Every 64th column is mapped, so that an implementation holding the layers
    in memory would touch every page of them.
    """
    _, surface = sheet
    big = np.tile(surface, (80, 14, 1))
    big[:, np.arange(big.shape[1]) % 64 != 0] = 0
    write_ppm(tmp_path / "big.ppm", big)
    cache_gb = 0.05
    bound = (cache_gb + 1) * 2**30
    assert 65 * big.shape[0] * big.shape[1] * 2 > 1.5 * bound
    args = [str(tmp_path / "big.ppm"), str(scroll / "scroll.zarr"), str(tmp_path / "l"), str(tmp_path / "s.tif")]
    args += ["--zarr_cache_max_size_gb", str(cache_gb), "--quiet"]
    measure = (
        "import runpy, sys\n"
        f"sys.argv = {[str(ROOT / 'ppm_to_layers.py'), *args]!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as stop:\n    code = stop.code\n"
        # VmHWM, not ru_maxrss: Linux keeps the forking test process's peak in ru_maxrss across exec (measured:
        # 1.07 GiB in the full suite, whose process had grown, against 0.72 GiB for the render alone)
        "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
        "print('peak', int(status['VmHWM'].split()[0]) * 1024, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, timeout=600)
    assert_ok(result)
    peak = int(re.search(r"peak (\d+)", result.stderr).group(1))
    assert peak <= bound, f"peak resident memory {peak / 2**30:.2f} GiB"
    assert len([p for p in (tmp_path / "l").iterdir() if p.name != ".scrollzarr-layers.json"]) == 65
    middle = tifffile.imread(tmp_path / "l" / "32.tif")
    reference = np.tile(layers_reference(volume, surface, 65, 1.0)[32], (80, 14))
    reference[:, np.arange(big.shape[1]) % 64 != 0] = 0
    assert_matches(middle, reference)


@pytest.mark.parametrize(
    ("direction", "stacked"),
    [("positive", slice(0, 3)), ("negative", slice(4, 7)), ("both", slice(2, 5))],
)
def test_layers_on_one_side_of_the_surface(scroll, volume, sheet, tmp_path, direction, stacked):
    """--direction positive puts layer 0 on the surface and the others along the normal; negative the last layer
    on it and the others against the normal; the stacked image combines the layers nearest the surface."""
    ppm, surface = sheet
    options = ["--number_of_layers", 7, "--layer_spacing", 1.5, "--number_of_stacked_layers", 3]
    result = ppm_to_layers(
        ppm, scroll / "scroll.zarr", tmp_path / "l", tmp_path / "s.tif", *options, "--direction", direction
    )
    assert_ok(result)
    _, layers = read_layers(tmp_path / "l")
    assert_matches(layers, layers_reference(volume, surface, 7, 1.5, direction=direction))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s.tif"), layers[stacked].max(axis=0))
    mapped = np.any(surface[..., 3:] != 0, axis=-1)
    on_surface = {"positive": 0, "negative": 6, "both": 3}[direction]
    assert layers[on_surface][mapped].mean() > 0.8 * SHEET_LEVEL  # the traced sheet


def test_the_layers_of_the_two_sides_are_those_of_both_where_they_meet(scroll, sheet, tmp_path):
    """Layers 0-3 of positive and 3-6 of negative (spacing 1) are layers 3-6 and 0-3 of both, N = 7."""
    ppm, _ = sheet
    rendered = {}
    for direction in ("both", "positive", "negative"):
        out = tmp_path / direction
        options = ["--number_of_layers", 7, "--direction", direction, "--quiet"]
        assert_ok(ppm_to_layers(ppm, scroll / "scroll.zarr", out, *options))
        rendered[direction] = read_layers(out)[1]
    np.testing.assert_array_equal(rendered["positive"][:4], rendered["both"][3:])
    np.testing.assert_array_equal(rendered["negative"][3:], rendered["both"][:4])
