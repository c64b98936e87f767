"""Every error of ppm_to_layers: one line on stderr, the right exit code, no traceback, nothing written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from scrollzarr.ppm import write_ppm

from conftest import assert_ok, assert_one_line_error, run_script

GOOD_HEADER = "width: 3\nheight: 2\ndim: 6\nordered: true\ntype: double\nversion: 1\n"


def ppm_to_layers(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("ppm_to_layers.py", *args)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small OME-Zarr (2 levels) like scroll_to_ome's, written with zarr directly."""
    path = tmp_path_factory.mktemp("vol") / "v.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2)
    data = np.random.default_rng(1).integers(1, 60000, size=(16, 20, 24), dtype=np.uint16)
    for level, array in enumerate((data, data[::2, ::2, ::2])):
        group.create_array(str(level), data=array, chunks=(8, 8, 8), compressors=None)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [2.0**level] * 3}]}
        for level in range(2)
    ]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return path


@pytest.fixture
def ppm(tmp_path) -> Path:
    surface = np.zeros((2, 3, 6))
    surface[..., :3] = (5.0, 6.0, 7.0)
    surface[..., 3] = 1.0
    path = tmp_path / "s.ppm"
    write_ppm(path, surface)
    return path


def raw_ppm(tmp_path: Path, header: str, body: bytes | None = None) -> Path:
    path = tmp_path / "bad.ppm"
    path.write_bytes(header.encode() + (bytes(3 * 2 * 48) if body is None else body))
    return path


@pytest.mark.parametrize(
    ("header", "fragments"),
    [
        (GOOD_HEADER.replace("width: 3\n", ""), ["no 'width' field"]),
        (GOOD_HEADER.replace("height: 2\n", ""), ["no 'height' field"]),
        (GOOD_HEADER.replace("version: 1\n", ""), ["no 'version' field"]),
        (GOOD_HEADER.replace("dim: 6", "dim: 3"), ["'dim' is '3'", "dim: 6"]),
        (GOOD_HEADER.replace("type: double", "type: float"), ["'type' is 'float'", "type: double"]),
        (GOOD_HEADER.replace("ordered: true", "ordered: false"), ["'ordered' is 'false'"]),
        (GOOD_HEADER.replace("version: 1", "version: 2"), ["'version' is '2'"]),
        (GOOD_HEADER.replace("width: 3", "width: three"), ["'width' is 'three'", "positive whole number"]),
        (GOOD_HEADER.replace("height: 2", "height: 0"), ["'height' is '0'", "positive whole number"]),
        (GOOD_HEADER + "garbage line\n", ["'garbage line' is not 'key: value'"]),
    ],
)
def test_header_errors(tmp_path, store, header, fragments):
    path = raw_ppm(tmp_path, header + "<>\n")
    result = ppm_to_layers(path, store, tmp_path / "out")
    assert_one_line_error(result, "bad.ppm", *fragments, code=1)
    assert not (tmp_path / "out").exists()


def test_comments_and_unknown_keys_in_any_order_are_accepted(tmp_path, store):
    header = "# made by hand\nversion: 1\ntype: double\nheight: 2\nsource: test\ndim: 6\nwidth: 3\nordered: true\n<>\n"
    assert_ok(ppm_to_layers(raw_ppm(tmp_path, header), store, tmp_path / "out", "--quiet"))
    assert len([p for p in (tmp_path / "out").iterdir() if p.name != ".scrollzarr-layers.json"]) == 65


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (bytes(3 * 2 * 48 - 8), ["280 bytes of pixel data where a 3 x 2 map has 288", "truncated"]),
        (bytes(3 * 2 * 48 + 8), ["296 bytes", "extra data"]),
    ],
)
def test_wrong_body_length(tmp_path, store, body, fragments):
    result = ppm_to_layers(raw_ppm(tmp_path, GOOD_HEADER + "<>\n", body), store, tmp_path / "out")
    assert_one_line_error(result, *fragments, code=1)


def test_no_end_of_header(tmp_path, store):
    result = ppm_to_layers(raw_ppm(tmp_path, GOOD_HEADER), store, tmp_path / "out")
    assert_one_line_error(result, "no '<>' line ends the header", code=1)


def test_binary_header(tmp_path, store):
    path = tmp_path / "bad.ppm"
    path.write_bytes(b"\xff\xfe\x00\n<>\n" + bytes(48))
    assert_one_line_error(ppm_to_layers(path, store, tmp_path / "out"), "the header is not text", code=1)


def test_missing_and_unreadable_ppm(tmp_path, store):
    result = ppm_to_layers(tmp_path / "none.ppm", store, tmp_path / "out")
    assert_one_line_error(result, "cannot read the .ppm", "none.ppm", "No such file", code=1)
    (tmp_path / "folder").mkdir()
    result = ppm_to_layers(tmp_path / "folder", store, tmp_path / "out")
    assert_one_line_error(result, "a folder without meta.json; a surface is a .ppm file or a tifxyz folder", code=1)


def test_volume_errors(tmp_path, ppm, store):
    result = ppm_to_layers(ppm, tmp_path / "none.zarr", tmp_path / "out")
    assert_one_line_error(result, "none.zarr: no such zarr store", code=1)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    result = ppm_to_layers(ppm, tmp_path / "plain", tmp_path / "out")
    assert_one_line_error(result, "is neither a zarr array nor an OME-Zarr group", code=1)
    bare = zarr.open_group(tmp_path / "bare.zarr", mode="w", zarr_format=2)
    result = ppm_to_layers(ppm, tmp_path / "bare.zarr", tmp_path / "out")
    assert_one_line_error(result, "without OME-Zarr 'multiscales' metadata", code=1)
    bare.create_array("a", shape=(2, 3, 4, 5), dtype="uint16", chunks=(2, 3, 4, 5))
    result = ppm_to_layers(ppm, tmp_path / "bare.zarr" / "a", tmp_path / "out")
    assert_one_line_error(result, "has 4 dimensions", code=1)
    bare.create_array("f", shape=(2, 3, 4), dtype="float32", chunks=(2, 3, 4))
    result = ppm_to_layers(ppm, tmp_path / "bare.zarr" / "f", tmp_path / "out")
    assert_one_line_error(result, "voxels are float32", "unsigned integer", code=1)
    result = ppm_to_layers(ppm, store / "0", tmp_path / "out", "--level", 1)
    assert_one_line_error(result, "plain zarr array with no levels", code=1)
    result = ppm_to_layers(ppm, store, tmp_path / "out", "--level", 2)
    assert_one_line_error(result, "has levels 0 to 1; --level 2", code=1)
    assert not (tmp_path / "out").exists()


def test_an_unfinished_store_is_refused(tmp_path, ppm, store):
    """A store with scroll_to_ome's progress record is still being written (or was stopped)."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    (copy / "scrollzarr_progress.json").write_text("{}")
    for path in (copy, copy / "0"):
        result = ppm_to_layers(ppm, path, tmp_path / "out")
        assert_one_line_error(result, "unfinished conversion", "scroll_to_ome --resume", code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--number_of_layers", 0], "--number_of_layers must be at least 1, not 0"),
        (["--number_of_layers", 5, "--number_of_stacked_layers", 6], "between 1 and --number_of_layers (5), not 6"),
        (["--number_of_stacked_layers", 0], "between 1 and --number_of_layers (65), not 0"),
        (["--layer_spacing", 0], "--layer_spacing must be a positive number of voxels, not 0.0"),
        (["--layer_spacing", "nan"], "--layer_spacing must be a positive number of voxels, not nan"),
        (["--workers", 0], "--workers must be at least 1, not 0"),
        (["--zarr_cache_max_size_gb", -1], "--zarr_cache_max_size_gb must be a positive number of GB, not -1.0"),
        (["--block_size", 0], "--block_size must be at least 1, not 0"),
        (["--level", -1], "--level must be 0 or more, not -1"),
        (["--stack_filter", "mode"], "invalid choice: 'mode'"),
        (["--direction", "up"], "invalid choice: 'up'"),
        (["--number_of_layers", "many"], "invalid int value: 'many'"),
    ],
)
def test_option_errors(tmp_path, ppm, store, options, fragment):
    result = ppm_to_layers(ppm, store, tmp_path / "out", *options)
    assert_one_line_error(result, fragment, code=2)
    assert not (tmp_path / "out").exists()


def test_outputs_that_exist_need_overwrite(tmp_path, ppm, store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    result = ppm_to_layers(ppm, store, out)
    assert_one_line_error(result, "is not empty; add --overwrite", code=1)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (tmp_path / "file").write_text("keep")
    assert_one_line_error(ppm_to_layers(ppm, store, tmp_path / "file"), "is a file", code=1)
    result = ppm_to_layers(ppm, store, tmp_path / "new", tmp_path / "file")
    assert_one_line_error(result, "file exists; add --overwrite to replace it", code=1)
    assert (tmp_path / "file").read_text() == "keep"
    result = ppm_to_layers(ppm, store, tmp_path / "new", out)
    assert_one_line_error(result, "is a directory; OUTPUT_STACK_TIFF must be a file name", code=1)
    assert not (tmp_path / "new").exists()


def test_not_enough_space_is_found_before_writing(tmp_path, store):
    """A 200,000 x 200,000 map (a sparse file: all pixels unmapped) would need 5 PB of layers."""
    path = tmp_path / "huge.ppm"
    header = GOOD_HEADER.replace("width: 3", "width: 200000").replace("height: 2", "height: 200000") + "<>\n"
    with open(path, "wb") as file:
        file.write(header.encode())
        file.truncate(len(header) + 200000 * 200000 * 48)
    result = ppm_to_layers(path, store, tmp_path / "out")
    assert_one_line_error(result, "the layer TIFFs need", "free some space or write them elsewhere", code=1)
    assert not (tmp_path / "out").exists()


def test_a_read_only_output_is_one_message(tmp_path, ppm, store, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        result = ppm_to_layers(ppm, store, small_tmpfs / "out")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert_one_line_error(result, "cannot write", "make the output writable", code=1)


def test_quiet_prints_nothing_and_verbose_is_accepted(tmp_path, ppm, store):
    result = ppm_to_layers(ppm, store, tmp_path / "a", "--quiet")
    assert_ok(result)
    assert result.stderr == ""
    result = ppm_to_layers(ppm, store, tmp_path / "b", "--verbose")
    assert_ok(result)
    assert "wrote 65 layers of 3 x 2 (uint16)" in result.stderr  # the bar, on terminals only: test_cli_hostile.py


def test_dashed_spellings_and_the_num_threads_alias(tmp_path, ppm, store):
    underscored = ["--number_of_layers", 3, "--number_of_stacked_layers", 1, "--layer_spacing", 2]
    underscored += ["--stack_filter", "min", "--zarr_cache_max_size_gb", 1, "--block_size", 2, "--workers", 1]
    dashed = ["--number-of-layers", 3, "--number-of-stacked-layers", 1, "--layer-spacing", 2]
    dashed += ["--stack-filter", "min", "--zarr-cache-max-size-gb", 1, "--block-size", 2, "--num_threads", 1]
    assert_ok(ppm_to_layers(ppm, store, tmp_path / "a", tmp_path / "a.tif", *underscored))
    assert_ok(ppm_to_layers(ppm, store, tmp_path / "b", tmp_path / "b.tif", *dashed, "--num-threads", 1))
    for name in ("00.tif", "01.tif", "02.tif"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_a_direction_unknown_to_the_library_is_a_usage_error():
    from scrollzarr.errors import UsageError
    from scrollzarr.layers import LayerOptions

    with pytest.raises(UsageError, match="--direction must be one of both, positive, negative, not up"):
        LayerOptions(direction="up").check()
