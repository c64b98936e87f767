"""ppm_to_layers reads every store layout scroll_to_ome writes: zarr 3 (OME-NGFF 0.5), sharded, compressed.

Each store is built with zarr itself from the voxels of a default (zarr 2, uncompressed) store made by the
real scroll_to_ome, and must render the very pixels the default store renders.  A damaged chunk or shard
of such a store is one line naming its file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import tifffile
import zarr
import zarr.codecs

from scrollzarr.ppm import write_ppm
from scrollzarr.synthetic import sheet_surface, write_stack

from conftest import assert_ok, assert_one_line_error, run_script, scroll_to_ome

SHAPE = (40, 96, 112)  # z, y, x
CHUNK = 16
SHARD = (32, 32, 32)  # z, y, x: partial shards at the far edges of every axis
AXES = [{"name": axis, "type": "space"} for axis in "zyx"]


def ppm_to_layers(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("ppm_to_layers.py", *args)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> Path:
    """The synthetic scroll converted by scroll_to_ome with its defaults (zarr 2, uncompressed), 2 levels."""
    root = tmp_path_factory.mktemp("scroll")
    write_stack(root / "tiffs", SHAPE)
    assert_ok(scroll_to_ome(root / "tiffs", root / "default.zarr", "--chunk_size", 32, "--nlevels", 2))
    return root / "default.zarr"


@pytest.fixture(scope="module")
def levels(default) -> list[np.ndarray]:
    return [zarr.open_array(default / str(level), mode="r")[...] for level in range(2)]


def datasets() -> list[dict]:
    return [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [2.0**level] * 3}]}
        for level in range(2)
    ]


def zarr3(path: Path, levels: list[np.ndarray], **layout) -> Path:
    """A zarr 3 OME-NGFF 0.5 store of ``levels`` with ``layout`` (shards, compressors), written by zarr."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for level, voxels in enumerate(levels):
        array = group.create_array(
            str(level), shape=voxels.shape, chunks=(CHUNK,) * 3, dtype=voxels.dtype, fill_value=0,
            dimension_names=("z", "y", "x"), **layout,
        )  # fmt: skip
        array[...] = voxels
    group.attrs.put({"ome": {"version": "0.5", "multiscales": [{"axes": AXES, "datasets": datasets()}]}})
    return path


def zarr2(path: Path, levels: list[np.ndarray], compressor) -> Path:
    """A zarr 2 OME-NGFF 0.4 store of ``levels`` with ``/`` chunk keys and ``compressor``, written by zarr."""
    group = zarr.open_group(path, mode="w", zarr_format=2)
    for level, voxels in enumerate(levels):
        array = group.create_array(
            str(level), shape=voxels.shape, chunks=(CHUNK,) * 3, dtype=voxels.dtype, fill_value=0,
            compressors=compressor, chunk_key_encoding={"name": "v2", "separator": "/"},
        )  # fmt: skip
        array[...] = voxels
    group.attrs.put({"multiscales": [{"version": "0.4", "axes": AXES, "datasets": datasets()}]})
    return path


STORES = {
    "zarr3-sharded-blosc-zstd": lambda path, levels: zarr3(
        path, levels, shards=SHARD, compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    ),
    "zarr3-gzip": lambda path, levels: zarr3(path, levels, compressors=zarr.codecs.GzipCodec(level=6)),
    "zarr3-sharded-raw": lambda path, levels: zarr3(path, levels, shards=SHARD, compressors=None),
    "zarr2-blosc-lz4": lambda path, levels: zarr2(path, levels, numcodecs.Blosc(cname="lz4", clevel=5)),
    "zarr2-zstd": lambda path, levels: zarr2(path, levels, numcodecs.Zstd(level=3)),
}


@pytest.fixture(scope="module")
def sheet(default) -> Path:
    """A .ppm along the sheet through every slice, with an unmapped hole."""
    surface = sheet_surface(SHAPE, np.arange(SHAPE[0], dtype=np.float64), 300)
    surface[10:17, 40:90] = 0
    path = default.parent / "sheet.ppm"
    write_ppm(path, surface)
    return path


def rendered(directory: Path) -> dict[str, np.ndarray]:
    """Every layer TIFF of a run's output directory (not its manifest), by name, as pixels."""
    return {p.name: tifffile.imread(p) for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("kind", sorted(STORES))
def test_every_layout_renders_the_pixels_of_the_default_store(tmp_path, default, levels, sheet, kind, level):
    store = STORES[kind](tmp_path / f"{kind}.zarr", levels)
    options = ["--number_of_layers", 5, "--level", level, "--quiet"]
    assert_ok(ppm_to_layers(sheet, default, tmp_path / "default", tmp_path / "default.tif", *options))
    assert_ok(ppm_to_layers(sheet, store, tmp_path / "other", tmp_path / "other.tif", *options))
    expected, got = rendered(tmp_path / "default"), rendered(tmp_path / "other")
    assert sorted(got) == sorted(expected) == [f"{k:02d}.tif" for k in range(5)]
    for name, pixels in expected.items():
        assert pixels.any(), name  # the sheet is there to be rendered
        np.testing.assert_array_equal(got[name], pixels, err_msg=name)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "other.tif"), tifffile.imread(tmp_path / "default.tif"))


# A damaged chunk: a surface of one point in the middle of chunk (1, 2, 3) (z, y, x) reads only that chunk.

POINT = (CHUNK + CHUNK // 2, 2 * CHUNK + CHUNK // 2, 3 * CHUNK + CHUNK // 2)  # z, y, x
CHUNK_INDEX = (1, 2, 3)
SHARD_KEY = "c/0/1/1"  # the shard of 32^3 that holds chunk (1, 2, 3) of 16^3


def point_surface(path: Path) -> Path:
    z, y, x = POINT
    write_ppm(path, np.array([[[x, y, z, 0.0, 0.0, 1.0]] * 2] * 2, dtype=np.float64))
    return path


def truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def cut_to_10_bytes(path: Path) -> None:
    """Shorter than blosc's 16-byte header."""
    with open(path, "r+b") as file:
        file.truncate(10)


def scramble(path: Path) -> None:
    """Invert a run of bytes in the middle of the file: gzip's CRC no longer matches (zstd without a checksum
    would decode such bytes without an error)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


DAMAGES = [
    # kind, how, damaged file (relative to level 0), what the line says of it
    ("zarr3-sharded-blosc-zstd", truncate, SHARD_KEY, f"is damaged: its chunk {CHUNK_INDEX} (z, y, x) cannot be"),
    ("zarr3-sharded-raw", truncate, SHARD_KEY, f"is damaged: its chunk {CHUNK_INDEX} (z, y, x) cannot be"),
    ("zarr3-gzip", scramble, "c/1/2/3", "is damaged: it cannot be decoded"),
    ("zarr2-blosc-lz4", cut_to_10_bytes, "1/2/3", "is damaged (10 bytes, shorter than blosc's header)"),
    ("zarr2-blosc-lz4", truncate, "1/2/3", "is damaged (its blosc header gives"),
    ("zarr2-zstd", truncate, "1/2/3", "is damaged (its zstd frame ends at byte"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "damage", "key", "fragment"), DAMAGES)
def test_a_damaged_chunk_or_shard_is_one_line_naming_its_file(tmp_path, levels, kind, damage, key, fragment):
    store = STORES[kind](tmp_path / f"{kind}.zarr", levels)
    surface = point_surface(tmp_path / "point.ppm")
    assert_ok(ppm_to_layers(surface, store, tmp_path / "whole", "--number_of_layers", 3, "--quiet"))
    damaged = store / "0" / key
    damage(damaged)
    result = ppm_to_layers(surface, store, tmp_path / "out", "--number_of_layers", 3)
    what = "shard file" if "sharded" in kind else "chunk file"
    assert_one_line_error(result, f"{what} {damaged} of the volume {fragment}", "scroll_to_ome", code=1)
    assert not (tmp_path / "out").exists()


def test_a_truncated_raw_zarr_3_chunk_is_named_with_its_size(tmp_path, levels):
    store = zarr3(tmp_path / "raw.zarr", levels, compressors=None)
    surface = point_surface(tmp_path / "point.ppm")
    damaged = store / "0" / "c" / "1" / "2" / "3"
    truncate(damaged)
    result = ppm_to_layers(surface, store, tmp_path / "out", "--number_of_layers", 3)
    whole = CHUNK**3 * 2  # uint16 voxels
    assert_one_line_error(
        result, f"chunk file {damaged} of the volume is damaged ({whole // 2} bytes, not {whole})", code=1
    )


def test_a_cropped_zarr_3_store_renders_like_the_whole_scroll(tmp_path, default, levels):
    """OME-NGFF 0.5's translation places the crop: the same scroll positions sample the same voxels."""
    corner = (8, 16, 32)  # z, y, x: the crop starts inside the scan, the point's samples lie inside it
    crop = levels[0][corner[0] :, corner[1] :, corner[2] :]
    group = zarr.open_group(tmp_path / "crop.zarr", mode="w", zarr_format=3)
    group.create_array("0", data=crop, chunks=(CHUNK,) * 3, shards=SHARD, dimension_names=("z", "y", "x"))
    transforms = [
        {"type": "scale", "scale": [1.0] * 3},
        {"type": "translation", "translation": list(map(float, corner))},
    ]
    entry = {"axes": AXES, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    group.attrs.put({"ome": {"version": "0.5", "multiscales": [entry]}})
    surface = point_surface(tmp_path / "point.ppm")
    assert_ok(ppm_to_layers(surface, default, tmp_path / "whole", "--number_of_layers", 3, "--quiet"))
    assert_ok(ppm_to_layers(surface, tmp_path / "crop.zarr", tmp_path / "crop", "--number_of_layers", 3, "--quiet"))
    whole, cropped = rendered(tmp_path / "whole"), rendered(tmp_path / "crop")
    assert sorted(cropped) == sorted(whole)
    for name, pixels in whole.items():
        assert pixels.any(), name
        np.testing.assert_array_equal(cropped[name], pixels, err_msg=name)


# A zarr 3 store is a store for every tool (its "zarr.json" among the one list of metadata names).


@pytest.mark.parametrize("inside", [".", "0", "0/c"])
def test_layers_inside_a_zarr_3_store_are_refused(tmp_path, levels, sheet, inside):
    store = STORES["zarr3-sharded-raw"](tmp_path / "v.zarr", levels)
    out = (store / inside / "layers").resolve()
    result = ppm_to_layers(sheet, store / "0", out, "--number_of_layers", 3)
    assert_one_line_error(result, f"OUTPUT_TIFF_DIR {out} is inside the zarr store {store}", code=1)
    assert not out.exists()


def test_decompressed_tiffs_inside_a_zarr_3_store_are_refused(tmp_path, levels):
    store = STORES["zarr3-sharded-raw"](tmp_path / "v.zarr", levels)
    tifffile.imwrite(tmp_path / "00000.tif", levels[0][0], compression="zlib")
    (tmp_path / "in").mkdir()
    (tmp_path / "00000.tif").rename(tmp_path / "in" / "00000.tif")
    output = store / "0" / "tiffs"
    result = run_script("decompress_tiffs.py", tmp_path / "in", output)
    assert_one_line_error(result, f"is inside the zarr store {store}", "write the TIFFs elsewhere", code=1)
    assert not output.exists()
